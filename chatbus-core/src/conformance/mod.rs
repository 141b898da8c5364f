//! The conformance suite every [`Broker`] runs (feature `conformance`).
//!
//! Each check is a public async function that returns `Err` with a description when the
//! broker breaks the contract of [`Broker`]; [`run_all`] runs them all and panics with a report
//! of every failure. Checks use fresh, unique room names, so they can run against a shared
//! long-lived broker (one Redis, one Kafka topic), and wrap every receive in a timeout so a
//! broken broker fails fast instead of hanging.
//!
//! ```no_run
//! # async fn f() {
//! chatbus_core::conformance::run_all(&chatbus_core::MemoryBroker::new()).await;
//! # }
//! ```

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::broker::{Broker, BrokerExt, Interest, ReplayFrom, Subscription};
use crate::envelope::{Envelope, MessageId, Room};
use crate::Error;

pub mod store;
pub mod tickets;

/// The outcome of one check.
pub type CheckResult = std::result::Result<(), String>;

/// How long one receive may take before the check fails.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(15);

/// The room `name`, for tests that pick their own names; panics on an invalid one.
pub fn room(name: &str) -> Room {
    match Room::new(name) {
        Ok(r) => r,
        Err(e) => panic!("room {name:?}: {e}"),
    }
}

/// Polls `cond` every 20 ms until it holds, or panics after `within` naming `what`. For
/// conditions with no event to wait on (a counter, a server's state); `within` bounds a
/// broken system, it is not the expected time.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if cond().await {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{what}: not true within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A unique room name for one check.
pub fn unique_room(tag: &str) -> Room {
    let id = MessageId::new().to_string();
    match Room::new(format!("conf.{tag}.{id}")) {
        Ok(r) => r,
        Err(_) => unreachable!("tag and uuid use the room charset"),
    }
}

fn ctx<T, E: std::fmt::Display>(
    r: std::result::Result<T, E>,
    what: &str,
) -> std::result::Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Receives the next message, failing on timeout, end of stream or an error item.
pub async fn recv(sub: &mut Subscription) -> std::result::Result<Envelope, String> {
    match tokio::time::timeout(RECV_TIMEOUT, sub.recv()).await {
        Err(_) => Err(format!("no message within {RECV_TIMEOUT:?}")),
        Ok(None) => Err("subscription ended".into()),
        Ok(Some(Err(e))) => Err(format!("subscription yielded an error: {e}")),
        Ok(Some(Ok(env))) => Ok(env),
    }
}

/// Fails if a message arrives within `wait`.
pub async fn expect_silence(sub: &mut Subscription, wait: Duration) -> CheckResult {
    match tokio::time::timeout(wait, sub.recv()).await {
        Err(_) => Ok(()),
        Ok(None) => Err("subscription ended".into()),
        Ok(Some(item)) => Err(format!("expected nothing, got {item:?}")),
    }
}

/// What a hub session writes until it has been quiet for `quiet`: each frame as text, a close
/// as `CLOSE <reason>` (and the end), anything else (lagged, reset) as its `Debug` form. For
/// tests of the Hub over a real broker.
pub async fn drain_session(s: &mut crate::Session, quiet: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(o) = tokio::time::timeout(quiet, s.recv()).await {
        match o {
            crate::Outbound::Frame(b) => out.push(String::from_utf8_lossy(&b).into_owned()),
            crate::Outbound::Close(r) => {
                out.push(format!("CLOSE {r:?}"));
                break;
            }
            other => out.push(format!("{other:?}")),
        }
    }
    out
}

fn body(i: usize) -> Bytes {
    Bytes::from(format!("m{i}"))
}

/// A message published after `subscribe` returned is delivered, unchanged, with the receipt's
/// cursor.
pub async fn round_trip<B: Broker + ?Sized>(b: &B) -> CheckResult {
    let room = unique_room("rt");
    let mut sub = ctx(b.subscribe(Interest::room(room.clone())).await, "subscribe")?;
    let env = Envelope::new(room.clone(), "hello").with_from("alice");
    let receipt = ctx(b.publish(&env).await, "publish")?;
    if receipt.id != env.id {
        return Err("receipt id differs from the envelope id".into());
    }
    let got = recv(&mut sub).await?;
    if got.id != env.id
        || got.room != room
        || got.payload != env.payload
        || got.from != env.from
        || got.ts != env.ts
        || got.kind != env.kind
    {
        return Err(format!("delivered {got:?}, published {env:?}"));
    }
    if b.capabilities().replay && (receipt.cursor.is_none() || got.cursor != receipt.cursor) {
        return Err(format!(
            "cursor mismatch: receipt {:?}, delivered {:?}",
            receipt.cursor, got.cursor
        ));
    }
    Ok(())
}

/// A subscriber of one room receives nothing of another room; `Interest::All` receives both.
pub async fn room_isolation<B: Broker + ?Sized>(b: &B) -> CheckResult {
    let a = unique_room("iso-a");
    let other = unique_room("iso-b");
    let mut sub_a = ctx(b.subscribe(Interest::room(a.clone())).await, "subscribe")?;
    let mut sub_b = ctx(
        b.subscribe(Interest::room(other.clone())).await,
        "subscribe",
    )?;
    // A broker may serve room subscriptions only (see `Broker::subscribe`).
    let mut sub_all = match b.subscribe(Interest::All).await {
        Ok(sub) => Some(sub),
        Err(Error::Config(_)) => None,
        Err(e) => return Err(format!("subscribe all: {e}")),
    };
    ctx(
        b.publish(&Envelope::new(other.clone(), "for b")).await,
        "publish",
    )?;
    ctx(
        b.publish(&Envelope::new(a.clone(), "for a")).await,
        "publish",
    )?;
    let got = recv(&mut sub_a).await?;
    if got.room != a {
        return Err(format!(
            "subscriber of {a} received a message of {}",
            got.room
        ));
    }
    let got = recv(&mut sub_b).await?;
    if got.room != other {
        return Err(format!(
            "subscriber of {other} received a message of {}",
            got.room
        ));
    }
    if let Some(sub_all) = sub_all.as_mut() {
        // Interest::All sees traffic of other checks too: look for ours.
        let mut seen = HashSet::new();
        while seen.len() < 2 {
            let env = recv(sub_all).await?;
            if env.room == a || env.room == other {
                seen.insert(env.room);
            }
        }
    }
    expect_silence(&mut sub_b, Duration::from_millis(300)).await?;
    expect_silence(&mut sub_a, Duration::from_millis(300)).await
}

/// Messages of one room arrive in publish order.
pub async fn room_order<B: Broker + ?Sized>(b: &B) -> CheckResult {
    let room = unique_room("order");
    let mut sub = ctx(b.subscribe(Interest::room(room.clone())).await, "subscribe")?;
    let n = 200;
    for i in 0..n {
        ctx(
            b.publish(&Envelope::new(room.clone(), body(i))).await,
            "publish",
        )?;
    }
    let mut last_cursor = None;
    for i in 0..n {
        let got = recv(&mut sub).await?;
        if got.payload != body(i) {
            return Err(format!(
                "message {i}: expected {:?}, got {:?}",
                body(i),
                got.payload
            ));
        }
        if got.cursor.is_some() && got.cursor <= last_cursor {
            return Err(format!(
                "cursor {:?} not after {:?}",
                got.cursor, last_cursor
            ));
        }
        last_cursor = got.cursor;
    }
    Ok(())
}

/// Replay from a cursor returns exactly the later durable messages of that room, in order;
/// from a time and from the beginning work; `history` pages backwards. A broker without
/// history answers `Unsupported`.
pub async fn replay<B: Broker + ?Sized>(b: &B) -> CheckResult {
    let room = unique_room("replay");
    let noise = unique_room("replay-noise");
    if !b.capabilities().replay {
        return match b.replay(&room, ReplayFrom::Beginning, 10).await {
            Err(Error::Unsupported { .. }) => Ok(()),
            Err(e) => Err(format!(
                "replay without history: expected Unsupported, got {e}"
            )),
            Ok(_) => Err("replay without history: expected Unsupported, got a stream".into()),
        };
    }
    let n = 20;
    let mut receipts = Vec::new();
    let mut published = Vec::new();
    for i in 0..n {
        let env = Envelope::new(room.clone(), body(i));
        receipts.push(ctx(b.publish(&env).await, "publish")?);
        published.push(env);
        ctx(
            b.publish(&Envelope::new(noise.clone(), "noise")).await,
            "publish noise",
        )?;
        if i == 9 {
            // A whole millisecond between the halves so that replay by time can split them.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let ids = |v: &[Envelope]| v.iter().map(|e| e.id).collect::<Vec<_>>();
    let Some(mid) = receipts[9].cursor else {
        return Err("a broker with replay returned no cursor".into());
    };
    let later = ctx(
        b.replay_vec(&room, ReplayFrom::Cursor(mid), 1000).await,
        "replay",
    )?;
    if ids(&later) != ids(&published[10..]) {
        return Err(format!(
            "replay after the 10th cursor returned {} messages, expected exactly the 10 later ones in order",
            later.len()
        ));
    }
    if later
        .iter()
        .zip(&receipts[10..])
        .any(|(e, r)| e.cursor != r.cursor)
    {
        return Err("replayed cursors differ from the receipts".into());
    }
    let limited = ctx(
        b.replay_vec(&room, ReplayFrom::Cursor(mid), 3).await,
        "replay limit",
    )?;
    if ids(&limited) != ids(&published[10..13]) {
        return Err(format!(
            "replay with limit 3 returned {} messages",
            limited.len()
        ));
    }
    let all = ctx(
        b.replay_vec(&room, ReplayFrom::Beginning, 1000).await,
        "replay all",
    )?;
    if ids(&all) != ids(&published) {
        return Err(format!(
            "replay from the beginning returned {} of {n}",
            all.len()
        ));
    }
    let t = published[10].ts;
    let by_time = ctx(
        b.replay_vec(&room, ReplayFrom::Time(t), 1000).await,
        "replay by time",
    )?;
    if ids(&by_time) != ids(&published[10..]) {
        return Err(format!(
            "replay from time returned {} messages, expected the 10 at or after it",
            by_time.len()
        ));
    }
    let last = receipts[n - 1].cursor;
    let end = ctx(
        b.replay_vec(&room, ReplayFrom::Cursor(last.unwrap_or(mid)), 10)
            .await,
        "replay end",
    )?;
    if !end.is_empty() {
        return Err(format!(
            "replay after the last cursor returned {} messages",
            end.len()
        ));
    }
    let page = ctx(b.history(&room, receipts[15].cursor, 5).await, "history")?;
    if !page.is_complete() {
        return Err("a history page of a room alone in its log is not complete".into());
    }
    let page = page.messages;
    if ids(&page) != ids(&published[10..15]) {
        return Err(format!(
            "history before the 16th returned {} messages, expected 10..15",
            page.len()
        ));
    }
    let newest = ctx(b.history(&room, None, 2).await, "history newest")?.messages;
    if ids(&newest) != ids(&published[n - 2..]) {
        return Err("history(None, 2) is not the two newest messages".into());
    }
    Ok(())
}

/// Ephemeral messages are delivered live but never replayed and carry no cursor.
pub async fn ephemeral<B: Broker + ?Sized>(b: &B) -> CheckResult {
    let room = unique_room("eph");
    let mut sub = ctx(b.subscribe(Interest::room(room.clone())).await, "subscribe")?;
    let receipt = ctx(
        b.publish(&Envelope::ephemeral(room.clone(), "typing"))
            .await,
        "publish",
    )?;
    if receipt.cursor.is_some() {
        return Err("an ephemeral message got a cursor".into());
    }
    let durable = Envelope::new(room.clone(), "kept");
    ctx(b.publish(&durable).await, "publish")?;
    let first = recv(&mut sub).await?;
    if first.payload != "typing" || first.kind != crate::Kind::Ephemeral {
        return Err(format!(
            "expected the ephemeral message first, got {first:?}"
        ));
    }
    recv(&mut sub).await?;
    if b.capabilities().replay {
        let all = ctx(
            b.replay_vec(&room, ReplayFrom::Beginning, 100).await,
            "replay",
        )?;
        if all.len() != 1 || all[0].id != durable.id {
            return Err(format!(
                "replay returned {} messages, expected only the durable one",
                all.len()
            ));
        }
    }
    Ok(())
}

/// Concurrent publishers: every message arrives once, each publisher's messages in order.
pub async fn concurrent_publishers<B: Broker + ?Sized>(b: &B) -> CheckResult {
    let room = unique_room("conc");
    let mut sub = ctx(b.subscribe(Interest::room(room.clone())).await, "subscribe")?;
    let (publishers, each) = (4usize, 50usize);
    let tasks = (0..publishers).map(|p| {
        let room = room.clone();
        async move {
            for i in 0..each {
                let env =
                    Envelope::new(room.clone(), format!("{p}:{i}")).with_from(format!("p{p}"));
                ctx(b.publish(&env).await, "publish")?;
            }
            Ok::<_, String>(())
        }
    });
    for r in futures::future::join_all(tasks).await {
        r?;
    }
    let mut next: HashMap<String, usize> = HashMap::new();
    for _ in 0..publishers * each {
        let got = recv(&mut sub).await?;
        let text = String::from_utf8_lossy(&got.payload).into_owned();
        let Some((p, i)) = text.split_once(':') else {
            return Err(format!("unexpected payload {text:?}"));
        };
        let i: usize = ctx(i.parse(), "payload index")?;
        let expected = next.entry(p.to_owned()).or_insert(0);
        if i != *expected {
            return Err(format!(
                "publisher {p}: expected message {expected}, got {i} (loss, duplicate or reorder)"
            ));
        }
        *expected += 1;
    }
    expect_silence(&mut sub, Duration::from_millis(200)).await
}

/// Dropping a subscription cleans up: publishing goes on without blocking, and a new
/// subscription to the same room works and receives only new messages.
pub async fn unsubscribe<B: Broker + ?Sized>(b: &B) -> CheckResult {
    let room = unique_room("unsub");
    let sub = ctx(b.subscribe(Interest::room(room.clone())).await, "subscribe")?;
    drop(sub);
    // Far more than any subscription buffer: a leaked subscriber must not block publishing.
    let publish_many = async {
        for i in 0..300 {
            ctx(
                b.publish(&Envelope::new(room.clone(), body(i))).await,
                "publish",
            )?;
        }
        Ok::<_, String>(())
    };
    match tokio::time::timeout(Duration::from_secs(60), publish_many).await {
        Err(_) => return Err("publishing after an unsubscribe blocked".into()),
        Ok(r) => r?,
    }
    let mut sub = ctx(
        b.subscribe(Interest::room(room.clone())).await,
        "resubscribe",
    )?;
    ctx(
        b.publish(&Envelope::new(room.clone(), "after")).await,
        "publish",
    )?;
    // A broker with a shared reader may still hand a new subscription the tail of what was
    // published just before it (the contract only covers what comes after); those must be
    // the earlier messages, in order, and then the new one.
    let mut next_old = None;
    loop {
        let got = recv(&mut sub).await?;
        if got.payload == "after" {
            return expect_silence(&mut sub, Duration::from_millis(200)).await;
        }
        let text = String::from_utf8_lossy(&got.payload).into_owned();
        let i: usize = ctx(text.trim_start_matches('m').parse(), "old payload")?;
        if next_old.is_some_and(|n| i != n) {
            return Err(format!(
                "old messages out of order before the new one: {text}"
            ));
        }
        next_old = Some(i + 1);
    }
}

/// A resume point that names no position of the room's log is refused with
/// [`Error::CursorReset`], never read as a position: a cursor beyond the end of the log
/// (`BeyondEnd`) and, where the broker stamps its cursors with an epoch, the same position in
/// another epoch (`OtherLog`). The last real cursor still resumes (to nothing).
pub async fn resume_points<B: Broker + ?Sized>(b: &B) -> CheckResult {
    if !b.capabilities().replay {
        return Ok(());
    }
    let room = unique_room("resume-points");
    let mut last = None;
    for i in 0..3 {
        last = ctx(
            b.publish(&Envelope::new(room.clone(), body(i))).await,
            "publish",
        )?
        .cursor;
    }
    let Some(last) = last else {
        return Err("a broker with replay returned no cursor".into());
    };
    let reason = |r: crate::Result<crate::HistoryStream>| match r {
        Err(Error::CursorReset { reason, .. }) => Ok(reason),
        Err(e) => Err(format!("expected CursorReset, got {e}")),
        Ok(_) => Err("expected CursorReset, got a stream".to_owned()),
    };
    let at_end = ctx(
        b.replay_vec(&room, ReplayFrom::Cursor(last), 10).await,
        "replay",
    )?;
    if !at_end.is_empty() {
        return Err(format!(
            "replay after the last cursor returned {}",
            at_end.len()
        ));
    }
    let beyond = crate::Cursor {
        offset: last.offset + 1_000,
        ..last
    };
    let got = reason(b.replay(&room, ReplayFrom::Cursor(beyond), 10).await);
    if got != Ok(crate::ResetReason::BeyondEnd) {
        return Err(format!("replay from beyond the end ({beyond}): {got:?}"));
    }
    if last.epoch != 0 {
        let other = last.in_epoch(last.epoch.wrapping_add(1).max(1));
        let got = reason(b.replay(&room, ReplayFrom::Cursor(other), 10).await);
        if got != Ok(crate::ResetReason::OtherLog) {
            return Err(format!("replay from another epoch ({other}): {got:?}"));
        }
    }
    Ok(())
}

/// Health reports up on a working broker.
pub async fn health<B: Broker + ?Sized>(b: &B) -> CheckResult {
    let h = b.health().await;
    if h.is_up() {
        Ok(())
    } else {
        Err(format!("health of a working broker is {h:?}"))
    }
}

/// Every check by name, for `run_all` and for running one at a time.
pub fn checks<'a, B: Broker + ?Sized>(b: &'a B) -> Vec<(&'static str, BoxFuture<'a, CheckResult>)> {
    vec![
        ("round_trip", round_trip(b).boxed()),
        ("room_isolation", room_isolation(b).boxed()),
        ("room_order", room_order(b).boxed()),
        ("replay", replay(b).boxed()),
        ("ephemeral", ephemeral(b).boxed()),
        ("concurrent_publishers", concurrent_publishers(b).boxed()),
        ("unsubscribe", unsubscribe(b).boxed()),
        ("resume_points", resume_points(b).boxed()),
        ("health", health(b).boxed()),
    ]
}

/// Runs every check and returns the failures as `(name, reason)`.
pub async fn failures<B: Broker + ?Sized>(b: &B) -> Vec<(&'static str, String)> {
    let mut failed = Vec::new();
    for (name, check) in checks(b) {
        if let Err(reason) = check.await {
            failed.push((name, reason));
        }
    }
    failed
}

/// Runs every check; panics with a report naming each failed check.
pub async fn run_all<B: Broker + ?Sized>(b: &B) {
    let failed = failures(b).await;
    assert!(
        failed.is_empty(),
        "{} broker failed {} conformance check(s):\n{}",
        b.name(),
        failed.len(),
        failed
            .iter()
            .map(|(n, r)| format!("  - {n}: {r}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
