//! The WebSocket transport of chatbus: protocol v1 (JSON text frames), the session loop, the
//! auth hook, limits, and an axum integration you mount in your own app in a few lines.
//!
//! - [`ChatHub`] is a [`chatbus_core::Hub`] whose frames are protocol v1 JSON, with presence
//!   shared between instances. Build it over any broker (memory, Redis, Kafka, DualBus).
//! - [`WsService`] is the transport: [`router`](WsService::router) gives an axum `Router` with
//!   the socket at `/ws`; [`serve`] runs it standalone; [`run_session`](WsService::run_session)
//!   drives one connection over any `Sink`/`Stream` of [`WsMessage`]s.
//! - [`WsConfig`] holds the limits (frame size, rate, rooms, origins, idle timeout) and the
//!   token [`Verifier`] ([`JwtVerifier`] for HS256 / RS256, feature `jwt`, on by default).
//! - Every refused input is counted by [`ErrorCode`] in [`WsMetrics`];
//!   [`render_metrics`](WsService::render_metrics) gives the Prometheus text.
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
//! # How it works
//!
//! A connection is authenticated at the handshake (origin check, then token or `?name=`), then
//! runs a reader and a writer concurrently. The reader parses each frame once, validates it,
//! and calls the hub (`join`, `leave`, `publish`, `history`); replies are queued on the
//! session's control queue so they overtake queued messages. The writer drains the session's
//! queue, batching up to 64 frames per flush, and sends WebSocket pings. Chat messages travel
//! between instances as envelopes whose payload is a 1-byte tag plus a compact body; every
//! instance turns each envelope into its JSON frame once and shares the bytes among its
//! recipients. Presence: each instance publishes an ephemeral snapshot of its local members of
//! a room when they change and every 10 s; every instance unions the latest snapshots.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod auth;
mod chat;
mod config;
mod metrics;
mod payload;
mod protocol;
mod server;
mod service;
mod session;

#[cfg(feature = "jwt")]
pub use auth::JwtVerifier;
pub use auth::{display_name, AuthError, Identity, Verifier, MAX_NAME_CHARS, MAX_USER_LEN};
pub use chat::{ChatHub, ChatStats, PresenceConfig};
pub use config::{AllowedOrigins, RateLimit, WsConfig};
pub use metrics::WsMetrics;
pub use protocol::{ErrorCode, MAX_CLIENT_ID_LEN, PROTOCOL_VERSION};
pub use server::serve;
pub use service::WsService;
pub use session::{
    CloseFrame, TransportError, WsMessage, CLOSE_GOING_AWAY, CLOSE_IDLE_TIMEOUT,
    CLOSE_INVALID_DATA, CLOSE_SLOW_CONSUMER, CLOSE_TOO_LARGE,
};

/// Re-exported so apps mount the router with the same axum version.
pub use axum;
