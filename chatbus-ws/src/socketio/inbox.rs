//! A socket's inbox: its client events, queued in the order they arrived.
//!
//! socketioxide runs each event handler in a task of its own, so two events of one socket
//! could be handled in either order. Events are therefore not handled in socketioxide's
//! handlers: the [`Queued`] extractor, which socketioxide runs synchronously in the order the
//! packets arrive, puts each event on the socket's bounded inbox, and the session handles
//! them one after another, as the native reader handles frames (a client's messages are
//! published in the order it sent them).

use std::convert::Infallible;
use std::sync::Arc;

use serde_json::Value;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, SocketRef};
use socketioxide::handler::FromMessageParts;
use socketioxide::socket::Socket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::events;
use crate::metrics::WsCounters;
use crate::protocol::{self, ErrorCode};
use crate::service::WsService;

/// Events queued per socket before further ones are refused (`rate_limited`): the rate limit
/// keeps a well-behaved client far below it; it bounds what a flood can make the server hold.
pub(super) const INBOX: usize = 64;

/// The queued form of a client event: boxed, because the channel allocates its slots up front
/// (a block of 32), which for an idle socket would be 32 whole events.
pub(super) type Inbound = Box<InboundEvent>;

/// One client event, as queued for the session.
pub(super) struct InboundEvent {
    pub(super) event: Result<String, String>,
    pub(super) data: Result<Value, String>,
    /// Whether the client passed an ack callback (then answers go to it, not to `error`).
    wants_ack: bool,
    ack: AckSender,
}

/// The sending side of a socket's inbox, kept in the socket's extensions.
#[derive(Clone)]
struct InboxTx(mpsc::Sender<Inbound>, WsService);

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
pub(super) fn answer_now(socket: &SocketRef, inbound: InboundEvent, frame: &[u8]) {
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
