//! The embed-axum example as a real process: its hooks keep team rooms to the team's members
//! and refuse users the directory does not know, its word filter rewrites or refuses
//! messages (clients' and the backend's), its `/announce` route reaches joined clients, and
//! the app's own routes still answer next to the socket.
//!
//! Run with `cargo build --example embed-axum && cargo test --test embed` (`cargo test` alone
//! builds the example too).

use std::process::Stdio;
use std::time::Duration;

use chatbus_testkit::chat::{example_program, http_get, http_request};
use chatbus_testkit::client::WsClient;
use chatbus_testkit::{free_port, wait_for_port};
use serde_json::{json, Value};
use tokio::process::Child;

/// One embed-axum process on a free port; killed on drop.
struct Embed {
    port: u16,
    _child: Child,
}

impl Embed {
    async fn start() -> Self {
        let port = free_port();
        let child = tokio::process::Command::new(example_program("embed-axum"))
            .env("CHATBUS_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start embed-axum");
        wait_for_port(port, Duration::from_secs(30), "embed-axum").await;
        Self {
            port,
            _child: child,
        }
    }

    async fn client(&self, user: &str) -> WsClient {
        WsClient::connect(self.port, &format!("/ws?name={user}"))
            .await
            .unwrap_or_else(|r| panic!("{user} refused: {} {}", r.status, r.body))
    }

    async fn announce(&self, room: &str, body: &str) -> (u16, String) {
        let request = json!({"room": room, "body": body}).to_string();
        http_request(
            self.port,
            "POST",
            "/announce",
            &[("Content-Type", "application/json")],
            &request,
        )
        .await
        .expect("POST /announce answered")
    }
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn team_rooms_are_for_the_team_and_strangers_are_refused_at_the_handshake() {
    let app = Embed::start().await;
    let mut ann = app.client("ann").await; // team red
    let mut bob = app.client("bob").await; // team blue

    ann.join("team-red-general")
        .await
        .expect("a member joins her team's room");
    let refused = bob
        .join("team-red-general")
        .await
        .expect_err("another team's room is refused");
    assert_eq!(refused["code"], "forbidden", "{refused}");
    bob.join("team-blue-general")
        .await
        .expect("his own team's room");
    bob.join("lobby")
        .await
        .expect("rooms outside team-* are open");

    // on_connect denies a user it cannot find: HTTP 403 with the JSON error body.
    let stranger = WsClient::connect(app.port, "/ws?name=mallory")
        .await
        .expect_err("a user outside the directory is refused");
    assert_eq!(stranger.status, 403);
    assert_eq!(json_of(&stranger.body)["code"], "forbidden");

    // The app's own routes answer next to the socket.
    let (status, teams) = http_get(app.port, "/teams").await.expect("GET /teams");
    assert_eq!(status, 200);
    assert_eq!(json_of(&teams)["ann"], "red");
}

#[tokio::test]
async fn the_word_filter_masks_words_and_refuses_advertising() {
    let app = Embed::start().await;
    let mut ann = app.client("ann").await;
    let mut cleo = app.client("cleo").await; // also team red
    let room = "team-red-filter";
    ann.join(room).await.expect("ann joins");
    cleo.join(room).await.expect("cleo joins");

    ann.send(
        json!({"type": "send", "room": room, "body": "Darn it, the build", "client_id": "c1"}),
    )
    .await;
    let ack = ann.next_of("ack").await;
    assert_eq!(ack["client_id"], "c1");
    let got = cleo.next_of("message").await;
    assert_eq!(got["body"], "**** it, the build");
    assert_eq!(got["from"], "ann");

    ann.send(json!({"type": "send", "room": room, "body": "BUY NOW, cheap", "client_id": "c2"}))
        .await;
    let error = ann.next_of("error").await;
    assert_eq!(error["code"], "forbidden", "{error}");
    assert_eq!(error["client_id"], "c2");

    // The refused message was not published: cleo's next message is the one after it.
    ann.send(json!({"type": "send", "room": room, "body": "sorry", "client_id": "c3"}))
        .await;
    let got = cleo.next_of("message").await;
    assert_eq!(got["body"], "sorry");
}

#[tokio::test]
async fn announce_reaches_joined_clients_through_the_same_filter() {
    let app = Embed::start().await;
    let mut ann = app.client("ann").await;
    let room = "team-red-news";
    ann.join(room).await.expect("ann joins");

    let (status, body) = app.announce(room, "stand-up in 5, darn").await;
    assert_eq!(status, 200, "{body}");
    let receipt = json_of(&body);
    let got = ann.next_of("message").await;
    assert_eq!(got["from"], "announcer");
    assert_eq!(got["body"], "stand-up in 5, ****");
    assert_eq!(got["id"], receipt["id"]);

    let (status, body) = app.announce(room, "buy now").await;
    assert_eq!(status, 403, "on_publish refuses the backend too: {body}");
    let (status, body) = app.announce("not a room!", "hi").await;
    assert_eq!(status, 400, "{body}");
}
