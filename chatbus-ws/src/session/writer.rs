//! The writer half of a session: the session's queue out to the socket.
//!
//! It batches what is already queued into one flush, sends WebSocket pings, drops a client
//! whose socket stops taking writes, and closes the connection the way the reader's [`End`]
//! calls for (draining the queue first where the protocol promises it).
//!
//! With a [write delay](crate::WsConfig::write_delay) it also holds a batch open for frames
//! that arrive shortly after the first: under load, where the kernel's cost per segment
//! dominates, fewer and fuller writes cost less CPU than one write per frame.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chatbus_core::{CloseReason, Outbound, Session};
use futures::{FutureExt, Sink, SinkExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{End, WsMessage};
use crate::close::{CloseCode, CloseFrame};
use crate::metrics::WsCounters;
use crate::protocol;
use crate::service::WsService;

pub(super) struct Writer<'a, Si> {
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
pub(super) const LINGER: Duration = Duration::from_secs(1);
/// During a drain, the queue counts as empty after this long without a frame.
const DRAIN_IDLE: Duration = Duration::from_millis(20);

enum Flow {
    Continue,
    Stop,
}

/// What [`Writer::poll_write`] returns: a socket error as its message; `Err(())` is the write
/// timeout.
type WriteResult = Result<Result<Batch, String>, ()>;

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
    /// Whether the batch is held open for more frames (a write delay that has not run out):
    /// once the queue is empty the poll returns [`Batch::Open`] instead of flushing.
    hold: bool,
}

impl WriteState {
    fn new(first: Outbound, hold: bool) -> Self {
        Self {
            next: Some(first),
            n: 0,
            close: None,
            deadline: None,
            hold,
        }
    }
}

/// How a [`Writer::poll_write`] ended.
enum Batch {
    /// Flushed; with a close met in the queue, to send next.
    Flushed(Option<CloseReason>),
    /// The queue is empty, the batch is not full and is held open (nothing flushed yet).
    Open,
}

impl<'a, Si> Writer<'a, Si>
where
    Si: Sink<WsMessage> + Unpin,
    Si::Error: fmt::Display,
{
    pub(super) fn new(svc: &'a WsService, session: Session, sink: Si) -> Self {
        Self {
            svc,
            session,
            sink,
            sent_close: false,
        }
    }

    /// The hub session back, and whether a close frame went out.
    pub(super) fn into_parts(self) -> (Session, bool) {
        (self.session, self.sent_close)
    }

    pub(super) async fn run(&mut self, mut end_rx: oneshot::Receiver<End>) {
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
                out = self.session.recv() => {
                    let delay = cfg.write_delay;
                    if delay.is_zero() {
                        self.write(out).await
                    } else {
                        // Boxed: its timer and `recv` would size every writer, and a delay of
                        // zero must cost nothing (not even a larger `write` future).
                        Box::pin(self.write_delayed(out, delay)).await
                    }
                }
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
        let mut state = WriteState::new(first, false);
        let result = std::future::poll_fn(|cx| self.poll_write(cx, &mut state)).await;
        match self.written(result) {
            Ok(flow) => flow,
            Err(code) => {
                // Boxed, like the ping below: once per session, and inline its timer and send
                // would size every idle writer.
                Box::pin(self.close(code)).await;
                Flow::Stop
            }
        }
    }

    /// [`write`](Self::write) with a write delay: the batch stays open for the frames that
    /// arrive within `delay` after `first` (or until it is full), then flushes.
    async fn write_delayed(&mut self, first: Outbound, delay: Duration) -> Flow {
        let until = Instant::now() + delay;
        let mut state = WriteState::new(first, true);
        let mut result = std::future::poll_fn(|cx| self.poll_write(cx, &mut state)).await;
        while let Ok(Ok(Batch::Open)) = result {
            match tokio::time::timeout_at(until, self.session.recv()).await {
                Ok(out) => state.next = Some(out),
                // The delay ran out: flush what the batch holds.
                Err(_) => state.hold = false,
            }
            result = std::future::poll_fn(|cx| self.poll_write(cx, &mut state)).await;
        }
        match self.written(result) {
            Ok(flow) => flow,
            Err(code) => {
                self.close(code).await;
                Flow::Stop
            }
        }
    }

    /// What a finished batch means for the connection: go on, stop, or (`Err`) send this close
    /// and stop.
    fn written(&self, result: WriteResult) -> Result<Flow, CloseCode> {
        match result {
            Ok(Ok(Batch::Flushed(None) | Batch::Open)) => Ok(Flow::Continue),
            Ok(Ok(Batch::Flushed(Some(reason)))) => Err(match reason {
                CloseReason::SlowConsumer => CloseCode::SlowConsumer,
                CloseReason::Disconnected => CloseCode::Disconnected,
                // Shutdown, and any reason a later hub adds: the client should reconnect.
                _ => CloseCode::GoingAway,
            }),
            Ok(Err(e)) => {
                tracing::debug!(session = self.session.handle().id(), error = %e, "socket write failed");
                Ok(Flow::Stop)
            }
            Err(()) => {
                // The client stopped reading: its TCP window is full. Dropping the connection is
                // the only way to free what it holds.
                WsCounters::inc(&self.svc.counters().slow_closed);
                tracing::debug!(
                    session = self.session.handle().id(),
                    "write timed out; dropping slow client"
                );
                Ok(Flow::Stop)
            }
        }
    }

    /// One step of [`write`](Self::write) and [`write_delayed`](Self::write_delayed):
    /// `Ok(Ok(Batch::Flushed(Some(reason))))` is a close to send after the flush,
    /// `Ok(Ok(Batch::Open))` a batch held open for the write delay,
    /// `Ok(Err(e))` a socket error, `Err(())` the write timeout.
    fn poll_write(&mut self, cx: &mut Context<'_>, st: &mut WriteState) -> Poll<WriteResult> {
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
                    Outbound::Reset { room, reason } => {
                        WsMessage::Text(protocol::reset(&room, reason))
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
                WsCounters::inc(&self.svc.counters().frames_out);
                st.n += 1;
                if st.n < BATCH {
                    st.next = self.session.recv().now_or_never();
                }
            } else if st.hold && st.n < BATCH && st.close.is_none() {
                // Written into the sink's buffer, not flushed: more frames may join the batch.
                break Poll::Ready(Ok(Ok(Batch::Open)));
            } else {
                match Pin::new(&mut self.sink).poll_flush(cx) {
                    Poll::Pending => break Poll::Pending,
                    Poll::Ready(Err(e)) => break Poll::Ready(Ok(Err(e.to_string()))),
                    Poll::Ready(Ok(())) => {
                        break Poll::Ready(Ok(Ok(Batch::Flushed(st.close.take()))))
                    }
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

    /// Sends a close frame with `code` and its documented reason.
    async fn close(&mut self, code: CloseCode) {
        let frame = WsMessage::Close(Some(CloseFrame::new(code)));
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
        let (code, drain) = match end {
            End::ClientGone | End::WriterStopped => {
                // Sends the close reply the library queued, if the client closed cleanly.
                let _ = tokio::time::timeout(cfg.write_timeout, self.sink.close()).await;
                return;
            }
            End::Shutdown => (CloseCode::GoingAway, cfg.drain_timeout),
            End::Idle => {
                WsCounters::inc(&self.svc.counters().idle_closed);
                (CloseCode::IdleTimeout, Duration::ZERO)
            }
            End::Flood => {
                WsCounters::inc(&self.svc.counters().flood_closed);
                (CloseCode::ControlFlood, Duration::from_secs(1))
            }
            End::TokenExpired => (CloseCode::TokenExpired, Duration::from_secs(1)),
            End::TooLarge => (CloseCode::TooLarge, Duration::from_secs(1)),
            End::InvalidUtf8 => (CloseCode::InvalidData, Duration::from_secs(1)),
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
        self.close(code).await;
    }
}
