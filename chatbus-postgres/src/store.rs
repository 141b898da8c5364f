//! [`PostgresStore`]: the pool, the call budget and the `Store` impl.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use chatbus_core::store::{
    ChatEvent, Claim, ConversationKey, ConversationPage, ReadState, StatePage, Store, StoredMessage,
};
use chatbus_core::{Cursor, Error, MessageId, Result, Room};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::NoTls;

use crate::config::PostgresConfig;
use crate::error::{self, BACKEND};
use crate::{apply, claim, convert, migrate, query};

/// A [`Store`] in PostgreSQL. Cheap to share (`Arc` it); every call takes a pooled
/// connection for its duration. See the [crate docs](crate) for the schema.
pub struct PostgresStore {
    pool: Pool,
    pg: tokio_postgres::Config,
    config: PostgresConfig,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PostgresStore")
            .field("config", &self.config)
            .field("pool_size", &status.size)
            .field("pool_available", &status.available)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, and applies the schema migrations the database lacks (once, however many
    /// instances start together).
    ///
    /// Errors: `Config` for a URL `tokio_postgres` cannot parse; `Unavailable` or `Timeout`
    /// when the server cannot be reached within the configured timeouts.
    pub async fn connect(config: PostgresConfig) -> Result<Self> {
        let mut pg: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e| Error::Config(format!("postgres url: {e}")))?;
        pg.connect_timeout(config.connect_timeout);
        // Keepalives notice a peer that vanished without closing (a partition) on idle
        // pooled connections; the call budget covers calls in flight.
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(30));
        // The server cancels a statement past the timeout (an error the call reports as
        // `Timeout`) rather than holding locks for a client that has given up.
        let ms = config.statement_timeout.as_millis().max(1);
        // Every statement of the store is meant to be an index lookup or range scan. A
        // prepared statement's generic plan is made once per connection, and one made while
        // a table was nearly empty (a fresh store being filled, before autovacuum's first
        // ANALYZE) can stick to a sequential scan as the table grows: seen in store_bench as
        // an id lookup 100x slower and apply 6x slower. With seqscan discouraged the index
        // plan is chosen whatever the statistics say.
        let options = format!(
            "{} -c statement_timeout={ms} -c enable_seqscan=off",
            pg.get_options().unwrap_or_default()
        );
        pg.options(options.trim());
        if pg.get_application_name().is_none() {
            pg.application_name("chatbus");
        }
        let manager = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                // A connection is checked with a round trip before each use: one broken by
                // a server restart is replaced instead of failing the next call.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let wait = Some(config.connect_timeout);
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait,
                create: wait,
                recycle: wait,
            })
            .build()
            .map_err(|e| Error::Config(format!("postgres pool: {e}")))?;
        let store = Self { pool, pg, config };
        let budget = store.config.call_budget();
        store
            .call("migrate", |mut c| async move {
                migrate::migrate(&mut c, budget).await
            })
            .await?;
        Ok(store)
    }

    /// The settings it was made with.
    pub fn config(&self) -> &PostgresConfig {
        &self.config
    }

    /// Runs `f` with a pooled connection, within the call budget: a server that does not
    /// answer makes the call fail with `Timeout`, never hang.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(Object) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let budget = self.config.call_budget();
        let work = async {
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| error::pool(e, op, self.config.connect_timeout))?;
            f(client).await
        };
        match tokio::time::timeout(budget, work).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                backend: BACKEND,
                op,
                after: budget,
            }),
        }
    }
}

const POSITION: &str = "SELECT epoch, pos FROM chatbus_positions WHERE partition = $1";

const JOIN: &str = "INSERT INTO chatbus_members (user_id, room, since) VALUES ($1, $2, $3)
     ON CONFLICT (user_id, room) DO NOTHING";

#[async_trait]
impl Store for PostgresStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn apply(&self, events: &[ChatEvent], position: Option<Cursor>) -> Result<()> {
        let budget = self.config.call_budget();
        self.call("apply", |mut c| async move {
            apply::apply(&mut c, events, position, budget).await
        })
        .await
    }

    async fn position(&self, partition: u32) -> Result<Option<Cursor>> {
        let budget = self.config.call_budget();
        self.call("position", |c| async move {
            let e = |e| error::db(e, "position", budget);
            let stmt = c.prepare_cached(POSITION).await.map_err(e)?;
            let row = c
                .query_opt(&stmt, &[&i64::from(partition)])
                .await
                .map_err(e)?;
            match row {
                Some(r) => Ok(Some(convert::cursor(
                    i64::from(partition),
                    r.try_get("epoch").map_err(e)?,
                    r.try_get("pos").map_err(e)?,
                )?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn message(
        &self,
        room: &Room,
        id: MessageId,
        viewer: &str,
    ) -> Result<Option<StoredMessage>> {
        let budget = self.config.call_budget();
        self.call("message", |c| async move {
            query::message(&c, room, id, viewer, budget).await
        })
        .await
    }

    async fn page(
        &self,
        room: &Room,
        viewer: &str,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<Option<StatePage>> {
        let budget = self.config.call_budget();
        self.call("page", |c| async move {
            query::page(&c, room, viewer, before, limit, budget).await
        })
        .await
    }

    async fn read_state(&self, room: &Room, user: &str) -> Result<ReadState> {
        let budget = self.config.call_budget();
        self.call("read_state", |c| async move {
            query::read_state(&c, room, user, budget).await
        })
        .await
    }

    async fn join(&self, room: &Room, user: &str, ts: u64) -> Result<()> {
        let budget = self.config.call_budget();
        self.call("join", |c| async move {
            let e = |e| error::db(e, "join", budget);
            let stmt = c.prepare_cached(JOIN).await.map_err(e)?;
            c.execute(&stmt, &[&user, &room.as_str(), &convert::ts(ts)])
                .await
                .map_err(e)?;
            Ok(())
        })
        .await
    }

    async fn claim(&self, partition: u32) -> Result<Option<Box<dyn Claim>>> {
        let budget = self.config.call_budget();
        match tokio::time::timeout(budget, claim::claim(&self.pg, partition, budget)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                backend: BACKEND,
                op: "claim",
                after: budget,
            }),
        }
    }

    async fn conversations(
        &self,
        user: &str,
        after: Option<&ConversationKey>,
        limit: usize,
    ) -> Result<ConversationPage> {
        let budget = self.config.call_budget();
        self.call("conversations", |c| async move {
            query::conversations(&c, user, after, limit, budget).await
        })
        .await
    }
}
