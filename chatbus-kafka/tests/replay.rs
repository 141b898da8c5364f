//! Replay and history over a large log on a real Tansu: 10,000 messages over 20 rooms.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chatbus_core::backend::now_ms;
use chatbus_core::{Broker, BrokerExt, Cursor, Envelope, MessageId, ReplayFrom, Room};
use chatbus_testkit::tansu::Tansu;
use futures::StreamExt;

const ROOMS: usize = 20;
const MESSAGES: usize = 10_000;

#[derive(Clone)]
struct Sent {
    id: MessageId,
    ts: u64,
    cursor: Cursor,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_ten_thousand_messages_over_twenty_rooms() {
    let tansu = Tansu::start().await;
    let broker = common::connect(&tansu, "replay", 4).await;
    let rooms: Vec<Room> = (0..ROOMS)
        .map(|i| Room::new(format!("replay-{i}")).expect("valid room"))
        .collect();

    // Timestamps are set explicitly, one millisecond apart in creation order, an hour in the
    // past; with concurrent publishes they are not monotonic in the log, which replay by time
    // must handle.
    let base = now_ms() - 3_600_000;
    let started = Instant::now();
    let sent: Vec<(usize, Sent)> = futures::stream::iter(0..MESSAGES)
        .map(|i| {
            let broker = broker.clone();
            let room = rooms[i % ROOMS].clone();
            async move {
                let mut env = Envelope::new(room, format!("message {i} {}", "x".repeat(150)));
                env.ts = base + i as u64;
                let receipt = broker.publish(&env).await.expect("publish");
                let cursor = receipt.cursor.expect("durable cursor");
                (
                    i % ROOMS,
                    Sent {
                        id: env.id,
                        ts: env.ts,
                        cursor,
                    },
                )
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    eprintln!("published {MESSAGES} in {:?}", started.elapsed());

    // Each room's messages in log order (the order every reader sees).
    let mut by_room: HashMap<usize, Vec<Sent>> = HashMap::new();
    for (r, s) in sent {
        by_room.entry(r).or_default().push(s);
    }
    for list in by_room.values_mut() {
        list.sort_by_key(|s| s.cursor);
        assert!(
            list.windows(2).all(|w| w[0].cursor < w[1].cursor),
            "duplicate cursor"
        );
    }
    let ids = |v: &[Sent]| v.iter().map(|s| s.id).collect::<Vec<_>>();
    let got_ids = |v: &[Envelope]| v.iter().map(|e| e.id).collect::<Vec<_>>();

    let started = Instant::now();
    let room = &rooms[7];
    let expected = &by_room[&7];
    assert_eq!(expected.len(), MESSAGES / ROOMS);

    // From a mid cursor: exactly the later messages of that room, in order.
    let mid = expected.len() / 2;
    let later = broker
        .replay_vec(room, ReplayFrom::Cursor(expected[mid].cursor), usize::MAX)
        .await
        .expect("replay from cursor");
    assert_eq!(got_ids(&later), ids(&expected[mid + 1..]));
    assert!(later
        .iter()
        .zip(&expected[mid + 1..])
        .all(|(e, s)| e.cursor == Some(s.cursor)));
    assert!(later
        .iter()
        .all(|e| e.room == *room && e.payload.len() > 150));

    // Limit.
    let ten = broker
        .replay_vec(room, ReplayFrom::Cursor(expected[mid].cursor), 10)
        .await
        .expect("replay with limit");
    assert_eq!(got_ids(&ten), ids(&expected[mid + 1..mid + 11]));

    // From a time: the room's messages stamped at or after it, in log order.
    let t = base + (MESSAGES as u64) / 2;
    let since = broker
        .replay_vec(room, ReplayFrom::Time(t), usize::MAX)
        .await
        .expect("replay from time");
    let want: Vec<MessageId> = expected
        .iter()
        .filter(|s| s.ts >= t)
        .map(|s| s.id)
        .collect();
    assert_eq!(want.len(), MESSAGES / ROOMS / 2);
    assert_eq!(got_ids(&since), want);

    // From the beginning, every room: all of its messages and nothing else.
    for (i, r) in rooms.iter().enumerate() {
        let all = broker
            .replay_vec(r, ReplayFrom::Beginning, usize::MAX)
            .await
            .expect("replay all");
        assert_eq!(got_ids(&all), ids(&by_room[&i]), "room {r}");
    }

    // History pages backwards from a cursor, and from the end.
    let page = broker
        .history(room, Some(expected[mid].cursor), 50)
        .await
        .expect("history")
        .messages;
    assert_eq!(got_ids(&page), ids(&expected[mid - 50..mid]));
    let newest = broker
        .history(room, None, 30)
        .await
        .expect("history")
        .messages;
    assert_eq!(got_ids(&newest), ids(&expected[expected.len() - 30..]));
    let oldest = broker
        .history(room, Some(expected[5].cursor), 50)
        .await
        .expect("history at the start");
    assert!(oldest.is_complete(), "reached the start of the partition");
    let oldest = oldest.messages;
    assert_eq!(got_ids(&oldest), ids(&expected[..5]));
    eprintln!("replays and history in {:?}", started.elapsed());

    // A cursor of another partition is refused, not misread.
    let other = rooms
        .iter()
        .find(|r| broker.partition_of(r) != broker.partition_of(room))
        .expect("rooms spread over partitions");
    let foreign = by_room[&rooms.iter().position(|r| r == other).expect("index")][0].cursor;
    assert!(matches!(
        broker.replay(room, ReplayFrom::Cursor(foreign), 10).await,
        Err(chatbus_core::Error::InvalidCursor(_))
    ));

    // Dropping a replay stream early stops it without blocking anything.
    let mut stream = broker
        .replay(room, ReplayFrom::Beginning, usize::MAX)
        .await
        .expect("replay");
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first item in time")
        .expect("some")
        .expect("ok");
    assert_eq!(first.id, expected[0].id);
    drop(stream);
}
