//! The server API: HTTP routes under `/api` for the application's backend (bots, moderation,
//! notifications) to publish, message a user, disconnect a user and list who is online,
//! behind one bearer key. The reference is docs/api.md.
//!
//! Everything goes through [`WsService`]'s server API, so a message published here is the same
//! as one a client sent: it runs the `on_publish` hook, is stored and fanned out to every
//! instance, and carries a cursor clients resume from.

use std::fmt;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chatbus_core::{Receipt, Room};
use chatbus_ws::{ApiError, ErrorCode, WsService};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

/// Request bodies larger than this are refused (413) before they are parsed: a chat message is
/// bounded by the socket's frame limit (16 KiB by default) anyway, so 64 KiB leaves room for
/// JSON escaping without letting a caller make the server buffer megabytes.
const MAX_BODY: usize = 64 * 1024;

/// The key callers present as `Authorization: Bearer <key>`.
#[derive(Clone)]
pub(crate) struct ApiKey(Box<[u8]>);

impl ApiKey {
    /// The key of `--api-key` (a clap value parser), or an error for an empty one: a key set
    /// to nothing is a deployment mistake (an unset variable in a template), and failing at
    /// start says so instead of leaving the API open to an empty token or silently off.
    pub(crate) fn parse(key: &str) -> Result<Self, &'static str> {
        if key.is_empty() {
            return Err("the key must not be empty");
        }
        Ok(Self(key.as_bytes().into()))
    }

    /// Compares in time independent of where the first differing byte is, so response times
    /// do not let a caller guess the key byte by byte. (`ct_eq` on slices of different
    /// lengths returns false at once: only the key's length can leak, which a long random key
    /// makes worthless.)
    fn matches(&self, presented: &str) -> bool {
        self.0.ct_eq(presented.as_bytes()).into()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself: Args and the state may end up in a log line.
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Clone)]
struct Api {
    ws: WsService,
    key: ApiKey,
}

/// The `/api/*` routes, or none without a key: then every `/api/*` path is a 404 like any
/// unknown path, so a server started without a key exposes nothing extra.
pub(crate) fn router(ws: WsService, key: Option<ApiKey>) -> Router {
    let Some(key) = key else {
        return Router::new();
    };
    let api = Api { ws, key };
    Router::new()
        .route("/api/publish", post(publish))
        .route("/api/send", post(send))
        .route("/api/disconnect", post(disconnect))
        .route("/api/presence", get(presence))
        // The key is checked before any body is read or parsed: an unauthenticated caller
        // gets 401, never a parse error that would tell it about the API's fields.
        .layer(middleware::from_fn_with_state(api.clone(), authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

/// An API error: the HTTP status and the `{"error","code"}` body every refusal has.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    code: &'static str,
    error: String,
}

impl Failure {
    fn bad_request(error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: ErrorCode::BadRequest.as_str(),
            error: error.into(),
        }
    }

    fn unauthorized(error: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: ErrorCode::Unauthorized.as_str(),
            error: error.to_owned(),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({"error": self.error, "code": self.code})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 6750: tells the caller which scheme is expected.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        let code = e.code();
        let status = match code {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            // A hook denied it; the reason is the hook's, meant to be shown.
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            // The broker is down or the server is draining: retrying (elsewhere) may work.
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unsupported => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            code: code.as_str(),
            error: e.to_string(),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn authorize(State(api): State<Api>, request: Request, next: Next) -> Response {
    match bearer(request.headers()) {
        None => Failure::unauthorized("missing Authorization: Bearer <key>").into_response(),
        Some(token) if !api.key.matches(token) => {
            Failure::unauthorized("invalid API key").into_response()
        }
        Some(_) => next.run(request).await,
    }
}

/// Parses a JSON body ourselves rather than with axum's `Json` extractor, whose refusals are
/// plain text with 415/422 statuses: callers get one error shape, 400 `bad_request` with the
/// parser's reason (which field is missing or mistyped), whatever the `Content-Type`.
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Failure> {
    let body = body.map_err(|e| Failure {
        status: e.status(),
        code: if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::TooLarge.as_str()
        } else {
            ErrorCode::BadRequest.as_str()
        },
        error: e.body_text(),
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| Failure::bad_request(format!("invalid JSON body: {e}")))
}

fn room(name: &str) -> Result<Room, Failure> {
    Room::new(name).map_err(|e| Failure::bad_request(format!("room: {e}")))
}

fn receipt(r: &Receipt) -> serde_json::Value {
    json!({"id": r.id.to_string(), "cursor": r.cursor})
}

#[derive(Deserialize)]
struct PublishRequest {
    room: String,
    body: String,
    from: String,
}

/// `POST /api/publish {"room","body","from"}` → `{"id","cursor"}`.
async fn publish(
    State(api): State<Api>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let req: PublishRequest = parse(body)?;
    let room = room(&req.room)?;
    let r = api.ws.publish(room, &req.from, &req.body).await?;
    Ok(Json(receipt(&r)))
}

#[derive(Deserialize)]
struct SendRequest {
    to: String,
    body: String,
    from: String,
}

/// `POST /api/send {"to","body","from"}` → `{"room","id","cursor"}`: a direct message, in the
/// conversation room of the two users.
async fn send(
    State(api): State<Api>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let req: SendRequest = parse(body)?;
    let (room, r) = api.ws.send_to_user(&req.from, &req.to, &req.body).await?;
    let mut out = receipt(&r);
    out["room"] = json!(room);
    Ok(Json(out))
}

#[derive(Deserialize)]
struct DisconnectRequest {
    user: String,
}

/// `POST /api/disconnect {"user"}` → `{"disconnected":true}`: every connection of the user, on
/// every instance, is closed with 4009.
async fn disconnect(
    State(api): State<Api>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let req: DisconnectRequest = parse(body)?;
    api.ws.disconnect_user(&req.user).await?;
    Ok(Json(json!({"disconnected": true})))
}

#[derive(Deserialize)]
struct PresenceQuery {
    room: String,
}

/// `GET /api/presence?room=R` → `{"room":R,"users":[...]}`, across instances (as presence
/// knows it: eventually consistent, see docs/protocol.md "Presence"). For a room this instance
/// has no members in, it asks the others, which takes up to `PRESENCE_QUERY_WAIT`.
async fn presence(
    State(api): State<Api>,
    query: Result<Query<PresenceQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let Query(q) = query.map_err(|e| Failure::bad_request(e.body_text()))?;
    let room = room(&q.room)?;
    let online = api.ws.online(&room).await?;
    let users: Vec<&str> = online.iter().map(|u| &**u).collect();
    Ok(Json(json!({"room": room, "users": users})))
}
