//! [`DualConfig`] and [`DurableDownPolicy`].

use std::time::Duration;

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

/// Configuration of a [`DualBus`](super::DualBus).
#[derive(Debug, Clone)]
#[non_exhaustive]
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
    /// Receive from the brokers only the rooms with local subscribers (opt-in): one
    /// fast subscription per room, per-room order from tickets the fast broker hands out
    /// (`Broker::tickets`, e.g. Redis), lost fast copies read from the room's log; instance
    /// leases in the fast broker keep sends and delivery going through the durable log while
    /// the fast broker is out of reach (see docs/ARCHITECTURE.md, "Interest-based DualBus").
    /// Every instance of a deployment must agree. Room subscriptions only (`Interest::All` is
    /// refused). Default off.
    pub interest: bool,
}

impl Default for DualConfig {
    fn default() -> Self {
        Self {
            policy: DurableDownPolicy::Reject,
            dedupe_window: 65_536,
            max_held: 100_000,
            gap_timeout: Duration::from_secs(30),
            subscriber_capacity: 8192,
            interest: false,
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

    /// Sets [`dedupe_window`](Self::dedupe_window).
    #[must_use]
    pub fn with_dedupe_window(mut self, ids: usize) -> Self {
        self.dedupe_window = ids;
        self
    }

    /// Sets [`max_held`](Self::max_held).
    #[must_use]
    pub fn with_max_held(mut self, messages: usize) -> Self {
        self.max_held = messages;
        self
    }

    /// Sets [`subscriber_capacity`](Self::subscriber_capacity).
    #[must_use]
    pub fn with_subscriber_capacity(mut self, messages: usize) -> Self {
        self.subscriber_capacity = messages;
        self
    }

    /// Sets [`interest`](Self::interest).
    #[must_use]
    pub fn with_interest(mut self, on: bool) -> Self {
        self.interest = on;
        self
    }

    /// Sets [`gap_timeout`](Self::gap_timeout).
    #[must_use]
    pub fn with_gap_timeout(mut self, timeout: Duration) -> Self {
        self.gap_timeout = timeout;
        self
    }
}
