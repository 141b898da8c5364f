//! [`HubStats`]: a snapshot of the hub's counters, and the atomics behind it.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a hub's counters ([`Hub::stats`](super::Hub::stats)). All are totals since start except the gauges `sessions` and `rooms`.
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
    /// Times a member was told its history was reset ([`Outbound::Reset`](super::Outbound::Reset)):
    /// its cursor was of another epoch of the log, or beyond its end.
    pub resets: u64,
    /// Log reads made for catch-ups.
    pub replay_reads: u64,
    /// Catch-up pages served by a log read made for another member resuming the same room.
    pub replays_shared: u64,
    /// Errors from the broker subscription (lag, disconnects).
    pub broker_errors: u64,
}

/// The live counters behind [`HubStats`].
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) sessions: AtomicU64,
    pub(super) rooms: AtomicU64,
    pub(super) messages_in: AtomicU64,
    pub(super) deliveries: AtomicU64,
    pub(super) lagged: AtomicU64,
    pub(super) replayed: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) slow_closed: AtomicU64,
    pub(super) resets: AtomicU64,
    pub(super) broker_errors: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> HubStats {
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
            resets: get(&self.resets),
            // Kept by the hub's `Replays`, filled in by `Hub::stats`.
            replay_reads: 0,
            replays_shared: 0,
            broker_errors: get(&self.broker_errors),
        }
    }
}

pub(super) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
