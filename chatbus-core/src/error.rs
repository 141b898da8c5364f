//! The one error type of chatbus.

use std::time::Duration;

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
