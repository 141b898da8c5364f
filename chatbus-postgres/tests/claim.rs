//! Claims are session advisory locks: one holder per partition across stores, released when
//! the claim is dropped or its connection dies.

use std::time::{Duration, Instant};

use chatbus_core::store::{Claim, Store};
use chatbus_postgres::tokio_postgres::{self, NoTls};
use chatbus_postgres::{PostgresConfig, PostgresStore};
use chatbus_testkit::postgres::Postgres;

/// Claims `partition` on `store`, retrying until `within`: the server releases a lock when it
/// notices the session ended, a moment after the client closed it.
async fn claim_within(store: &PostgresStore, partition: u32, within: Duration) -> Box<dyn Claim> {
    let start = Instant::now();
    loop {
        if let Some(c) = store.claim(partition).await.expect("claim") {
            return c;
        }
        assert!(
            start.elapsed() < within,
            "partition {partition} not claimable within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_holder_per_partition() {
    let pg = Postgres::start().await;
    let config = PostgresConfig::new(pg.url());
    let a = PostgresStore::connect(config.clone())
        .await
        .expect("store A");
    let b = PostgresStore::connect(config).await.expect("store B");

    let held = a.claim(3).await.expect("claim").expect("A claims 3");
    assert!(held.is_held());
    assert!(
        b.claim(3).await.expect("claim").is_none(),
        "B must not claim a partition A holds"
    );
    // Other partitions are free, the largest too (its key must not wrap onto another).
    let other = b.claim(4).await.expect("claim");
    assert!(other.is_some(), "B claims partition 4");
    let top = a
        .claim(u32::MAX)
        .await
        .expect("claim")
        .expect("A claims u32::MAX");
    assert!(b.claim(u32::MAX).await.expect("claim").is_none());
    drop((other, top));

    drop(held);
    let held_by_b = claim_within(&b, 3, Duration::from_secs(5)).await;
    assert!(held_by_b.is_held());
    assert!(a.claim(3).await.expect("claim").is_none());

    // The session holding the lock is ended by the server: the claim notices.
    let (client, connection) = tokio_postgres::connect(&pg.url(), NoTls)
        .await
        .expect("raw client");
    tokio::spawn(connection);
    let terminated = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_locks
             WHERE locktype = 'advisory' AND classid::bigint = $1 AND objid::bigint = 3
               AND objsubid = 2 AND granted",
            &[&0x6362_7573_i64],
        )
        .await
        .expect("terminate");
    assert_eq!(terminated.len(), 1, "one session holds partition 3");
    let start = Instant::now();
    while held_by_b.is_held() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "is_held() still true after the session was terminated"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = claim_within(&a, 3, Duration::from_secs(5)).await;
    assert!(again.is_held());
}
