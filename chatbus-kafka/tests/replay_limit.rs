//! Many clients resuming at once: concurrent replays share a bounded set of readers.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use chatbus_core::conformance::room;
use chatbus_core::{Broker, BrokerExt, Cursor, Envelope, MessageId, ReplayFrom, Room};
use chatbus_kafka::KafkaBroker;
use chatbus_testkit::tansu::Tansu;
use futures::StreamExt;

const ROOMS: usize = 10;
const PER_ROOM: usize = 40;
/// More than one chunk of a replay (512 messages), to cover a replay that reads several.
const BIG: usize = 1200;
const CONCURRENT: usize = 50;

/// Publishes `n` messages to `room`; returns their ids in log order.
async fn fill(broker: &KafkaBroker, room: &Room, n: usize) -> Vec<MessageId> {
    let mut sent: Vec<(Cursor, MessageId)> = futures::stream::iter(0..n)
        .map(|i| {
            let (broker, room) = (broker.clone(), room.clone());
            async move {
                let env = Envelope::new(room, format!("message {i}"));
                match broker.publish(&env).await {
                    Ok(r) => (r.cursor.unwrap_or_else(|| panic!("no cursor")), env.id),
                    Err(e) => panic!("publish: {e}"),
                }
            }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    sent.sort();
    sent.into_iter().map(|(_, id)| id).collect()
}

async fn replay_ids(broker: &KafkaBroker, room: &Room, limit: usize) -> Vec<MessageId> {
    match tokio::time::timeout(
        Duration::from_secs(30),
        broker.replay_vec(room, ReplayFrom::Beginning, limit),
    )
    .await
    {
        Ok(Ok(v)) => v.into_iter().map(|e| e.id).collect(),
        Ok(Err(e)) => panic!("replay of {room}: {e}"),
        Err(_) => panic!("replay of {room}: not done within 30 s"),
    }
}

/// Connects with at most `readers` concurrent replays.
async fn connect(tansu: &Tansu, topic: &str, readers: usize) -> KafkaBroker {
    let config = common::config(tansu, topic, 4).with_max_concurrent_replays(readers);
    match KafkaBroker::connect(config).await {
        Ok(b) => b,
        Err(e) => panic!("connect to Tansu: {e}\n{}", tansu.log()),
    }
}

/// Waits until no replay holds or waits for a reader.
async fn all_readers_free(broker: &KafkaBroker) {
    let start = std::time::Instant::now();
    loop {
        let s = broker.stats();
        if s.replays_active == 0 && s.replays_waiting == 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "readers still taken 5 s after their replays went away: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_replays_use_at_most_the_configured_readers() {
    const LIMIT: usize = 4;
    let tansu = Tansu::start().await;
    let broker = connect(&tansu, "replay-limit", LIMIT).await;
    let rooms: Vec<Room> = (0..ROOMS).map(|i| room(&format!("resume-{i}"))).collect();
    let mut expected: HashMap<Room, Vec<MessageId>> = HashMap::new();
    for r in &rooms {
        expected.insert(r.clone(), fill(&broker, r, PER_ROOM).await);
    }
    let big = room("resume-big");
    expected.insert(big.clone(), fill(&broker, &big, BIG).await);

    // Watches the readers in use while the replays run.
    let sampler = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let (mut active, mut waiting) = (0, 0);
            loop {
                let s = broker.stats();
                active = s.replays_active.max(active);
                waiting = s.replays_waiting.max(waiting);
                if s.replays_active == 0 && s.replays_waiting == 0 && waiting > 0 {
                    return (active, waiting);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let jobs = (0..CONCURRENT).map(|i| {
        let broker = broker.clone();
        // Every fifth replay reads the big room, with a limit that ends inside its 3rd chunk.
        let (room, limit) = if i % 5 == 0 {
            (big.clone(), 1100)
        } else {
            (rooms[i % ROOMS].clone(), usize::MAX)
        };
        tokio::spawn(async move {
            let got = replay_ids(&broker, &room, limit).await;
            (room, limit, got)
        })
    });
    for job in futures::future::join_all(jobs).await {
        let (room, limit, got) = job.expect("replay task");
        let want = &expected[&room];
        assert_eq!(got, want[..limit.min(want.len())], "replay of {room}");
    }
    let (peak_active, peak_waiting) =
        match tokio::time::timeout(Duration::from_secs(5), sampler).await {
            Ok(Ok(peaks)) => peaks,
            Ok(Err(e)) => panic!("sampler: {e}"),
            Err(_) => panic!(
                "readers still taken after every replay finished: {:?}",
                broker.stats()
            ),
        };
    let stats = broker.stats();
    println!("{stats:?}; at most {peak_active} reading and {peak_waiting} waiting at once");
    assert!(
        stats.replay_readers as usize <= LIMIT,
        "{CONCURRENT} concurrent replays created {} readers (limit {LIMIT})",
        stats.replay_readers
    );
    assert!(peak_active <= LIMIT, "{peak_active} replays read at once");
    assert!(
        peak_waiting > 0,
        "the replays never had to wait: the test proves nothing"
    );

    // History shares the same readers.
    let page = match broker.history(&big, None, 100).await {
        Ok(p) => p.messages,
        Err(e) => panic!("history: {e}"),
    };
    let ids: Vec<MessageId> = page.iter().map(|e| e.id).collect();
    assert_eq!(ids, expected[&big][BIG - 100..]);
    assert!(broker.stats().replay_readers as usize <= LIMIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undrained_dropped_and_cancelled_replays_give_their_readers_back() {
    const LIMIT: usize = 2;
    let tansu = Tansu::start().await;
    let broker = connect(&tansu, "replay-cancel", LIMIT).await;
    let big = room("cancel-big");
    let small = room("cancel-small");
    let want_big = fill(&broker, &big, BIG).await;
    let want_small = fill(&broker, &small, PER_ROOM).await;

    // Streams whose callers read one message and stop: they hold no reader meanwhile, so
    // other replays go on.
    let mut open = Vec::new();
    for _ in 0..3 * LIMIT {
        let mut s = match broker.replay(&big, ReplayFrom::Beginning, usize::MAX).await {
            Ok(s) => s,
            Err(e) => panic!("replay: {e}"),
        };
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(Some(Ok(env))) => assert_eq!(env.id, want_big[0]),
            other => panic!("first message: {other:?}"),
        }
        open.push(s);
    }
    assert_eq!(broker.stats().replays_active, 0, "{:?}", broker.stats());
    assert_eq!(replay_ids(&broker, &small, usize::MAX).await, want_small);
    // One of them drained to the end: every message once, in order, across its chunks.
    let mut rest = vec![want_big[0]];
    let mut first = open.pop().unwrap_or_else(|| unreachable!());
    while let Some(item) = tokio::time::timeout(Duration::from_secs(10), first.next())
        .await
        .unwrap_or_else(|_| panic!("replay stalled after {} messages", rest.len()))
    {
        rest.push(item.expect("replay").id);
    }
    assert_eq!(rest, want_big);
    // The others are dropped half-read.
    drop(open);

    // Replay futures and streams dropped at arbitrary points: waiting for a reader, planning,
    // reading a chunk, or between chunks (as the Hub drops a pending replay when its caller's
    // select! is cancelled).
    for i in 0..20u64 {
        let replay = broker.replay(&big, ReplayFrom::Beginning, usize::MAX);
        let _ = tokio::time::timeout(Duration::from_micros(i * 700), replay).await;
        let history = broker.history(&big, None, 1000);
        let _ = tokio::time::timeout(Duration::from_micros(i * 700), history).await;
        let reader = {
            let broker = broker.clone();
            let big = big.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = broker.replay(&big, ReplayFrom::Beginning, usize::MAX).await {
                    while s.next().await.is_some() {}
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(i)).await;
        reader.abort();
    }
    all_readers_free(&broker).await;
    let stats = broker.stats();
    println!("{stats:?}");
    assert!(
        stats.replay_readers as usize <= LIMIT,
        "readers were destroyed and made again: {} created (limit {LIMIT})",
        stats.replay_readers
    );
    assert_eq!(replay_ids(&broker, &big, usize::MAX).await, want_big);
    assert_eq!(replay_ids(&broker, &small, usize::MAX).await, want_small);
}
