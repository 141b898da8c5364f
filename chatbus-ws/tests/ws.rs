//! Protocol v1 over a real WebSocket on 127.0.0.1:0.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chatbus_core::MemoryBroker;
use chatbus_ws::{ChatHub, ErrorCode, PresenceConfig, RateLimit, WsConfig};
use common::{Client, Server};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

const SHORT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn two_clients_exchange_messages_with_acks() {
    let mut server = Server::start(WsConfig::default()).await;
    let mut ann = server.client("ann").await;
    let mut bob = server.client("bob").await;
    assert_eq!(ann.user(), "ann");
    ann.join("lobby").await;
    bob.join("lobby").await;

    let (ack, echo) = ann.say("lobby", "hello bob", "c-1").await;
    assert!(
        ack["cursor"].is_string(),
        "memory broker assigns cursors: {ack}"
    );
    let got = bob.expect("message").await;
    assert_eq!(got, echo, "every member gets the same frame");
    assert_eq!(got["from"], "ann");
    assert_eq!(got["room"], "lobby");
    assert!(got["ts"].as_u64().is_some_and(|t| t > 1_600_000_000_000));

    let (_, reply) = bob.say("lobby", "hi ann", "b-1").await;
    assert_eq!(ann.expect("message").await, reply);
    assert_eq!(reply["from"], "bob");

    // `from` is the session's identity whatever the client claims.
    ann.send(json!({"type":"send","room":"lobby","body":"spoof","from":"bob","client_id":"c-2"}))
        .await;
    let spoof = bob.expect("message").await;
    assert_eq!(spoof["from"], "ann");
    server.stop().await;
}

#[tokio::test]
async fn rooms_are_isolated() {
    let mut server = Server::start(WsConfig::default()).await;
    let mut ann = server.client("ann").await;
    let mut bob = server.client("bob").await;
    ann.join("red").await;
    bob.join("blue").await;
    ann.say("red", "only red", "1").await;
    assert!(
        bob.quiet(SHORT).await.is_empty(),
        "blue member saw red traffic"
    );

    // Sending or asking history in a room not joined is refused.
    bob.send(json!({"type":"send","room":"red","body":"x","client_id":"k"}))
        .await;
    let e = bob.expect_error("not_joined").await;
    assert_eq!(e["client_id"], "k");
    assert_eq!(e["room"], "red");
    bob.send(json!({"type":"history","room":"red"})).await;
    bob.expect_error("not_joined").await;
    bob.send(json!({"type":"leave","room":"red"})).await;
    bob.expect_error("not_joined").await;

    // After leaving, nothing more arrives.
    ann.send(json!({"type":"leave","room":"red","client_id":"l"}))
        .await;
    let left = ann.expect("left").await;
    assert_eq!(left["room"], "red");
    assert_eq!(left["client_id"], "l");
    let mut carl = server.client("carl").await;
    carl.join("red").await;
    carl.say("red", "anyone?", "c").await;
    assert!(
        ann.quiet(SHORT).await.is_empty(),
        "left member still receives"
    );
    server.stop().await;
}

#[tokio::test]
async fn resume_with_since_gets_exactly_the_missed_messages() {
    let mut server = Server::start(WsConfig::default()).await;
    let mut ann = server.client("ann").await;
    let mut bob = server.client("bob").await;
    ann.join("r").await;
    bob.join("r").await;
    ann.say("r", "m1", "1").await;
    ann.say("r", "m2", "2").await;
    bob.expect("message").await;
    let last = bob.expect("message").await;
    assert_eq!(last["body"], "m2");
    let cursor = last["cursor"].as_str().expect("cursor").to_owned();
    drop(bob);

    for i in 3..=5 {
        ann.say("r", &format!("m{i}"), &i.to_string()).await;
    }
    let mut bob = server.client("bob").await;
    bob.send(json!({"type":"join","room":"r","since":cursor}))
        .await;
    let joined = bob.expect("joined").await;
    assert_eq!(joined["resuming"], true);
    for i in 3..=5 {
        let m = bob.expect("message").await;
        assert_eq!(m["body"], format!("m{i}"));
    }
    ann.say("r", "m6", "6").await;
    assert_eq!(bob.expect("message").await["body"], "m6");
    assert!(bob.quiet(SHORT).await.is_empty(), "duplicates after resume");
    server.stop().await;
}

#[tokio::test]
async fn typing_reaches_others_and_is_never_history() {
    let mut server = Server::start(WsConfig::default()).await;
    let mut ann = server.client("ann").await;
    let mut bob = server.client("bob").await;
    ann.join("t").await;
    bob.join("t").await;
    ann.send(json!({"type":"typing","room":"t"})).await;
    let typing = bob.expect("typing").await;
    assert_eq!(typing["from"], "ann");
    assert_eq!(typing["room"], "t");
    assert!(
        ann.quiet(SHORT).await.is_empty(),
        "the typist gets its own typing"
    );

    ann.say("t", "real", "1").await;
    bob.expect("message").await;
    bob.send(json!({"type":"history","room":"t","limit":50}))
        .await;
    let h = bob.expect("history").await;
    let bodies: Vec<_> = h["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["body"].clone())
        .collect();
    assert_eq!(bodies, [json!("real")]);
    server.stop().await;
}

#[tokio::test]
async fn history_pages_oldest_first_with_a_maximum() {
    let mut server = Server::start(WsConfig::default().with_max_history(3)).await;
    let mut ann = server.client("ann").await;
    ann.join("h").await;
    for i in 1..=6 {
        ann.say("h", &format!("m{i}"), &i.to_string()).await;
    }
    ann.send(json!({"type":"history","room":"h","limit":1000,"client_id":"q"}))
        .await;
    let page = ann.expect("history").await;
    assert_eq!(page["client_id"], "q");
    let msgs = page["messages"].as_array().expect("array").clone();
    let bodies: Vec<_> = msgs
        .iter()
        .map(|m| m["body"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        bodies,
        ["m4", "m5", "m6"],
        "newest page, oldest first, capped at 3"
    );
    assert_eq!(msgs[0]["from"], "ann");

    ann.send(json!({"type":"history","room":"h","limit":2,"before":msgs[0]["cursor"]}))
        .await;
    let older = ann.expect("history").await;
    let bodies: Vec<_> = older["messages"]
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m["body"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(bodies, ["m2", "m3"]);
    server.stop().await;
}

#[tokio::test]
async fn bad_inputs_get_their_documented_outcome_and_the_server_goes_on() {
    let config = WsConfig::default()
        .with_max_frame_size(1024)
        .with_hard_frame_size(64 * 1024)
        .with_rate_limit(Some(RateLimit::new(1000, 1000.0)));
    let mut server = Server::start(config).await;
    let mut c = server.client("mallory").await;

    // Each of these is answered with an error and the connection stays open.
    let cases: &[(&str, &str, &str)] = &[
        ("{not json", "bad_request", "malformed"),
        (r#"{"type":"dance"}"#, "bad_request", "unknown type"),
        (r#"{"room":"a"}"#, "bad_request", "missing field `type`"),
        (
            r#"{"type":"send","room":"a","client_id":"x"}"#,
            "bad_request",
            "missing field `body`",
        ),
        (r#"{"type":"join"}"#, "bad_request", "missing field `room`"),
        (
            r#"{"type":"join","room":"bad room!"}"#,
            "bad_request",
            "invalid room name",
        ),
        (
            r#"{"type":"join","room":"a","since":"yesterday"}"#,
            "bad_request",
            "invalid cursor",
        ),
        (r#"{"type":"join","room":7}"#, "bad_request", "malformed"),
    ];
    for (frame, code, text) in cases {
        c.send_raw(Message::text(*frame)).await;
        let e = c.expect_error(code).await;
        assert!(
            e["message"].as_str().is_some_and(|m| m.contains(text)),
            "{frame}: {e}"
        );
        c.assert_alive().await;
    }
    // The client id survives into the error when the frame parsed.
    c.send_raw(Message::text(
        r#"{"type":"send","room":"a","client_id":"x"}"#,
    ))
    .await;
    assert_eq!(c.expect_error("bad_request").await["client_id"], "x");

    // Oversized (past max_frame_size, within the socket's limit): too_large, connection stays.
    let big = json!({"type":"send","room":"a","body":"x".repeat(2000)}).to_string();
    c.send_raw(Message::text(big)).await;
    c.expect_error("too_large").await;
    c.assert_alive().await;

    // Binary frame: bad_request, connection stays.
    c.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    let e = c.expect_error("bad_request").await;
    assert!(e["message"].as_str().is_some_and(|m| m.contains("binary")));
    c.assert_alive().await;

    let m = &server.ws.metrics();
    assert_eq!(m.errors(ErrorCode::BadRequest), 10);
    assert_eq!(m.errors(ErrorCode::TooLarge), 1);

    // Past the socket's hard limit: too_large, then close 1009.
    let huge = "y".repeat(100 * 1024);
    c.send_raw(Message::text(huge)).await;
    c.expect_error("too_large").await;
    assert_eq!(c.expect_close().await, 1009);

    // Invalid UTF-8 in a text frame: bad_request, then close 1007.
    let mut c = server.client("mallory2").await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    c.send_raw(Message::Frame(frame)).await;
    c.expect_error("bad_request").await;
    assert_eq!(c.expect_close().await, 1007);

    // The server still serves everyone else.
    let mut ann = server.client("ann").await;
    ann.join("after").await;
    ann.say("after", "still here", "1").await;
    let metrics = server.scrape();
    assert!(
        metrics.contains("chatbus_errors_total{code=\"too_large\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("chatbus_errors_total{code=\"bad_request\"} 11"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_flood_past_the_rate_limit_is_refused_but_the_connection_stays() {
    let config = WsConfig::default().with_rate_limit(Some(RateLimit::new(10, 5.0)));
    let mut server = Server::start(config).await;
    let mut c = server.client("flood").await;
    for i in 0..40 {
        c.send(json!({"type":"ping","client_id":i})).await;
    }
    let (mut pongs, mut limited) = (0, 0);
    while pongs + limited < 40 {
        let v = c.next_non_presence().await;
        match v["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                assert!(v["client_id"].is_number(), "{v}");
                limited += 1;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    assert!(
        (10..=12).contains(&pongs),
        "burst of 10 allowed, got {pongs}"
    );
    assert_eq!(server.ws.metrics().errors(ErrorCode::RateLimited), limited);
    // Tokens come back: the connection is usable again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.assert_alive().await;
    let mut other = server.client("calm").await;
    other.assert_alive().await;
    server.stop().await;
}

#[tokio::test]
async fn origins_are_checked_at_the_handshake() {
    let mut server = Server::start(WsConfig::default()).await;
    let url = server.url("?name=web");
    let mut req = url.as_str().into_client_request().expect("request");
    req.headers_mut()
        .insert("Origin", "http://evil.example".parse().expect("header"));
    let (status, body) = Client::try_connect(req).await.err().expect("refused");
    assert_eq!(status, 403);
    assert!(body.contains("forbidden"), "{body}");
    assert_eq!(server.ws.metrics().errors(ErrorCode::Forbidden), 1);

    // The server's own origin and clients without Origin are accepted.
    let mut req = url.as_str().into_client_request().expect("request");
    let own = format!("http://{}", server.addr);
    req.headers_mut()
        .insert("Origin", own.parse().expect("header"));
    assert!(Client::try_connect(req).await.is_ok());
    let mut plain = server.client("cli").await;
    plain.assert_alive().await;
    server.stop().await;
}

#[tokio::test]
async fn room_limit_is_forbidden() {
    let mut server = Server::start(WsConfig::default().with_max_rooms(2)).await;
    let mut c = server.client("many").await;
    c.join("a").await;
    c.join("b").await;
    c.join("a").await; // re-joining a room already joined is not a new room
    c.send(json!({"type":"join","room":"c","client_id":3}))
        .await;
    let e = c.expect_error("forbidden").await;
    assert_eq!(e["client_id"], 3);
    c.assert_alive().await;
    server.stop().await;
}

async fn until_online(c: &mut Client, want: &[&str]) {
    let want = json!(want);
    loop {
        let v = c.next().await;
        if v["type"] == "presence" && v["online"] == want {
            return;
        }
    }
}

#[tokio::test]
async fn presence_lists_who_is_online_across_instances() {
    // Two servers over one broker: two instances of one deployment.
    let broker = Arc::new(MemoryBroker::new());
    let mut one = Server::with_broker(broker.clone(), WsConfig::default()).await;
    let mut two = Server::with_broker(broker, WsConfig::default()).await;
    let mut ann = one.client("ann").await;
    let mut bob = two.client("bob").await;
    ann.join("p").await;
    bob.join("p").await;
    tokio::time::timeout(
        Duration::from_secs(5),
        until_online(&mut ann, &["ann", "bob"]),
    )
    .await
    .expect("ann sees bob online");
    tokio::time::timeout(
        Duration::from_secs(5),
        until_online(&mut bob, &["ann", "bob"]),
    )
    .await
    .expect("bob sees ann online");
    drop(bob);
    tokio::time::timeout(Duration::from_secs(5), until_online(&mut ann, &["ann"]))
        .await
        .expect("ann sees bob leave");
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn server_pings_and_idle_peers_are_dropped() {
    let config = WsConfig::default()
        .with_ping_interval(Duration::from_millis(100))
        .with_idle_timeout(Duration::from_millis(400));
    let mut server = Server::start(config).await;
    let mut c = server.client("sleepy").await;
    // The server pings: the client library answers while we read, so the connection lives on.
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(800);
    while tokio::time::Instant::now() < deadline {
        use futures::StreamExt;
        if let Ok(Some(Ok(Message::Ping(_)))) = tokio::time::timeout_at(deadline, c.ws.next()).await
        {
            pings += 1;
        }
    }
    assert!(pings >= 3, "pings: {pings}");
    c.assert_alive().await;
    // A peer that sends nothing (not even pongs: we stop reading) is closed after the timeout.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(c.expect_close().await, 4001);
    assert_eq!(server.ws.metrics().idle_closed, 1);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_flushes_acks_and_closes_with_going_away() {
    let mut server = Server::start(WsConfig::default()).await;
    let mut ann = server.client("ann").await;
    ann.join("s").await;
    // A burst of sends immediately followed by shutdown: every send that was read gets its
    // ack before the 1001 close; no frame is lost in between.
    for i in 0..20 {
        ann.send(json!({"type":"send","room":"s","body":format!("m{i}"),"client_id":i}))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop().await;
    let mut acks = 0;
    loop {
        match ann.recv_within(Duration::from_secs(5)).await {
            Some(common::Event::Frame(v)) if v["type"] == "ack" => acks += 1,
            Some(common::Event::Frame(_)) => {}
            Some(common::Event::Close(Some(c))) => {
                assert_eq!(u16::from(c.code), 1001);
                break;
            }
            other => panic!("expected a 1001 close, got {other:?}"),
        }
    }
    assert_eq!(acks, 20);
    // No new connections after shutdown.
    let refused = tokio_tungstenite::connect_async(server.url("?name=late")).await;
    assert!(refused.is_err());
}

#[tokio::test]
async fn ws_level_and_app_level_ping() {
    let mut server = Server::start(WsConfig::default()).await;
    let mut c = server.client("p").await;
    c.send(json!({"type":"ping"})).await;
    assert_eq!(c.expect("pong").await, json!({"type":"pong"}));
    c.send_raw(Message::Ping(b"x".to_vec().into())).await;
    // The library answers the WebSocket ping; the session goes on.
    c.assert_alive().await;
    server.stop().await;
}

/// A burst of joins to a room larger than `max_listed` costs each member about one `presence`
/// frame per `large_room_debounce`, not one per join (issue #16: a room of 5,000 took 4.5 s to
/// join and 51 KiB per connection because of it). The last frame still counts everyone.
#[tokio::test]
async fn a_burst_of_joins_to_a_large_room_sends_few_presence_frames() {
    let presence = PresenceConfig::default()
        .with_max_listed(3)
        .with_large_room_debounce(Duration::from_secs(1));
    let chat = ChatHub::with_config(
        Arc::new(MemoryBroker::new()),
        chatbus_core::HubConfig::default(),
        presence,
    );
    let mut server = Server::with_chat(chat, WsConfig::default()).await;
    let mut first = server.client("u0").await;
    first.join("big").await;
    let mut others = Vec::new();
    // 20 joins 40 ms apart: each after the 25 ms debounce, so without the large-room rule
    // every one of them is announced on its own.
    for i in 1..20 {
        let mut c = server.client(&format!("u{i}")).await;
        c.join("big").await;
        others.push(c);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        match first.recv_within(Duration::from_millis(100)).await {
            Some(common::Event::Frame(v)) if v["type"] == "presence" => frames.push(v),
            Some(common::Event::Frame(_)) | None => {}
            Some(other) => panic!("{other:?}"),
        }
    }
    assert!(
        frames.len() <= 5,
        "{} presence frames for one burst of 19 joins: {frames:?}",
        frames.len()
    );
    let last = frames.last().expect("at least one presence frame");
    assert_eq!(last["count"], 20, "{last}");
    // Beyond max_listed, the count only: the names are paged with `members`.
    assert_eq!(last["online"], json!([]), "{last}");
    assert_eq!(last["paged"], true, "{last}");
    server.stop().await;
}
