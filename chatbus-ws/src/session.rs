//! The per-connection session loop, generic over a `Sink`/`Stream` of [`WsMessage`]s so that it
//! runs over axum's socket in production and over plain channels in unit tests.
//!
//! Two halves run concurrently for each connection (in one task, so neither can block the
//! other; each is polled only when its own waker fired, so a delivery does not also poll the
//! socket's read side):
//! - the reader turns client frames into hub calls and queues replies with
//!   [`SessionHandle::reply`], which the hub delivers ahead of further messages;
//! - the writer loops on [`Session::recv`] (which also runs catch-up replay, paced by how fast
//!   this client reads) and writes what it gets, batching what is already queued into one flush.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chatbus_core::{CloseReason, Envelope, JoinOptions, Outbound, Room, Session, SessionHandle};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::auth::Identity;
use crate::chat::history_item;
use crate::config::RateLimit;
use crate::metrics::WsMetrics;
use crate::payload;
use crate::protocol::{self, ClientId, ErrorCode, Limits, Request};
use crate::service::WsService;

/// Close code: the server is shutting down (also sent by browsers navigating away).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: a text frame was not valid UTF-8.
pub const CLOSE_INVALID_DATA: u16 = 1007;
/// Close code: a frame was larger than [`WsConfig::hard_frame_size`](crate::WsConfig).
pub const CLOSE_TOO_LARGE: u16 = 1009;
/// Close code: the client did not read fast enough (its queue overflowed or a write timed out).
pub const CLOSE_SLOW_CONSUMER: u16 = 4000;
/// Close code: nothing was received within the idle timeout.
pub const CLOSE_IDLE_TIMEOUT: u16 = 4001;

/// A WebSocket close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The close code (see the `CLOSE_*` constants).
    pub code: u16,
    /// A short reason for humans.
    pub reason: Cow<'static, str>,
}

/// One WebSocket message, independent of the WebSocket library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMessage {
    /// A text frame. Holds UTF-8; bytes that are not are answered with `bad_request`.
    Text(Bytes),
    /// A binary frame (not part of protocol v1: answered with `bad_request`).
    Binary(Bytes),
    /// A ping (the WebSocket library answers it).
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close frame.
    Close(Option<CloseFrame>),
}

/// A read error of the underlying socket.
#[derive(Debug)]
#[non_exhaustive]
pub enum TransportError {
    /// The frame exceeded the socket's size limit: answered with `too_large`, then closed with
    /// 1009.
    TooLarge,
    /// A text frame was not valid UTF-8: answered with `bad_request`, then closed with 1007.
    InvalidUtf8,
    /// Anything else (the connection is gone).
    Other(chatbus_core::BoxError),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge => f.write_str("frame too large"),
            Self::InvalidUtf8 => f.write_str("invalid UTF-8 in a text frame"),
            Self::Other(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TransportError {}

/// Why the reader stopped; tells the writer how to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client closed or the stream ended: nothing more can be sent.
    ClientGone,
    /// The server is shutting down: flush, then 1001.
    Shutdown,
    Idle,
    TooLarge,
    InvalidUtf8,
    /// The writer stopped first.
    WriterStopped,
}

/// A token bucket; `tokio::time::Instant` so tests can pause time.
struct TokenBucket {
    tokens: f64,
    last: Instant,
    limit: RateLimit,
}

impl TokenBucket {
    fn new(limit: RateLimit) -> Self {
        let burst = f64::from(limit.burst.max(1));
        Self {
            tokens: burst,
            last: Instant::now(),
            limit: RateLimit {
                burst: limit.burst.max(1),
                per_second: limit.per_second.max(0.0),
            },
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens =
            (self.tokens + elapsed * self.limit.per_second).min(f64::from(self.limit.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Decrements the connection gauge however the session ends.
struct ConnectionGuard<'a>(&'a WsMetrics);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs one connection to its end.
pub(crate) async fn run<Si, St>(svc: &WsService, identity: Identity, sink: Si, mut stream: St)
where
    Si: Sink<WsMessage> + Unpin + Send,
    Si::Error: fmt::Display,
    St: Stream<Item = Result<WsMessage, TransportError>> + Unpin + Send,
{
    let metrics = svc.metrics();
    WsMetrics::inc(&metrics.connections);
    WsMetrics::inc(&metrics.connections_total);
    let _guard = ConnectionGuard(metrics);
    let chat = svc.chat();
    chat.ensure_started();
    let session = chat.hub().connect(identity.user.clone());
    let handle = session.handle();
    let cfg = svc.config();
    handle.reply(protocol::welcome(
        handle.id(),
        &identity.user,
        identity.display(),
        Limits {
            max_frame_size: cfg.max_frame_size,
            max_rooms: cfg.max_rooms,
            max_history: cfg.max_history,
            rate_per_second: cfg.rate_limit.map(|r| r.per_second),
            rate_burst: cfg.rate_limit.map(|r| r.burst),
        },
    ));
    tracing::debug!(session = handle.id(), user = %identity.user, "connected");

    // The reader tells the writer how it ended over `end`; the writer dropping its receiver
    // (when it stops) is what stops the reader, without a cancellation token per session.
    let (mut end_tx, end_rx) = oneshot::channel();
    // The halves are boxed and driven by a FuturesUnordered rather than `tokio::join!`:
    // - join! polls every branch whenever the task wakes, so each outbound batch also polled the
    //   reader (its select!, idle timer, the socket lock and a read attempt);
    //   FuturesUnordered polls only the half whose waker fired;
    // - held inline, the two state machines (and the copies the compiler keeps of futures moved
    //   into join!) made this task's future about 4.7 KiB, the bulk of an idle connection's
    //   memory; boxed, each takes what it needs.
    let reader: Half<'_> = Box::pin(async {
        let mut r = Reader {
            svc,
            handle: handle.clone(),
            identity: &identity,
            bucket: cfg.rate_limit.map(TokenBucket::new),
        };
        let end = r.run(&mut stream, &mut end_tx).await;
        // The writer may already be gone; then there is no one left to tell.
        let _ = end_tx.send(end);
        Done::Reader(end)
    });
    let writer: Half<'_> = Box::pin(async {
        let mut w = Writer {
            svc,
            session,
            sink,
            sent_close: false,
        };
        // Consumes (drops) the receiver, which stops the reader.
        w.run(end_rx).await;
        Done::Writer(Box::new(w.session), w.sent_close)
    });
    let mut halves: FuturesUnordered<Half<'_>> = [reader, writer].into_iter().collect();
    let (mut end, mut writer_done) = (End::WriterStopped, None);
    while let Some(done) = halves.next().await {
        match done {
            Done::Reader(e) => end = e,
            Done::Writer(session, sent_close) => writer_done = Some((session, sent_close)),
        }
    }
    drop(halves);
    // Both halves ran to completion, so the writer's result is there.
    let Some((session, sent_close)) = writer_done else {
        return;
    };

    // Leave every room (dropping the session), then announce the departure: the presence task
    // reads the hub's members after this, so it must no longer see this session.
    let rooms = handle.rooms();
    drop(session);
    chat.presence_changed(rooms);

    if sent_close && matches!(end, End::TooLarge | End::InvalidUtf8) {
        // The socket library gave up on the stream, with the rest of the bad frame unread:
        // dropping the socket now would reset the connection (discarding our close frame at
        // the client), so hold it for the linger time to let the client read the close.
        tokio::time::sleep(LINGER).await;
    } else if sent_close {
        // The closing handshake: wait (briefly) for the client's close reply before the socket
        // is dropped. Dropping at once would make the client's next write (a pong, its close
        // reply) hit a closed port, and the reset that comes back discards our close frame
        // from its receive buffer before it reads it.
        let _ = tokio::time::timeout(LINGER, async {
            loop {
                match stream.next().await {
                    Some(Ok(WsMessage::Close(_)) | Err(_)) | None => break,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
    }

    tracing::debug!(session = handle.id(), user = %identity.user, "disconnected");
}

/// What a half of the session returns. The session is boxed so that the enum (which each
/// half's future holds room for) stays small; it is returned once per connection.
enum Done {
    Reader(End),
    Writer(Box<Session>, bool),
}

type Half<'a> = Pin<Box<dyn Future<Output = Done> + Send + 'a>>;

struct Reader<'a> {
    svc: &'a WsService,
    handle: SessionHandle,
    identity: &'a Identity,
    bucket: Option<TokenBucket>,
}

impl Reader<'_> {
    async fn run<St>(&mut self, stream: &mut St, end_tx: &mut oneshot::Sender<End>) -> End
    where
        St: Stream<Item = Result<WsMessage, TransportError>> + Unpin,
    {
        let cfg = self.svc.config();
        let shutdown = self.svc.shutdown_token();
        loop {
            if self.handle.is_closed() {
                return End::WriterStopped;
            }
            // Only the wait for the next frame is raced against shutdown: a frame being handled
            // (a publish in flight) always completes and gets its answer.
            let next = tokio::select! {
                biased;
                () = end_tx.closed() => return End::WriterStopped,
                () = shutdown.cancelled() => return End::Shutdown,
                next = tokio::time::timeout(cfg.idle_timeout, stream.next()) => next,
            };
            let msg = match next {
                Err(_) => return End::Idle,
                Ok(None) => return End::ClientGone,
                Ok(Some(Ok(msg))) => msg,
                Ok(Some(Err(TransportError::TooLarge))) => {
                    let limit = cfg.hard_frame_size;
                    self.error(
                        ErrorCode::TooLarge,
                        &format!("frame larger than {limit} bytes; closing"),
                        None,
                        None,
                    );
                    return End::TooLarge;
                }
                Ok(Some(Err(TransportError::InvalidUtf8))) => {
                    self.error(
                        ErrorCode::BadRequest,
                        "text frame is not valid UTF-8; closing",
                        None,
                        None,
                    );
                    return End::InvalidUtf8;
                }
                Ok(Some(Err(TransportError::Other(e)))) => {
                    tracing::debug!(session = self.handle.id(), error = %e, "socket read failed");
                    return End::ClientGone;
                }
            };
            match msg {
                WsMessage::Text(bytes) => {
                    WsMetrics::inc(&self.svc.metrics().frames_in);
                    let allowed = self.bucket.as_mut().is_none_or(TokenBucket::allow);
                    // Boxed: a client frame is rare next to deliveries, and inline its state
                    // (join, publish, history futures) would size the idle reader.
                    Box::pin(self.text(&bytes, allowed)).await;
                }
                WsMessage::Binary(_) => {
                    WsMetrics::inc(&self.svc.metrics().frames_in);
                    // Charged like any frame, so binary floods are limited too.
                    if self.bucket.as_mut().is_none_or(TokenBucket::allow) {
                        self.error(
                            ErrorCode::BadRequest,
                            "binary frames are not supported; send JSON text frames",
                            None,
                            None,
                        );
                    } else {
                        self.rate_limited(None, None);
                    }
                }
                WsMessage::Ping(_) | WsMessage::Pong(_) => {}
                WsMessage::Close(_) => return End::ClientGone,
            }
        }
    }

    fn error(&self, code: ErrorCode, message: &str, cid: Option<&ClientId>, room: Option<&Room>) {
        self.svc.metrics().count_error(code);
        self.handle.reply(protocol::error(code, message, cid, room));
    }

    fn rate_limited(&self, cid: Option<&ClientId>, room: Option<&Room>) {
        self.error(
            ErrorCode::RateLimited,
            "rate limit exceeded; frame dropped",
            cid,
            room,
        );
    }

    async fn text(&mut self, bytes: &[u8], allowed: bool) {
        let cfg = self.svc.config();
        if bytes.len() > cfg.max_frame_size {
            let limit = cfg.max_frame_size;
            self.error(
                ErrorCode::TooLarge,
                &format!(
                    "frame of {} bytes exceeds the limit of {limit}",
                    bytes.len()
                ),
                None,
                None,
            );
            return;
        }
        let (req, cid) = match protocol::parse(bytes) {
            Ok(parsed) => parsed,
            Err(r) => {
                self.error(r.code, &r.message, r.client_id.as_ref(), None);
                return;
            }
        };
        let cid = cid.as_ref();
        if !allowed {
            self.rate_limited(cid, req.room());
            return;
        }
        let chat = self.svc.chat();
        let hub = chat.hub();
        match req {
            Request::Ping => {
                self.handle.reply(Bytes::from_static(protocol::PONG));
            }
            Request::Join { room, since } => {
                if !self.handle.is_member(&room) && self.handle.rooms().len() >= cfg.max_rooms {
                    let max = cfg.max_rooms;
                    self.error(
                        ErrorCode::Forbidden,
                        &format!("room limit reached ({max} per connection)"),
                        cid,
                        Some(&room),
                    );
                    return;
                }
                // Same test as the hub's: a resume replays only where the broker keeps history.
                let resuming = since.is_some() && hub.broker().capabilities().replay;
                let reply = protocol::joined(&room, resuming, cid);
                let options = JoinOptions::default().since(since).reply(reply);
                if let Err(e) = self.handle.join_with(room.clone(), options).await {
                    self.broker_error(&e, cid, &room, "join");
                    return;
                }
                chat.presence_changed([room.clone()]);
                self.handle.reply(protocol::presence(
                    &room,
                    &chat.online(&room),
                    chat.presence_config().max_listed,
                ));
            }
            Request::Leave { room } => {
                if !self.handle.leave(&room) {
                    self.not_joined(cid, &room);
                    return;
                }
                self.handle.reply(protocol::left(&room, cid));
                chat.presence_changed([room]);
            }
            Request::Send { room, body } => {
                if !self.handle.is_member(&room) {
                    self.not_joined(cid, &room);
                    return;
                }
                let env = Envelope::new(
                    room,
                    payload::message(self.identity.display_name_if_different(), &body),
                )
                .with_from(self.identity.user.clone());
                match hub.publish(&env).await {
                    Ok(receipt) => {
                        WsMetrics::inc(&self.svc.metrics().messages_in);
                        self.handle
                            .reply(protocol::ack(cid, receipt.id, receipt.cursor));
                    }
                    Err(e) => self.broker_error(&e, cid, &env.room, "send"),
                }
            }
            Request::Typing { room } => {
                if !self.handle.is_member(&room) {
                    self.not_joined(cid, &room);
                    return;
                }
                let env = Envelope::ephemeral(
                    room,
                    payload::typing(self.identity.display_name_if_different()),
                )
                .with_from(self.identity.user.clone());
                if let Err(e) = hub.publish(&env).await {
                    self.broker_error(&e, cid, &env.room, "typing");
                }
            }
            Request::History {
                room,
                before,
                limit,
            } => {
                if !self.handle.is_member(&room) {
                    self.not_joined(cid, &room);
                    return;
                }
                let max = cfg.max_history.max(1);
                let limit = limit.map_or(cfg.default_history, |l| {
                    usize::try_from(l).unwrap_or(usize::MAX)
                });
                let limit = limit.clamp(1, max);
                match hub.history(&room, before, limit).await {
                    Ok(envs) => {
                        let items: Vec<Bytes> = envs.iter().filter_map(history_item).collect();
                        self.handle.reply(protocol::history(&room, &items, cid));
                    }
                    Err(e) => self.broker_error(&e, cid, &room, "history"),
                }
            }
        }
    }

    fn not_joined(&self, cid: Option<&ClientId>, room: &Room) {
        self.error(ErrorCode::NotJoined, "join the room first", cid, Some(room));
    }

    fn broker_error(&self, e: &chatbus_core::Error, cid: Option<&ClientId>, room: &Room, op: &str) {
        let code = ErrorCode::for_error(e);
        if code == ErrorCode::Internal {
            tracing::warn!(session = self.handle.id(), %room, error = %e, "{op} failed");
        } else {
            tracing::debug!(session = self.handle.id(), %room, error = %e, "{op} failed");
        }
        // The client sees the broker's message (no secrets in there: the backend crates keep
        // credentials out of their errors) except for internal errors.
        let message = match code {
            ErrorCode::Internal => format!("{op} failed"),
            _ => e.to_string(),
        };
        self.error(code, &message, cid, Some(room));
    }
}

struct Writer<'a, Si> {
    svc: &'a WsService,
    session: Session,
    sink: Si,
    // Whether a close frame went out (the server started the closing handshake).
    sent_close: bool,
}

/// Frames written per flush at most: enough to amortise the syscall under load, small enough
/// that one busy session does not hold its socket buffer for long.
const BATCH: usize = 64;
/// How long the server waits for the client's close reply after sending its close frame.
const LINGER: Duration = Duration::from_secs(1);
/// During a drain, the queue counts as empty after this long without a frame.
const DRAIN_IDLE: Duration = Duration::from_millis(20);

enum Flow {
    Continue,
    Stop,
}

/// The state of one [`Writer::write`] between polls.
struct WriteState {
    /// The frame to write next; none once the batch is complete (then it flushes).
    next: Option<Outbound>,
    /// Frames written in this batch.
    n: usize,
    /// A close met in the queue, returned after the flush.
    close: Option<CloseReason>,
    /// The write timeout, armed once a poll did not complete.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<Si> Writer<'_, Si>
where
    Si: Sink<WsMessage> + Unpin,
    Si::Error: fmt::Display,
{
    async fn run(&mut self, mut end_rx: oneshot::Receiver<End>) {
        let cfg = self.svc.config();
        let mut ping =
            tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let flow = tokio::select! {
                biased;
                end = &mut end_rx => {
                    // Boxed for the same reason as the reader's frame handler: once per session.
                    Box::pin(self.finish(end.unwrap_or(End::WriterStopped))).await;
                    return;
                }
                out = self.session.recv() => self.write(out).await,
                _ = ping.tick() => Box::pin(self.send_one(WsMessage::Ping(Bytes::new()))).await,
            };
            if let Flow::Stop = flow {
                return;
            }
        }
    }

    /// Writes `first` and whatever else is already queued (up to a batch), then flushes.
    async fn write(&mut self, first: Outbound) -> Flow {
        // Polled by hand rather than as an `async` block of `feed`/`flush` calls inside a
        // `timeout`: that state machine (about 650 bytes) was kept inside every idle
        // connection's writer. This one holds the frame in hand, a count and a lazy timer.
        let mut state = WriteState {
            next: Some(first),
            n: 0,
            close: None,
            deadline: None,
        };
        let result = std::future::poll_fn(|cx| self.poll_write(cx, &mut state)).await;
        match result {
            Ok(Ok(None)) => Flow::Continue,
            Ok(Ok(Some(reason))) => {
                let (code, text) = match reason {
                    CloseReason::SlowConsumer => (CLOSE_SLOW_CONSUMER, "slow consumer"),
                    CloseReason::Shutdown => (CLOSE_GOING_AWAY, "server shutting down"),
                };
                // Boxed, like the ping below: once per session, and inline its timer and send
                // would size every idle writer.
                Box::pin(self.close(code, text)).await;
                Flow::Stop
            }
            Ok(Err(e)) => {
                tracing::debug!(session = self.session.handle().id(), error = %e, "socket write failed");
                Flow::Stop
            }
            Err(_) => {
                // The client stopped reading: its TCP window is full. Dropping the connection is
                // the only way to free what it holds.
                WsMetrics::inc(&self.svc.metrics().slow_closed);
                tracing::debug!(
                    session = self.session.handle().id(),
                    "write timed out; dropping slow client"
                );
                Flow::Stop
            }
        }
    }

    /// One step of [`write`](Self::write): `Ok(Ok(Some(reason)))` is a close to send after the
    /// flush, `Ok(Err(e))` a socket error, `Err(())` the write timeout.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        st: &mut WriteState,
    ) -> Poll<Result<Result<Option<CloseReason>, String>, ()>> {
        let result = loop {
            if let Some(out) = st.next.take() {
                match Pin::new(&mut self.sink).poll_ready(cx) {
                    Poll::Pending => {
                        st.next = Some(out);
                        break Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => break Poll::Ready(Ok(Err(e.to_string()))),
                    Poll::Ready(Ok(())) => {}
                }
                let msg = match out {
                    Outbound::Frame(bytes) => WsMessage::Text(bytes),
                    Outbound::Lagged { room, cursor } => {
                        WsMessage::Text(protocol::lagged(&room, cursor))
                    }
                    Outbound::Close(reason) => {
                        // Flush what went before, then the caller sends the close frame.
                        st.close = Some(reason);
                        continue;
                    }
                };
                if let Err(e) = Pin::new(&mut self.sink).start_send(msg) {
                    break Poll::Ready(Ok(Err(e.to_string())));
                }
                WsMetrics::inc(&self.svc.metrics().frames_out);
                st.n += 1;
                if st.n < BATCH {
                    st.next = self.session.recv().now_or_never();
                }
            } else {
                match Pin::new(&mut self.sink).poll_flush(cx) {
                    Poll::Pending => break Poll::Pending,
                    Poll::Ready(Err(e)) => break Poll::Ready(Ok(Err(e.to_string()))),
                    Poll::Ready(Ok(())) => break Poll::Ready(Ok(Ok(st.close.take()))),
                }
            }
        };
        if result.is_ready() {
            return result;
        }
        // Almost every write completes in its first poll (the socket buffer has room): the
        // write timeout is armed only when it does not, instead of a timer per batch.
        let timeout = self.svc.config().write_timeout;
        let deadline = st
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(())),
            Poll::Pending => Poll::Pending,
        }
    }

    async fn send_one(&mut self, msg: WsMessage) -> Flow {
        match tokio::time::timeout(self.svc.config().write_timeout, self.sink.send(msg)).await {
            Ok(Ok(())) => Flow::Continue,
            _ => Flow::Stop,
        }
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = WsMessage::Close(Some(CloseFrame {
            code,
            reason: Cow::Borrowed(reason),
        }));
        let timeout = self.svc.config().write_timeout;
        let sent = tokio::time::timeout(timeout, async {
            self.sink.send(frame).await?;
            self.sink.close().await
        })
        .await;
        self.sent_close = matches!(sent, Ok(Ok(())));
    }

    /// The reader stopped: close the way its reason calls for.
    async fn finish(&mut self, end: End) {
        let cfg = self.svc.config();
        let (code, reason, drain) = match end {
            End::ClientGone | End::WriterStopped => {
                // Sends the close reply the library queued, if the client closed cleanly.
                let _ = tokio::time::timeout(cfg.write_timeout, self.sink.close()).await;
                return;
            }
            End::Shutdown => (CLOSE_GOING_AWAY, "server shutting down", cfg.drain_timeout),
            End::Idle => {
                WsMetrics::inc(&self.svc.metrics().idle_closed);
                (CLOSE_IDLE_TIMEOUT, "idle timeout", Duration::ZERO)
            }
            End::TooLarge => (CLOSE_TOO_LARGE, "frame too large", Duration::from_secs(1)),
            End::InvalidUtf8 => (CLOSE_INVALID_DATA, "invalid UTF-8", Duration::from_secs(1)),
        };
        // Flush what is queued (acks of accepted messages, the error that explains the close)
        // until the queue is quiet or the drain time is over.
        let deadline = Instant::now() + drain;
        loop {
            let wait = DRAIN_IDLE.min(deadline.saturating_duration_since(Instant::now()));
            match tokio::time::timeout(wait, self.session.recv()).await {
                Ok(Outbound::Close(_)) | Err(_) => break,
                Ok(out) => {
                    if let Flow::Stop = self.write(out).await {
                        return;
                    }
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        self.close(code, reason).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_refills() {
        let mut b = TokenBucket::new(RateLimit {
            burst: 3,
            per_second: 2.0,
        });
        assert!(b.allow() && b.allow() && b.allow());
        assert!(!b.allow());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(b.allow());
        assert!(!b.allow());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!((0..10).filter(|_| b.allow()).count(), 3);
    }
}
