//! [`HubConfig`] and [`SlowPolicy`].

/// What the Hub does with a session whose outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SlowPolicy {
    /// Stop live delivery of the room to it and replay from its last cursor once it catches up
    /// (when the broker keeps history; otherwise it is told with [`Outbound::Lagged`](super::Outbound::Lagged)).
    #[default]
    Resync,
    /// Close the session with [`CloseReason::SlowConsumer`](super::CloseReason::SlowConsumer).
    Close,
}

/// Configuration of a [`Hub`](super::Hub).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubConfig {
    /// Frames queued per session, not yet taken by its writer, before it counts as slow.
    /// The writer takes what is queued in one batch, so up to twice this many may be
    /// buffered in all. Default 1,024.
    pub session_queue: usize,
    /// Replies (acks, errors) buffered per session before it is closed as slow. Default 256.
    pub control_queue: usize,
    /// Bytes of replies (history pages can be large) buffered per session before it is
    /// closed as slow. Default 8 MiB.
    pub control_bytes: usize,
    /// See [`SlowPolicy`]. Default `Resync`.
    pub slow_policy: SlowPolicy,
    /// Messages fetched per replay request during catch-up. Default 500.
    pub replay_page: usize,
    /// Most messages replayed in one catch-up; past it the client is told it lagged. Default
    /// 100,000.
    pub max_catchup: usize,
    /// Live messages held for a member while it catches up; past it the catch-up goes on from
    /// the log. Default 4,096.
    pub pending_limit: usize,
    /// Log reads for catch-ups in flight at once; more wait their turn (holding their live
    /// messages meanwhile, so waiting costs latency, not a `lagged`). One read serves every
    /// member resuming the same room from about the same place. Default 8, the Kafka broker's
    /// default number of replay readers, so that a mass reconnect queues here rather than
    /// timing out in the broker.
    pub max_replays: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            session_queue: 1024,
            control_queue: 256,
            control_bytes: 8 << 20,
            slow_policy: SlowPolicy::Resync,
            replay_page: 500,
            max_catchup: 100_000,
            pending_limit: 4096,
            max_replays: 8,
        }
    }
}

impl HubConfig {
    /// Sets [`session_queue`](Self::session_queue).
    #[must_use]
    pub fn with_session_queue(mut self, session_queue: usize) -> Self {
        self.session_queue = session_queue;
        self
    }

    /// Sets [`control_queue`](Self::control_queue).
    #[must_use]
    pub fn with_control_queue(mut self, control_queue: usize) -> Self {
        self.control_queue = control_queue;
        self
    }

    /// Sets [`control_bytes`](Self::control_bytes).
    #[must_use]
    pub fn with_control_bytes(mut self, control_bytes: usize) -> Self {
        self.control_bytes = control_bytes;
        self
    }

    /// Sets [`slow_policy`](Self::slow_policy).
    #[must_use]
    pub fn with_slow_policy(mut self, slow_policy: SlowPolicy) -> Self {
        self.slow_policy = slow_policy;
        self
    }

    /// Sets [`replay_page`](Self::replay_page).
    #[must_use]
    pub fn with_replay_page(mut self, replay_page: usize) -> Self {
        self.replay_page = replay_page;
        self
    }

    /// Sets [`max_catchup`](Self::max_catchup).
    #[must_use]
    pub fn with_max_catchup(mut self, max_catchup: usize) -> Self {
        self.max_catchup = max_catchup;
        self
    }

    /// Sets [`pending_limit`](Self::pending_limit).
    #[must_use]
    pub fn with_pending_limit(mut self, pending_limit: usize) -> Self {
        self.pending_limit = pending_limit;
        self
    }

    /// Sets [`max_replays`](Self::max_replays).
    #[must_use]
    pub fn with_max_replays(mut self, max_replays: usize) -> Self {
        self.max_replays = max_replays;
        self
    }
}
