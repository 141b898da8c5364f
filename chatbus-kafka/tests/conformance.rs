//! The core conformance suite against KafkaBroker on a real Tansu.

mod common;

use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_passes_conformance_on_tansu() {
    let tansu = chatbus_testkit::tansu::Tansu::start().await;
    let broker = common::connect(&tansu, "conformance", 4).await;
    let started = Instant::now();
    chatbus_core::conformance::run_all(&broker).await;
    eprintln!("conformance suite passed in {:?}", started.elapsed());
    // The suite publishes ephemeral and durable messages to many rooms: nothing may have been
    // dropped as undecodable or skipped.
    let stats = broker.stats();
    assert_eq!(
        (stats.malformed, stats.gaps, stats.publish_errors),
        (0, 0, 0),
        "{stats:?}"
    );
}
