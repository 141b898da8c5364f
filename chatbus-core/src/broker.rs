//! The [`Broker`] trait and the types around it.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};

use crate::envelope::{Cursor, Envelope, MessageId, Room};
use crate::queue::{self, TrySendError};
use crate::store::Log;
use crate::tickets::Tickets;
use crate::{Error, Result};

/// Which rooms a subscription receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interest {
    /// Every room.
    All,
    /// Only these rooms.
    Rooms(Vec<Room>),
}

impl Interest {
    /// Interest in one room.
    pub fn room(room: Room) -> Self {
        Self::Rooms(vec![room])
    }

    /// Whether a message for `room` belongs to this interest.
    pub fn matches(&self, room: &Room) -> bool {
        match self {
            Self::All => true,
            Self::Rooms(rooms) => rooms.contains(room),
        }
    }
}

/// What a broker answers to a successful publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The id of the published message.
    pub id: MessageId,
    /// Its position in the durable log, for brokers that keep one.
    pub cursor: Option<Cursor>,
}

/// Where a replay starts.
///
/// (Named `ReplayFrom` rather than `From` so that it never shadows `std::convert::From`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// The oldest message the broker still keeps.
    Beginning,
    /// The messages strictly after this cursor.
    Cursor(Cursor),
    /// The messages whose timestamp is at or after this many Unix milliseconds.
    Time(u64),
}

/// What a broker can do; lets callers (the Hub, DualBus, the conformance suite) adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Published durable messages survive a broker restart.
    pub durable: bool,
    /// `replay` and `history` are supported.
    pub replay: bool,
    /// Messages of one room are delivered to every subscriber in one order.
    pub room_order: bool,
    /// `subscribe(Interest::Rooms(..))` only transfers traffic of those rooms, so subscribing per
    /// room is cheaper than subscribing to everything.
    pub interest_filtering: bool,
}

/// The broker's own view of its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Everything works.
    Healthy,
    /// Working with reduced guarantees or speed (for example DualBus without its fast path).
    Degraded(String),
    /// Not working: publishes fail.
    Down(String),
}

impl Health {
    /// Whether publishes are expected to succeed.
    pub fn is_up(&self) -> bool {
        !matches!(self, Self::Down(_))
    }
}

/// A stream of history, oldest first.
pub type HistoryStream = BoxStream<'static, Result<Envelope>>;

/// A publish/subscribe/replay message broker.
///
/// Dyn-compatible: a server picks its backend from configuration at run time and holds an
/// `Arc<dyn Broker>`. Implementations: [`MemoryBroker`](crate::MemoryBroker) here,
/// `RedisBroker` in `chatbus-redis`, `KafkaBroker` in `chatbus-kafka` and the decorator
/// `DualBus` that composes two.
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and metrics (`"memory"`, `"redis"`, ...).
    fn name(&self) -> &'static str;

    /// Publishes one message to its room.
    ///
    /// Returns only after the broker accepted the message: for a durable broker after it is
    /// stored (Kafka: acknowledged with `acks=all`), and then the receipt carries its cursor.
    /// Ephemeral messages are never stored and get no cursor.
    ///
    /// Ordering: messages published one after another by one caller (each awaited before the
    /// next) reach every subscriber in that order. Messages of concurrent publishers to one room
    /// reach every subscriber in the same order where [`Capabilities::room_order`] holds.
    ///
    /// Errors: `Unavailable` or `Timeout` while the broker cannot be reached (never a hang past
    /// the configured timeout); the message may then not have been published.
    async fn publish(&self, envelope: &Envelope) -> Result<Receipt>;

    /// Starts a live subscription to the rooms of `interest`.
    ///
    /// Every message published after this returns is delivered, in the order of
    /// [`publish`](Broker::publish), until the [`Subscription`] is dropped (which cleans up).
    /// A broker that reads its source asynchronously may also deliver some messages published
    /// shortly before (consumers dedupe by cursor where it matters).
    ///
    /// Slow subscriber: the subscription has a bounded buffer; when it is full the broker drops
    /// messages for that subscriber only (it never slows the broker or other subscribers), and
    /// the subscriber then receives `Err(Error::Lagged { missed })` in place of the lost
    /// messages, so it can resync from its last cursor with [`replay`](Broker::replay).
    ///
    /// Reconnects: brokers that reconnect by themselves keep the subscription alive across a
    /// reconnect. When the connection drops they may yield `Err(Error::Unavailable { .. })`;
    /// when live delivery resumes after a possible loss they yield `Err(Error::Lagged { missed })`
    /// (`missed` = 0 when the number is unknown), so the subscriber resyncs from its cursor.
    /// Messages published while disconnected are lost to the live stream but are still in the
    /// log of brokers that keep one.
    ///
    /// A broker that serves room subscriptions only (the interest-based `DualBus`) refuses
    /// [`Interest::All`] with `Error::Config`.
    async fn subscribe(&self, interest: Interest) -> Result<Subscription>;

    /// Durable messages of `room` from `from`, oldest first, at most `limit`.
    ///
    /// Ephemeral messages are never returned. `Error::Unsupported` where the broker keeps no
    /// history. What the broker retains (a bounded window, a retention time) bounds what can be
    /// replayed; the docs of each broker state it. History survives reconnects and, for durable
    /// brokers, restarts.
    ///
    /// `Error::CursorReset` when the cursor names no position of the room's log as it is now:
    /// it is of another [epoch](Cursor::epoch) (the log started over since), or beyond the
    /// end of the log. A cursor of an unknown epoch (0) is taken as a position of the current
    /// log.
    async fn replay(&self, room: &Room, from: ReplayFrom, limit: usize) -> Result<HistoryStream>;

    /// The newest `limit` durable messages of `room` strictly before `before` (or the newest of
    /// all when `None`), oldest first: one page of "load older" history.
    ///
    /// A page is never silently short: when the broker stopped looking before it found `limit`
    /// messages or the start of what it retains (Kafka bounds its backwards scan, see
    /// `KafkaConfig::history_scan_limit`), [`HistoryPage::more_before`] says where to ask
    /// again. `Error::Unsupported` where the broker keeps no history.
    async fn history(
        &self,
        room: &Room,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<HistoryPage>;

    /// What this broker can do.
    fn capabilities(&self) -> Capabilities;

    /// The broker's current state, cheap enough to call from a readiness probe.
    async fn health(&self) -> Health;

    /// The partition of the broker's log that holds `room`'s messages (the `partition` of its
    /// cursors), for a broker whose log has several: lets a fault seen in one partition (a gap)
    /// be confined to the rooms it concerns. `None` (the default) when unknown; callers then
    /// treat every room as concerned.
    fn log_partition(&self, room: &Room) -> Option<u32> {
        let _ = room;
        None
    }

    /// The broker's durable log read by partition, for projectors (see
    /// [`Log`]). `None` (the default) for a broker without one, or one whose log cannot be
    /// read in order by partition.
    fn as_log(&self) -> Option<&dyn Log> {
        None
    }

    /// The broker's per-room ticket counters, for a fast broker under an interest-based
    /// DualBus (see [`Tickets`]). `None` (the default) for a broker without them.
    fn tickets(&self) -> Option<&dyn Tickets> {
        None
    }
}

/// One page of [`Broker::history`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct HistoryPage {
    /// The messages found, oldest first, at most the limit asked for.
    pub messages: Vec<Envelope>,
    /// `None` when the page is complete: it holds `limit` messages, or every retained message
    /// before the position asked for. `Some(cursor)` when the broker stopped looking first:
    /// older messages of the room may exist strictly before `cursor`; call `history` again
    /// with `before = cursor` to go on (the next page may again be partial).
    pub more_before: Option<Cursor>,
}

impl HistoryPage {
    /// A complete page.
    pub fn complete(messages: Vec<Envelope>) -> Self {
        Self {
            messages,
            more_before: None,
        }
    }

    /// A page whose scan stopped at `more_before` before it was complete.
    pub fn partial(messages: Vec<Envelope>, more_before: Cursor) -> Self {
        Self {
            messages,
            more_before: Some(more_before),
        }
    }

    /// Whether the page is complete (see [`more_before`](Self::more_before)).
    pub fn is_complete(&self) -> bool {
        self.more_before.is_none()
    }
}

macro_rules! forward_broker {
    ($ty:ty) => {
        #[async_trait]
        impl<T: Broker + ?Sized> Broker for $ty {
            fn name(&self) -> &'static str {
                (**self).name()
            }
            async fn publish(&self, envelope: &Envelope) -> Result<Receipt> {
                (**self).publish(envelope).await
            }
            async fn subscribe(&self, interest: Interest) -> Result<Subscription> {
                (**self).subscribe(interest).await
            }
            async fn replay(
                &self,
                room: &Room,
                from: ReplayFrom,
                limit: usize,
            ) -> Result<HistoryStream> {
                (**self).replay(room, from, limit).await
            }
            async fn history(
                &self,
                room: &Room,
                before: Option<Cursor>,
                limit: usize,
            ) -> Result<HistoryPage> {
                (**self).history(room, before, limit).await
            }
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
            async fn health(&self) -> Health {
                (**self).health().await
            }
            fn log_partition(&self, room: &Room) -> Option<u32> {
                (**self).log_partition(room)
            }
            fn as_log(&self) -> Option<&dyn Log> {
                (**self).as_log()
            }
            fn tickets(&self) -> Option<&dyn Tickets> {
                (**self).tickets()
            }
        }
    };
}

forward_broker!(Arc<T>);
forward_broker!(Box<T>);

/// Conveniences on every [`Broker`].
#[async_trait]
pub trait BrokerExt: Broker {
    /// [`Broker::replay`] collected into a `Vec`.
    async fn replay_vec(
        &self,
        room: &Room,
        from: ReplayFrom,
        limit: usize,
    ) -> Result<Vec<Envelope>> {
        self.replay(room, from, limit).await?.try_collect().await
    }
}

impl<T: Broker + ?Sized> BrokerExt for T {}

/// The sending half of a [`Subscription`], used by broker implementations.
///
/// Sending never blocks: when the subscriber's buffer is full the message is dropped and
/// counted, and the subscriber receives one `Err(Error::Lagged { missed })` in its place before
/// the next message that fits.
#[derive(Clone)]
pub struct SubscriptionSender {
    tx: queue::Sender<Result<Envelope>>,
    // Dropped since the last Lagged notice reached the buffer. Shared by clones so that a lag is
    // reported once whichever clone sends next.
    missed: Arc<AtomicU64>,
}

/// What [`SubscriptionSender::send`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Buffered for the subscriber.
    Sent,
    /// The buffer was full: dropped, and the subscriber will be told it lagged.
    Dropped,
    /// The subscription was dropped: the broker should forget it.
    Closed,
}

impl fmt::Debug for SubscriptionSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionSender")
            .field("closed", &self.tx.is_closed())
            .finish_non_exhaustive()
    }
}

impl SubscriptionSender {
    /// Offers one message to the subscriber without waiting.
    pub fn send(&self, envelope: Envelope) -> SendOutcome {
        self.offer(Ok(envelope))
    }

    /// Offers an error (for example `Unavailable` while reconnecting) without waiting.
    pub fn send_error(&self, error: Error) -> SendOutcome {
        self.offer(Err(error))
    }

    fn offer(&self, item: Result<Envelope>) -> SendOutcome {
        // Taken, not read: the receiver may report the same loss when it finds its buffer empty
        // (see `Subscription::poll_recv_many`), and a loss must be reported once.
        let missed = self.missed.swap(0, Ordering::AcqRel);
        if missed > 0 {
            match self.tx.try_send(Err(Error::Lagged { missed })) {
                Ok(()) => {}
                Err(TrySendError::Full) => {
                    self.missed.fetch_add(missed + 1, Ordering::AcqRel);
                    return SendOutcome::Dropped;
                }
                Err(TrySendError::Closed) => return SendOutcome::Closed,
            }
        }
        match self.tx.try_send(item) {
            Ok(()) => SendOutcome::Sent,
            Err(TrySendError::Full) => {
                self.missed.fetch_add(1, Ordering::AcqRel);
                SendOutcome::Dropped
            }
            Err(TrySendError::Closed) => SendOutcome::Closed,
        }
    }

    /// Whether the subscriber has gone away.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the subscriber has gone away.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// A live stream of messages from [`Broker::subscribe`].
///
/// Yields `Ok(envelope)` per message and `Err(Error::Lagged { .. })` where messages were dropped
/// because this subscriber was too slow (see [`Broker::subscribe`]). Dropping it ends the
/// subscription.
pub struct Subscription {
    rx: queue::Receiver<Result<Envelope>>,
    // Shared with the senders: messages dropped and not reported yet. Checked when the buffer
    // is empty, so a loss at the end of a burst is reported without waiting for a next message.
    missed: Arc<AtomicU64>,
    start: Option<Vec<Cursor>>,
    // Dropped with the subscription: lets a broker unsubscribe (e.g. Redis UNSUBSCRIBE).
    _guard: Option<Box<dyn Send + Sync>>,
}

impl Subscription {
    /// A subscription with a buffer of `capacity` messages (at least 1), and its sender.
    pub fn channel(capacity: usize) -> (SubscriptionSender, Self) {
        let (tx, rx) = queue::bounded(capacity);
        let missed = Arc::new(AtomicU64::new(0));
        (
            SubscriptionSender {
                tx,
                missed: missed.clone(),
            },
            Self {
                rx,
                missed,
                start: None,
                _guard: None,
            },
        )
    }

    /// Attaches a value that is dropped when the subscription is, to release broker resources.
    #[must_use]
    pub fn with_guard(mut self, guard: impl Send + Sync + 'static) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }

    /// Records where this subscription starts in the broker's log (see [`start`](Self::start)).
    #[must_use]
    pub fn with_start(mut self, start: Vec<Cursor>) -> Self {
        self.start = Some(start);
        self
    }

    /// For brokers whose cursors are contiguous within a partition (Kafka offsets, the memory
    /// broker's sequence): per partition, the cursor of the first message this subscription
    /// can deliver. Every later durable message of that partition, whatever its room, takes the
    /// next offset, which lets a consumer (DualBus) detect gaps exactly. `None` for brokers
    /// without such a log.
    pub fn start(&self) -> Option<&[Cursor]> {
        self.start.as_deref()
    }

    /// Whether nothing is buffered right now (a loss not reported yet counts as something).
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty() && self.missed.load(Ordering::Acquire) == 0
    }

    /// The next item, or `None` when the broker ended the subscription.
    pub async fn recv(&mut self) -> Option<Result<Envelope>> {
        std::future::poll_fn(|cx| self.poll_next_item(cx)).await
    }

    fn poll_next_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Envelope>>> {
        match self.rx.poll_recv(cx) {
            Poll::Pending => match self.missed.swap(0, Ordering::AcqRel) {
                0 => Poll::Pending,
                missed => Poll::Ready(Some(Err(Error::Lagged { missed }))),
            },
            ready => ready,
        }
    }

    fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Result<Envelope>>,
        limit: usize,
    ) -> Poll<usize> {
        match self.rx.poll_recv_many(cx, out, limit) {
            // Empty buffer: the senders report a loss only with their next message, which may
            // never come; report it now.
            Poll::Pending => match self.missed.swap(0, Ordering::AcqRel) {
                0 => Poll::Pending,
                missed => {
                    out.push(Err(Error::Lagged { missed }));
                    Poll::Ready(1)
                }
            },
            ready => ready,
        }
    }

    /// Receives up to `limit` buffered items at once into `out` (waiting for at least one);
    /// returns how many were added, 0 when the subscription ended. Cheaper per item than
    /// [`recv`](Self::recv) under load.
    pub async fn recv_many(&mut self, out: &mut Vec<Result<Envelope>>, limit: usize) -> usize {
        std::future::poll_fn(|cx| self.poll_recv_many(cx, out, limit.max(1))).await
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("buffered", &self.rx.len())
            .finish_non_exhaustive()
    }
}

impl Stream for Subscription {
    type Item = Result<Envelope>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_next_item(cx)
    }
}

/// Turns a `Vec` of envelopes into a [`HistoryStream`].
pub fn history_stream(items: Vec<Envelope>) -> HistoryStream {
    futures::stream::iter(items.into_iter().map(Ok)).boxed()
}
