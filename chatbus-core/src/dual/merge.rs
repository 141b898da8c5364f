//! The merger: one task per bus that reads the fast stream and the durable tail and delivers
//! each durable message once, in log order per partition, filling fast-path gaps from the log.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

// tokio's clock, not std's: the gap timeout then follows paused time in tests.
use tokio::time::Instant;

use super::stats::{inc, Counters};
use super::{DedupeWindow, DualConfig};
use crate::broker::{Broker, Interest, Subscription};
use crate::envelope::{Cursor, Envelope};
use crate::subscribers::Subscribers;
use crate::{Error, Result};

/// Which path a copy came by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Path {
    Fast,
    Durable,
}

pub(super) struct Merger {
    config: DualConfig,
    out: Subscribers,
    stats: Arc<Counters>,
    // Per partition: the next offset to deliver. Absent until the tail's start is known.
    next: HashMap<u32, u64>,
    // Per partition: the epoch of the log `next` counts in, where known (nonzero).
    epochs: HashMap<u32, u32>,
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
    pub(super) fn new(
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
            epochs: HashMap::new(),
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
        self.epochs = start
            .unwrap_or_default()
            .iter()
            .filter(|c| c.epoch != 0)
            .map(|c| (c.partition, c.epoch))
            .collect();
    }

    /// Checks `c` against the epoch `next` counts in for its partition. Returns false for a
    /// fast copy of another epoch than the tail's: offsets of two logs are unrelated, so it is
    /// neither a copy nor a gap; the tail, which reads the log there is, brings the message.
    /// A tail message of another epoch means the log started over (a recreated topic): the
    /// partition restarts from it, and what was held for the old log is dropped.
    fn check_epoch(&mut self, c: Cursor, path: Path) -> bool {
        if c.epoch == 0 {
            return true;
        }
        let known = self.epochs.get(&c.partition).copied().unwrap_or(0);
        if known == c.epoch {
            return true;
        }
        if known == 0 {
            self.epochs.insert(c.partition, c.epoch);
            return true;
        }
        match path {
            Path::Fast => {
                inc(&self.stats.duplicates);
                false
            }
            Path::Durable => {
                tracing::warn!(
                    partition = c.partition,
                    from = known,
                    to = c.epoch,
                    "the durable log started over (new epoch); following it"
                );
                self.epochs.insert(c.partition, c.epoch);
                self.next.insert(c.partition, c.offset);
                if let Some(held) = self.held.remove(&c.partition) {
                    self.held_total -= held.len();
                    self.stats
                        .held
                        .store(self.held_total as u64, Ordering::Relaxed);
                }
                true
            }
        }
    }

    pub(super) async fn run<F: Broker, D: Broker>(
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
                    self.expire_gaps(&*durable_broker);
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
        if !self.check_epoch(c, path) {
            return;
        }
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

    /// Gaps older than `gap_timeout`: deliver what is held and let the subscribers of the
    /// partition's rooms resync (rooms of other partitions lost nothing).
    fn expire_gaps<D: Broker>(&mut self, durable: &D) {
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
            // messages, so the skipped ones come from the log when it has them. Only the rooms
            // of this partition can have lost anything (all rooms, if the log does not say
            // where rooms live).
            self.out.error_where(
                |room| durable.log_partition(room).is_none_or(|p| p == partition),
                || Error::Lagged { missed },
            );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Room;

    fn at(offset: u64, epoch: u32) -> Envelope {
        let room = Room::new("r").unwrap_or_else(|e| panic!("{e}"));
        let mut e = Envelope::new(room, format!("{offset}@{epoch:x}"));
        e.cursor = Some(Cursor::with_epoch(0, offset, epoch));
        e
    }

    /// What the merger dispatched so far, as `offset@epoch` payloads.
    fn delivered(sub: &mut Subscription) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(Some(Ok(e))) = futures::FutureExt::now_or_never(sub.recv()) {
            out.push(String::from_utf8_lossy(&e.payload).into_owned());
        }
        out
    }

    /// A durable log that starts over (a recreated Kafka topic: offsets from 0 again, another
    /// epoch) is followed: its messages are not dropped as copies of the old log's offsets,
    /// and fast copies of an epoch the tail has not reached are left to the tail (issue #11).
    #[tokio::test]
    async fn a_new_epoch_of_the_durable_log_is_followed_not_dropped() {
        let out = Subscribers::new(64);
        let mut sub = out.subscribe(Interest::All);
        let start = [Cursor::with_epoch(0, 10, 0xaa)];
        let mut m = Merger::new(
            DualConfig::default(),
            out,
            Arc::new(Counters::default()),
            Some(&start),
        );
        m.accept(at(10, 0xaa), Path::Fast);
        m.accept(at(10, 0xaa), Path::Durable); // a copy
        m.accept(at(12, 0xaa), Path::Fast); // ahead: held for the tail
        assert_eq!(delivered(&mut sub), ["10@aa"]);
        // The topic is recreated: the tail brings offset 0 of another epoch. What was held for
        // the old log is dropped; the new log is delivered from its first offset.
        m.accept(at(0, 0xbb), Path::Durable);
        m.accept(at(1, 0xaa), Path::Fast); // a late copy of the old log: not a message of the new one
        m.accept(at(1, 0xbb), Path::Fast);
        m.accept(at(1, 0xbb), Path::Durable); // its copy
        m.accept(at(2, 0xcc), Path::Fast); // an epoch the tail has not reached: left to it
        m.accept(at(2, 0xbb), Path::Durable);
        assert_eq!(delivered(&mut sub), ["0@bb", "1@bb", "2@bb"]);
        assert_eq!(m.held_total, 0);
    }
}
