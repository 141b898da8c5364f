//! The DualBus: a fast broker for live fan-out composed with a durable broker for the record.
//! See [`DualBus`] for how it works.

mod config;
mod dedupe;
mod merge;
// The receiving half of the interest-based DualBus (docs/ARCHITECTURE.md), tested on its own
// until the merger that uses it lands.
#[cfg_attr(not(test), allow(dead_code))]
mod sequence;
mod stats;

pub use config::{DualConfig, DurableDownPolicy};
pub use dedupe::DedupeWindow;
pub use stats::{DualMode, DualStats};

use merge::Merger;
use stats::{inc, Counters};

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::OnceCell;

use crate::broker::{
    Broker, Capabilities, Health, HistoryStream, Interest, Receipt, ReplayFrom, Subscription,
};
use crate::envelope::{Cursor, Envelope, Room};
use crate::subscribers::Subscribers;
use crate::{Error, Result};

/// Redis for speed, Kafka for durability.
///
/// # How it works
///
/// **Publish.** A durable message is written to the durable broker first (Kafka: idempotent,
/// `acks=all`). Once acknowledged its cursor is known; the same envelope, now carrying that
/// cursor, is published on the fast broker (Redis). The sender's receipt comes after the durable
/// ack, so an acknowledged message is never lost. If the fast publish fails, the message still
/// reaches every instance through the durable tail. If the durable publish fails, the
/// [`DurableDownPolicy`] decides: reject (default) or degrade to fast-only. Ephemeral messages
/// (typing, presence) go to the fast broker only.
///
/// **Subscribe.** Each `DualBus` runs one merger that subscribes to *everything* on both
/// brokers: the fast stream and a tail of the durable log. Durable cursors are contiguous per
/// partition (Kafka offsets; see [`Subscription::start`]), so the merger knows, per partition,
/// the next offset it must deliver:
///
/// - a copy at an offset already delivered is a duplicate and is dropped;
/// - the next offset is delivered at once, whichever path brought it first (normally Redis);
/// - a fast copy *ahead* of the next offset means the fast path skipped something (lost in a
///   Redis outage, or overtaken by a concurrent publisher): it is held, and the tail, which
///   reads every offset in order, fills the gap; then the held messages follow in order.
///
/// So every instance delivers every durable message exactly once, in log order per partition
/// (hence the same per-room order on every instance), with Redis latency when Redis is healthy
/// and the durable tail's latency when it is not. Subscribing to everything (not per room) is
/// the price of exact gap detection: an offset of another room is still an offset.
///
/// Messages without a cursor (ephemeral, or published while degraded) are delivered at once and
/// deduplicated by id over a bounded window ([`DualConfig::dedupe_window`] ids, about 40 bytes
/// each).
///
/// Local subscriptions (one per room from the Hub) are served from the merger's output by room.
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
    ) -> Result<crate::HistoryPage> {
        self.durable.history(room, before, limit).await
    }

    fn log_partition(&self, room: &Room) -> Option<u32> {
        self.durable.log_partition(room)
    }

    /// The durable broker's: the log is the record, the fast path has none.
    fn as_log(&self) -> Option<&dyn crate::store::Log> {
        self.durable.as_log()
    }

    /// None: a DualBus takes tickets from its fast broker, it does not hand them out.
    fn tickets(&self) -> Option<&dyn crate::Tickets> {
        None
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
