//! A server that accepts connections but answers nothing (SIGSTOP) makes calls fail with
//! `Timeout` within their budget, never hang; once it answers again, calls succeed.

use std::time::{Duration, Instant};

use chatbus_core::store::{ChatEvent, EventKind, Store};
use chatbus_core::{Cursor, Error, MessageId, Room};
use chatbus_postgres::{PostgresConfig, PostgresStore};
use chatbus_testkit::postgres::Postgres;

fn message(room: &Room, offset: u64) -> ChatEvent {
    ChatEvent {
        id: MessageId::new(),
        room: room.clone(),
        from: "alice".into(),
        ts: offset,
        cursor: Cursor::with_epoch(0, offset, 11),
        kind: EventKind::Message {
            name: None,
            body: "hi".into(),
            to: None,
        },
    }
}

/// A call that failed as a hung server makes it fail, in time.
fn timely(what: &str, start: Instant, limit: Duration, err: Option<Error>) {
    match err {
        Some(Error::Timeout { .. } | Error::Unavailable { .. }) => {}
        other => panic!("{what} on a hung server: want Timeout, got {other:?}"),
    }
    assert!(start.elapsed() < limit, "{what} took {:?}", start.elapsed());
}

#[tokio::test]
async fn a_hung_server_times_calls_out() {
    let mut pg = Postgres::start().await;
    let config = PostgresConfig::new(pg.url())
        .with_connect_timeout(Duration::from_millis(500))
        .with_statement_timeout(Duration::from_millis(500));
    let store = PostgresStore::connect(config).await.expect("connect");
    let room = Room::new("hang.room").expect("room");
    store
        .apply(&[message(&room, 1)], None)
        .await
        .expect("apply");

    pg.pause();
    // The budget is connect + statement timeout, 1 s; allow scheduling slack, not a hang.
    let limit = Duration::from_secs(3);
    let start = Instant::now();
    let page = store.page(&room, "bob", None, 10).await;
    timely("page", start, limit, page.err());
    let start = Instant::now();
    let apply = store.apply(&[message(&room, 2)], None).await;
    timely("apply", start, limit, apply.err());
    let start = Instant::now();
    let claim = store.claim(1).await;
    timely("claim", start, limit, claim.err());
    let start = Instant::now();
    let err = store.read_state(&room, "bob").await.expect_err("hung");
    assert!(
        matches!(err, Error::Timeout { .. }),
        "a hung server is a timeout: {err:?}"
    );
    assert!(
        start.elapsed() < limit,
        "read_state took {:?}",
        start.elapsed()
    );

    pg.resume();
    // Connections abandoned mid-call are replaced; within a few calls all is well again.
    let start = Instant::now();
    loop {
        match store.page(&room, "bob", None, 10).await {
            Ok(Some(p)) => {
                assert_eq!(
                    p.messages.len(),
                    1,
                    "the apply during the hang did not happen"
                );
                break;
            }
            other => assert!(
                start.elapsed() < Duration::from_secs(10),
                "calls still fail after the server resumed: {other:?}"
            ),
        }
    }
    store
        .apply(&[message(&room, 3)], None)
        .await
        .expect("apply after resume");
}
