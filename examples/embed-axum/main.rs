//! chatbus inside an axum app that already exists: a team directory with routes of its own,
//! to which chatbus adds the chat socket at `/ws`, hooks that apply the app's rules, and a
//! backend route that posts announcements through the server API.
//!
//! Run with
//!
//! ```text
//! cargo run --example embed-axum
//! curl http://127.0.0.1:3000/teams                   # the app's own route: who is in which team
//!
//! # chat as ann (team red) with any WebSocket client, e.g. websocat:
//! websocat 'ws://127.0.0.1:3000/ws?name=ann'
//! {"type":"join","room":"team-red-general"}                    # joined
//! {"type":"join","room":"team-blue-general"}                   # error "forbidden"
//! {"type":"send","room":"team-red-general","body":"darn it"}   # everyone gets "**** it"
//! {"type":"send","room":"team-red-general","body":"buy now!"}  # error "forbidden"
//!
//! # from the backend, to everyone in the room:
//! curl -H 'content-type: application/json' \
//!     -d '{"room":"team-red-general","body":"stand-up in 5"}' http://127.0.0.1:3000/announce
//! ```
//!
//! `CHATBUS_LISTEN=127.0.0.1:8080` listens elsewhere. A user the directory does not know is
//! refused at the handshake (HTTP 403). To stay short the example checks no tokens (`?name=`
//! says who you are); a real app sets a verifier (`WsConfig::with_verifier(JwtVerifier::..)`)
//! and the hooks then see the verified user.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chatbus_core::{MemoryBroker, Room};
use chatbus_ws::{
    ChatHub, Conn, ConnData, ConnectInfo, Denied, ErrorCode, Hooks, Publish, WsConfig, WsService,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing_subscriber::EnvFilter;

/// The app's own data: user → team. In a real app, a database.
#[derive(Debug)]
struct Directory {
    teams: HashMap<String, String>,
}

impl Directory {
    fn sample() -> Self {
        let teams = [("ann", "red"), ("cleo", "red"), ("bob", "blue")];
        Self {
            teams: teams
                .into_iter()
                .map(|(user, team)| (user.to_owned(), team.to_owned()))
                .collect(),
        }
    }

    fn team_of(&self, user: &str) -> Option<&str> {
        self.teams.get(user).map(String::as_str)
    }
}

#[derive(Clone)]
struct AppState {
    ws: WsService,
    directory: Arc<Directory>,
}

// ---- The app's routes, as they were before chatbus. ----

async fn healthz() -> &'static str {
    "ok\n"
}

async fn teams(State(app): State<AppState>) -> Json<Value> {
    Json(json!(app.directory.teams))
}

// ---- chatbus: the rules, as hooks. ----

/// What a connection carries from its handshake to its later hooks: its user's team.
#[derive(Debug)]
struct Team(String);

/// Words masked in every message (clients' and announcements alike).
const MASKED: &[&str] = &["darn", "heck"];
/// A message containing one of these is refused.
const REFUSED: &[&str] = &["buy now"];

#[derive(Debug)]
struct TeamRules {
    directory: Arc<Directory>,
}

#[async_trait]
impl Hooks for TeamRules {
    async fn on_connect(&self, info: &ConnectInfo<'_>) -> Result<ConnData, Denied> {
        // Looked up once per connection and carried by it, so `on_join` needs no lookup. A
        // change of team therefore applies from the user's next connection.
        let team = (self.directory.team_of(&info.identity.user))
            .ok_or_else(|| Denied::new("you are not in the team directory"))?;
        Ok(Some(Arc::new(Team(team.to_owned()))))
    }

    // Only `join` needs checking: `send`, `typing` and `history` need the room joined first.
    async fn on_join(&self, conn: &Conn, room: &Room) -> Result<(), Denied> {
        let team = conn.data::<Team>().map(|t| t.0.as_str());
        if team_room_allowed(team, room.as_str()) {
            Ok(())
        } else {
            Err(Denied::new("team rooms are for the team's members"))
        }
    }

    async fn on_publish(&self, publish: &mut Publish) -> Result<(), Denied> {
        let lower = publish.body.to_lowercase();
        if REFUSED.iter().any(|phrase| lower.contains(phrase)) {
            return Err(Denied::new("no advertising here"));
        }
        publish.body = mask_words(&publish.body, MASKED);
        Ok(())
    }
}

/// Rooms `team-<t>-...` are for members of team `t`; every other room is open.
fn team_room_allowed(team: Option<&str>, room: &str) -> bool {
    let Some(rest) = room.strip_prefix("team-") else {
        return true;
    };
    team.and_then(|t| rest.strip_prefix(t))
        .is_some_and(|r| r.starts_with('-'))
}

/// `body` with every whole word of `words` (ASCII case-insensitive) replaced by `*`s.
fn mask_words(body: &str, words: &[&str]) -> String {
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while !rest.is_empty() {
        // A run of word characters, then a run of the others.
        let end = rest
            .find(|c: char| !c.is_alphanumeric())
            .unwrap_or(rest.len());
        let (word, tail) = rest.split_at(end);
        if words.iter().any(|w| w.eq_ignore_ascii_case(word)) {
            out.push_str(&"*".repeat(word.chars().count()));
        } else {
            out.push_str(word);
        }
        let gap = tail.find(char::is_alphanumeric).unwrap_or(tail.len());
        out.push_str(&tail[..gap]);
        rest = &tail[gap..];
    }
    out
}

#[derive(Deserialize)]
struct Announcement {
    room: String,
    body: String,
}

/// A backend route (in a real app, behind the app's own auth): posts to a room as
/// `announcer`. It goes through `on_publish` like a client's message, then to every member of
/// the room on every instance.
async fn announce(
    State(app): State<AppState>,
    Json(a): Json<Announcement>,
) -> Result<Json<Value>, (StatusCode, String)> {
    let room = Room::new(&a.room).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    match app.ws.publish(room, "announcer", &a.body).await {
        Ok(r) => Ok(Json(json!({"id": r.id.to_string(), "cursor": r.cursor}))),
        Err(e) => {
            let status = match e.code() {
                ErrorCode::Forbidden => StatusCode::FORBIDDEN,
                ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            Err((status, e.to_string()))
        }
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let directory = Arc::new(Directory::sample());

    // chatbus: a hub over a broker (MemoryBroker here; RedisBroker, KafkaBroker or DualBus for
    // several instances), the hooks, and the transport.
    let hooks = TeamRules {
        directory: directory.clone(),
    };
    let config = WsConfig::default().with_hooks(hooks);
    let ws = WsService::new(ChatHub::new(Arc::new(MemoryBroker::new())), config);

    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/teams", get(teams))
        .route("/announce", post(announce))
        .with_state(AppState {
            ws: ws.clone(),
            directory,
        });

    let listen = std::env::var("CHATBUS_LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("embed-axum listening on http://{}/", listener.local_addr()?);
    // `serve` mounts the socket at /ws next to the app's routes and drains on the signal. To
    // keep your own `axum::serve`, merge `ws.router()` instead (see the README).
    ws.serve(listener, app, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn team_rooms_are_for_members() {
        assert!(team_room_allowed(Some("red"), "team-red-general"));
        assert!(!team_room_allowed(Some("blue"), "team-red-general"));
        assert!(!team_room_allowed(Some("re"), "team-red-general"));
        assert!(!team_room_allowed(Some("red"), "team-redder-general"));
        assert!(!team_room_allowed(None, "team-red-general"));
        assert!(team_room_allowed(None, "lobby"));
    }

    #[test]
    fn words_are_masked_whole_and_in_any_case() {
        assert_eq!(mask_words("Darn it, heck!", MASKED), "**** it, ****!");
        assert_eq!(mask_words("darned", MASKED), "darned");
        assert_eq!(mask_words("", MASKED), "");
        assert_eq!(mask_words("héck darn", MASKED), "héck ****");
    }
}
