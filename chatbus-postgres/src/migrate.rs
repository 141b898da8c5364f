//! Schema migrations, applied by [`PostgresStore::connect`](crate::PostgresStore::connect).
//!
//! All of it runs in one transaction that first takes a transaction-level advisory lock, so
//! instances starting together apply each migration once (the others wait, then find it
//! recorded), and a failed migration leaves nothing half-made. Each applied version is a row
//! of `chatbus_migrations(version, applied_at)`.

use chatbus_core::Result;
use deadpool_postgres::Object;

use crate::error;

/// Every migration, oldest first: (version, SQL). Versions only ever get added.
pub(crate) const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../migrations/0001_init.sql"))];

/// The key of the migration lock (one bigint: a key space apart from the claims' two-int4
/// keys, which PostgreSQL keeps separate). "chatbus:migrate" in ASCII, truncated.
const MIGRATION_LOCK: i64 = 0x6368_6174_6275_736d;

/// Applies the migrations `client`'s database lacks; returns how many it applied.
pub(crate) async fn migrate(client: &mut Object, budget: std::time::Duration) -> Result<usize> {
    let err = |e| error::db(e, "migrate", budget);
    let tx = client.transaction().await.map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS chatbus_migrations (
             version     integer PRIMARY KEY,
             applied_at  timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(err)?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM chatbus_migrations", &[])
        .await
        .map_err(err)?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let mut applied = 0;
    for (version, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await.map_err(err)?;
        tx.execute(
            "INSERT INTO chatbus_migrations (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(err)?;
        tracing::info!(version, "chatbus-postgres: applied migration");
        applied += 1;
    }
    tx.commit().await.map_err(err)?;
    Ok(applied)
}
