//! Migrations are applied once per database, however many stores connect, even at once.

use chatbus_core::store::{ChatEvent, EventKind, Store};
use chatbus_core::{Cursor, MessageId, Room};
use chatbus_postgres::tokio_postgres::{self, NoTls};
use chatbus_postgres::{PostgresConfig, PostgresStore};
use chatbus_testkit::postgres::Postgres;

#[tokio::test]
async fn connecting_twice_applies_each_migration_once() {
    let pg = Postgres::start().await;
    let config = PostgresConfig::new(pg.url());
    // Two instances starting together race for the schema; the advisory lock makes one wait.
    let (a, b) = tokio::join!(
        PostgresStore::connect(config.clone()),
        PostgresStore::connect(config.clone())
    );
    let a = a.expect("first store");
    let _b = b.expect("second store");
    // And a restart of an instance finds everything in place.
    let c = PostgresStore::connect(config).await.expect("third store");

    let (client, connection) = tokio_postgres::connect(&pg.url(), NoTls)
        .await
        .expect("raw client");
    tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT version, count(*) FROM chatbus_migrations GROUP BY version ORDER BY version",
            &[],
        )
        .await
        .expect("migrations table");
    let versions: Vec<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(versions, vec![(1, 1)], "one row per migration version");

    // The schema works through either store.
    let room = Room::new("migrations.check").expect("room");
    let event = ChatEvent {
        id: MessageId::new(),
        room: room.clone(),
        from: "alice".into(),
        ts: 1,
        cursor: Cursor::with_epoch(0, 1, 7),
        kind: EventKind::Message {
            name: None,
            body: "hi".into(),
            to: None,
        },
    };
    a.apply(&[event], None).await.expect("apply");
    let page = c
        .page(&room, "bob", None, 10)
        .await
        .expect("page")
        .expect("a page");
    assert_eq!(page.messages.len(), 1);
}
