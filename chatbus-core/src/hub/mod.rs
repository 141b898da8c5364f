//! Local fan-out inside one instance: see [`Hub`] for how it works.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::broker::{Broker, Receipt};
use crate::envelope::{Cursor, Envelope, Room};
use crate::Result;

use pump::fan_out;
use registry::RoomEntry;
use replays::Replays;
use session::SessionShared;
use stats::{inc, Counters};

mod catchup;
mod config;
mod frame;
mod pump;
mod registry;
mod replays;
mod session;
mod stats;

pub use config::{HubConfig, SlowPolicy};
pub use frame::{Frame, FrameEncoder, RawPayload};
pub use registry::{JoinOptions, Joined};
pub use session::{CloseReason, Outbound, Session, SessionHandle};
pub use stats::HubStats;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent between statements, so a panic elsewhere
    // must not take the whole hub down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Local fan-out for one instance; cheap to clone.
///
/// The Hub keeps rooms → local sessions. For each room with at least one local member it holds
/// one broker subscription (only rooms with local members, so with a broker that filters by
/// interest an instance receives only the traffic it delivers) and one pump task that, per
/// message, encodes the client frame **once** and hands the same [`Bytes`](bytes::Bytes) to every member.
///
/// Every session has a bounded outbound queue. A member whose queue is full never slows the
/// others: with [`SlowPolicy::Resync`] it stops receiving live messages of that room, and its
/// own writer later replays what it missed from its last cursor, then switches back to live
/// with no gap and no duplicate; with [`SlowPolicy::Close`] the session is closed with a reason.
///
/// A transport drives a session from two tasks: a reader that handles client requests through
/// the cloneable [`SessionHandle`] (join, leave, publish, replies), and a writer that loops on
/// [`Session::recv`] and writes what it returns to the socket. Catch-up (resume from a cursor,
/// resync after lag) runs inside `recv`, so it is paced by the writer: a client that reads
/// slowly slows only its own catch-up.
///
/// ```
/// # async fn demo() -> chatbus_core::Result<()> {
/// use std::sync::Arc;
/// use chatbus_core::{Envelope, Hub, HubConfig, MemoryBroker, Outbound, Room};
///
/// let hub = Hub::builder(Arc::new(MemoryBroker::new()))
///     .config(HubConfig::default().with_session_queue(256))
///     .build();
/// let room = Room::new("lobby")?;
/// let mut alice = hub.connect("alice");
/// alice.handle().join(room.clone()).await?;
/// hub.publish(&Envelope::new(room, "hi")).await?;
/// assert!(matches!(alice.recv().await, Outbound::Frame(f) if f == "hi"));
/// # Ok(()) }
/// ```
///
/// Where each concern lives: `registry.rs` (rooms → members, join and leave), `session.rs`
/// (the per-session queues and what `recv` writes next), `catchup.rs` (replay from a cursor,
/// then live), `pump.rs` (one task per room: broker subscription → fan-out).
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
    replays: Arc<Replays>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("broker", &self.inner.broker)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub over `broker` with the default configuration, sending each message's payload as
    /// the client frame ([`RawPayload`]).
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Self::builder(broker).build()
    }

    /// A hub over `broker` with `config`.
    pub fn with_config(broker: Arc<dyn Broker>, config: HubConfig) -> Self {
        Self::builder(broker).config(config).build()
    }

    /// A builder, to set the frame encoder and the configuration.
    pub fn builder(broker: Arc<dyn Broker>) -> HubBuilder {
        HubBuilder {
            broker,
            encoder: Arc::new(RawPayload),
            config: HubConfig::default(),
        }
    }

    /// The broker behind this hub.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> HubStats {
        let mut stats = self.inner.stats.snapshot();
        stats.replay_reads = self.inner.replays.log_reads();
        stats.replays_shared = self.inner.replays.shared_reads();
        stats
    }

    /// Opens a session for `user`.
    pub fn connect(&self, user: impl Into<Arc<str>>) -> Session {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(SessionShared::new(id, user.into()));
        lock(&self.inner.sessions).insert(id, Arc::downgrade(&shared));
        inc(&self.inner.stats.sessions);
        Session::new(SessionHandle {
            hub: self.clone(),
            shared,
        })
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
    ) -> Result<crate::HistoryPage> {
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

    /// How many sessions of this instance are in `room` (a user with two connections counts
    /// twice): O(1), where [`local_members`](Self::local_members) is O(members).
    pub fn local_sessions(&self, room: &Room) -> usize {
        let entry = lock(&self.inner.rooms).get(room).cloned();
        entry.map_or(0, |e| lock(&e.members).list.len())
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
}

/// Builds a [`Hub`] ([`Hub::builder`]).
#[derive(Debug)]
#[must_use]
pub struct HubBuilder {
    broker: Arc<dyn Broker>,
    encoder: Arc<dyn FrameEncoder>,
    config: HubConfig,
}

impl HubBuilder {
    /// The encoder that turns each envelope into the client frame, once per message. Default
    /// [`RawPayload`].
    pub fn encoder(mut self, encoder: Arc<dyn FrameEncoder>) -> Self {
        self.encoder = encoder;
        self
    }

    /// The configuration. Default [`HubConfig::default`].
    pub fn config(mut self, config: HubConfig) -> Self {
        self.config = config;
        self
    }

    /// The hub.
    pub fn build(self) -> Hub {
        Hub {
            inner: Arc::new(HubInner {
                broker: self.broker,
                encoder: self.encoder,
                rooms: Mutex::new(HashMap::new()),
                sessions: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                next_gen: AtomicU64::new(1),
                stats: Counters::default(),
                replays: Arc::new(Replays::new(self.config.max_replays)),
                config: self.config,
            }),
        }
    }
}
