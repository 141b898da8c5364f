//! `Log` on Kafka (`KafkaBroker::as_log`): the topic read partition by partition, in offset
//! order, for projectors. Against a real Tansu.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chatbus_core::store::{Log, LogBatch};
use chatbus_core::{
    Broker, Cursor, DualBus, DualConfig, Envelope, Error, MemoryBroker, MemoryConfig, MessageId,
    ResetReason, Room,
};
use chatbus_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use chatbus_kafka::rdkafka::ClientConfig;
use chatbus_kafka::KafkaBroker;
use chatbus_testkit::tansu::Tansu;

const PARTITIONS: u32 = 3;

/// Publishes `n` messages round-robin over `rooms`; returns (id, cursor) per partition in
/// publish order, which is offset order since each publish is awaited.
async fn publish(
    broker: &dyn Broker,
    rooms: &[Room],
    n: usize,
) -> BTreeMap<u32, Vec<(MessageId, Cursor)>> {
    let mut by_partition: BTreeMap<u32, Vec<(MessageId, Cursor)>> = BTreeMap::new();
    for i in 0..n {
        let env = Envelope::new(rooms[i % rooms.len()].clone(), format!("m{i}")).with_from("u");
        let receipt = broker
            .publish(&env)
            .await
            .unwrap_or_else(|e| panic!("publish m{i}: {e}"));
        let c = receipt.cursor.expect("a durable message has a cursor");
        by_partition
            .entry(c.partition)
            .or_default()
            .push((env.id, c));
    }
    by_partition
}

fn ids(batch: &LogBatch) -> Vec<(MessageId, Cursor)> {
    batch
        .envelopes
        .iter()
        .map(|e| (e.id, e.cursor.expect("every envelope carries its cursor")))
        .collect()
}

async fn read(log: &dyn Log, p: u32, after: Option<Cursor>, limit: usize) -> LogBatch {
    tokio::time::timeout(Duration::from_secs(15), log.read(p, after, limit))
        .await
        .unwrap_or_else(|_| panic!("read of partition {p} hung"))
        .unwrap_or_else(|e| panic!("read of partition {p} after {after:?}: {e}"))
}

/// Reads `p` from `after` to its end in batches of `limit`, following `next`.
async fn read_all(log: &dyn Log, p: u32, mut after: Option<Cursor>, limit: usize) -> LogBatch {
    let mut all = Vec::new();
    let mut turns = 0;
    loop {
        let batch = read(log, p, after, limit).await;
        assert!(batch.envelopes.len() <= limit, "a batch beyond its limit");
        let Some(next) = batch.next else {
            return LogBatch::new(all, after);
        };
        if let Some(last) = batch.envelopes.last().and_then(|e| e.cursor) {
            assert!(last.offset <= next.offset, "next {next} before {last}");
        }
        assert!(after.is_none_or(|a| a.offset < next.offset), "no progress");
        all.extend(batch.envelopes);
        after = Some(next);
        turns += 1;
        assert!(turns < 10_000, "reading never ends");
    }
}

/// Rooms that cover every partition.
fn rooms(broker: &KafkaBroker, prefix: &str) -> Vec<Room> {
    let rooms: Vec<Room> = (0..12)
        .map(|i| Room::new(format!("{prefix}-{i}")).expect("room"))
        .collect();
    for p in 0..broker.partitions() {
        assert!(
            rooms.iter().any(|r| broker.partition_of(r) == p),
            "no room in partition {p}"
        );
    }
    rooms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_each_partition_in_offset_order() {
    let tansu = Tansu::start().await;
    let broker = common::connect(&tansu, "log-read", PARTITIONS).await;
    let log = broker.as_log().expect("KafkaBroker has a log");
    assert_eq!(log.partitions(), PARTITIONS);
    let rooms = rooms(&broker, "log");
    let published = publish(&broker, &rooms, 60).await;
    assert_eq!(published.len(), PARTITIONS as usize);

    let mut union = 0;
    for (&p, want) in &published {
        // Everything, from the oldest record.
        let all = read(log, p, None, 1_000).await;
        assert_eq!(ids(&all), *want, "partition {p} from the start");
        let last = want.last().expect("published").1;
        assert_eq!(all.next, Some(last), "a full read stops at the last record");
        for (_, c) in want {
            assert_ne!(c.epoch, 0, "cursors carry the partition's epoch");
        }
        union += all.envelopes.len();

        // After a cursor: strictly after it.
        let (_, third) = want[2];
        let rest = read(log, p, Some(third), 1_000).await;
        assert_eq!(ids(&rest), want[3..], "partition {p} after {third}");

        // With a limit: the oldest `limit`, and `next` to go on from.
        let first = read(log, p, None, 3).await;
        assert_eq!(ids(&first), want[..3]);
        assert_eq!(first.next, Some(want[2].1));
        let paged = read_all(log, p, None, 4).await;
        assert_eq!(ids(&paged), *want, "partition {p} in batches of 4");

        // Caught up: empty, promptly.
        let t = std::time::Instant::now();
        let caught_up = read(log, p, Some(last), 1_000).await;
        assert!(caught_up.is_caught_up() && caught_up.envelopes.is_empty());
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );

        // Another epoch, or beyond the end: reset.
        let other = Cursor::with_epoch(p, 0, last.epoch.wrapping_add(1).max(1));
        match log.read(p, Some(other), 10).await {
            Err(Error::CursorReset { reason, .. }) => assert_eq!(reason, ResetReason::OtherLog),
            other => panic!("a cursor of another epoch: {other:?}"),
        }
        let beyond = Cursor::with_epoch(p, last.offset + 5, last.epoch);
        match log.read(p, Some(beyond), 10).await {
            Err(Error::CursorReset { reason, .. }) => assert_eq!(reason, ResetReason::BeyondEnd),
            other => panic!("a cursor beyond the end: {other:?}"),
        }
        // An unknown epoch (0) is a position of the current log.
        let unknown = read(log, p, Some(Cursor::new(p, third.offset)), 1_000).await;
        assert_eq!(ids(&unknown), want[3..]);
    }
    assert_eq!(union, 60, "the partitions together hold every message once");

    assert!(matches!(
        log.read(PARTITIONS, None, 10).await,
        Err(Error::InvalidCursor(_))
    ));
    let foreign = published[&0][0].1;
    assert!(matches!(
        log.read(1, Some(foreign), 10).await,
        Err(Error::InvalidCursor(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_records_still_move_the_position() {
    let tansu = Tansu::start().await;
    let broker = common::connect(&tansu, "log-skip", 1).await;
    let log = broker.as_log().expect("KafkaBroker has a log");
    let room = Room::new("log-skip").expect("room");
    let first = publish(&broker, std::slice::from_ref(&room), 2).await[&0].clone();
    // An ephemeral record and one that does not decode, both at the end of the partition.
    broker
        .publish(&Envelope::ephemeral(room.clone(), "typing"))
        .await
        .expect("ephemeral");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", tansu.bootstrap())
        .create()
        .expect("raw producer");
    producer
        .send(
            FutureRecord::to("log-skip")
                .key(room.as_str())
                .payload(&b"\xffnot an envelope"[..])
                .partition(0),
            Duration::from_secs(5),
        )
        .await
        .expect("raw record");

    let batch = read(log, 0, None, 100).await;
    assert_eq!(ids(&batch), first, "only the durable records that decode");
    let next = batch.next.expect("read something");
    assert_eq!(
        next.offset, 3,
        "past the ephemeral (2) and the malformed (3) record"
    );
    assert_eq!(next.epoch, first[0].1.epoch);
    // A batch of nothing but skipped records still says where it stopped.
    let skipped = read(log, 0, Some(first[1].1), 100).await;
    assert!(skipped.envelopes.is_empty());
    assert_eq!(skipped.next, Some(next));
    assert!(read(log, 0, Some(next), 100).await.is_caught_up());

    let later = publish(&broker, std::slice::from_ref(&room), 1).await[&0].clone();
    assert_eq!(ids(&read(log, 0, Some(next), 100).await), later);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_bus_forwards_its_durable_log() {
    let tansu = Tansu::start().await;
    let kafka = common::connect(&tansu, "log-dual", PARTITIONS).await;
    let rooms = rooms(&kafka, "dual");
    let fast = MemoryBroker::with_config(MemoryConfig::default().with_history_len(0));
    assert!(fast.as_log().is_none(), "the memory broker has no log");
    let bus = DualBus::new(fast, kafka, DualConfig::default());
    let published = publish(&bus, &rooms, 20).await;
    let log = bus.as_log().expect("DualBus forwards the durable log");
    assert_eq!(log.partitions(), PARTITIONS);
    for (&p, want) in &published {
        assert_eq!(ids(&read(log, p, None, 100).await), *want, "partition {p}");
    }
    // Through an `Arc<dyn Broker>`, the way a server holds it.
    let shared: std::sync::Arc<dyn Broker> = std::sync::Arc::new(bus);
    assert!(shared.as_log().is_some());
}
