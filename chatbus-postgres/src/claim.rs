//! [`Store::claim`](chatbus_core::store::Store::claim): a session advisory lock on a
//! connection of its own.
//!
//! The lock lives as long as the PostgreSQL session that took it, so the claim owns that
//! connection (not a pooled one, which would hand the lock to whoever borrows it next).
//! Closing the connection, by dropping the claim or by the server ending the session
//! (restart, `pg_terminate_backend`, a network failure), releases it; `is_held` then turns
//! false and the projector claims again.

use std::fmt;

use chatbus_core::store::Claim;
use chatbus_core::Result;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

use crate::error;

/// The first key of every claim's lock: "cbus" in ASCII, so chatbus's locks stand apart
/// from an application's own two-key advisory locks on the same database.
pub(crate) const CLAIM_KEY_SPACE: i32 = 0x6362_7573;

/// A held claim: the session that holds the lock.
pub(crate) struct PgClaim {
    partition: u32,
    client: Client,
    connection: JoinHandle<()>,
}

impl fmt::Debug for PgClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgClaim")
            .field("partition", &self.partition)
            .field("held", &self.is_held())
            .finish()
    }
}

impl Claim for PgClaim {
    fn is_held(&self) -> bool {
        !self.client.is_closed()
    }
}

impl Drop for PgClaim {
    fn drop(&mut self) {
        // The client going away ends the connection task, which closes the session and
        // with it the lock; aborting too covers a task stuck writing to a dead peer.
        self.connection.abort();
    }
}

/// Tries to take the lock of `partition` on a fresh connection: `None` while another
/// session holds it.
pub(crate) async fn claim(
    config: &tokio_postgres::Config,
    partition: u32,
    budget: std::time::Duration,
) -> Result<Option<Box<dyn Claim>>> {
    let e = |e| error::db(e, "claim", budget);
    let (client, connection) = config.connect(NoTls).await.map_err(e)?;
    let connection = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "chatbus-postgres: claim connection ended");
        }
    });
    // The lock's second key is an int4: the partition's 32 bits reinterpreted (`as` is
    // exactly that, and lossless both ways), so every u32 has its own key.
    let key = partition as i32;
    let row = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2)",
            &[&CLAIM_KEY_SPACE, &key],
        )
        .await
        .map_err(e)?;
    let held: bool = row.try_get(0).map_err(e)?;
    if !held {
        connection.abort();
        return Ok(None);
    }
    Ok(Some(Box::new(PgClaim {
        partition,
        client,
        connection,
    })))
}
