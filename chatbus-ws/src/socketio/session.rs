//! One Socket.IO socket as a hub session: it joins the default room and the resumed ones,
//! handles the socket's events (queued by `inbox.rs`, acted on by `actions.rs`) and emits
//! what the hub queues for it as Socket.IO events, until the client goes, the token expires,
//! the hub closes the session or the server shuts down.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use chatbus_core::{Outbound, Room, Session, SessionHandle};
use socketioxide::extract::SocketRef;
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::connect::Admitted;
use super::inbox::Inbound;
use crate::access::user_channel;
use crate::hooks::{self, Conn, HookKind};
use crate::metrics::WsCounters;
use crate::protocol::{self, ErrorCode, Limits};
use crate::service::WsService;
use crate::session::{expired, expiry_timer, TokenBucket};

/// How long the writer waits between tries when socketioxide's per-socket buffer is full.
const FULL_RETRY: Duration = Duration::from_millis(5);

/// The endpoint's settings and shared state.
#[derive(Debug)]
pub(super) struct Settings {
    pub(super) default_room: Room,
    /// The Socket.IO sessions, which the transports are closed after on shutdown.
    pub(super) sessions: TaskTracker,
    /// Set once the task that closes the transports on shutdown is started.
    pub(super) closer: OnceLock<()>,
    pub(super) translations: super::events::Translations,
}

/// On shutdown, once every Socket.IO session has flushed its queue, closes the Engine.IO
/// transports. A namespace disconnect would tell `socket.io-client` not to reconnect
/// ("io server disconnect"); a closed transport makes it reconnect, to another instance, and
/// resume there.
pub(super) async fn close_on_shutdown(svc: WsService, settings: Arc<Settings>, io: SocketIo) {
    svc.shutdown_token().cancelled().await;
    settings.sessions.close();
    settings.sessions.wait().await;
    io.close().await;
}

/// How the session ended.
enum End {
    /// The client went (or the session's inbox closed).
    ClientGone,
    /// The server ends this socket: the hub closed the session (`disconnect_user`, a slow
    /// client under the close policy) or the client stopped reading.
    Kicked,
    /// The server is shutting down: flush, then the transports are closed.
    Shutdown,
    /// The token expired.
    Expired,
}

/// During a shutdown drain, the queue counts as empty after this long without a frame.
const DRAIN_IDLE: Duration = Duration::from_millis(20);

/// Runs one socket's session until the client goes, the server shuts down or the hub
/// closes the session.
pub(super) async fn run(
    svc: WsService,
    settings: Arc<Settings>,
    socket: SocketRef,
    admitted: Arc<Admitted>,
    mut inbox: mpsc::Receiver<Inbound>,
) {
    let gone = admitted.gone.clone();
    // A client gone before its disconnect handler could fire (between admission and now).
    if !socket.connected() {
        gone.cancel();
    }
    let counters = svc.counters();
    WsCounters::inc(&counters.connections);
    WsCounters::inc(&counters.connections_total);
    let chat = svc.chat();
    chat.ensure_started();
    let mut session = chat.hub().connect(admitted.identity.user.clone());
    let handle = session.handle();
    let cfg = svc.config();
    let conn = Conn::new(
        admitted.identity.clone(),
        handle.id(),
        admitted.data.clone(),
    );
    // When the connection's token expires; a `refresh` moves it.
    let (expiry_tx, mut expiry_rx) = watch::channel(conn.identity.expires_at);
    let me = Me {
        svc: &svc,
        socket: &socket,
        handle: &handle,
        conn: &conn,
        settings: &settings,
        expiry: &expiry_tx,
    };
    // Reachable by user id (direct messages, status probes, "disconnect this user") before
    // the client hears anything, as on `/ws`.
    let reachable = handle.join(user_channel(&conn.identity.user)).await;
    chat.users().connected(handle.clone());
    me.emit_frame(&protocol::welcome(
        handle.id(),
        &conn.identity.user,
        conn.identity.display(),
        Limits::of(cfg),
    ))
    .await;
    if let Err(e) = reachable {
        me.refuse(
            ErrorCode::Unavailable,
            &format!("direct messages cannot reach this connection: {e}"),
            None,
        )
        .await;
    }
    // The default room, and every room the client resumes, each after its cursor: the hub
    // replays what the client missed, then goes live without a gap or a copy.
    let mut rooms: Vec<(Room, Option<chatbus_core::Cursor>)> = vec![(
        settings.default_room.clone(),
        admitted
            .cursors
            .iter()
            .find(|(r, _)| *r == settings.default_room)
            .map(|(_, c)| *c),
    )];
    rooms.extend(
        admitted
            .cursors
            .iter()
            .filter(|(r, _)| *r != settings.default_room)
            .map(|(r, c)| (r.clone(), Some(*c))),
    );
    for (room, since) in rooms {
        if let Err(frame) = me.join(room, since).await {
            me.emit_frame(&frame).await;
        }
    }
    tracing::debug!(session = handle.id(), user = %conn.identity.user, "socket.io connected");

    let mut bucket = cfg.rate_limit.map(TokenBucket::new);
    let expiry = async {
        loop {
            let mut timer = expiry_timer(*expiry_rx.borrow_and_update());
            tokio::select! {
                () = expired(&mut timer) => return,
                changed = expiry_rx.changed() => {
                    if changed.is_err() {
                        // The sender lives as long as the session: not reached.
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    };
    let reader = async {
        while let Some(inbound) = inbox.recv().await {
            WsCounters::inc(&counters.frames_in);
            let allowed = bucket.as_mut().is_none_or(TokenBucket::allow);
            Box::pin(me.handle(inbound, allowed)).await;
        }
    };
    let shutdown = svc.shutdown_token();
    let end = {
        let writer = me.write(&mut session);
        tokio::select! {
            () = reader => End::ClientGone,
            kicked = writer => if kicked { End::Kicked } else { End::ClientGone },
            () = gone.cancelled() => End::ClientGone,
            () = shutdown.cancelled() => End::Shutdown,
            () = expiry => End::Expired,
        }
    };
    match end {
        End::ClientGone => {}
        End::Shutdown => {
            // As on `/ws`: what is queued (acks of accepted messages included) goes out first.
            let deadline = Instant::now() + cfg.drain_timeout;
            while Instant::now() < deadline {
                let frame = match tokio::time::timeout(DRAIN_IDLE, session.recv()).await {
                    Ok(Outbound::Frame(bytes)) => bytes,
                    Ok(Outbound::Lagged { room, cursor }) => protocol::lagged(&room, cursor),
                    Ok(Outbound::Reset { room, reason }) => protocol::reset(&room, reason),
                    Ok(Outbound::Close(_)) | Err(_) => break,
                };
                if !me.emit_frame(&frame).await {
                    break;
                }
            }
        }
        End::Expired | End::Kicked => {
            if matches!(end, End::Expired) {
                me.refuse(
                    ErrorCode::Unauthorized,
                    "token expired; reconnect with a fresh token",
                    None,
                )
                .await;
            }
            // The client must not reconnect by itself (it would come back with the same
            // token, or be disconnected again): a namespace disconnect says so.
            if socket.connected() {
                if let Err(e) = socket.clone().disconnect() {
                    tracing::debug!(socket = %socket.id, error = %e, "socket.io disconnect failed");
                }
            }
        }
    }

    let rooms = handle.rooms();
    drop(session);
    chat.users().disconnected(&conn.identity.user, handle.id());
    chat.presence_changed(rooms);
    if let Some(h) = &cfg.hooks {
        let hook = async {
            h.on_disconnect(&conn).await;
            Ok(())
        };
        let _ = hooks::call(
            &counters.hooks,
            HookKind::Disconnect,
            cfg.hook_timeout,
            hook,
        )
        .await;
    }
    WsCounters::dec(&counters.connections);
    tracing::debug!(session = handle.id(), user = %conn.identity.user, "socket.io disconnected");
}

/// What a session's handlers share.
pub(super) struct Me<'a> {
    pub(super) svc: &'a WsService,
    pub(super) socket: &'a SocketRef,
    pub(super) handle: &'a SessionHandle,
    pub(super) conn: &'a Conn,
    pub(super) settings: &'a Settings,
    pub(super) expiry: &'a watch::Sender<Option<SystemTime>>,
}

/// An answer to a client event: a protocol v1 frame (`ack`, `joined`, `error`, ...).
pub(super) type Answer = Result<Bytes, Bytes>;

impl Me<'_> {
    /// Emits a v1 frame as its Socket.IO event, waiting (up to the write timeout) while the
    /// socket's buffer is full. `false`: the socket is gone or stopped reading.
    async fn emit_frame(&self, frame: &Bytes) -> bool {
        let Some(translated) = self.settings.translations.get(frame) else {
            return true;
        };
        let (event, data) = &*translated;
        let deadline = Instant::now() + self.svc.config().write_timeout;
        loop {
            match self.socket.emit(event, data) {
                Ok(()) => {
                    WsCounters::inc(&self.svc.counters().frames_out);
                    return true;
                }
                // socketioxide's emit does not wait for room in its buffer; the hub's queue in
                // front of it is what absorbs a burst, so waiting here is backpressure, not
                // loss.
                Err(SendError::Socket(SocketError::InternalChannelFull))
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(FULL_RETRY).await;
                }
                Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                    WsCounters::inc(&self.svc.counters().slow_closed);
                    tracing::debug!(socket = %self.socket.id, "socket.io client stopped reading; dropping it");
                    return false;
                }
                Err(e) => {
                    tracing::debug!(socket = %self.socket.id, error = %e, "socket.io emit failed");
                    return false;
                }
            }
        }
    }

    /// The writer: the session's queue out as events. Returns whether the server ends the
    /// connection (the hub closed the session, or the client stopped reading).
    async fn write(&self, session: &mut Session) -> bool {
        loop {
            let frame = match session.recv().await {
                Outbound::Frame(bytes) => bytes,
                Outbound::Lagged { room, cursor } => protocol::lagged(&room, cursor),
                Outbound::Reset { room, reason } => protocol::reset(&room, reason),
                // Slow consumer (close policy), `disconnect_user`, hub shutdown.
                Outbound::Close(_) => return true,
            };
            if !self.emit_frame(&frame).await {
                return true;
            }
        }
    }

    /// Counts and returns an `error` answer.
    pub(super) fn error(&self, code: ErrorCode, message: &str, room: Option<&Room>) -> Bytes {
        self.svc.counters().count_error(code);
        protocol::error(code, message, None, room)
    }

    /// An error outside any request: the `error` event.
    async fn refuse(&self, code: ErrorCode, message: &str, room: Option<&Room>) {
        let frame = self.error(code, message, room);
        self.emit_frame(&frame).await;
    }
}
