//! History of a quiet room in a busy partition, with and without the PostgreSQL store
//! (issue #13): the quiet room's 50 messages (one edited, one deleted, some reactions) are
//! followed in its Kafka partition by `QUIET_OTHER_RECORDS` (default 200,000) records of other
//! rooms. A client asks for the room's newest 50 messages over the WebSocket protocol:
//!
//! - with the store, one `history` answered by PostgreSQL, in state;
//! - without it, from the log: Kafka scans backwards at most `history_scan_limit` records per
//!   page (100,000 by default), so the client follows `complete:false` pages until it has 50,
//!   and gets them as they were sent (no edits, the deleted one still there).
//!
//! Both servers run in this process over the same Tansu topic (one partition); Tansu and
//! PostgreSQL are started by the testkit. Prints the latencies (p50, p99, max of
//! `QUIET_ROUNDS`, default 30, full answers from the store; `QUIET_LOG_ROUNDS`, default 5,
//! from the log), and the rate at which a projector started over the backlog applies it.
//!
//! Run with `cargo bench --all-features --bench quiet_room`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatbus_core::store::{MemoryStore, Store};
use chatbus_core::{Broker, MessageId, Room};
use chatbus_kafka::{KafkaBroker, KafkaConfig};
use chatbus_postgres::{PostgresConfig, PostgresStore};
use chatbus_testkit::chat::quantile;
use chatbus_testkit::postgres::Postgres;
use chatbus_testkit::tansu::Tansu;
use chatbus_ws::state::{Projector, ProjectorConfig};
use chatbus_ws::{ChatHub, Identity, WsConfig, WsService};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn serve(chat: ChatHub) -> u16 {
    let ws = WsService::new(chat, WsConfig::default().with_rate_limit(None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = ws
            .serve(listener, axum::Router::new(), std::future::pending())
            .await;
    });
    port
}

async fn connect(port: u16) -> Client {
    let (c, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws?name=reader"))
        .await
        .expect("connect");
    c
}

async fn next(c: &mut Client) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), c.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).expect("json"),
            Ok(Some(Ok(_))) => {}
            other => panic!("connection: {other:?}"),
        }
    }
}

async fn reply(c: &mut Client, frame: Value) -> Value {
    let cid = frame["client_id"].clone();
    c.send(Message::text(frame.to_string()))
        .await
        .expect("send");
    loop {
        let v = next(c).await;
        if v["client_id"] == cid {
            return v;
        }
    }
}

/// The newest 50 messages of `room`, following partial pages; returns them and the number of
/// requests it took.
async fn newest_50(c: &mut Client, room: &str, round: usize) -> (Vec<Value>, usize) {
    let mut got: Vec<Value> = Vec::new();
    let mut before: Option<Value> = None;
    let mut requests = 0;
    while got.len() < 50 {
        requests += 1;
        let mut frame = json!({"type": "history", "room": room, "limit": 50 - got.len(), "client_id": format!("h{round}-{requests}")});
        if let Some(b) = &before {
            frame["before"] = b.clone();
        }
        let v = reply(c, frame).await;
        assert_eq!(v["type"], "history", "{v}");
        let mut page = v["messages"].as_array().cloned().unwrap_or_default();
        let oldest = page.first().map(|m| m["cursor"].clone());
        page.append(&mut got);
        got = page;
        before = if v["complete"] == false {
            Some(v["before"].clone())
        } else {
            oldest
        };
        if v["complete"] != false && got.len() < 50 {
            break;
        }
    }
    (got, requests)
}

fn summary(name: &str, ms: &[u64], requests: usize, sample: &[Value]) {
    let state = sample
        .iter()
        .filter(|m| {
            m.get("edited").is_some() || m["deleted"] == true || m.get("reactions").is_some()
        })
        .count();
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} | {requests} | {} | {state} |",
        ms.len(),
        quantile(ms.iter().copied(), 0.5) as f64 / 1000.0,
        quantile(ms.iter().copied(), 0.99) as f64 / 1000.0,
        ms.iter().max().copied().unwrap_or(0) as f64 / 1000.0,
        sample.len(),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let others = env_usize("QUIET_OTHER_RECORDS", 200_000);
    let rounds = env_usize("QUIET_ROUNDS", 30);
    // Each answer from the log scans the whole busy partition backwards: seconds on Tansu.
    let log_rounds = env_usize("QUIET_LOG_ROUNDS", 5);
    let tansu = Tansu::start().await;
    let pg = Postgres::start().await;
    let config = KafkaConfig::new(tansu.bootstrap())
        .with_topic(format!("quiet-{}", std::process::id()))
        .with_partitions(1);
    let broker: Arc<dyn Broker> = Arc::new(KafkaBroker::connect(config).await.expect("kafka"));
    let author = Identity::new("author").expect("user");
    let quiet = Room::new("quiet").expect("room");

    // The quiet room first, with its state.
    let writer = ChatHub::new(broker.clone());
    let mut ids: Vec<MessageId> = Vec::new();
    for i in 0..50 {
        let r = writer
            .post(quiet.clone(), &author, &format!("quiet {i}"))
            .await
            .expect("post");
        ids.push(r.id);
    }
    let pg_store: Arc<dyn Store> = Arc::new(
        PostgresStore::connect(PostgresConfig::new(pg.url()))
            .await
            .expect("pg"),
    );
    let with_store = writer.with_store(pg_store.clone());
    {
        // Edits and reactions check the store: a first projector lets it see the messages.
        let first = Projector::spawn(broker.clone(), pg_store.clone(), ProjectorConfig::default())
            .expect("projector");
        while first.stats().records < 50 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        with_store
            .edit(quiet.clone(), &author, ids[49], "quiet 49, edited")
            .await
            .expect("edit");
        with_store
            .delete(quiet.clone(), &author, ids[48])
            .await
            .expect("delete");
        with_store
            .react(quiet.clone(), &author, ids[47], "👍", true)
            .await
            .expect("react");
        while first.stats().records < 53 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Then the busy rest of the partition, with no projector running: a backlog.
    let started = Instant::now();
    let busy = Room::new("busy").expect("room");
    futures::stream::iter(0..others)
        .map(|i| {
            let (writer, busy, author) = (with_store.clone(), busy.clone(), author.clone());
            async move { writer.post(busy, &author, &format!("other {i}")).await }
        })
        .buffer_unordered(256)
        .for_each(|r| async move {
            r.expect("publish");
        })
        .await;
    let publish = started.elapsed();
    // A projector starting over that backlog, from the store's position: the catch-up rate.
    let started = Instant::now();
    let projector = Projector::spawn(broker.clone(), pg_store.clone(), ProjectorConfig::default())
        .expect("projector");
    while projector.stats().records < others as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let caught_up = started.elapsed();
    println!(
        "published {others} other records in {:.1} s ({:.0}/s); a projector started then caught up in {:.1} s ({:.0} events/s applied into PostgreSQL, batches of {})",
        publish.as_secs_f64(),
        others as f64 / publish.as_secs_f64(),
        caught_up.as_secs_f64(),
        projector.stats().events as f64 / caught_up.as_secs_f64(),
        ProjectorConfig::default().batch,
    );

    // With the store: PostgreSQL answers. Without: a store that knows nothing, so the log.
    let port_store = serve(with_store.clone()).await;
    let port_log =
        serve(ChatHub::new(broker.clone()).with_store(Arc::new(MemoryStore::new()))).await;
    println!("\n| history of the quiet room | rounds | p50 ms | p99 ms | max ms | requests per answer | messages | in state |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, port, rounds) in [
        ("with the PostgreSQL store", port_store, rounds),
        ("from the Kafka log", port_log, log_rounds),
    ] {
        let mut c = connect(port).await;
        let j = reply(
            &mut c,
            json!({"type": "join", "room": "quiet", "client_id": "j"}),
        )
        .await;
        assert_eq!(j["type"], "joined", "{j}");
        let mut us = Vec::new();
        let mut last = (Vec::new(), 0);
        for round in 0..rounds {
            let t = Instant::now();
            last = newest_50(&mut c, "quiet", round).await;
            us.push(t.elapsed().as_micros() as u64);
        }
        summary(name, &us, last.1, &last.0);
    }
    drop(projector);
}
