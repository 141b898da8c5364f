//! The application platform of issue #12 over real processes: per-room JWT permissions (the
//! `rooms` claim and the reserved `_` and `dm.` names), direct messages, user status (`watch`),
//! and the example server's HTTP API.
//!
//! Every scenario runs two `chat-server` instances that require HS256 tokens, with clients on
//! both, once over Redis (with a history window, so direct conversations have cursors) and once
//! over the DualBus (Redis + Tansu). The contract is docs/protocol.md (spec of issue #12).
//!
//! Run with
//!
//! ```text
//! cargo build --all-features --example chat-server && cargo test --all-features --test platform
//! ```
//!
//! (`cargo test --test platform` alone does not rebuild the server these tests run.) Needs
//! `redis-server` and `tansu` (see chatbus-testkit).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chatbus_testkit::chat::{http_request, ChatServer};
use chatbus_testkit::client::WsClient;
use chatbus_testkit::redis::RedisServer;
use chatbus_testkit::tansu::Tansu;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};

/// The servers' `--jwt-secret`.
const SECRET: &str = "platform-test-secret";
/// The servers' `CHATBUS_API_KEY` in the HTTP API scenario.
const API_KEY: &str = "platform-test-api-key";
/// The servers' `--presence-interval-ms`.
const PRESENCE_MS: u64 = 500;
/// How long a frame that must come may take (across instances, through the broker).
const WAIT: Duration = Duration::from_secs(10);
/// How long a frame that must not come is waited for.
const QUIET: Duration = Duration::from_millis(1500);
/// The bound on a status change after a connect or a close.
const STATUS_BOUND: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
enum Backend {
    /// Redis pub/sub with a history window of 100 messages per room.
    Redis,
    /// Redis + Kafka (Tansu).
    Dual,
}

/// Each scenario starts a whole cluster; two at once on 2 cores would measure the machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Two chat-server instances over one broker.
struct Platform {
    servers: Vec<ChatServer>,
    backend: Backend,
    _redis: RedisServer,
    _tansu: Option<Tansu>,
    // Last, so that it is released after the processes above are stopped.
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Platform {
    async fn start(backend: Backend, extra_env: &[(&str, String)]) -> Self {
        let turn = ONE_AT_A_TIME.lock().await;
        let redis = RedisServer::start().await;
        let mut env = vec![("CHATBUS_REDIS_URL", redis.url())];
        let tansu = match backend {
            Backend::Redis => {
                env.push(("CHATBUS_REDIS_HISTORY", "100".into()));
                None
            }
            Backend::Dual => {
                let tansu = Tansu::start().await;
                env.push(("CHATBUS_KAFKA_BROKERS", tansu.bootstrap()));
                env.push(("CHATBUS_KAFKA_TOPIC", format!("platform-{}", unique())));
                Some(tansu)
            }
        };
        env.extend(extra_env.iter().cloned());
        let broker = match backend {
            Backend::Redis => "redis",
            Backend::Dual => "dual",
        };
        let presence = PRESENCE_MS.to_string();
        let args = [
            "--broker",
            broker,
            "--jwt-secret",
            SECRET,
            "--presence-interval-ms",
            &presence,
        ];
        let mut servers = Vec::new();
        for _ in 0..2 {
            servers.push(ChatServer::start(&args, &env).await);
        }
        Self {
            servers,
            backend,
            _redis: redis,
            _tansu: tansu,
            _turn: turn,
        }
    }

    fn port(&self, instance: usize) -> u16 {
        self.servers[instance].port()
    }

    /// A connection of `user` (with the `rooms` claim when given) to `instance` (0 or 1).
    async fn connect(&self, instance: usize, user: &str, rooms: Option<&[&str]>) -> WsClient {
        let label = format!("{user}@instance{}", instance + 1);
        let path = format!("/ws?token={}", token(user, rooms));
        match WsClient::connect_as(self.port(instance), &path, &label).await {
            Ok(c) => c,
            Err(e) => panic!("{:?}: cannot connect {e}", self.backend),
        }
    }
}

impl Drop for Platform {
    /// A failed scenario shows what the servers logged.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, s) in self.servers.iter().enumerate() {
                let log = s.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!(
                    "--- {:?}: instance{} log (last 40 lines) ---",
                    self.backend,
                    i + 1
                );
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// An HS256 token for `sub`, valid for an hour, with the `rooms` claim when given.
fn token(sub: &str, rooms: Option<&[&str]>) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;
    let mut claims = json!({"sub": sub, "exp": exp});
    if let Some(rooms) = rooms {
        claims["rooms"] = json!(rooms);
    }
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign a token")
}

/// Sends `frame` (which carries a `client_id`) and returns the answer with that `client_id`.
async fn ask(c: &mut WsClient, frame: Value) -> Value {
    let cid = frame["client_id"].clone();
    assert!(!cid.is_null(), "ask() needs a client_id: {frame}");
    c.send(frame.clone()).await;
    c.expect(&format!("the answer to {frame}"), WAIT, |f| {
        f["client_id"] == cid
    })
    .await
}

/// Joins `room` and checks that it was joined.
async fn join(c: &mut WsClient, room: &str) {
    let r = ask(
        c,
        json!({"type": "join", "room": room, "client_id": format!("join-{room}")}),
    )
    .await;
    assert_eq!(r["type"], "joined", "{} joins {room}: {r}", c.label());
}

/// Panics unless `frame` is an `error` with one of `codes`.
fn assert_error(frame: &Value, codes: &[&str], what: &str) {
    assert!(
        frame["type"] == "error" && codes.iter().any(|c| frame["code"] == *c),
        "{what}: expected an error with code {codes:?}, got {frame}"
    );
}

fn is_message(f: &Value, id: &Value) -> bool {
    f["type"] == "message" && f["id"] == *id
}

fn is_status(f: &Value, user: &str, online: bool) -> bool {
    f["type"] == "status" && f["user"] == user && f["online"] == online
}

/// `dm.<32 hex>.<32 hex>`.
fn is_direct_room(room: &str) -> bool {
    let parts: Vec<&str> = room.split('.').collect();
    parts.len() == 3
        && parts[0] == "dm"
        && parts[1..]
            .iter()
            .all(|p| p.len() == 32 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

// ---------------------------------------------------------------------------------------------
// 1. The `rooms` claim and reserved names.

async fn rooms_claim(backend: Backend) {
    let p = Platform::start(backend, &[]).await;
    let mut ann = p.connect(0, "ann", Some(&["lobby", "team-a-*"])).await;
    let mut bob = p.connect(1, "bob", None).await;

    // Inside the claim: an exact name and a prefix match.
    join(&mut ann, "lobby").await;
    join(&mut ann, "team-a-x").await;

    // Outside it: forbidden, and nothing joined (send and history are refused too).
    let r = ask(
        &mut ann,
        json!({"type": "join", "room": "team-b", "client_id": "ann-join-b"}),
    )
    .await;
    assert_error(
        &r,
        &["forbidden"],
        "ann (rooms lobby, team-a-*) joins team-b",
    );
    assert_eq!(r["room"], "team-b", "the refusal names the room: {r}");
    let r = ask(
        &mut ann,
        json!({"type": "send", "room": "team-b", "body": "let me in", "client_id": "ann-send-b"}),
    )
    .await;
    assert_error(&r, &["not_joined", "forbidden"], "ann sends to team-b");
    let r = ask(
        &mut ann,
        json!({"type": "history", "room": "team-b", "client_id": "ann-hist-b"}),
    )
    .await;
    assert_error(
        &r,
        &["not_joined", "forbidden"],
        "ann asks team-b's history",
    );

    // Reserved names: internal channels (for anybody, claim or not) and someone else's direct
    // conversation.
    let r = ask(
        &mut bob,
        json!({"type": "send", "to": "carol", "body": "psst", "client_id": "bob-dm-carol"}),
    )
    .await;
    assert_eq!(r["type"], "ack", "bob's direct message to carol: {r}");
    let bob_carol = r["room"].as_str().unwrap_or_default().to_owned();
    assert!(is_direct_room(&bob_carol), "a direct room: {r}");
    for c in [&mut ann, &mut bob] {
        let label = c.label().to_owned();
        let r = ask(
            c,
            json!({"type": "join", "room": "_internal", "client_id": "join-internal"}),
        )
        .await;
        assert_error(&r, &["forbidden"], &format!("{label} joins _internal"));
    }
    let r = ask(
        &mut ann,
        json!({"type": "join", "room": bob_carol, "client_id": "ann-join-dm"}),
    )
    .await;
    assert_error(&r, &["forbidden"], "ann joins bob and carol's conversation");

    // Without the claim every public room is allowed: bob joins team-b and talks there, then
    // in the lobby. Ann gets the lobby message (so delivery works) and nothing of team-b.
    join(&mut bob, "team-b").await;
    join(&mut bob, "lobby").await;
    for (room, body, cid) in [
        ("team-b", "for team b only", "bob-b"),
        ("lobby", "for everyone", "bob-lobby"),
    ] {
        let r = ask(
            &mut bob,
            json!({"type": "send", "room": room, "body": body, "client_id": cid}),
        )
        .await;
        assert_eq!(r["type"], "ack", "bob sends to {room}: {r}");
    }
    ann.expect("bob's lobby message", WAIT, |f| {
        f["type"] == "message" && f["room"] == "lobby" && f["body"] == "for everyone"
    })
    .await;
    ann.expect_none(
        "anything of team-b or of bob and carol's conversation",
        QUIET,
        |f| f["type"] != "error" && (f["room"] == "team-b" || f["room"] == bob_carol.as_str()),
    )
    .await;
    // Ann never showed up in team-b's presence either.
    let listed = bob.seen().iter().find(|f| {
        f["type"] == "presence"
            && f["room"] == "team-b"
            && f["online"]
                .as_array()
                .is_some_and(|o| o.iter().any(|u| u == "ann"))
    });
    assert!(listed.is_none(), "ann listed in team-b: {listed:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. Direct messages.

async fn direct_messages(backend: Backend) {
    let p = Platform::start(backend, &[]).await;
    // Ann's claim lists only the lobby: her direct conversations are allowed all the same.
    let mut ann1 = p.connect(0, "ann", Some(&["lobby"])).await;
    let mut ann2 = p.connect(1, "ann", Some(&["lobby"])).await;
    let mut bob = p.connect(1, "bob", None).await;
    let mut carol = p.connect(0, "carol", None).await;

    let r = ask(
        &mut ann1,
        json!({"type": "send", "room": "lobby", "to": "bob", "body": "x", "client_id": "both"}),
    )
    .await;
    assert_error(&r, &["bad_request"], "a send with both room and to");

    // Ann (instance 1) to bob (instance 2), nobody joined anything.
    let ack = ask(
        &mut ann1,
        json!({"type": "send", "to": "bob", "body": "hi bob", "client_id": "dm1"}),
    )
    .await;
    assert_eq!(ack["type"], "ack", "ann's direct message: {ack}");
    let room = ack["room"].as_str().unwrap_or_default().to_owned();
    assert!(
        is_direct_room(&room),
        "the ack carries dm.<hex>.<hex>: {ack}"
    );
    let (id1, cursor1) = (ack["id"].clone(), ack["cursor"].clone());
    assert!(id1.is_string(), "ack id: {ack}");
    assert!(
        cursor1.is_string(),
        "a cursor (the broker keeps history): {ack}"
    );
    // Bob, and both of ann's connections (the one that sent and the one on instance 2).
    for c in [&mut bob, &mut ann1, &mut ann2] {
        let m = c
            .expect("ann's direct message", WAIT, |f| is_message(f, &id1))
            .await;
        for (field, want) in [
            ("room", json!(room)),
            ("from", json!("ann")),
            ("to", json!("bob")),
            ("body", json!("hi bob")),
            ("cursor", cursor1.clone()),
        ] {
            assert_eq!(m[field], want, "{}: {field} of {m}", c.label());
        }
        assert!(m["ts"].is_u64(), "{}: ts of {m}", c.label());
    }

    // Bob answers: the same conversation.
    let ack2 = ask(
        &mut bob,
        json!({"type": "send", "to": "ann", "body": "hi ann", "client_id": "dm2"}),
    )
    .await;
    assert_eq!(ack2["type"], "ack", "bob's answer: {ack2}");
    assert_eq!(
        ack2["room"],
        room.as_str(),
        "the same room both ways: {ack2}"
    );
    let id2 = ack2["id"].clone();
    for c in [&mut ann1, &mut ann2, &mut bob] {
        let m = c
            .expect("bob's answer", WAIT, |f| is_message(f, &id2))
            .await;
        assert!(
            m["from"] == "bob" && m["to"] == "ann" && m["room"] == room.as_str(),
            "{}: {m}",
            c.label()
        );
    }

    // A third party can do nothing with the conversation.
    for (what, frame) in [
        (
            "join",
            json!({"type": "join", "room": room, "client_id": "c-join"}),
        ),
        (
            "history",
            json!({"type": "history", "room": room, "client_id": "c-hist"}),
        ),
        (
            "send",
            json!({"type": "send", "room": room, "body": "intruder", "client_id": "c-send"}),
        ),
        (
            "typing",
            json!({"type": "typing", "room": room, "client_id": "c-typing"}),
        ),
    ] {
        let r = ask(&mut carol, frame).await;
        assert_error(&r, &["forbidden"], &format!("carol's {what} in {room}"));
    }
    carol
        .expect_none("anything of ann and bob's conversation", QUIET, |f| {
            f["type"] != "error" && f["room"] == room.as_str()
        })
        .await;

    // Bob reads the conversation's history...
    bob.clear();
    let h = ask(
        &mut bob,
        json!({"type": "history", "room": room, "client_id": "bob-hist"}),
    )
    .await;
    assert_eq!(h["type"], "history", "bob's history of {room}: {h}");
    let ids: Vec<&Value> = h["messages"]
        .as_array()
        .map(|m| m.iter().map(|m| &m["id"]).collect())
        .unwrap_or_default();
    assert_eq!(ids, [&id1, &id2], "both messages, oldest first: {h}");

    // ...and joins it from ann's first message: what came after is replayed, not that one.
    let j = ask(
        &mut bob,
        json!({"type": "join", "room": room, "since": cursor1, "client_id": "bob-join"}),
    )
    .await;
    assert_eq!(j["type"], "joined", "bob joins {room} since {cursor1}: {j}");
    assert_eq!(j["resuming"], true, "{j}");
    bob.expect("his answer, replayed after the cursor", WAIT, |f| {
        is_message(f, &id2)
    })
    .await;
    bob.expect_none("the message at the cursor itself", QUIET, |f| {
        is_message(f, &id1)
    })
    .await;

    // Now that bob's connection is in the room, a new message reaches it once.
    let ack3 = ask(
        &mut ann2,
        json!({"type": "send", "to": "bob", "body": "third", "client_id": "dm3"}),
    )
    .await;
    assert_eq!(ack3["room"], room.as_str(), "{ack3}");
    let id3 = ack3["id"].clone();
    bob.expect("the third message", WAIT, |f| is_message(f, &id3))
        .await;
    ann1.expect("the third message (sender's other connection)", WAIT, |f| {
        is_message(f, &id3)
    })
    .await;
    bob.expect_none("a second copy of the third message", QUIET, |f| {
        is_message(f, &id3)
    })
    .await;

    // A note to oneself is a conversation of its own.
    let note = ask(
        &mut ann1,
        json!({"type": "send", "to": "ann", "body": "note", "client_id": "self"}),
    )
    .await;
    assert_eq!(note["type"], "ack", "a note to oneself: {note}");
    assert!(
        note["room"].as_str().is_some_and(is_direct_room) && note["room"] != room.as_str(),
        "its own dm room: {note}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Watching a user's status.

async fn watch_status(backend: Backend) {
    let mut p = Platform::start(backend, &[]).await;
    let mut carol = p.connect(0, "carol", None).await;

    // More than 100 users at once: refused, nothing watched.
    let many: Vec<String> = (0..101).map(|i| format!("user{i}")).collect();
    let r = ask(
        &mut carol,
        json!({"type": "watch", "users": many, "client_id": "w-many"}),
    )
    .await;
    assert_error(&r, &["forbidden"], "watching 101 users");
    carol
        .expect_none("a status after the refused watch", QUIET, |f| {
            f["type"] == "status"
        })
        .await;

    carol
        .send(json!({"type": "watch", "users": ["ann"], "client_id": "w1"}))
        .await;
    carol
        .expect("ann's current status: offline", WAIT, |f| {
            is_status(f, "ann", false)
        })
        .await;

    // Ann comes online on the other instance.
    let ann_a = p.connect(1, "ann", None).await;
    carol
        .expect("ann online (instance2) within 2 s", STATUS_BOUND, |f| {
            is_status(f, "ann", true)
        })
        .await;

    // A second connection (instance 1), then the first closes: still online.
    let ann_b = p.connect(0, "ann", None).await;
    ann_a.close().await;
    carol
        .expect_none(
            "ann offline while her second connection is open",
            STATUS_BOUND,
            |f| is_status(f, "ann", false),
        )
        .await;
    // The last one closes: offline.
    ann_b.close().await;
    carol
        .expect(
            "ann offline within 2 s of closing her last connection",
            STATUS_BOUND,
            |f| is_status(f, "ann", false),
        )
        .await;

    // Ann on instance 2, which is then SIGKILLed: offline within 3 presence intervals.
    let _ann_c = p.connect(1, "ann", None).await;
    carol
        .expect("ann online again", STATUS_BOUND, |f| {
            is_status(f, "ann", true)
        })
        .await;
    p.servers[1].kill().await;
    let killed = Instant::now();
    let bound = Duration::from_millis(3 * PRESENCE_MS) + Duration::from_secs(2);
    carol
        .expect(
            &format!("ann offline within 3 × {PRESENCE_MS} ms + 2 s of her instance's SIGKILL"),
            bound,
            |f| is_status(f, "ann", false),
        )
        .await;
    println!(
        "{backend:?}: offline {:?} after the instance was killed (bound {bound:?})",
        killed.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The example server's HTTP API.

/// An API request; `key` goes in `Authorization: Bearer`. Returns the status and the JSON
/// body (`Value::Null` when the body is not JSON).
async fn api(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, Value, String) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let Some((code, text)) = http_request(port, method, path, &headers, body.unwrap_or("")).await
    else {
        panic!("{method} {path} on port {port}: no HTTP answer");
    };
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    (code, json, text)
}

async fn http_api(backend: Backend) {
    let p = Platform::start(backend, &[("CHATBUS_API_KEY", API_KEY.to_owned())]).await;
    let key = Some(API_KEY);
    let mut ann = p.connect(0, "ann", None).await;
    let mut bob1 = p.connect(0, "bob", None).await;
    let mut bob2 = p.connect(1, "bob", None).await;
    join(&mut ann, "lobby").await;
    join(&mut bob2, "lobby").await;

    // Publish on instance 1, delivered to the members on both.
    let publish = json!({"room": "lobby", "body": "from the api", "from": "ops"}).to_string();
    let (code, v, text) = api(p.port(0), "POST", "/api/publish", key, Some(&publish)).await;
    assert_eq!(code, 200, "POST /api/publish: {text}");
    assert!(
        v["id"].is_string() && v.get("cursor").is_some(),
        "{{id, cursor}}: {text}"
    );
    for c in [&mut bob2, &mut ann] {
        let m = c
            .expect("the published message", WAIT, |f| is_message(f, &v["id"]))
            .await;
        assert!(
            m["room"] == "lobby" && m["from"] == "ops" && m["body"] == "from the api",
            "{}: {m}",
            c.label()
        );
        assert_eq!(
            m["cursor"],
            v["cursor"],
            "{}: the answer's cursor",
            c.label()
        );
    }

    // A direct message from the server reaches both of bob's connections.
    let send = json!({"to": "bob", "body": "psst", "from": "ops"}).to_string();
    let (code, v, text) = api(p.port(1), "POST", "/api/send", key, Some(&send)).await;
    assert_eq!(code, 200, "POST /api/send: {text}");
    assert!(
        v["room"].as_str().is_some_and(is_direct_room) && v["id"].is_string(),
        "{{room, id, cursor}}: {text}"
    );
    for c in [&mut bob1, &mut bob2] {
        c.expect("the API's direct message", WAIT, |f| {
            is_message(f, &v["id"])
        })
        .await;
    }

    // Presence across instances, asked of either.
    let want: BTreeSet<&str> = ["ann", "bob"].into();
    for instance in 0..2 {
        let deadline = Instant::now() + WAIT;
        loop {
            let (code, v, text) = api(
                p.port(instance),
                "GET",
                "/api/presence?room=lobby",
                key,
                None,
            )
            .await;
            assert_eq!(
                code,
                200,
                "GET /api/presence on instance{}: {text}",
                instance + 1
            );
            let users: BTreeSet<&str> = v["users"]
                .as_array()
                .map(|u| u.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if users == want && v["room"] == "lobby" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "instance{}: presence of lobby should be {want:?} within {WAIT:?}, is {text}",
                instance + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Disconnect bob everywhere: both connections close with 4009, ann stays.
    let (code, v, text) = api(
        p.port(0),
        "POST",
        "/api/disconnect",
        key,
        Some(r#"{"user":"bob"}"#),
    )
    .await;
    assert_eq!(code, 200, "POST /api/disconnect: {text}");
    assert_eq!(v, json!({"disconnected": true}), "{text}");
    for c in [&mut bob1, &mut bob2] {
        let close = c.expect_close(WAIT).await;
        assert_eq!(close, Some(4009), "{}: close code", c.label());
    }
    ann.send(json!({"type": "ping"})).await;
    ann.expect("pong: ann is still connected", WAIT, |f| {
        f["type"] == "pong"
    })
    .await;

    // A missing or wrong key: 401, JSON.
    for (what, key) in [("no key", None), ("a wrong key", Some("not-the-key"))] {
        for (method, path, body) in [
            ("POST", "/api/publish", Some(publish.as_str())),
            ("GET", "/api/presence?room=lobby", None),
        ] {
            let (code, v, text) = api(p.port(0), method, path, key, body).await;
            assert!(
                code == 401 && v["code"] == "unauthorized" && v["error"].is_string(),
                "{method} {path} with {what}: expected 401 {{error, code: unauthorized}}, got {code} {text}"
            );
        }
    }
    // Bad requests: 400, JSON.
    for body in [
        "{not json",
        r#"{"room":"lobby","from":"ops"}"#,
        r#"{"room":"not a room!","body":"x","from":"ops"}"#,
    ] {
        let (code, v, text) = api(p.port(0), "POST", "/api/publish", key, Some(body)).await;
        assert!(
            code == 400 && v["code"] == "bad_request" && v["error"].is_string(),
            "POST /api/publish {body}: expected 400 {{error, code: bad_request}}, got {code} {text}"
        );
    }

    // A server without the key has no API at all.
    let plain = ChatServer::start(&["--broker", "memory"], &[]).await;
    for (method, path, body) in [
        ("POST", "/api/publish", Some(publish.as_str())),
        ("GET", "/api/presence?room=lobby", None),
        ("POST", "/api/disconnect", Some(r#"{"user":"bob"}"#)),
    ] {
        let (code, _, text) = api(plain.port(), method, path, key, body).await;
        assert_eq!(code, 404, "{method} {path} without CHATBUS_API_KEY: {text}");
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_claim_over_redis() {
    rooms_claim(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_claim_over_dual() {
    rooms_claim(Backend::Dual).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_over_redis() {
    direct_messages(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_over_dual() {
    direct_messages(Backend::Dual).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_status_over_redis() {
    watch_status(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_status_over_dual() {
    watch_status(Backend::Dual).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_over_redis() {
    http_api(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_over_dual() {
    http_api(Backend::Dual).await;
}
