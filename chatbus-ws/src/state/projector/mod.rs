//! [`Projector`]: feeds a [`Store`] from the broker's durable log, partition by partition,
//! exactly once.
//!
//! # How it works
//!
//! One task per partition of the log ([`Broker::as_log`]). It claims the partition
//! ([`Store::claim`]; while another process holds it, it asks again every
//! [`ProjectorConfig::claim_retry`]), then, while the claim holds, repeats: read up to
//! [`ProjectorConfig::batch`] records after the partition's position in the store
//! ([`Store::position`]), turn them into store events ([`event`](super::event)), and apply
//! them with the position of the last record read in **one** call, [`Store::apply`], which
//! commits the events and the position atomically.
//!
//! # Exactly once
//!
//! The position is committed with the state it describes, so the two cannot disagree: after
//! a crash (or a stop, or an error) at any point, the store holds either the batch and its
//! position or neither, and the next projector resumes strictly after what is in the store.
//! A crash between reading and applying only reads the batch again. Should a batch be applied
//! twice anyway (the answer of a committed apply lost, two projectors during a claim
//! handover), `apply` is idempotent by event id, so the second time changes nothing. Every
//! record of the log is thus reflected in the store once, whatever fails when.
//!
//! The position lives in the store, not in Kafka's consumer-group offsets, because a Kafka
//! offset commit cannot be part of a PostgreSQL transaction: committed first, a crash before
//! the apply loses the batch; committed after, a crash in between replays it with nothing
//! to say which events were applied. Only a position in the same transaction as the state
//! makes the two move together (and lets any store, not just Kafka's, resume).
//!
//! Records that are not chat state (a control payload, a copy in a personal channel, one
//! that does not decode) still move the position: [`LogBatch::next`] covers them.
//!
//! # How far behind
//!
//! Keeping up, the store trails the log by at most one [`ProjectorConfig::poll`] interval
//! (the wait after finding nothing new) plus the time to read and apply one batch: with the
//! defaults and a local PostgreSQL, tens of milliseconds. [`ProjectorStats::last_lag_ms`]
//! measures it (now minus the timestamp of the last record applied). While the store (or the
//! log) is down the lag grows without bound; nothing is lost, since the records stay in the
//! log, and once it is back the projector catches up at the batch rate, a batch per
//! read-and-apply round trip with no wait in between. The price of a short `poll`: idle,
//! each partition asks the log for news once per interval (on Kafka, a watermark request
//! with one of the replay readers, which projectors share with replay and history).
//!
//! Meanwhile clients see live messages as always (live delivery goes through the broker's
//! subscriptions, not the store), but state read from the store lags: a history page or a
//! conversation list may miss the newest messages and edits, and unread counts may be low,
//! for as long as the projection is behind.
//!
//! A log that started over (a Kafka topic recreated: [`Error::CursorReset`] for the stored
//! position) is read again from its oldest record; the store keeps what it had from the old
//! log, since event ids of the two never collide.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatbus_core::backend::now_ms;
use chatbus_core::store::{ChatEvent, Claim, LogBatch, Store};
use chatbus_core::{Broker, Cursor, Error, Result};
use tokio_util::sync::{CancellationToken, DropGuard};

/// The shortest wait the projector ever does, whatever the configuration says: a zero
/// `poll` or `retry` would turn an idle or failing partition into a busy loop.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// Settings of a [`Projector`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProjectorConfig {
    /// Most records read and applied in one step (one store transaction). Default 5,000.
    ///
    /// Large because a read of the log costs more than its records: each read assigns a
    /// reader and fetches from the position on, and Tansu's fetch costs grow with the records
    /// after the position, so a projector catching up reads at about 760 records/s in reads
    /// of 500 and 7,200/s in reads of 5,000 (100,000 records, one partition, measured). A
    /// batch of 5,000 small events is one PostgreSQL transaction of a few hundred ms.
    pub batch: usize,
    /// How long a partition waits after finding nothing new. Default 50 ms: the bound on the
    /// lag when keeping up.
    pub poll: Duration,
    /// How long a partition waits after an error of the store or the log. Default 500 ms.
    pub retry: Duration,
    /// How often a partition held elsewhere is claimed again. Default 1 s.
    pub claim_retry: Duration,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch: 5_000,
            poll: Duration::from_millis(50),
            retry: Duration::from_millis(500),
            claim_retry: Duration::from_secs(1),
        }
    }
}

impl ProjectorConfig {
    /// Sets [`batch`](Self::batch) (at least 1).
    #[must_use]
    pub fn with_batch(mut self, records: usize) -> Self {
        self.batch = records.max(1);
        self
    }

    /// Sets [`poll`](Self::poll).
    #[must_use]
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Sets [`retry`](Self::retry).
    #[must_use]
    pub fn with_retry(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    /// Sets [`claim_retry`](Self::claim_retry).
    #[must_use]
    pub fn with_claim_retry(mut self, claim_retry: Duration) -> Self {
        self.claim_retry = claim_retry;
        self
    }

    /// The settings as the tasks use them: the fields are public, so the bounds the setters
    /// keep are enforced again here.
    fn normalized(mut self) -> Self {
        self.batch = self.batch.max(1);
        self.poll = self.poll.max(MIN_WAIT);
        self.retry = self.retry.max(MIN_WAIT);
        self.claim_retry = self.claim_retry.max(MIN_WAIT);
        self
    }
}

/// Counters of a [`Projector`], summed over its partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectorStats {
    /// Durable records applied (chat state or not).
    pub records: u64,
    /// Store events applied (the records that are chat state).
    pub events: u64,
    /// Batches applied.
    pub batches: u64,
    /// Errors of the store or the log (each followed by a wait of `retry`).
    pub errors: u64,
    /// Times a partition's stored position did not fit the log (the log started over) and
    /// the partition was read again from its oldest record.
    pub resets: u64,
    /// Events the store refused for good (its data, not its state: `Error::Backend`) while
    /// it applied the other events of their batch, skipped so the projection goes on; each
    /// is logged as an error with its id and room.
    pub skipped: u64,
    /// Partitions this projector holds the claim of now.
    pub partitions_held: u32,
    /// How far behind the log the last applied batch was, in milliseconds: the time it was
    /// applied minus the timestamp of its last record (0 before any).
    pub last_lag_ms: u64,
}

#[derive(Debug, Default)]
struct Counters {
    records: AtomicU64,
    events: AtomicU64,
    batches: AtomicU64,
    errors: AtomicU64,
    resets: AtomicU64,
    skipped: AtomicU64,
    held: AtomicU32,
    last_lag_ms: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ProjectorStats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProjectorStats {
            records: load(&self.records),
            events: load(&self.events),
            batches: load(&self.batches),
            errors: load(&self.errors),
            resets: load(&self.resets),
            skipped: load(&self.skipped),
            partitions_held: self.held.load(Ordering::Relaxed),
            last_lag_ms: load(&self.last_lag_ms),
        }
    }
}

/// Counts a held claim for as long as it lives, however the task ends (a stop drops the
/// task's future wherever it is waiting).
struct HeldCount(Arc<Counters>);

impl HeldCount {
    fn new(counters: &Arc<Counters>) -> Self {
        counters.held.fetch_add(1, Ordering::Relaxed);
        Self(counters.clone())
    }
}

impl Drop for HeldCount {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Projects the broker's durable log into a [`Store`], exactly once.
///
/// One task per partition of the log claims it ([`Store::claim`]) and, while the claim
/// holds, reads up to [`ProjectorConfig::batch`] records after the partition's stored
/// [position](Store::position) and applies their events together with the position of the
/// last record read in one atomic [`Store::apply`]. State and position are committed
/// together, so after a crash or stop anywhere the next projector resumes after exactly what
/// the store has, and `apply`'s idempotence makes a batch applied twice change nothing. (The
/// position is not a Kafka consumer-group offset: that commit could not be atomic with a
/// PostgreSQL transaction.)
///
/// How far behind: keeping up, one [`ProjectorConfig::poll`] interval plus one batch's read
/// and apply ([`ProjectorStats::last_lag_ms`] measures it); while the store or the log is
/// down, without bound, catching up afterwards at the batch rate. Meanwhile live delivery is
/// unaffected, but state read from the store (history pages, unread counts, conversations)
/// may miss the newest messages. A log that started over ([`Error::CursorReset`]) is read
/// again from its oldest record.
///
/// Its tasks run until it is dropped; dropping it stops them at their next wait (a batch
/// being applied is then either committed or not, never half) and releases their claims.
pub struct Projector {
    counters: Arc<Counters>,
    partitions: u32,
    _stop: DropGuard,
}

impl fmt::Debug for Projector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Projector")
            .field("partitions", &self.partitions)
            .field("stats", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl Projector {
    /// Starts one task per partition of `broker`'s log, projecting it into `store`.
    ///
    /// Errors with `Error::Unsupported` when the broker has no log to read by partition
    /// ([`Broker::as_log`] is `None`: the memory and Redis brokers), and `Error::Config`
    /// outside a tokio runtime.
    pub fn spawn(
        broker: Arc<dyn Broker>,
        store: Arc<dyn Store>,
        config: ProjectorConfig,
    ) -> Result<Projector> {
        let Some(log) = broker.as_log() else {
            return Err(Error::Unsupported {
                backend: broker.name(),
                what: "reading the log by partition (Broker::as_log), which the projector needs",
            });
        };
        let partitions = log.partitions();
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Config("Projector::spawn must be called within a tokio runtime".into())
        })?;
        let config = config.normalized();
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        for partition in 0..partitions {
            let worker = Worker {
                partition,
                broker: broker.clone(),
                store: store.clone(),
                config: config.clone(),
                counters: counters.clone(),
                failing: false,
            };
            let stop = stop.clone();
            runtime.spawn(async move {
                // Dropping the worker's future is the stop: every wait in it is a point where
                // it may end, and the claim and the held count go with it.
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = worker.run() => {}
                }
            });
        }
        Ok(Projector {
            counters,
            partitions,
            _stop: stop.drop_guard(),
        })
    }

    /// Counters summed over the partitions.
    pub fn stats(&self) -> ProjectorStats {
        self.counters.snapshot()
    }
}

/// The task of one partition.
struct Worker {
    partition: u32,
    broker: Arc<dyn Broker>,
    store: Arc<dyn Store>,
    config: ProjectorConfig,
    counters: Arc<Counters>,
    /// Whether the last step failed: errors are logged as warnings once per outage, then at
    /// debug level until a step succeeds, so a store down for an hour does not flood the log.
    failing: bool,
}

impl Worker {
    /// Claims the partition and projects it while the claim holds, forever.
    async fn run(mut self) {
        let partition = self.partition;
        loop {
            match self.store.claim(partition).await {
                Ok(Some(claim)) => {
                    let held = HeldCount::new(&self.counters);
                    tracing::debug!(partition, "projector holds the partition");
                    self.project(&*claim).await;
                    drop(held);
                    tracing::info!(partition, "projector lost its claim of the partition");
                }
                // Another process projects it; ask again later, it may stop.
                Ok(None) => {}
                Err(e) => self.count_error("claiming the partition", &e),
            }
            // Also after a lost claim, so a store whose claims never hold cannot make this
            // spin.
            tokio::time::sleep(self.config.claim_retry).await;
        }
    }

    /// Reads and applies batches while `claim` holds.
    async fn project(&mut self, claim: &dyn Claim) {
        let p = self.partition;
        let broker = self.broker.clone();
        let Some(log) = broker.as_log() else {
            // Checked by `spawn`; a broker whose log went away is a bug, not a reason to panic.
            tracing::error!(partition = p, "the broker no longer has a log to project");
            return;
        };
        // The position to read after, as the store has it; `None` = ask the store. Kept
        // between batches (this task is the only writer of its partition's position), asked
        // again after any error, since a failed apply may have committed or not.
        let mut position: Option<Option<Cursor>> = None;
        while claim.is_held() {
            let after = match position {
                Some(after) => after,
                None => match self.store.position(p).await {
                    Ok(after) => *position.insert(after),
                    Err(e) => {
                        self.failed("reading the stored position", &e).await;
                        continue;
                    }
                },
            };
            let batch = match log.read(p, after, self.config.batch).await {
                Ok(batch) => batch,
                Err(Error::CursorReset { cursor, reason }) => {
                    self.counters.resets.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        partition = p,
                        %cursor,
                        reason = reason.as_str(),
                        "the stored position does not fit the log (it started over): \
                         projecting the partition again from its oldest record"
                    );
                    position = Some(None);
                    continue;
                }
                Err(e) => {
                    position = None;
                    self.failed("reading the log", &e).await;
                    continue;
                }
            };
            let Some(next) = batch.next.filter(|&next| Some(next) != after) else {
                // Caught up. (A `next` equal to `after` would be a log not moving on; waiting
                // keeps that from becoming a busy loop too.)
                self.recovered();
                tokio::time::sleep(self.config.poll).await;
                continue;
            };
            let applied = match self.apply(&batch, next).await {
                Err(e) if refused(&e) => self.isolate(&batch, next, e).await,
                other => other,
            };
            match applied {
                Ok(()) => {
                    position = Some(Some(next));
                    self.recovered();
                }
                Err(e) => {
                    position = None;
                    self.failed("applying a batch to the store", &e).await;
                }
            }
        }
    }

    /// Applies a batch's events and `next` as the partition's position, in one store call.
    async fn apply(&self, batch: &LogBatch, next: Cursor) -> Result<()> {
        let events: Vec<ChatEvent> = batch.envelopes.iter().filter_map(super::event).collect();
        self.store.apply(&events, Some(next)).await?;
        let c = &self.counters;
        let records = u64::try_from(batch.envelopes.len()).unwrap_or(u64::MAX);
        let applied = u64::try_from(events.len()).unwrap_or(u64::MAX);
        c.records.fetch_add(records, Ordering::Relaxed);
        c.events.fetch_add(applied, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(last) = batch.envelopes.last() {
            // Sender clocks may run ahead of ours: a record "from the future" is no lag.
            let lag = now_ms().saturating_sub(last.ts);
            c.last_lag_ms.store(lag, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A batch the store refused for its data: applies its events one by one (in order, so
    /// the result is the batch's), skips those refused for good, then records `next`. Only
    /// when some events of the batch applied: a store that refuses every one (a permission
    /// taken away, a schema it does not know) has a problem of its own, and the batch is
    /// retried later like after any error, never skipped.
    async fn isolate(&self, batch: &LogBatch, next: Cursor, first: Error) -> Result<()> {
        let events: Vec<ChatEvent> = batch.envelopes.iter().filter_map(super::event).collect();
        let mut bad = Vec::new();
        for e in &events {
            match self.store.apply(std::slice::from_ref(e), None).await {
                Ok(()) => {}
                Err(err) if refused(&err) => bad.push((e, err)),
                Err(err) => return Err(err),
            }
        }
        if bad.len() == events.len() {
            return Err(first);
        }
        for (e, err) in &bad {
            tracing::error!(
                partition = self.partition,
                id = %e.id,
                room = %e.room,
                cursor = %e.cursor,
                error = %err,
                "the store refuses this event for good: skipped"
            );
        }
        self.counters.skipped.fetch_add(
            u64::try_from(bad.len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        // The batch's position, with nothing left to apply: the good events are in.
        let empty = LogBatch::new(Vec::new(), batch.next);
        self.apply(&empty, next).await?;
        let c = &self.counters;
        c.records.fetch_add(
            u64::try_from(batch.envelopes.len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        c.events.fetch_add(
            u64::try_from(events.len() - bad.len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// A step succeeded: the next error is a new outage, logged as a warning again.
    fn recovered(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!(partition = self.partition, "projector recovered");
        }
    }

    /// Counts and logs an error, then waits `retry`.
    async fn failed(&mut self, what: &str, e: &Error) {
        self.count_error(what, e);
        tokio::time::sleep(self.config.retry).await;
    }

    fn count_error(&mut self, what: &str, e: &Error) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        let partition = self.partition;
        if std::mem::replace(&mut self.failing, true) {
            tracing::debug!(partition, error = %e, "projector still failing: {what}");
        } else {
            tracing::warn!(partition, error = %e, "projector failed {what}; retrying");
        }
    }
}

/// Whether the store refused `e`'s call for its data, for good (retrying does not help):
/// `Error::Backend`, as `PostgresStore` reports a statement the server rejects.
fn refused(e: &Error) -> bool {
    matches!(e, Error::Backend { .. }) && !e.is_transient()
}

#[cfg(test)]
mod tests;
