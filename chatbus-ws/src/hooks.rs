//! Application hooks: the [`Hooks`] trait the application implements, and the runner that puts
//! every call under a deadline, catches panics and counts it.
//!
//! A hook is the application's say on a connection's actions: accept or deny a connection and
//! attach data to it, allow or deny a join, a history read, a typing event or a send, rewrite or
//! refuse a message before it is published, and learn of a disconnect. The transport calls them
//! in the order of the connection's frames, each after the built-in checks (token grants,
//! reserved rooms, limits) passed. A hook that returns [`Denied`], errors, runs past
//! [`WsConfig::hook_timeout`](crate::WsConfig::hook_timeout) or panics denies the action: the
//! client gets an `error` frame with code `forbidden` and the session goes on.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::http::{HeaderMap, Uri};
use chatbus_core::Room;
use futures::FutureExt;
use tokio::time::Instant;

use crate::auth::Identity;
use crate::config::WsConfig;

/// Data the application attaches to a connection in [`Hooks::on_connect`], handed back in
/// every later hook through [`Conn::data`].
pub type ConnData = Option<Arc<dyn Any + Send + Sync>>;

/// What [`Hooks::on_connect`] sees of a connection being opened.
#[derive(Debug)]
#[non_exhaustive]
pub struct ConnectInfo<'a> {
    /// The verified identity (token checked, or the anonymous name).
    pub identity: &'a Identity,
    /// The upgrade request's headers.
    pub headers: &'a HeaderMap,
    /// The upgrade request's URI (path and query: a `?team=` the page passes, say).
    pub uri: &'a Uri,
    /// The TCP peer's address, if the server knows it ([`WsService::serve`](crate::WsService::serve) does).
    pub addr: Option<SocketAddr>,
}

impl<'a> ConnectInfo<'a> {
    /// What a connection of `identity` presents (for transports of your own and tests).
    pub fn new(
        identity: &'a Identity,
        headers: &'a HeaderMap,
        uri: &'a Uri,
        addr: Option<SocketAddr>,
    ) -> Self {
        Self {
            identity,
            headers,
            uri,
            addr,
        }
    }
}

/// One open connection, as the hooks see it.
#[derive(Clone)]
#[non_exhaustive]
pub struct Conn {
    /// Who it is.
    pub identity: Identity,
    /// The session id (the `session` of its `welcome` frame).
    pub session: u64,
    /// What [`Hooks::on_connect`] attached.
    pub data: ConnData,
}

impl Conn {
    pub(crate) fn new(identity: Identity, session: u64, data: ConnData) -> Self {
        Self {
            identity,
            session,
            data,
        }
    }

    /// The attached data, if it is a `T`.
    pub fn data<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.data.as_deref()?.downcast_ref()
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("user", &self.identity.user)
            .field("session", &self.session)
            .field("data", &self.data.is_some())
            .finish()
    }
}

/// A refusal by a hook, with the reason the client sees in its `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    reason: Cow<'static, str>,
}

impl Denied {
    /// A refusal with a reason for the client (keep secrets out of it).
    pub fn new(reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            reason: reason.into(),
        }
    }

    /// The reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Denied {}

/// A chat message about to be published, for [`Hooks::on_publish`]: a client's `send` (to a
/// room or a user) or a message of the server API.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Publish {
    /// The room it goes to (for a direct message: the conversation's room).
    pub room: Room,
    /// The sender's user id.
    pub from: Arc<str>,
    /// The recipient of a direct message.
    pub to: Option<Arc<str>>,
    /// The text; a hook may rewrite it (moderation, mentions, enrichment). An empty body after
    /// the hook is refused.
    pub body: String,
    /// Whether it comes from the server API rather than a client connection.
    pub by_server: bool,
}

/// The application's hooks. Every method has a default that allows what chatbus allows
/// without hooks, so an implementation overrides only what it needs.
///
/// ```
/// use async_trait::async_trait;
/// use chatbus_core::Room;
/// use chatbus_ws::{Conn, Denied, Hooks, Publish};
///
/// #[derive(Debug)]
/// struct NoShouting;
///
/// #[async_trait]
/// impl Hooks for NoShouting {
///     async fn on_join(&self, conn: &Conn, room: &Room) -> Result<(), Denied> {
///         if room.as_str() == "admins" && &*conn.identity.user != "root" {
///             return Err(Denied::new("admins only"));
///         }
///         Ok(())
///     }
///     async fn on_publish(&self, publish: &mut Publish) -> Result<(), Denied> {
///         publish.body = publish.body.to_lowercase();
///         Ok(())
///     }
/// }
/// # let _ = chatbus_ws::WsConfig::default().with_hooks(NoShouting);
/// ```
#[async_trait]
pub trait Hooks: Send + Sync + fmt::Debug + 'static {
    /// A connection is being opened (after the token check, before the WebSocket upgrade).
    /// `Err` refuses it with HTTP 403 and the reason; `Ok` attaches data to it.
    async fn on_connect(&self, info: &ConnectInfo<'_>) -> Result<ConnData, Denied> {
        let _ = info;
        Ok(None)
    }

    /// A `join` of `room` (after the token's grants allowed it).
    async fn on_join(&self, conn: &Conn, room: &Room) -> Result<(), Denied> {
        let _ = (conn, room);
        Ok(())
    }

    /// A `history` request for `room`.
    async fn on_history(&self, conn: &Conn, room: &Room) -> Result<(), Denied> {
        let _ = (conn, room);
        Ok(())
    }

    /// A `typing` event in `room`.
    async fn on_typing(&self, conn: &Conn, room: &Room) -> Result<(), Denied> {
        let _ = (conn, room);
        Ok(())
    }

    /// A client's `send` to `room` (for a direct message: the conversation's room), before
    /// [`on_publish`](Self::on_publish).
    async fn on_send(&self, conn: &Conn, room: &Room, body: &str) -> Result<(), Denied> {
        let _ = (conn, room, body);
        Ok(())
    }

    /// Every chat message before it is published, from a client or the server API: may
    /// rewrite [`Publish::body`] or refuse it.
    async fn on_publish(&self, publish: &mut Publish) -> Result<(), Denied> {
        let _ = publish;
        Ok(())
    }

    /// The connection closed (for whatever reason). Runs after it left its rooms.
    async fn on_disconnect(&self, conn: &Conn) {
        let _ = conn;
    }
}

/// Hooks shared with the rest of the application (`WsConfig::with_hooks(Arc::clone(&hooks))`).
#[async_trait]
impl<T: Hooks + ?Sized> Hooks for Arc<T> {
    async fn on_connect(&self, info: &ConnectInfo<'_>) -> Result<ConnData, Denied> {
        (**self).on_connect(info).await
    }
    async fn on_join(&self, conn: &Conn, room: &Room) -> Result<(), Denied> {
        (**self).on_join(conn, room).await
    }
    async fn on_history(&self, conn: &Conn, room: &Room) -> Result<(), Denied> {
        (**self).on_history(conn, room).await
    }
    async fn on_typing(&self, conn: &Conn, room: &Room) -> Result<(), Denied> {
        (**self).on_typing(conn, room).await
    }
    async fn on_send(&self, conn: &Conn, room: &Room, body: &str) -> Result<(), Denied> {
        (**self).on_send(conn, room, body).await
    }
    async fn on_publish(&self, publish: &mut Publish) -> Result<(), Denied> {
        (**self).on_publish(publish).await
    }
    async fn on_disconnect(&self, conn: &Conn) {
        (**self).on_disconnect(conn).await;
    }
}

/// Which hook; labels the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HookKind {
    /// [`Hooks::on_connect`].
    Connect,
    /// [`Hooks::on_join`].
    Join,
    /// [`Hooks::on_history`].
    History,
    /// [`Hooks::on_typing`].
    Typing,
    /// [`Hooks::on_send`].
    Send,
    /// [`Hooks::on_publish`].
    Publish,
    /// [`Hooks::on_disconnect`].
    Disconnect,
}

impl HookKind {
    /// Every hook, in a stable order.
    pub const ALL: [Self; 7] = [
        Self::Connect,
        Self::Join,
        Self::History,
        Self::Typing,
        Self::Send,
        Self::Publish,
        Self::Disconnect,
    ];

    /// The label, e.g. `"join"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Join => "join",
            Self::History => "history",
            Self::Typing => "typing",
            Self::Send => "send",
            Self::Publish => "publish",
            Self::Disconnect => "disconnect",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one hook, from [`WsMetrics::hook`](crate::WsMetrics::hook).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HookStats {
    /// Calls.
    pub calls: u64,
    /// Calls that returned [`Denied`].
    pub denials: u64,
    /// Calls that ran past the timeout or panicked (each also denied the action).
    pub failures: u64,
    /// Time spent in the hook, in microseconds, summed over calls.
    pub micros: u64,
}

#[derive(Debug, Default)]
pub(crate) struct HookCounters {
    calls: [AtomicU64; HookKind::ALL.len()],
    denials: [AtomicU64; HookKind::ALL.len()],
    failures: [AtomicU64; HookKind::ALL.len()],
    micros: [AtomicU64; HookKind::ALL.len()],
}

impl HookCounters {
    pub(crate) fn snapshot(&self) -> [HookStats; HookKind::ALL.len()] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HookKind::ALL.map(|k| {
            let i = k.index();
            HookStats {
                calls: get(&self.calls[i]),
                denials: get(&self.denials[i]),
                failures: get(&self.failures[i]),
                micros: get(&self.micros[i]),
            }
        })
    }
}

/// Runs one hook call: under `timeout`, with panics caught, counted in `counters`.
/// The application's hook for a client's action on `room` (join, history, typing, send with
/// its `body`), through [`call`]; `Ok` when no hooks are configured. One place for both
/// endpoints (`/ws` and Socket.IO).
pub(crate) async fn room_action(
    config: &WsConfig,
    counters: &HookCounters,
    conn: &Conn,
    kind: HookKind,
    room: &Room,
    body: Option<&str>,
) -> Result<(), Denied> {
    let Some(h) = &config.hooks else {
        return Ok(());
    };
    let hook = async {
        match kind {
            HookKind::Join => h.on_join(conn, room).await,
            HookKind::History => h.on_history(conn, room).await,
            HookKind::Typing => h.on_typing(conn, room).await,
            _ => h.on_send(conn, room, body.unwrap_or_default()).await,
        }
    };
    call(counters, kind, config.hook_timeout, hook).await
}

pub(crate) async fn call<T, F>(
    counters: &HookCounters,
    kind: HookKind,
    timeout: Duration,
    hook: F,
) -> Result<T, Denied>
where
    F: Future<Output = Result<T, Denied>>,
{
    let i = kind.index();
    let start = Instant::now();
    // The hook is the application's code: a panic in it must deny this one action, not unwind
    // through the session (which would drop the connection without a close frame).
    let outcome = tokio::time::timeout(timeout, AssertUnwindSafe(hook).catch_unwind()).await;
    let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    counters.calls[i].fetch_add(1, Ordering::Relaxed);
    counters.micros[i].fetch_add(micros, Ordering::Relaxed);
    match outcome {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(denied))) => {
            counters.denials[i].fetch_add(1, Ordering::Relaxed);
            Err(denied)
        }
        Ok(Err(_panic)) => {
            counters.failures[i].fetch_add(1, Ordering::Relaxed);
            tracing::error!(hook = kind.as_str(), "hook panicked; the action is denied");
            Err(Denied::new("refused: the server's hook failed"))
        }
        Err(_elapsed) => {
            counters.failures[i].fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                hook = kind.as_str(),
                ?timeout,
                "hook timed out; the action is denied"
            );
            Err(Denied::new("refused: the server's hook timed out"))
        }
    }
}
