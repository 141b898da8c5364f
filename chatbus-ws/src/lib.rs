//! The WebSocket transport of chatbus: protocol v1 (JSON text frames), the session loop, the
//! auth hook, limits, and an axum integration you mount in your own app in a few lines.
//!
//! - [`ChatHub`] is a [`chatbus_core::Hub`] whose frames are protocol v1 JSON, with presence
//!   shared between instances. Build it over any broker (memory, Redis, Kafka, DualBus).
//! - [`WsService`] is the transport: [`serve`](WsService::serve) runs it (with your own routes
//!   next to the socket, or none); [`router`](WsService::router) gives an axum `Router` with the
//!   socket at `/ws` to serve yourself; [`run_session`](WsService::run_session) drives one
//!   connection over any `Sink`/`Stream` of [`WsMessage`]s.
//! - [`WsConfig`] holds the limits (frame size, rate, control frames, rooms, origins, idle and
//!   handshake timeouts, per-address [`IpLimits`]) and the token [`Verifier`] ([`JwtVerifier`]
//!   for HS256 / RS256, feature `jwt`, on by default). Build it from `WsConfig::default()`
//!   with the `with_*` setters.
//! - [`Hooks`] let the application accept connections and attach data to them, allow or deny
//!   joins, history, typing and sends, and rewrite or refuse every message before it is
//!   published (set with [`WsConfig::with_hooks`]); each call is bounded by
//!   [`WsConfig::hook_timeout`], and a failing hook denies, never crashes.
//! - Who may use which room: the token's [`RoomGrants`] (JWT claim `rooms`), reserved internal
//!   names, and direct conversations ([`direct_room`]) open to their two participants only.
//! - Users are addressable on every instance: direct messages (`send` with `to`), user status
//!   (`watch` / `status`), and the server API on [`WsService`]: [`publish`](WsService::publish),
//!   [`send_to_user`](WsService::send_to_user), [`disconnect_user`](WsService::disconnect_user),
//!   [`online`](WsService::online).
//! - With feature `socketio`, `WsService::socketio_router` serves Socket.IO clients
//!   (`socket.io-client` 4.x) at `/socket.io/` over the same hub: see the `socketio` module.
//! - Connections end with a documented [`CloseCode`].
//! - Every refused input is counted by [`ErrorCode`] in [`WsMetrics`];
//!   [`register_metrics`](WsService::register_metrics) exports the counters through
//!   [`prometheus_client`] (see [Metrics](#metrics)).
//!
//! The protocol is specified in `docs/protocol.md` in the repository.
//!
//! ```
//! use std::sync::Arc;
//! use chatbus_core::MemoryBroker;
//! use chatbus_ws::{ChatHub, WsConfig, WsService};
//! use futures::{SinkExt, StreamExt};
//! use tokio_tungstenite::tungstenite::Message;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The server: a hub over a broker, the transport, and your own routes next to it.
//! let ws = WsService::new(ChatHub::new(Arc::new(MemoryBroker::new())), WsConfig::default());
//! let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn({
//!     let ws = ws.clone();
//!     async move { ws.serve(listener, app, async { let _ = stopped.await; }).await }
//! });
//!
//! // A client: welcome, join, send; it gets its ack and its own message.
//! let url = format!("ws://{addr}/ws?name=ann");
//! let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
//! socket.send(Message::text(r#"{"type":"join","room":"lobby"}"#)).await?;
//! socket.send(Message::text(r#"{"type":"send","room":"lobby","body":"hi","client_id":"c1"}"#)).await?;
//! let (mut acked, mut echoed) = (false, false);
//! while !(acked && echoed) {
//!     let Some(Ok(Message::Text(t))) = socket.next().await else { continue };
//!     let frame: serde_json::Value = serde_json::from_str(&t)?;
//!     match frame["type"].as_str() {
//!         Some("ack") => acked = frame["client_id"] == "c1",
//!         Some("message") => echoed = frame["body"] == "hi" && frame["from"] == "ann",
//!         _ => {} // welcome, joined, presence
//!     }
//! }
//!
//! // Graceful shutdown: the client gets a 1001 close.
//! let _ = stop.send(());
//! server.await??;
//! # Ok(()) }
//! ```
//!
//! # Metrics
//!
//! The application owns one [`prometheus_client::registry::Registry`] and exposes it (e.g. at
//! `/metrics`); [`WsService::register_metrics`] adds the transport's and the hub's counters to
//! it, next to the application's own metrics and those of its broker. The counters are read
//! when the registry is encoded, from the snapshot structs [`WsMetrics`]
//! ([`WsService::metrics`]), [`HubStats`](chatbus_core::HubStats) and [`ChatStats`]: the hot
//! path keeps bumping plain atomics and nothing is counted twice.
//!
//! Encode with [`prometheus_client::encoding::prometheus_text`] (the Prometheus text format,
//! version 0.0.4, whose names are the ones documented): the OpenMetrics encoder would name
//! the counter `chatbus_connections_total` after its family `chatbus_connections`, which the
//! gauge of open connections already is.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `chatbus_connections` | gauge | open WebSocket connections |
//! | `chatbus_connections_total` | counter | connections accepted |
//! | `chatbus_connections_refused_total` | counter | handshakes refused (503) at [`WsConfig::max_connections`] |
//! | `chatbus_frames_in_total`, `chatbus_frames_out_total` | counter | frames received from / written to clients |
//! | `chatbus_messages_in_total` | counter | chat messages accepted from clients (acked) |
//! | `chatbus_messages_out_total` | counter | messages fanned out to local connections (one per recipient) |
//! | `chatbus_broker_messages_total` | counter | envelopes received from the broker |
//! | `chatbus_lagged_total`, `chatbus_replayed_total`, `chatbus_duplicates_total` | counter | slow-client resyncs, messages replayed during catch-up, duplicate copies dropped |
//! | `chatbus_resets_total` | counter | `reset` frames sent: a resume cursor or a member's position did not fit the room's log (reset log, or beyond its end) |
//! | `chatbus_slow_closed_total`, `chatbus_idle_closed_total` | counter | connections closed as slow (4000 or write timeout) / idle (4001) |
//! | `chatbus_handshake_timeouts_total` | counter | TCP connections closed for not completing the HTTP upgrade within [`WsConfig::handshake_timeout`] |
//! | `chatbus_flood_closed_total` | counter | connections closed with 4008 for control frames past [`WsConfig::control_rate_limit`] |
//! | `chatbus_tls_errors_total` | counter | failed TLS handshakes (`WsService::serve_tls`, feature `tls`) |
//! | `chatbus_broker_errors_total`, `chatbus_decode_errors_total` | counter | broker subscription errors, undecodable envelopes |
//! | `chatbus_sessions`, `chatbus_rooms` | gauge | hub sessions, rooms with local members (each connected user's personal channel and each watched user's status channel included) |
//! | `chatbus_errors_total{code}` | counter | errors answered, by [`ErrorCode`] (handshake refusals included) |
//! | `chatbus_hook_calls_total{hook}`, `chatbus_hook_denials_total{hook}`, `chatbus_hook_failures_total{hook}`, `chatbus_hook_micros_total{hook}` | counter | application [`Hooks`] calls, denials, failures (timeouts, panics) and time spent, by [`HookKind`] |
//!
//! ```
//! use std::sync::Arc;
//! use chatbus_core::MemoryBroker;
//! use chatbus_ws::prometheus_client::{encoding::prometheus_text, registry::Registry};
//! use chatbus_ws::{ChatHub, WsConfig, WsService};
//!
//! let ws = WsService::new(ChatHub::new(Arc::new(MemoryBroker::new())), WsConfig::default());
//! let mut registry = Registry::default();
//! ws.register_metrics(&mut registry);
//! // ... register the broker's and the application's own metrics in the same registry ...
//!
//! // At each scrape (serve it with `prometheus_text::CONTENT_TYPE`):
//! let mut text = String::new();
//! prometheus_text::encode(&mut text, &registry)?;
//! assert!(text.contains("# TYPE chatbus_connections gauge\nchatbus_connections 0\n"));
//! assert!(text.contains("chatbus_errors_total{code=\"rate_limited\"} 0\n"));
//! # Ok::<(), std::fmt::Error>(())
//! ```
//!
//! # How it works
//!
//! A connection is authenticated at the handshake (origin check, then token or `?name=`), then
//! runs a reader and a writer concurrently. The reader parses each frame once, validates it,
//! and calls the hub (`join`, `leave`, `publish`, `history`); replies are queued on the
//! session's control queue so they overtake queued messages. The writer drains the session's
//! queue, batching up to 64 frames per flush, and sends WebSocket pings. Chat messages travel
//! between instances as envelopes whose payload is a 1-byte tag plus a compact body; every
//! instance turns each envelope into its JSON frame once and shares the bytes among its
//! recipients. Presence: each instance announces its local members of a room as ephemeral
//! envelopes (a full list first, then diffs, and a heartbeat every 10 s); every instance keeps
//! the union.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod access;
mod api;
mod auth;
mod chat;
mod close;
mod config;
mod hooks;
mod idempotency;
mod ip;
mod metrics;
mod payload;
mod presence;
mod protocol;
mod server;
mod service;
mod session;
#[cfg(feature = "socketio")]
#[cfg_attr(docsrs, doc(cfg(feature = "socketio")))]
pub mod socketio;
pub mod state;
mod status;

/// Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`, off by default).
///
/// The client frame parser and the inter-instance payload decoder are crate-private: their types
/// borrow from the input and are not an API we want to promise. Fuzzing them from outside the
/// crate needs a door, so this is the narrowest one: bytes in, "accepted or not" out, with the
/// round-trip checks done inside, where the encoders are visible. A broken property panics,
/// which is what the fuzzer catches.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod __fuzz {
    /// Parses `bytes` as a client text frame; `true` when it is a valid request.
    ///
    /// Panics if an accepted request breaks an invariant the session relies on (rooms valid,
    /// cursors that print and parse back to themselves, non-empty bodies).
    pub fn parse_client_frame(bytes: &[u8]) -> bool {
        crate::protocol::fuzz_check(bytes)
    }

    /// Decodes `bytes` as an envelope payload; `true` when it decodes.
    ///
    /// Panics if a payload that decodes, re-encoded, does not decode to the same value.
    pub fn decode_payload(bytes: &[u8]) -> bool {
        crate::payload::fuzz_check(bytes)
    }
}

pub use access::{direct_room, InvalidGrant, RoomGrants, MAX_ROOM_GRANTS};
pub use api::ApiError;
#[cfg(feature = "jwt")]
pub use auth::JwtVerifier;
pub use auth::{
    display_name, validate_user, AuthError, Identity, Verifier, MAX_NAME_CHARS, MAX_USER_LEN,
};
pub use chat::{ChatHub, ChatStats};
pub use close::{CloseCode, CloseFrame, UnknownCloseCode};
pub use config::{AllowedOrigins, RateLimit, WsConfig, DEFAULT_MAX_CONNECTIONS};
pub use hooks::{Conn, ConnData, ConnectInfo, Denied, HookKind, HookStats, Hooks, Publish};
pub use idempotency::{SendKeyConfig, SCAN_LIMIT as SEND_KEY_SCAN_LIMIT};
pub use ip::IpLimits;
pub use metrics::WsMetrics;
pub use presence::{PresenceConfig, PRESENCE_QUERY_WAIT};
pub use protocol::{ErrorCode, MAX_CLIENT_ID_LEN, MAX_EMOJI_LEN, MAX_KEY_LEN, PROTOCOL_VERSION};
pub use service::WsService;
pub use session::{TransportError, WsMessage};

/// Re-exported so apps implement [`Hooks`] (an `#[async_trait]` trait) without adding the
/// dependency themselves.
pub use async_trait::async_trait;
/// Re-exported so apps mount the router with the same axum version.
pub use axum;
/// Re-exported so apps register into a [`Registry`](prometheus_client::registry::Registry) of
/// the same version as [`WsService::register_metrics`] takes.
pub use prometheus_client;
/// Re-exported (feature `tls`) so apps build the [`rustls`](tokio_rustls::rustls)
/// configuration of [`WsService::serve_tls`] with the same version.
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use tokio_rustls;
