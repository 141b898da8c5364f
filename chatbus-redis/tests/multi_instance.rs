//! Two instances (a `Hub` over its own `RedisBroker` each, one Redis): 5,000 messages from
//! senders on both sides reach every member on both sides exactly once, in per-sender order.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chatbus_core::{Envelope, Hub, HubConfig, Outbound, Room, Session};
use chatbus_testkit::redis::RedisServer;

const SENDERS_PER_SIDE: usize = 2;
const PER_SENDER: usize = 1250; // 2 sides × 2 senders × 1,250 = 5,000 messages
const TOTAL: usize = 2 * SENDERS_PER_SIDE * PER_SENDER;

#[derive(Debug, Default)]
struct Tally {
    received: usize,
    duplicates: usize,
    reorders: usize,
    lagged: usize,
}

/// Reads `TOTAL` frames (`"<sender>:<seq>"`) and tallies duplicates and reorders per sender.
async fn read_all(mut session: Session) -> Tally {
    let mut tally = Tally::default();
    let mut seen: HashMap<String, Vec<bool>> = HashMap::new();
    let mut last: HashMap<String, Option<usize>> = HashMap::new();
    while tally.received + tally.duplicates < TOTAL {
        let Ok(out) = tokio::time::timeout(Duration::from_secs(20), session.recv()).await else {
            break;
        };
        let frame = match out {
            Outbound::Frame(b) => b,
            Outbound::Lagged { .. } => {
                tally.lagged += 1;
                continue;
            }
            other => panic!("unexpected {other:?}"),
        };
        let text = String::from_utf8_lossy(&frame).into_owned();
        let Some((sender, seq)) = text.split_once(':') else {
            panic!("unexpected frame {text:?}");
        };
        let seq: usize = seq
            .parse()
            .unwrap_or_else(|e| panic!("bad seq in {text:?}: {e}"));
        let marks = seen
            .entry(sender.to_owned())
            .or_insert_with(|| vec![false; PER_SENDER]);
        if marks[seq] {
            tally.duplicates += 1;
            continue;
        }
        marks[seq] = true;
        let prev = last.entry(sender.to_owned()).or_default();
        if prev.is_some_and(|p| seq < p) {
            tally.reorders += 1;
        }
        *prev = Some(seq);
        tally.received += 1;
    }
    tally
}

async fn run(history_len: usize) {
    let server = RedisServer::start().await;
    // A deep session queue: this test is about the broker path, not about slow clients.
    let config = HubConfig::default().with_session_queue(TOTAL * 2);
    let hub = |b| Hub::with_config(Arc::new(b), config.clone());
    let hub_a = hub(common::broker(&server, history_len).await);
    let hub_b = hub(common::broker(&server, history_len).await);
    let room = Room::new("multi").expect("valid room name");

    // Two members on each instance.
    let mut readers = Vec::new();
    for (side, hub) in [("a", &hub_a), ("b", &hub_b)] {
        for i in 0..2 {
            let s = hub.connect(format!("reader-{side}{i}"));
            if let Err(e) = s.handle().join(room.clone()).await {
                panic!("join: {e}");
            }
            readers.push((format!("{side}{i}"), tokio::spawn(read_all(s))));
        }
    }

    // Senders on both sides, each publishing in order (every publish awaited).
    let mut senders = Vec::new();
    for (side, hub) in [("a", &hub_a), ("b", &hub_b)] {
        for i in 0..SENDERS_PER_SIDE {
            let hub = hub.clone();
            let room = room.clone();
            let name = format!("{side}{i}");
            senders.push(tokio::spawn(async move {
                for seq in 0..PER_SENDER {
                    let env = Envelope::new(room.clone(), format!("{name}:{seq}"))
                        .with_from(name.clone());
                    if let Err(e) = hub.publish(&env).await {
                        panic!("publish {name}:{seq}: {e}");
                    }
                }
            }));
        }
    }
    let start = std::time::Instant::now();
    for s in senders {
        if let Err(e) = s.await {
            panic!("sender: {e}");
        }
    }
    let published = start.elapsed();
    let mut failures = Vec::new();
    for (name, r) in readers {
        let t = match r.await {
            Ok(t) => t,
            Err(e) => panic!("reader: {e}"),
        };
        let lost = TOTAL - t.received;
        println!(
            "history={history_len} reader {name}: received {} of {TOTAL}, lost {lost}, duplicates {}, reorders {}, lagged {}",
            t.received, t.duplicates, t.reorders, t.lagged
        );
        if lost != 0 || t.duplicates != 0 || t.reorders != 0 || t.lagged != 0 {
            failures.push(format!("{name}: {t:?}"));
        }
    }
    println!("history={history_len}: {TOTAL} messages published in {published:?}");
    assert!(failures.is_empty(), "delivery errors: {failures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_messages_between_two_instances() {
    run(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_messages_between_two_instances_with_history() {
    run(1000).await;
}
