//! The crate-private error type and its conversion into [`chatbus_core::Error`].

use std::time::Duration;

use chatbus_core::Error;

pub(crate) const BACKEND: &str = "redis";

/// What can go wrong inside this crate, before it becomes the public [`chatbus_core::Error`]
/// (so that `redis` types never reach the public API: they travel as an opaque source).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RedisBrokerError {
    /// The server refused our credentials. → `Error::Backend`, whose message says so.
    #[error(
        "authentication failed: the Redis server refused the credentials (check the password in \
         the URL / CHATBUS_REDIS_URL or REDIS_PASSWORD): {0}"
    )]
    Auth(#[source] redis::RedisError),
    /// The server cannot be reached, or the connection broke. → `Error::Unavailable`.
    #[error("{what}: {source}")]
    Connection {
        what: &'static str,
        #[source]
        source: redis::RedisError,
    },
    /// An operation did not finish in time. → `Error::Timeout`.
    #[error("{op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// A bad configuration value. → `Error::Config`.
    #[error("{0}")]
    Config(String),
    /// Any other error reported by the client or the server. → `Error::Backend`.
    #[error("{what}: {source}")]
    Command {
        what: &'static str,
        #[source]
        source: redis::RedisError,
    },
}

fn is_auth_error(e: &redis::RedisError) -> bool {
    if e.kind() == redis::ErrorKind::AuthenticationFailed {
        return true;
    }
    if matches!(e.code(), Some("WRONGPASS" | "NOAUTH")) {
        return true;
    }
    // Servers before 6.0 answer a bad AUTH with a plain ERR whose text names it.
    let text = e.to_string();
    text.contains("invalid password") || text.contains("called without any password")
}

impl RedisBrokerError {
    /// Classifies a client error raised during `what`; `after` is the time limit that applied,
    /// for client-side timeouts.
    pub(crate) fn from_redis(what: &'static str, e: redis::RedisError, after: Duration) -> Self {
        if is_auth_error(&e) {
            Self::Auth(e)
        } else if e.is_timeout() {
            Self::Timeout { op: what, after }
        } else if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
        {
            Self::Connection { what, source: e }
        } else {
            Self::Command { what, source: e }
        }
    }
}

impl From<RedisBrokerError> for Error {
    fn from(e: RedisBrokerError) -> Self {
        match e {
            RedisBrokerError::Connection { .. } => Error::Unavailable {
                backend: BACKEND,
                reason: e.to_string(),
            },
            RedisBrokerError::Timeout { op, after } => Error::Timeout {
                backend: BACKEND,
                op,
                after,
            },
            RedisBrokerError::Config(msg) => Error::Config(msg),
            other @ (RedisBrokerError::Auth(_) | RedisBrokerError::Command { .. }) => {
                Error::backend(BACKEND, other)
            }
        }
    }
}

/// Maps a client error raised during `what` (time limit `after`) to the public error.
pub(crate) fn map(what: &'static str, e: redis::RedisError, after: Duration) -> Error {
    RedisBrokerError::from_redis(what, e, after).into()
}

/// The public error for an operation that did not finish within `after`.
pub(crate) fn timeout(op: &'static str, after: Duration) -> Error {
    RedisBrokerError::Timeout { op, after }.into()
}

/// The public error for a bad configuration value.
pub(crate) fn config(msg: impl Into<String>) -> Error {
    RedisBrokerError::Config(msg.into()).into()
}

/// The public error while the connection is down.
pub(crate) fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        reason: reason.into(),
    }
}
