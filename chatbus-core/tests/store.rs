//! The memory store passes the store conformance suite.

use chatbus_core::store::{MemoryStore, MemoryStoreConfig, Store};

#[tokio::test]
async fn memory_store_conforms() {
    chatbus_core::conformance::store::run_all(&MemoryStore::new()).await;
}

#[tokio::test]
async fn memory_store_keeps_the_newest_messages_of_a_room() {
    use chatbus_core::store::{ChatEvent, EventKind};
    use chatbus_core::{Cursor, MessageId, Room};
    let store =
        MemoryStore::with_config(MemoryStoreConfig::default().with_max_messages_per_room(3));
    let room = Room::new("bounded").unwrap();
    let events: Vec<ChatEvent> = (1..=5)
        .map(|i| ChatEvent {
            id: MessageId::new(),
            room: room.clone(),
            from: "a".into(),
            ts: i,
            cursor: Cursor::new(0, i),
            kind: EventKind::Message {
                name: None,
                body: format!("m{i}").into(),
                to: None,
            },
        })
        .collect();
    store.apply(&events, None).await.unwrap();
    let page = store.page(&room, "b", None, 10).await.unwrap().unwrap();
    let bodies: Vec<_> = page
        .messages
        .iter()
        .filter_map(|m| m.body.as_deref())
        .collect();
    assert_eq!(bodies, ["m3", "m4", "m5"]);
    assert!(!page.more);
    assert_eq!(store.read_state(&room, "b").await.unwrap().unread, 3);
    // A replay of a forgotten message does not come back at the end.
    store.apply(&events[..1], None).await.unwrap();
    assert_eq!(
        store
            .page(&room, "b", None, 10)
            .await
            .unwrap()
            .unwrap()
            .messages
            .len(),
        3
    );
}

#[tokio::test]
async fn memory_store_evicts_the_least_recently_active_room_and_caps_conversations() {
    use chatbus_core::store::{ChatEvent, EventKind};
    use chatbus_core::{Cursor, MessageId, Room};
    let store = MemoryStore::with_config(
        MemoryStoreConfig::default()
            .with_max_rooms(2)
            .with_max_conversations_per_user(2),
    );
    let msg = |room: &str, i: u64| ChatEvent {
        id: MessageId::new(),
        room: Room::new(room).unwrap(),
        from: "a".into(),
        ts: i,
        cursor: Cursor::new(0, i),
        kind: EventKind::Message {
            name: None,
            body: "x".into(),
            to: None,
        },
    };
    store
        .apply(
            &[msg("one", 1), msg("two", 2), msg("one", 3), msg("three", 4)],
            None,
        )
        .await
        .unwrap();
    let has = |room: &str| {
        let store = &store;
        let room = Room::new(room).unwrap();
        async move {
            !store
                .page(&room, "b", None, 10)
                .await
                .unwrap()
                .unwrap()
                .messages
                .is_empty()
        }
    };
    assert!(
        has("one").await,
        "the room active most recently but one stays"
    );
    assert!(
        !has("two").await,
        "the least recently active room is evicted"
    );
    assert!(has("three").await);
    let convs = store.conversations("a", None, 10).await.unwrap();
    let rooms: Vec<&str> = convs.items.iter().map(|c| c.room.as_str()).collect();
    assert_eq!(rooms, ["three", "one"]);
}
