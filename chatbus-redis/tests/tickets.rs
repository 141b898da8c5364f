//! The per-room ticket counters (`Tickets`, for an interest-based DualBus) in a real Redis and
//! a real Redis Cluster: the conformance suite, a Redis that comes back empty, and a ticket
//! left open by a publisher that died.

mod common;

use std::time::Duration;

use chatbus_core::{Broker, Room, Tickets};
use chatbus_redis::{RedisBroker, RedisConfig};
use chatbus_testkit::redis::RedisServer;
use chatbus_testkit::redis_cluster::RedisCluster;

fn tickets(b: &RedisBroker) -> &dyn Tickets {
    b.tickets().expect("a Redis broker has ticket counters")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_pass_conformance_on_one_redis() {
    let server = RedisServer::start().await;
    let broker = common::broker(&server, 0).await;
    chatbus_core::conformance::tickets::run_all(tickets(&broker)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_pass_conformance_on_a_cluster() {
    let cluster = RedisCluster::start().await;
    let config = RedisConfig::default()
        .with_cluster(cluster.seeds())
        .with_password(cluster.password())
        .with_prefix("tk")
        .with_command_timeout(Duration::from_millis(1500));
    let broker = match RedisBroker::connect(config).await {
        Ok(b) => b,
        Err(e) => panic!("cannot connect to the test cluster: {e}"),
    };
    chatbus_core::conformance::tickets::run_all(tickets(&broker)).await;
}

/// A Redis restarted without persistence lost the counters: the next ticket is of a new epoch
/// (never a number the old counter handed out again under the same epoch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_starts_a_new_epoch() {
    let mut server = RedisServer::start().await;
    let broker = common::broker(&server, 0).await;
    let room = Room::new("tk-restart").expect("room");
    let t = tickets(&broker);
    let a = t.take_ticket(&room).await.expect("ticket");
    let b = t.take_ticket(&room).await.expect("ticket");
    assert_eq!((a.epoch, b.n), (b.epoch, 2));
    server.restart().await;
    let mut after = None;
    for _ in 0..100 {
        match t.take_ticket(&room).await {
            Ok(ticket) => {
                after = Some(ticket);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let after = after.expect("a ticket after the restart");
    assert_ne!(after.epoch, a.epoch, "{after:?} after {a:?}");
    assert_eq!(after.n, 1);
    // Closing a ticket of the old epoch neither fails nor touches the new counter's open set.
    let h = t.close_ticket(&room, b).await.expect("close");
    assert_eq!(h, after);
    let base = t.ticket_baseline(&room).await.expect("baseline");
    assert_eq!(
        (base.epoch, base.counter, base.open),
        (after.epoch, 1, vec![1])
    );
}

/// A ticket left open (its publisher died between the ticket and the close) is forgotten by
/// the baseline after `OPEN_TICKET_TTL`, so new receivers do not wait for it; one still
/// within it is kept. The age is set in Redis directly rather than waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_left_open_is_forgotten_after_its_ttl() {
    let server = RedisServer::start().await;
    let broker = common::broker(&server, 0).await;
    let room = Room::new("tk-stale").expect("room");
    let t = tickets(&broker);
    let old = t.take_ticket(&room).await.expect("ticket");
    let young = t.take_ticket(&room).await.expect("ticket");
    let mut raw = common::raw(&server).await;
    let now_ms: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let aged = now_ms - chatbus_core::OPEN_TICKET_TTL.as_millis() as u64 - 1_000;
    let key = format!("test{}:{{{}}}:open", server.port(), room.as_str());
    let _: i64 = chatbus_redis::redis::cmd("ZADD")
        .arg(&key)
        .arg("XX")
        .arg(aged)
        .arg(old.n)
        .query_async(&mut raw)
        .await
        .expect("age the ticket");
    let base = t.ticket_baseline(&room).await.expect("baseline");
    assert_eq!((base.counter, base.open), (2, vec![young.n]));
}

/// The interest-based DualBus over a Redis that restarts empty (its counters and leases gone):
/// a send while it is down is written to the log without a ticket once the sender's lease has
/// lapsed, the follower reads its room from the log meanwhile and is told to resync (`Lagged`)
/// across the switches, and every send, before, during and after, under the counter's new
/// epoch, is delivered once and in the log's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interest_dual_bus_carries_on_after_redis_restarts_empty() {
    use chatbus_core::{
        BrokerExt, DualBus, DualConfig, Envelope, Error, Interest, MemoryBroker, MemoryConfig,
        ReplayFrom,
    };
    let mut server = RedisServer::start().await;
    let log = MemoryBroker::with_config(MemoryConfig::default().with_history_len(10_000));
    let interest = DualConfig::default().with_interest(true);
    let a = DualBus::new(
        common::broker(&server, 0).await,
        log.clone(),
        interest.clone(),
    );
    let b = DualBus::new(common::broker(&server, 0).await, log.clone(), interest);
    let room = Room::new("tk-dual-restart").expect("room");
    let mut sub = b
        .subscribe(Interest::room(room.clone()))
        .await
        .expect("subscribe");
    let mut ids = Vec::new();
    for i in 0..5 {
        let env = Envelope::new(room.clone(), format!("before {i}"));
        ids.push(a.publish(&env).await.expect("publish").id);
    }
    let mut last = None;
    for want in &ids {
        match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await {
            Ok(Some(Ok(env))) => {
                assert_eq!(&env.id, want);
                last = env.cursor;
            }
            other => panic!("before the restart: {other:?}"),
        }
    }
    server.kill();
    let down = a
        .publish(&Envelope::new(room.clone(), "while down"))
        .await
        .expect("a send while Redis is down goes to the log without a ticket");
    assert_eq!(a.stats().ticketless_publishes, 1);
    server.restart().await;
    // Sends with tickets again once the broker has reconnected.
    let mut after = vec![down.id];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while after.len() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sends never came back"
        );
        let env = Envelope::new(room.clone(), format!("after {}", after.len()));
        match a.publish(&env).await {
            Ok(r) => after.push(r.id),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    // The follower: a Lagged (resync from the cursor), then live messages; whatever it missed
    // live is in the log after its last cursor. Together: every acked message once, in order.
    let mut got = Vec::new();
    let mut lagged = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !after.iter().all(|id| got.contains(id)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "got {} of the sends after",
            got.len()
        );
        match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await {
            Ok(Some(Ok(env))) => {
                // A copy at or below the last cursor was read from the log already.
                let offset = env.cursor.map(|c| c.offset);
                if last.is_none_or(|l: chatbus_core::Cursor| offset > Some(l.offset)) {
                    got.push(env.id);
                    last = env.cursor;
                }
            }
            Ok(Some(Err(Error::Lagged { .. }))) => {
                lagged = true;
                // Resync as the Hub does: everything after the last cursor, from the log.
                let cursor = last.expect("a cursor before the restart");
                let missed = log
                    .replay_vec(&room, ReplayFrom::Cursor(cursor), 1000)
                    .await
                    .expect("replay");
                for env in missed {
                    got.push(env.id);
                    last = env.cursor;
                }
            }
            other => panic!("after the restart: {other:?}"),
        }
    }
    assert!(lagged, "the follower was not told to resync");
    assert!(
        b.stats().tail_periods >= 1,
        "the follower read its room from the log while the leases could not be checked"
    );
    // One sender, one send at a time: the log's order is the order of `after`.
    got.retain(|id| after.contains(id));
    assert_eq!(got, after, "every send from the outage on once, in order");
}
