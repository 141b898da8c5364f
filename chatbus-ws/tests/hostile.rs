//! Hostile clients (issue #17): sockets that never finish their handshake, control-frame
//! floods, expired tokens, and too many connections from one address.

mod common;

use std::time::{Duration, Instant};

use chatbus_ws::WsConfig;
use common::{Server, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the socket (EOF or reset); `None` if it is still open after
/// `bound`.
async fn closed_within(tcp: &mut TcpStream, bound: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            // A response (e.g. hyper's 408) before the close is fine.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn silent_and_trickling_handshakes_are_closed_at_the_deadline_and_counted() {
    let deadline = Duration::from_millis(500);
    let mut server = Server::start(WsConfig::default().with_handshake_timeout(deadline)).await;

    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let mut trickle = TcpStream::connect(server.addr).await.expect("connect");
    // One header line every 100 ms, forever (bounded by the test): each line resets no timer.
    trickle
        .write_all(b"GET /ws?name=t HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let (mut rd, mut wr) = trickle.split();
    let feed = async {
        for i in 0..100u32 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr
                .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let watch = async {
        let mut buf = [0u8; 1024];
        let start = Instant::now();
        loop {
            match tokio::time::timeout(WAIT, rd.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    };
    let trickled = tokio::select! {
        closed = watch => closed,
        () = feed => None,
    };
    let trickled = trickled.expect("a trickling handshake is closed");
    assert!(trickled < deadline * 4, "closed after {trickled:?}");
    let silent_closed = closed_within(&mut silent, WAIT)
        .await
        .expect("a silent socket is closed");
    assert!(
        silent_closed < deadline * 4,
        "closed after {silent_closed:?}"
    );

    // Both counted, under the documented metric name too.
    let bound = tokio::time::Instant::now() + WAIT;
    while server.ws.metrics().handshake_timeouts < 2 && tokio::time::Instant::now() < bound {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.ws.metrics().handshake_timeouts, 2);
    assert!(server
        .scrape()
        .contains("\nchatbus_handshake_timeouts_total 2\n"));

    // A normal client is not affected by the deadline once upgraded.
    let mut c = server.client("ann").await;
    tokio::time::sleep(deadline * 2).await;
    c.assert_alive().await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_chats_while_3000_silent_sockets_are_open() {
    let mut server = Server::start(WsConfig::default()).await;
    let mut silent = Vec::with_capacity(3000);
    for _ in 0..3000 {
        let tcp = tokio::time::timeout(WAIT, TcpStream::connect(server.addr))
            .await
            .expect("connect in time")
            .expect("connect");
        silent.push(tcp);
    }
    let mut ann = server.client("ann").await;
    let mut bob = server.client("bob").await;
    ann.join("lobby").await;
    bob.join("lobby").await;
    ann.say("lobby", "hello under siege", "c1").await;
    let m = bob.expect("message").await;
    assert_eq!(m["body"], "hello under siege");
    drop(silent);
    server.stop().await;
}
