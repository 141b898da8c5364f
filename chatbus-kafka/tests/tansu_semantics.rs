//! What KafkaBroker relies on from the broker, checked against a real Tansu: offsets are
//! contiguous per partition (the DualBus gap detection depends on it), a subscription starts at
//! the end offset of each partition, record timestamps are the producer's, and the tail sees no
//! gaps under concurrent publishing.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chatbus_core::conformance::room;
use chatbus_core::{Broker, BrokerExt, Envelope, Interest, ReplayFrom, Room};
use chatbus_testkit::tansu::Tansu;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_contiguous_per_partition() {
    let tansu = Tansu::start().await;
    let broker = common::connect(&tansu, "contiguous", 3).await;
    let mut all = broker.subscribe(Interest::All).await.expect("subscribe");
    let start = all
        .start()
        .expect("kafka subscriptions have a start")
        .to_vec();
    assert_eq!(start.len(), 3);

    // Concurrent publishers over several rooms and kinds (ephemeral records take offsets too).
    let rooms: Vec<Room> = (0..12).map(|i| room(&format!("contig-{i}"))).collect();
    let tasks = rooms.iter().enumerate().map(|(i, r)| {
        let (broker, r) = (broker.clone(), r.clone());
        async move {
            let mut cursors = Vec::new();
            for j in 0..50 {
                let env = if (i + j) % 5 == 0 {
                    Envelope::ephemeral(r.clone(), "typing")
                } else {
                    Envelope::new(r.clone(), format!("{j}"))
                };
                let receipt = broker.publish(&env).await.expect("publish");
                cursors.push((env.is_durable(), receipt.cursor));
            }
            cursors
        }
    });
    let published: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
        .collect();
    let total = published.len();
    assert!(published.iter().all(|(durable, c)| *durable == c.is_some()));

    // Every record, durable or not, arrives at the tail once. Ephemeral records carry no
    // cursor but take an offset in their room's partition, so count records per partition.
    let mut count: BTreeMap<u32, u64> = BTreeMap::new();
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    for _ in 0..total {
        let env = tokio::time::timeout(Duration::from_secs(15), all.recv())
            .await
            .expect("tail delivers within 15 s")
            .expect("open")
            .expect("no error");
        let p = broker.partition_of(&env.room);
        *count.entry(p).or_default() += 1;
        if let Some(c) = env.cursor {
            assert_eq!(c.partition, p, "a room's records are all in its partition");
            assert!(
                c.offset >= start[p as usize].offset,
                "{c} is before the start"
            );
            if let Some(prev) = last.insert(p, c.offset) {
                assert!(c.offset > prev, "{c} is not after offset {prev}");
            }
        }
    }
    // Offsets are contiguous: in each partition, the records received exactly fill the range
    // from the subscription's start to the current end offset.
    let after = broker.subscribe(Interest::All).await.expect("subscribe");
    let ends = after.start().expect("start").to_vec();
    for p in 0..3u32 {
        let span = ends[p as usize].offset - start[p as usize].offset;
        assert_eq!(span, count.get(&p).copied().unwrap_or(0), "partition {p}");
        if let Some(l) = last.get(&p) {
            assert!(*l < ends[p as usize].offset);
        }
    }
    assert_eq!(broker.stats().gaps, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_starts_at_the_end_and_timestamps_are_kept() {
    let tansu = Tansu::start().await;
    let broker = common::connect(&tansu, "semantics", 2).await;
    let r = room("stamps");
    let p = broker.partition_of(&r);
    let mut last = None;
    for i in 0..5u64 {
        let mut env = Envelope::new(r.clone(), format!("{i}"));
        // Timestamps from the past, far apart: replay by time must use these, not the
        // broker's append time.
        env.ts = 1_000_000_000_000 + i * 60_000;
        last = broker.publish(&env).await.expect("publish").cursor;
    }
    let last = last.expect("durable cursor");
    let sub = broker
        .subscribe(Interest::room(r.clone()))
        .await
        .expect("subscribe");
    let start = sub.start().expect("start")[p as usize];
    assert_eq!((start.partition, start.offset), (p, last.offset + 1));

    let from = broker
        .replay_vec(&r, ReplayFrom::Time(1_000_000_000_000 + 2 * 60_000), 100)
        .await
        .expect("replay by time");
    let bodies: Vec<_> = from.iter().map(|e| e.payload.clone()).collect();
    assert_eq!(bodies, ["2", "3", "4"]);
    assert!(broker
        .replay_vec(&r, ReplayFrom::Time(2_000_000_000_000), 100)
        .await
        .expect("replay from the future")
        .is_empty());
}
