//! Chat state over real processes (issue #13): `chat-server --broker dual --store postgres`
//! instances over redis-server, Tansu and PostgreSQL, all started here (chatbus-testkit).
//!
//! - Two instances share state: only the author edits; after an edit, a delete and three
//!   reactions every member on both instances saw each event once, and `history` from either
//!   instance is the same; a client that was away resumes with `since` and gets the events it
//!   missed; read state set on one connection shows on the user's other one and as `unread` 0
//!   on rejoin; the conversation list orders and counts correctly.
//! - The projector is SIGKILLed and PostgreSQL restarted mid-traffic: afterwards the store
//!   equals the state of the log, replayed here into a memory store, exactly.
//!
//! Run with `cargo build --all-features --example chat-server && cargo test --all-features
//! --test state`. Needs `redis-server`, `tansu` and PostgreSQL (see chatbus-testkit).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatbus_core::store::{ChatEvent, MemoryStore, MemoryStoreConfig, Store};
use chatbus_core::{Broker, Cursor, Room};
use chatbus_kafka::{KafkaBroker, KafkaConfig};
use chatbus_postgres::{PostgresConfig, PostgresStore};
use chatbus_testkit::chat::{metric, ChatServer};
use chatbus_testkit::client::WsClient;
use chatbus_testkit::postgres::Postgres;
use chatbus_testkit::redis::RedisServer;
use chatbus_testkit::tansu::Tansu;
use serde_json::{json, Value};

/// How long anything that must happen may take (through the brokers and the projector).
const WAIT: Duration = Duration::from_secs(15);

struct Services {
    _redis: RedisServer,
    _tansu: Tansu,
    pg: Postgres,
    env: Vec<(&'static str, String)>,
    topic: String,
    brokers: String,
}

impl Services {
    async fn start(tag: &str) -> Self {
        let redis = RedisServer::start().await;
        let tansu = Tansu::start().await;
        let pg = Postgres::start().await;
        let topic = format!("state-{tag}-{}", std::process::id());
        let env = vec![
            ("CHATBUS_REDIS_URL", redis.url()),
            ("CHATBUS_KAFKA_BROKERS", tansu.bootstrap()),
            ("CHATBUS_KAFKA_TOPIC", topic.clone()),
            ("CHATBUS_POSTGRES_URL", pg.url()),
        ];
        Self {
            brokers: tansu.bootstrap(),
            _redis: redis,
            _tansu: tansu,
            pg,
            env,
            topic,
        }
    }

    async fn server(&self, extra: &[&str]) -> ChatServer {
        let mut args = vec!["--broker", "dual", "--store", "postgres"];
        args.extend_from_slice(extra);
        ChatServer::start(&args, &self.env).await
    }
}

async fn connect(port: u16, user: &str) -> WsClient {
    WsClient::connect_as(port, &format!("/ws?name={user}"), &format!("{user}@{port}"))
        .await
        .unwrap_or_else(|e| panic!("{user}: {e}"))
}

async fn joined(port: u16, user: &str, room: &str) -> WsClient {
    let mut c = connect(port, user).await;
    c.join(room)
        .await
        .unwrap_or_else(|e| panic!("{user}: join {room}: {e}"));
    c
}

/// Sends `frame` with `client_id` and returns the answer to it (an ack or an error),
/// leaving every other frame queued.
async fn ask(c: &mut WsClient, mut frame: Value, cid: &str) -> Value {
    frame["client_id"] = json!(cid);
    c.send(frame).await;
    c.expect(&format!("the answer to {cid}"), WAIT, |f| {
        f["client_id"] == cid
    })
    .await
}

/// The events of `room` (`edit`, `delete`, `reaction`) `c` has received so far, by type,
/// after waiting until it has `want` of them.
async fn events_seen(c: &mut WsClient, room: &str, want: usize) -> BTreeMap<String, Vec<Value>> {
    let is_event = |f: &Value| {
        f["room"] == room && matches!(f["type"].as_str(), Some("edit" | "delete" | "reaction"))
    };
    let deadline = Instant::now() + WAIT;
    while c.seen().iter().filter(|f| is_event(f)).count() < want && Instant::now() < deadline {
        let _ = c
            .wait_for(Duration::from_millis(100), |f| f["type"] == "never")
            .await;
    }
    // A duplicate would come right after.
    let _ = c
        .wait_for(Duration::from_millis(500), |f| f["type"] == "never")
        .await;
    let mut by_type: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for f in c.seen().iter().filter(|f| is_event(f)) {
        by_type
            .entry(f["type"].as_str().unwrap_or("").to_owned())
            .or_default()
            .push(f.clone());
    }
    by_type
}

/// The `history` of `room` as `c` gets it, once it satisfies `ready` (the store follows the
/// log a little behind), within [`WAIT`].
async fn history_when(
    c: &mut WsClient,
    room: &str,
    ready: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    loop {
        n += 1;
        let v = ask(
            c,
            json!({"type": "history", "room": room, "limit": 100}),
            &format!("h{n}"),
        )
        .await;
        assert_eq!(v["type"], "history", "{v}");
        let items = v["messages"].as_array().cloned().unwrap_or_default();
        if ready(&items) {
            return items;
        }
        assert!(
            Instant::now() < deadline,
            "history never got ready: {items:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_chat_state_through_postgres() {
    let svc = Services::start("share").await;
    let a = svc.server(&[]).await;
    let b = svc.server(&[]).await;
    let room = "state-room";

    let mut alice = joined(a.port(), "alice", room).await;
    let mut bob = joined(b.port(), "bob", room).await;
    let mut carol = joined(b.port(), "carol", room).await;
    let mut dave = joined(a.port(), "dave", room).await;

    let m1 = ask(
        &mut alice,
        json!({"type": "send", "room": room, "body": "helo"}),
        "s1",
    )
    .await;
    let m2 = ask(
        &mut alice,
        json!({"type": "send", "room": room, "body": "oops"}),
        "s2",
    )
    .await;
    assert_eq!(m2["type"], "ack", "{m2}");
    // Dave has both messages, then goes away.
    let last = dave
        .expect("m2 at dave", WAIT, |f| {
            f["type"] == "message" && f["id"] == m2["id"]
        })
        .await;
    dave.close().await;

    // Only the author may edit.
    let refused = ask(
        &mut bob,
        json!({"type": "edit", "room": room, "id": m1["id"], "body": "hacked"}),
        "e0",
    )
    .await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    let edit = ask(
        &mut alice,
        json!({"type": "edit", "room": room, "id": m1["id"], "body": "hello"}),
        "e1",
    )
    .await;
    assert_eq!(edit["type"], "ack", "{edit}");
    let del = ask(
        &mut alice,
        json!({"type": "delete", "room": room, "id": m2["id"]}),
        "d1",
    )
    .await;
    assert_eq!(del["type"], "ack", "{del}");
    for (c, emoji, cid) in [
        (&mut bob, "👍", "r1"),
        (&mut carol, "👍", "r2"),
        (&mut alice, "❤️", "r3"),
    ] {
        let r = ask(
            c,
            json!({"type": "react", "room": room, "id": m1["id"], "emoji": emoji, "on": true}),
            cid,
        )
        .await;
        assert_eq!(r["type"], "ack", "{r}");
    }

    // Every member on both instances saw each event once.
    for c in [&mut alice, &mut bob, &mut carol] {
        let seen = events_seen(c, room, 5).await;
        let label = c.label().to_owned();
        assert_eq!(seen.get("edit").map(Vec::len), Some(1), "{label}: {seen:?}");
        assert_eq!(
            seen.get("delete").map(Vec::len),
            Some(1),
            "{label}: {seen:?}"
        );
        assert_eq!(
            seen.get("reaction").map(Vec::len),
            Some(3),
            "{label}: {seen:?}"
        );
        assert_eq!(seen["edit"][0]["body"], "hello");
        let cursors: BTreeSet<String> = seen
            .values()
            .flatten()
            .map(|f| f["cursor"].to_string())
            .collect();
        assert_eq!(cursors.len(), 5, "{label}: five distinct events: {seen:?}");
    }

    // History from either instance is the same state (asked as the same user).
    let settled = |items: &[Value]| {
        items.len() == 2
            && items[0]["body"] == "hello"
            && items[1]["deleted"] == true
            && items[0]["reactions"]
                .as_array()
                .is_some_and(|r| r.len() == 2)
    };
    let from_a = history_when(&mut alice, room, settled).await;
    let mut alice_on_b = joined(b.port(), "alice", room).await;
    let from_b = history_when(&mut alice_on_b, room, settled).await;
    assert_eq!(from_a, from_b, "history differs between the instances");
    assert!(from_a[0]["edited"].is_u64(), "{from_a:?}");
    assert_eq!(
        from_a[0]["reactions"],
        json!([{"emoji": "👍", "count": 2}, {"emoji": "❤️", "count": 1, "me": true}])
    );
    assert!(from_a[1].get("body").is_none(), "{from_a:?}");

    // Dave comes back, on the other instance, from where he was: he gets what he missed.
    let mut dave = connect(b.port(), "dave").await;
    dave.send(json!({"type": "join", "room": room, "since": last["cursor"]}))
        .await;
    let seen = events_seen(&mut dave, room, 5).await;
    assert_eq!(seen.get("edit").map(Vec::len), Some(1), "dave: {seen:?}");
    assert_eq!(seen.get("delete").map(Vec::len), Some(1), "dave: {seen:?}");
    assert_eq!(
        seen.get("reaction").map(Vec::len),
        Some(3),
        "dave: {seen:?}"
    );

    // Read on one connection shows on the user's other one, and as unread 0 on rejoin.
    let mut bob_on_a = joined(a.port(), "bob", room).await;
    let newest = from_a[1]["cursor"].clone();
    let read = ask(
        &mut bob,
        json!({"type": "read", "room": room, "cursor": newest}),
        "rd",
    )
    .await;
    assert_eq!(read["type"], "ack", "{read}");
    let shown = bob_on_a
        .expect("bob's read on his other connection", WAIT, |f| {
            f["type"] == "read" && f["user"] == "bob"
        })
        .await;
    assert_eq!(shown["cursor"], newest);
    let deadline = Instant::now() + WAIT;
    loop {
        let again = joined(a.port(), "bob", room).await;
        let j = again
            .seen()
            .iter()
            .find(|f| f["type"] == "joined")
            .cloned()
            .unwrap_or_default();
        if j["unread"] == 0 && j["read"] == newest {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob's rejoin never showed unread 0: {j}"
        );
        again.close().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The conversation list: newest activity first, with unread counts.
    let quiet = "state-quiet";
    let busy = "state-busy";
    alice.join(quiet).await.expect("join quiet");
    carol.join(busy).await.expect("carol joins busy");
    alice.join(busy).await.expect("alice joins busy");
    tokio::time::sleep(Duration::from_millis(20)).await;
    ask(
        &mut carol,
        json!({"type": "send", "room": busy, "body": "news"}),
        "c1",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let dm = ask(
        &mut carol,
        json!({"type": "send", "to": "alice", "body": "psst"}),
        "c2",
    )
    .await;
    assert_eq!(dm["type"], "ack", "{dm}");
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    let list = loop {
        n += 1;
        let v = ask(
            &mut alice_on_b,
            json!({"type": "conversations", "limit": 10}),
            &format!("cv{n}"),
        )
        .await;
        let list = v["conversations"].as_array().cloned().unwrap_or_default();
        let rooms: Vec<&str> = list.iter().filter_map(|c| c["room"].as_str()).collect();
        if rooms.len() == 4 && rooms[0] == dm["room"] && rooms[1] == busy {
            break list;
        }
        assert!(
            Instant::now() < deadline,
            "the conversation list never settled: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(list[0]["with"], "carol", "{list:?}");
    assert_eq!(list[0]["unread"], 1);
    assert_eq!(list[0]["last"]["body"], "psst");
    assert_eq!(list[1]["unread"], 1, "carol's news in busy: {list:?}");
    assert_eq!(list[1]["last"]["body"], "news");
    // The two others: the quiet room (joined later) is newer than the state room's last
    // message; alice wrote everything in the state room, so nothing there is unread.
    let rest: Vec<(&str, u64)> = list[2..]
        .iter()
        .map(|c| {
            (
                c["room"].as_str().unwrap_or(""),
                c["unread"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(rest, [(quiet, 0), (room, 0)], "{list:?}");
}

/// The state of `rooms` (pages in state as seen by each user, read states, conversations), as
/// comparable values.
async fn state_of(store: &dyn Store, rooms: &[Room], users: &[&str]) -> Value {
    let mut out = serde_json::Map::new();
    for room in rooms {
        for user in users {
            let page = store
                .page(room, user, None, 100_000)
                .await
                .expect("page")
                .unwrap_or_default();
            let messages: Vec<Value> = page
                .messages
                .iter()
                .map(|m| {
                    json!({
                        "id": m.id.to_string(), "from": &*m.from, "body": m.body.as_deref(),
                        "cursor": m.cursor.to_string(), "edited": m.edited, "deleted": m.deleted,
                        "reactions": m.reactions.iter().map(|r| json!([&*r.emoji, r.count, r.me])).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let read = store.read_state(room, user).await.expect("read state");
            out.insert(
                format!("{room}/{user}"),
                json!({"messages": messages, "read": read.cursor.map(|c| c.to_string()), "unread": read.unread}),
            );
        }
    }
    for user in users {
        let convs = store
            .conversations(user, None, 100)
            .await
            .expect("conversations");
        let list: Vec<Value> = convs
            .items
            .iter()
            .map(|c| {
                json!([
                    c.room.as_str(),
                    c.with.as_deref(),
                    c.unread,
                    c.last.as_ref().map(|m| m.id.to_string())
                ])
            })
            .collect();
        out.insert(format!("conversations/{user}"), Value::Array(list));
    }
    Value::Object(out)
}

/// Every record of the log, projected in log order into a fresh memory store.
async fn replay_log(brokers: &str, topic: &str) -> MemoryStore {
    let kafka = KafkaBroker::connect(KafkaConfig::new(brokers).with_topic(topic))
        .await
        .expect("connect to Kafka");
    let log = kafka.as_log().expect("Kafka has a log");
    let store = MemoryStore::with_config(
        MemoryStoreConfig::default()
            .with_max_messages_per_room(1_000_000)
            .with_max_rooms(1_000_000),
    );
    for p in 0..log.partitions() {
        let mut after: Option<Cursor> = None;
        loop {
            let batch = log.read(p, after, 1_000).await.expect("read the log");
            let events: Vec<ChatEvent> = batch
                .envelopes
                .iter()
                .filter_map(chatbus_ws::state::event)
                .collect();
            store.apply(&events, None).await.expect("apply");
            match batch.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_killed_and_postgres_restarted_mid_traffic_the_store_equals_the_log() {
    let mut svc = Services::start("faults").await;
    let a = svc.server(&["--no-projector"]).await;
    let b = svc.server(&["--no-projector"]).await;
    let mut projector = svc.server(&[]).await;
    let rooms: Vec<String> = (0..4).map(|i| format!("traffic-{i}")).collect();
    let users = ["w0", "w1", "w2", "w3"];

    // Four writers, two per instance, each in every room: messages, edits of their own,
    // reactions to others', reads.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let port = if i % 2 == 0 { a.port() } else { b.port() };
        let (rooms, stop, user) = (rooms.clone(), stop.clone(), (*user).to_owned());
        writers.push(tokio::spawn(async move {
            let mut c = connect(port, &user).await;
            for r in &rooms {
                c.join(r).await.expect("join");
            }
            let (mut acked, mut refused) = (0u32, 0u32);
            let mut mine: Vec<(String, Value)> = Vec::new();
            let mut k = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                k += 1;
                let room = &rooms[k as usize % rooms.len()];
                let frame = match k % 5 {
                    1 | 2 => json!({"type": "send", "room": room, "body": format!("{user}-{k}")}),
                    3 => match mine.last() {
                        Some((r, id)) => json!({"type": "edit", "room": r, "id": id, "body": format!("{user}-{k}-edited")}),
                        None => continue,
                    },
                    4 => {
                        // A reaction to the newest message of the room someone else wrote.
                        let other = c.seen().iter().rev().find(|f| f["type"] == "message" && f["room"] == room.as_str() && f["from"] != user.as_str()).cloned();
                        match other {
                            Some(m) => json!({"type": "react", "room": room, "id": m["id"], "emoji": (if k.is_multiple_of(2) { "👍" } else { "🎉" }), "on": !k.is_multiple_of(3)}),
                            None => continue,
                        }
                    }
                    _ => {
                        let newest = c.seen().iter().rev().find(|f| f["type"] == "message" && f["room"] == room.as_str()).cloned();
                        match newest {
                            Some(m) => json!({"type": "read", "room": room, "cursor": m["cursor"]}),
                            None => continue,
                        }
                    }
                };
                let answer = ask(&mut c, frame.clone(), &format!("{user}-{k}")).await;
                if answer["type"] == "ack" {
                    acked += 1;
                    if frame["type"] == "send" {
                        mine.push((room.clone(), answer["id"].clone()));
                    }
                } else {
                    // Edits and reactions need the store's check: refused (unavailable)
                    // while PostgreSQL is down.
                    refused += 1;
                }
                c.clear();
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            (user, acked, refused)
        }));
    }

    tokio::time::sleep(Duration::from_secs(3)).await;
    projector.kill().await; // SIGKILL, mid-batch or not
    tokio::time::sleep(Duration::from_secs(3)).await;
    projector.restart().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    svc.pg.kill(); // PostgreSQL dies too, under the projector and the instances
    tokio::time::sleep(Duration::from_secs(2)).await;
    svc.pg.restart().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = 0;
    for w in writers {
        let (user, ok, refused) = w.await.expect("writer");
        eprintln!("{user}: {ok} acked, {refused} refused");
        acked += ok;
    }
    assert!(
        acked > 200,
        "too little traffic to mean anything: {acked} acked"
    );

    let store = PostgresStore::connect(PostgresConfig::new(svc.pg.url()))
        .await
        .expect("connect to PostgreSQL");
    let rooms: Vec<Room> = rooms.iter().map(|r| Room::new(r).expect("room")).collect();
    // The projector catches up; then the store equals the log's state.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let expected = state_of(&replay_log(&svc.brokers, &svc.topic).await, &rooms, &users).await;
        let got = state_of(&store, &rooms, &users).await;
        if got == expected {
            let messages: usize = rooms.len();
            eprintln!("the store equals the log's state ({messages} rooms, {acked} acked changes)");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store never equalled the log's state:\nstore {got:#}\nlog {expected:#}\nprojector log:\n{}",
            projector.log()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The projector that came back holds every partition (the instances run none) and
    // counted the PostgreSQL outage.
    let metrics = projector.metrics().await;
    assert_eq!(
        metric(&metrics, "chatbus_projector_partitions_held"),
        8,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "chatbus_projector_events_total") > 0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "chatbus_projector_errors_total") > 0,
        "{metrics}"
    );
    drop(projector);
}
