//! How driver and pool errors become [`chatbus_core::Error`]s.
//!
//! The split that matters to a caller is transient or not: a server that is down, restarting,
//! out of connections or rolling back a deadlock victim is `Unavailable` (retry later); a
//! cancelled statement is `Timeout`; a statement the server refuses for its data (a NUL in a
//! user name, a violated constraint) is `Backend`, which retrying does not fix.

use std::time::Duration;

use chatbus_core::Error;
use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

/// The backend name in errors.
pub(crate) const BACKEND: &str = "postgres";

/// A driver error as a chatbus error; `op` and `after` name the call for a timeout.
pub(crate) fn db(e: tokio_postgres::Error, op: &'static str, after: Duration) -> Error {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection broke (closed, I/O), or the client refused a value
        // before sending it (a conversion), which no retry fixes.
        let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        return if e.is_closed() || io {
            unavailable(e)
        } else {
            Error::backend(BACKEND, e)
        };
    };
    if *code == SqlState::QUERY_CANCELED {
        return Error::Timeout {
            backend: BACKEND,
            op,
            after,
        };
    }
    let class = code.code().get(..2).unwrap_or_default();
    // 08 connection exception, 53 insufficient resources, 57 operator intervention (admin
    // shutdown, cannot connect now), 40 transaction rollback (deadlock, serialization).
    if matches!(class, "08" | "53" | "57" | "40") {
        unavailable(e)
    } else {
        Error::backend(BACKEND, e)
    }
}

/// A pool error as a chatbus error.
pub(crate) fn pool(e: PoolError, op: &'static str, after: Duration) -> Error {
    match e {
        PoolError::Timeout(_) => Error::Timeout {
            backend: BACKEND,
            op,
            after,
        },
        PoolError::Backend(e) => db(e, op, after),
        PoolError::Closed => Error::Closed,
        other => unavailable(other),
    }
}

/// `Unavailable` with `e` as the reason.
pub(crate) fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        reason: e.to_string(),
    }
}

/// A value read back that the schema should have prevented (a negative offset): the database
/// was written by something else.
pub(crate) fn corrupt(what: &str) -> Error {
    Error::backend(BACKEND, format!("unexpected value in the database: {what}"))
}
