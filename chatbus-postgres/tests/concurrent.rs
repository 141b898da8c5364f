//! Two projectors applying the same log at once (a claim lost and retaken, a rolling
//! deploy) produce the state one would: each message once, numbered without gaps.

use std::sync::Arc;

use chatbus_core::store::{ChatEvent, EventKind, MemoryStore, Store};
use chatbus_core::{Cursor, MessageId, Room};
use chatbus_postgres::{PostgresConfig, PostgresStore};
use chatbus_testkit::postgres::Postgres;

fn log(rooms: &[Room]) -> Vec<ChatEvent> {
    let mut events = Vec::new();
    let mut offset = 0;
    for i in 0..600u64 {
        offset += 1;
        let room = rooms[(i * 7 % rooms.len() as u64) as usize].clone();
        let from: Arc<str> = format!("u{}", i % 5).into();
        let kind = if i % 6 == 5 {
            EventKind::Read {
                cursor: Cursor::with_epoch(2, offset - 1, 5),
            }
        } else {
            EventKind::Message {
                name: None,
                body: format!("m{i}").into(),
                to: (i % 10 == 3).then(|| "peer".into()),
            }
        };
        events.push(ChatEvent {
            id: MessageId::new(),
            room,
            from,
            ts: 1_000 + i,
            cursor: Cursor::with_epoch(2, offset, 5),
            kind,
        });
    }
    events
}

#[tokio::test]
async fn two_appliers_of_one_log_apply_it_once() {
    let pg = Postgres::start().await;
    let config = PostgresConfig::new(pg.url());
    let a = PostgresStore::connect(config.clone())
        .await
        .expect("store A");
    let b = PostgresStore::connect(config).await.expect("store B");
    let rooms: Vec<Room> = (0..8)
        .map(|i| Room::new(format!("concurrent.{i}")).expect("room"))
        .collect();
    let events = log(&rooms);
    let memory = MemoryStore::new();
    memory.apply(&events, None).await.expect("memory");

    // Different batch sizes, so the two lock overlapping but different sets of rooms.
    tokio::join!(run(&a, &events, 37), run(&b, &events, 50));

    for room in &rooms {
        let want = memory
            .page(room, "u1", None, 1_000)
            .await
            .expect("memory page");
        let got = a.page(room, "u1", None, 1_000).await.expect("page");
        assert_eq!(got, want, "room {room}");
        for user in ["u0", "u1", "u2", "peer"] {
            assert_eq!(
                a.read_state(room, user).await.expect("read"),
                memory.read_state(room, user).await.expect("read"),
                "read state of {user} in {room}"
            );
        }
    }
    for user in ["u0", "u3", "peer"] {
        assert_eq!(
            a.conversations(user, None, 100)
                .await
                .expect("conversations"),
            memory
                .conversations(user, None, 100)
                .await
                .expect("conversations"),
            "{user}'s conversations"
        );
    }
}

async fn run(store: &PostgresStore, events: &[ChatEvent], size: usize) {
    for batch in events.chunks(size) {
        store
            .apply(batch, batch.last().map(|e| e.cursor))
            .await
            .expect("apply");
    }
}
