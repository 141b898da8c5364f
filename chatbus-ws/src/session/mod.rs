//! The per-connection session loop, generic over a `Sink`/`Stream` of [`WsMessage`]s so that it
//! runs over axum's socket in production and over plain channels in unit tests.
//!
//! Two halves run concurrently for each connection (in one task, so neither can block the
//! other; each is polled only when its own waker fired, so a delivery does not also poll the
//! socket's read side):
//! - the [reader](reader) turns client frames into hub calls and queues replies with
//!   [`SessionHandle::reply`], which the hub delivers ahead of further messages;
//! - the [writer](writer) loops on [`Session::recv`] (which also runs catch-up replay, paced by
//!   how fast this client reads) and writes what it gets, batching what is already queued into
//!   one flush.
//!
//! This module holds the frame loop that drives both halves ([`run`]) and the message types
//! they exchange with the socket.

mod reader;
mod writer;

use std::borrow::Borrow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use chatbus_core::Session;
use futures::stream::FuturesUnordered;
use futures::{Sink, Stream, StreamExt};
use tokio::sync::oneshot;

use crate::access::user_channel;
use crate::auth::Identity;
use crate::close::CloseFrame;
use crate::hooks::{self, Conn, ConnData, HookKind};
use crate::metrics::WsCounters;
use crate::protocol::{self, ErrorCode, Limits};
use crate::service::WsService;

use reader::Reader;
pub(crate) use reader::TokenBucket;
#[cfg(feature = "socketio")]
pub(crate) use reader::{expired, expiry_timer};
use writer::{Writer, LINGER};

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
    /// Control frames past their budget: 4008.
    Flood,
    /// The token expired without a refresh: 4003.
    TokenExpired,
    TooLarge,
    InvalidUtf8,
    /// The writer stopped first.
    WriterStopped,
}

/// Decrements the connection gauge however the session ends.
struct ConnectionGuard<'a>(&'a WsCounters);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        WsCounters::dec(&self.0.connections);
    }
}

/// Runs one connection to its end.
///
/// `svc` may be owned (a clone) and `guard` is whatever must live as long as the connection,
/// so that a caller can box this future alone, with nothing of it left outside.
pub(crate) async fn run<Sv, Si, St, G>(
    svc: Sv,
    identity: Identity,
    data: ConnData,
    sink: Si,
    mut stream: St,
    guard: G,
) where
    Si: Sink<WsMessage> + Unpin + Send,
    Si::Error: fmt::Display,
    St: Stream<Item = Result<WsMessage, TransportError>> + Unpin + Send,
    Sv: Borrow<WsService> + Send,
    G: Send,
{
    let _guard = guard;
    let svc: &WsService = svc.borrow();
    let counters = svc.counters();
    WsCounters::inc(&counters.connections);
    WsCounters::inc(&counters.connections_total);
    let _guard = ConnectionGuard(counters);
    let chat = svc.chat();
    chat.ensure_started();
    let session = chat.hub().connect(identity.user.clone());
    let handle = session.handle();
    let cfg = svc.config();
    let conn = Conn::new(identity, handle.id(), data);
    let identity = &conn.identity;
    // Reachable by user id before the client hears `welcome`: direct messages, status probes
    // and "disconnect this user" arrive through the personal channel. Without it (the broker
    // is down) the connection still works in rooms; it is told so.
    let reachable = handle.join(user_channel(&identity.user)).await;
    chat.users().connected(handle.clone());
    handle.reply(protocol::welcome(
        handle.id(),
        &identity.user,
        identity.display(),
        Limits::of(cfg),
    ));
    if let Err(e) = reachable {
        // After `welcome`, which is always the first frame.
        svc.counters().count_error(ErrorCode::Unavailable);
        handle.reply(protocol::error(
            ErrorCode::Unavailable,
            &format!("direct messages cannot reach this connection: {e}"),
            None,
            None,
        ));
    }
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
        let mut r = Reader::new(svc, handle.clone(), &conn, cfg);
        let end = r.run(&mut stream, &mut end_tx).await;
        // The writer may already be gone; then there is no one left to tell.
        let _ = end_tx.send(end);
        Done::Reader(end)
    });
    let writer: Half<'_> = Box::pin(async {
        let mut w = Writer::new(svc, session, sink);
        // Consumes (drops) the receiver, which stops the reader.
        w.run(end_rx).await;
        let (session, sent_close) = w.into_parts();
        Done::Writer(Box::new(session), sent_close)
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
    chat.users().disconnected(&identity.user, handle.id());
    chat.presence_changed(rooms);
    if let Some(hooks) = &cfg.hooks {
        let counters = &svc.counters().hooks;
        let hook = async {
            hooks.on_disconnect(&conn).await;
            Ok(())
        };
        let _ = hooks::call(counters, HookKind::Disconnect, cfg.hook_timeout, hook).await;
    }

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
