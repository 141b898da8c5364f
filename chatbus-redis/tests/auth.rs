//! Connecting with bad credentials or to nothing fails fast with a clear error.

mod common;

use std::time::{Duration, Instant};

use chatbus_redis::RedisBroker;
use chatbus_testkit::redis::RedisServer;

#[tokio::test]
async fn wrong_password_fails_fast_naming_authentication() {
    let server = RedisServer::start().await;
    for url in [
        server.url_with_password("not-the-password"),
        server.url_without_password(),
    ] {
        let config = common::config(&server, 0).with_url(url.clone());
        let start = Instant::now();
        let result = RedisBroker::connect(config).await;
        let took = start.elapsed();
        let Err(err) = result else {
            panic!("{url}: connected with bad credentials")
        };
        let msg = err.to_string();
        println!("{url}: {msg} (after {took:?})");
        assert!(took < Duration::from_secs(2), "{url}: took {took:?}");
        assert!(
            msg.contains("authentication"),
            "{url}: message does not name the problem: {msg}"
        );
        assert!(
            !msg.contains("not-the-password"),
            "the message leaks the password: {msg}"
        );
    }
}

#[tokio::test]
async fn unreachable_server_fails_fast() {
    let port = chatbus_testkit::free_port();
    let config = chatbus_redis::RedisConfig::default()
        .with_url(format!("redis://127.0.0.1:{port}/"))
        .with_connect_timeout(Duration::from_secs(1));
    let start = Instant::now();
    match RedisBroker::connect(config).await {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => {
            println!("{e}");
            assert!(e.is_transient(), "expected Unavailable/Timeout, got {e:?}");
        }
    }
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn password_from_config_field_works() {
    let server = RedisServer::start().await;
    let config = common::config(&server, 0)
        .with_url(server.url_without_password())
        .with_password(server.password());
    let broker = common::connect(config).await;
    assert_eq!(
        chatbus_core::Broker::health(&broker).await,
        chatbus_core::Health::Healthy
    );
}
