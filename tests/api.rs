//! The chat-server's server API (`/api/*`, docs/api.md) as a real process: off without a key,
//! 401 without the right one, 400 for bad input, publish / send / disconnect / presence reaching
//! real WebSocket clients, presence across two instances with `--presence-interval-ms`, and 503
//! while the broker is down.
//!
//! Run with `cargo build --example chat-server && cargo test --test api` (`cargo test` alone
//! builds the example too). Needs `redis-server` on PATH for the two-instance tests.

use std::time::{Duration, Instant};

use chatbus_testkit::chat::{http_request, ChatServer};
use chatbus_testkit::client::WsClient;
use chatbus_testkit::redis::RedisServer;
use serde_json::{json, Value};

const KEY: &str = "test-key-0123456789abcdef";

async fn with_key(args: &[&str], env: &[(&str, String)]) -> ChatServer {
    let mut env = env.to_vec();
    env.push(("CHATBUS_API_KEY", KEY.to_owned()));
    ChatServer::start(args, &env).await
}

/// A call with the right key: (status, JSON body).
async fn call(port: u16, method: &str, path: &str, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {KEY}");
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (status, text) = http_request(port, method, path, &[("Authorization", &auth)], &body)
        .await
        .unwrap_or_else(|| panic!("{method} {path} answered"));
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, value)
}

async fn client(port: u16, user: &str) -> WsClient {
    WsClient::connect(port, &format!("/ws?name={user}"))
        .await
        .unwrap_or_else(|r| panic!("{user} refused: {} {}", r.status, r.body))
}

/// Polls `/api/presence` until `check` holds for the user list, or panics after `within`.
async fn presence_until(port: u16, room: &str, within: Duration, check: impl Fn(&[Value]) -> bool) {
    let start = Instant::now();
    loop {
        let (status, body) = call(
            port,
            "GET",
            &format!("/api/presence?room={room}"),
            Value::Null,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["room"], room);
        let users = body["users"].as_array().cloned().unwrap_or_default();
        if check(&users) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "presence of {room} still {users:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn without_a_key_the_api_does_not_exist() {
    let server = ChatServer::start(&[], &[]).await;
    for (method, path) in [
        ("POST", "/api/publish"),
        ("GET", "/api/presence?room=lobby"),
    ] {
        let auth = format!("Bearer {KEY}");
        let (status, _) = http_request(
            server.port(),
            method,
            path,
            &[("Authorization", &auth)],
            "{}",
        )
        .await
        .expect("answered");
        assert_eq!(status, 404, "{method} {path}");
    }
}

#[tokio::test]
async fn the_key_is_required_and_input_is_checked() {
    let server = with_key(&[], &[]).await;
    let port = server.port();
    let publish = json!({"room": "lobby", "from": "bot", "body": "hi"}).to_string();
    let wrong = format!("Bearer {KEY}x");
    let basic = format!("Basic {KEY}");
    for headers in [
        vec![],
        vec![("Authorization", wrong.as_str())],
        vec![("Authorization", basic.as_str())],
    ] {
        let (status, body) = http_request(port, "POST", "/api/publish", &headers, &publish)
            .await
            .expect("answered");
        assert_eq!(status, 401, "{headers:?}: {body}");
        let body: Value = serde_json::from_str(&body).expect("JSON error");
        assert_eq!(body["code"], "unauthorized");
        assert!(body["error"].is_string());
    }

    let bad = [
        ("POST", "/api/publish", "not json".to_owned()),
        (
            "POST",
            "/api/publish",
            json!({"room": "lobby", "body": "hi"}).to_string(),
        ),
        (
            "POST",
            "/api/publish",
            json!({"room": "no spaces", "from": "bot", "body": "hi"}).to_string(),
        ),
        (
            "POST",
            "/api/send",
            json!({"to": "ann", "from": "bot"}).to_string(),
        ),
        ("POST", "/api/disconnect", json!({"user": 7}).to_string()),
        ("GET", "/api/presence", String::new()),
    ];
    let auth = format!("Bearer {KEY}");
    for (method, path, body) in bad {
        let (status, text) = http_request(port, method, path, &[("Authorization", &auth)], &body)
            .await
            .expect("answered");
        assert_eq!(status, 400, "{method} {path} {body}: {text}");
        let error: Value = serde_json::from_str(&text).expect("JSON error");
        assert_eq!(error["code"], "bad_request", "{text}");
    }
}

#[tokio::test]
async fn publish_send_presence_and_disconnect_reach_clients() {
    let server = with_key(&[], &[]).await;
    let port = server.port();
    let mut ann = client(port, "ann").await;
    ann.join("lobby").await.expect("ann joins");

    let (status, receipt) = call(
        port,
        "POST",
        "/api/publish",
        json!({"room": "lobby", "from": "bot", "body": "hello"}),
    )
    .await;
    assert_eq!(status, 200, "{receipt}");
    let got = ann.next_of("message").await;
    assert_eq!(
        (&got["from"], &got["body"]),
        (&json!("bot"), &json!("hello"))
    );
    assert_eq!(got["id"], receipt["id"]);
    assert_eq!(
        got["cursor"], receipt["cursor"],
        "the memory broker keeps history"
    );

    presence_until(port, "lobby", Duration::from_secs(5), |users| {
        users == [json!("ann")]
    })
    .await;

    let (status, sent) = call(
        port,
        "POST",
        "/api/send",
        json!({"from": "bot", "to": "ann", "body": "psst"}),
    )
    .await;
    assert_eq!(status, 200, "{sent}");
    assert!(
        sent["room"].as_str().is_some_and(|r| r.starts_with("dm.")),
        "{sent}"
    );
    let dm = ann
        .next_where("the direct message", |f| {
            f["type"] == "message" && f["body"] == "psst"
        })
        .await;
    assert_eq!(
        (&dm["room"], &dm["id"], &dm["to"]),
        (&sent["room"], &sent["id"], &json!("ann"))
    );

    let mut ann_again = client(port, "ann").await;
    let (status, body) = call(port, "POST", "/api/disconnect", json!({"user": "ann"})).await;
    assert_eq!((status, body), (200, json!({"disconnected": true})));
    assert_eq!(ann.close_code().await, Some(4009));
    assert_eq!(
        ann_again.close_code().await,
        Some(4009),
        "every connection of the user"
    );
    presence_until(port, "lobby", Duration::from_secs(5), <[Value]>::is_empty).await;
}

#[tokio::test]
async fn presence_spans_instances_and_a_killed_one_goes_offline_in_three_intervals() {
    let redis = RedisServer::start().await;
    let env = [("CHATBUS_REDIS_URL", redis.url())];
    let args = ["--broker", "redis", "--presence-interval-ms", "300"];
    let mut a = with_key(&args, &env).await;
    let b = with_key(&args, &env).await;
    let room = format!("api-presence-{}", std::process::id());

    // Asked about a room it has no member in, an instance asks the others: ann on a, asked b.
    let mut ann = client(a.port(), "ann").await;
    ann.join(&room).await.expect("ann joins on a");
    presence_until(b.port(), &room, Duration::from_secs(5), |users| {
        users == [json!("ann")]
    })
    .await;
    let mut bob = client(b.port(), "bob").await;
    bob.join(&room).await.expect("bob joins on b");
    let both = [json!("ann"), json!("bob")];
    presence_until(b.port(), &room, Duration::from_secs(5), |users| {
        users == both
    })
    .await;

    // A killed instance sends no goodbye: the others forget it after 3 missed heartbeats
    // (900 ms here); 3 s leaves room for a loaded machine.
    a.kill().await;
    let killed = Instant::now();
    presence_until(b.port(), &room, Duration::from_secs(3), |users| {
        users == [json!("bob")]
    })
    .await;
    assert!(
        killed.elapsed() >= Duration::from_millis(600),
        "forgotten by timeout, not by a goodbye"
    );
}

#[tokio::test]
async fn publish_answers_503_while_the_broker_is_down() {
    let mut redis = RedisServer::start().await;
    let server = with_key(
        &["--broker", "redis"],
        &[("CHATBUS_REDIS_URL", redis.url())],
    )
    .await;
    redis.kill();
    let (status, body) = call(
        server.port(),
        "POST",
        "/api/publish",
        json!({"room": "lobby", "from": "bot", "body": "hi"}),
    )
    .await;
    assert_eq!(
        (status, &body["code"]),
        (503, &json!("unavailable")),
        "{body}"
    );
}
