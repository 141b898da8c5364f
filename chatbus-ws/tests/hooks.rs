//! Application hooks over a real WebSocket: allow, deny, rewrite, attach data; a hook that
//! times out, errors or panics denies the one action and the session (and server) go on.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chatbus_core::Room;
use chatbus_ws::{Conn, ConnData, ConnectInfo, Denied, HookKind, Hooks, Publish, WsConfig};
use common::{Client, Server};
use serde_json::json;

/// A team read from the `x-team` header at connect; rooms `team-<t>-*` are for that team only.
struct Team(String);

#[derive(Debug, Default)]
struct AppHooks {
    disconnects: AtomicUsize,
}

#[async_trait]
impl Hooks for AppHooks {
    async fn on_connect(&self, info: &ConnectInfo<'_>) -> Result<ConnData, Denied> {
        if &*info.identity.user == "banned" {
            return Err(Denied::new("you are banned"));
        }
        let team = info
            .headers
            .get("x-team")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        Ok(Some(Arc::new(Team(team))))
    }

    async fn on_join(&self, conn: &Conn, room: &Room) -> Result<(), Denied> {
        match room.as_str() {
            "slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            }
            "boom" => panic!("a bug in the application's hook"),
            "closed" => Err(Denied::new("this room is closed")),
            name => match name.strip_prefix("team-") {
                Some(rest) => {
                    let team = conn.data::<Team>().map_or("", |t| t.0.as_str());
                    if rest.starts_with(&format!("{team}-")) {
                        Ok(())
                    } else {
                        Err(Denied::new("members of the team only"))
                    }
                }
                None => Ok(()),
            },
        }
    }

    async fn on_history(&self, _: &Conn, room: &Room) -> Result<(), Denied> {
        if room.as_str() == "secret-past" {
            return Err(Denied::new("no history here"));
        }
        Ok(())
    }

    async fn on_typing(&self, _: &Conn, _: &Room) -> Result<(), Denied> {
        Err(Denied::new("typing is off"))
    }

    async fn on_send(&self, _: &Conn, _: &Room, body: &str) -> Result<(), Denied> {
        if body == "slow" {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(())
    }

    async fn on_publish(&self, publish: &mut Publish) -> Result<(), Denied> {
        if publish.body.contains("spam") {
            return Err(Denied::new("no spam"));
        }
        publish.body = publish.body.replace("darn", "d**n");
        Ok(())
    }

    async fn on_disconnect(&self, _: &Conn) {
        self.disconnects.fetch_add(1, Ordering::Relaxed);
    }
}

fn config() -> WsConfig {
    WsConfig::default()
        .with_hooks(AppHooks::default())
        .with_hook_timeout(Duration::from_millis(200))
}

async fn connect_team(server: &Server, name: &str, team: &str) -> Client {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = server
        .url(&format!("?name={name}"))
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("x-team", team.parse().expect("header value"));
    match Client::try_connect(req).await {
        Ok(c) => c,
        Err((status, body)) => panic!("refused {status}: {body}"),
    }
}

#[tokio::test]
async fn hooks_allow_deny_and_see_the_connections_data() {
    let mut server = Server::start(config()).await;
    let mut ann = connect_team(&server, "ann", "a").await;

    // Connection data from on_connect decides the join.
    ann.join("team-a-general").await;
    ann.send(json!({"type": "join", "room": "team-b-general", "client_id": 1}))
        .await;
    let e = ann.expect_error("forbidden").await;
    assert_eq!(e["message"], "members of the team only");
    assert_eq!(e["room"], "team-b-general");
    assert_eq!(e["client_id"], 1);
    // Denied means not joined.
    ann.send(json!({"type": "send", "room": "team-b-general", "body": "x"}))
        .await;
    ann.expect_error("not_joined").await;

    ann.send(json!({"type": "join", "room": "closed"})).await;
    assert_eq!(
        ann.expect_error("forbidden").await["message"],
        "this room is closed"
    );

    ann.join("secret-past").await;
    ann.send(json!({"type": "history", "room": "secret-past"}))
        .await;
    assert_eq!(
        ann.expect_error("forbidden").await["message"],
        "no history here"
    );
    ann.send(json!({"type": "typing", "room": "secret-past"}))
        .await;
    assert_eq!(
        ann.expect_error("forbidden").await["message"],
        "typing is off"
    );

    // on_publish rewrites, or refuses.
    ann.send(
        json!({"type": "send", "room": "team-a-general", "body": "darn it", "client_id": "c1"}),
    )
    .await;
    let (first, second) = (ann.next_non_presence().await, ann.next_non_presence().await);
    let echo = if first["type"] == "message" {
        &first
    } else {
        &second
    };
    assert_eq!(echo["body"], "d**n it", "{first} {second}");
    ann.send(
        json!({"type": "send", "room": "team-a-general", "body": "buy spam", "client_id": "c2"}),
    )
    .await;
    let e = ann.expect_error("forbidden").await;
    assert_eq!(
        (e["message"].as_str(), e["client_id"].as_str()),
        (Some("no spam"), Some("c2"))
    );
    assert!(
        ann.quiet(Duration::from_millis(200)).await.is_empty(),
        "a refused message is not delivered"
    );

    // The server API goes through on_publish too.
    let receipt = server
        .ws
        .publish(
            Room::new("team-a-general").expect("room"),
            "bot",
            "darn bots",
        )
        .await
        .expect("published");
    let m = ann.expect("message").await;
    assert_eq!(
        (m["body"].as_str(), m["from"].as_str()),
        (Some("d**n bots"), Some("bot"))
    );
    assert_eq!(m["id"], receipt.id.to_string());
    assert!(server
        .ws
        .publish(Room::new("team-a-general").expect("room"), "bot", "spam")
        .await
        .is_err());

    let m = server.ws.metrics();
    assert_eq!(m.hook(HookKind::Join).denials, 2);
    assert!(m.hook(HookKind::Publish).calls >= 4);
    assert_eq!(m.hook(HookKind::Connect).calls, 1);
    ann.assert_alive().await;
    server.stop().await;
}

#[tokio::test]
async fn a_connect_hook_refusal_is_a_403() {
    let mut server = Server::start(config()).await;
    let (status, body) = Client::try_connect(server.url("?name=banned"))
        .await
        .err()
        .expect("refused");
    assert_eq!(status, 403);
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(body["code"], "forbidden");
    assert_eq!(body["message"], "you are banned");
    assert_eq!(server.ws.metrics().hook(HookKind::Connect).denials, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_slow_or_panicking_hook_denies_and_the_session_goes_on() {
    let mut server = Server::start(config()).await;
    let mut ann = connect_team(&server, "ann", "a").await;
    let mut bob = connect_team(&server, "bob", "a").await;

    ann.send(json!({"type": "join", "room": "slow", "client_id": "s"}))
        .await;
    let e = ann.expect_error("forbidden").await;
    assert!(
        e["message"].as_str().unwrap_or("").contains("timed out"),
        "{e}"
    );

    ann.send(json!({"type": "join", "room": "boom"})).await;
    let e = ann.expect_error("forbidden").await;
    assert!(
        e["message"].as_str().unwrap_or("").contains("failed"),
        "{e}"
    );

    ann.join("lobby").await;
    ann.send(json!({"type": "send", "room": "lobby", "body": "slow", "client_id": "q"}))
        .await;
    assert_eq!(ann.expect_error("forbidden").await["client_id"], "q");

    // Both connections (and the server) still work, and nothing was half-done.
    ann.assert_alive().await;
    bob.join("lobby").await;
    let (_, echo) = ann.say("lobby", "still here", "c").await;
    assert_eq!(bob.expect("message").await["id"], echo["id"]);
    let m = server.ws.metrics();
    assert_eq!(m.hook(HookKind::Join).failures, 2);
    assert_eq!(m.hook(HookKind::Send).failures, 1);
    assert!(
        m.hook(HookKind::Join).micros >= 200_000,
        "the timeout is counted as time spent"
    );

    drop(ann);
    drop(bob);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.ws.metrics().hook(HookKind::Disconnect).calls < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "on_disconnect runs for each connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}
