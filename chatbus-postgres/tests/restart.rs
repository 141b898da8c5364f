//! The store survives a PostgreSQL restart and a crash: calls fail fast while the server is
//! down, succeed again once it is back, and nothing committed is lost.

use std::time::{Duration, Instant};

use chatbus_core::store::{ChatEvent, EventKind, Store};
use chatbus_core::{Cursor, Error, MessageId, Room};
use chatbus_postgres::{PostgresConfig, PostgresStore};
use chatbus_testkit::postgres::Postgres;

fn messages(room: &Room, offsets: std::ops::RangeInclusive<u64>) -> Vec<ChatEvent> {
    offsets
        .map(|o| ChatEvent {
            id: MessageId::new(),
            room: room.clone(),
            from: "alice".into(),
            ts: o,
            cursor: Cursor::with_epoch(0, o, 3),
            kind: EventKind::Message {
                name: None,
                body: format!("m{o}").into(),
                to: None,
            },
        })
        .collect()
}

async fn bodies(store: &PostgresStore, room: &Room) -> Vec<String> {
    let page = store
        .page(room, "bob", None, 100)
        .await
        .expect("page")
        .expect("a page");
    page.messages
        .iter()
        .map(|m| m.body.as_deref().unwrap_or("").to_owned())
        .collect()
}

/// Every call fails, with Unavailable or Timeout, well within the configured timeouts.
async fn fails_fast(store: &PostgresStore, room: &Room, phase: &str) {
    let limit = Duration::from_secs(3);
    let start = Instant::now();
    let results = [
        store.page(room, "bob", None, 10).await.err(),
        store.apply(&messages(room, 100..=100), None).await.err(),
        store.read_state(room, "bob").await.err(),
        store.position(0).await.err(),
    ];
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Some(Error::Unavailable { .. } | Error::Timeout { .. }) => {}
            other => panic!(
                "{phase}: call {i} during the outage: want Unavailable/Timeout, got {other:?}"
            ),
        }
    }
    assert!(
        start.elapsed() < limit,
        "four calls took {:?} while the server was down",
        start.elapsed()
    );
}

#[tokio::test]
async fn survives_restart_and_crash() {
    let mut pg = Postgres::start().await;
    let config = PostgresConfig::new(pg.url())
        .with_connect_timeout(Duration::from_secs(1))
        .with_statement_timeout(Duration::from_secs(1));
    let store = PostgresStore::connect(config).await.expect("connect");
    let room = Room::new("restart.room").expect("room");
    store
        .apply(&messages(&room, 1..=10), Some(Cursor::with_epoch(0, 10, 3)))
        .await
        .expect("apply");
    // Fill the pool with connections that the restart will break.
    for _ in 0..4 {
        bodies(&store, &room).await;
    }

    pg.stop().await;
    fails_fast(&store, &room, "after a stop").await;
    pg.restart().await;
    // The pool checks its connections before use: the broken ones are replaced, so the
    // first call after the restart already succeeds.
    assert_eq!(bodies(&store, &room).await.len(), 10);
    assert_eq!(
        store.position(0).await.expect("position"),
        Some(Cursor::with_epoch(0, 10, 3))
    );
    store
        .apply(
            &messages(&room, 11..=20),
            Some(Cursor::with_epoch(0, 20, 3)),
        )
        .await
        .expect("apply after the restart");

    // A crash (SIGKILL, no goodbye to clients) and recovery.
    pg.kill();
    fails_fast(&store, &room, "after a kill").await;
    pg.restart().await;
    let got = bodies(&store, &room).await;
    let want: Vec<String> = (1..=20).map(|o| format!("m{o}")).collect();
    assert_eq!(got, want, "committed messages survive the crash");
    assert_eq!(
        store.position(0).await.expect("position"),
        Some(Cursor::with_epoch(0, 20, 3))
    );
}
