//! `history` from the store when the store knows little: what the log adds keeps the log's
//! own partial-page marker. Kafka on Tansu with a small scan bound, so a quiet room behind
//! 200 records of another room needs several pages.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chatbus_core::store::MemoryStore;
use chatbus_core::{Broker, Room};
use chatbus_kafka::{KafkaBroker, KafkaConfig};
use chatbus_testkit::tansu::Tansu;
use chatbus_ws::{ChatHub, Identity, WsConfig};
use common::{Client, Server};
use serde_json::{json, Value};

async fn kafka(tansu: &Tansu, topic: &str) -> Arc<dyn Broker> {
    let config = KafkaConfig::new(tansu.bootstrap())
        .with_topic(topic)
        .with_partitions(1)
        .with_history_scan_limit(50);
    Arc::new(KafkaBroker::connect(config).await.expect("kafka"))
}

/// Three messages in `quiet`, then 200 in `busy`, all before anyone reads.
async fn fill(writer: &ChatHub) {
    let me = Identity::new("writer").expect("user");
    let quiet = Room::new("quiet").expect("room");
    let busy = Room::new("busy").expect("room");
    for i in 0..3 {
        let body = format!("old {i}");
        writer.post(quiet.clone(), &me, &body).await.expect("post");
    }
    for i in 0..200 {
        let body = format!("busy {i}");
        writer.post(busy.clone(), &me, &body).await.expect("post");
    }
}

async fn history(c: &mut Client, cid: &str) -> Value {
    c.send(json!({"type": "history", "room": "quiet", "limit": 10, "client_id": cid}))
        .await;
    loop {
        let v = c.next_non_presence().await;
        if v["client_id"] == cid {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_knows_nothing_of_the_room_leaves_the_answer_to_the_log() {
    let tansu = Tansu::start().await;
    let broker = kafka(&tansu, "history-empty-store").await;
    fill(&ChatHub::new(broker.clone())).await;
    let chat = ChatHub::new(broker).with_store(Arc::new(MemoryStore::new()));
    let server = Server::with_chat(chat, WsConfig::default()).await;
    let mut c = server.client("reader").await;
    c.join("quiet").await;
    let v = history(&mut c, "h1").await;
    assert_eq!(v["complete"], false, "a scan cut short says so: {v}");
    assert!(v["before"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_started_late_completes_from_the_log_and_keeps_its_marker() {
    let tansu = Tansu::start().await;
    let broker = kafka(&tansu, "history-late-store").await;
    let writer = ChatHub::new(broker.clone());
    fill(&writer).await;
    // This instance's memory store is fed from now on: it knows only the newest message.
    let server = Server::with_broker(broker, WsConfig::default()).await;
    let mut c = server.client("reader").await;
    c.join("quiet").await;
    writer
        .post(
            Room::new("quiet").unwrap(),
            &Identity::new("writer").unwrap(),
            "new",
        )
        .await
        .unwrap();
    let store = server.ws.chat().store();
    let quiet = Room::new("quiet").unwrap();
    for _ in 0..100 {
        let page = store
            .page(&quiet, "reader", None, 10)
            .await
            .unwrap()
            .unwrap_or_default();
        if !page.messages.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = history(&mut c, "h1").await;
    let bodies: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["body"].as_str())
        .collect();
    assert_eq!(bodies, ["new"], "{v}");
    assert_eq!(v["complete"], false, "older messages may exist: {v}");
    assert!(v["before"].is_string(), "{v}");
}
