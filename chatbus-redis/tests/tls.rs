//! `rediss://`: TLS to a private `redis-server` whose certificate a throwaway CA signed.
#![cfg(feature = "tls")]

mod common;

use std::time::{Duration, Instant};

use chatbus_core::{Broker, Envelope, Health, Interest, Room};
use chatbus_redis::RedisBroker;
use chatbus_testkit::redis::{RedisOptions, RedisServer};

async fn tls_server() -> (RedisServer, String) {
    let server = RedisServer::start_with(RedisOptions::default().with_tls(true)).await;
    let url = server
        .tls_url()
        .unwrap_or_else(|| panic!("the server has no TLS port"));
    (server, url)
}

#[tokio::test]
async fn verified_tls_with_a_private_ca() {
    let (server, url) = tls_server().await;
    let config = common::config(&server, 100)
        .with_url(url)
        .with_tls_ca_file(server.ca_cert());
    let broker = common::connect(config).await;
    assert_eq!(broker.health().await, Health::Healthy);
    let room = Room::new("tls").expect("valid room name");
    let mut sub = match broker.subscribe(Interest::room(room.clone())).await {
        Ok(s) => s,
        Err(e) => panic!("subscribe: {e}"),
    };
    let receipt = match broker.publish(&Envelope::new(room, "over tls")).await {
        Ok(r) => r,
        Err(e) => panic!("publish: {e}"),
    };
    match tokio::time::timeout(Duration::from_secs(10), sub.recv()).await {
        Ok(Some(Ok(env))) => {
            assert_eq!(env.payload, "over tls");
            assert_eq!(env.cursor, receipt.cursor);
        }
        other => panic!("expected the message, got {other:?}"),
    }
}

#[tokio::test]
async fn untrusted_certificate_is_refused_fast() {
    let (server, url) = tls_server().await;
    // The webpki roots do not know the throwaway CA.
    let start = Instant::now();
    match RedisBroker::connect(common::config(&server, 0).with_url(url)).await {
        Ok(_) => panic!("connected to a server with an untrusted certificate"),
        Err(e) => println!("refused as expected: {e}"),
    }
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn insecure_tls_is_refused_with_a_reason() {
    let (server, url) = tls_server().await;
    match RedisBroker::connect(common::config(&server, 0).with_url(format!("{url}#insecure"))).await
    {
        Ok(_) => panic!("connected without checking the certificate"),
        Err(e) => assert!(e.to_string().contains("tls_ca_file"), "{e}"),
    }
}
