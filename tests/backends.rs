//! The example server on each backend: two `chat-server` instances over real Redis or Kafka
//! (Tansu), clients on both, every message to every client exactly once, in one order.

use std::time::{Duration, Instant};

use chatbus_testkit::chat::{ChatServer, Participant, Plan, Score};
use chatbus_testkit::redis::RedisServer;
use chatbus_testkit::redis_cluster::RedisCluster;
use chatbus_testkit::tansu::Tansu;

async fn chat_over(servers: &[ChatServer], room: &str) -> Score {
    let ports: Vec<u16> = servers.iter().map(ChatServer::port).collect();
    let mut ps = Vec::new();
    for (i, _) in servers.iter().enumerate() {
        let mut order = ports.clone();
        order.rotate_left(i);
        for role in ["recv", "send"] {
            let plan = Plan {
                ports: order.clone(),
                room: room.to_owned(),
                send: if role == "send" { 50 } else { 0 },
                every: Duration::from_millis(60),
                stall: false,
                pad: 0,
            };
            ps.push(Participant::start(&format!("{role}{i}"), plan).await);
        }
    }
    for p in &ps {
        p.start_sending();
    }
    let expected = 50 * servers.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && ps.iter().any(|p| p.received() < expected) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A moment for late duplicates to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut records = Vec::new();
    for p in ps {
        records.push((p.name.clone(), p.finish().await));
    }
    let score = Score::of(&records);
    assert_eq!(score.acked, expected, "every send acknowledged: {score:#?}");
    score
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_server_over_redis() {
    let redis = RedisServer::start().await;
    let env = [("CHATBUS_REDIS_URL", redis.url())];
    let a = ChatServer::start(&["--broker", "redis"], &env).await;
    let b = ChatServer::start(&["--broker", "redis"], &env).await;
    chat_over(&[a, b], "backend-redis")
        .await
        .assert_perfect("redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_server_over_kafka() {
    let tansu = Tansu::start().await;
    let env = [
        ("CHATBUS_KAFKA_BROKERS", tansu.bootstrap()),
        ("CHATBUS_KAFKA_TOPIC", "backend-kafka".to_owned()),
    ];
    let a = ChatServer::start(&["--broker", "kafka"], &env).await;
    let b = ChatServer::start(&["--broker", "kafka"], &env).await;
    chat_over(&[a, b], "backend-kafka")
        .await
        .assert_perfect("kafka");
}

/// `CHATBUS_REDIS_CLUSTER`: the example server over a Redis Cluster (sharded pub/sub), with
/// `--broker redis` and with `--broker dual` (which turns the cluster broadcast on by itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_server_over_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let tansu = Tansu::start().await;
    let mut env = vec![
        ("CHATBUS_REDIS_CLUSTER", cluster.seeds().join(",")),
        ("REDIS_PASSWORD", cluster.password().to_owned()),
    ];
    let a = ChatServer::start(&["--broker", "redis"], &env).await;
    let b = ChatServer::start(&["--broker", "redis"], &env).await;
    chat_over(&[a, b], "backend-cluster")
        .await
        .assert_perfect("redis cluster");
    env.extend([
        ("CHATBUS_KAFKA_BROKERS", tansu.bootstrap()),
        ("CHATBUS_KAFKA_TOPIC", "backend-cluster".to_owned()),
    ]);
    let a = ChatServer::start(&["--broker", "dual"], &env).await;
    let b = ChatServer::start(&["--broker", "dual"], &env).await;
    let servers = [a, b];
    chat_over(&servers, "backend-cluster-dual")
        .await
        .assert_perfect("dual over a redis cluster");
    // The fast path carried messages: the merger's Interest::All subscription works on the
    // cluster (through the broadcast channel), it did not fall back to Kafka only.
    for server in &servers {
        let metrics = server.metrics().await;
        let via_fast = metrics
            .lines()
            .find_map(|l| l.strip_prefix("chatbus_dual_via_fast_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(via_fast > 0.0, "no message came through Redis:\n{metrics}");
    }
}

/// The value of counter `name` in a server's metrics (0 when absent).
async fn counter(server: &ChatServer, name: &str) -> f64 {
    let metrics = server.metrics().await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// `--dual-interest`: the interest-based DualBus over a real Redis and Tansu.
/// Three instances, clients on all: every message to every client once, in one order, through
/// Redis, and no instance tails the Kafka topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_server_over_the_interest_based_dual_bus() {
    let redis = RedisServer::start().await;
    let tansu = Tansu::start().await;
    let env = [
        ("CHATBUS_REDIS_URL", redis.url()),
        ("CHATBUS_KAFKA_BROKERS", tansu.bootstrap()),
        ("CHATBUS_KAFKA_TOPIC", "backend-interest".to_owned()),
    ];
    let args = ["--broker", "dual", "--dual-interest"];
    let servers = [
        ChatServer::start(&args, &env).await,
        ChatServer::start(&args, &env).await,
        ChatServer::start(&args, &env).await,
    ];
    chat_over(&servers, "backend-interest")
        .await
        .assert_perfect("interest-based dual");
    for server in &servers {
        let via_fast = counter(server, "chatbus_dual_via_fast_total").await;
        let tailed = counter(server, "chatbus_kafka_tail_records_total").await;
        assert!(via_fast > 0.0, "no message came through Redis");
        assert_eq!(
            tailed, 0.0,
            "an interest-based instance read the Kafka tail"
        );
    }
}
