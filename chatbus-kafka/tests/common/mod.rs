//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::Duration;

use chatbus_kafka::{KafkaBroker, KafkaConfig};
use chatbus_testkit::tansu::Tansu;

/// The configuration the tests use against a local Tansu.
pub(crate) fn config(tansu: &Tansu, topic: &str, partitions: u32) -> KafkaConfig {
    KafkaConfig::new(tansu.bootstrap())
        .with_topic(topic)
        .with_partitions(partitions)
        .with_publish_timeout(Duration::from_secs(3))
        .with_request_timeout(Duration::from_secs(10))
        // Tansu holds every fetch for the full wait (see docs/kafka-on-tansu.md), so this is
        // the tail's delivery latency.
        .with_fetch_wait(Duration::from_millis(20))
}

/// Connects a broker, failing the test with the reason.
pub(crate) async fn connect(tansu: &Tansu, topic: &str, partitions: u32) -> KafkaBroker {
    match KafkaBroker::connect(config(tansu, topic, partitions)).await {
        Ok(b) => b,
        Err(e) => panic!(
            "connect to Tansu at {}: {e}\n{}",
            tansu.bootstrap(),
            tansu.log()
        ),
    }
}
