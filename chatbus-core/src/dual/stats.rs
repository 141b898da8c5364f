//! [`DualStats`]: a snapshot of the bus's counters, and the atomics behind it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Which paths a [`DualBus`](super::DualBus) is using.
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

/// A snapshot of a [`DualBus`](super::DualBus)'s counters ([`DualBus::stats`](super::DualBus::stats)). Totals since start, except the
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
    /// Interest-based: durable messages written without a room ticket, while this instance's
    /// lease had lapsed (its fast broker out of reach).
    pub ticketless_publishes: u64,
    /// Interest-based: times the merger stopped trusting tickets and followed its rooms
    /// through the log (a lease lapsed, or the fast broker out of reach).
    pub tail_periods: u64,
    /// Interest-based: true while the merger follows its rooms through the log (gauge).
    pub tailing: bool,
    /// The current mode, from what the merger and publishes last saw.
    pub mode: DualMode,
}

/// The live counters behind [`DualStats`], shared by the bus and its merger tasks.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) via_fast: AtomicU64,
    pub(super) via_durable: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) gaps_filled: AtomicU64,
    pub(super) gap_timeouts: AtomicU64,
    pub(super) held: AtomicU64,
    pub(super) fast_publish_errors: AtomicU64,
    pub(super) durable_publish_errors: AtomicU64,
    pub(super) degraded_publishes: AtomicU64,
    pub(super) ticketless_publishes: AtomicU64,
    pub(super) tail_periods: AtomicU64,
    pub(super) tailing: AtomicBool,
    pub(super) fast_down: AtomicBool,
    pub(super) durable_down: AtomicBool,
}

impl Counters {
    pub(super) fn snapshot(&self) -> DualStats {
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
            ticketless_publishes: get(&self.ticketless_publishes),
            tail_periods: get(&self.tail_periods),
            tailing: self.tailing.load(Ordering::Relaxed),
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

pub(super) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
