//! Idempotent sends over real processes (issue #11 item 2): two `chat-server --broker dual`
//! instances over redis-server and Tansu, with Redis down, so the only place the instances
//! share is the Kafka log. A client whose instance is killed right after a send retries it on
//! the other instance with the same `key`; every receiver gets each message exactly once, and
//! the retry of a message that was stored gets the original's `id` and `cursor`.
//!
//! The second scenario resets a client's own link (through the testkit's fault proxy) right
//! after each send, so its `ack` is lost, and the client retries on a new connection.
//!
//! Run with `cargo build --all-features --example chat-server && cargo test --all-features
//! --test idempotency`. Needs `redis-server` and `tansu` (see chatbus-testkit).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chatbus_testkit::chat::ChatServer;
use chatbus_testkit::client::WsClient;
use chatbus_testkit::proxy::{FaultProxy, Mode};
use chatbus_testkit::redis::RedisServer;
use chatbus_testkit::tansu::Tansu;
use serde_json::{json, Value};

const ROOM: &str = "retries";

fn send(i: u32, retry: bool) -> Value {
    json!({
        "type": "send", "room": ROOM, "body": format!("m{i}"),
        "key": format!("k{i}"), "retry": retry, "client_id": format!("c{i}-{retry}"),
    })
}

async fn ack(c: &mut WsClient, i: u32, retry: bool) -> Value {
    let cid = format!("c{i}-{retry}");
    c.next_where("ack", |f| {
        f["client_id"] == cid.as_str() && (f["type"] == "ack" || f["type"] == "error")
    })
    .await
}

async fn joined(port: u16, name: &str) -> WsClient {
    let mut c = WsClient::connect_as(port, &format!("/ws?name={name}"), name)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    c.join(ROOM)
        .await
        .unwrap_or_else(|e| panic!("{name}: join: {e}"));
    c
}

/// How many times each body reached `c` (waiting until `want` distinct bodies arrived, at most
/// 20 s, then a little longer for late duplicates).
async fn tally(c: &mut WsClient, want: usize) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let count = |c: &WsClient| {
        let mut m = BTreeMap::new();
        for f in c.seen().iter().filter(|f| f["type"] == "message") {
            *m.entry(f["body"].as_str().unwrap_or("").to_owned())
                .or_insert(0) += 1;
        }
        m
    };
    while count(c).len() < want && Instant::now() < deadline {
        let _ = c
            .wait_for(Duration::from_millis(200), |f| f["type"] == "never")
            .await;
    }
    let _ = c
        .wait_for(Duration::from_secs(1), |f| f["type"] == "never")
        .await;
    count(c)
}

#[tokio::test]
async fn a_retry_after_the_instance_died_is_one_message_with_redis_down() {
    let mut redis = RedisServer::start().await;
    let tansu = Tansu::start().await;
    let env = [
        ("CHATBUS_REDIS_URL", redis.url()),
        ("CHATBUS_KAFKA_BROKERS", tansu.bootstrap()),
        (
            "CHATBUS_KAFKA_TOPIC",
            format!("idempotency-{}", std::process::id()),
        ),
    ];
    let mut a = ChatServer::start(&["--broker", "dual"], &env).await;
    let b = ChatServer::start(&["--broker", "dual"], &env).await;
    // The fast path is gone: the instances meet only in Kafka.
    redis.kill();

    let on_a = joined(a.port(), "watcher-a").await;
    let mut on_b = joined(b.port(), "watcher-b").await;
    let mut alice = joined(a.port(), "alice").await;
    let mut acked = BTreeMap::new();
    for i in 0..10 {
        alice.send(send(i, false)).await;
        let a = ack(&mut alice, i, false).await;
        assert_eq!(a["type"], "ack", "{a}");
        acked.insert(i, a);
    }
    // The eleventh goes out, and the instance dies before the client reads an answer.
    alice.send(send(10, false)).await;
    a.kill().await;
    drop(alice);
    drop(on_a);

    let mut alice = joined(b.port(), "alice").await;
    // Message 9's ack "was lost" too: its retry must be answered with the original.
    for i in [9, 10] {
        alice.send(send(i, true)).await;
        let r = ack(&mut alice, i, true).await;
        assert_eq!(r["type"], "ack", "retry of m{i}: {r}");
        if let Some(first) = acked.get(&i) {
            assert_eq!(r["duplicate"], true, "{r}");
            assert_eq!(r["id"], first["id"]);
            assert_eq!(r["cursor"], first["cursor"]);
        }
    }
    let got = tally(&mut on_b, 11).await;
    let expected: BTreeMap<String, usize> = (0..=10).map(|i| (format!("m{i}"), 1)).collect();
    assert_eq!(
        got, expected,
        "each message exactly once on the other instance"
    );
    let metrics = b.metrics().await;
    let duplicates: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("chatbus_send_key_duplicates_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(duplicates >= 1, "the retry of m9 is a duplicate: {metrics}");
}

#[tokio::test]
async fn a_client_link_reset_mid_send_and_retried_with_its_key_is_one_message() {
    let redis = RedisServer::start().await;
    let tansu = Tansu::start().await;
    let env = [
        ("CHATBUS_REDIS_URL", redis.url()),
        ("CHATBUS_KAFKA_BROKERS", tansu.bootstrap()),
        (
            "CHATBUS_KAFKA_TOPIC",
            format!("idempotency-link-{}", std::process::id()),
        ),
    ];
    let server = ChatServer::start(&["--broker", "dual"], &env).await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], server.port()).into()).await;
    let mut watcher = joined(server.port(), "watcher").await;
    const SENDS: u32 = 10;
    let (mut stored_first, mut sent_again) = (0, 0);
    for i in 0..SENDS {
        let mut alice = joined(proxy.port(), "alice").await;
        alice.send(send(i, false)).await;
        if i % 2 == 1 {
            // Stored and fanned out, its ack on the way: the client never reads it.
            let body = format!("m{i}");
            watcher
                .expect("the original", Duration::from_secs(10), |f| {
                    f["type"] == "message" && f["body"] == body.as_str()
                })
                .await;
        }
        // Otherwise the link dies before the send is even through.
        proxy.set(Mode::Reset);
        drop(alice);
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy.set(Mode::Pass);
        let mut alice = joined(proxy.port(), "alice").await;
        alice.send(send(i, true)).await;
        let r = ack(&mut alice, i, true).await;
        assert_eq!(r["type"], "ack", "retry of m{i}: {r}");
        if r["duplicate"] == true {
            stored_first += 1;
        } else {
            sent_again += 1;
        }
    }
    let got = tally(&mut watcher, SENDS as usize).await;
    let expected: BTreeMap<String, usize> = (0..SENDS).map(|i| (format!("m{i}"), 1)).collect();
    println!(
        "link reset mid-send: {SENDS} sends, {stored_first} were stored before the reset (retry answered \
         with the original), {sent_again} were not (retry published them); resets {}",
        proxy.stats().reset
    );
    assert_eq!(got, expected, "each message exactly once");
    assert!(
        stored_first >= SENDS / 2,
        "the originals seen stored must be answered as duplicates"
    );
}
