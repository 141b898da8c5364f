//! Redis goes away under traffic and comes back: subscriptions recover by themselves.
//!
//! Each scenario runs two instances (a `Hub` over its own `RedisBroker`) on one private
//! `redis-server`. Instance A publishes a numbered message every 2 ms; a session on instance B
//! reads them. After 1 s the server is killed with SIGKILL (connections drop without a
//! goodbye, as in a crash), stays down 2 s, and is restarted on the same port.
//!
//! - Without the history window (pub/sub semantics), what was published around the outage is
//!   lost to the live stream: the test prints how many accepted messages never arrived, and
//!   checks that delivery resumes within 5 s of the restart, with no duplicate and no reorder.
//! - With the history window, the point is that a consumer resuming from its last cursor gets
//!   every accepted message. A Redis restarted without persistence would come back with empty
//!   streams, so proving it needs the window to survive the restart, honestly: that server
//!   runs with `--appendonly yes --appendfsync always` (every acknowledged write is on disk
//!   before the reply), and is still killed with SIGKILL. The resume is the real one a user
//!   gets: the broker yields `Lagged` after re-subscribing, and the Hub replays each member
//!   from its last cursor. The test asserts that every message whose publish was acknowledged
//!   reaches the session exactly once, in order.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatbus_core::conformance::{eventually, room};
use chatbus_core::{Broker, Envelope, Error, Health, Hub, Interest, Outbound, Room, Session};
use chatbus_testkit::redis::{RedisOptions, RedisServer};

const BEFORE: Duration = Duration::from_secs(1);
const DOWN: Duration = Duration::from_secs(2);
const RECOVERY_LIMIT: Duration = Duration::from_secs(5);

/// What the publisher did: per sequence number, when its publish started and whether Redis
/// acknowledged it.
#[derive(Default)]
struct Sent {
    started: Vec<Instant>,
    accepted: Vec<bool>,
    errors: Vec<String>,
}

async fn publisher(hub: Hub, room: Room, stop: Arc<AtomicBool>, sent: Arc<Mutex<Sent>>) {
    let mut seq = 0usize;
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        let env = Envelope::new(room.clone(), format!("{seq}"));
        // The broker bounds every publish by its command timeout; this outer limit only
        // guards the test against a hang.
        let r = tokio::time::timeout(Duration::from_secs(10), hub.publish(&env)).await;
        {
            let mut s = sent.lock().unwrap_or_else(|e| e.into_inner());
            s.started.push(started);
            match r {
                Ok(Ok(_)) => s.accepted.push(true),
                Ok(Err(e)) => {
                    s.accepted.push(false);
                    s.errors.push(e.to_string());
                }
                Err(_) => panic!("a publish hung past 10 s"),
            }
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Reads frames until `stop` is set and nothing arrived for 1 s; returns (seq, arrival) and the
/// number of `Lagged` notices.
async fn reader(mut session: Session, stop: Arc<AtomicBool>) -> (Vec<(usize, Instant)>, usize) {
    let mut got = Vec::new();
    let mut lagged = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(1), session.recv()).await {
            Err(_) if stop.load(Ordering::Acquire) => return (got, lagged),
            Err(_) => {}
            Ok(Outbound::Frame(b)) => {
                let text = String::from_utf8_lossy(&b).into_owned();
                let seq = text
                    .parse()
                    .unwrap_or_else(|e| panic!("bad frame {text:?}: {e}"));
                got.push((seq, Instant::now()));
            }
            Ok(Outbound::Lagged { .. }) => lagged += 1,
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
}

struct Outcome {
    sent: Sent,
    got: Vec<(usize, Instant)>,
    lagged: usize,
    restarted_at: Instant,
    health_during: Health,
    broker_errors: Vec<String>,
}

async fn scenario(server: &mut RedisServer, history_len: usize) -> Outcome {
    let a = common::broker(server, history_len).await;
    let b = common::broker(server, history_len).await;
    let hub_a = Hub::new(Arc::new(a.clone()));
    let hub_b = Hub::new(Arc::new(b.clone()));
    let r = room("outage");
    let session = hub_b.connect("reader");
    if let Err(e) = session.handle().join(r.clone()).await {
        panic!("join: {e}");
    }
    // A direct subscription on B shows what the broker yields around the outage.
    let mut direct = match b.subscribe(Interest::room(r.clone())).await {
        Ok(s) => s,
        Err(e) => panic!("subscribe: {e}"),
    };
    let broker_errors = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let errs = broker_errors.clone();
        tokio::spawn(async move {
            while let Some(item) = direct.recv().await {
                if let Err(e) = item {
                    errs.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(match e {
                            Error::Unavailable { .. } => "Unavailable".to_owned(),
                            Error::Lagged { missed } => format!("Lagged({missed})"),
                            other => other.to_string(),
                        });
                }
            }
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(Sent::default()));
    let reading = tokio::spawn(reader(session, stop.clone()));
    let publishing = tokio::spawn(publisher(hub_a, r.clone(), stop.clone(), sent.clone()));

    tokio::time::sleep(BEFORE).await;
    server.kill();
    let mut health_during = Health::Healthy;
    let down_since = Instant::now();
    while down_since.elapsed() < DOWN {
        let h = b.health().await;
        if !matches!(h, Health::Healthy) {
            health_during = h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.restart().await;
    let restarted_at = Instant::now();
    // Traffic for a while after the restart, then let everything drain.
    tokio::time::sleep(RECOVERY_LIMIT + Duration::from_secs(1)).await;
    stop.store(true, Ordering::Release);
    if let Err(e) = publishing.await {
        panic!("publisher panicked: {e}");
    }
    let (got, lagged) = match reading.await {
        Ok(r) => r,
        Err(e) => panic!("reader panicked: {e}"),
    };
    assert_eq!(
        b.health().await,
        Health::Healthy,
        "not healthy after recovery"
    );
    assert!(b.stats().reconnects >= 1, "no reconnect counted");
    drop((hub_b, b));
    let _ = tokio::time::timeout(Duration::from_secs(5), watcher).await;
    let sent = std::mem::take(&mut *sent.lock().unwrap_or_else(|e| e.into_inner()));
    let broker_errors =
        std::mem::take(&mut *broker_errors.lock().unwrap_or_else(|e| e.into_inner()));
    Outcome {
        sent,
        got,
        lagged,
        restarted_at,
        health_during,
        broker_errors,
    }
}

/// Common checks; returns the accepted messages that never arrived.
fn check(o: &Outcome, label: &str) -> Vec<usize> {
    let accepted: Vec<usize> = (0..o.sent.accepted.len())
        .filter(|&i| o.sent.accepted[i])
        .collect();
    let failed = o.sent.accepted.len() - accepted.len();
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let mut reorders = 0;
    let mut last = None;
    for &(seq, _) in &o.got {
        if !seen.insert(seq) {
            duplicates += 1;
        }
        if last.is_some_and(|l| seq < l) {
            reorders += 1;
        }
        last = Some(seq);
    }
    let lost: Vec<usize> = accepted
        .iter()
        .copied()
        .filter(|s| !seen.contains(s))
        .collect();
    let recovery = o
        .got
        .iter()
        .filter(|&&(seq, _)| o.sent.started[seq] >= o.restarted_at)
        .map(|&(_, at)| at.duration_since(o.restarted_at))
        .min();
    let mut errors: Vec<&String> = o.sent.errors.iter().collect();
    errors.dedup();
    println!(
        "[{label}] published {} ({} accepted, {failed} failed during the outage), received {}, \
         lost {} accepted message(s), duplicates {duplicates}, reorders {reorders}, \
         session lag notices {}",
        o.sent.accepted.len(),
        accepted.len(),
        o.got.len(),
        lost.len(),
        o.lagged
    );
    println!("[{label}] first live message after the restart arrived {recovery:?} after it");
    println!("[{label}] health during the outage: {:?}", o.health_during);
    println!(
        "[{label}] broker subscription yielded: {:?}",
        o.broker_errors
    );
    println!(
        "[{label}] publish errors during the outage (first 3): {:?}",
        &errors[..errors.len().min(3)]
    );
    assert_eq!(duplicates, 0, "[{label}] duplicates");
    assert_eq!(reorders, 0, "[{label}] reorders");
    assert!(
        failed > 0,
        "[{label}] no publish failed: was Redis really down?"
    );
    match recovery {
        Some(d) => assert!(
            d < RECOVERY_LIMIT,
            "[{label}] traffic resumed only after {d:?}"
        ),
        None => panic!("[{label}] no message published after the restart arrived"),
    }
    assert!(
        matches!(o.health_during, Health::Down(_) | Health::Degraded(_)),
        "[{label}] health stayed {:?} during the outage",
        o.health_during
    );
    let unavailable = o.broker_errors.iter().position(|e| e == "Unavailable");
    let lagged = o.broker_errors.iter().position(|e| e == "Lagged(0)");
    assert!(
        matches!((unavailable, lagged), (Some(u), Some(l)) if u < l),
        "[{label}] expected Unavailable then Lagged(0), got {:?}",
        o.broker_errors
    );
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_without_history_recovers_and_counts_losses() {
    let mut server = RedisServer::start().await;
    let o = scenario(&mut server, 0).await;
    let lost = check(&o, "pub/sub only");
    println!(
        "[pub/sub only] LOST during the outage: {} accepted message(s) (pub/sub keeps nothing for a disconnected subscriber)",
        lost.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_with_history_resume_from_cursor_gets_everything() {
    let mut server = RedisServer::start_with(RedisOptions::default().with_appendonly(true)).await;
    let o = scenario(&mut server, 100_000).await;
    let lost = check(&o, "history window");
    assert!(
        lost.is_empty(),
        "[history window] {} acknowledged message(s) never reached the session: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    assert_eq!(
        o.lagged, 0,
        "the session was told it lagged instead of being resynced"
    );
}

/// Several outages in a row leave no task behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_outages_leak_no_tasks() {
    let mut server = RedisServer::start().await;
    let b = common::broker(&server, 10).await;
    let mut subs = Vec::new();
    for i in 0..20 {
        match b.subscribe(Interest::room(room(&format!("leak{i}")))).await {
            Ok(s) => subs.push(s),
            Err(e) => panic!("subscribe: {e}"),
        }
    }
    let metrics = tokio::runtime::Handle::current().metrics();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = metrics.num_alive_tasks();
    for cycle in 0..3 {
        server.kill();
        tokio::time::sleep(Duration::from_millis(700)).await;
        // Publishing during the outage fails within the command timeout.
        let t = Instant::now();
        let r = b.publish(&Envelope::new(room("leak0"), "x")).await;
        assert!(r.is_err(), "publish succeeded while Redis was down");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "publish took {:?}",
            t.elapsed()
        );
        server.restart().await;
        eventually(Duration::from_secs(10), "reconnect", || async {
            b.stats().reconnects > cycle && b.health().await == Health::Healthy
        })
        .await;
    }
    // Every subscription is live again.
    for (i, sub) in subs.iter_mut().enumerate() {
        let r = room(&format!("leak{i}"));
        if let Err(e) = b.publish(&Envelope::new(r, "after")).await {
            panic!("publish after recovery: {e}");
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await {
                Ok(Some(Ok(env))) if env.payload == "after" => break,
                Ok(Some(_)) => {}
                other => panic!("subscription {i} did not recover: {other:?}"),
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = metrics.num_alive_tasks();
    println!("alive tasks: {baseline} before 3 outages, {after} after");
    assert!(
        after <= baseline,
        "tasks leaked across reconnects: {baseline} -> {after}"
    );
}

/// A server that hangs without closing its connections (SIGSTOP) is noticed by the periodic
/// `PING`: health goes down, subscribers get `Unavailable`, publishes time out instead of
/// hanging; when it resumes, subscriptions recover (`Lagged(0)`) and traffic flows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_server_is_detected_and_survived() {
    let mut server = RedisServer::start().await;
    let b = common::broker(&server, 0).await;
    let r = room("hung");
    let mut sub = match b.subscribe(Interest::room(r.clone())).await {
        Ok(s) => s,
        Err(e) => panic!("subscribe: {e}"),
    };
    server.pause();
    let t = Instant::now();
    let published = b.publish(&Envelope::new(r.clone(), "lost")).await;
    assert!(
        matches!(published, Err(Error::Timeout { .. })),
        "expected a timeout, got {published:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "publish took {:?}",
        t.elapsed()
    );
    // ping_interval 1 s + command_timeout 1.5 s in the test config.
    match tokio::time::timeout(Duration::from_secs(6), sub.recv()).await {
        Ok(Some(Err(Error::Unavailable { reason, .. }))) => println!("noticed: {reason}"),
        other => panic!("expected Unavailable while the server hangs, got {other:?}"),
    }
    assert!(matches!(b.health().await, Health::Down(_)));
    server.resume();
    match tokio::time::timeout(Duration::from_secs(10), sub.recv()).await {
        Ok(Some(Err(Error::Lagged { missed: 0 }))) => {}
        other => panic!("expected Lagged(0) after the server resumed, got {other:?}"),
    }
    eventually(Duration::from_secs(10), "publish after resume", || async {
        b.publish(&Envelope::new(r.clone(), "back")).await.is_ok()
    })
    .await;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), sub.recv()).await {
            Ok(Some(Ok(env))) if env.payload == "back" => break,
            Ok(Some(_)) => {}
            other => panic!("no traffic after resume: {other:?}"),
        }
    }
    assert_eq!(b.health().await, Health::Healthy);
}
