//! [`WsService`]: the transport's shared state, independent of the HTTP framework.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::{Sink, Stream};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Identity;
use crate::chat::ChatHub;
use crate::config::WsConfig;
use crate::hooks::ConnData;
use crate::ip::IpTable;
use crate::metrics::{self, WsCounters, WsMetrics};
use crate::session::{self, TransportError, WsMessage};

/// The WebSocket transport of one server: a [`ChatHub`], a [`WsConfig`], counters, and the
/// shutdown state. Cheap to clone.
///
/// Mount it in an axum app with [`router`](Self::router), or drive a connection over any
/// `Sink`/`Stream` of [`WsMessage`]s with [`run_session`](Self::run_session).
#[derive(Clone)]
pub struct WsService {
    inner: Arc<Inner>,
}

struct Inner {
    chat: ChatHub,
    config: WsConfig,
    counters: WsCounters,
    shutdown: CancellationToken,
    sessions: TaskTracker,
    ips: Arc<IpTable>,
    /// Connection slots taken ([`ConnSlot`]s alive): handshakes past the checks and open
    /// sessions, at most [`WsConfig::max_connections`].
    slots: Arc<AtomicUsize>,
}

/// A [`WsService`] that does not keep it alive (for the metrics collector).
pub(crate) struct WeakService(Weak<Inner>);

impl WeakService {
    pub(crate) fn upgrade(&self) -> Option<WsService> {
        self.0.upgrade().map(|inner| WsService { inner })
    }
}

impl fmt::Debug for WeakService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakService")
            .field("alive", &(self.0.strong_count() > 0))
            .finish()
    }
}

impl fmt::Debug for WsService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsService")
            .field("chat", &self.inner.chat)
            .field("config", &self.inner.config)
            .field("sessions", &self.inner.sessions.len())
            .finish_non_exhaustive()
    }
}

impl WsService {
    /// A transport over `chat` with `config`.
    pub fn new(chat: ChatHub, config: WsConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                chat,
                config,
                counters: WsCounters::default(),
                shutdown: CancellationToken::new(),
                sessions: TaskTracker::new(),
                ips: Arc::default(),
                slots: Arc::default(),
            }),
        }
    }

    /// The chat hub.
    pub fn chat(&self) -> &ChatHub {
        &self.inner.chat
    }

    /// The configuration.
    pub fn config(&self) -> &WsConfig {
        &self.inner.config
    }

    /// A snapshot of the transport's counters (the hub's are in
    /// [`Hub::stats`](chatbus_core::Hub::stats), the chat layer's in [`ChatHub::stats`]).
    pub fn metrics(&self) -> WsMetrics {
        self.inner.counters.snapshot()
    }

    /// Registers this transport's counters and its hub's in `registry`, to be encoded at
    /// scrape time (see [the crate docs](crate#metrics) for the names and an example).
    ///
    /// What is registered is a collector that reads the snapshots ([`metrics`](Self::metrics),
    /// [`Hub::stats`](chatbus_core::Hub::stats), [`ChatHub::stats`]) when the registry is
    /// encoded: nothing is counted twice on the hot path. It holds the service weakly, so the
    /// registry does not keep the hub alive; once the service is dropped it reports nothing.
    pub fn register_metrics(&self, registry: &mut Registry) {
        metrics::register(WeakService(Arc::downgrade(&self.inner)), registry);
    }

    pub(crate) fn counters(&self) -> &WsCounters {
        &self.inner.counters
    }

    pub(crate) fn ips(&self) -> &Arc<IpTable> {
        &self.inner.ips
    }

    /// Takes one of the instance's [`WsConfig::max_connections`] slots, or `None` when all
    /// are taken. Atomic (a compare-and-swap loop, no lock): concurrent handshakes can never
    /// take more slots than the limit, and a refused one takes none.
    pub(crate) fn reserve_slot(&self) -> Option<ConnSlot> {
        let max = self.inner.config.max_connections;
        self.inner
            .slots
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ConnSlot(self.inner.slots.clone()))
    }

    /// The sessions [`shutdown`](Self::shutdown) waits for (Socket.IO sessions are spawned
    /// into it too).
    #[cfg(feature = "socketio")]
    pub(crate) fn sessions(&self) -> &TaskTracker {
        &self.inner.sessions
    }

    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Runs one connection for `identity` over a sink and a stream of WebSocket messages, until
    /// either side closes. This is what the axum integration calls after the upgrade; tests
    /// and other transports can call it with channels.
    ///
    /// The identity must already be verified (the handshake is where tokens are checked).
    pub async fn run_session<Si, St>(&self, identity: Identity, sink: Si, stream: St)
    where
        Si: Sink<WsMessage> + Unpin + Send,
        Si::Error: fmt::Display,
        St: Stream<Item = Result<WsMessage, TransportError>> + Unpin + Send,
    {
        self.run_session_with(identity, None, sink, stream).await;
    }

    /// [`run_session`](Self::run_session) with the data a
    /// [`Hooks::on_connect`](crate::Hooks::on_connect) attached (the caller ran the hook).
    pub async fn run_session_with<Si, St>(
        &self,
        identity: Identity,
        data: ConnData,
        sink: Si,
        stream: St,
    ) where
        Si: Sink<WsMessage> + Unpin + Send,
        Si::Error: fmt::Display,
        St: Stream<Item = Result<WsMessage, TransportError>> + Unpin + Send,
    {
        // Boxed: inline, rustc keeps the moved-in sink and stream next to the session's future,
        // and all of it inside the connection's task (about 2.2 KiB over axum's socket); boxed,
        // the session state is one allocation of the size it needs (about 0.7 KiB).
        // Boxed: inline, rustc keeps the moved-in sink and stream next to the session's future,
        // and all of it inside the connection's task (about 2.2 KiB over axum's socket); boxed,
        // the session state is one allocation of the size it needs (about 0.7 KiB).
        self.inner
            .sessions
            .track_future(Box::pin(session::run(
                self,
                identity,
                data,
                sink,
                stream,
                (),
            )))
            .await;
    }

    /// One connection's session as a boxed, tracked future that owns all it needs (a clone of
    /// this service, the sink and stream, and `guard`, dropped when it ends).
    pub(crate) fn session_future<Si, St, G>(
        &self,
        identity: Identity,
        data: ConnData,
        sink: Si,
        stream: St,
        guard: G,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        Si: Sink<WsMessage> + Unpin + Send + 'static,
        Si::Error: fmt::Display,
        St: Stream<Item = Result<WsMessage, TransportError>> + Unpin + Send + 'static,
        G: Send + 'static,
    {
        // Boxed, as in `run_session_with`; owning the service, it needs no caller's frame.
        self.inner.sessions.track_future(Box::pin(session::run(
            self.clone(),
            identity,
            data,
            sink,
            stream,
            guard,
        )))
    }

    /// Whether shutdown has begun (new connections are refused with 503).
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Begins a graceful shutdown without waiting: connections stop reading, finish the
    /// request in flight (a publish completes and its ack is queued), flush their queues and
    /// close with 1001.
    pub fn begin_shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Shuts down gracefully: [`begin_shutdown`](Self::begin_shutdown), then waits for the
    /// connections to close (at most [`WsConfig::drain_timeout`] plus a second), then closes
    /// whatever hub sessions remain.
    pub async fn shutdown(&self) {
        self.begin_shutdown();
        self.inner.sessions.close();
        let grace = self.inner.config.drain_timeout + Duration::from_secs(1);
        if tokio::time::timeout(grace, self.inner.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.inner.sessions.len(),
                "connections still open after the drain timeout"
            );
        }
        self.inner.chat.hub().shutdown();
    }
}

/// One of the instance's connection slots, taken at the handshake and given back when dropped:
/// when the session ends, or when the upgrade fails and its closure is dropped unrun.
#[derive(Debug)]
pub(crate) struct ConnSlot(Arc<AtomicUsize>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
