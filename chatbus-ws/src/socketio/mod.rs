//! The Socket.IO endpoint (feature `socketio`): Engine.IO v4 / Socket.IO v5 clients, such as
//! the official `socket.io-client` 4.x, connect to `/socket.io/` unchanged and chat over the
//! same [`ChatHub`](crate::ChatHub) and broker as `/ws`.
//!
//! The wire protocol (both transports, HTTP long-polling with upgrade to WebSocket, the
//! packet framing, acks) is [socketioxide]'s; everything else is chatbus's. Each Socket.IO
//! socket is a hub session like a native connection: rooms, the fan-out between instances,
//! history and resume from a cursor are the hub's, and socketioxide's own rooms and broadcast
//! are not used (a socketioxide node only reaches its local sockets). A send takes the one
//! publish path of every chat message ([`WsService::publish`] and client sends alike: access
//! checks, [`Hooks`](crate::Hooks), idempotency keys), so native and Socket.IO clients in a
//! room see each other's messages on any instance, over every broker.
//!
//! ```no_run
//! use std::sync::Arc;
//! use chatbus_core::MemoryBroker;
//! use chatbus_ws::socketio::SocketIoConfig;
//! use chatbus_ws::{ChatHub, WsConfig, WsService};
//!
//! # async fn f() -> std::io::Result<()> {
//! let ws = WsService::new(ChatHub::new(Arc::new(MemoryBroker::new())), WsConfig::default());
//! // `/ws` (always) and `/socket.io/` next to it, the seed's messages going to `general`.
//! let app = ws.socketio_router(SocketIoConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! ws.serve(listener, app, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
//!
//! The event mapping, auth and resume are specified in `docs/protocol.md`, section
//! "Socket.IO endpoint".
//!
//! # How it works
//!
//! A connect middleware (`connect.rs`) runs the native handshake's checks on the Socket.IO
//! handshake (its `auth` payload carries the token and the cursors to resume from); the
//! connect handler then starts the socket's session (`session.rs`), which joins the default
//! room and the resumed ones, handles the socket's events in the order they arrived
//! (`inbox.rs`, `actions.rs`) and emits what the hub queues for it. The hub's frames are protocol v1 JSON (encoded once per instance and
//! shared); each is turned into its Socket.IO event per recipient (`events.rs`), which costs a
//! JSON parse per delivery that native clients do not pay.

mod actions;
mod connect;
mod events;
mod inbox;
mod session;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use chatbus_core::Room;
use socketioxide::extract::SocketRef;
use socketioxide::handler::ConnectHandler;
use socketioxide::SocketIo;

use tokio_util::task::TaskTracker;

use crate::service::WsService;

use connect::Admitted;
use session::Settings;

/// Re-exported so apps that need socketioxide's own handle use the same version.
pub use socketioxide;

/// The settings of the Socket.IO endpoint. Build it from [`Default`] with the `with_*`
/// setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SocketIoConfig {
    /// Where the seed's `event:message` events go, and the room every socket joins at
    /// connect. Default `general`.
    pub default_room: Room,
    /// Packets socketioxide buffers per socket before the session waits (the hub's session
    /// queue is in front of it). Default 256.
    pub buffer: usize,
    /// Engine.IO ping interval. Default 25 s (Socket.IO's default).
    pub ping_interval: Duration,
    /// Engine.IO ping timeout: a client that does not answer a ping within this long is
    /// gone. Default 20 s (Socket.IO's default).
    pub ping_timeout: Duration,
}

impl Default for SocketIoConfig {
    fn default() -> Self {
        Self {
            default_room: Room::new("general").expect("`general` is a valid room name"),
            buffer: 256,
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
        }
    }
}

impl SocketIoConfig {
    /// Sets [`default_room`](Self::default_room).
    #[must_use]
    pub fn with_default_room(mut self, room: Room) -> Self {
        self.default_room = room;
        self
    }

    /// Sets [`buffer`](Self::buffer).
    #[must_use]
    pub fn with_buffer(mut self, buffer: usize) -> Self {
        self.buffer = buffer.max(1);
        self
    }

    /// Sets [`ping_interval`](Self::ping_interval) and [`ping_timeout`](Self::ping_timeout).
    #[must_use]
    pub fn with_ping(mut self, interval: Duration, timeout: Duration) -> Self {
        self.ping_interval = interval;
        self.ping_timeout = timeout;
        self
    }
}

impl WsService {
    /// A router with the Socket.IO endpoint at `/socket.io/`, over this service's hub and
    /// with its [`WsConfig`](crate::WsConfig) (verifier, hooks, limits). Merge it into the app
    /// passed to [`serve`](Self::serve), which adds `/ws` next to it.
    #[cfg_attr(docsrs, doc(cfg(feature = "socketio")))]
    pub fn socketio_router<S>(&self, config: SocketIoConfig) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let cfg = self.config();
        // A message is bounded by `max_frame_size` (checked per event, answered
        // `too_large`); the transport's own bound is the socket limit, as on `/ws`.
        let hard = cfg.hard_frame_size;
        let (svc_io, io) = SocketIo::builder()
            .max_buffer_size(config.buffer.max(1))
            .max_payload(u64::try_from(hard).unwrap_or(u64::MAX))
            .ws_max_message_size(hard)
            .ws_max_frame_size(hard)
            .ping_interval(config.ping_interval)
            .ping_timeout(config.ping_timeout)
            .build_svc();
        let settings = Arc::new(Settings {
            default_room: config.default_room,
            sessions: TaskTracker::new(),
            closer: OnceLock::new(),
            translations: events::Translations::default(),
        });
        let svc = self.clone();
        let admit = {
            let svc = svc.clone();
            move |s: SocketRef,
                  socketioxide::extract::TryData(auth): socketioxide::extract::TryData<
                serde_json::Value,
            >| {
                let svc = svc.clone();
                async move { connect::admit(svc, s, auth.ok()).await }
            }
        };
        let on_connect = move |socket: SocketRef, io: SocketIo| {
            let (svc, settings) = (svc.clone(), settings.clone());
            async move { start(svc, settings, socket, io) }
        };
        io.ns("/", on_connect.with(admit));
        // One service, cloned per request: every clone shares one Engine.IO session table.
        // (As a `Router::layer`, socketioxide would get one table per HTTP method, and a
        // polling client's POST would not find the session its GET opened.)
        Router::new().route_service("/socket.io/", svc_io)
    }
}

/// The connect handler: the socket passed `connect::admit`; its session starts.
fn start(svc: WsService, settings: Arc<Settings>, socket: SocketRef, io: SocketIo) {
    let admitted = socket.extensions.remove::<Arc<Admitted>>();
    let inbox = admitted.as_ref().and_then(|a| {
        a.inbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    });
    let (Some(admitted), Some(inbox)) = (admitted, inbox) else {
        // Only the middleware admits; a socket without its record was not admitted.
        let _ = socket.disconnect();
        return;
    };
    let sessions = svc.sessions().clone();
    // Started here, where a runtime surely runs (not when the router is built).
    settings.closer.get_or_init(|| {
        sessions.spawn(session::close_on_shutdown(
            svc.clone(),
            settings.clone(),
            io,
        ));
    });
    // Tracked twice: by the service, whose shutdown waits for every connection, and by the
    // endpoint, whose transports are closed once its own sessions are done.
    let run = settings.sessions.track_future(session::run(
        svc,
        settings.clone(),
        socket,
        admitted,
        inbox,
    ));
    sessions.spawn(run);
}
