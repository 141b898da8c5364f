//! The conformance suite every [`Store`] runs (feature `conformance`): what each event means,
//! held the same for the memory store and PostgreSQL.
//!
//! Each check uses fresh room and user names and a fresh epoch, so it can run against a shared
//! long-lived store (one PostgreSQL database).
//!
//! ```no_run
//! # async fn f() {
//! chatbus_core::conformance::store::run_all(&chatbus_core::store::MemoryStore::new()).await;
//! # }
//! ```

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{ctx, unique_room, CheckResult};
use crate::envelope::{Cursor, MessageId, Room};
use crate::store::{ChatEvent, ConversationKey, EventKind, Store, StoredMessage};

/// One log of events for one check: a fresh epoch, offsets counting up from 1.
struct Log {
    epoch: u32,
    partition: u32,
    next: u64,
    tag: String,
}

impl Log {
    fn new() -> Self {
        let id = MessageId::new().as_u128();
        Self {
            epoch: Cursor::new_epoch(),
            // A partition of its own, so position checks on a shared store do not collide.
            partition: (id as u32) & 0x7fff_ffff,
            next: 0,
            tag: format!("{:x}", (id >> 64) as u64),
        }
    }

    /// A user name unique to this check.
    fn user(&self, name: &str) -> Arc<str> {
        format!("{name}-{}", self.tag).into()
    }

    fn event(&mut self, room: &Room, from: &Arc<str>, ts: u64, kind: EventKind) -> ChatEvent {
        self.next += 1;
        ChatEvent {
            id: MessageId::new(),
            room: room.clone(),
            from: from.clone(),
            ts,
            cursor: Cursor::with_epoch(self.partition, self.next, self.epoch),
            kind,
        }
    }

    fn message(&mut self, room: &Room, from: &Arc<str>, ts: u64, body: &str) -> ChatEvent {
        let kind = EventKind::Message {
            name: None,
            body: body.into(),
            to: None,
        };
        self.event(room, from, ts, kind)
    }
}

async fn apply<S: Store + ?Sized>(s: &S, events: &[ChatEvent]) -> CheckResult {
    ctx(s.apply(events, None).await, "apply")
}

async fn newest<S: Store + ?Sized>(
    s: &S,
    room: &Room,
    viewer: &str,
    limit: usize,
) -> Result<Vec<StoredMessage>, String> {
    match ctx(s.page(room, viewer, None, limit).await, "page")? {
        Some(p) => Ok(p.messages),
        None => Err("page without `before` answered None".into()),
    }
}

fn bodies(page: &[StoredMessage]) -> Vec<Option<&str>> {
    page.iter().map(|m| m.body.as_deref()).collect()
}

fn expect<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> CheckResult {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

/// Messages are paged newest last, and applying a batch again (a projector replaying after a
/// crash) changes nothing.
pub async fn messages_paged_and_idempotent<S: Store + ?Sized>(s: &S) -> CheckResult {
    let mut log = Log::new();
    let room = unique_room("store-page");
    let alice = log.user("alice");
    let batch: Vec<ChatEvent> = (1..=3)
        .map(|i| log.message(&room, &alice, 100 + i, &format!("m{i}")))
        .collect();
    apply(s, &batch).await?;
    apply(s, &batch).await?;
    apply(s, &batch[1..2]).await?;
    let all = newest(s, &room, "x", 10).await?;
    expect(
        "bodies after applying twice",
        bodies(&all),
        vec![Some("m1"), Some("m2"), Some("m3")],
    )?;
    expect("first message's author", &*all[0].from, &*alice)?;
    expect("first message's cursor", all[0].cursor, batch[0].cursor)?;
    expect("first message's id", all[0].id, batch[0].id)?;
    let last_two = ctx(s.page(&room, "x", None, 2).await, "page")?.ok_or("no page")?;
    expect(
        "newest two",
        bodies(&last_two.messages),
        vec![Some("m2"), Some("m3")],
    )?;
    expect("more before the newest two", last_two.more, true)?;
    let older = ctx(s.page(&room, "x", Some(batch[1].cursor), 10).await, "page")?
        .ok_or("a page before a stored message answered None")?;
    expect("page before m2", bodies(&older.messages), vec![Some("m1")])?;
    expect("more before m1", older.more, false)?;
    let unknown = Cursor::with_epoch(log.partition, 999, log.epoch);
    expect(
        "a page before an unknown cursor",
        ctx(s.page(&room, "x", Some(unknown), 10).await, "page")?,
        None,
    )?;
    let got = ctx(s.message(&room, batch[2].id, "x").await, "message")?;
    expect(
        "message() body",
        got.and_then(|m| m.body),
        Some("m3".into()),
    )?;
    let other = unique_room("store-page-other");
    expect(
        "message() in another room",
        ctx(s.message(&other, batch[2].id, "x").await, "message")?,
        None,
    )
}

/// Edits and deletes count only from the author; a deleted message is a tombstone that no
/// edit brings back.
pub async fn edits_and_deletes_by_the_author_only<S: Store + ?Sized>(s: &S) -> CheckResult {
    let mut log = Log::new();
    let room = unique_room("store-edit");
    let (alice, bob) = (log.user("alice"), log.user("bob"));
    let m = log.message(&room, &alice, 10, "helo");
    let target = m.id;
    let edit = |body: &str| EventKind::Edit {
        target,
        body: body.into(),
    };
    let events = vec![
        m.clone(),
        log.event(&room, &bob, 11, edit("hacked")),
        log.event(&room, &alice, 12, edit("hello")),
    ];
    apply(s, &events).await?;
    let got = ctx(s.message(&room, target, "x").await, "message")?.ok_or("message gone")?;
    expect(
        "body after the author's edit",
        got.body.as_deref(),
        Some("hello"),
    )?;
    expect("edited marker", got.edited, Some(12))?;
    expect("deleted", got.deleted, false)?;
    let events = [
        log.event(&room, &bob, 13, EventKind::Delete { target }),
        log.event(&room, &alice, 14, EventKind::Delete { target }),
        log.event(&room, &alice, 15, edit("back")),
    ];
    apply(s, &events[..1]).await?;
    let got = ctx(s.message(&room, target, "x").await, "message")?.ok_or("message gone")?;
    expect(
        "body after another user's delete",
        got.body.as_deref(),
        Some("hello"),
    )?;
    apply(s, &events[1..]).await?;
    let page = newest(s, &room, "x", 10).await?;
    expect("tombstones in the page", page.len(), 1)?;
    expect("tombstone's body", page[0].body.as_deref(), None)?;
    expect("tombstone's marker", page[0].deleted, true)?;
    expect("tombstone's id", page[0].id, target)
}

/// Reactions are a set per (user, message, emoji): counted once however often they are sent,
/// with `me` for the viewer, removed when the last user takes theirs back.
pub async fn reactions_are_idempotent<S: Store + ?Sized>(s: &S) -> CheckResult {
    let mut log = Log::new();
    let room = unique_room("store-react");
    let (alice, bob) = (log.user("alice"), log.user("bob"));
    let m = log.message(&room, &alice, 10, "hi");
    let target = m.id;
    let react = |emoji: &str, on| EventKind::React {
        target,
        emoji: emoji.into(),
        on,
    };
    let events = vec![
        m.clone(),
        log.event(&room, &alice, 11, react("👍", true)),
        log.event(&room, &bob, 12, react("👍", true)),
        log.event(&room, &bob, 13, react("👍", true)),
        log.event(&room, &alice, 14, react("❤️", true)),
        log.event(&room, &bob, 15, react("🎉", false)),
    ];
    apply(s, &events).await?;
    let as_bob = ctx(s.message(&room, target, &bob).await, "message")?.ok_or("gone")?;
    let summary = |m: &StoredMessage| -> Vec<(String, u64, bool)> {
        m.reactions
            .iter()
            .map(|r| (r.emoji.to_string(), r.count, r.me))
            .collect()
    };
    expect(
        "reactions seen by bob",
        summary(&as_bob),
        vec![("👍".into(), 2, true), ("❤️".into(), 1, false)],
    )?;
    apply(s, &[log.event(&room, &alice, 16, react("❤️", false))]).await?;
    let page = newest(s, &room, &alice, 1).await?;
    expect(
        "reactions seen by alice after she took ❤️ back",
        summary(&page[0]),
        vec![("👍".into(), 2, true)],
    )
}

/// A read position only moves forward; unread counts others' messages after it that are not
/// deleted.
pub async fn read_positions_move_forward<S: Store + ?Sized>(s: &S) -> CheckResult {
    let mut log = Log::new();
    let room = unique_room("store-read");
    let (alice, bob) = (log.user("alice"), log.user("bob"));
    let msgs: Vec<ChatEvent> = (1..=5)
        .map(|i| log.message(&room, &alice, 100 + i, &format!("m{i}")))
        .collect();
    apply(s, &msgs).await?;
    let state = ctx(s.read_state(&room, &bob).await, "read_state")?;
    expect("bob's unread before reading", state.unread, 5)?;
    expect("bob's read cursor before reading", state.cursor, None)?;
    expect(
        "the author's own unread",
        ctx(s.read_state(&room, &alice).await, "read_state")?.unread,
        0,
    )?;
    let read = |c: Cursor| EventKind::Read { cursor: c };
    let events = vec![
        log.event(&room, &bob, 200, read(msgs[2].cursor)),
        log.event(&room, &bob, 201, read(msgs[1].cursor)),
    ];
    apply(s, &events).await?;
    let state = ctx(s.read_state(&room, &bob).await, "read_state")?;
    expect("bob's unread after reading m3 (then m2)", state.unread, 2)?;
    expect("bob's read cursor", state.cursor, Some(msgs[2].cursor))?;
    let del = log.event(&room, &alice, 202, EventKind::Delete { target: msgs[4].id });
    apply(s, &[del]).await?;
    expect(
        "bob's unread after m5 was deleted",
        ctx(s.read_state(&room, &bob).await, "read_state")?.unread,
        1,
    )?;
    // Read up to an event (not a message) after the newest message: nothing left unread.
    let last = log.cursor_now();
    apply(s, &[log.event(&room, &bob, 203, read(last))]).await?;
    let state = ctx(s.read_state(&room, &bob).await, "read_state")?;
    expect("bob's unread after reading everything", state.unread, 0)?;
    expect("bob's read cursor at the event", state.cursor, Some(last))
}

/// A user's conversations: rooms joined, rooms written in and direct conversations, newest
/// activity first, paged, each with its last message and unread count.
pub async fn conversations_newest_first<S: Store + ?Sized>(s: &S) -> CheckResult {
    let mut log = Log::new();
    let (me, carol, dave) = (log.user("me"), log.user("carol"), log.user("dave"));
    let joined = unique_room("store-conv-a");
    let wrote = unique_room("store-conv-b");
    let direct = unique_room("store-conv-c");
    ctx(s.join(&joined, &me, 1_000).await, "join")?;
    let events = vec![
        log.message(&wrote, &me, 2_000, "mine"),
        log.message(&wrote, &carol, 2_001, "reply"),
        log.event(
            &direct,
            &dave,
            3_000,
            EventKind::Message {
                name: None,
                body: "psst".into(),
                to: Some(me.clone()),
            },
        ),
    ];
    apply(s, &events).await?;
    // Joining again does not move a room.
    ctx(s.join(&joined, &me, 5_000).await, "join")?;
    let first = ctx(s.conversations(&me, None, 2).await, "conversations")?;
    let rooms = |p: &crate::store::ConversationPage| -> Vec<Room> {
        p.items.iter().map(|c| c.room.clone()).collect()
    };
    expect(
        "first page",
        rooms(&first),
        vec![direct.clone(), wrote.clone()],
    )?;
    expect("direct peer", first.items[0].with.as_deref(), Some(&*dave))?;
    expect("direct unread", first.items[0].unread, 1)?;
    expect(
        "direct last message",
        first.items[0].last.as_ref().and_then(|m| m.body.as_deref()),
        Some("psst"),
    )?;
    expect("room peer", first.items[1].with.as_deref(), None)?;
    expect("room unread (carol's reply)", first.items[1].unread, 1)?;
    expect("room activity", first.items[1].ts, 2_001)?;
    let next = first
        .next
        .clone()
        .ok_or("a first page of 2 of 3 without `next`")?;
    let key: ConversationKey = ctx(next.to_string().parse(), "parse the page key")?;
    expect("page key round trip", &key, &next)?;
    let second = ctx(s.conversations(&me, Some(&next), 2).await, "conversations")?;
    expect("second page", rooms(&second), vec![joined.clone()])?;
    expect("joined room's activity", second.items[0].ts, 1_000)?;
    expect("joined room's last", second.items[0].last.clone(), None)?;
    expect("end of the list", second.next, None)?;
    let daves = ctx(s.conversations(&dave, None, 10).await, "conversations")?;
    expect("the sender's list", rooms(&daves), vec![direct])?;
    expect(
        "the sender's peer",
        daves.items[0].with.as_deref(),
        Some(&*me),
    )
}

/// `apply` records the position it is given for its partition.
pub async fn positions_are_recorded<S: Store + ?Sized>(s: &S) -> CheckResult {
    let mut log = Log::new();
    let room = unique_room("store-pos");
    let alice = log.user("alice");
    expect(
        "position before any apply",
        ctx(s.position(log.partition).await, "position")?,
        None,
    )?;
    let m = log.message(&room, &alice, 1, "x");
    let at = m.cursor;
    ctx(s.apply(&[m], Some(at)).await, "apply")?;
    ctx(s.apply(&[], Some(log.cursor_now())).await, "apply")?;
    expect(
        "position after apply",
        ctx(s.position(log.partition).await, "position")?,
        Some(log.cursor_now()),
    )?;
    expect(
        "another partition",
        ctx(s.position(log.partition ^ 1).await, "position")?,
        None,
    )
}

impl Log {
    /// The cursor of the last event made.
    fn cursor_now(&self) -> Cursor {
        Cursor::with_epoch(self.partition, self.next, self.epoch)
    }
}

/// Every check by name.
pub fn checks<'a, S: Store + ?Sized>(s: &'a S) -> Vec<(&'static str, BoxFuture<'a, CheckResult>)> {
    vec![
        (
            "messages_paged_and_idempotent",
            messages_paged_and_idempotent(s).boxed(),
        ),
        (
            "edits_and_deletes_by_the_author_only",
            edits_and_deletes_by_the_author_only(s).boxed(),
        ),
        (
            "reactions_are_idempotent",
            reactions_are_idempotent(s).boxed(),
        ),
        (
            "read_positions_move_forward",
            read_positions_move_forward(s).boxed(),
        ),
        (
            "conversations_newest_first",
            conversations_newest_first(s).boxed(),
        ),
        ("positions_are_recorded", positions_are_recorded(s).boxed()),
    ]
}

/// Runs every check; panics with a report naming each failed check.
pub async fn run_all<S: Store + ?Sized>(s: &S) {
    let mut failed = Vec::new();
    for (name, check) in checks(s) {
        if let Err(reason) = check.await {
            failed.push(format!("  - {name}: {reason}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} store failed {} conformance check(s):\n{}",
        s.name(),
        failed.len(),
        failed.join("\n")
    );
}
