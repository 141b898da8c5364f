//! The cluster goes away and comes back (a real Tansu, killed and restarted): `publish` fails
//! fast with a clear error meanwhile, `health` says so, and a tail subscriber delivers every
//! message published after the restart, without a gap, on the same subscription.

mod common;

use std::time::{Duration, Instant};

use chatbus_core::{Broker, Envelope, Error, Health, Interest, MessageId, Room};
use chatbus_testkit::tansu::Tansu;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fails_fast_while_down_and_the_tail_resumes() {
    let mut tansu = Tansu::start().await;
    let config = common::config(&tansu, "down", 2).with_publish_timeout(Duration::from_secs(2));
    let broker = chatbus_kafka::KafkaBroker::connect(config)
        .await
        .expect("connect");
    let room = Room::new("down-room").expect("room");
    let mut sub = broker
        .subscribe(Interest::room(room.clone()))
        .await
        .expect("subscribe");

    let mut acked: Vec<MessageId> = Vec::new();
    for i in 0..20 {
        let env = Envelope::new(room.clone(), format!("before {i}"));
        broker
            .publish(&env)
            .await
            .expect("publish before the outage");
        acked.push(env.id);
    }

    tansu.kill().await;

    // Fails within the publish timeout (2 s) plus scheduling slack, with a transient error.
    let mut failed = Vec::new();
    for i in 0..3 {
        let env = Envelope::new(room.clone(), format!("during {i}"));
        let t = Instant::now();
        let result = broker.publish(&env).await;
        let took = t.elapsed();
        match result {
            Err(e @ (Error::Unavailable { .. } | Error::Timeout { .. })) => {
                eprintln!("publish while down failed after {took:?}: {e}");
                assert!(e.is_transient());
            }
            other => panic!(
                "publish while the broker is down: expected Unavailable/Timeout, got {other:?}"
            ),
        }
        assert!(
            took < Duration::from_secs(4),
            "publish took {took:?} to fail"
        );
        failed.push(env.id);
    }
    match broker.health().await {
        Health::Down(reason) => eprintln!("health while down: {reason}"),
        other => panic!("health while the broker is down: {other:?}"),
    }

    // Subscribing while the cluster is down works (the tail is running) and is not held up.
    let t = Instant::now();
    let mut late = broker
        .subscribe(Interest::room(room.clone()))
        .await
        .expect("subscribe while the broker is down");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "subscribe took {:?}",
        t.elapsed()
    );

    tansu.restart().await;
    let start = Instant::now();
    loop {
        let env = Envelope::new(room.clone(), "after restart");
        match broker.publish(&env).await {
            Ok(_) => {
                acked.push(env.id);
                break;
            }
            Err(e) => {
                failed.push(env.id);
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "publish still failing after restart: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    eprintln!("publishing again {:?} after the restart", start.elapsed());
    for i in 0..50 {
        let env = Envelope::new(room.clone(), format!("after {i}"));
        broker
            .publish(&env)
            .await
            .expect("publish after the restart");
        acked.push(env.id);
    }
    assert_eq!(broker.health().await, Health::Healthy);

    // The same subscription delivers every acknowledged message once, in order, with
    // contiguous offsets (only this room writes to its partition here). A publish that failed
    // may still have been stored (an ack lost with the connection): it may appear, in place.
    let mut delivered = Vec::new();
    let mut last_offset = None;
    while delivered.len() < acked.len() {
        let item = tokio::time::timeout(Duration::from_secs(15), sub.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "tail delivered {} of {} acked messages",
                    delivered.len(),
                    acked.len()
                )
            })
            .expect("subscription open");
        let env = item.expect("no error on the subscription");
        let offset = env.cursor.expect("durable").offset;
        if let Some(prev) = last_offset {
            assert_eq!(offset, prev + 1, "gap or reorder in the tail");
        }
        last_offset = Some(offset);
        if failed.contains(&env.id) {
            continue;
        }
        delivered.push(env.id);
    }
    assert_eq!(delivered, acked);

    // The subscription made during the outage starts where the tail was (it could not ask the
    // cluster for the end offsets), which may be before the last messages acknowledged before
    // the outage; from that start on it gets every record, in order, so everything
    // acknowledged after it subscribed.
    let p = broker.partition_of(&room) as usize;
    let late_start = late.start().expect("start")[p].offset;
    let mut got = Vec::new();
    let mut first_offset = None;
    while got.last() != acked.last() {
        let item = tokio::time::timeout(Duration::from_secs(15), late.recv())
            .await
            .unwrap_or_else(|_| panic!("late subscription stalled after {} messages", got.len()))
            .expect("subscription open");
        let env = item.expect("no error on the subscription");
        first_offset.get_or_insert(env.cursor.expect("durable").offset);
        if !failed.contains(&env.id) {
            got.push(env.id);
        }
    }
    assert_eq!(
        first_offset,
        Some(late_start),
        "first delivery is not at start()"
    );
    assert!(
        got.len() >= acked.len() - 20,
        "missed messages acknowledged after subscribing"
    );
    assert_eq!(
        got,
        acked[acked.len() - got.len()..],
        "not a suffix of the log"
    );
}
