//! The core conformance suite against `DualBus<RedisBroker, KafkaBroker>` over real
//! `redis-server` and Tansu processes.

use chatbus_core::{conformance, DualBus, DualConfig};
use chatbus_kafka::{KafkaBroker, KafkaConfig};
use chatbus_redis::{RedisBroker, RedisConfig};
use chatbus_testkit::redis::RedisServer;
use chatbus_testkit::tansu::Tansu;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_bus_over_redis_and_kafka_passes_conformance() {
    conformance_of(DualConfig::default(), "dual-conformance").await;
}

/// The interest-based DualBus (room tickets, leases), the same suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interest_based_dual_bus_over_redis_and_kafka_passes_conformance() {
    conformance_of(
        DualConfig::default().with_interest(true),
        "dual-interest-conformance",
    )
    .await;
}

async fn conformance_of(config: DualConfig, topic: &str) {
    let redis = RedisServer::start().await;
    let tansu = Tansu::start().await;
    let fast = RedisBroker::connect(RedisConfig::default().with_url(redis.url()))
        .await
        .expect("redis");
    let durable = KafkaBroker::connect(
        KafkaConfig::new(tansu.bootstrap())
            .with_topic(topic)
            .with_partitions(3),
    )
    .await
    .expect("kafka");
    let bus = DualBus::new(fast, durable, config);
    conformance::run_all(&bus).await;
}
