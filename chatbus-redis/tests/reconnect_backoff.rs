//! A server that keeps refusing or dropping the pub/sub connection right after it opens is
//! retried on the backoff schedule, not in a busy loop.
//!
//! Each test counts the connections the server accepted (`INFO stats`,
//! `total_connections_received`) while the failure lasts. The config of `common::config`
//! backs off from 50 ms to 500 ms with 50–100 % jitter: the waits add up to at least
//! 25 + 50 + 100 + 200 + 250 + 250 + … ms, so about 10 attempts fit in 2 s. A busy loop makes
//! hundreds.

mod common;

use std::time::Duration;

use chatbus_core::conformance::{eventually, room};
use chatbus_core::{Broker, Error, Interest};
use chatbus_redis::redis::aio::MultiplexedConnection;
use chatbus_testkit::redis::RedisServer;

/// How long each failure lasts.
const FAILING: Duration = Duration::from_secs(2);
/// Most connections the backoff schedule allows in [`FAILING`] (about 10, plus slack for the
/// first, immediate, reconnect and for timing).
const MOST_ATTEMPTS: u64 = 16;

async fn query<T: chatbus_redis::redis::FromRedisValue>(
    conn: &mut MultiplexedConnection,
    args: &[&str],
) -> T {
    let mut cmd = chatbus_redis::redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match tokio::time::timeout(Duration::from_secs(5), cmd.query_async::<T>(conn)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{args:?}: {e}"),
        Err(_) => panic!("{args:?}: no answer within 5 s"),
    }
}

/// Connections the server accepted so far.
async fn connections(admin: &mut MultiplexedConnection) -> u64 {
    let info: String = query(admin, &["INFO", "stats"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total_connections_received in INFO stats:\n{info}"))
}

/// Reads what the subscription yields within `within`: (Unavailable notices, Lagged notices).
async fn notices(sub: &mut chatbus_core::Subscription, within: Duration) -> (usize, usize) {
    let (mut unavailable, mut lagged) = (0, 0);
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(item) = tokio::time::timeout_at(deadline, sub.recv()).await {
        match item {
            None => panic!("the subscription ended"),
            Some(Err(Error::Unavailable { .. })) => unavailable += 1,
            Some(Err(Error::Lagged { .. })) => lagged += 1,
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    (unavailable, lagged)
}

#[tokio::test]
async fn subscribe_refused_by_acl_is_retried_with_backoff() {
    let server = RedisServer::start().await;
    let mut admin = common::raw(&server).await;
    let _: String = query(
        &mut admin,
        &[
            "ACL", "SETUSER", "chat", "on", ">chat-pw", "~*", "&*", "+@all",
        ],
    )
    .await;
    let url = format!("redis://chat:chat-pw@127.0.0.1:{}/", server.port());
    let broker = common::connect(common::config(&server, 0).with_url(url)).await;
    let mut sub = match broker.subscribe(Interest::room(room("acl"))).await {
        Ok(s) => s,
        Err(e) => panic!("subscribe: {e}"),
    };

    // The user may still connect, but no longer SUBSCRIBE: every re-subscribe fails (NOPERM).
    let _: String = query(
        &mut admin,
        &["ACL", "SETUSER", "chat", "-subscribe", "-psubscribe"],
    )
    .await;
    let before = connections(&mut admin).await;
    let killed: u64 = query(&mut admin, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert_eq!(killed, 1, "the broker's pub/sub connection");
    let (unavailable, _) = notices(&mut sub, FAILING).await;
    let attempts = connections(&mut admin).await - before;
    println!("{attempts} connections in {FAILING:?}; {unavailable} Unavailable notices");
    assert!(
        attempts >= 3,
        "the broker stopped retrying: {attempts} connections"
    );
    assert!(
        attempts <= MOST_ATTEMPTS,
        "{attempts} connections in {FAILING:?}: reconnecting without backoff"
    );
    assert_eq!(
        unavailable, 1,
        "subscribers are told once that the connection is down, not at every attempt"
    );

    // Allowed again: the broker is back within the capped backoff, and says so once.
    let _: String = query(
        &mut admin,
        &["ACL", "SETUSER", "chat", "+subscribe", "+psubscribe"],
    )
    .await;
    eventually(Duration::from_secs(3), "re-subscribed", || async {
        broker.stats().reconnects == 1
    })
    .await;
    let (unavailable, lagged) = notices(&mut sub, Duration::from_millis(300)).await;
    assert_eq!((unavailable, lagged), (0, 1));
}

#[tokio::test]
async fn connection_killed_right_after_each_reconnect_is_retried_with_backoff() {
    let server = RedisServer::start().await;
    let mut admin = common::raw(&server).await;
    let broker = common::broker(&server, 0).await;
    let mut sub = match broker.subscribe(Interest::room(room("killed"))).await {
        Ok(s) => s,
        Err(e) => panic!("subscribe: {e}"),
    };

    // Like a server that closes every new connection at once: each pub/sub connection is
    // killed as soon as it has subscribed.
    let before = connections(&mut admin).await;
    let start = tokio::time::Instant::now();
    let mut killed = 0u64;
    while start.elapsed() < FAILING {
        killed += query::<u64>(&mut admin, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let attempts = connections(&mut admin).await - before;
    println!("{attempts} connections and {killed} kills in {FAILING:?}");
    assert!(
        killed >= 2,
        "the broker stopped reconnecting: {killed} kills"
    );
    assert!(
        attempts <= MOST_ATTEMPTS,
        "{attempts} connections in {FAILING:?}: reconnecting without backoff"
    );

    // Left alone, it stays connected and delivers again.
    eventually(Duration::from_secs(3), "reconnected", || async {
        chatbus_core::Broker::health(&broker).await == chatbus_core::Health::Healthy
    })
    .await;
    // Drain the notices of the outage, then a live message arrives.
    let _ = notices(&mut sub, Duration::from_millis(300)).await;
    let env = chatbus_core::Envelope::new(room("killed"), "back");
    if let Err(e) = broker.publish(&env).await {
        panic!("publish: {e}");
    }
    match tokio::time::timeout(Duration::from_secs(3), sub.recv()).await {
        Ok(Some(Ok(got))) => assert_eq!(got.id, env.id),
        other => panic!("expected the message, got {other:?}"),
    }
}
