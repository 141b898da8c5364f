//! The axum integration: the `/ws` route, the handshake checks, and
//! [`WsService::serve`], the one way to run a server.

use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{self, Message, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use futures::{future, SinkExt, StreamExt};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite;
use tokio_util::task::TaskTracker;

use crate::auth::{display_name, Identity};
use crate::close::CloseFrame;
use crate::hooks::{self, HookKind};
use crate::ip::Refusal;
use crate::metrics::WsCounters;
use crate::protocol::{self, ErrorCode};
use crate::service::WsService;
use crate::session::{TransportError, WsMessage};

/// Bytes tungstenite reads per `read` call (its default is 128 KiB). Before every read attempt
/// it zero-fills up to this much of its buffer, so the default cost a 128 KiB memset per read
/// attempt and made every connection resident for 128 KiB after its first frame. Client frames
/// are small (a `send` with a 100-byte body is about 160 bytes); a larger one is still read
/// whole, in several reads.
const READ_BUFFER: usize = 512;

#[derive(Deserialize, Default)]
struct ConnectParams {
    token: Option<String>,
    name: Option<String>,
}

fn refuse(svc: &WsService, status: StatusCode, code: ErrorCode, message: &str) -> Response {
    svc.counters().count_error(code);
    tracing::debug!(%status, %code, message, "handshake refused");
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        protocol::handshake_error(code, message),
    )
        .into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl WsService {
    /// A router with the socket at [`WsConfig::path`](crate::WsConfig::path) (default `/ws`), to merge into an app:
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use chatbus_core::MemoryBroker;
    /// # use chatbus_ws::{ChatHub, WsConfig, WsService};
    /// # async fn f() {
    /// let ws = WsService::new(ChatHub::new(Arc::new(MemoryBroker::new())), WsConfig::default());
    /// let app = axum::Router::new()
    ///     .route("/", axum::routing::get(|| async { "hello" }))
    ///     .merge(ws.router());
    /// # let _: axum::Router = app;
    /// # }
    /// ```
    ///
    /// Serving it yourself, set `TCP_NODELAY` on accepted sockets (as [`serve`](Self::serve)
    /// does, e.g. with `axum::serve::ListenerExt::tap_io`): with Nagle's algorithm on, a
    /// frame can wait up to the client's delayed-ACK timeout (40 ms) behind the previous one.
    pub fn router<S>(&self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        Router::new()
            .route(&self.config().path, any(ws_route))
            .with_state(self.clone())
    }

    /// Checks a WebSocket handshake (shutdown, `Origin`, token) and upgrades it, for apps that
    /// mount the socket in a handler of their own rather than with [`router`](Self::router).
    ///
    /// Refusals: 503 `unavailable` while shutting down or at
    /// [`WsConfig::max_connections`](crate::WsConfig::max_connections) (also counted in
    /// `chatbus_connections_refused_total`), 403 `forbidden` for a foreign `Origin`, 401
    /// `unauthorized` for a missing or invalid token, 400 `bad_request` for an invalid
    /// `?name=`; each with a JSON `error` body and counted by code. A connection accepted here
    /// holds one of the `max_connections` slots until its session ends; sessions started with
    /// [`run_session`](Self::run_session) directly take none.
    ///
    /// This knows no peer address, so [`WsConfig::ip_limits`](crate::WsConfig) do not apply;
    /// see [`accept_from`](Self::accept_from).
    pub async fn accept(
        &self,
        upgrade: WebSocketUpgrade,
        headers: &HeaderMap,
        uri: &Uri,
    ) -> Response {
        self.accept_from(upgrade, headers, uri, None).await
    }

    /// [`accept`](Self::accept) for a connection from `peer` (the TCP peer, e.g. axum's
    /// `ConnectInfo<SocketAddr>`, which [`serve`](Self::serve) provides): also enforces
    /// [`WsConfig::ip_limits`](crate::WsConfig), refusing with 429 `rate_limited`.
    pub async fn accept_from(
        &self,
        upgrade: WebSocketUpgrade,
        headers: &HeaderMap,
        uri: &Uri,
        peer: Option<SocketAddr>,
    ) -> Response {
        if self.is_shutting_down() {
            return refuse(
                self,
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "server shutting down",
            );
        }
        // First, and before the token check: at the limit, refusing must cost next to nothing.
        // Taken now (not after the upgrade) so that concurrent handshakes cannot overshoot it;
        // every refusal below drops it again.
        let Some(conn_slot) = self.reserve_slot() else {
            WsCounters::inc(&self.counters().connections_refused);
            return refuse(
                self,
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "server at its connection limit; retry later or elsewhere",
            );
        };
        // Before the token check: refusing a flood must cost less than verifying it.
        let limits = &self.config().ip_limits;
        let slot = match peer {
            Some(peer) if limits.enabled() => {
                let ip = limits.client_ip(peer.ip(), headers);
                match self.ips().admit(limits, ip) {
                    Ok(slot) => Some(slot),
                    Err(why) => {
                        let message = match why {
                            Refusal::TooManyConnections => "too many connections from your address",
                            Refusal::TooManyAttempts => {
                                "too many connection attempts from your address; retry later"
                            }
                        };
                        return refuse(
                            self,
                            StatusCode::TOO_MANY_REQUESTS,
                            ErrorCode::RateLimited,
                            message,
                        );
                    }
                }
            }
            _ => None,
        };
        let origin = headers
            .get(header::ORIGIN)
            .map(|v| v.to_str().unwrap_or("\u{0}"));
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        if !self.config().allowed_origins.allows(origin, host) {
            return refuse(
                self,
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "origin not allowed",
            );
        }
        let params = Query::<ConnectParams>::try_from_uri(uri)
            .map(|q| q.0)
            .unwrap_or_default();
        let identity = match &self.config().verifier {
            Some(verifier) => {
                let token = params.token.as_deref().or_else(|| bearer(headers));
                let Some(token) = token.filter(|t| !t.is_empty()) else {
                    return refuse(
                        self,
                        StatusCode::UNAUTHORIZED,
                        ErrorCode::Unauthorized,
                        "missing token",
                    );
                };
                match verifier.verify(token).await {
                    Ok(id) => id,
                    Err(e) => {
                        return refuse(
                            self,
                            StatusCode::UNAUTHORIZED,
                            ErrorCode::Unauthorized,
                            e.message(),
                        )
                    }
                }
            }
            None => match anonymous(params.name.as_deref()) {
                Ok(id) => id,
                Err(message) => {
                    return refuse(
                        self,
                        StatusCode::BAD_REQUEST,
                        ErrorCode::BadRequest,
                        &message,
                    )
                }
            },
        };
        let data = match &self.config().hooks {
            None => None,
            Some(hooks) => {
                let info = hooks::ConnectInfo::new(&identity, headers, uri, peer);
                let hook = hooks.on_connect(&info);
                let timeout = self.config().hook_timeout;
                match hooks::call(&self.counters().hooks, HookKind::Connect, timeout, hook).await {
                    Ok(data) => data,
                    Err(denied) => {
                        return refuse(
                            self,
                            StatusCode::FORBIDDEN,
                            ErrorCode::Forbidden,
                            denied.reason(),
                        )
                    }
                }
            }
        };
        let svc = self.clone();
        let limit = self.config().hard_frame_size;
        upgrade
            .max_message_size(limit)
            .max_frame_size(limit)
            .read_buffer_size(READ_BUFFER)
            .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
            .on_upgrade(move |socket| {
                let (sink, stream) = socket.split();
                let sink = sink.with(|m: WsMessage| future::ready(to_axum(m)));
                let stream = stream.map(|r| r.map(from_axum).map_err(classify));
                // The slots are held for the session's lifetime: the address's count and the
                // instance's drop when it ends (or when the upgrade fails and this closure is
                // dropped unrun). Everything goes into the session's one boxed future, so the
                // connection's task holds a pointer, not a second copy of the socket, the
                // identity and the session's arguments (an `async` block here, and an `async
                // fn` taking the socket, kept about 0.9 KiB of moved-from state per connection).
                svc.session_future(identity, data, sink, stream, (slot, conn_slot))
            })
    }

    /// Serves `app` merged with [`router`](Self::router) on `listener` until `shutdown`
    /// resolves, then shuts down gracefully (see [`shutdown`](Self::shutdown)): no new
    /// connections, every open one flushes and gets a 1001 close.
    ///
    /// This is the way to run a chatbus server; for the WebSocket endpoint alone pass an empty
    /// `Router`:
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use chatbus_core::MemoryBroker;
    /// # use chatbus_ws::{ChatHub, WsConfig, WsService};
    /// # async fn f() -> std::io::Result<()> {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// let ws = WsService::new(ChatHub::new(Arc::new(MemoryBroker::new())), WsConfig::default());
    /// ws.serve(listener, axum::Router::new(), async {
    ///     let _ = tokio::signal::ctrl_c().await;
    /// })
    /// .await
    /// # }
    /// ```
    pub async fn serve<F>(&self, listener: TcpListener, app: Router, shutdown: F) -> io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.serve_with(listener, app, shutdown, Acceptor::default())
            .await
    }

    /// [`serve`](Self::serve) over TLS (`wss://`, `https://`), with the rustls configuration
    /// `tls` (certificate chain and key; build it with [`tokio_rustls::rustls`]). The TLS
    /// handshake is part of the handshake deadline
    /// ([`WsConfig::handshake_timeout`](crate::WsConfig::handshake_timeout)); a client that
    /// fails it (plain `ws://` to this port, an untrusted certificate) is dropped and counted
    /// (`chatbus_tls_errors_total`). The configuration is fixed for the server's lifetime: to
    /// change the certificate, restart (one instance at a time, clients reconnect).
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub async fn serve_tls<F>(
        &self,
        listener: TcpListener,
        app: Router,
        tls: Arc<tokio_rustls::rustls::ServerConfig>,
        shutdown: F,
    ) -> io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let acceptor = Acceptor {
            tls: Some(tokio_rustls::TlsAcceptor::from(tls)),
        };
        self.serve_with(listener, app, shutdown, acceptor).await
    }

    async fn serve_with<F>(
        &self,
        listener: TcpListener,
        app: Router,
        shutdown: F,
        acceptor: Acceptor,
    ) -> io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let router = app.merge(self.router());
        // The HTTP connections (before their upgrade); upgraded sockets are the service's
        // sessions, which `shutdown` waits for.
        let connections = TaskTracker::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        accept_failed(e).await;
                        continue;
                    }
                },
            };
            // TCP_NODELAY: frames are small and already batched per flush by the session
            // writer; with Nagle on, a frame written while the previous one is unacknowledged
            // waits for the client's (delayed, up to 40 ms) ACK, which showed as a 35-40 ms
            // p99.9 under load.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            connections.spawn(serve_connection(
                self.clone(),
                tcp,
                peer,
                router.clone(),
                acceptor.clone(),
            ));
        }
        tracing::info!("shutting down: draining connections");
        drop(listener);
        // Every HTTP connection watches the shutdown token: an idle one closes now, one with a
        // request in flight after answering it. None can take longer than the handshake
        // deadline (or the header timeout of a kept-alive one) plus its handler.
        self.begin_shutdown();
        connections.close();
        connections.wait().await;
        self.shutdown().await;
        Ok(())
    }
}

/// An `accept` error. Per-connection errors (the peer reset before we accepted) are nothing to
/// wait for; the others (out of file descriptors, above all) would come back at once, so the
/// loop pauses instead of spinning, as hyper's and axum's servers do.
async fn accept_failed(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Serves one HTTP/1 connection until it is upgraded (the WebSocket session then runs on its
/// own) or closed.
///
/// The whole pre-upgrade phase is under [`WsConfig::handshake_timeout`](crate::WsConfig):
/// a socket that sends nothing, or trickles its headers, would otherwise hold a file
/// descriptor and a task forever (hyper's own header timeout does not start before the first
/// byte in every version, so it is only the second line here, for the later requests of a
/// kept-alive connection).
async fn serve_connection(
    svc: WsService,
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    acceptor: Acceptor,
) {
    let deadline = tokio::time::Instant::now() + svc.config().handshake_timeout;
    #[cfg(feature = "tls")]
    if let Some(tls) = acceptor.tls {
        match tokio::time::timeout_at(deadline, tls.accept(tcp)).await {
            Err(_) => {
                WsCounters::inc(&svc.counters().handshake_timeouts);
                tracing::debug!(%peer, "TLS handshake not done within the handshake timeout");
            }
            Ok(Err(e)) => {
                WsCounters::inc(&svc.counters().tls_errors);
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
            }
            Ok(Ok(stream)) => serve_http(svc, stream, peer, router, deadline).await,
        }
        return;
    }
    #[cfg(not(feature = "tls"))]
    let _ = acceptor;
    serve_http(svc, tcp, peer, router, deadline).await;
}

/// How accepted sockets are wrapped: plain, or TLS (feature `tls`).
#[derive(Clone, Default)]
struct Acceptor {
    #[cfg(feature = "tls")]
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The HTTP part of [`serve_connection`], over a plain or TLS stream, until `deadline` for the
/// first request.
async fn serve_http<I>(
    svc: WsService,
    io: I,
    peer: SocketAddr,
    router: Router,
    deadline: tokio::time::Instant,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeout = svc.config().handshake_timeout;
    // Set once the first request's head is parsed: from then on the handler (or hyper's header
    // timeout, for later requests) decides how long the connection lives.
    let seen = Arc::new(AtomicBool::new(false));
    let service = hyper::service::service_fn({
        let seen = seen.clone();
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            seen.store(true, Ordering::Relaxed);
            // What `axum::serve(..).into_make_service_with_connect_info` would provide, so
            // handlers (and the per-address limits) see the peer.
            req.extensions_mut().insert(ConnectInfo(peer));
            let mut router = router.clone();
            // A Router is always ready (`poll_ready` is a no-op), so it is called directly.
            tower_service::Service::call(&mut router, req)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let deadline = tokio::time::sleep_until(deadline);
    let mut deadline = std::pin::pin!(deadline);
    let (mut timing, mut draining) = (true, false);
    let shutdown = svc.shutdown_token().clone();
    loop {
        tokio::select! {
            biased;
            () = &mut deadline, if timing => {
                if !seen.load(Ordering::Relaxed) {
                    WsCounters::inc(&svc.counters().handshake_timeouts);
                    tracing::debug!(%peer, "no complete request within the handshake timeout; closing");
                    return; // dropping the connection closes the socket
                }
                timing = false;
            }
            () = shutdown.cancelled(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            result = conn.as_mut() => {
                if let Err(e) = result {
                    if e.is_timeout() && !seen.load(Ordering::Relaxed) {
                        // hyper's header timeout fired first: the same refusal.
                        WsCounters::inc(&svc.counters().handshake_timeouts);
                    }
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
        }
    }
}

/// The axum handler behind [`WsService::router`].
async fn ws_route(
    State(svc): State<WsService>,
    Peer(peer): Peer,
    headers: HeaderMap,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    match upgrade {
        Ok(upgrade) => svc.accept_from(upgrade, &headers, &uri, peer).await,
        Err(rejection) => rejection.into_response(),
    }
}

/// The TCP peer, when the server put it in the request (as [`WsService::serve`] and axum's
/// `into_make_service_with_connect_info` do); unlike `ConnectInfo`, never a rejection.
struct Peer(Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// The identity of a client when no verifier is configured: `?name=`, or a guest name.
pub(crate) fn anonymous(name: Option<&str>) -> Result<Identity, String> {
    let name = display_name(name.unwrap_or("")).map_err(|e| e.to_string())?;
    if name.is_empty() {
        let n = chatbus_core::MessageId::new().as_u128() as u16;
        return Identity::new(&format!("guest-{n:04x}")).map_err(|e| e.to_string());
    }
    Identity::new(name).map_err(|e| e.to_string())
}

fn to_axum(m: WsMessage) -> Result<Message, axum::Error> {
    Ok(match m {
        // Frames are built as JSON by this crate (valid UTF-8); axum checks once more, which is
        // a read over bytes already in cache, not a copy.
        WsMessage::Text(b) => Message::Text(ws::Utf8Bytes::try_from(b).map_err(axum::Error::new)?),
        WsMessage::Binary(b) => Message::Binary(b),
        WsMessage::Ping(b) => Message::Ping(b),
        WsMessage::Pong(b) => Message::Pong(b),
        WsMessage::Close(c) => Message::Close(c.map(|c| ws::CloseFrame {
            code: c.code,
            reason: ws::Utf8Bytes::from(&*c.reason),
        })),
    })
}

fn from_axum(m: Message) -> WsMessage {
    match m {
        Message::Text(t) => WsMessage::Text(Bytes::from(t)),
        Message::Binary(b) => WsMessage::Binary(b),
        Message::Ping(b) => WsMessage::Ping(b),
        Message::Pong(b) => WsMessage::Pong(b),
        Message::Close(c) => WsMessage::Close(c.map(|c| CloseFrame {
            code: c.code,
            reason: Cow::Owned(c.reason.to_string()),
        })),
    }
}

/// Recognises the read errors that have a documented outcome. axum wraps tungstenite's error
/// in its own; this crate depends on the same tungstenite release as axum to look inside.
fn classify(e: axum::Error) -> TransportError {
    match e.into_inner().downcast::<tungstenite::Error>() {
        Ok(te) => match *te {
            tungstenite::Error::Capacity(_) => TransportError::TooLarge,
            tungstenite::Error::Utf8(_) => TransportError::InvalidUtf8,
            other => TransportError::Other(Box::new(other)),
        },
        Err(other) => TransportError::Other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_anonymous() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().expect("header"));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().expect("header"));
        assert_eq!(bearer(&h), None);
        assert_eq!(
            anonymous(Some(" Ann ")).map(|i| i.user).ok().as_deref(),
            Some("Ann")
        );
        assert!(anonymous(None).is_ok_and(|i| i.user.starts_with("guest-")));
        assert!(anonymous(Some(&"x".repeat(40))).is_err());
    }
}
