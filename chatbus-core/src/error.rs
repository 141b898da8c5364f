//! The one error type of chatbus.

use std::fmt;
use std::time::Duration;

use crate::envelope::Cursor;

/// A boxed error from a backend client library, kept opaque so that `redis` or `rdkafka`
/// types never leak into the public API.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in chatbus.
///
/// The enum is `#[non_exhaustive]`: match on the variants you handle and keep a fallback arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A room name that is empty, too long or uses characters outside `[A-Za-z0-9._:-]`.
    #[error("invalid room name: {reason}")]
    InvalidRoom {
        /// Why the name was refused.
        reason: &'static str,
    },
    /// A cursor string that this broker did not produce.
    #[error("invalid cursor: {0:?}")]
    InvalidCursor(String),
    /// Bytes that are not a valid encoded envelope.
    #[error("malformed envelope: {0}")]
    Decode(&'static str),
    /// A message larger than the configured limit.
    #[error("message too large: {size} bytes, limit {limit}")]
    TooLarge {
        /// Size of the rejected message.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The broker does not offer this operation (for example `replay` on a broker that keeps no
    /// history).
    #[error("unsupported by the {backend} broker: {what}")]
    Unsupported {
        /// Which broker.
        backend: &'static str,
        /// What was asked.
        what: &'static str,
    },
    /// The broker cannot be reached or refused the operation; retrying later may succeed.
    #[error("{backend} broker unavailable: {reason}")]
    Unavailable {
        /// Which broker.
        backend: &'static str,
        /// What went wrong, for a human.
        reason: String,
    },
    /// An operation did not finish within its configured time.
    #[error("{backend} broker timed out after {after:?} during {op}")]
    Timeout {
        /// Which broker.
        backend: &'static str,
        /// The operation that timed out.
        op: &'static str,
        /// The configured limit.
        after: Duration,
    },
    /// A resume cursor that names no position of the room's log as it is now: the log was
    /// reset since the cursor was taken (another [epoch](Cursor::epoch)), or the cursor is
    /// beyond its end. Nothing can be replayed from it; a consumer goes live from now on and
    /// tells its client that its history was reset (the Hub sends
    /// [`Outbound::Reset`](crate::Outbound::Reset)).
    #[error("cursor {cursor} does not fit the room's log: {reason}")]
    CursorReset {
        /// The cursor asked for.
        cursor: Cursor,
        /// Why it does not fit.
        reason: ResetReason,
    },
    /// A subscriber fell behind and `missed` messages were dropped for it. The subscription goes
    /// on; the consumer should resync from its last cursor with [`crate::Broker::replay`].
    #[error("subscriber lagged: {missed} messages dropped")]
    Lagged {
        /// How many messages were dropped.
        missed: u64,
    },
    /// The broker, hub or subscription was closed.
    #[error("closed")]
    Closed,
    /// A configuration value is wrong (a bad URL, a bad environment variable, ...).
    #[error("configuration error: {0}")]
    Config(String),
    /// An error from a backend client library, for example a wrong password.
    #[error("{backend} error: {source}")]
    Backend {
        /// Which broker.
        backend: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Wraps a backend client error.
    pub fn backend(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            backend,
            source: source.into(),
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::Timeout { .. } | Self::Lagged { .. }
        )
    }
}

/// Why a cursor does not fit a log ([`Error::CursorReset`],
/// [`Outbound::Reset`](crate::Outbound::Reset)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResetReason {
    /// The cursor belongs to another epoch of the log: the log started over since (Redis came
    /// back empty, the Kafka topic was recreated, the process with the memory broker
    /// restarted). Positions of the two logs are unrelated.
    OtherLog,
    /// The cursor is of this log but beyond its end: it names a message that was never
    /// written (a made-up cursor, or one from a log that lost its newest messages).
    BeyondEnd,
}

impl ResetReason {
    /// The name used in the client protocol: `"log_reset"` or `"beyond_end"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::OtherLog => "log_reset",
            Self::BeyondEnd => "beyond_end",
        }
    }
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OtherLog => "it belongs to an earlier epoch of the log (the log was reset)",
            Self::BeyondEnd => "it is beyond the end of the log",
        })
    }
}
