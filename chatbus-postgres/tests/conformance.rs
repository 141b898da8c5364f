//! The store conformance suite against a real PostgreSQL.

use chatbus_postgres::{PostgresConfig, PostgresStore};
use chatbus_testkit::postgres::Postgres;

#[tokio::test]
async fn postgres_store_conforms() {
    let pg = Postgres::start().await;
    let store = PostgresStore::connect(PostgresConfig::new(pg.url()))
        .await
        .expect("connect");
    chatbus_core::conformance::store::run_all(&store).await;
}
