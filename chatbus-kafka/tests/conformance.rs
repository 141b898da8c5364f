//! The core conformance suite against KafkaBroker on a real Tansu.

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_passes_conformance_on_tansu() {
    let tansu = chatbus_testkit::tansu::Tansu::start().await;
    let broker = common::connect(&tansu, "conformance", 4).await;
    let started = std::time::Instant::now();
    for (name, check) in chatbus_core::conformance::checks(&broker) {
        let t = std::time::Instant::now();
        let r = check.await;
        eprintln!("{name}: {:?} in {:?}", r, t.elapsed());
    }
    eprintln!("all checks in {:?}", started.elapsed());
    chatbus_core::conformance::run_all(&broker).await;
}
