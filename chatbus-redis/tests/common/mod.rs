//! Helpers shared by this crate's integration tests.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use chatbus_redis::{RedisBroker, RedisConfig};
use chatbus_testkit::redis::RedisServer;

/// A config for `server` with short timeouts, so that failures show quickly in tests.
pub fn config(server: &RedisServer, history_len: usize) -> RedisConfig {
    RedisConfig::default()
        .with_url(server.url())
        .with_prefix(format!("test{}", server.port()))
        .with_history_len(history_len)
        .with_connect_timeout(Duration::from_secs(2))
        .with_command_timeout(Duration::from_millis(1500))
        .with_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .with_ping_interval(Duration::from_secs(1))
}

/// A broker on `server`, or a panic saying why not.
pub async fn broker(server: &RedisServer, history_len: usize) -> RedisBroker {
    connect(config(server, history_len)).await
}

/// Connects with `config`, or panics saying why not.
pub async fn connect(config: RedisConfig) -> RedisBroker {
    match RedisBroker::connect(config).await {
        Ok(b) => b,
        Err(e) => panic!("cannot connect to the test redis-server: {e}"),
    }
}

/// A plain client connection to `server`, to look at Redis from the outside.
pub async fn raw(server: &RedisServer) -> chatbus_redis::redis::aio::MultiplexedConnection {
    let client = match chatbus_redis::redis::Client::open(server.url()) {
        Ok(c) => c,
        Err(e) => panic!("bad url: {e}"),
    };
    match client.get_multiplexed_async_connection().await {
        Ok(c) => c,
        Err(e) => panic!("cannot connect: {e}"),
    }
}
