//! Differential test: random logs applied to the MemoryStore and to PostgreSQL, in random
//! batches with replays, must answer every question the same way. The conformance suite pins
//! the rules one case at a time; this looks for the cases nobody wrote down (ties in the
//! conversation order, reactions taken back by the first user, reads of events, epoch 0).

use chatbus_testkit::rng::Rng;
use std::sync::Arc;

use chatbus_core::store::{ChatEvent, ConversationKey, EventKind, MemoryStore, Store};
use chatbus_core::{Cursor, MessageId, Room};
use chatbus_postgres::{PostgresConfig, PostgresStore};
use chatbus_testkit::postgres::Postgres;

struct Case {
    rooms: Vec<Room>,
    users: Vec<Arc<str>>,
    events: Vec<ChatEvent>,
    ids: Vec<(Room, MessageId)>,
}

fn generate(seed: u64, n: usize) -> Case {
    let mut rng = Rng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let tag = format!("p{seed}");
    let rooms: Vec<Room> = (0..3)
        .map(|i| Room::new(format!("parity.{tag}.{i}")).expect("room"))
        .collect();
    let users: Vec<Arc<str>> = (0..4).map(|i| format!("u{i}-{tag}").into()).collect();
    let emojis = ["👍", "❤️", "🎉"];
    let epoch = 1 + (seed as u32 % 1000);
    let partition = 100 + seed as u32;
    let mut events: Vec<ChatEvent> = Vec::new();
    let mut ids: Vec<(Room, MessageId)> = Vec::new();
    let mut offset = 0;
    for _ in 0..n {
        offset += 1;
        let room = rng.pick(&rooms).clone();
        let from = rng.pick(&users).clone();
        // Few distinct timestamps: ties in the conversation order are common.
        let ts = 1_000 + (offset / 3) * 10;
        let mine: Vec<MessageId> = ids
            .iter()
            .filter(|(r, _)| *r == room)
            .map(|(_, id)| *id)
            .collect();
        // Mostly the room's last few messages, so that reactions and edits pile up on one
        // message; now and then an unknown one.
        let target = if mine.is_empty() || rng.below(10) == 0 {
            MessageId::new()
        } else {
            *rng.pick(&mine[mine.len().saturating_sub(3)..])
        };
        // Odd seeds are reaction-heavy: several users on one emoji, taken back in any order.
        let roll = rng.below(10);
        let roll = if seed % 2 == 1 && roll < 5 {
            [0, 7, 8, 7, 8][roll]
        } else {
            roll
        };
        let kind = match roll {
            0..=4 => {
                let to = (rng.below(4) == 0).then(|| rng.pick(&users).clone());
                EventKind::Message {
                    name: (rng.below(3) == 0).then(|| "Name".into()),
                    body: format!("b{offset}").into(),
                    to,
                }
            }
            5 => EventKind::Edit {
                target,
                body: format!("e{offset}").into(),
            },
            6 => EventKind::Delete { target },
            7 | 8 => EventKind::React {
                target,
                emoji: (*rng.pick(&emojis)).into(),
                on: rng.below(3) != 0,
            },
            _ => {
                let back = rng.below(offset as usize) as u64;
                let ep = if rng.below(5) == 0 { 0 } else { epoch };
                EventKind::Read {
                    cursor: Cursor::with_epoch(partition, offset - back, ep),
                }
            }
        };
        let e = ChatEvent {
            id: MessageId::new(),
            room: room.clone(),
            from,
            ts,
            cursor: Cursor::with_epoch(partition, offset, epoch),
            kind,
        };
        if matches!(e.kind, EventKind::Message { .. }) {
            ids.push((room, e.id));
        }
        events.push(e);
    }
    Case {
        rooms,
        users,
        events,
        ids,
    }
}

/// Applies `events` in random batches, sometimes applying a batch twice or an older one
/// again, to both stores; joins now and then.
async fn apply_both(seed: u64, case: &Case, a: &dyn Store, b: &dyn Store) {
    let mut rng = Rng::new(seed ^ 0x5555);
    let mut at = 0;
    let mut batches: Vec<(usize, usize)> = Vec::new();
    while at < case.events.len() {
        let len = 1 + rng.below(40).min(case.events.len() - at - 1);
        batches.push((at, at + len));
        at += len;
        let (from, to) = if rng.below(4) == 0 {
            *rng.pick(&batches)
        } else {
            (at - len, at)
        };
        let batch = &case.events[from..to];
        for s in [a, b] {
            s.apply(batch, Some(batch[batch.len() - 1].cursor))
                .await
                .expect("apply");
            if to < at {
                // The replayed batch: then the current one again, as a projector would.
                s.apply(&case.events[at - len..at], None)
                    .await
                    .expect("apply");
            }
        }
        if rng.below(5) == 0 {
            let room = rng.pick(&case.rooms).clone();
            let user = rng.pick(&case.users).clone();
            for s in [a, b] {
                s.join(&room, &user, 1_000 + at as u64).await.expect("join");
            }
        }
    }
}

async fn compare(case: &Case, a: &dyn Store, b: &dyn Store, seed: u64) {
    let ctx = |what: String| format!("seed {seed}: {what}");
    for room in &case.rooms {
        for viewer in &case.users {
            for limit in [1, 3, 200] {
                let pa = a.page(room, viewer, None, limit).await.expect("page");
                let pb = b.page(room, viewer, None, limit).await.expect("page");
                assert_eq!(pa, pb, "{}", ctx(format!("page {room} {viewer} {limit}")));
            }
            assert_eq!(
                a.read_state(room, viewer).await.expect("read"),
                b.read_state(room, viewer).await.expect("read"),
                "{}",
                ctx(format!("read_state {room} {viewer}"))
            );
        }
        let all = a
            .page(room, "x", None, 1_000)
            .await
            .expect("page")
            .unwrap_or_default();
        for m in &all.messages {
            let pa = a.page(room, "x", Some(m.cursor), 2).await.expect("page");
            let pb = b.page(room, "x", Some(m.cursor), 2).await.expect("page");
            assert_eq!(
                pa,
                pb,
                "{}",
                ctx(format!("page {room} before {}", m.cursor))
            );
        }
    }
    for (room, id) in &case.ids {
        let viewer = &case.users[0];
        assert_eq!(
            a.message(room, *id, viewer).await.expect("message"),
            b.message(room, *id, viewer).await.expect("message"),
            "{}",
            ctx(format!("message {id}"))
        );
    }
    for user in &case.users {
        let mut after: Option<ConversationKey> = None;
        loop {
            let ca = a
                .conversations(user, after.as_ref(), 2)
                .await
                .expect("conversations");
            let cb = b
                .conversations(user, after.as_ref(), 2)
                .await
                .expect("conversations");
            assert_eq!(
                ca,
                cb,
                "{}",
                ctx(format!("conversations {user} after {after:?}"))
            );
            match ca.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
    }
}

#[tokio::test]
async fn random_logs_match_the_memory_store() {
    let pg = Postgres::start().await;
    let postgres = PostgresStore::connect(PostgresConfig::new(pg.url()))
        .await
        .expect("connect");
    for seed in 1..=12 {
        let memory = MemoryStore::new();
        let case = generate(seed, 300);
        apply_both(seed, &case, &memory, &postgres).await;
        compare(&case, &memory, &postgres, seed).await;
    }
}
