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
