//! [`MemoryStore`]: chat state in process memory, the embedded default.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{
    ChatEvent, Claim, Conversation, ConversationKey, ConversationPage, EventKind, Reaction,
    ReadState, StatePage, Store, StoredMessage,
};
use crate::envelope::{Cursor, MessageId, Room};
use crate::Result;

/// Settings of a [`MemoryStore`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemoryStoreConfig {
    /// Messages kept per room, the newest; older ones are forgotten (with their reactions),
    /// so memory is bounded by rooms × this. Unread counts count within it. Default 1,000.
    pub max_messages_per_room: usize,
    /// Rooms kept. Past it, a new room evicts the one least recently active (its messages and
    /// read positions). Default 4,096, the memory broker's bound: with the default
    /// `max_messages_per_room`, at most about 4 million messages.
    pub max_rooms: usize,
    /// Rooms kept in one user's conversation list; past it, the entry least recently active
    /// is dropped. Default 1,000.
    pub max_conversations_per_user: usize,
}

impl Default for MemoryStoreConfig {
    fn default() -> Self {
        Self {
            max_messages_per_room: 1_000,
            max_rooms: 4_096,
            max_conversations_per_user: 1_000,
        }
    }
}

impl MemoryStoreConfig {
    /// Sets [`max_messages_per_room`](Self::max_messages_per_room) (at least 1).
    #[must_use]
    pub fn with_max_messages_per_room(mut self, n: usize) -> Self {
        self.max_messages_per_room = n.max(1);
        self
    }

    /// Sets [`max_rooms`](Self::max_rooms) (at least 1).
    #[must_use]
    pub fn with_max_rooms(mut self, n: usize) -> Self {
        self.max_rooms = n.max(1);
        self
    }

    /// Sets [`max_conversations_per_user`](Self::max_conversations_per_user) (at least 1).
    #[must_use]
    pub fn with_max_conversations_per_user(mut self, n: usize) -> Self {
        self.max_conversations_per_user = n.max(1);
        self
    }
}

/// A [`Store`] in process memory: no infrastructure, gone with the process.
///
/// One lock over all state: applying an event is a few hash operations, and the lock is never
/// held across an await.
///
/// ```
/// use chatbus_core::store::{ChatEvent, EventKind, MemoryStore, Store};
/// use chatbus_core::{Cursor, MessageId, Room};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> chatbus_core::Result<()> {
/// let store = MemoryStore::new();
/// let room = Room::new("general")?;
/// let id = MessageId::new();
/// let message = EventKind::Message { name: None, body: "hi".into(), to: None };
/// let event = ChatEvent { id, room: room.clone(), from: "alice".into(), ts: 1, cursor: Cursor::new(0, 1), kind: message };
/// store.apply(&[event], None).await?;
/// assert_eq!(store.read_state(&room, "bob").await?.unread, 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    rooms: HashMap<Room, RoomState>,
    /// Rooms by last activity (a logical clock), to evict the least recently active.
    by_activity: BTreeMap<u64, Room>,
    clock: u64,
    /// user → room → membership.
    members: HashMap<Arc<str>, HashMap<Room, Member>>,
    positions: HashMap<u32, Cursor>,
    config: MemoryStoreConfig,
}

#[derive(Debug, Default)]
struct RoomState {
    /// The clock of its last event, its key in `Inner::by_activity`.
    active: u64,
    /// Oldest first; `seq` increases by one from the front.
    messages: VecDeque<Msg>,
    next_seq: u64,
    by_id: HashMap<MessageId, u64>,
    reads: HashMap<Arc<str>, Read>,
}

#[derive(Debug)]
struct Msg {
    seq: u64,
    id: MessageId,
    from: Arc<str>,
    name: Option<Arc<str>>,
    to: Option<Arc<str>>,
    body: Option<Arc<str>>,
    ts: u64,
    cursor: Cursor,
    edited: Option<u64>,
    /// (emoji, users), in order of first use.
    reactions: Vec<(Arc<str>, Vec<Arc<str>>)>,
}

#[derive(Debug, Clone, Copy)]
struct Read {
    cursor: Cursor,
    /// The seq of the newest message at or before `cursor` (0: none).
    seq: u64,
}

#[derive(Debug, Clone)]
struct Member {
    since: u64,
    with: Option<Arc<str>>,
}

impl MemoryStore {
    /// A store with the default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store with these settings.
    pub fn with_config(config: MemoryStoreConfig) -> Self {
        Self {
            inner: Mutex::new(Inner {
                config,
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation completes between statements; a panic elsewhere must not poison the
        // store for every connection.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RoomState {
    fn get(&self, seq: u64) -> Option<&Msg> {
        let front = self.messages.front()?.seq;
        self.messages
            .get(usize::try_from(seq.checked_sub(front)?).ok()?)
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut Msg> {
        let front = self.messages.front()?.seq;
        self.messages
            .get_mut(usize::try_from(seq.checked_sub(front)?).ok()?)
    }

    fn by_id_mut(&mut self, id: MessageId) -> Option<&mut Msg> {
        let seq = *self.by_id.get(&id)?;
        self.get_mut(seq)
    }

    /// The seq of the newest message at or before `cursor` in its log, 0 if none.
    fn seq_at(&self, cursor: Cursor) -> u64 {
        self.messages
            .iter()
            .rev()
            .find(|m| m.cursor.is_at_or_before(&cursor))
            .map_or(0, |m| m.seq)
    }

    fn unread(&self, user: &str) -> u64 {
        let after = self.reads.get(user).map_or(0, |r| r.seq);
        self.messages
            .iter()
            .rev()
            .take_while(|m| m.seq > after)
            .filter(|m| m.body.is_some() && &*m.from != user)
            .count() as u64
    }
}

impl Msg {
    fn state(&self, room: &Room, viewer: &str) -> StoredMessage {
        StoredMessage {
            id: self.id,
            room: room.clone(),
            from: self.from.clone(),
            name: self.name.clone(),
            to: self.to.clone(),
            body: self.body.clone(),
            ts: self.ts,
            cursor: self.cursor,
            edited: self.edited,
            deleted: self.body.is_none(),
            reactions: if self.body.is_none() {
                Vec::new()
            } else {
                self.reactions
                    .iter()
                    .map(|(emoji, users)| Reaction {
                        emoji: emoji.clone(),
                        count: users.len() as u64,
                        me: users.iter().any(|u| &**u == viewer),
                    })
                    .collect()
            },
        }
    }
}

impl Inner {
    /// The state of `room`, created (evicting the least recently active room past `max`)
    /// if new, marked as the most recently active.
    fn room(&mut self, room: &Room, max: usize) -> &mut RoomState {
        self.clock += 1;
        let now = self.clock;
        if let Some(state) = self.rooms.get(room) {
            let was = state.active;
            self.by_activity.remove(&was);
        } else if self.rooms.len() >= max {
            if let Some((_, old)) = self.by_activity.pop_first() {
                self.rooms.remove(&old);
            }
        }
        self.by_activity.insert(now, room.clone());
        let state = self.rooms.entry(room.clone()).or_default();
        state.active = now;
        state
    }

    fn member(&mut self, user: &Arc<str>, room: &Room, since: u64, with: Option<&Arc<str>>) {
        let cap = self.config.max_conversations_per_user;
        let rooms = self.members.entry(user.clone()).or_default();
        if rooms.len() >= cap && !rooms.contains_key(room) {
            // Rare (a user in more rooms than the cap): one scan for the stalest entry.
            let stalest = rooms
                .iter()
                .map(|(r, m)| {
                    let ts = self
                        .rooms
                        .get(r)
                        .and_then(|s| s.messages.back())
                        .map_or(m.since, |l| l.ts);
                    (ts, r.clone())
                })
                .min();
            if let Some((_, r)) = stalest {
                rooms.remove(&r);
            }
        }
        let m = rooms
            .entry(room.clone())
            .or_insert_with(|| Member { since, with: None });
        if m.with.is_none() {
            m.with = with.cloned();
        }
    }

    fn apply(&mut self, e: &ChatEvent) {
        let max = self.config.max_messages_per_room;
        let max_rooms = self.config.max_rooms;
        let state = self.room(&e.room, max_rooms);
        match &e.kind {
            EventKind::Message { name, body, to } => {
                // Log order per room: a message at or before the newest one is a replay.
                if state.by_id.contains_key(&e.id)
                    || state.messages.back().is_some_and(|last| {
                        last.cursor.same_log(&e.cursor)
                            && last.cursor.partition == e.cursor.partition
                            && e.cursor.offset <= last.cursor.offset
                    })
                {
                    return;
                }
                state.next_seq += 1;
                let seq = state.next_seq;
                state.by_id.insert(e.id, seq);
                state.messages.push_back(Msg {
                    seq,
                    id: e.id,
                    from: e.from.clone(),
                    name: name.clone(),
                    to: to.clone(),
                    body: Some(body.clone()),
                    ts: e.ts,
                    cursor: e.cursor,
                    edited: None,
                    reactions: Vec::new(),
                });
                while state.messages.len() > max {
                    if let Some(old) = state.messages.pop_front() {
                        state.by_id.remove(&old.id);
                    }
                }
                let to = to.clone();
                self.member(&e.from, &e.room, e.ts, to.as_ref());
                if let Some(to) = &to {
                    self.member(to, &e.room, e.ts, Some(&e.from));
                }
            }
            EventKind::Edit { target, body } => {
                if let Some(m) = state.by_id_mut(*target) {
                    if m.from == e.from && m.body.is_some() {
                        m.body = Some(body.clone());
                        m.edited = Some(m.edited.map_or(e.ts, |t| t.max(e.ts)));
                    }
                }
            }
            EventKind::Delete { target } => {
                if let Some(m) = state.by_id_mut(*target) {
                    if m.from == e.from {
                        m.body = None;
                        m.reactions.clear();
                    }
                }
            }
            EventKind::React { target, emoji, on } => {
                if let Some(m) = state.by_id_mut(*target) {
                    if m.body.is_none() {
                        return;
                    }
                    let at = m.reactions.iter().position(|(em, _)| em == emoji);
                    match (at, on) {
                        (Some(i), true) => {
                            let users = &mut m.reactions[i].1;
                            if !users.contains(&e.from) {
                                users.push(e.from.clone());
                            }
                        }
                        (None, true) => m.reactions.push((emoji.clone(), vec![e.from.clone()])),
                        (Some(i), false) => {
                            m.reactions[i].1.retain(|u| *u != e.from);
                            if m.reactions[i].1.is_empty() {
                                m.reactions.remove(i);
                            }
                        }
                        (None, false) => {}
                    }
                }
            }
            EventKind::Read { cursor } => {
                let seq = state.seq_at(*cursor);
                let read = state.reads.entry(e.from.clone()).or_insert(Read {
                    cursor: *cursor,
                    seq,
                });
                // Forward only: past a newer message, or (an event after the same message)
                // further along the same log.
                let further = read.cursor.is_at_or_before(cursor) && read.cursor != *cursor;
                if seq > read.seq || (seq == read.seq && further) {
                    *read = Read {
                        cursor: *cursor,
                        seq,
                    };
                }
                self.member(&e.from, &e.room, e.ts, None);
            }
        }
    }
}

/// A memory store's claim: held as long as the process lives.
#[derive(Debug)]
struct Held;

impl Claim for Held {
    fn is_held(&self) -> bool {
        true
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn apply(&self, events: &[ChatEvent], position: Option<Cursor>) -> Result<()> {
        let mut inner = self.lock();
        for e in events {
            inner.apply(e);
        }
        if let Some(p) = position {
            inner.positions.insert(p.partition, p);
        }
        Ok(())
    }

    async fn position(&self, partition: u32) -> Result<Option<Cursor>> {
        Ok(self.lock().positions.get(&partition).copied())
    }

    async fn message(
        &self,
        room: &Room,
        id: MessageId,
        viewer: &str,
    ) -> Result<Option<StoredMessage>> {
        let inner = self.lock();
        let Some(state) = inner.rooms.get(room) else {
            return Ok(None);
        };
        Ok(state
            .by_id
            .get(&id)
            .and_then(|seq| state.get(*seq))
            .map(|m| m.state(room, viewer)))
    }

    async fn page(
        &self,
        room: &Room,
        viewer: &str,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<Option<StatePage>> {
        let inner = self.lock();
        let Some(state) = inner.rooms.get(room) else {
            // Nothing stored for the room: no message to page before, and an empty room
            // when asked for the newest.
            return Ok(before.is_none().then(StatePage::default));
        };
        let end = match before {
            None => state.messages.len(),
            Some(c) => match state.messages.iter().rposition(|m| m.cursor == c) {
                Some(i) => i,
                None => return Ok(None),
            },
        };
        let start = end.saturating_sub(limit);
        Ok(Some(StatePage {
            messages: state
                .messages
                .range(start..end)
                .map(|m| m.state(room, viewer))
                .collect(),
            more: start > 0,
        }))
    }

    async fn read_state(&self, room: &Room, user: &str) -> Result<ReadState> {
        let inner = self.lock();
        Ok(inner
            .rooms
            .get(room)
            .map_or_else(ReadState::default, |s| ReadState {
                cursor: s.reads.get(user).map(|r| r.cursor),
                unread: s.unread(user),
            }))
    }

    async fn join(&self, room: &Room, user: &str, ts: u64) -> Result<()> {
        self.lock().member(&Arc::from(user), room, ts, None);
        Ok(())
    }

    async fn claim(&self, partition: u32) -> Result<Option<Box<dyn Claim>>> {
        // One store per process: a second claim of a partition in the same store would be two
        // projectors of one process, which the projector never runs.
        let _ = partition;
        Ok(Some(Box::new(Held)))
    }

    async fn conversations(
        &self,
        user: &str,
        after: Option<&ConversationKey>,
        limit: usize,
    ) -> Result<ConversationPage> {
        let inner = self.lock();
        let Some(rooms) = inner.members.get(user) else {
            return Ok(ConversationPage::default());
        };
        let mut all: Vec<(ConversationKey, &Member)> = rooms
            .iter()
            .map(|(room, m)| {
                let last = inner.rooms.get(room).and_then(|s| s.messages.back());
                let ts = last.map_or(m.since, |l| l.ts);
                (
                    ConversationKey {
                        ts,
                        room: room.clone(),
                    },
                    m,
                )
            })
            .filter(|(k, _)| after.is_none_or(|a| k < a))
            .collect();
        all.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        let more = all.len() > limit;
        all.truncate(limit);
        let items: Vec<Conversation> = all
            .into_iter()
            .map(|(key, m)| {
                let state = inner.rooms.get(&key.room);
                Conversation {
                    last: state
                        .and_then(|s| s.messages.back())
                        .map(|l| l.state(&key.room, user)),
                    unread: state.map_or(0, |s| s.unread(user)),
                    with: m.with.clone(),
                    ts: key.ts,
                    room: key.room,
                }
            })
            .collect();
        let next = if more {
            items.last().map(Conversation::key)
        } else {
            None
        };
        Ok(ConversationPage { items, next })
    }
}
