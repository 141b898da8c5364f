//! A batch that fails part-way leaves nothing behind: no events, no position.

use chatbus_core::store::{ChatEvent, EventKind, Store};
use chatbus_core::{Cursor, MessageId, Room};
use chatbus_postgres::{PostgresConfig, PostgresStore};
use chatbus_testkit::postgres::Postgres;

fn event(room: &Room, offset: u64, kind: EventKind) -> ChatEvent {
    ChatEvent {
        id: MessageId::new(),
        room: room.clone(),
        from: "alice".into(),
        ts: 1_000 + offset,
        cursor: Cursor::with_epoch(5, offset, 9),
        kind,
    }
}

fn message(room: &Room, offset: u64, body: &str) -> ChatEvent {
    let kind = EventKind::Message {
        name: None,
        body: body.into(),
        to: Some("bob".into()),
    };
    event(room, offset, kind)
}

#[tokio::test]
async fn a_failed_batch_applies_nothing() {
    let pg = Postgres::start().await;
    let store = PostgresStore::connect(PostgresConfig::new(pg.url()))
        .await
        .expect("connect");
    let room = Room::new("atomic.room").expect("room");
    let first = message(&room, 1, "one");
    // PostgreSQL text cannot hold U+0000: the reaction statement, sent after the messages'
    // insert in the same pipeline, fails on the server.
    let poison = event(
        &room,
        3,
        EventKind::React {
            target: first.id,
            emoji: "\u{0}".into(),
            on: true,
        },
    );
    let batch = vec![
        first.clone(),
        message(&room, 2, "two"),
        poison,
        message(&room, 4, "four"),
        event(
            &room,
            5,
            EventKind::Read {
                cursor: Cursor::with_epoch(5, 4, 9),
            },
        ),
    ];
    let err = store
        .apply(&batch, Some(Cursor::with_epoch(5, 5, 9)))
        .await
        .expect_err("a batch with a NUL emoji must fail");
    assert!(
        !err.is_transient(),
        "a refused value is not worth retrying: {err}"
    );

    assert_eq!(store.position(5).await.expect("position"), None);
    let page = store
        .page(&room, "bob", None, 10)
        .await
        .expect("page")
        .expect("a page");
    assert!(
        page.messages.is_empty(),
        "messages left: {:?}",
        page.messages
    );
    assert!(store
        .message(&room, first.id, "bob")
        .await
        .expect("message")
        .is_none());
    for user in ["alice", "bob"] {
        let convs = store
            .conversations(user, None, 10)
            .await
            .expect("conversations");
        assert!(convs.items.is_empty(), "{user}'s memberships left");
    }
    assert_eq!(
        store.read_state(&room, "alice").await.expect("read").cursor,
        None
    );

    // The same batch without the poison applies whole, numbered from the start.
    let good: Vec<ChatEvent> = batch
        .iter()
        .filter(|e| !matches!(e.kind, EventKind::React { .. }))
        .cloned()
        .collect();
    store
        .apply(&good, Some(Cursor::with_epoch(5, 5, 9)))
        .await
        .expect("apply");
    assert_eq!(
        store.position(5).await.expect("position"),
        Some(Cursor::with_epoch(5, 5, 9))
    );
    let page = store
        .page(&room, "bob", None, 10)
        .await
        .expect("page")
        .expect("a page");
    let bodies: Vec<_> = page.messages.iter().map(|m| m.body.as_deref()).collect();
    assert_eq!(bodies, vec![Some("one"), Some("two"), Some("four")]);
    assert_eq!(
        store.read_state(&room, "bob").await.expect("read").unread,
        3
    );
}
