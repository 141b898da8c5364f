//! [`PresenceConfig`]: how often and how much presence is shared between instances.

use std::time::Duration;

/// How presence (and user status) is shared between instances (see `docs/protocol.md`,
/// "Presence" and "User status").
///
/// Built from [`Default`] with the `with_*` setters, so fields can be added without breaking
/// callers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PresenceConfig {
    /// Each instance re-announces every room it has members in this often (an empty diff, or
    /// its full list every sixth time), and forgets another instance's list after three
    /// intervals without news (an instance that died). Watched users are probed this often
    /// too, and a user whose instance died goes offline for its watchers within three
    /// intervals. Default 10 s.
    pub interval: Duration,
    /// Joins and leaves within this window are announced together, so a burst of joins costs
    /// one announcement per room. Default 25 ms.
    pub debounce: Duration,
    /// A `presence` frame lists every name while the room has at most this many online; beyond,
    /// it carries the count only (`"paged":true`) and clients page the names with `members`:
    /// every member gets the frame on every change, so a list would cost n × n names for a room
    /// of n, and every connection's write buffer would keep the size of the largest frame it
    /// sent. Default 200.
    pub max_listed: usize,
    /// In a room with more local connections than `max_listed`, this instance announces
    /// changes at most this often, instead of after each `debounce`: a burst of thousands of
    /// joins then costs every member about one `presence` frame per interval, not one per
    /// 25 ms (which was quadratic in the room's size). Default 1 s.
    pub large_room_debounce: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            debounce: Duration::from_millis(25),
            max_listed: 200,
            large_room_debounce: Duration::from_secs(1),
        }
    }
}

impl PresenceConfig {
    /// Sets [`interval`](Self::interval).
    #[must_use]
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Sets [`debounce`](Self::debounce).
    #[must_use]
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Sets [`max_listed`](Self::max_listed).
    #[must_use]
    pub fn with_max_listed(mut self, max_listed: usize) -> Self {
        self.max_listed = max_listed;
        self
    }

    /// Sets [`large_room_debounce`](Self::large_room_debounce).
    #[must_use]
    pub fn with_large_room_debounce(mut self, debounce: Duration) -> Self {
        self.large_room_debounce = debounce;
        self
    }
}
