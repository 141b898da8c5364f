//! Users across instances, in one process: two servers over one memory broker stand for two
//! instances. Direct messages without a join, the conversation closed to third users, user
//! status (watch), "disconnect a user everywhere", and the token's room grants.
#![cfg(feature = "jwt")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use chatbus_core::{Broker, MemoryBroker, Room};
use chatbus_ws::{direct_room, JwtVerifier, PresenceConfig, WsConfig};
use common::{Client, Event, Server};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &[u8] = b"direct-test-secret-long-enough-for-hs256";

fn token(user: &str, rooms: Option<&[&str]>) -> String {
    let exp = chatbus_core::backend::now_ms() / 1000 + 3600;
    let mut claims = json!({"sub": user, "exp": exp});
    if let Some(rooms) = rooms {
        claims["rooms"] = json!(rooms);
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .expect("encode")
}

/// Two "instances" over one broker, presence (and status probes) every 300 ms.
async fn pair() -> (Server, Server) {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let config = || WsConfig::default().with_verifier(JwtVerifier::hs256(SECRET));
    let start = |b: Arc<dyn Broker>| async move {
        let chat = chatbus_ws::ChatHub::with_config(
            b,
            chatbus_core::HubConfig::default(),
            PresenceConfig::default().with_interval(Duration::from_millis(300)),
        );
        Server::with_chat(chat, config()).await
    };
    (start(broker.clone()).await, start(broker).await)
}

async fn user(server: &Server, name: &str) -> Client {
    Client::connect(&server.url(&format!("?token={}", token(name, None)))).await
}

/// The next frame of `ty` within `wait`, skipping everything else.
async fn wait_for(c: &mut Client, wait: Duration, what: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_within(left).await {
            Some(Event::Frame(v)) if what(&v) => return v,
            Some(Event::Frame(_)) => {}
            other => panic!("no matching frame within {wait:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_direct_message_reaches_every_connection_of_both_users_without_a_join() {
    let (mut one, mut two) = pair().await;
    let mut ann = user(&one, "ann").await;
    let mut ann_phone = user(&two, "ann").await;
    let mut bob = user(&two, "bob").await;
    let mut carol = user(&one, "carol").await;

    ann.send(json!({"type": "send", "to": "bob", "body": "psst", "client_id": "d1"}))
        .await;
    let ack = wait_for(&mut ann, common::WAIT, |v| v["type"] == "ack").await;
    let room = direct_room("ann", "bob");
    assert_eq!(ack["room"], room.as_str());
    assert_eq!(ack["client_id"], "d1");
    for c in [&mut ann, &mut ann_phone, &mut bob] {
        let m = wait_for(c, common::WAIT, |v| v["type"] == "message").await;
        assert_eq!(m["room"], room.as_str());
        assert_eq!(
            (m["from"].as_str(), m["to"].as_str()),
            (Some("ann"), Some("bob"))
        );
        assert_eq!(
            (m["body"].as_str(), &m["id"], &m["cursor"]),
            (Some("psst"), &ack["id"], &ack["cursor"])
        );
    }
    assert!(
        carol.quiet(Duration::from_millis(300)).await.is_empty(),
        "carol gets nothing"
    );

    // Bob answers: the same conversation.
    bob.send(json!({"type": "send", "to": "ann", "body": "hi ann", "client_id": "d2"}))
        .await;
    let ack2 = wait_for(&mut bob, common::WAIT, |v| v["type"] == "ack").await;
    assert_eq!(ack2["room"], room.as_str());
    let m = wait_for(&mut ann, common::WAIT, |v| v["type"] == "message").await;
    assert_eq!(
        (m["from"].as_str(), m["to"].as_str(), m["body"].as_str()),
        (Some("bob"), Some("ann"), Some("hi ann"))
    );

    // A third user is refused the conversation: join, history, send, typing.
    for frame in [
        json!({"type": "join", "room": room.as_str()}),
        json!({"type": "history", "room": room.as_str()}),
        json!({"type": "send", "room": room.as_str(), "body": "me too"}),
        json!({"type": "typing", "room": room.as_str()}),
    ] {
        carol.send(frame.clone()).await;
        let e = carol.expect_error("forbidden").await;
        assert_eq!(e["room"], room.as_str(), "{frame}");
    }

    // A participant reads the history without joining, and resumes with `since`.
    bob.send(json!({"type": "history", "room": room.as_str()}))
        .await;
    let h = wait_for(&mut bob, common::WAIT, |v| v["type"] == "history").await;
    let bodies: Vec<&str> = h["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["body"].as_str())
        .collect();
    assert_eq!(bodies, ["psst", "hi ann"]);
    assert_eq!(h["messages"][0]["to"], "bob");
    let since = ack["cursor"].as_str().expect("memory broker cursor");
    bob.send(json!({"type": "join", "room": room.as_str(), "since": since}))
        .await;
    let m = wait_for(&mut bob, common::WAIT, |v| v["type"] == "message").await;
    assert_eq!(m["body"], "hi ann");

    // Joined, bob gets each new message once: from the room, not also as a copy.
    ann.send(json!({"type": "send", "to": "bob", "body": "once", "client_id": "d3"}))
        .await;
    let m = wait_for(&mut bob, common::WAIT, |v| v["type"] == "message").await;
    assert_eq!(m["body"], "once");
    let more: Vec<Value> = bob
        .quiet(Duration::from_millis(400))
        .await
        .into_iter()
        .filter(|v| v["type"] == "message")
        .collect();
    assert!(more.is_empty(), "a second copy: {more:?}");

    // The server API sends direct messages too.
    let (api_room, _) = two
        .ws
        .send_to_user("ann", "bob", "from the backend")
        .await
        .expect("sent");
    assert_eq!(api_room, room);
    let m = wait_for(&mut bob, common::WAIT, |v| v["type"] == "message").await;
    assert_eq!(m["body"], "from the backend");
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn watchers_see_status_flip_across_instances() {
    let (mut one, mut two) = pair().await;
    let mut carol = user(&one, "carol").await;
    carol
        .send(json!({"type": "watch", "users": ["ann", "dave"]}))
        .await;
    let s1 = wait_for(&mut carol, common::WAIT, |v| v["type"] == "status").await;
    let s2 = wait_for(&mut carol, common::WAIT, |v| v["type"] == "status").await;
    assert_eq!(
        s1,
        json!({"type": "status", "user": "ann", "online": false})
    );
    assert_eq!(
        s2,
        json!({"type": "status", "user": "dave", "online": false})
    );

    let ann = user(&two, "ann").await;
    let s = wait_for(&mut carol, Duration::from_secs(2), |v| {
        v["type"] == "status"
    })
    .await;
    assert_eq!(s, json!({"type": "status", "user": "ann", "online": true}));

    // A second tab opens and closes: ann stays online.
    let tab = user(&one, "ann").await;
    drop(tab);
    let frames = carol.quiet(Duration::from_millis(800)).await;
    assert!(
        frames.iter().all(|v| v["type"] != "status"),
        "one user, not one per tab: {frames:?}"
    );

    // A new watcher on another instance learns the current status at once.
    let mut erin = user(&two, "erin").await;
    erin.send(json!({"type": "watch", "users": ["ann"]})).await;
    let s = wait_for(&mut erin, common::WAIT, |v| v["type"] == "status").await;
    assert_eq!(s["online"], true);

    drop(ann);
    let s = wait_for(&mut carol, Duration::from_secs(2), |v| {
        v["type"] == "status"
    })
    .await;
    assert_eq!(s, json!({"type": "status", "user": "ann", "online": false}));

    // Too many users at once is refused, and changes nothing.
    let many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    erin.send(json!({"type": "watch", "users": many})).await;
    // (erin also hears ann go offline meanwhile.)
    let e = wait_for(&mut erin, common::WAIT, |v| v["type"] == "error").await;
    assert_eq!(e["code"], "forbidden");
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn a_user_is_disconnected_everywhere_with_4009() {
    let (mut one, mut two) = pair().await;
    let mut a = user(&one, "bob").await;
    let mut b = user(&two, "bob").await;
    let mut other = user(&two, "ann").await;
    let here = one.ws.disconnect_user("bob").await.expect("published");
    assert_eq!(here, 1);
    assert_eq!(a.expect_close().await, 4009);
    assert_eq!(b.expect_close().await, 4009);
    other.assert_alive().await;
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn the_rooms_claim_limits_rooms_but_not_own_conversations() {
    let (mut one, mut two) = pair().await;
    let limited = token("ann", Some(&["lobby", "team-a-*"]));
    let mut ann = Client::connect(&one.url(&format!("?token={limited}"))).await;
    let mut free = user(&two, "bob").await;
    ann.join("lobby").await;
    ann.join("team-a-x").await;
    // Not even its own personal channel is the client's to leave.
    let own = format!("_u:{}", &direct_room("ann", "ann").as_str()[3..35]);
    ann.send(json!({"type": "leave", "room": own})).await;
    ann.expect_error("forbidden").await;
    for room in ["team-b", "lobby2", "_internal"] {
        ann.send(json!({"type": "join", "room": room})).await;
        let e = ann.expect_error("forbidden").await;
        assert_eq!(e["room"], room);
    }
    // Nothing of team-b reaches ann, even when others post there.
    free.join("team-b").await;
    free.say("team-b", "hello b", "1").await;
    ann.send(json!({"type": "send", "room": "team-b", "body": "x"}))
        .await;
    let e = ann.next_non_presence().await;
    assert!(e["code"] == "not_joined" || e["code"] == "forbidden", "{e}");
    assert!(ann.quiet(Duration::from_millis(300)).await.is_empty());
    // Direct conversations of the user need no grant.
    ann.send(json!({"type": "send", "to": "bob", "body": "dm ok", "client_id": "x"}))
        .await;
    let ack = wait_for(&mut ann, common::WAIT, |v| v["type"] == "ack").await;
    assert_eq!(ack["room"], direct_room("ann", "bob").as_str());
    let lobby = Room::new("lobby").expect("room");
    let here = one.ws.online(&lobby).await.expect("online");
    assert!(here.iter().any(|u| &**u == "ann"), "{here:?}");
    // The other instance has no member in the lobby: it asks, and hears ann's instance.
    let there = two.ws.online(&lobby).await.expect("online");
    assert_eq!(there, [Arc::<str>::from("ann")]);
    one.stop().await;
    two.stop().await;
}
