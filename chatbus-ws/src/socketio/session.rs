//! One Socket.IO socket as a hub session: its client events in order, the session's queue
//! out as Socket.IO events.
//!
//! socketioxide runs each event handler in a task of its own, so two events of one socket
//! could be handled in either order. Events are therefore not handled in socketioxide's
//! handlers: the [`Queued`] extractor, which socketioxide runs synchronously in the order the
//! packets arrive, puts each event on the socket's bounded inbox, and this session handles
//! them one after another, as the native reader handles frames (a client's messages are
//! published in the order it sent them).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chatbus_core::{Envelope, JoinOptions, Outbound, Room, Session, SessionHandle};
use serde_json::Value;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, SocketRef};
use socketioxide::handler::FromMessageParts;
use socketioxide::socket::Socket;
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connect::Admitted;
use super::events::{self, Bad, Event};
use crate::access::{self, user_channel};
use crate::api::{ApiError, Outgoing, Published};
use crate::chat::history_item;
use crate::hooks::{self, Conn, HookKind};
use crate::metrics::WsCounters;
use crate::protocol::{self, ErrorCode, Limits};
use crate::service::WsService;
use crate::session::{expired, expiry_timer, TokenBucket};

/// Events queued per socket before further ones are refused (`rate_limited`): the rate limit
/// keeps a well-behaved client far below it; it bounds what a flood can make the server hold.
pub(super) const INBOX: usize = 64;

/// How long the writer waits between tries when socketioxide's per-socket buffer is full.
const FULL_RETRY: Duration = Duration::from_millis(5);

/// The queued form of a client event: boxed, because the channel allocates its slots up front
/// (a block of 32), which for an idle socket would be 32 whole events.
pub(super) type Inbound = Box<InboundEvent>;

/// One client event, as queued for the session.
pub(super) struct InboundEvent {
    event: Result<String, String>,
    data: Result<Value, String>,
    /// Whether the client passed an ack callback (then answers go to it, not to `error`).
    wants_ack: bool,
    ack: AckSender,
}

/// The sending side of a socket's inbox, kept in the socket's extensions.
#[derive(Clone)]
struct InboxTx(pub(super) mpsc::Sender<Inbound>, pub(super) WsService);

/// The extractor of the catch-all event handler; queuing is its side effect (see the module
/// docs). It never fails: what cannot be queued is answered here.
pub(super) struct Queued;

impl FromMessageParts<LocalAdapter> for Queued {
    type Error = Infallible;

    fn from_message_parts(
        s: &Arc<Socket<LocalAdapter>>,
        v: &mut socketioxide::handler::Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, Infallible> {
        let event = socketioxide::extract::Event::from_message_parts(s, v, ack_id)
            .map(|e| e.0)
            .map_err(|e| e.to_string());
        let data = match socketioxide::extract::TryData::<Value>::from_message_parts(s, v, ack_id) {
            Ok(socketioxide::extract::TryData(Ok(d))) => Ok(d),
            Ok(socketioxide::extract::TryData(Err(e))) => Err(e.to_string()),
            Err(never) => match never {},
        };
        let ack = match AckSender::from_message_parts(s, v, ack_id) {
            Ok(ack) => ack,
            Err(never) => match never {},
        };
        let inbound = Box::new(InboundEvent {
            event,
            data,
            wants_ack: ack_id.is_some(),
            ack,
        });
        let Some(InboxTx(tx, svc)) = s.extensions.get::<InboxTx>() else {
            return Ok(Self);
        };
        // A closed inbox: the session has ended, and the event has no one to act on it.
        if let Err(mpsc::error::TrySendError::Full(inbound)) = tx.try_send(inbound) {
            WsCounters::inc(&svc.counters().frames_in);
            let frame = protocol::error(
                ErrorCode::RateLimited,
                "too many events queued; event dropped",
                None,
                None,
            );
            svc.counters().count_error(ErrorCode::RateLimited);
            answer_now(&SocketRef::from(s.clone()), *inbound, &frame);
        }
        Ok(Self)
    }
}

/// Answers an event at once: to its ack callback, or as an `error` event if it is an error
/// and the client gave no callback.
fn answer_now(socket: &SocketRef, inbound: InboundEvent, frame: &[u8]) {
    let data = events::answer(frame);
    let result = if inbound.wants_ack {
        inbound.ack.send(&data)
    } else if data.get("code").is_some() {
        socket.emit("error", &data)
    } else {
        Ok(())
    };
    if let Err(e) = result {
        tracing::debug!(socket = %socket.id, error = %e, "socket.io answer not sent");
    }
}

/// Opens the socket's inbox and registers its handlers, from the connect middleware: the
/// client may emit as soon as it hears its CONNECT, which socketioxide sends before the
/// connect handler runs, so events must be caught from admission on. The session handles
/// them once it has joined its rooms.
pub(super) fn open(
    svc: &WsService,
    socket: &SocketRef,
) -> (mpsc::Receiver<Inbound>, CancellationToken) {
    let (tx, rx) = mpsc::channel(INBOX);
    socket.extensions.insert(InboxTx(tx, svc.clone()));
    socket.on_fallback(async |_: Queued| {});
    let gone = CancellationToken::new();
    socket.on_disconnect({
        let gone = gone.clone();
        async move || gone.cancel()
    });
    (rx, gone)
}

/// The endpoint's settings and shared state.
#[derive(Debug)]
pub(super) struct Settings {
    pub(super) default_room: Room,
    /// The Socket.IO sessions, which the transports are closed after on shutdown.
    pub(super) sessions: TaskTracker,
    /// Set once the task that closes the transports on shutdown is started.
    pub(super) closer: OnceLock<()>,
    pub(super) translations: Translations,
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

/// Frames last translated into Socket.IO events, shared by the instance's sessions.
///
/// The hub encodes a message once and gives every recipient the same bytes; without this,
/// each of a room's sockets would parse and rebuild the same event. An entry holds its frame,
/// so the allocation it is recognised by (pointer and length) cannot be freed and reused
/// for another frame while the entry exists.
#[derive(Debug, Default)]
pub(super) struct Translations {
    recent: Mutex<VecDeque<(Bytes, Translated)>>,
}

/// A frame as a Socket.IO event: its name and argument.
type Translated = Arc<(String, Value)>;

/// Frames remembered: the messages in flight at once in a busy instance's rooms; a miss only
/// costs the translation.
const TRANSLATIONS: usize = 64;

impl Translations {
    fn get(&self, frame: &Bytes) -> Option<Translated> {
        let same = |b: &Bytes| b.as_ptr() == frame.as_ptr() && b.len() == frame.len();
        {
            let recent = crate::chat::lock(&self.recent);
            if let Some((_, t)) = recent.iter().find(|(b, _)| same(b)) {
                return Some(t.clone());
            }
        }
        // Translated outside the lock; two sessions may both do it once, which is harmless.
        let translated = Arc::new(events::outbound(frame)?);
        let mut recent = crate::chat::lock(&self.recent);
        if recent.len() >= TRANSLATIONS {
            recent.pop_front();
        }
        recent.push_back((frame.clone(), translated.clone()));
        Some(translated)
    }
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
        Limits {
            max_frame_size: cfg.max_frame_size,
            max_rooms: cfg.max_rooms,
            max_history: cfg.max_history,
            rate_per_second: cfg.rate_limit.map(|r| r.per_second),
            rate_burst: cfg.rate_limit.map(|r| r.burst),
        },
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
struct Me<'a> {
    svc: &'a WsService,
    socket: &'a SocketRef,
    handle: &'a SessionHandle,
    conn: &'a Conn,
    settings: &'a Settings,
    expiry: &'a watch::Sender<Option<SystemTime>>,
}

/// An answer to a client event: a protocol v1 frame (`ack`, `joined`, `error`, ...).
type Answer = Result<Bytes, Bytes>;

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
    fn error(&self, code: ErrorCode, message: &str, room: Option<&Room>) -> Bytes {
        self.svc.counters().count_error(code);
        protocol::error(code, message, None, room)
    }

    /// An error outside any request: the `error` event.
    async fn refuse(&self, code: ErrorCode, message: &str, room: Option<&Room>) {
        let frame = self.error(code, message, room);
        self.emit_frame(&frame).await;
    }

    async fn handle(&self, inbound: Inbound, allowed: bool) {
        let answer = match (&inbound.event, &inbound.data) {
            (Err(e), _) | (_, Err(e)) => Err(self.error(
                ErrorCode::BadRequest,
                &format!("undecodable event: {e}"),
                None,
            )),
            (Ok(_), Ok(_)) if !allowed => Err(self.error(
                ErrorCode::RateLimited,
                "rate limit exceeded; event dropped",
                None,
            )),
            (Ok(name), Ok(data)) => match events::parse(name, data.clone()) {
                Err(Bad { code, message }) => Err(self.error(code, &message, None)),
                Ok(event) => self.act(event).await,
            },
        };
        let frame = match answer {
            Ok(f) | Err(f) => f,
        };
        answer_now(self.socket, *inbound, &frame);
    }

    async fn act(&self, event: Event) -> Answer {
        match event {
            Event::Send { room, body, key } => {
                let room = room.unwrap_or_else(|| self.settings.default_room.clone());
                self.send(room, body, key).await
            }
            Event::Join { room, since } => self.join(room, since).await,
            Event::Leave { room } => {
                // The personal and status channels are the server's, not the client's to leave.
                self.access(&room)?;
                if !self.handle.leave(&room) {
                    return Err(self.not_joined(&room));
                }
                self.svc.chat().presence_changed([room.clone()]);
                Ok(protocol::left(&room, None))
            }
            Event::Refresh { token } => self.refresh(&token).await,
            Event::Typing { room } => {
                self.access(&room)?;
                self.member(&room)?;
                self.hook(HookKind::Typing, &room, None).await?;
                let env = Envelope::ephemeral(
                    room,
                    crate::payload::typing(self.conn.identity.display_name_if_different()),
                )
                .with_from(self.conn.identity.user.clone());
                match self.svc.chat().hub().publish(&env).await {
                    Ok(_) => Ok(Bytes::from_static(b"{\"type\":\"typing\"}")),
                    Err(e) => Err(self.broker_error(&e, &env.room, "typing")),
                }
            }
            Event::History {
                room,
                before,
                limit,
            } => {
                self.access(&room)?;
                if !room.as_str().starts_with(access::DIRECT_PREFIX) {
                    self.member(&room)?;
                }
                self.hook(HookKind::History, &room, None).await?;
                let cfg = self.svc.config();
                let limit = limit
                    .map_or(cfg.default_history, |l| {
                        usize::try_from(l).unwrap_or(usize::MAX)
                    })
                    .clamp(1, cfg.max_history.max(1));
                match self.svc.chat().hub().history(&room, before, limit).await {
                    Ok(page) => {
                        let items: Vec<Bytes> =
                            page.messages.iter().filter_map(history_item).collect();
                        let more = page.more_before.map(|c| c.to_string());
                        Ok(protocol::history(&room, &items, more.as_deref(), None))
                    }
                    Err(e) => Err(self.broker_error(&e, &room, "history")),
                }
            }
        }
    }

    /// The built-in access checks (reserved rooms, other pairs' conversations, the token's
    /// grants), first, as on `/ws`: a third user learns nothing of a room.
    fn access(&self, room: &Room) -> Result<(), Bytes> {
        access::check(&self.conn.identity, room)
            .map_err(|reason| self.error(ErrorCode::Forbidden, reason, Some(room)))
    }

    fn member(&self, room: &Room) -> Result<(), Bytes> {
        if self.handle.is_member(room) {
            Ok(())
        } else {
            Err(self.not_joined(room))
        }
    }

    fn not_joined(&self, room: &Room) -> Bytes {
        self.error(ErrorCode::NotJoined, "join the room first", Some(room))
    }

    async fn hook(&self, kind: HookKind, room: &Room, body: Option<&str>) -> Result<(), Bytes> {
        let cfg = self.svc.config();
        let Some(h) = &cfg.hooks else {
            return Ok(());
        };
        let conn = self.conn;
        let hook = async {
            match kind {
                HookKind::Join => h.on_join(conn, room).await,
                HookKind::History => h.on_history(conn, room).await,
                HookKind::Typing => h.on_typing(conn, room).await,
                _ => h.on_send(conn, room, body.unwrap_or_default()).await,
            }
        };
        hooks::call(&self.svc.counters().hooks, kind, cfg.hook_timeout, hook)
            .await
            .map_err(|d| self.error(ErrorCode::Forbidden, d.reason(), Some(room)))
    }

    async fn join(&self, room: Room, since: Option<chatbus_core::Cursor>) -> Answer {
        let cfg = self.svc.config();
        let chat = self.svc.chat();
        if !self.handle.is_member(&room) {
            let joined = self
                .handle
                .rooms()
                .iter()
                .filter(|r| access::is_client_room(r))
                .count();
            if joined >= cfg.max_rooms {
                let max = cfg.max_rooms;
                return Err(self.error(
                    ErrorCode::Forbidden,
                    &format!("room limit reached ({max} per connection)"),
                    Some(&room),
                ));
            }
        }
        self.access(&room)?;
        self.hook(HookKind::Join, &room, None).await?;
        let resuming = since.is_some() && chat.hub().broker().capabilities().replay;
        if let Err(e) = self
            .handle
            .join_with(room.clone(), JoinOptions::default().since(since))
            .await
        {
            return Err(self.broker_error(&e, &room, "join"));
        }
        chat.presence_changed([room.clone()]);
        Ok(protocol::joined(&room, resuming, None))
    }

    async fn send(
        &self,
        room: Room,
        body: String,
        key: Option<crate::idempotency::SendKey>,
    ) -> Answer {
        self.access(&room)?;
        self.member(&room)?;
        let limit = self.svc.config().max_frame_size;
        if body.len() > limit {
            return Err(self.error(
                ErrorCode::TooLarge,
                &format!(
                    "message of {} bytes exceeds the limit of {limit}",
                    body.len()
                ),
                Some(&room),
            ));
        }
        self.hook(HookKind::Send, &room, Some(&body)).await?;
        let identity = &self.conn.identity;
        let out = Outgoing {
            room: room.clone(),
            from: identity.user.clone(),
            to: None,
            body: Cow::Owned(body),
            by_server: false,
            key,
        };
        match self
            .svc
            .publish_message(out, identity.display_name_if_different())
            .await
        {
            Ok(Published { receipt, duplicate }) => {
                if !duplicate {
                    WsCounters::inc(&self.svc.counters().messages_in);
                }
                Ok(protocol::ack(
                    None,
                    receipt.id,
                    receipt.cursor,
                    None,
                    duplicate,
                ))
            }
            Err(ApiError::Broker(e)) => Err(self.broker_error(&e, &room, "send")),
            Err(e) => {
                let message = match &e {
                    ApiError::Denied(d) => d.reason().to_owned(),
                    other => other.to_string(),
                };
                Err(self.error(e.code(), &message, Some(&room)))
            }
        }
    }

    /// A `refresh`: verified like a connect token, for the same user; only the expiry
    /// changes. A refused one changes nothing. (As the native `refresh` frame.)
    async fn refresh(&self, token: &str) -> Answer {
        let Some(verifier) = &self.svc.config().verifier else {
            return Err(self.error(
                ErrorCode::Unsupported,
                "this server checks no tokens; there is nothing to refresh",
                None,
            ));
        };
        match verifier.verify(token).await {
            Err(e) => Err(self.error(
                ErrorCode::Unauthorized,
                &format!("refresh refused: {}", e.message()),
                None,
            )),
            Ok(id) if id.user != self.conn.identity.user => Err(self.error(
                ErrorCode::Unauthorized,
                "refresh refused: the token is for another user",
                None,
            )),
            Ok(id) => {
                self.expiry.send_replace(id.expires_at);
                let ms = id
                    .expires_at
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                Ok(protocol::refreshed(ms, None))
            }
        }
    }

    fn broker_error(&self, e: &chatbus_core::Error, room: &Room, op: &str) -> Bytes {
        let code = ErrorCode::for_error(e);
        tracing::debug!(socket = %self.socket.id, %room, error = %e, "socket.io {op} failed");
        // As on `/ws`: the broker's message, except for internal errors.
        let message = match code {
            ErrorCode::Internal => format!("{op} failed"),
            _ => e.to_string(),
        };
        self.error(code, &message, Some(room))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &str) -> Bytes {
        Bytes::from(format!(
            r#"{{"type":"message","room":"r","id":"i","from":"u","body":"{body}","ts":1,"cursor":null}}"#
        ))
    }

    #[test]
    fn a_shared_frame_is_translated_once_and_never_confused() {
        let t = Translations::default();
        let a = frame("one");
        let first = t.get(&a).expect("a frame");
        // Another recipient's clone of the same frame: the same translation.
        let again = t.get(&a.clone()).expect("a frame");
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(first.0, "message");
        assert_eq!(first.1["message"], "one");
        // Equal bytes elsewhere, and a prefix of the same allocation, are other frames.
        let b = frame("two");
        assert_eq!(t.get(&b).expect("a frame").1["message"], "two");
        let prefix = a.slice(0..a.len() - 1);
        assert!(t.get(&prefix).is_none(), "a truncated frame is not JSON");
        // Past the bound the oldest go; what is translated stays right.
        for i in 0..2 * TRANSLATIONS {
            let f = frame(&format!("m{i}"));
            assert_eq!(t.get(&f).expect("a frame").1["message"], format!("m{i}"));
        }
        assert_eq!(crate::chat::lock(&t.recent).len(), TRANSLATIONS);
        assert_eq!(t.get(&a).expect("a frame").1["message"], "one");
    }
}
