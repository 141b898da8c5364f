//! The interest-based DualBus (`DualConfig::with_interest`) over in-process brokers: each bus
//! receives only its rooms' traffic, concurrent publishers on several buses are delivered once
//! and in log order everywhere, and lost fast copies are read from the room's log.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

mod support;
use chatbus_core::{
    Broker, BrokerExt, DualBus, DualConfig, Envelope, Error, Interest, MemoryBroker, Receipt,
    ReplayFrom, Room, Stamp,
};
use support::{collect, faulty, log, relay, room, Cut, Faulty};

fn interest() -> DualConfig {
    DualConfig::default().with_interest(true)
}

/// Every acked message exactly once, and in the order of the durable log.
async fn assert_log_order_once(
    got: &[Envelope],
    receipts: &[Receipt],
    log: &MemoryBroker,
    r: &Room,
) {
    let mut seen: HashMap<_, usize> = HashMap::new();
    for e in got {
        *seen.entry(e.id).or_default() += 1;
    }
    let missing = receipts
        .iter()
        .filter(|x| !seen.contains_key(&x.id))
        .count();
    let dups = seen.values().filter(|&&c| c > 1).count();
    assert_eq!((missing, dups), (0, 0), "missing, duplicated");
    let stored = log
        .replay_vec(r, ReplayFrom::Beginning, 100_000)
        .await
        .expect("replay");
    let ids: Vec<_> = got.iter().map(|e| e.id).collect();
    let logged: Vec<_> = stored.iter().map(|e| e.id).collect();
    assert_eq!(ids, logged, "delivered in another order than the log's");
}

/// Two buses publish concurrently to one room, every third durable write and every fourth
/// fast copy delayed, so that tickets reach the log out of their order and fast copies arrive
/// out of the log's; each bus's subscriber gets every message once, in the log's order, and so
/// both get the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_two_buses_are_delivered_once_in_log_order() {
    let fast = faulty(relay());
    fast.hooks.delay_every.store(4, Ordering::Relaxed);
    let slow_log = faulty(log());
    slow_log.hooks.delay_every.store(3, Ordering::Relaxed);
    let durable = slow_log.inner.clone();
    let a = Arc::new(DualBus::new(fast.clone(), slow_log.clone(), interest()));
    let b = Arc::new(DualBus::new(fast.clone(), slow_log.clone(), interest()));
    let r = room("interest-concurrent");
    let mut sa = a
        .subscribe(Interest::room(r.clone()))
        .await
        .expect("subscribe");
    let mut sb = b
        .subscribe(Interest::room(r.clone()))
        .await
        .expect("subscribe");
    let mut tasks = Vec::new();
    for bus in [a.clone(), b.clone(), a.clone(), b.clone()] {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            for i in 0..50 {
                receipts.push(
                    bus.publish(&Envelope::new(r.clone(), format!("{i}")))
                        .await
                        .expect("publish"),
                );
            }
            receipts
        }));
    }
    let mut receipts = Vec::new();
    for t in tasks {
        receipts.extend(t.await.expect("publisher"));
    }
    let got_a = collect(&mut sa, 200).await;
    let got_b = collect(&mut sb, 200).await;
    assert_log_order_once(&got_a, &receipts, &durable, &r).await;
    assert_log_order_once(&got_b, &receipts, &durable, &r).await;
}

/// A bus that follows one room receives nothing of another room from the brokers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_receives_only_its_rooms() {
    let (fast, durable) = (relay(), log());
    let publisher = DualBus::new(fast.clone(), durable.clone(), interest());
    let follower = DualBus::new(fast.clone(), durable.clone(), interest());
    let (mine, other) = (room("interest-mine"), room("interest-other"));
    let mut sub = follower
        .subscribe(Interest::room(mine.clone()))
        .await
        .expect("subscribe");
    let mut receipts = Vec::new();
    for i in 0..100 {
        publisher
            .publish(&Envelope::new(other.clone(), format!("{i}")))
            .await
            .expect("publish");
        if i % 10 == 0 {
            receipts.push(
                publisher
                    .publish(&Envelope::new(mine.clone(), format!("{i}")))
                    .await
                    .expect("publish"),
            );
        }
    }
    let got = collect(&mut sub, 10).await;
    assert_log_order_once(&got, &receipts, &durable, &mine).await;
    let stats = follower.stats();
    assert_eq!(
        (stats.via_fast, stats.via_durable, stats.duplicates),
        (10, 0, 0),
        "the follower read only its room's 10 messages"
    );
}

/// Fast copies lost (every fifth) while two buses publish: the room's log fills them, exactly
/// once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fast_copies_are_read_from_the_rooms_log() {
    let fast: Faulty = faulty(relay());
    let durable = log();
    let a = Arc::new(DualBus::new(fast.clone(), durable.clone(), interest()));
    let b = Arc::new(DualBus::new(fast.clone(), durable.clone(), interest()));
    let r = room("interest-lossy");
    let mut sb = b
        .subscribe(Interest::room(r.clone()))
        .await
        .expect("subscribe");
    // One message through before the losses, so that the follower has a position to read from.
    let mut receipts = vec![a
        .publish(&Envelope::new(r.clone(), "first"))
        .await
        .expect("publish")];
    fast.hooks.lose_every.store(5, Ordering::Relaxed);
    for i in 0..100 {
        let bus = if i % 2 == 0 { &a } else { &b };
        receipts.push(
            bus.publish(&Envelope::new(r.clone(), format!("{i}")))
                .await
                .expect("publish"),
        );
    }
    fast.hooks.lose_every.store(0, Ordering::Relaxed);
    // A last message whose horizon covers every ticket, so nothing waits for a later one.
    receipts.push(
        a.publish(&Envelope::new(r.clone(), "last"))
            .await
            .expect("publish"),
    );
    let got = collect(&mut sb, receipts.len()).await;
    assert_log_order_once(&got, &receipts, &durable, &r).await;
    let stats = b.stats();
    assert!(stats.via_durable > 0 && stats.gaps_filled > 0, "{stats:?}");
}

/// A ticket whose message never reaches the fast path nor the log (its publisher died after
/// the ticket) holds the room back until the gap timeout; then the rest is delivered and the
/// subscribers are told to resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_never_written_is_given_up_after_the_gap_timeout() {
    let (fast, durable) = (relay(), log());
    let config = interest().with_gap_timeout(Duration::from_millis(800));
    let bus = DualBus::new(fast.clone(), durable.clone(), config);
    let r = room("interest-dead");
    let mut sub = bus
        .subscribe(Interest::room(r.clone()))
        .await
        .expect("subscribe");
    let tickets = fast.tickets().expect("memory tickets");
    // A publisher that took a ticket and died.
    let _dead = tickets.take_ticket(&r).await.expect("ticket");
    let after = bus
        .publish(&Envelope::new(r.clone(), "after"))
        .await
        .expect("publish");
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await {
        Ok(Some(Ok(env))) => assert_eq!(env.id, after.id),
        other => panic!("expected the held message, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "delivered before the timeout"
    );
    match tokio::time::timeout(Duration::from_secs(2), sub.recv()).await {
        Ok(Some(Err(Error::Lagged { .. }))) => {}
        other => panic!("expected Lagged, got {other:?}"),
    }
    assert_eq!(bus.stats().gap_timeouts, 1);
    // A fast copy stamped like a publisher's abandon notice releases at once instead.
    let t = tickets.take_ticket(&r).await.expect("ticket");
    let h = tickets.close_ticket(&r, t).await.expect("close");
    let mut notice = Envelope::ephemeral(r.clone(), "");
    notice.stamp = Some(Stamp {
        ticket: t,
        horizon: h.n,
    });
    fast.publish(&notice).await.expect("notice");
    let next = bus
        .publish(&Envelope::new(r.clone(), "next"))
        .await
        .expect("publish");
    match tokio::time::timeout(Duration::from_millis(400), sub.recv()).await {
        Ok(Some(Ok(env))) => assert_eq!(env.id, next.id),
        other => panic!("expected the next message at once, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interest_all_is_refused() {
    let bus = DualBus::new(relay(), log(), interest());
    assert!(matches!(
        bus.subscribe(Interest::All).await,
        Err(Error::Config(_))
    ));
}

/// The whole broker conformance suite (whose isolation check skips `Interest::All`, refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interest_bus_passes_conformance_for_room_subscriptions() {
    let bus = DualBus::new(relay(), log(), interest());
    chatbus_core::conformance::run_all(&bus).await;
}

/// Follows `sub` as the Hub does: on `Lagged`, reads the log after the last cursor; copies at
/// or below it are dropped. Returns what was delivered, once `want` ids are all in.
async fn follow_as_the_hub(
    sub: &mut chatbus_core::Subscription,
    log: &MemoryBroker,
    r: &Room,
    want: &[chatbus_core::MessageId],
) -> Vec<Envelope> {
    let mut got: Vec<Envelope> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !want.iter().all(|id| got.iter().any(|e| &e.id == id)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let last = got.last().and_then(|e| e.cursor);
        match tokio::time::timeout(left, sub.recv()).await {
            Ok(Some(Ok(env))) => {
                let offset = env.cursor.map(|c| c.offset);
                if last.is_none_or(|l| offset > Some(l.offset)) {
                    got.push(env);
                }
            }
            Ok(Some(Err(Error::Lagged { .. }))) => {
                let from = last.map_or(ReplayFrom::Beginning, ReplayFrom::Cursor);
                got.extend(log.replay_vec(r, from, 100_000).await.expect("replay"));
            }
            other => panic!("after {} messages: {other:?}", got.len()),
        }
    }
    got
}

/// Follows `sub` as the Hub does until every id in `ids` is in, and asserts each came once, in
/// the log's order.
async fn follows_in_log_order_once(
    sub: &mut chatbus_core::Subscription,
    durable: &MemoryBroker,
    r: &Room,
    ids: &[chatbus_core::MessageId],
) {
    let got = follow_as_the_hub(sub, durable, r, ids).await;
    let receipts: Vec<Receipt> = ids.iter().map(|&id| Receipt { id, cursor: None }).collect();
    assert_log_order_once(&got, &receipts, durable, r).await;
}

/// Two interest buses on one fast broker and one log, the first behind a [`Cut`], both
/// subscribed to room `name`, their leases renewed once.
struct Pair {
    cut_a: Cut,
    a: Arc<DualBus<Cut, MemoryBroker>>,
    b: Arc<DualBus<Cut, MemoryBroker>>,
    durable: MemoryBroker,
    r: Room,
    sa: chatbus_core::Subscription,
    sb: chatbus_core::Subscription,
}

impl Pair {
    async fn new(name: &str) -> Self {
        let fast = relay();
        let durable = log();
        let cut_a = Cut::new(fast.clone());
        let a = Arc::new(DualBus::new(cut_a.clone(), durable.clone(), interest()));
        let b = Arc::new(DualBus::new(Cut::new(fast), durable.clone(), interest()));
        let r = room(name);
        let sa = a
            .subscribe(Interest::room(r.clone()))
            .await
            .expect("subscribe");
        let sb = b
            .subscribe(Interest::room(r.clone()))
            .await
            .expect("subscribe");
        tokio::time::sleep(Duration::from_millis(500)).await;
        Self {
            cut_a,
            a,
            b,
            durable,
            r,
            sa,
            sb,
        }
    }
}

/// One bus cut from the fast broker while both send to one room: the cut bus's sends wait for
/// its lease to lapse, then go to the log without tickets; the other bus stops trusting
/// tickets and reads the room from the log. Both subscribers (resyncing on `Lagged` as the
/// Hub does) get every acked message once, in the log's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_cut_from_the_fast_broker_keeps_publishing_and_order_holds() {
    let Pair {
        cut_a,
        a,
        b,
        durable,
        r,
        mut sa,
        mut sb,
    } = Pair::new("interest-cut").await;
    let send = |bus: Arc<DualBus<Cut, MemoryBroker>>, tag: &'static str, n: usize| {
        let r = r.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..n {
                let env = Envelope::new(r.clone(), format!("{tag} {i}"));
                ids.push(bus.publish(&env).await.expect("publish").id);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ids
        })
    };
    let (ta, tb) = (send(a.clone(), "a", 200), send(b.clone(), "b", 200));
    tokio::time::sleep(Duration::from_millis(500)).await;
    cut_a.cut.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cut_a.cut.store(false, Ordering::Relaxed);
    let mut ids = ta.await.expect("sender a");
    ids.extend(tb.await.expect("sender b"));
    for sub in [&mut sa, &mut sb] {
        follows_in_log_order_once(sub, &durable, &r, &ids).await;
    }
    assert!(
        a.stats().ticketless_publishes > 0,
        "the cut bus wrote without tickets: {:?}",
        a.stats()
    );
    assert!(
        b.stats().tail_periods > 0,
        "the other bus read the room from the log: {:?}",
        b.stats()
    );
}

/// The fast broker refuses this bus's room tickets for longer than a send waits (5 s) while its
/// lease still renews, as when the cluster shard of the room fails over and the leases' shard
/// does not: the bus lets its lease lapse and publishes without tickets, so no send is refused,
/// and both buses still deliver every message once, in log order.
#[tokio::test]
async fn sends_go_on_when_only_the_rooms_tickets_fail_and_the_lease_renews() {
    let Pair {
        cut_a,
        a,
        b: _b, // kept alive: its subscription ends with it
        durable,
        r,
        mut sa,
        mut sb,
    } = Pair::new("interest-shard-down").await;
    let sender = {
        let (a, r) = (a.clone(), r.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..60 {
                let env = Envelope::new(r.clone(), format!("a {i}"));
                match a.publish(&env).await {
                    Ok(receipt) => ids.push(receipt.id),
                    Err(e) => panic!("send {i} refused while the lease renewed: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    cut_a.rooms_down.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(7)).await;
    cut_a.rooms_down.store(false, Ordering::Relaxed);
    let ids = sender.await.expect("sender a");
    for sub in [&mut sa, &mut sb] {
        follows_in_log_order_once(sub, &durable, &r, &ids).await;
    }
    assert!(
        a.stats().ticketless_publishes > 0,
        "the bus wrote without tickets: {:?}",
        a.stats()
    );
}
