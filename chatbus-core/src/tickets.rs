//! Per-room tickets: the fast broker's part of the interest-based DualBus
//! (docs/ARCHITECTURE.md, "Interest-based DualBus").
//!
//! A publisher [takes](Tickets::take_ticket) a ticket for the room before its durable write and
//! [closes](Tickets::close_ticket) it after the durable ack, which returns the *horizon*: the
//! highest ticket taken by then. Every message of the room with a lower log offset has a ticket
//! at or below that horizon, which is what lets a receiver that follows only its own rooms
//! deliver in log order. A new receiver reads the [baseline](Tickets::ticket_baseline) once its
//! fast subscription is live.
//!
//! The same broker holds the *leases* of the instances ([`Tickets::renew_lease`],
//! [`Tickets::leases`]): an instance that cannot reach it may publish without tickets only
//! once its lease has certainly lapsed, and a receiver that sees a lapsed lease reads the log
//! instead of trusting tickets (see `dual/lease.rs`).

use std::time::Duration;

use async_trait::async_trait;

use crate::envelope::Room;
use crate::Result;

/// A ticket of a room: the room counter's epoch and its value.
///
/// The epoch names the counter: it is set when the counter is created (a fast broker that lost
/// its counters, e.g. a restarted Redis, creates new ones with new epochs), so tickets of two
/// epochs are never compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// The counter's epoch (nonzero).
    pub epoch: u64,
    /// The ticket's number, from 1.
    pub n: u64,
}

/// A room counter as a new receiver reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Baseline {
    /// The counter's epoch.
    pub epoch: u64,
    /// The highest ticket taken so far (0 for none).
    pub counter: u64,
    /// Tickets at or below `counter` that are still open (taken, not closed), ascending. Every
    /// other ticket at or below `counter` was closed before this was read, so after its
    /// durable ack.
    pub open: Vec<u64>,
}

/// How long a ticket stays open at most. A publisher closes its ticket within its durable
/// broker's publish timeout (seconds); one that is still open after this belongs to a
/// publisher that died, and [`Tickets::ticket_baseline`] forgets it.
pub const OPEN_TICKET_TTL: Duration = Duration::from_secs(60);

/// How long an idle room's counter is kept: a room unused for this long gets a new counter
/// (a new epoch) at its next ticket.
pub const COUNTER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// An instance's lease as the fast broker holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The instance.
    pub instance: String,
    /// When the lease runs out, in the fast broker's clock (Unix milliseconds).
    pub expires_ms: u64,
}

/// Every lease the fast broker holds, with its clock.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Leases {
    /// The fast broker's clock when it answered (Unix milliseconds).
    pub now_ms: u64,
    /// When the lease set was last created by an instance that had held a lease before (the
    /// broker lost its leases: a restart, `FLUSHALL`), 0 if never. Leases that lapsed before
    /// then are gone from the set, so a receiver cannot see them.
    pub reset_ms: u64,
    /// The leases, live or lapsed less than the `keep` passed to [`Tickets::leases`] ago.
    pub leases: Vec<Lease>,
}

/// How a lease renewal went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed (or taken): it runs out `ttl` after `now_ms`.
    Renewed {
        /// The fast broker's clock when it renewed.
        now_ms: u64,
    },
    /// Refused: the request reached the broker after its `deadline_ms`.
    TooLate {
        /// The fast broker's clock when it refused.
        now_ms: u64,
    },
}

/// A fast broker's per-room ticket counters. See the module docs.
#[async_trait]
pub trait Tickets: Send + Sync {
    /// Takes the next ticket of `room` and records it as open.
    async fn take_ticket(&self, room: &Room) -> Result<Ticket>;

    /// Closes `ticket` (its message was published on the fast path, or its durable write
    /// failed) and returns the counter as it is now: its epoch and the highest ticket taken
    /// (the horizon). The epoch differs from the ticket's when the counter was lost and
    /// recreated since the ticket was taken.
    async fn close_ticket(&self, room: &Room, ticket: Ticket) -> Result<Ticket>;

    /// The counter of `room` (created if it does not exist, so that the first ticket is of
    /// the epoch a receiver saw) and its open tickets, without those open for longer than
    /// [`OPEN_TICKET_TTL`].
    async fn ticket_baseline(&self, room: &Room) -> Result<Baseline>;

    /// Renews `instance`'s lease for `ttl`, unless the broker's clock is past `deadline_ms`
    /// (then nothing changes): a request delayed in the network must not renew a lease its
    /// sender already counts as lapsed. `held_before` says that this instance has held a lease
    /// before; if the lease set is missing then, the broker lost it, and the set records that
    /// ([`Leases::reset_ms`]).
    async fn renew_lease(
        &self,
        instance: &str,
        ttl: Duration,
        deadline_ms: u64,
        held_before: bool,
    ) -> Result<Renewal>;

    /// The broker's clock (nothing else changes): what an instance bases the deadline of
    /// its next renewal on.
    async fn lease_clock(&self) -> Result<u64>;

    /// Every lease, forgetting those lapsed more than `keep` ago.
    async fn leases(&self, keep: Duration) -> Result<Leases>;
}
