//! The core conformance suite against `RedisBroker`, with and without the history window.

mod common;

use chatbus_core::Broker;
use chatbus_testkit::redis::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_without_history() {
    let server = RedisServer::start().await;
    let broker = common::broker(&server, 0).await;
    assert!(!broker.capabilities().replay);
    chatbus_core::conformance::run_all(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_history() {
    let server = RedisServer::start().await;
    let broker = common::broker(&server, 1000).await;
    assert!(broker.capabilities().replay);
    chatbus_core::conformance::run_all(&broker).await;
}
