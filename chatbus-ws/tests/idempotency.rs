//! Idempotent sends (`key`, `retry`): a retried send is published once, on the same instance or
//! another, and its `ack` carries the original's `id` and `cursor`. Two servers over one broker
//! stand for two instances. (With real processes, DualBus and Redis down: `tests/idempotency.rs`
//! at the workspace root.)

mod common;

use std::sync::Arc;
use std::time::Duration;

use chatbus_core::{Broker, MemoryBroker};
use chatbus_ws::WsConfig;
use common::{Client, Server};
use serde_json::{json, Value};

const QUIET: Duration = Duration::from_millis(300);

fn send(room: &str, body: &str, key: &str, retry: bool, cid: &str) -> Value {
    json!({"type": "send", "room": room, "body": body, "key": key, "retry": retry, "client_id": cid})
}

/// The messages among `frames`.
fn messages(frames: &[Value]) -> Vec<&Value> {
    frames.iter().filter(|v| v["type"] == "message").collect()
}

/// The `ack` for `cid`, skipping echoes of the sender's own messages.
async fn ack_for(c: &mut Client, cid: &str) -> Value {
    loop {
        let v = c.next_non_presence().await;
        match v["type"].as_str() {
            Some("ack") if v["client_id"] == cid => return v,
            Some("message") => {}
            _ => panic!("unexpected frame waiting for the ack of {cid}: {v}"),
        }
    }
}

async fn history_bodies(c: &mut Client, room: &str) -> Vec<String> {
    c.send(json!({"type": "history", "room": room})).await;
    let v = loop {
        let v = c.next_non_presence().await;
        if v["type"] == "history" {
            break v;
        }
    };
    v["messages"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["body"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_retry_on_the_same_instance_gets_the_original_ack_and_publishes_nothing() {
    let server = Server::start(WsConfig::default()).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.join("r").await;
    bob.join("r").await;
    alice.send(send("r", "hello", "k-1", false, "c1")).await;
    let first = ack_for(&mut alice, "c1").await;
    assert!(first.get("duplicate").is_none(), "{first}");
    // The ack was "lost": the client sends again, same key.
    alice.send(send("r", "hello", "k-1", true, "c2")).await;
    let second = ack_for(&mut alice, "c2").await;
    assert_eq!(second["duplicate"], true, "{second}");
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["cursor"], first["cursor"]);
    let got = bob.quiet(QUIET).await;
    assert_eq!(messages(&got).len(), 1, "bob got {got:?}");
    assert_eq!(history_bodies(&mut bob, "r").await, ["hello"]);
    // The same key from another user, or without a key, is another message.
    bob.send(send("r", "hello", "k-1", false, "b1")).await;
    let theirs = ack_for(&mut bob, "b1").await;
    assert_ne!(theirs["id"], first["id"]);
    alice
        .send(json!({"type": "send", "room": "r", "body": "hello", "client_id": "c3"}))
        .await;
    ack_for(&mut alice, "c3").await;
    assert_eq!(
        history_bodies(&mut bob, "r").await,
        ["hello", "hello", "hello"]
    );
    let text = server.scrape();
    assert!(
        text.contains("chatbus_send_key_duplicates_total 1"),
        "{text}"
    );
    assert!(text.contains("chatbus_messages_in_total 3"), "{text}");
}

#[tokio::test]
async fn a_retry_that_overtakes_the_original_is_answered_with_it() {
    let server = Server::start(WsConfig::default()).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.join("r").await;
    bob.join("r").await;
    // Both frames before any answer: the second waits for the first's publish.
    alice.send(send("r", "once", "k-2", false, "c1")).await;
    alice.send(send("r", "once", "k-2", true, "c2")).await;
    let a1 = ack_for(&mut alice, "c1").await;
    let a2 = ack_for(&mut alice, "c2").await;
    assert_eq!(a1["id"], a2["id"]);
    assert_eq!(a2["duplicate"], true);
    assert_eq!(messages(&bob.quiet(QUIET).await).len(), 1);
}

#[tokio::test]
async fn a_retry_on_another_instance_finds_the_original_in_the_log() {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let a = Server::with_broker(broker.clone(), WsConfig::default()).await;
    let b = Server::with_broker(broker, WsConfig::default()).await;
    let mut bob = a.client("bob").await;
    bob.join("r").await;
    let mut alice = a.client("alice").await;
    alice.join("r").await;
    alice.send(send("r", "only once", "k-3", false, "c1")).await;
    let first = ack_for(&mut alice, "c1").await;
    drop(alice);
    // Alice reconnects to the other instance, which had nobody in the room when the original
    // was published: only the log knows it.
    let mut alice = b.client("alice").await;
    alice.join("r").await;
    alice.send(send("r", "only once", "k-3", true, "c2")).await;
    let second = ack_for(&mut alice, "c2").await;
    assert_eq!(second["duplicate"], true, "{second}");
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["cursor"], first["cursor"]);
    let got = bob.quiet(QUIET).await;
    assert_eq!(messages(&got).len(), 1, "bob got {got:?}");
    assert!(b.scrape().contains("chatbus_send_key_searches_total 1"));
    // Now that instance b has the room, the next retry needs no search.
    alice.send(send("r", "only once", "k-3", true, "c3")).await;
    assert_eq!(ack_for(&mut alice, "c3").await["id"], first["id"]);
    assert!(b.scrape().contains("chatbus_send_key_searches_total 1"));
}

#[tokio::test]
async fn a_retry_on_an_instance_with_members_needs_no_search() {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let a = Server::with_broker(broker.clone(), WsConfig::default()).await;
    let b = Server::with_broker(broker, WsConfig::default()).await;
    let mut carol = b.client("carol").await;
    carol.join("r").await;
    let mut alice = a.client("alice").await;
    alice.join("r").await;
    alice.send(send("r", "seen by b", "k-4", false, "c1")).await;
    let first = ack_for(&mut alice, "c1").await;
    // b fanned the original out to carol, and remembered its key.
    assert_eq!(messages(&carol.quiet(QUIET).await).len(), 1);
    let mut alice = b.client("alice").await;
    alice.join("r").await;
    alice.send(send("r", "seen by b", "k-4", true, "c2")).await;
    assert_eq!(ack_for(&mut alice, "c2").await["id"], first["id"]);
    assert!(b.scrape().contains("chatbus_send_key_searches_total 0"));
    assert!(carol.quiet(QUIET).await.is_empty());
}

#[tokio::test]
async fn a_retried_direct_message_is_one_message() {
    let server = Server::start(WsConfig::default()).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    let dm = |cid: &str, retry: bool| json!({"type": "send", "to": "bob", "body": "psst", "key": "k-5", "retry": retry, "client_id": cid});
    alice.send(dm("c1", false)).await;
    let first = ack_for(&mut alice, "c1").await;
    alice.send(dm("c2", true)).await;
    let second = ack_for(&mut alice, "c2").await;
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["room"], first["room"]);
    assert_eq!(messages(&bob.quiet(QUIET).await).len(), 1);
}

#[tokio::test]
async fn bad_keys_are_refused_and_the_connection_goes_on() {
    let server = Server::start(WsConfig::default()).await;
    let mut alice = server.client("alice").await;
    alice.join("r").await;
    alice
        .send(json!({"type": "send", "room": "r", "body": "x", "retry": true, "client_id": 1}))
        .await;
    let e = alice.expect_error("bad_request").await;
    assert!(e["message"].as_str().unwrap_or("").contains("key"), "{e}");
    for key in [json!(""), json!("k".repeat(65))] {
        alice
            .send(json!({"type": "send", "room": "r", "body": "x", "key": key, "client_id": 2}))
            .await;
        alice.expect_error("bad_request").await;
    }
    alice.assert_alive().await;
}
