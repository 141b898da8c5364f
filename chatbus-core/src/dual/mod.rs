//! The DualBus: a fast broker for live fan-out composed with a durable broker for the record.
//! See [`DualBus`] for how it works.

mod config;
mod dedupe;
mod interest;
mod lease;
mod merge;
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
/// **Interest-based (opt-in, [`DualConfig::interest`]).** Instead of everything, the bus
/// subscribes on the fast broker to the rooms it has local subscribers for, and nothing on the
/// durable one. A publish takes a room ticket from the fast broker ([`Broker::tickets`])
/// before its durable write and closes it after the ack, which gives the *horizon* the fast
/// copy carries; a receiver delivers a message in log order once every ticket up to its
/// horizon is accounted for, and reads the room's log for a copy that does not come. Every
/// instance holds a lease in the fast broker: one that cannot get tickets publishes without
/// them once its lease has certainly lapsed (for at most 20 s), and a receiver that sees a
/// lapsed lease, or cannot check, reads its rooms from the durable log's tail meanwhile
/// (its subscribers get `Lagged` at each switch and resync from their cursors). See
/// docs/ARCHITECTURE.md, "Interest-based DualBus".
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
    // With `DualConfig::interest`: the rooms followed, and the merger's commands until it starts.
    interest: Option<Arc<interest::Shared>>,
    interest_cmds: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<interest::Cmd>>>,
    // With `DualConfig::interest`: this instance's lease, renewed by its own task.
    lease: Option<Arc<lease::Holder>>,
    lease_task: std::sync::OnceLock<tokio::task::AbortHandle>,
}

/// How long a durable send waits for this instance's lease to lapse when it cannot get a room
/// ticket: longer than a lease can outlive the last renewal (about 2 s).
const LAPSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

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
        if let Some(l) = self.lease_task.get() {
            l.abort();
        }
    }
}

impl<F: Broker, D: Broker> DualBus<F, D> {
    /// Composes `fast` (live fan-out) and `durable` (the record).
    pub fn new(fast: F, durable: D, config: DualConfig) -> Self {
        let (subscribers, interest, interest_cmds) = if config.interest {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let vacated = tx.clone();
            let subscribers = Subscribers::with_on_vacated(config.subscriber_capacity, move |v| {
                for room in v.rooms {
                    let _ = vacated.send(interest::Cmd::Vacated(room));
                }
            });
            let shared = Arc::new(interest::Shared {
                cmds: tx,
                followed: std::sync::Mutex::new(std::collections::HashMap::new()),
            });
            (subscribers, Some(shared), Some(rx))
        } else {
            (Subscribers::new(config.subscriber_capacity), None, None)
        };
        let lease = config.interest.then(|| Arc::new(lease::Holder::new()));
        Self {
            fast: Arc::new(fast),
            durable: Arc::new(durable),
            subscribers,
            interest,
            interest_cmds: std::sync::Mutex::new(interest_cmds),
            lease,
            lease_task: std::sync::OnceLock::new(),
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
        if self.interest.is_some() {
            return self.ensure_interest_merger().await;
        }
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

impl<F: Broker, D: Broker> DualBus<F, D> {
    fn tickets(&self) -> Result<&dyn crate::Tickets> {
        self.fast.tickets().ok_or_else(|| {
            Error::Config(format!(
                "the interest-based DualBus needs a fast broker with ticket counters; the {} \
                 broker has none",
                self.fast.name()
            ))
        })
    }

    /// Starts renewing this instance's lease (once), and returns it.
    fn start_lease(&self) -> Option<&lease::Holder> {
        let holder = self.lease.as_ref()?;
        self.lease_task.get_or_init(|| {
            let (fast, holder) = (self.fast.clone(), holder.clone());
            tokio::spawn(async move {
                if let Some(tickets) = fast.tickets() {
                    holder.run(tickets).await;
                }
            })
            .abort_handle()
        });
        Some(holder)
    }

    async fn ensure_interest_merger(&self) -> Result<()> {
        self.tickets()?;
        self.start_lease();
        let (Some(shared), Some(cmds)) = (
            self.interest.as_ref(),
            self.interest_cmds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        ) else {
            return Ok(());
        };
        let mut merger = interest::InterestMerger::new(
            self.config.clone(),
            self.subscribers.clone(),
            self.stats.clone(),
            shared.clone(),
            self.fast.clone(),
            self.durable.clone(),
        );
        // One lease scan before the first room is followed, so that a healthy start does not
        // begin in tail mode.
        merger.scan_now().await;
        let task = tokio::spawn(merger.run(cmds));
        let _ = self.merger.set(task.abort_handle());
        Ok(())
    }

    /// Makes the interest-based merger follow `room` (once per room): its fast subscription
    /// is live and its baseline read before this returns, so every later publish reaches it.
    ///
    /// Without the fast broker the room is followed through the log (the merger's tail mode)
    /// until it is back: a join does not fail for it.
    async fn follow(&self, shared: &interest::Shared, room: &Room) -> Result<()> {
        let cell = shared.followed().entry(room.clone()).or_default().clone();
        cell.get_or_try_init(|| async {
            let fast = async {
                let sub = self.fast.subscribe(Interest::room(room.clone())).await?;
                let baseline = self.tickets()?.ticket_baseline(room).await?;
                Ok::<_, Error>((sub, baseline))
            };
            let (sub, baseline) = match fast.await {
                Ok((sub, baseline)) => (Some(sub), Some(baseline)),
                Err(e) => {
                    tracing::debug!(error = %e, room = %room, "following a room through the log until the fast broker is back");
                    (None, None)
                }
            };
            shared
                .cmds
                .send(interest::Cmd::Follow {
                    room: room.clone(),
                    sub,
                    baseline,
                })
                .map_err(|_| Error::Unavailable {
                    backend: "dual",
                    reason: "the merger stopped".to_owned(),
                })
        })
        .await
        .map(|_| ())
    }

    /// Publishes a durable message of the interest-based DualBus: with a room ticket if the fast
    /// broker hands one out; without one once this instance's lease has certainly lapsed (see
    /// `lease.rs`), so that receivers read the log instead of trusting tickets.
    async fn publish_ticketed(&self, envelope: &Envelope) -> Result<Receipt> {
        let tickets = self.tickets()?;
        let Some(holder) = self.start_lease() else {
            return Err(Error::Config("no lease outside interest mode".to_owned()));
        };
        let give_up_at = tokio::time::Instant::now() + LAPSE_WAIT;
        let mut last_error = None;
        // A retry follows a renewal of the lease, which comes at most every few hundred ms.
        for _ in 0..8 {
            // After a fast-broker failure, sends wait for the lease instead of for another
            // command timeout each; the lease's next renewal says when it works again.
            if !holder.lapsed() && !self.fast_failed.load(Ordering::Relaxed) {
                match tickets.take_ticket(&envelope.room).await {
                    Ok(ticket) => return self.publish_with_ticket(tickets, envelope, ticket).await,
                    Err(e) => {
                        self.fast_failed.store(true, Ordering::Relaxed);
                        // The lease may still renew (a cluster shard of this room failing
                        // over, say): let it lapse, or the send would wait in vain.
                        holder.suspend();
                        last_error = Some(e);
                    }
                }
            }
            match holder.ticketless(give_up_at).await {
                lease::Ticketless::Go(gate) => {
                    let mut env = envelope.clone();
                    env.stamp = None;
                    let written = self.durable.publish(&env).await;
                    drop(gate);
                    return match written {
                        Ok(receipt) => {
                            self.stats.durable_down.store(false, Ordering::Relaxed);
                            inc(&self.stats.ticketless_publishes);
                            Ok(receipt)
                        }
                        Err(e) => self.durable_failed(envelope, e).await,
                    };
                }
                lease::Ticketless::Retry => self.fast_failed.store(false, Ordering::Relaxed),
                lease::Ticketless::Refused(why) => {
                    return Err(Error::Unavailable {
                        backend: "dual",
                        reason: match last_error {
                            Some(e) => format!("{why} (the ticket: {e})"),
                            None => why,
                        },
                    })
                }
            }
        }
        Err(Error::Unavailable {
            backend: "dual",
            reason: "the fast broker kept refusing room tickets while this instance's lease \
                     kept being renewed"
                .to_owned(),
        })
    }

    /// The ticket before the durable write, its close (the horizon) after the ack, then the
    /// fast copy carrying both. A durable failure closes the ticket and announces it on the
    /// fast path (a stamped ephemeral notice), so receivers do not wait for it.
    async fn publish_with_ticket(
        &self,
        tickets: &dyn crate::Tickets,
        envelope: &Envelope,
        ticket: crate::Ticket,
    ) -> Result<Receipt> {
        let mut env = envelope.clone();
        env.stamp = Some(crate::Stamp { ticket, horizon: 0 });
        let written = self.durable.publish(&env).await;
        // Closing fails only with the fast broker; receivers then find the message in the log
        // by a repair read (or give the ticket up after the gap timeout, if it was not written).
        let horizon = match tickets.close_ticket(&env.room, ticket).await {
            Ok(now) if now.epoch == ticket.epoch => Some(now.n),
            // The counter was recreated since: receivers of the new one take a new baseline.
            Ok(_) => Some(ticket.n),
            Err(e) => {
                inc(&self.stats.fast_publish_errors);
                self.fast_failed.store(true, Ordering::Relaxed);
                tracing::debug!(error = %e, "closing a room ticket failed");
                None
            }
        };
        match written {
            Ok(receipt) => {
                self.stats.durable_down.store(false, Ordering::Relaxed);
                if let Some(horizon) = horizon {
                    env.cursor = receipt.cursor;
                    env.stamp = Some(crate::Stamp { ticket, horizon });
                    self.publish_fast(env).await;
                }
                Ok(receipt)
            }
            Err(e) => {
                if let Some(horizon) = horizon {
                    let mut notice = Envelope::ephemeral(env.room.clone(), bytes::Bytes::new());
                    notice.stamp = Some(crate::Stamp { ticket, horizon });
                    self.publish_fast(notice).await;
                }
                self.durable_failed(envelope, e).await
            }
        }
    }

    /// A durable publish failed: the [`DurableDownPolicy`] decides.
    async fn durable_failed(&self, envelope: &Envelope, e: Error) -> Result<Receipt> {
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
                env.stamp = None;
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
        if self.interest.is_some() {
            return self.publish_ticketed(envelope).await;
        }
        match self.durable.publish(envelope).await {
            Ok(receipt) => {
                self.stats.durable_down.store(false, Ordering::Relaxed);
                let mut env = envelope.clone();
                env.cursor = receipt.cursor;
                self.publish_fast(env).await;
                Ok(receipt)
            }
            Err(e) => self.durable_failed(envelope, e).await,
        }
    }

    /// A live stream from the merger: exactly once and in log order per partition for durable
    /// messages (see the module docs). Slow subscribers lag like on any broker. The first call
    /// starts the merger and fails if the durable broker cannot be subscribed to.
    async fn subscribe(&self, interest: Interest) -> Result<Subscription> {
        self.ensure_merger().await?;
        let Some(shared) = self.interest.as_ref() else {
            return Ok(self.subscribers.subscribe(interest));
        };
        let Interest::Rooms(rooms) = &interest else {
            return Err(Error::Config(
                "the interest-based DualBus serves room subscriptions only, not Interest::All"
                    .to_owned(),
            ));
        };
        let rooms = rooms.clone();
        // Registered first, so that the merger never leaves a room this subscriber is in
        // (it checks for local subscribers under the lock `follow` takes).
        let sub = self.subscribers.subscribe(interest);
        for room in &rooms {
            self.follow(shared, room).await?;
        }
        Ok(sub)
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
            interest_filtering: self.interest.is_some(),
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
