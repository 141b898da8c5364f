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

#[cfg(feature = "jwt")]
mod tokens {
    use super::*;
    use chatbus_ws::JwtVerifier;
    use common::{Client, Event};
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use serde_json::{json, Value};

    const SECRET: &[u8] = b"test-secret-that-is-long-enough-for-hs256";

    fn now() -> u64 {
        chatbus_core::backend::now_ms() / 1000
    }

    fn token(sub: &str, exp: u64) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": sub, "exp": exp}),
            &EncodingKey::from_secret(SECRET),
        )
        .expect("encode")
    }

    async fn server() -> Server {
        // No leeway, so that the connection ends at `exp` itself.
        Server::start(WsConfig::default().with_verifier(JwtVerifier::hs256(SECRET).with_leeway(0)))
            .await
    }

    /// Waits for the close, returning its code and whether an `unauthorized` error came first.
    async fn close_after_error(c: &mut Client, bound: Duration) -> (u16, bool) {
        let deadline = tokio::time::Instant::now() + bound;
        let mut saw_error = false;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match c.recv_within(left).await {
                Some(Event::Frame(v)) => {
                    saw_error |= v["type"] == "error" && v["code"] == "unauthorized";
                }
                Some(Event::Close(Some(f))) => return (u16::from(f.code), saw_error),
                other => panic!("expected a close, got {other:?}"),
            }
        }
    }

    async fn refresh(c: &mut Client, token: &str, cid: &str) -> Value {
        c.send(json!({"type": "refresh", "token": token, "client_id": cid}))
            .await;
        let v = c.next_non_presence().await;
        assert_eq!(v["client_id"], cid, "{v}");
        v
    }

    #[tokio::test]
    async fn an_expiring_token_is_closed_with_4003_at_expiry() {
        let mut server = server().await;
        let exp = now() + 3;
        let mut c = Client::connect(&server.url(&format!("?token={}", token("ann", exp)))).await;
        c.assert_alive().await;
        let (code, saw_error) = close_after_error(&mut c, Duration::from_secs(3) + WAIT).await;
        assert_eq!(code, 4003);
        assert!(saw_error, "an unauthorized error explains the close");
        // Not before `exp` (second resolution: the close comes at or after it).
        assert!(now() >= exp, "closed before the token expired");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_refreshed_token_stays_open_and_a_bad_refresh_changes_nothing() {
        let mut server = server().await;
        let exp = now() + 3;
        let url = server.url(&format!("?token={}", token("ann", exp)));
        let mut good = Client::connect(&url).await;
        let mut bad = Client::connect(&url).await;

        // Refused refreshes: another user, a bad signature, garbage. Each is an error.
        let other = refresh(&mut bad, &token("bob", now() + 600), "r1").await;
        assert_eq!(
            (other["type"].as_str(), other["code"].as_str()),
            (Some("error"), Some("unauthorized")),
            "{other}"
        );
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "ann", "exp": now() + 600}),
            &EncodingKey::from_secret(b"not the secret"),
        )
        .expect("encode");
        let forged = refresh(&mut bad, &forged, "r2").await;
        assert_eq!(forged["code"], "unauthorized", "{forged}");
        let garbage = refresh(&mut bad, "not-a-jwt", "r3").await;
        assert_eq!(garbage["code"], "unauthorized", "{garbage}");

        // The accepted refresh: same user, later expiry.
        let new_exp = now() + 600;
        let ok = refresh(&mut good, &token("ann", new_exp), "r4").await;
        assert_eq!(ok["type"], "refreshed", "{ok}");
        assert_eq!(ok["expires"], new_exp * 1000);

        // The bad one still ends at the first expiry; the good one outlives it.
        let (code, _) = close_after_error(&mut bad, Duration::from_secs(3) + WAIT).await;
        assert_eq!(code, 4003);
        while now() <= exp + 1 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        good.assert_alive().await;
        server.stop().await;
    }
}

mod per_address {
    use super::*;
    use chatbus_ws::{IpLimits, RateLimit};
    use common::Client;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    /// Opens a WebSocket from the local address `from` (127.0.0.1 or 127.0.0.2), optionally
    /// with an `X-Forwarded-For`; `Err((status, body))` when refused.
    async fn connect_from(
        server: &Server,
        from: &str,
        xff: Option<&str>,
    ) -> Result<Client, (u16, String)> {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(format!("{from}:0").parse().expect("address"))
            .expect("bind the client address");
        let tcp = tokio::time::timeout(WAIT, socket.connect(server.addr))
            .await
            .expect("connect in time")
            .expect("connect");
        let mut req = server
            .url("?name=x")
            .into_client_request()
            .expect("request");
        if let Some(xff) = xff {
            req.headers_mut()
                .insert("x-forwarded-for", xff.parse().expect("header"));
        }
        Client::try_connect_on(req, tcp).await
    }

    fn assert_429(refused: Result<Client, (u16, String)>) {
        let Err((status, body)) = refused else {
            panic!("accepted; expected a 429");
        };
        assert_eq!(status, 429, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
        assert_eq!(body["type"], "error");
        assert_eq!(body["code"], "rate_limited");
    }

    #[tokio::test]
    async fn connections_per_address_are_capped_with_429() {
        let limits = IpLimits::default().with_max_connections(Some(2));
        let mut server = Server::start(WsConfig::default().with_ip_limits(limits)).await;
        let a1 = connect_from(&server, "127.0.0.1", None)
            .await
            .expect("first");
        let _a2 = connect_from(&server, "127.0.0.1", None)
            .await
            .expect("second");
        assert_429(connect_from(&server, "127.0.0.1", None).await);
        // Another address is not affected.
        let _b = connect_from(&server, "127.0.0.2", None)
            .await
            .expect("another address");
        assert_eq!(
            server
                .ws
                .metrics()
                .errors(chatbus_ws::ErrorCode::RateLimited),
            1
        );

        // A closed connection gives its place back (once its session has ended).
        drop(a1);
        let mut again = None;
        for _ in 0..50 {
            match connect_from(&server, "127.0.0.1", None).await {
                Ok(ws) => {
                    again = Some(ws);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert!(again.is_some(), "the slot is given back");
        server.stop().await;
    }

    #[tokio::test]
    async fn attempts_per_address_are_rate_limited_with_429() {
        let limits = IpLimits::default().with_attempts(Some(RateLimit::new(3, 0.01)));
        let mut server = Server::start(WsConfig::default().with_ip_limits(limits)).await;
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(
                connect_from(&server, "127.0.0.1", None)
                    .await
                    .expect("within the burst"),
            );
        }
        assert_429(connect_from(&server, "127.0.0.1", None).await);
        let _b = connect_from(&server, "127.0.0.2", None)
            .await
            .expect("another address");
        server.stop().await;
    }

    #[tokio::test]
    async fn forwarded_for_counts_only_from_a_trusted_proxy() {
        let proxy = "127.0.0.1".parse().expect("address");
        let limits = IpLimits::default()
            .with_max_connections(Some(1))
            .with_trusted_proxies(vec![proxy]);
        let mut server = Server::start(WsConfig::default().with_ip_limits(limits)).await;
        // Through the trusted proxy: one per forwarded client.
        let _c1 = connect_from(&server, "127.0.0.1", Some("203.0.113.1"))
            .await
            .expect("c1");
        assert_429(connect_from(&server, "127.0.0.1", Some("203.0.113.1")).await);
        let _c2 = connect_from(&server, "127.0.0.1", Some("203.0.113.2"))
            .await
            .expect("c2");
        // Not a trusted proxy: its header is ignored and its own address counts.
        let _d = connect_from(&server, "127.0.0.2", Some("203.0.113.1"))
            .await
            .expect("d");
        assert_429(connect_from(&server, "127.0.0.2", Some("203.0.113.9")).await);
        server.stop().await;
    }
}

/// The instance-wide cap (`WsConfig::max_connections`), issue #11.
mod per_instance {
    use super::*;
    use common::Client;
    use serde_json::Value;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    /// 40 handshakes race for 10 slots: exactly 10 get in (the slot is reserved atomically at
    /// the handshake, so concurrent ones cannot overshoot), the 30 others get a 503 with the
    /// JSON `unavailable` error, each counted once; the slots come back when the sessions end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_max_connections_are_refused_with_503_exactly() {
        const MAX: usize = 10;
        const TRIES: usize = 40;
        let mut server = Server::start(WsConfig::default().with_max_connections(MAX)).await;
        let url = server.url("?name=x");
        let tries = (0..TRIES).map(|_| {
            let req = url.clone().into_client_request().expect("request");
            tokio::spawn(Client::try_connect(req))
        });
        let mut open = Vec::new();
        let mut refused = 0;
        for result in futures::future::join_all(tries).await {
            match result.expect("client task") {
                Ok(c) => open.push(c),
                Err((status, body)) => {
                    assert_eq!(status, 503, "{body}");
                    let body: Value = serde_json::from_str(&body).expect("a JSON body");
                    assert_eq!(body["type"], "error");
                    assert_eq!(body["code"], "unavailable");
                    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
                    refused += 1;
                }
            }
        }
        assert_eq!(open.len(), MAX, "exactly max_connections accepted");
        assert_eq!(refused, TRIES - MAX);
        let m = server.ws.metrics();
        assert_eq!(m.connections_refused, (TRIES - MAX) as u64);
        assert_eq!(
            m.errors(chatbus_ws::ErrorCode::Unavailable),
            (TRIES - MAX) as u64
        );
        let text = server.scrape();
        assert!(
            text.contains(&format!(
                "\nchatbus_connections_refused_total {}\n",
                TRIES - MAX
            )),
            "{text}"
        );

        // Closed sessions give their slots back: MAX new clients get in again.
        drop(open);
        let deadline = Instant::now() + WAIT;
        let mut again = Vec::new();
        while again.len() < MAX {
            let req = url.clone().into_client_request().expect("request");
            match Client::try_connect(req).await {
                Ok(c) => again.push(c),
                Err((503, _)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err((status, body)) => panic!("slots not given back: {status} {body}"),
            }
        }
        drop(again);
        server.stop().await;
    }
}
