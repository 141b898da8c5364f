//! Chat state over the wire with the default memory store: edit, delete, react, read,
//! history in state, unread on join, conversations. Two servers over one broker stand for two
//! instances (each with its own memory store fed from the broker). The same over real
//! processes with DualBus and PostgreSQL: `tests/state.rs` at the workspace root.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chatbus_core::{Broker, MemoryBroker};
use chatbus_ws::WsConfig;
use common::{Client, Server};
use serde_json::{json, Value};

const QUIET: Duration = Duration::from_millis(300);

/// The reply to `cid`, skipping live frames that are not replies.
async fn reply(c: &mut Client, cid: &str) -> Value {
    reply_keeping(c, cid, &mut Vec::new()).await
}

/// The reply to `cid`; the live frames that came before it are added to `live`.
async fn reply_keeping(c: &mut Client, cid: &str, live: &mut Vec<Value>) -> Value {
    loop {
        let v = c.next_non_presence().await;
        if v["client_id"] == cid {
            return v;
        }
        live.push(v);
    }
}

/// The next frame of type `ty`, skipping others (live messages, acks).
async fn next_of(c: &mut Client, ty: &str) -> Value {
    loop {
        let v = c.next_non_presence().await;
        if v["type"] == ty {
            return v;
        }
    }
}

async fn history(c: &mut Client, room: &str) -> Vec<Value> {
    c.send(json!({"type": "history", "room": room, "client_id": "h"}))
        .await;
    let v = reply(c, "h").await;
    assert_eq!(v["type"], "history", "{v}");
    v["messages"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn edit_delete_react_reach_every_member_once_and_history_shows_the_state() {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let one = Server::with_broker(broker.clone(), WsConfig::default()).await;
    let two = Server::with_broker(broker, WsConfig::default()).await;
    let mut alice = one.client("alice").await;
    let mut bob = two.client("bob").await;
    alice.join("r").await;
    bob.join("r").await;
    let (ack, _) = alice.say("r", "helo", "s1").await;
    let id = ack["id"].as_str().unwrap().to_owned();
    let (ack2, _) = alice.say("r", "second", "s2").await;
    let id2 = ack2["id"].as_str().unwrap().to_owned();
    bob.quiet(QUIET).await;

    // Bob may not edit or delete Alice's message.
    bob.send(json!({"type": "edit", "room": "r", "id": id, "body": "hacked", "client_id": "e0"}))
        .await;
    let v = reply(&mut bob, "e0").await;
    assert_eq!(v["code"], "forbidden", "{v}");
    bob.send(json!({"type": "delete", "room": "r", "id": id, "client_id": "d0"}))
        .await;
    assert_eq!(reply(&mut bob, "d0").await["code"], "forbidden");
    // An unknown message is not_found; a bad id is bad_request.
    let unknown = chatbus_core::MessageId::new().to_string();
    bob.send(json!({"type": "react", "room": "r", "id": unknown, "emoji": "👍", "on": true, "client_id": "x"}))
        .await;
    assert_eq!(reply(&mut bob, "x").await["code"], "not_found");
    bob.send(json!({"type": "react", "room": "r", "id": "nope", "emoji": "👍", "on": true, "client_id": "y"}))
        .await;
    assert_eq!(reply(&mut bob, "y").await["code"], "bad_request");

    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    alice
        .send(json!({"type": "edit", "room": "r", "id": id, "body": "hello", "client_id": "e1"}))
        .await;
    assert_eq!(
        reply_keeping(&mut alice, "e1", &mut seen_a).await["type"],
        "ack"
    );
    alice
        .send(json!({"type": "delete", "room": "r", "id": id2, "client_id": "d1"}))
        .await;
    assert_eq!(
        reply_keeping(&mut alice, "d1", &mut seen_a).await["type"],
        "ack"
    );
    for (who, cid) in [("bob", "r1"), ("alice", "r2"), ("bob", "r3")] {
        let (c, seen) = if who == "bob" {
            (&mut bob, &mut seen_b)
        } else {
            (&mut alice, &mut seen_a)
        };
        c.send(json!({"type": "react", "room": "r", "id": id, "emoji": "👍", "on": true, "client_id": cid}))
            .await;
        assert_eq!(reply_keeping(c, cid, seen).await["type"], "ack");
    }

    // Every event reached both members once, in order.
    for (c, mut got) in [(&mut alice, seen_a), (&mut bob, seen_b)] {
        got.extend(c.quiet(QUIET * 2).await);
        let kinds: Vec<&str> = got.iter().filter_map(|v| v["type"].as_str()).collect();
        assert_eq!(
            kinds,
            ["edit", "delete", "reaction", "reaction", "reaction"],
            "{got:?}"
        );
        assert_eq!(got[0]["body"], "hello");
        assert_eq!(got[0]["from"], "alice");
        assert_eq!(got[1]["id"], id2.as_str());
        assert_eq!(got[2]["user"], "bob");
        assert_eq!(got[2]["emoji"], "👍");
        assert_eq!(got[2]["on"], true);
    }

    // History from either instance shows the same state.
    let from_one = history(&mut alice, "r").await;
    let from_two = history(&mut bob, "r").await;
    assert_eq!(from_one.len(), 2, "{from_one:?}");
    assert_eq!(from_one[0]["body"], "hello");
    assert!(from_one[0]["edited"].is_u64(), "{:?}", from_one[0]);
    assert_eq!(
        from_one[0]["reactions"],
        json!([{"emoji": "👍", "count": 2, "me": true}])
    );
    assert_eq!(from_one[1]["deleted"], true);
    assert!(from_one[1].get("body").is_none());
    assert_eq!(from_two[0]["body"], "hello");
    assert_eq!(
        from_two[0]["reactions"],
        json!([{"emoji": "👍", "count": 2, "me": true}])
    );
    assert_eq!(from_two[1]["deleted"], true);
}

#[tokio::test]
async fn read_on_one_connection_shows_on_the_other_and_as_unread_zero_on_rejoin() {
    let server = Server::start(WsConfig::default()).await;
    let mut alice = server.client("alice").await;
    let mut bob_phone = server.client("bob").await;
    let mut bob_laptop = server.client("bob").await;
    alice.join("r").await;
    let mut last = Value::Null;
    for i in 0..3 {
        last = alice.say("r", &format!("m{i}"), &format!("s{i}")).await.0;
    }
    let joined = bob_phone.join("r").await;
    assert_eq!(joined["unread"], 3, "{joined}");
    assert_eq!(joined["read"], Value::Null, "{joined}");
    bob_laptop.join("r").await;
    bob_phone
        .send(json!({"type": "read", "room": "r", "cursor": last["cursor"], "client_id": "rd"}))
        .await;
    assert_eq!(reply(&mut bob_phone, "rd").await["type"], "ack");
    let seen = next_of(&mut bob_laptop, "read").await;
    assert_eq!(seen["user"], "bob");
    assert_eq!(seen["cursor"], last["cursor"]);
    // Reading an older cursor again moves nothing and publishes nothing.
    bob_phone
        .send(json!({"type": "read", "room": "r", "cursor": last["cursor"], "client_id": "rd2"}))
        .await;
    assert_eq!(reply(&mut bob_phone, "rd2").await["duplicate"], true);
    assert!(bob_laptop
        .quiet(QUIET)
        .await
        .iter()
        .all(|v| v["type"] != "read"));
    bob_laptop.send(json!({"type": "leave", "room": "r"})).await;
    bob_laptop.expect("left").await;
    let again = bob_laptop.join("r").await;
    assert_eq!(again["unread"], 0, "{again}");
    assert_eq!(again["read"], last["cursor"]);
}

#[tokio::test]
async fn conversations_list_rooms_and_direct_messages_newest_first() {
    let server = Server::start(WsConfig::default()).await;
    let mut me = server.client("me").await;
    let mut carol = server.client("carol").await;
    me.join("quiet").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    me.join("busy").await;
    carol.join("busy").await;
    carol.say("busy", "hi all", "c1").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    carol
        .send(json!({"type": "send", "to": "me", "body": "psst", "client_id": "dm"}))
        .await;
    reply(&mut carol, "dm").await;
    me.quiet(QUIET).await;
    me.send(json!({"type": "conversations", "limit": 2, "client_id": "l1"}))
        .await;
    let page = reply(&mut me, "l1").await;
    let list = page["conversations"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{page}");
    assert_eq!(list[0]["with"], "carol", "{page}");
    assert_eq!(list[0]["unread"], 1);
    assert_eq!(list[0]["last"]["body"], "psst");
    assert_eq!(list[1]["room"], "busy");
    assert_eq!(list[1]["unread"], 1);
    let next = page["next"].as_str().unwrap().to_owned();
    me.send(json!({"type": "conversations", "before": next, "client_id": "l2"}))
        .await;
    let rest = reply(&mut me, "l2").await;
    let list = rest["conversations"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{rest}");
    assert_eq!(list[0]["room"], "quiet");
    assert_eq!(rest["next"], Value::Null);
    me.send(json!({"type": "conversations", "before": "nope", "client_id": "l3"}))
        .await;
    assert_eq!(reply(&mut me, "l3").await["code"], "bad_request");
}

/// A `read` up to an event the connection was handed (a reaction after the newest message) is
/// taken as it is, at once: the store, which knows only messages, is not waited for.
#[tokio::test]
async fn reading_up_to_an_event_is_answered_at_once() {
    let server = Server::start(WsConfig::default()).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.join("r").await;
    bob.join("r").await;
    let (ack, _) = alice.say("r", "m1", "s1").await;
    alice
        .send(json!({"type": "react", "room": "r", "id": ack["id"], "emoji": "👍", "on": true, "client_id": "x"}))
        .await;
    let reaction = next_of(&mut bob, "reaction").await;
    let started = std::time::Instant::now();
    bob.send(json!({"type": "read", "room": "r", "cursor": reaction["cursor"], "client_id": "rd"}))
        .await;
    let v = reply(&mut bob, "rd").await;
    assert_eq!(v["type"], "ack", "{v}");
    let took = started.elapsed();
    assert!(
        took < chatbus_ws::state::PROJECTION_WAIT / 2,
        "a read of a cursor this connection was handed waited {took:?}"
    );
    // The room's members, bob's own connection too, see the new position.
    assert_eq!(
        next_of(&mut bob, "read").await["cursor"],
        reaction["cursor"]
    );
    bob.send(json!({"type": "leave", "room": "r"})).await;
    bob.expect("left").await;
    let again = bob.join("r").await;
    assert_eq!(again["read"], reaction["cursor"], "{again}");
    assert_eq!(again["unread"], 0, "{again}");
}
