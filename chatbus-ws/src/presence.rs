//! Presence across instances: who is online in a room, as every instance sees it.
//!
//! Each instance knows its own connections per room and announces them as ephemeral envelopes
//! of the room (`payload.rs`):
//!
//! - a **full list** when it starts announcing a room (flagged `hello`: the others answer with
//!   their own full lists, so it learns the room at once), when asked by a `hello`, after a
//!   failed publish, and as every [`FULL_EVERY`]th heartbeat;
//! - otherwise a **diff** against its previous announcement of the room (`base` = that one's
//!   seq): the users added and removed, so a join to a room of thousands costs one name, not
//!   the list; a heartbeat with no change is an empty diff (a few dozen bytes);
//! - an empty full list when its last member leaves (the retraction).
//!
//! Every instance keeps, per room, each instance's list and one count per user of the
//! instances listing it, so a diff is applied in O(changes) and the frame for local members
//! (the first `max_listed` names in order and the total) costs O(`max_listed`). A diff whose
//! `base` is not the seq it holds for that instance means it missed an announcement: it keeps
//! what it has, and its own next announcement of the room is a `hello`, which brings every
//! instance's full list (at most once per interval per instance and room).
//!
//! Heartbeats are published concurrently (up to [`PUBLISH_CONCURRENCY`] in flight, which the
//! Redis broker pipelines on its one connection) instead of one awaited round trip per room.
//! The per-room views are sharded ([`SHARDS`] locks), so the encoder, which applies
//! announcements on the fan-out path, never waits on one lock for all rooms.
//!
//! Cost per instance, for L local rooms with M local memberships, per heartbeat interval: L
//! envelopes of ~60 bytes (empty diffs), plus M names every [`FULL_EVERY`] intervals, plus one
//! name per join or leave; on the receiving side the same per instance it hears from, and
//! nothing for rooms without local members (they are not subscribed).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chatbus_core::{Envelope, Hub, Interest, MessageId, Room};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::access;
use crate::chat::{lock, ChatCounters};
use crate::payload::{self, Diff, Payload, Snapshot};

mod config;
#[cfg(test)]
mod tests;
mod view;

pub use config::PresenceConfig;
use view::{InstanceView, RoomView};

/// How long [`ChatHub::online_everywhere`](crate::ChatHub::online_everywhere) collects the
/// other instances' answers for a room this instance has no members in (each answers within
/// its presence debounce, 25 ms by default, plus the broker's round trip).
pub const PRESENCE_QUERY_WAIT: Duration = Duration::from_millis(300);

/// Every this many heartbeats, an instance announces its full lists instead of empty diffs:
/// a receiver that missed a diff and could not ask (its own publishes failing) is repaired
/// within this many intervals.
pub(crate) const FULL_EVERY: u64 = 6;

/// Announcements in flight at once during a heartbeat.
pub(crate) const PUBLISH_CONCURRENCY: usize = 64;

/// Users per `members` page unless the client asks for fewer or more.
pub(crate) const DEFAULT_MEMBERS: usize = 100;
/// The most users one `members` page holds.
pub(crate) const MAX_MEMBERS: usize = 1000;

/// Locks the per-room views are spread over.
pub(crate) const SHARDS: usize = 16;

pub(crate) struct Presence {
    pub(crate) instance: u128,
    pub(crate) config: PresenceConfig,
    views: Box<[Mutex<HashMap<Room, RoomView>>]>,
    outbox: Mutex<Outbox>,
    wake: Notify,
}

impl fmt::Debug for Presence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Presence")
            .field("instance", &format_args!("{:032x}", self.instance))
            .finish_non_exhaustive()
    }
}

/// What this instance announces: touched by joins, leaves and the presence task, never by the
/// fan-out path (except for a `hello` or a missed diff, which ask for full lists).
#[derive(Default)]
struct Outbox {
    // Rooms to announce soon.
    dirty: HashSet<Room>,
    // Rooms whose next announcement must be a full list.
    full: HashSet<Room>,
    // Rooms whose next announcement must say hello (this instance missed a diff).
    hello: HashSet<Room>,
    // Rooms this instance has announced members in (and must retract), with what it announced.
    announced: HashMap<Room, Sent>,
    // When this instance last announced a large room (`PresenceConfig::large_room_debounce`).
    large_published: HashMap<Room, Instant>,
    seq: u64,
    beats: u64,
}

struct Sent {
    seq: u64,
    // Sorted.
    users: Vec<Arc<str>>,
}

impl Outbox {
    /// Takes the next seq for an announcement of `users` (sorted) in `room` and remembers it,
    /// the base of the next diff.
    fn record(&mut self, room: &Room, users: &[Arc<str>]) -> u64 {
        self.seq += 1;
        let sent = Sent {
            seq: self.seq,
            users: users.to_vec(),
        };
        self.announced.insert(room.clone(), sent);
        self.seq
    }
}

enum Announce {
    Full(Snapshot),
    Diff(Diff),
}

impl Presence {
    pub(crate) fn new(config: PresenceConfig) -> Self {
        Self {
            // Random and time-ordered: distinct per process start, so a restarted instance never
            // has its fresh announcements ignored as older than its previous life's.
            instance: MessageId::new().as_u128(),
            config,
            views: (0..SHARDS).map(|_| Mutex::default()).collect(),
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
        }
    }

    fn ttl(&self) -> Duration {
        self.config.interval.saturating_mul(3)
    }

    fn shard(&self, room: &Room) -> &Mutex<HashMap<Room, RoomView>> {
        let mut h = DefaultHasher::new();
        room.hash(&mut h);
        &self.views[(h.finish() % SHARDS as u64) as usize]
    }

    pub(crate) fn mark_dirty(&self, rooms: impl IntoIterator<Item = Room>) {
        let mut ob = lock(&self.outbox);
        let before = ob.dirty.len();
        ob.dirty.extend(rooms);
        let changed = ob.dirty.len() != before;
        drop(ob);
        if changed {
            self.wake.notify_one();
        }
    }

    /// Marks `room` for an announcement of the full list (with hello: asking the others for
    /// theirs).
    fn ask_full(&self, room: &Room, hello: bool) {
        let mut ob = lock(&self.outbox);
        ob.dirty.insert(room.clone());
        ob.full.insert(room.clone());
        if hello {
            ob.hello.insert(room.clone());
        }
        drop(ob);
        self.wake.notify_one();
    }

    /// Everyone online in `room`: what the others announced, and `local`, sorted.
    pub(crate) fn current(&self, room: &Room, local: Vec<Arc<str>>) -> Vec<Arc<str>> {
        let views = lock(self.shard(room));
        match views.get(room) {
            Some(view) => view.with(local),
            None => {
                drop(views);
                let mut local = local;
                local.sort_unstable();
                local
            }
        }
    }

    /// Up to `limit` users online in `room` after `after`, in order (what the others announced
    /// and `local`), and whether there may be more: a `members` page. O(local + limit).
    pub(crate) fn page(
        &self,
        room: &Room,
        mut local: Vec<Arc<str>>,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Arc<str>>, bool) {
        let beyond = |u: &Arc<str>| after.is_none_or(|a| &**u > a);
        local.retain(|u| beyond(u));
        local.sort_unstable();
        local.dedup();
        let views = lock(self.shard(room));
        let announced: Vec<Arc<str>> = match views.get(room) {
            Some(view) => {
                let from = match after {
                    Some(a) => view
                        .online
                        .range::<str, _>((Bound::Excluded(a), Bound::Unbounded)),
                    None => view.online.range::<str, _>(..),
                };
                from.take(limit + 1).map(|(u, _)| u.clone()).collect()
            }
            None => Vec::new(),
        };
        drop(views);
        let mut all = announced;
        all.extend(local.into_iter().take(limit + 1));
        all.sort_unstable();
        all.dedup();
        let more = all.len() > limit;
        all.truncate(limit);
        (all, more)
    }

    /// The last `presence` frame sent to the local members of `room`, if any.
    pub(crate) fn last_frame(&self, room: &Room) -> Option<Bytes> {
        lock(self.shard(room)).get(room)?.frame.clone()
    }

    /// A full list arrived through the broker; returns the frame for local members if the
    /// union changed.
    pub(crate) fn on_snapshot(&self, room: &Room, snap: Snapshot) -> Option<Bytes> {
        if snap.hello && snap.instance != self.instance {
            self.ask_full(room, false);
        }
        let now = Instant::now();
        let mut views = lock(self.shard(room));
        let view = views.entry(room.clone()).or_default();
        let mut changed = self.expire(view, now);
        let newer = view
            .instances
            .get(&snap.instance)
            .is_none_or(|v| v.seq < snap.seq);
        if newer {
            // An empty list is kept (not removed) so that its seq still rejects older ones
            // that arrive late; it expires with the others.
            changed |= view.replace(snap.instance, snap.seq, snap.users, now);
        }
        changed.then(|| view.render(room, self.config.max_listed))
    }

    /// A diff arrived through the broker; returns the frame for local members if the union
    /// changed. A diff that does not follow what this instance holds asks for full lists.
    pub(crate) fn on_diff(&self, room: &Room, diff: Diff) -> Option<Bytes> {
        let now = Instant::now();
        let interval = self.config.interval;
        let mut ask = false;
        let mut views = lock(self.shard(room));
        let view = views.entry(room.clone()).or_default();
        let mut changed = self.expire(view, now);
        let v = view
            .instances
            .entry(diff.instance)
            .or_insert_with(|| InstanceView {
                seq: 0,
                users: HashSet::new(),
                seen: now,
                asked: None,
            });
        if v.seq >= diff.seq {
            // Older than what we hold: late, or a copy.
        } else if v.seq == diff.base {
            v.seq = diff.seq;
            v.seen = now;
            v.asked = None;
            let (mut gone, mut came) = (Vec::new(), Vec::new());
            for u in diff.removed {
                if v.users.remove(&u) {
                    gone.push(u);
                }
            }
            for u in diff.added {
                if v.users.insert(u.clone()) {
                    came.push(u);
                }
            }
            for u in &gone {
                changed |= view.count(u, false);
            }
            for u in &came {
                changed |= view.count(u, true);
            }
        } else {
            // It missed an announcement of that instance: keep what it has (alive, so not
            // expired) and ask for full lists, once per interval.
            v.seen = now;
            if v.asked
                .is_none_or(|t| now.saturating_duration_since(t) >= interval)
            {
                v.asked = Some(now);
                ask = true;
            }
        }
        let frame = changed.then(|| view.render(room, self.config.max_listed));
        drop(views);
        if ask {
            self.ask_full(room, true);
        }
        frame
    }

    /// Forgets instances not heard from within three intervals (they died); true if the union
    /// changed.
    fn expire(&self, view: &mut RoomView, now: Instant) -> bool {
        let ttl = self.ttl();
        let dead: Vec<u128> = view
            .instances
            .iter()
            .filter(|(_, v)| now.saturating_duration_since(v.seen) >= ttl)
            .map(|(i, _)| *i)
            .collect();
        let mut changed = false;
        for i in dead {
            changed |= view.drop_instance(i);
        }
        changed
    }

    pub(crate) async fn run(
        self: Arc<Self>,
        hub: Hub,
        stats: Arc<ChatCounters>,
        stop: CancellationToken,
    ) {
        let mut next_beat = Instant::now() + self.config.interval;
        // When the earliest large room deferred by `large_room_debounce` is due.
        let mut deferred: Option<Instant> = None;
        loop {
            let far = Instant::now() + self.config.interval;
            let beat = tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {
                    tokio::time::sleep(self.config.debounce).await;
                    false
                }
                () = tokio::time::sleep_until(deferred.unwrap_or(far)), if deferred.is_some() => false,
                () = tokio::time::sleep_until(next_beat) => true,
            };
            deferred = None;
            let (rooms, full_due) = {
                let mut ob = lock(&self.outbox);
                let mut rooms: HashSet<Room> = ob.dirty.drain().collect();
                let mut full_due = false;
                if beat {
                    let live: HashSet<Room> = hub
                        .rooms()
                        .into_iter()
                        .filter(access::is_client_room)
                        .collect();
                    ob.large_published.retain(|r, _| live.contains(r));
                    rooms.extend(live.iter().cloned());
                    rooms.extend(ob.announced.keys().cloned());
                    ob.beats += 1;
                    full_due = ob.beats.is_multiple_of(FULL_EVERY);
                    next_beat = Instant::now() + self.config.interval;
                    drop(ob);
                    // Views of rooms without local members are not delivered to anyone.
                    for shard in self.views.iter() {
                        lock(shard).retain(|r, _| live.contains(r));
                    }
                }
                (rooms, full_due)
            };
            let mut ready = Vec::with_capacity(rooms.len());
            for room in rooms {
                if !beat {
                    if let Some(due) = self.defer_large(&hub, &room) {
                        deferred = Some(deferred.map_or(due, |d| d.min(due)));
                        continue;
                    }
                }
                if let Some(env) = self.announcement(&hub, room, beat, full_due) {
                    ready.push(env);
                }
            }
            let publishes = futures::stream::iter(ready)
                .map(|env| self.publish(&hub, &stats, env))
                .buffer_unordered(PUBLISH_CONCURRENCY);
            tokio::select! {
                () = stop.cancelled() => return,
                () = publishes.collect::<()>() => {}
            }
        }
    }

    /// For a large room (more local connections than `max_listed`) announced less than
    /// `large_room_debounce` ago: keeps it dirty and returns when it is due. `None`: announce
    /// now (and, for a large room, remember when).
    fn defer_large(&self, hub: &Hub, room: &Room) -> Option<Instant> {
        if hub.local_sessions(room) <= self.config.max_listed {
            return None;
        }
        let now = Instant::now();
        let mut ob = lock(&self.outbox);
        match ob.large_published.get(room) {
            Some(&last) if now < last + self.config.large_room_debounce => {
                ob.dirty.insert(room.clone());
                Some(last + self.config.large_room_debounce)
            }
            _ => {
                ob.large_published.insert(room.clone(), now);
                None
            }
        }
    }

    /// What to announce for `room` now, if anything: a full list or a diff against the last
    /// announcement (an empty diff on a heartbeat; nothing for a change that changed nothing).
    fn announcement(&self, hub: &Hub, room: Room, beat: bool, full_due: bool) -> Option<Envelope> {
        let mut users = hub.local_members(&room);
        users.sort_unstable();
        users.dedup();
        let mut ob = lock(&self.outbox);
        let hello = ob.hello.remove(&room);
        let full = ob.full.remove(&room) || full_due || hello;
        let announce = match ob.announced.get(&room) {
            None if users.is_empty() => {
                if !hello {
                    // Never announced: nothing to retract.
                    return None;
                }
                // It asked for full lists in a room it has nobody in: a hello listing nobody.
                ob.seq += 1;
                Announce::Full(Snapshot {
                    instance: self.instance,
                    seq: ob.seq,
                    hello: true,
                    users,
                })
            }
            None => {
                let seq = ob.record(&room, &users);
                Announce::Full(Snapshot {
                    instance: self.instance,
                    seq,
                    hello: true,
                    users,
                })
            }
            Some(_) if users.is_empty() => {
                ob.announced.remove(&room);
                ob.seq += 1;
                let retract = Announce::Full(Snapshot {
                    instance: self.instance,
                    seq: ob.seq,
                    hello,
                    users,
                });
                drop(ob);
                // Nobody here any more: this instance's view of the room serves no one.
                lock(self.shard(&room)).remove(&room);
                return Some(self.envelope(room, retract));
            }
            Some(sent) => {
                let (added, removed) = changes(&sent.users, &users);
                if !full && !beat && added.is_empty() && removed.is_empty() {
                    return None;
                }
                let base = sent.seq;
                let seq = ob.record(&room, &users);
                if full {
                    Announce::Full(Snapshot {
                        instance: self.instance,
                        seq,
                        hello,
                        users,
                    })
                } else {
                    Announce::Diff(Diff {
                        instance: self.instance,
                        seq,
                        base,
                        added,
                        removed,
                    })
                }
            }
        };
        drop(ob);
        Some(self.envelope(room, announce))
    }

    fn envelope(&self, room: Room, announce: Announce) -> Envelope {
        let bytes = match &announce {
            Announce::Full(s) => payload::presence(s),
            Announce::Diff(d) => payload::presence_diff(d),
        };
        Envelope::ephemeral(room, bytes)
    }

    async fn publish(&self, hub: &Hub, stats: &ChatCounters, env: Envelope) {
        match hub.publish(&env).await {
            Ok(_) => {
                stats.presence_published.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // The others will not see this seq: the next announcement is a full list,
                // which does not depend on it (at the next heartbeat at the latest).
                tracing::warn!(room = %env.room, error = %e, "presence publish failed");
                lock(&self.outbox).full.insert(env.room);
            }
        }
    }

    /// Asks every instance for its full list of `room` and unions what arrives in time (for a
    /// room without local members, whose announcements this instance does not follow).
    pub(crate) async fn query(
        &self,
        hub: &Hub,
        room: &Room,
    ) -> chatbus_core::Result<Vec<Arc<str>>> {
        // Subscribed before asking, so no answer can come before we listen.
        let mut sub = hub.broker().subscribe(Interest::room(room.clone())).await?;
        let seq = {
            let mut ob = lock(&self.outbox);
            ob.seq += 1;
            ob.seq
        };
        // An empty list that says hello: it lists nobody for this instance (true: it has no
        // members here) and makes every other instance announce its full list.
        let hello = Snapshot {
            instance: self.instance,
            seq,
            hello: true,
            users: Vec::new(),
        };
        hub.publish(&Envelope::ephemeral(
            room.clone(),
            payload::presence(&hello),
        ))
        .await?;
        let mut latest: HashMap<u128, (u64, Vec<Arc<str>>)> = HashMap::new();
        let deadline = Instant::now() + PRESENCE_QUERY_WAIT;
        while let Ok(Some(item)) = tokio::time::timeout_at(deadline, sub.next()).await {
            let Ok(env) = item else { continue };
            // Only full lists: a diff means nothing without the list it follows.
            if let Some(Payload::Presence(snap)) = payload::decode(&env.payload) {
                if snap.instance != self.instance
                    && latest
                        .get(&snap.instance)
                        .is_none_or(|(s, _)| *s < snap.seq)
                {
                    latest.insert(snap.instance, (snap.seq, snap.users));
                }
            }
        }
        let mut all: Vec<Arc<str>> = latest.into_values().flat_map(|(_, u)| u).collect();
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }
}

/// The users in `now` and not in `before`, and those in `before` and not in `now` (both
/// sorted).
fn changes(before: &[Arc<str>], now: &[Arc<str>]) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < before.len() || j < now.len() {
        match (before.get(i), now.get(j)) {
            (Some(b), Some(n)) if b == n => {
                i += 1;
                j += 1;
            }
            (Some(b), Some(n)) if b < n => {
                removed.push(b.clone());
                i += 1;
            }
            (Some(_), Some(n)) => {
                added.push(n.clone());
                j += 1;
            }
            (Some(b), None) => {
                removed.push(b.clone());
                i += 1;
            }
            (None, Some(n)) => {
                added.push(n.clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
    (added, removed)
}
