//! [`DualBus`]: a fast broker for live fan-out composed with a durable broker for the record.
//!
//! # How it works
//!
//! **Publish.** A durable message is written to the durable broker first (Kafka: idempotent,
//! `acks=all`). Once acknowledged its cursor is known; the same envelope, now carrying that
//! cursor, is published on the fast broker (Redis). The sender's receipt comes after the durable
//! ack, so an acknowledged message is never lost. If the fast publish fails, the message still
//! reaches every instance through the durable tail. If the durable publish fails, the
//! [`DurableDownPolicy`] decides: reject (default) or degrade to fast-only. Ephemeral messages
//! (typing, presence) go to the fast broker only.
//!
//! **Subscribe.** Each `DualBus` runs one merger that subscribes to *everything* on both
//! brokers: the fast stream and a tail of the durable log. Durable cursors are contiguous per
//! partition (Kafka offsets; see [`Subscription::start`]), so the merger knows, per partition,
//! the next offset it must deliver:
//!
//! - a copy at an offset already delivered is a duplicate and is dropped;
//! - the next offset is delivered at once, whichever path brought it first (normally Redis);
//! - a fast copy *ahead* of the next offset means the fast path skipped something (lost in a
//!   Redis outage, or overtaken by a concurrent publisher): it is held, and the tail, which
//!   reads every offset in order, fills the gap; then the held messages follow in order.
//!
//! So every instance delivers every durable message exactly once, in log order per partition
//! (hence the same per-room order on every instance), with Redis latency when Redis is healthy
//! and the durable tail's latency when it is not. Subscribing to everything (not per room) is
//! the price of exact gap detection: an offset of another room is still an offset.
//!
//! Messages without a cursor (ephemeral, or published while degraded) are delivered at once and
//! deduplicated by id over a bounded window ([`DualConfig::dedupe_window`] ids, about 40 bytes
//! each).
//!
//! Local subscriptions (one per room from the Hub) are served from the merger's output by room.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::OnceCell;

use crate::broker::{
    Broker, Capabilities, Health, HistoryStream, Interest, Receipt, ReplayFrom, Subscription,
};
use crate::envelope::{Cursor, Envelope, MessageId, Room};
use crate::subscribers::Subscribers;
use crate::{Error, Result};

/// What `publish` does when the durable broker cannot take a durable message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DurableDownPolicy {
    /// Fail the publish with `Error::Unavailable`: the sender knows the message was not taken,
    /// and nothing is silently lost. The default.
    #[default]
    Reject,
    /// Publish on the fast broker only, without a cursor. Live members still get it, but it is
    /// not stored: it will not be replayed, and instances or clients that miss it live never
    /// get it. Opt in only where availability matters more than completeness.
    DegradeToFast,
}

/// Configuration of a [`DualBus`].
#[derive(Debug, Clone)]
pub struct DualConfig {
    /// See [`DurableDownPolicy`]. Default `Reject`.
    pub policy: DurableDownPolicy,
    /// Ids remembered to drop second copies of messages without a cursor. Default 65,536
    /// (about 2.5 MiB).
    pub dedupe_window: usize,
    /// Fast-path messages held while waiting for the tail to fill a gap; past it they are
    /// dropped (the tail brings them later). Default 100,000.
    pub max_held: usize,
    /// How long a gap may wait for the durable tail before the merger gives up on it, delivers
    /// what it holds and tells subscribers they lagged (they resync by replay). Default 30 s.
    pub gap_timeout: Duration,
    /// Buffer of each local subscription. Default 8,192.
    pub subscriber_capacity: usize,
}

impl Default for DualConfig {
    fn default() -> Self {
        Self {
            policy: DurableDownPolicy::Reject,
            dedupe_window: 65_536,
            max_held: 100_000,
            gap_timeout: Duration::from_secs(30),
            subscriber_capacity: 8192,
        }
    }
}

impl DualConfig {
    /// Sets [`policy`](Self::policy).
    #[must_use]
    pub fn with_policy(mut self, policy: DurableDownPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets [`gap_timeout`](Self::gap_timeout).
    #[must_use]
    pub fn with_gap_timeout(mut self, timeout: Duration) -> Self {
        self.gap_timeout = timeout;
        self
    }
}

/// Which paths a [`DualBus`] is using.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DualMode {
    /// Both brokers up: Redis latency, Kafka durability.
    Dual,
    /// The fast broker is down: everything flows through the durable tail.
    DurableOnly,
    /// The durable broker is down: live fan-out only, durable publishes rejected (or degraded).
    FastOnly,
    /// Both down.
    Down,
}

/// A snapshot of a [`DualBus`]'s counters ([`DualBus::stats`]). Totals since start, except the
/// gauge `held` and `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DualStats {
    /// Messages delivered from the fast path (first copy).
    pub via_fast: u64,
    /// Messages delivered from the durable tail (first copy).
    pub via_durable: u64,
    /// Second copies dropped.
    pub duplicates: u64,
    /// Messages the tail delivered while fast copies were held behind them: fast-path gaps
    /// filled from the log.
    pub gaps_filled: u64,
    /// Gaps given up after `gap_timeout`.
    pub gap_timeouts: u64,
    /// Fast-path messages held now (gauge).
    pub held: u64,
    /// Failed publishes on the fast broker (the message still travels by the tail).
    pub fast_publish_errors: u64,
    /// Failed publishes on the durable broker.
    pub durable_publish_errors: u64,
    /// Durable messages published fast-only under `DegradeToFast`.
    pub degraded_publishes: u64,
    /// The current mode, from what the merger and publishes last saw.
    pub mode: DualMode,
}

/// The live counters behind [`DualStats`], shared by the bus and its merger tasks.
#[derive(Debug, Default)]
struct Counters {
    via_fast: AtomicU64,
    via_durable: AtomicU64,
    duplicates: AtomicU64,
    gaps_filled: AtomicU64,
    gap_timeouts: AtomicU64,
    held: AtomicU64,
    fast_publish_errors: AtomicU64,
    durable_publish_errors: AtomicU64,
    degraded_publishes: AtomicU64,
    fast_down: AtomicBool,
    durable_down: AtomicBool,
}

impl Counters {
    fn snapshot(&self) -> DualStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DualStats {
            via_fast: get(&self.via_fast),
            via_durable: get(&self.via_durable),
            duplicates: get(&self.duplicates),
            gaps_filled: get(&self.gaps_filled),
            gap_timeouts: get(&self.gap_timeouts),
            held: get(&self.held),
            fast_publish_errors: get(&self.fast_publish_errors),
            durable_publish_errors: get(&self.durable_publish_errors),
            degraded_publishes: get(&self.degraded_publishes),
            mode: match (
                self.fast_down.load(Ordering::Relaxed),
                self.durable_down.load(Ordering::Relaxed),
            ) {
                (false, false) => DualMode::Dual,
                (true, false) => DualMode::DurableOnly,
                (false, true) => DualMode::FastOnly,
                (true, true) => DualMode::Down,
            },
        }
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Redis for speed, Kafka for durability: see the [module docs](self).
///
/// ```
/// use std::sync::Arc;
/// use chatbus_core::{Broker, DualBus, DualConfig, Envelope, Interest, MemoryBroker, MemoryConfig, Room};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> chatbus_core::Result<()> {
/// // In production: DualBus::new(redis_broker, kafka_broker, DualConfig::default()).
/// let fast = MemoryBroker::with_config(MemoryConfig::default().with_history_len(0));
/// let durable = MemoryBroker::new();
/// let bus = DualBus::new(fast, durable, DualConfig::default());
/// let room = Room::new("general")?;
/// let mut sub = bus.subscribe(Interest::room(room.clone())).await?;
/// let receipt = bus.publish(&Envelope::new(room, "hi")).await?;
/// let got = sub.recv().await.expect("open")?;
/// assert_eq!(got.cursor, receipt.cursor);
/// # Ok(()) }
/// ```
pub struct DualBus<F, D> {
    fast: Arc<F>,
    durable: Arc<D>,
    config: DualConfig,
    subscribers: Subscribers,
    stats: Arc<Counters>,
    merger: OnceCell<tokio::task::AbortHandle>,
    // Set when a fast publish failed, cleared when one succeeds.
    fast_failed: Arc<AtomicBool>,
    background: Arc<tokio::sync::Semaphore>,
}

/// Fast-path copies sent in the background at once while the fast broker is failing.
const FAST_IN_BACKGROUND: usize = 4096;

impl<F: fmt::Debug, D: fmt::Debug> fmt::Debug for DualBus<F, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DualBus")
            .field("fast", &self.fast)
            .field("durable", &self.durable)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<F, D> Drop for DualBus<F, D> {
    fn drop(&mut self) {
        if let Some(m) = self.merger.get() {
            m.abort();
        }
    }
}

impl<F: Broker, D: Broker> DualBus<F, D> {
    /// Composes `fast` (live fan-out) and `durable` (the record).
    pub fn new(fast: F, durable: D, config: DualConfig) -> Self {
        Self {
            fast: Arc::new(fast),
            durable: Arc::new(durable),
            subscribers: Subscribers::new(config.subscriber_capacity),
            config,
            stats: Arc::new(Counters::default()),
            merger: OnceCell::new(),
            fast_failed: Arc::new(AtomicBool::new(false)),
            background: Arc::new(tokio::sync::Semaphore::new(FAST_IN_BACKGROUND)),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DualStats {
        self.stats.snapshot()
    }

    /// The fast broker.
    pub fn fast(&self) -> &F {
        &self.fast
    }

    /// The durable broker.
    pub fn durable(&self) -> &D {
        &self.durable
    }

    /// The fast broker must relay the durable cursors unchanged: one that keeps its own
    /// history (Redis with a Streams window, a memory broker with history) assigns its own
    /// cursors, which would silently break gap detection.
    fn check_fast(&self) -> Result<()> {
        if self.fast.capabilities().replay {
            return Err(Error::Config(format!(
                "DualBus needs a fast broker without history (it relays the durable cursors); \
                 the {} broker keeps its own (e.g. set the Redis history window to 0)",
                self.fast.name()
            )));
        }
        Ok(())
    }

    /// Publishes the cursor-carrying copy on the fast path. The message is already durable, so
    /// a failure only costs latency (the tail delivers it). While the fast path is failing, the
    /// copy is sent from a background task instead of awaited, so that senders are not slowed
    /// down by the fast broker's timeout during its outage; at most
    /// `FAST_IN_BACKGROUND` such copies are in flight, the rest are left to the tail.
    async fn publish_fast(&self, env: Envelope) {
        let failing = self.stats.fast_down.load(Ordering::Relaxed)
            || self.fast_failed.load(Ordering::Relaxed);
        if !failing {
            if let Err(e) = self.fast.publish(&env).await {
                inc(&self.stats.fast_publish_errors);
                self.fast_failed.store(true, Ordering::Relaxed);
                tracing::debug!(error = %e, "fast publish failed; delivery continues via the durable tail");
            }
            return;
        }
        let Ok(permit) = self.background.clone().try_acquire_owned() else {
            inc(&self.stats.fast_publish_errors);
            return;
        };
        let (fast, stats, failed) = (
            self.fast.clone(),
            self.stats.clone(),
            self.fast_failed.clone(),
        );
        tokio::spawn(async move {
            match fast.publish(&env).await {
                Ok(_) => failed.store(false, Ordering::Relaxed),
                Err(_) => inc(&stats.fast_publish_errors),
            }
            drop(permit);
        });
    }

    async fn ensure_merger(&self) -> Result<()> {
        self.check_fast()?;
        self.merger
            .get_or_try_init(|| async {
                let tail = self.durable.subscribe(Interest::All).await?;
                let fast = match self.fast.subscribe(Interest::All).await {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "fast broker subscribe failed; durable-only until it returns");
                        self.stats.fast_down.store(true, Ordering::Relaxed);
                        None
                    }
                };
                let merger = Merger::new(
                    self.config.clone(),
                    self.subscribers.clone(),
                    self.stats.clone(),
                    tail.start(),
                );
                let task = tokio::spawn(merger.run(
                    self.fast.clone(),
                    self.durable.clone(),
                    fast,
                    tail,
                ));
                Ok::<_, Error>(task.abort_handle())
            })
            .await
            .map(|_| ())
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<F: Broker, D: Broker> Broker for DualBus<F, D> {
    fn name(&self) -> &'static str {
        "dual"
    }

    /// Durable first, then fast with the cursor; the receipt follows the durable ack. See
    /// [`DurableDownPolicy`] for a durable outage. Ephemeral messages go to the fast broker only.
    async fn publish(&self, envelope: &Envelope) -> Result<Receipt> {
        self.check_fast()?;
        if !envelope.is_durable() {
            return self.fast.publish(envelope).await;
        }
        match self.durable.publish(envelope).await {
            Ok(receipt) => {
                self.stats.durable_down.store(false, Ordering::Relaxed);
                let mut env = envelope.clone();
                env.cursor = receipt.cursor;
                self.publish_fast(env).await;
                Ok(receipt)
            }
            Err(e) => {
                inc(&self.stats.durable_publish_errors);
                self.stats.durable_down.store(true, Ordering::Relaxed);
                match self.config.policy {
                    DurableDownPolicy::Reject => Err(Error::Unavailable {
                        backend: "dual",
                        reason: format!(
                            "the durable {} broker did not take the message, so it was rejected: {e}",
                            self.durable.name()
                        ),
                    }),
                    DurableDownPolicy::DegradeToFast => {
                        let mut env = envelope.clone();
                        env.cursor = None;
                        let receipt = self.fast.publish(&env).await?;
                        inc(&self.stats.degraded_publishes);
                        Ok(Receipt {
                            id: receipt.id,
                            cursor: None,
                        })
                    }
                }
            }
        }
    }

    /// A live stream from the merger: exactly once and in log order per partition for durable
    /// messages (see the module docs). Slow subscribers lag like on any broker. The first call
    /// starts the merger and fails if the durable broker cannot be subscribed to.
    async fn subscribe(&self, interest: Interest) -> Result<Subscription> {
        self.ensure_merger().await?;
        Ok(self.subscribers.subscribe(interest))
    }

    /// From the durable broker.
    async fn replay(&self, room: &Room, from: ReplayFrom, limit: usize) -> Result<HistoryStream> {
        self.durable.replay(room, from, limit).await
    }

    /// From the durable broker.
    async fn history(
        &self,
        room: &Room,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<Envelope>> {
        self.durable.history(room, before, limit).await
    }

    fn capabilities(&self) -> Capabilities {
        let d = self.durable.capabilities();
        Capabilities {
            durable: d.durable,
            replay: d.replay,
            room_order: true,
            interest_filtering: false,
        }
    }

    /// Both up: healthy. Fast down: degraded (durable-only, still serving). Durable down:
    /// down under `Reject` (durable publishes fail), degraded under `DegradeToFast`.
    async fn health(&self) -> Health {
        let (f, d) = tokio::join!(self.fast.health(), self.durable.health());
        self.stats.fast_down.store(!f.is_up(), Ordering::Relaxed);
        self.stats.durable_down.store(!d.is_up(), Ordering::Relaxed);
        match (f, d) {
            (Health::Healthy, Health::Healthy) => Health::Healthy,
            (f, Health::Healthy | Health::Degraded(_)) if !f.is_up() => Health::Degraded(format!(
                "fast broker down, delivering through the durable log only: {f:?}"
            )),
            (_, d) if !d.is_up() => match self.config.policy {
                DurableDownPolicy::Reject => {
                    Health::Down(format!("durable broker down, publishes rejected: {d:?}"))
                }
                DurableDownPolicy::DegradeToFast => {
                    Health::Degraded(format!("durable broker down, publishing fast-only: {d:?}"))
                }
            },
            (f, d) => Health::Degraded(format!("fast: {f:?}, durable: {d:?}")),
        }
    }
}

/// Which path a copy came by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Fast,
    Durable,
}

/// A bounded set of recently seen message ids: the dedupe window of [`DualBus`] for messages
/// without a cursor. Remembers the last `cap` ids (a hash set plus a ring for eviction, about
/// 40 bytes per id).
#[derive(Debug)]
pub struct DedupeWindow {
    set: HashSet<MessageId>,
    order: VecDeque<MessageId>,
    cap: usize,
}

impl DedupeWindow {
    /// A window of `cap` ids (at least 1).
    pub fn new(cap: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Whether `id` is in the window.
    pub fn contains(&self, id: &MessageId) -> bool {
        self.set.contains(id)
    }

    /// Records `id`; returns false if it was already in the window (a duplicate).
    pub fn insert(&mut self, id: MessageId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

struct Merger {
    config: DualConfig,
    out: Subscribers,
    stats: Arc<Counters>,
    // Per partition: the next offset to deliver. Absent until the tail's start is known.
    next: HashMap<u32, u64>,
    // Per partition: fast copies ahead of `next`, with when they arrived.
    held: HashMap<u32, BTreeMap<u64, (Instant, Envelope)>>,
    held_total: usize,
    // Whether the durable broker has contiguous offsets; without them, dedupe by id only.
    contiguous: bool,
    ids: DedupeWindow,
    // A durable message came without a cursor (DegradeToFast): from then on, cursor-carrying
    // copies are also checked against `ids`.
    degraded_seen: bool,
}

impl Merger {
    fn new(
        config: DualConfig,
        out: Subscribers,
        stats: Arc<Counters>,
        start: Option<&[Cursor]>,
    ) -> Self {
        let ids = DedupeWindow::new(config.dedupe_window);
        let mut m = Self {
            config,
            out,
            stats,
            next: HashMap::new(),
            held: HashMap::new(),
            held_total: 0,
            contiguous: start.is_some(),
            ids,
            degraded_seen: false,
        };
        m.reset_start(start);
        m
    }

    fn reset_start(&mut self, start: Option<&[Cursor]>) {
        self.contiguous = start.is_some();
        self.next = start
            .unwrap_or_default()
            .iter()
            .map(|c| (c.partition, c.offset))
            .collect();
    }

    async fn run<F: Broker, D: Broker>(
        mut self,
        fast_broker: Arc<F>,
        durable_broker: Arc<D>,
        mut fast: Option<Subscription>,
        mut tail: Subscription,
    ) {
        let mut fast_batch = Vec::with_capacity(256);
        let mut tail_batch = Vec::with_capacity(256);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Fast first when both are ready: it is the primary path, and a caller's ephemeral
                // and durable messages then keep their order whenever Redis is healthy.
                biased;
                n = recv_opt(&mut fast, &mut fast_batch) => {
                    if n == 0 {
                        tracing::warn!("fast subscription ended; durable-only until it returns");
                        self.stats.fast_down.store(true, Ordering::Relaxed);
                        fast = None;
                        continue;
                    }
                    for item in fast_batch.drain(..) {
                        match item {
                            Ok(env) => {
                                self.stats.fast_down.store(false, Ordering::Relaxed);
                                self.accept(env, Path::Fast);
                            }
                            // Lagged after a reconnect: the fast path is back; whatever it lost,
                            // the tail brings.
                            Err(Error::Lagged { .. }) => {
                                self.stats.fast_down.store(false, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "fast path error; the durable tail covers it");
                                self.stats.fast_down.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                }
                n = tail.recv_many(&mut tail_batch, 256) => {
                    if n == 0 {
                        // The durable broker ended the tail: start a new one. What was published
                        // in between is only in the log now, so subscribers resync by replay.
                        tracing::warn!("durable tail ended; resubscribing");
                        self.stats.durable_down.store(true, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if let Ok(t) = durable_broker.subscribe(Interest::All).await {
                            self.out.broadcast_error(|| Error::Lagged { missed: 0 });
                            self.reset_start(t.start());
                            self.release_all_held();
                            tail = t;
                        }
                        continue;
                    }
                    for item in tail_batch.drain(..) {
                        match item {
                            Ok(env) => {
                                self.stats.durable_down.store(false, Ordering::Relaxed);
                                self.accept(env, Path::Durable);
                            }
                            Err(Error::Lagged { missed }) => {
                                // The merger itself fell behind the tail: those messages are only
                                // in the log now.
                                self.out.broadcast_error(|| Error::Lagged { missed });
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "durable tail error");
                                self.stats.durable_down.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                }
                _ = tick.tick() => {
                    self.expire_gaps();
                    if fast.is_none() {
                        if let Ok(s) = fast_broker.subscribe(Interest::All).await {
                            tracing::info!("fast subscription restored");
                            fast = Some(s);
                        }
                    }
                }
            }
        }
    }

    fn deliver(&mut self, env: &Envelope, path: Path) {
        inc(match path {
            Path::Fast => &self.stats.via_fast,
            Path::Durable => &self.stats.via_durable,
        });
        self.out.dispatch(env);
    }

    fn accept(&mut self, env: Envelope, path: Path) {
        let Some(c) = env.cursor.filter(|_| self.contiguous) else {
            if env.is_durable() {
                self.degraded_seen = true;
            }
            if self.ids.insert(env.id) {
                self.deliver(&env, path);
            } else {
                inc(&self.stats.duplicates);
            }
            return;
        };
        let next = *self.next.entry(c.partition).or_insert(c.offset);
        if c.offset < next {
            inc(&self.stats.duplicates);
            return;
        }
        if self.degraded_seen && self.ids.contains(&env.id) {
            // Delivered earlier without a cursor (published fast-only while the durable broker
            // seemed down, yet it had stored the message): account for the offset only.
            inc(&self.stats.duplicates);
            self.advance(c.partition, c.offset + 1);
            return;
        }
        if c.offset > next && path == Path::Fast {
            // The fast path skipped something: wait for the tail to bring it.
            if self.held_total < self.config.max_held {
                let held = self.held.entry(c.partition).or_default();
                if held.insert(c.offset, (Instant::now(), env)).is_none() {
                    self.held_total += 1;
                    self.stats
                        .held
                        .store(self.held_total as u64, Ordering::Relaxed);
                }
            }
            return;
        }
        // The next offset, or a tail message past it (the log has no records in between).
        if path == Path::Durable && self.held.get(&c.partition).is_some_and(|h| !h.is_empty()) {
            inc(&self.stats.gaps_filled);
        }
        self.deliver(&env, path);
        self.advance(c.partition, c.offset + 1);
    }

    /// Sets the next offset of `partition` and delivers the held copies that now follow on.
    fn advance(&mut self, partition: u32, mut next: u64) {
        if let Some(held) = self.held.get_mut(&partition) {
            let mut ready = Vec::new();
            // Copies below `next` were delivered by the other path.
            let keep = held.split_off(&next);
            let stale = std::mem::replace(held, keep).len();
            while let Some((_, env)) = held.remove(&next) {
                ready.push(env);
                next += 1;
            }
            self.held_total -= stale + ready.len();
            self.stats
                .duplicates
                .fetch_add(stale as u64, Ordering::Relaxed);
            self.stats
                .held
                .store(self.held_total as u64, Ordering::Relaxed);
            self.next.insert(partition, next);
            for env in ready {
                self.deliver(&env, Path::Fast);
            }
        } else {
            self.next.insert(partition, next);
        }
    }

    /// Gaps older than `gap_timeout`: deliver what is held and let subscribers resync.
    fn expire_gaps(&mut self) {
        let timeout = self.config.gap_timeout;
        let expired: Vec<(u32, u64)> = self
            .held
            .iter()
            .filter_map(|(p, h)| {
                let (&first, (since, _)) = h.first_key_value()?;
                (since.elapsed() >= timeout).then_some((*p, first))
            })
            .collect();
        for (partition, first) in expired {
            let missed = first.saturating_sub(self.next.get(&partition).copied().unwrap_or(first));
            tracing::warn!(
                partition,
                missed,
                "gap not filled by the durable tail in time; skipping it"
            );
            inc(&self.stats.gap_timeouts);
            // Lagged first: subscribers resync from the cursor they had *before* the held
            // messages, so the skipped ones come from the log when it has them.
            self.out.broadcast_error(|| Error::Lagged { missed });
            self.advance(partition, first);
        }
    }

    fn release_all_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        self.held_total = 0;
        self.stats.held.store(0, Ordering::Relaxed);
        for (_, h) in held {
            for (_, (_, env)) in h {
                self.deliver(&env, Path::Fast);
            }
        }
    }
}

async fn recv_opt(sub: &mut Option<Subscription>, out: &mut Vec<Result<Envelope>>) -> usize {
    match sub {
        Some(s) => s.recv_many(out, 256).await,
        None => std::future::pending().await,
    }
}
