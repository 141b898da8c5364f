//! Cursor epochs on Kafka (issue #11 item 1): a topic deleted and created again restarts its
//! partitions at offset 0, so a cursor taken before names another message after. Before
//! epochs, a client resuming with such a cursor was replayed the new log's records after that
//! offset, as if it had the ones before: a silent gap. Now each partition's epoch is the
//! fingerprint of its record at offset 0, the same on every instance, and a cursor of another
//! epoch (or beyond the end of the log) is answered with a reset. Against a real Tansu, which
//! deletes and creates topics (`tansu topic delete` / `create`).
//!
//! The assertions stick to what existed before epochs (errors by their message, outbounds by
//! their `Debug` form), so this file also builds against the code before the fix.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chatbus_core::conformance::eventually;
use chatbus_core::{Broker, Cursor, Envelope, Hub, ReplayFrom, Room, Session};
use chatbus_kafka::KafkaBroker;
use chatbus_testkit::tansu::{tansu_program, Tansu};
use futures::StreamExt;

const TOPIC: &str = "epoch-recreated";

async fn publish_n(b: &KafkaBroker, r: &Room, prefix: &str, n: usize) -> Vec<Cursor> {
    let mut cursors = Vec::new();
    for i in 1..=n {
        let receipt = b
            .publish(&Envelope::new(r.clone(), format!("{prefix}{i}")))
            .await
            .unwrap_or_else(|e| panic!("publish {prefix}{i}: {e}"));
        cursors.push(receipt.cursor.expect("a durable message has a cursor"));
    }
    cursors
}

/// Deletes and creates `topic` again with one partition, with the `tansu topic` CLI in its own
/// process, so that no librdkafka client of this process (see below) is involved.
async fn recreate(tansu: &Tansu, topic: &str) {
    let broker = format!("tcp://{}", tansu.bootstrap());
    for args in [
        vec!["topic", "delete", "--broker", &broker, topic],
        vec![
            "topic",
            "create",
            "--broker",
            &broker,
            "--partitions",
            "1",
            topic,
        ],
    ] {
        let out = tokio::process::Command::new(tansu_program())
            .args(&args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("tansu {args:?}: {e}"));
        assert!(
            out.status.success(),
            "tansu {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// What the session writes until it has been quiet for a while.
async fn drain(s: &mut Session) -> Vec<String> {
    chatbus_core::conformance::drain_session(s, Duration::from_secs(1)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_from_before_the_topic_was_recreated_is_reset() {
    let tansu = Tansu::start().await;
    let r = Room::new("epoch-room").expect("room");
    let before = common::connect(&tansu, TOPIC, 1).await;
    let old = publish_n(&before, &r, "old", 3).await;
    drop(before);
    // The old instance's librdkafka clients close on a background thread. librdkafka 2.12
    // crashes now and then (SIGSEGV in `rd_kafka_metadata_cache_find`) when the topic is
    // deleted while a consumer that knew it is still alive: give them time to close, as an
    // operator stops the instances before recreating a topic.
    tokio::time::sleep(Duration::from_secs(3)).await;

    recreate(&tansu, TOPIC).await;

    // An instance started after the topic was recreated (a restart, or another instance).
    let after = common::connect(&tansu, TOPIC, 1).await;
    let new = publish_n(&after, &r, "new", 5).await;
    assert_eq!(
        (old[2].offset, new[0].offset),
        (2, 0),
        "the recreated topic starts again at offset 0"
    );
    assert_ne!(old[2].epoch, new[0].epoch, "{old:?} {new:?}");

    // Offsets 3 and 4 of the new log lie after the old cursor's offset 2.
    match after.replay(&r, ReplayFrom::Cursor(old[2]), 10).await {
        Err(e) if e.to_string().contains("earlier epoch") => {}
        Err(e) => panic!("replay from a cursor of the deleted topic: {e}"),
        Ok(s) => panic!(
            "replay from a cursor of the deleted topic was answered as a position: {} messages",
            s.collect::<Vec<_>>().await.len()
        ),
    }
    // A cursor of the new log still resumes.
    let rest = after
        .replay(&r, ReplayFrom::Cursor(new[2]), 10)
        .await
        .expect("replay")
        .collect::<Vec<_>>()
        .await;
    assert_eq!(rest.len(), 2);

    // Through the Hub: the session is told and goes live.
    let hub = Hub::new(Arc::new(after.clone()));
    let mut s = hub.connect("u");
    s.handle()
        .join_since(r.clone(), old[2])
        .await
        .expect("join");
    let first = drain(&mut s).await;
    assert_eq!(
        first.len(),
        1,
        "nothing replayed from the old cursor: {first:?}"
    );
    assert!(
        first[0].starts_with("Reset {") && first[0].contains("OtherLog"),
        "{first:?}"
    );
    publish_n(&after, &r, "live", 2).await;
    assert_eq!(drain(&mut s).await, ["live1", "live2"]);
}

/// An instance that connects to a topic with history learns each partition's epoch from
/// offset 0 (a background probe), so its cursors match those of the instance that wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_derives_the_same_epoch() {
    let tansu = Tansu::start().await;
    let r = Room::new("epoch-shared").expect("room");
    let first = common::connect(&tansu, "epoch-shared", 1).await;
    let written = publish_n(&first, &r, "m", 2).await;
    assert_ne!(written[0].epoch, 0, "learned from its own offset 0");

    let second = common::connect(&tansu, "epoch-shared", 1).await;
    let want = written[0].epoch;
    eventually(Duration::from_secs(10), "the epoch probe", || {
        let (second, r) = (second.clone(), r.clone());
        async move {
            let c = publish_n(&second, &r, "probe", 1).await;
            c[0].epoch == want
        }
    })
    .await;
    let replayed = second
        .replay(&r, ReplayFrom::Cursor(written[0]), 10)
        .await
        .expect("replay with the other instance's cursor")
        .collect::<Vec<_>>()
        .await;
    assert!(!replayed.is_empty());
}

/// A cursor beyond the end of the partition is answered with a reset (before: an empty
/// replay, and the Hub then dropped the live messages held during the catch-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_beyond_the_end_is_reset() {
    let tansu = Tansu::start().await;
    let r = Room::new("epoch-beyond").expect("room");
    let broker = common::connect(&tansu, "epoch-beyond", 1).await;
    publish_n(&broker, &r, "m", 2).await;
    match broker
        .replay(&r, ReplayFrom::Cursor(Cursor::new(0, 1_000)), 10)
        .await
    {
        Err(e) if e.to_string().contains("beyond the end") => {}
        Err(e) => panic!("replay from beyond the end: {e}"),
        Ok(s) => panic!(
            "a cursor beyond the end was answered as a position: {} messages",
            s.collect::<Vec<_>>().await.len()
        ),
    }
}
