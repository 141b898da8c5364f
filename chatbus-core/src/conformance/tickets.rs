//! The conformance suite of [`Tickets`], the per-room ticket counters of a fast broker.
//!
//! ```no_run
//! # async fn f() {
//! let broker = chatbus_core::MemoryBroker::new();
//! chatbus_core::conformance::tickets::run_all(&broker).await;
//! # }
//! ```

use std::collections::BTreeSet;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{unique_room, CheckResult};
use crate::tickets::{Baseline, Renewal, Ticket, Tickets};

fn check(ok: bool, what: impl FnOnce() -> String) -> CheckResult {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

fn err(e: crate::Error) -> String {
    e.to_string()
}

/// A new room's baseline fixes the epoch its first ticket is of: a receiver that subscribed
/// before the room's first message must not see that message as of another counter.
pub async fn first_ticket_is_of_the_baselines_epoch<T: Tickets + ?Sized>(t: &T) -> CheckResult {
    let room = unique_room("tk-first");
    let b = t.ticket_baseline(&room).await.map_err(err)?;
    check(b.epoch != 0 && b.counter == 0 && b.open.is_empty(), || {
        format!("baseline of a new room: {b:?}")
    })?;
    let again = t.ticket_baseline(&room).await.map_err(err)?;
    check(again == b, || {
        format!("a second baseline {again:?} after {b:?}")
    })?;
    let first = t.take_ticket(&room).await.map_err(err)?;
    check(
        first
            == Ticket {
                epoch: b.epoch,
                n: 1,
            },
        || format!("first ticket {first:?} after baseline {b:?}"),
    )
}

/// Tickets count up from 1 and stay open until closed; closing returns the horizon (the
/// highest ticket taken by then); closing twice changes nothing.
pub async fn tickets_open_and_close<T: Tickets + ?Sized>(t: &T) -> CheckResult {
    let room = unique_room("tk-open");
    let a = t.take_ticket(&room).await.map_err(err)?;
    let b = t.take_ticket(&room).await.map_err(err)?;
    check(
        a.n == 1 && b.n == 2 && a.epoch == b.epoch && a.epoch != 0,
        || format!("two tickets: {a:?}, {b:?}"),
    )?;
    let open = t.ticket_baseline(&room).await.map_err(err)?;
    let want = Baseline {
        epoch: a.epoch,
        counter: 2,
        open: vec![1, 2],
    };
    check(open == want, || {
        format!("baseline {open:?}, expected {want:?}")
    })?;
    let h = t.close_ticket(&room, a).await.map_err(err)?;
    check(h == b, || format!("horizon after closing {a:?}: {h:?}"))?;
    let c = t.take_ticket(&room).await.map_err(err)?;
    let h = t.close_ticket(&room, b).await.map_err(err)?;
    check(h == c, || format!("horizon after closing {b:?}: {h:?}"))?;
    let h = t.close_ticket(&room, b).await.map_err(err)?;
    check(h == c, || format!("closing {b:?} again: {h:?}"))?;
    let open = t.ticket_baseline(&room).await.map_err(err)?;
    check(open.counter == 3 && open.open == [3], || {
        format!("baseline after closing 1 and 2 of 3: {open:?}")
    })
}

/// Concurrent takers get distinct tickets, 1 to N with none skipped; rooms count apart.
pub async fn concurrent_takers_get_every_number_once<T: Tickets + ?Sized>(t: &T) -> CheckResult {
    let room = unique_room("tk-concurrent");
    let other = unique_room("tk-other");
    let takes = (0..50).map(|_| t.take_ticket(&room));
    let got = futures::future::join_all(takes).await;
    let mut numbers = BTreeSet::new();
    for r in got {
        let ticket = r.map_err(err)?;
        numbers.insert(ticket.n);
    }
    check(numbers == (1..=50).collect(), || {
        format!("50 concurrent takes gave {numbers:?}")
    })?;
    let o = t.take_ticket(&other).await.map_err(err)?;
    check(o.n == 1, || format!("another room's first ticket: {o:?}"))
}

/// A lease runs for its time to live from the broker's clock, a renewal that arrives past its
/// deadline changes nothing, and a lapsed lease is listed (lapsed) until `keep` has passed.
pub async fn leases_renew_refuse_late_and_lapse<T: Tickets + ?Sized>(t: &T) -> CheckResult {
    use std::time::Duration;
    let me = unique_room("lease");
    let me = me.as_str();
    let now = t.lease_clock().await.map_err(err)?;
    let ttl = Duration::from_millis(300);
    let renewed = t
        .renew_lease(me, ttl, now + 60_000, false)
        .await
        .map_err(err)?;
    let Renewal::Renewed { now_ms } = renewed else {
        return Err(format!("a renewal before its deadline: {renewed:?}"));
    };
    check(now_ms >= now && now_ms < now + 10_000, || {
        format!("clock {now}, then renewed at {now_ms}")
    })?;
    let mine = |l: &crate::Leases| {
        l.leases
            .iter()
            .find(|x| x.instance == me)
            .map(|x| x.expires_ms)
    };
    let keep = Duration::from_secs(1);
    let listed = t.leases(keep).await.map_err(err)?;
    check(mine(&listed) == Some(now_ms + 300), || {
        format!("renewed at {now_ms} for 300 ms, listed {listed:?}")
    })?;
    let late = t
        .renew_lease(me, ttl, now.saturating_sub(1), false)
        .await
        .map_err(err)?;
    check(matches!(late, Renewal::TooLate { .. }), || {
        format!("a renewal past its deadline: {late:?}")
    })?;
    let after = t.leases(keep).await.map_err(err)?;
    check(mine(&after) == Some(now_ms + 300), || {
        format!("a late renewal changed the lease: {after:?}")
    })?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lapsed = t.leases(keep).await.map_err(err)?;
    check(mine(&lapsed).is_some_and(|e| e <= lapsed.now_ms), || {
        format!("a lapsed lease is listed as lapsed until `keep`: {lapsed:?}")
    })?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let gone = t.leases(keep).await.map_err(err)?;
    check(mine(&gone).is_none(), || {
        format!("a lease lapsed longer than `keep` ago: {gone:?}")
    })
}

/// Every check by name.
pub fn checks<'a, T: Tickets + ?Sized>(
    t: &'a T,
) -> Vec<(&'static str, BoxFuture<'a, CheckResult>)> {
    vec![
        (
            "first_ticket_is_of_the_baselines_epoch",
            first_ticket_is_of_the_baselines_epoch(t).boxed(),
        ),
        ("tickets_open_and_close", tickets_open_and_close(t).boxed()),
        (
            "concurrent_takers_get_every_number_once",
            concurrent_takers_get_every_number_once(t).boxed(),
        ),
        (
            "leases_renew_refuse_late_and_lapse",
            leases_renew_refuse_late_and_lapse(t).boxed(),
        ),
    ]
}

/// Runs every check; panics with a report naming each failed check.
pub async fn run_all<T: Tickets + ?Sized>(t: &T) {
    let mut failed = Vec::new();
    for (name, check) in checks(t) {
        if let Err(reason) = check.await {
            failed.push(format!("  - {name}: {reason}"));
        }
    }
    assert!(
        failed.is_empty(),
        "tickets failed {} conformance check(s):\n{}",
        failed.len(),
        failed.join("\n")
    );
}
