//! [`Hub`]: local fan-out inside one instance.
//!
//! The Hub keeps rooms → local sessions. For each room with at least one local member it holds
//! one broker subscription (only rooms with local members, so with a broker that filters by
//! interest an instance receives only the traffic it delivers) and one pump task that, per
//! message, encodes the client frame **once** and hands the same [`Bytes`] to every member.
//!
//! Every session has a bounded outbound queue. A member whose queue is full never slows the
//! others: with [`SlowPolicy::Resync`] it stops receiving live messages of that room, and its
//! own writer later replays what it missed from its last cursor, then switches back to live
//! with no gap and no duplicate; with [`SlowPolicy::Close`] the session is closed with a reason.
//!
//! A transport drives a session from two tasks: a reader that handles client requests through
//! the cloneable [`SessionHandle`] (join, leave, publish, replies), and a writer that loops on
//! [`Session::recv`] and writes what it returns to the socket. Catch-up (resume from a cursor,
//! resync after lag) runs inside `recv`, so it is paced by the writer: a client that reads
//! slowly slows only its own catch-up.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Notify, OnceCell};

use crate::broker::{Broker, HistoryStream, Interest, Receipt, ReplayFrom, Subscription};
use crate::envelope::{Cursor, Envelope, Room};
use crate::{Error, Result};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent between statements, so a panic elsewhere
    // must not take the whole hub down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A client frame produced by a [`FrameEncoder`].
#[derive(Debug, Clone)]
pub struct Frame {
    /// The bytes sent to each recipient, shared by all of them.
    pub bytes: Bytes,
    /// Do not deliver to sessions of the sending user (`Envelope::from`), e.g. typing events.
    pub skip_sender: bool,
}

/// Turns an envelope into the frame clients receive. Called once per message per instance.
pub trait FrameEncoder: Send + Sync + fmt::Debug + 'static {
    /// The frame for `envelope`, or `None` to deliver nothing to clients.
    fn encode(&self, envelope: &Envelope) -> Option<Frame>;
}

/// The default encoder: the envelope's payload, as is.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawPayload;

impl FrameEncoder for RawPayload {
    fn encode(&self, envelope: &Envelope) -> Option<Frame> {
        Some(Frame {
            bytes: envelope.payload.clone(),
            skip_sender: false,
        })
    }
}

/// What the Hub does with a session whose outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowPolicy {
    /// Stop live delivery of the room to it and replay from its last cursor once it catches up
    /// (when the broker keeps history; otherwise it is told with [`Outbound::Lagged`]).
    #[default]
    Resync,
    /// Close the session with [`CloseReason::SlowConsumer`].
    Close,
}

/// Configuration of a [`Hub`].
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Frames queued per session, not yet taken by its writer, before it counts as slow.
    /// The writer takes what is queued in one batch, so up to twice this many may be
    /// buffered in all. Default 1,024.
    pub session_queue: usize,
    /// Replies (acks, errors) buffered per session before it is closed as slow. Default 256.
    pub control_queue: usize,
    /// Bytes of replies (history pages can be large) buffered per session before it is
    /// closed as slow. Default 8 MiB.
    pub control_bytes: usize,
    /// See [`SlowPolicy`]. Default `Resync`.
    pub slow_policy: SlowPolicy,
    /// Messages fetched per replay request during catch-up. Default 500.
    pub replay_page: usize,
    /// Most messages replayed in one catch-up; past it the client is told it lagged. Default
    /// 100,000.
    pub max_catchup: usize,
    /// Live messages held for a member while it catches up; past it the catch-up goes on from
    /// the log. Default 4,096.
    pub pending_limit: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            session_queue: 1024,
            control_queue: 256,
            control_bytes: 8 << 20,
            slow_policy: SlowPolicy::Resync,
            replay_page: 500,
            max_catchup: 100_000,
            pending_limit: 4096,
        }
    }
}

/// Why a session was closed by the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// It could not keep up ([`SlowPolicy::Close`], or too many unread replies).
    SlowConsumer,
    /// The hub is shutting down.
    Shutdown,
}

/// What [`Session::recv`] hands to the transport's writer.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A frame to send as is (a message, or a reply queued with [`SessionHandle::reply`]).
    Frame(Bytes),
    /// Messages of `room` were lost for this session and cannot be replayed (the broker keeps
    /// no history, or the catch-up limit was reached). `cursor` is the last one it received.
    Lagged {
        /// The room.
        room: Room,
        /// The last cursor delivered in that room.
        cursor: Option<Cursor>,
    },
    /// The session is closed; send a close frame and stop.
    Close(CloseReason),
}

/// A snapshot of a hub's counters ([`Hub::stats`]). All are totals since start except the gauges `sessions` and `rooms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HubStats {
    /// Open sessions (gauge).
    pub sessions: u64,
    /// Rooms with local members (gauge).
    pub rooms: u64,
    /// Messages received from the broker.
    pub messages_in: u64,
    /// Frames handed to session queues (one per recipient).
    pub deliveries: u64,
    /// Times a member's queue overflowed.
    pub lagged: u64,
    /// Messages delivered from the log during catch-up.
    pub replayed: u64,
    /// Copies skipped because the member already had that cursor.
    pub duplicates: u64,
    /// Sessions closed as slow.
    pub slow_closed: u64,
    /// Errors from the broker subscription (lag, disconnects).
    pub broker_errors: u64,
}

/// The live counters behind [`HubStats`].
#[derive(Debug, Default)]
struct Counters {
    sessions: AtomicU64,
    rooms: AtomicU64,
    messages_in: AtomicU64,
    deliveries: AtomicU64,
    lagged: AtomicU64,
    replayed: AtomicU64,
    duplicates: AtomicU64,
    slow_closed: AtomicU64,
    broker_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> HubStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HubStats {
            sessions: get(&self.sessions),
            rooms: get(&self.rooms),
            messages_in: get(&self.messages_in),
            deliveries: get(&self.deliveries),
            lagged: get(&self.lagged),
            replayed: get(&self.replayed),
            duplicates: get(&self.duplicates),
            slow_closed: get(&self.slow_closed),
            broker_errors: get(&self.broker_errors),
        }
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A session's frame queue keeps at most this much capacity once drained.
const SHRINK_ABOVE: usize = 64;

/// Local fan-out for one instance; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    broker: Arc<dyn Broker>,
    encoder: Arc<dyn FrameEncoder>,
    config: HubConfig,
    rooms: Mutex<HashMap<Room, Arc<RoomEntry>>>,
    sessions: Mutex<HashMap<u64, Weak<SessionShared>>>,
    next_session: AtomicU64,
    next_gen: AtomicU64,
    stats: Counters,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("broker", &self.inner.broker)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct RoomEntry {
    room: Room,
    members: Mutex<Members>,
    // Set once the broker subscription and its pump are running.
    pump: OnceCell<tokio::task::AbortHandle>,
}

#[derive(Default)]
struct Members {
    list: Vec<Member>,
    // Set under this lock when the entry leaves the hub's map: a joiner holding a stale Arc
    // sees it and retries with a fresh entry.
    removed: bool,
}

struct Member {
    session: Arc<SessionShared>,
    // The last cursor handed to this member: the resume point, and the dedupe bound. Only
    // cursors actually delivered go here, never a client's `since` (which may be wrong).
    last: Option<Cursor>,
    mode: Mode,
    // Which join this membership belongs to: a catch-up queued by an earlier join (or before
    // a leave) carries an older number and is dropped.
    gen: u64,
}

enum Mode {
    Live,
    CatchingUp {
        pending: VecDeque<(Option<Cursor>, Bytes)>,
        overflowed: bool,
    },
}

struct SessionShared {
    id: u64,
    user: Arc<str>,
    // Live frames, bounded by `HubConfig::session_queue`. A plain deque under a mutex rather
    // than a tokio mpsc channel: it allocates nothing until a frame is queued (the channel's
    // first block cost about 1.5 KiB per connection, idle or not), and one lock per push is
    // cheaper than the channel's semaphore and block list.
    frames: Mutex<VecDeque<Bytes>>,
    control: Mutex<VecDeque<Control>>,
    notify: Notify,
    closed: Mutex<Option<CloseReason>>,
    is_closed: AtomicBool,
    // Rooms joined, with the generation of the join.
    rooms: Mutex<HashMap<Room, u64>>,
    // Bytes of queued replies (bounded by `HubConfig::control_bytes`).
    control_bytes: AtomicUsize,
    // Set when the `Session` is dropped: a `join` finishing afterwards undoes itself.
    dropped: AtomicBool,
}

enum Control {
    Reply(Bytes),
    CatchUp { room: Room, since: Cursor, gen: u64 },
    Lagged { room: Room, cursor: Option<Cursor> },
}

impl SessionShared {
    /// Queues a live frame; false when the queue is full (the member lags).
    fn push_frame(&self, frame: Bytes, limit: usize) -> bool {
        let mut q = lock(&self.frames);
        if q.len() >= limit {
            return false;
        }
        let was_empty = q.is_empty();
        q.push_back(frame);
        drop(q);
        // The writer only waits after it found the queue empty (under this lock), so a push
        // onto a non-empty queue has nobody to wake: at high rates most pushes skip the wake.
        if was_empty {
            self.notify.notify_one();
        }
        true
    }

    /// Moves every queued frame to the end of `into` (one lock per batch: the fan-out, which
    /// pushes under this lock, rarely finds it held by the writer). False if there were none.
    fn take_frames(&self, into: &mut VecDeque<Bytes>) -> bool {
        let mut q = lock(&self.frames);
        if q.is_empty() {
            return false;
        }
        if into.is_empty() {
            std::mem::swap(&mut *q, into);
        } else {
            into.extend(q.drain(..));
        }
        true
    }

    fn push_control(&self, c: Control, limit: usize) -> bool {
        let mut q = lock(&self.control);
        if q.len() >= limit {
            return false;
        }
        if let Control::Reply(b) = &c {
            self.control_bytes.fetch_add(b.len(), Ordering::Relaxed);
        }
        q.push_back(c);
        drop(q);
        self.notify.notify_one();
        true
    }

    fn pop_control(&self) -> Option<Control> {
        let c = lock(&self.control).pop_front();
        if let Some(Control::Reply(b)) = &c {
            self.control_bytes.fetch_sub(b.len(), Ordering::Relaxed);
        }
        c
    }

    /// The generation of this session's membership of `room`, if it is a member.
    fn gen(&self, room: &Room) -> Option<u64> {
        lock(&self.rooms).get(room).copied()
    }

    fn close(&self, reason: CloseReason) {
        let mut c = lock(&self.closed);
        if c.is_none() {
            *c = Some(reason);
            self.is_closed.store(true, Ordering::Release);
        }
        drop(c);
        self.notify.notify_one();
    }
}

/// What [`Hub::join`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    /// A resume cursor was given and the broker keeps history: the missed messages will be
    /// delivered before live ones.
    pub resuming: bool,
}

impl Hub {
    /// A hub over `broker` that sends each message's payload as the client frame.
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Self::with_encoder(broker, Arc::new(RawPayload), HubConfig::default())
    }

    /// A hub with a frame encoder and a configuration.
    pub fn with_encoder(
        broker: Arc<dyn Broker>,
        encoder: Arc<dyn FrameEncoder>,
        config: HubConfig,
    ) -> Self {
        Self {
            inner: Arc::new(HubInner {
                broker,
                encoder,
                config,
                rooms: Mutex::new(HashMap::new()),
                sessions: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                next_gen: AtomicU64::new(1),
                stats: Counters::default(),
            }),
        }
    }

    /// The broker behind this hub.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> HubStats {
        self.inner.stats.snapshot()
    }

    /// Opens a session for `user`.
    pub fn connect(&self, user: impl Into<Arc<str>>) -> Session {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(SessionShared {
            id,
            user: user.into(),
            frames: Mutex::new(VecDeque::new()),
            control: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            closed: Mutex::new(None),
            is_closed: AtomicBool::new(false),
            rooms: Mutex::new(HashMap::new()),
            control_bytes: AtomicUsize::new(0),
            dropped: AtomicBool::new(false),
        });
        lock(&self.inner.sessions).insert(id, Arc::downgrade(&shared));
        inc(&self.inner.stats.sessions);
        Session {
            handle: SessionHandle {
                hub: self.clone(),
                shared,
            },
            live: VecDeque::new(),
            catchup: None,
            waiting: VecDeque::new(),
            ready: VecDeque::new(),
        }
    }

    /// Publishes through the broker; local members receive it through the broker subscription
    /// like everyone else, so every instance delivers in the broker's order.
    pub async fn publish(&self, envelope: &Envelope) -> Result<Receipt> {
        self.inner.broker.publish(envelope).await
    }

    /// One page of older history of `room` (see [`Broker::history`]).
    pub async fn history(
        &self,
        room: &Room,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<Envelope>> {
        self.inner.broker.history(room, before, limit).await
    }

    /// Delivers `envelope` to this instance's members of its room only, without the broker:
    /// exactly what happens to each message the broker brings (encode once, share with every
    /// member). Returns the number of sessions it was queued for. Useful for server-local
    /// notices and for measuring fan-out.
    pub fn deliver_local(&self, envelope: &Envelope) -> u64 {
        let entry = lock(&self.inner.rooms).get(&envelope.room).cloned();
        entry.map_or(0, |entry| fan_out(&self.inner, &entry, envelope))
    }

    /// The distinct users with a local session in `room`.
    pub fn local_members(&self, room: &Room) -> Vec<Arc<str>> {
        let entry = lock(&self.inner.rooms).get(room).cloned();
        let Some(entry) = entry else {
            return Vec::new();
        };
        let members = lock(&entry.members);
        let mut seen = HashSet::new();
        members
            .list
            .iter()
            .filter(|m| seen.insert(m.session.user.clone()))
            .map(|m| m.session.user.clone())
            .collect()
    }

    /// The rooms that have local members.
    pub fn rooms(&self) -> Vec<Room> {
        lock(&self.inner.rooms).keys().cloned().collect()
    }

    /// Closes every session with [`CloseReason::Shutdown`]: their writers send a going-away
    /// close after the frames already queued.
    pub fn shutdown(&self) {
        let sessions: Vec<_> = lock(&self.inner.sessions)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for s in sessions {
            s.close(CloseReason::Shutdown);
        }
    }

    /// Adds the session to `room`. With `since`, the messages after that cursor are delivered
    /// first, then live ones, with no gap and no duplicate (where the broker keeps history).
    /// `reply`, if given, is queued to the session before any of those messages.
    ///
    /// Joining a room the session is already in updates its resume point; a catch-up still
    /// running from an earlier join of that room is abandoned.
    pub async fn join(
        &self,
        session: &SessionHandle,
        room: Room,
        since: Option<Cursor>,
        reply: Option<Bytes>,
    ) -> Result<Joined> {
        let resuming = since.is_some() && self.inner.broker.capabilities().replay;
        loop {
            let entry = {
                let mut rooms = lock(&self.inner.rooms);
                rooms
                    .entry(room.clone())
                    .or_insert_with(|| {
                        inc(&self.inner.stats.rooms);
                        Arc::new(RoomEntry {
                            room: room.clone(),
                            members: Mutex::new(Members::default()),
                            pump: OnceCell::new(),
                        })
                    })
                    .clone()
            };
            // Subscribe before the member is added and before any replay, so that nothing
            // published from now on can fall between history and live.
            entry
                .pump
                .get_or_try_init(|| async {
                    let sub = self
                        .inner
                        .broker
                        .subscribe(Interest::room(room.clone()))
                        .await?;
                    let task = tokio::spawn(pump(
                        Arc::downgrade(&self.inner),
                        Arc::downgrade(&entry),
                        sub,
                    ));
                    Ok::<_, Error>(task.abort_handle())
                })
                .await
                .inspect_err(|_| self.remove_if_empty(&entry))?;
            let gen = self.inner.next_gen.fetch_add(1, Ordering::Relaxed);
            let mut members = lock(&entry.members);
            if members.removed {
                continue;
            }
            // The reply goes first, before the member can receive anything.
            if let Some(reply) = reply {
                session
                    .shared
                    .push_control(Control::Reply(reply), usize::MAX);
            }
            let mode = if resuming {
                Mode::CatchingUp {
                    pending: VecDeque::new(),
                    overflowed: false,
                }
            } else {
                Mode::Live
            };
            match members
                .list
                .iter_mut()
                .find(|m| m.session.id == session.shared.id)
            {
                Some(m) => {
                    m.mode = mode;
                    m.gen = gen;
                }
                None => members.list.push(Member {
                    session: session.shared.clone(),
                    last: None,
                    mode,
                    gen,
                }),
            }
            drop(members);
            lock(&session.shared.rooms).insert(room.clone(), gen);
            if session.shared.dropped.load(Ordering::Acquire) {
                // The Session was dropped while we joined: its Drop could not see this room.
                self.remove_member(session.shared.id, &room);
                return Err(Error::Closed);
            }
            if let (true, Some(since)) = (resuming, since) {
                let job = Control::CatchUp { room, since, gen };
                if !session
                    .shared
                    .push_control(job, self.inner.config.control_queue)
                {
                    session.shared.close(CloseReason::SlowConsumer);
                }
            }
            return Ok(Joined { resuming });
        }
    }

    /// Removes the session from `room`. Returns whether it was a member.
    pub fn leave(&self, session: &SessionHandle, room: &Room) -> bool {
        lock(&session.shared.rooms).remove(room);
        self.remove_member(session.shared.id, room)
    }

    fn remove_member(&self, session_id: u64, room: &Room) -> bool {
        let entry = lock(&self.inner.rooms).get(room).cloned();
        let Some(entry) = entry else {
            return false;
        };
        let mut members = lock(&entry.members);
        let before = members.list.len();
        members.list.retain(|m| m.session.id != session_id);
        let removed = members.list.len() != before;
        drop(members);
        self.remove_if_empty(&entry);
        removed
    }

    fn remove_if_empty(&self, entry: &Arc<RoomEntry>) {
        let mut rooms = lock(&self.inner.rooms);
        let mut members = lock(&entry.members);
        if members.list.is_empty() && !members.removed {
            members.removed = true;
            if rooms
                .get(&entry.room)
                .is_some_and(|e| Arc::ptr_eq(e, entry))
            {
                rooms.remove(&entry.room);
                self.inner.stats.rooms.fetch_sub(1, Ordering::Relaxed);
            }
            // Dropping the pump drops the broker subscription (the broker unsubscribes).
            if let Some(pump) = entry.pump.get() {
                pump.abort();
            }
        }
    }
}

/// The reader side of a session: cloneable, used to join, leave, publish and reply.
#[derive(Clone)]
pub struct SessionHandle {
    hub: Hub,
    shared: Arc<SessionShared>,
}

impl fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionHandle")
            .field("id", &self.shared.id)
            .field("user", &self.shared.user)
            .finish()
    }
}

impl SessionHandle {
    /// The session id, unique within this hub.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The user this session belongs to.
    pub fn user(&self) -> &Arc<str> {
        &self.shared.user
    }

    /// The hub.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The rooms this session is in.
    pub fn rooms(&self) -> Vec<Room> {
        lock(&self.shared.rooms).keys().cloned().collect()
    }

    /// Whether this session is in `room`.
    pub fn is_member(&self, room: &Room) -> bool {
        lock(&self.shared.rooms).contains_key(room)
    }

    /// Queues a reply frame (ack, error, pong) to this session only, ahead of further messages.
    /// Returns `false` and closes the session as slow if too many replies (by count or by
    /// bytes) are unread.
    pub fn reply(&self, frame: Bytes) -> bool {
        let config = &self.hub.inner.config;
        let ok = self.shared.control_bytes.load(Ordering::Relaxed) + frame.len()
            <= config.control_bytes.max(1)
            && self
                .shared
                .push_control(Control::Reply(frame), config.control_queue);
        if !ok {
            self.close(CloseReason::SlowConsumer);
        }
        ok
    }

    /// Closes the session: its writer gets [`Outbound::Close`].
    pub fn close(&self, reason: CloseReason) {
        if reason == CloseReason::SlowConsumer {
            inc(&self.hub.inner.stats.slow_closed);
        }
        self.shared.close(reason);
    }

    /// Whether the session was closed.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed.load(Ordering::Acquire)
    }
}

/// The writer side of a session. Dropping it leaves every room.
pub struct Session {
    handle: SessionHandle,
    // Live frames taken from the shared queue, written before the next take.
    live: VecDeque<Bytes>,
    catchup: Option<CatchUp>,
    // Catch-ups not started yet, one per room, run one after another.
    waiting: VecDeque<(Room, Cursor, u64)>,
    ready: VecDeque<Bytes>,
}

/// A replay request in flight, kept across cancellations of `Session::recv` (transports call it
/// inside `select!`), so that a cancelled call neither loses nor repeats work.
type Fetch = futures::future::BoxFuture<'static, Result<HistoryStream>>;

struct CatchUp {
    room: Room,
    // The membership this catch-up belongs to.
    gen: u64,
    // Where the client said it was.
    since: Cursor,
    // The last cursor replayed to it: replay continues strictly after it.
    delivered: Option<Cursor>,
    fetch: Option<Fetch>,
    stream: Option<HistoryStream>,
    // Items read from the current page, to tell a full page from the end of the log.
    page_len: usize,
    count: usize,
    // Failed replay requests in a row; transient errors are retried a few times.
    failures: u32,
}

impl CatchUp {
    /// The position replay continues from.
    fn position(&self) -> Cursor {
        self.delivered.unwrap_or(self.since)
    }
}

/// Replay requests retried after a failure before the client is told it lagged.
const CATCHUP_RETRIES: u32 = 3;

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.handle.shared.id)
            .field("user", &self.handle.shared.user)
            .finish_non_exhaustive()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.handle.shared.dropped.store(true, Ordering::Release);
        let rooms: Vec<Room> = lock(&self.handle.shared.rooms)
            .drain()
            .map(|(r, _)| r)
            .collect();
        for room in rooms {
            self.handle.hub.remove_member(self.handle.shared.id, &room);
        }
        let inner = &self.handle.hub.inner;
        lock(&inner.sessions).remove(&self.handle.shared.id);
        inner.stats.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Session {
    /// A handle for the reader side.
    pub fn handle(&self) -> SessionHandle {
        self.handle.clone()
    }

    /// The next thing to write to the client. Never returns `None` while the hub lives; after
    /// [`Outbound::Close`] the transport should stop calling it.
    ///
    /// Cancel-safe: it may be used in `select!`; nothing is lost or repeated when a call is
    /// dropped before it returns.
    pub async fn recv(&mut self) -> Outbound {
        let shared = self.handle.shared.clone();
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Outbound::Frame(b);
            }
            let closed = *lock(&shared.closed);
            if closed == Some(CloseReason::SlowConsumer) {
                return Outbound::Close(CloseReason::SlowConsumer);
            }
            // Replies first: an ack must not wait behind a burst of messages.
            match shared.pop_control() {
                Some(Control::Reply(b)) => return Outbound::Frame(b),
                Some(Control::Lagged { room, cursor }) => return Outbound::Lagged { room, cursor },
                Some(Control::CatchUp { room, since, gen }) => {
                    // A newer join of a room replaces a catch-up still waiting for it.
                    self.waiting.retain(|(r, _, _)| *r != room);
                    self.waiting.push_back((room, since, gen));
                    continue;
                }
                None => {}
            }
            if self.catchup.is_none() {
                if let Some((room, since, gen)) = self.waiting.pop_front() {
                    if shared.gen(&room) != Some(gen) {
                        continue; // left or re-joined since: stale
                    }
                    // Frames of this room queued before it stopped live delivery come first;
                    // none are added while it catches up.
                    self.ready.append(&mut self.live);
                    shared.take_frames(&mut self.ready);
                    self.catchup = Some(CatchUp {
                        room,
                        gen,
                        since,
                        delivered: None,
                        fetch: None,
                        stream: None,
                        page_len: 0,
                        count: 0,
                        failures: 0,
                    });
                    continue;
                }
            }
            // Live frames (of other rooms: the one catching up gets none) go on meanwhile.
            if let Some(b) = self.live.pop_front() {
                return Outbound::Frame(b);
            }
            // Give back the memory of a burst once it is written: idle connections stay small.
            if self.live.capacity() > SHRINK_ABOVE {
                self.live = VecDeque::new();
            }
            if shared.take_frames(&mut self.live) {
                continue;
            }
            if self.catchup.is_some() {
                // A reply or a live frame arriving meanwhile interrupts a slow replay request.
                tokio::select! {
                    out = self.step_catchup() => {
                        if let Some(out) = out {
                            return out;
                        }
                    }
                    () = shared.notify.notified() => {}
                }
                continue;
            }
            // On shutdown, what was queued before is still sent, then the close.
            if let Some(reason) = closed {
                return Outbound::Close(reason);
            }
            // Frames, replies, catch-up jobs and closes all notify; a permit stored by a push
            // that raced with the checks above makes this return at once.
            shared.notify.notified().await;
        }
    }

    /// Advances the current catch-up by at most one message; `None` when it made progress
    /// without a frame to send (a new page, a skipped copy, or the switch back to live).
    async fn step_catchup(&mut self) -> Option<Outbound> {
        let inner = self.handle.hub.inner.clone();
        let page = inner.config.replay_page.max(1);
        let shared = self.handle.shared.clone();
        let cu = self.catchup.as_mut()?;
        if shared.gen(&cu.room) != Some(cu.gen) {
            // Left, or joined again (which queued its own catch-up): abandon this one.
            self.catchup = None;
            return None;
        }
        if cu.stream.is_none() {
            let fetch = cu.fetch.get_or_insert_with(|| {
                let (broker, room, from) = (
                    inner.broker.clone(),
                    cu.room.clone(),
                    ReplayFrom::Cursor(cu.delivered.unwrap_or(cu.since)),
                );
                let backoff = Duration::from_millis(200 << cu.failures.min(4));
                let wait = cu.failures > 0;
                Box::pin(async move {
                    if wait {
                        tokio::time::sleep(backoff).await;
                    }
                    broker.replay(&room, from, page).await
                })
            });
            let result = fetch.await;
            cu.fetch = None;
            match result {
                Ok(s) => {
                    cu.page_len = 0;
                    cu.failures = 0;
                    cu.stream = Some(s);
                }
                Err(e) if e.is_transient() && cu.failures < CATCHUP_RETRIES => {
                    cu.failures += 1;
                    tracing::debug!(room = %cu.room, error = %e, "catch-up replay failed; retrying");
                    return None;
                }
                Err(e) => {
                    tracing::warn!(room = %cu.room, error = %e, "catch-up replay failed");
                    return Some(self.end_catchup_lagged());
                }
            }
        }
        let stream = cu.stream.as_mut()?;
        match stream.next().await {
            Some(Ok(env)) => {
                cu.page_len += 1;
                let c = env.cursor?;
                if c <= cu.position() {
                    return None;
                }
                cu.delivered = Some(c);
                cu.count += 1;
                inc(&inner.stats.replayed);
                let frame = inner.encoder.encode(&env).map(|f| f.bytes);
                if cu.count >= inner.config.max_catchup {
                    // Enough: go live from here and tell the client what it did not get.
                    let lagged = self.end_catchup_lagged();
                    if let Outbound::Lagged { room, cursor } = lagged {
                        shared.push_control(Control::Lagged { room, cursor }, usize::MAX);
                    }
                }
                frame.map(Outbound::Frame)
            }
            Some(Err(e)) => {
                tracing::warn!(room = %cu.room, error = %e, "catch-up replay failed");
                cu.stream = None;
                if e.is_transient() && cu.failures < CATCHUP_RETRIES {
                    cu.failures += 1;
                    return None;
                }
                Some(self.end_catchup_lagged())
            }
            None => {
                cu.stream = None;
                // A full page means the log may go on: fetch the next. A short page reached the
                // end of the log as it was when fetched; everything published since then is
                // either held for us (pending) or not yet fanned out (the pump will deliver it
                // live, after our cursor).
                if cu.page_len >= page {
                    return None;
                }
                if self.go_live(false) {
                    self.catchup = None;
                }
                None
            }
        }
    }

    /// Gives up a catch-up (replay failed or the limit was reached): the member goes live and
    /// the client is told it lagged, with the last cursor it got.
    fn end_catchup_lagged(&mut self) -> Outbound {
        self.go_live(true);
        let Some(cu) = self.catchup.take() else {
            return Outbound::Close(CloseReason::Shutdown);
        };
        let cursor = Some(cu.position());
        Outbound::Lagged {
            room: cu.room,
            cursor,
        }
    }

    /// Moves this session's member of the catching-up room to live: the live messages held
    /// meanwhile that come after what the client has are queued (older ones are copies of
    /// replayed ones). Without `force`, refuses when held messages overflowed or the room's
    /// live stream lagged meanwhile (returns false: what was missed is in the log, so the
    /// caller replays on; the buffer starts empty again).
    fn go_live(&mut self, force: bool) -> bool {
        let Some(cu) = self.catchup.as_ref() else {
            return true;
        };
        let inner = self.handle.hub.inner.clone();
        let entry = lock(&inner.rooms).get(&cu.room).cloned();
        let Some(entry) = entry else { return true };
        let mut members = lock(&entry.members);
        let Some(m) = members
            .list
            .iter_mut()
            .find(|m| m.session.id == self.handle.shared.id && m.gen == cu.gen)
        else {
            return true;
        };
        let Mode::CatchingUp {
            pending,
            overflowed,
        } = &mut m.mode
        else {
            return true;
        };
        if *overflowed && !force {
            pending.clear();
            *overflowed = false;
            return false;
        }
        let held = std::mem::take(pending);
        // What the client has: what was replayed to it, or else what it said it had.
        let mut bound = cu.position();
        if let Some(d) = cu.delivered {
            m.last = m.last.max(Some(d));
        }
        for (c, frame) in held {
            if let Some(c) = c {
                if c <= bound {
                    inc(&inner.stats.duplicates);
                    continue;
                }
                bound = c;
                m.last = Some(c);
            }
            self.ready.push_back(frame);
        }
        m.mode = Mode::Live;
        true
    }
}

/// Reads one room's broker subscription and fans every message out to the room's members.
async fn pump(hub: Weak<HubInner>, entry: Weak<RoomEntry>, mut sub: Subscription) {
    let mut batch = Vec::with_capacity(64);
    loop {
        if sub.recv_many(&mut batch, 64).await == 0 {
            // The broker ended the subscription (it gave up reconnecting): resubscribe, and let
            // members resync from their cursors since messages may have been missed.
            let (Some(hub), Some(entry)) = (hub.upgrade(), entry.upgrade()) else {
                return;
            };
            inc(&hub.stats.broker_errors);
            tokio::time::sleep(Duration::from_millis(500)).await;
            match hub
                .broker
                .subscribe(Interest::room(entry.room.clone()))
                .await
            {
                Ok(s) => {
                    sub = s;
                    resync_all(&hub, &entry);
                }
                Err(e) => tracing::warn!(room = %entry.room, error = %e, "resubscribe failed"),
            }
            continue;
        }
        let (Some(hub), Some(entry)) = (hub.upgrade(), entry.upgrade()) else {
            return;
        };
        for item in batch.drain(..) {
            match item {
                Ok(env) => {
                    fan_out(&hub, &entry, &env);
                }
                Err(e) => {
                    inc(&hub.stats.broker_errors);
                    tracing::debug!(room = %entry.room, error = %e, "broker subscription error");
                    if matches!(e, Error::Lagged { .. }) {
                        resync_all(&hub, &entry);
                    }
                }
            }
        }
    }
}

/// Every live member of the room replays from its last cursor (or is told it lagged).
fn resync_all(hub: &HubInner, entry: &RoomEntry) {
    let mut members = lock(&entry.members);
    for m in &mut members.list {
        match &mut m.mode {
            Mode::Live => lag_member(hub, &entry.room, m, None),
            // What the live stream lost may be in neither the page already fetched nor the
            // held messages: make its catch-up replay again before going live.
            Mode::CatchingUp { overflowed, .. } => *overflowed = true,
        }
    }
}

/// `missed` is the cursor of the message that did not fit, if known: with no cursor delivered
/// yet, replay resumes just before it.
fn lag_member(hub: &HubInner, room: &Room, m: &mut Member, missed: Option<Cursor>) {
    inc(&hub.stats.lagged);
    let before_missed = missed
        .filter(|c| c.offset > 0)
        .map(|c| Cursor::new(c.partition, c.offset - 1));
    match (
        hub.config.slow_policy,
        m.last.or(before_missed),
        hub.broker.capabilities().replay,
    ) {
        (SlowPolicy::Close, _, _) => {
            inc(&hub.stats.slow_closed);
            m.session.close(CloseReason::SlowConsumer);
        }
        (SlowPolicy::Resync, Some(since), true) => {
            m.mode = Mode::CatchingUp {
                pending: VecDeque::new(),
                overflowed: false,
            };
            let job = Control::CatchUp {
                room: room.clone(),
                since,
                gen: m.gen,
            };
            if !m.session.push_control(job, hub.config.control_queue) {
                m.session.close(CloseReason::SlowConsumer);
            }
        }
        (SlowPolicy::Resync, cursor, _) => {
            // Nothing to replay from: the loss is reported and live delivery goes on.
            let note = Control::Lagged {
                room: room.clone(),
                cursor,
            };
            if !m.session.push_control(note, hub.config.control_queue) {
                m.session.close(CloseReason::SlowConsumer);
            }
        }
    }
}

fn fan_out(hub: &HubInner, entry: &RoomEntry, env: &Envelope) -> u64 {
    inc(&hub.stats.messages_in);
    let Some(frame) = hub.encoder.encode(env) else {
        return 0;
    };
    let mut delivered = 0u64;
    let mut duplicates = 0u64;
    let mut members = lock(&entry.members);
    for m in &mut members.list {
        if frame.skip_sender && env.from.as_deref() == Some(&*m.session.user) {
            continue;
        }
        // Cursors of one room only grow, so a cursor at or below the member's last is a copy
        // it already has (replayed during catch-up, or delivered twice by the broker).
        if let (Some(c), Some(l)) = (env.cursor, m.last) {
            if c <= l {
                duplicates += 1;
                continue;
            }
        }
        match &mut m.mode {
            Mode::Live => {
                if m.session
                    .push_frame(frame.bytes.clone(), hub.config.session_queue.max(1))
                {
                    delivered += 1;
                    if env.cursor.is_some() {
                        m.last = env.cursor;
                    }
                } else {
                    lag_member(hub, &entry.room, m, env.cursor);
                }
            }
            Mode::CatchingUp {
                pending,
                overflowed,
            } => {
                if pending.len() < hub.config.pending_limit {
                    pending.push_back((env.cursor, frame.bytes.clone()));
                } else {
                    *overflowed = true;
                }
            }
        }
    }
    drop(members);
    hub.stats.deliveries.fetch_add(delivered, Ordering::Relaxed);
    hub.stats
        .duplicates
        .fetch_add(duplicates, Ordering::Relaxed);
    delivered
}
