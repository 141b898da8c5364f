//! [`ChatHub`]: a [`Hub`] whose frames are protocol v1 JSON, plus presence tracking.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use bytes::Bytes;
use chatbus_core::store::{MemoryStore, Store};
use chatbus_core::{
    Broker, Envelope, Frame, FrameEncoder, Hub, HubConfig, Interest, MessageId, Receipt, Room,
};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::access;
use crate::auth::Identity;
use crate::idempotency::{SendKeyConfig, SendKeys};
use crate::payload::{self, Payload, Snapshot};
use crate::protocol::{self, AsDisplay};
use crate::state::{frames, StoreFeed};
use crate::status::Users;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps that stay consistent between statements: a panic elsewhere must not poison
    // presence (or user status) for every connection.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// How long [`ChatHub::online_everywhere`] collects the other instances' answers for a room
/// this instance has no members in (each answers within its presence debounce, 25 ms by
/// default, plus the broker's round trip).
pub const PRESENCE_QUERY_WAIT: Duration = Duration::from_millis(300);

/// How presence (and user status) is shared between instances (see `docs/protocol.md`,
/// "Presence" and "User status").
///
/// Built from [`Default`] with the `with_*` setters, so fields can be added without breaking
/// callers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PresenceConfig {
    /// Each instance republishes its snapshot of every room it has members in this often, and
    /// forgets another instance's snapshot after three intervals without news (an instance that
    /// died). Watched users are probed this often too, and a user whose instance died goes
    /// offline for its watchers within three intervals. Default 10 s.
    pub interval: Duration,
    /// Joins and leaves within this window are announced together, so a burst of joins costs
    /// one snapshot per room. Default 25 ms.
    pub debounce: Duration,
    /// Names listed in a `presence` frame (the first in sorted order; `count` gives the
    /// total): every member gets the frame on every change, so an uncapped list would cost
    /// n × n names for a room of n. Default 200.
    pub max_listed: usize,
    /// In a room with more local connections than `max_listed`, this instance announces
    /// changes at most this often, instead of after each `debounce`: a burst of thousands of
    /// joins then costs every member about one `presence` frame per interval, not one per
    /// 25 ms (which was quadratic in the room's size). Default 1 s.
    pub large_room_debounce: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            debounce: Duration::from_millis(25),
            max_listed: 200,
            large_room_debounce: Duration::from_secs(1),
        }
    }
}

impl PresenceConfig {
    /// Sets [`interval`](Self::interval).
    #[must_use]
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Sets [`debounce`](Self::debounce).
    #[must_use]
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Sets [`max_listed`](Self::max_listed).
    #[must_use]
    pub fn with_max_listed(mut self, max_listed: usize) -> Self {
        self.max_listed = max_listed;
        self
    }

    /// Sets [`large_room_debounce`](Self::large_room_debounce).
    #[must_use]
    pub fn with_large_room_debounce(mut self, debounce: Duration) -> Self {
        self.large_room_debounce = debounce;
        self
    }
}

/// A snapshot of the chat layer's counters, from [`ChatHub::stats`]. Totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChatStats {
    /// Envelopes from the broker whose payload was not a chatbus-ws payload (dropped).
    pub decode_errors: u64,
    /// Presence snapshots published by this instance.
    pub presence_published: u64,
}

/// The live counters behind [`ChatStats`], shared by the encoder and the presence task.
#[derive(Debug, Default)]
struct ChatCounters {
    decode_errors: AtomicU64,
    presence_published: AtomicU64,
}

impl ChatCounters {
    fn snapshot(&self) -> ChatStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ChatStats {
            decode_errors: get(&self.decode_errors),
            presence_published: get(&self.presence_published),
        }
    }
}

/// A [`Hub`] that speaks protocol v1, with presence shared between instances.
///
/// Build one per process over the broker of your choice and hand it to
/// [`WsService`](crate::WsService). Cheap to clone.
///
/// ```
/// use std::sync::Arc;
/// use chatbus_core::MemoryBroker;
/// use chatbus_ws::ChatHub;
///
/// let chat = ChatHub::new(Arc::new(MemoryBroker::new()));
/// assert_eq!(chat.hub().broker().name(), "memory");
/// ```
#[derive(Clone)]
pub struct ChatHub {
    hub: Hub,
    shared: Arc<ChatShared>,
}

struct ChatShared {
    presence: Arc<Presence>,
    users: Arc<Users>,
    send_keys: Arc<SendKeys>,
    stats: Arc<ChatCounters>,
    task: OnceLock<()>,
    /// Chat state, and whether this hub feeds it from its broker's live stream (the default
    /// memory store) or something else does (a [`Projector`](crate::state::Projector)).
    store: RwLock<(Arc<dyn Store>, bool)>,
    feed: OnceLock<StoreFeed>,
    stop: CancellationToken,
    // Stops the presence task when the last clone of this ChatHub is dropped.
    _guard: DropGuard,
}

impl fmt::Debug for ChatHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatHub")
            .field("hub", &self.hub)
            .field(
                "instance",
                &format_args!("{:032x}", self.shared.presence.instance),
            )
            .finish_non_exhaustive()
    }
}

impl ChatHub {
    /// A chat hub over `broker` with default settings.
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Self::with_config(broker, HubConfig::default(), PresenceConfig::default())
    }

    /// A chat hub with a hub configuration (queues, slow-client policy) and presence settings.
    pub fn with_config(
        broker: Arc<dyn Broker>,
        hub_config: HubConfig,
        presence: PresenceConfig,
    ) -> Self {
        let stats = Arc::new(ChatCounters::default());
        let users = Arc::new(Users::new(presence.interval));
        let presence = Arc::new(Presence::new(presence));
        let send_keys = Arc::new(SendKeys::new(SendKeyConfig::default()));
        let encoder = ChatEncoder {
            presence: presence.clone(),
            users: users.clone(),
            send_keys: send_keys.clone(),
            stats: stats.clone(),
        };
        let hub = Hub::builder(broker)
            .encoder(Arc::new(encoder))
            .config(hub_config)
            .build();
        let stop = CancellationToken::new();
        Self {
            hub,
            shared: Arc::new(ChatShared {
                presence,
                users,
                send_keys,
                stats,
                task: OnceLock::new(),
                store: RwLock::new((Arc::new(MemoryStore::new()), true)),
                feed: OnceLock::new(),
                _guard: stop.clone().drop_guard(),
                stop,
            }),
        }
    }

    /// Sets how long and for how many messages this instance remembers the idempotency keys of
    /// sends (the `key` of a `send`; see `docs/protocol.md`). Default [`SendKeyConfig::default`]:
    /// 10 minutes, 100,000 keys.
    #[must_use]
    pub fn with_send_keys(self, config: SendKeyConfig) -> Self {
        self.shared.send_keys.configure(config);
        self
    }

    /// Keeps chat state (edits, deletes, reactions, read positions, conversations) in `store`,
    /// which something else feeds: a [`Projector`](crate::state::Projector) over the durable
    /// log, normally. Default: a [`MemoryStore`] this hub feeds itself
    /// ([`with_live_store`](Self::with_live_store)).
    #[must_use]
    pub fn with_store(self, store: Arc<dyn Store>) -> Self {
        *write(&self.shared.store) = (store, false);
        self
    }

    /// Keeps chat state in `store`, fed by this hub from its broker's live stream (a
    /// [`StoreFeed`], started with the hub's tasks): for a broker without a log. What the live
    /// stream misses (a lagging subscription, a broker outage) the store misses.
    #[must_use]
    pub fn with_live_store(self, store: Arc<dyn Store>) -> Self {
        *write(&self.shared.store) = (store, true);
        self
    }

    /// The chat state store.
    pub fn store(&self) -> Arc<dyn Store> {
        read(&self.shared.store).0.clone()
    }

    pub(crate) fn send_keys(&self) -> &Arc<SendKeys> {
        &self.shared.send_keys
    }

    /// The underlying hub.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// How presence is shared (as configured).
    pub fn presence_config(&self) -> &PresenceConfig {
        &self.shared.presence.config
    }

    /// A snapshot of the chat layer's counters (the hub's own are in [`Hub::stats`]).
    pub fn stats(&self) -> ChatStats {
        self.shared.stats.snapshot()
    }

    /// Who is online in `room` as this instance knows it: the members of every instance that
    /// announced itself (including this one), sorted. An instance follows the snapshots of a
    /// room only while it has members there; for any room, use
    /// [`online_everywhere`](Self::online_everywhere).
    pub fn online(&self, room: &Room) -> Vec<Arc<str>> {
        self.shared
            .presence
            .current(room, self.hub.local_members(room))
    }

    /// Who is online in `room` on every instance, whether or not this one has members there:
    /// with local members, what [`online`](Self::online) knows; otherwise this instance
    /// subscribes to the room for a moment, asks the others for their snapshots (a presence
    /// "hello") and collects what arrives within [`PRESENCE_QUERY_WAIT`], sorted.
    pub async fn online_everywhere(&self, room: &Room) -> chatbus_core::Result<Vec<Arc<str>>> {
        if !self.hub.local_members(room).is_empty() {
            return Ok(self.online(room));
        }
        self.shared.presence.query(&self.hub, room).await
    }

    /// Publishes a chat message to `room` as `from`, like a client `send` would (for bots and
    /// server-side announcements). Members of the room receive a `message` frame.
    pub async fn post(
        &self,
        room: Room,
        from: &Identity,
        body: &str,
    ) -> chatbus_core::Result<Receipt> {
        let env = Envelope::new(
            room,
            payload::message(from.display_name_if_different(), body),
        )
        .with_from(from.user.clone());
        self.hub.publish(&env).await
    }

    /// Starts the presence task once (needs a Tokio runtime, so it is not done in `new`).
    pub(crate) fn ensure_started(&self) {
        let (store, live) = read(&self.shared.store).clone();
        if live {
            self.shared
                .feed
                .get_or_init(|| StoreFeed::spawn(self.hub.broker().clone(), store));
        }
        self.shared.task.get_or_init(|| {
            let presence = self.shared.presence.clone();
            let hub = self.hub.clone();
            let stop = self.shared.stop.clone();
            let stats = self.shared.stats.clone();
            let users = self.shared.users.clone();
            tokio::spawn({
                let (hub, stop) = (hub.clone(), stop.clone());
                async move { users.run(hub, stop).await }
            });
            tokio::spawn(async move { presence.run(hub, stats, stop).await });
        });
    }

    /// Who is connected to this instance, and what watchers know of others.
    pub(crate) fn users(&self) -> &Users {
        &self.shared.users
    }

    /// The `presence` frame a member joining `room` is answered with: the room's current list,
    /// or in a large room (more local connections than `max_listed`) the last list sent to
    /// its members, which the next announcement brings up to date: recomputing the union per
    /// join would make a burst of joins quadratic.
    pub(crate) fn join_presence(&self, room: &Room) -> Bytes {
        let presence = &self.shared.presence;
        let max_listed = presence.config.max_listed;
        if self.hub.local_sessions(room) > max_listed {
            if let Some(frame) = presence.last_frame(room) {
                return frame;
            }
        }
        protocol::presence(room, &self.online(room), max_listed)
    }

    /// Presence of `rooms` changed on this instance (a join, a leave, a disconnect).
    pub(crate) fn presence_changed(&self, rooms: impl IntoIterator<Item = Room>) {
        // Personal and status channels are not rooms anyone sees the members of.
        self.shared
            .presence
            .mark_dirty(rooms.into_iter().filter(access::is_client_room));
    }
}

/// A `message` frame's fields: of the envelope itself, or of the conversation a direct
/// message copy stands for.
pub(crate) struct MessageOut<'a> {
    pub(crate) id: MessageId,
    pub(crate) room: &'a str,
    pub(crate) from: &'a str,
    pub(crate) to: Option<&'a str>,
    pub(crate) name: Option<&'a str>,
    pub(crate) body: &'a str,
    pub(crate) cursor: Option<chatbus_core::Cursor>,
}

/// The `message` frame of a chat message envelope (`ts` is the envelope's).
pub(crate) fn message_frame(env: &Envelope, m: &MessageOut<'_>) -> Bytes {
    frames::to_bytes(&frames::MessageState {
        ty: "message",
        room: m.room,
        id: AsDisplay(m.id),
        from: m.from,
        to: m.to,
        name: m.name,
        body: Some(m.body),
        ts: env.ts,
        cursor: m.cursor,
        edited: None,
        deleted: false,
        reactions: Vec::new(),
    })
}

/// The frame of a chat message (plain or direct) as it is in its own room.
fn own_message(env: &Envelope, to: Option<&str>, name: Option<&str>, body: &str) -> Option<Bytes> {
    Some(message_frame(
        env,
        &MessageOut {
            id: env.id,
            room: env.room.as_str(),
            from: env.from.as_deref()?,
            to,
            name,
            body,
            cursor: env.cursor,
        },
    ))
}

fn typing_frame(room: &Room, from: &str, name: Option<&str>) -> Bytes {
    #[derive(Serialize)]
    struct Out<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        room: &'a str,
        from: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<&'a str>,
    }
    Bytes::from(
        serde_json::to_vec(&Out {
            ty: "typing",
            room: room.as_str(),
            from,
            name,
        })
        .unwrap_or_default(),
    )
}

/// The message frame of a history envelope, or `None` for anything that is not a chat message.
pub(crate) fn history_item(env: &Envelope) -> Option<Bytes> {
    match payload::decode(&env.payload)? {
        Payload::Message { name, body } => own_message(env, None, name, body),
        Payload::Direct(d) if d.conv.is_none() => own_message(env, Some(d.to), d.name, d.body),
        _ => None,
    }
}

/// Turns chatbus-ws payloads into protocol v1 frames, once per message per instance; acts on
/// the control payloads of personal and status channels.
#[derive(Debug)]
struct ChatEncoder {
    presence: Arc<Presence>,
    users: Arc<Users>,
    send_keys: Arc<SendKeys>,
    stats: Arc<ChatCounters>,
}

impl FrameEncoder for ChatEncoder {
    fn encode(&self, env: &Envelope) -> Option<Frame> {
        let decoded = payload::decode(&env.payload);
        if let Some(p) = &decoded {
            // Every keyed message this instance sees, live or replayed, answers retries here
            // without a log search.
            self.send_keys.observe_envelope(env, p);
        }
        let frame = match decoded {
            Some(Payload::Message { name, body }) => {
                own_message(env, None, name, body).map(Frame::new)
            }
            Some(Payload::Direct(d)) => match d.conv {
                None => own_message(env, Some(d.to), d.name, d.body).map(Frame::new),
                // A copy in a personal channel: the conversation's frame, for the connections
                // that did not join the conversation (those get it from the room itself).
                Some(conv) => {
                    let conv = Room::new(conv).ok();
                    let cursor = d.cursor.and_then(|c| c.parse().ok());
                    match (conv, env.from.as_deref(), d.id) {
                        (Some(conv), Some(from), Some(id)) => {
                            let bytes = message_frame(
                                env,
                                &MessageOut {
                                    id: MessageId::from_u128(id),
                                    room: conv.as_str(),
                                    from,
                                    to: Some(d.to),
                                    name: d.name,
                                    body: d.body,
                                    cursor,
                                },
                            );
                            Some(Frame::new(bytes).skip_members_of(conv))
                        }
                        _ => None,
                    }
                }
            },
            Some(Payload::Typing { name }) => env.from.as_deref().map(|from| {
                // Typing is for the others: not echoed to any session of the typist.
                Frame::new(typing_frame(&env.room, from, name)).skip_sender()
            }),
            Some(Payload::Presence(snapshot)) => {
                return self
                    .presence
                    .on_snapshot(&env.room, snapshot)
                    .map(Frame::new)
            }
            Some(Payload::Status(status)) => return self.users.on_status(&status).map(Frame::new),
            Some(Payload::Probe { user }) => {
                self.users.on_probe(user);
                return None;
            }
            Some(Payload::Kick { user }) => {
                self.users.kick(user);
                return None;
            }
            Some(Payload::Edit { target, body }) => env.from.as_deref().map(|from| {
                let target = MessageId::from_u128(target);
                Frame::new(frames::target_event(
                    env,
                    "edit",
                    from,
                    target,
                    Some(body),
                    None,
                ))
            }),
            Some(Payload::Delete { target }) => env.from.as_deref().map(|from| {
                let target = MessageId::from_u128(target);
                Frame::new(frames::target_event(
                    env, "delete", from, target, None, None,
                ))
            }),
            Some(Payload::React { target, emoji, on }) => env.from.as_deref().map(|from| {
                let target = MessageId::from_u128(target);
                let reaction = Some((emoji, on));
                Frame::new(frames::target_event(
                    env, "reaction", from, target, None, reaction,
                ))
            }),
            Some(Payload::Read { cursor }) => env
                .from
                .as_deref()
                .map(|user| Frame::new(frames::read(env, user, cursor))),
            None => None,
        };
        if frame.is_none() {
            self.stats.decode_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(room = %env.room, id = %env.id, "dropped an envelope that is not a chatbus-ws payload");
        }
        frame
    }
}

/// Presence across instances: each instance publishes a snapshot of its local members of a room
/// (as an ephemeral envelope) whenever they change and periodically; every instance keeps the
/// latest snapshot per instance and tells its local members the union whenever it changes.
struct Presence {
    instance: u128,
    config: PresenceConfig,
    state: Mutex<PresenceState>,
    wake: Notify,
}

impl fmt::Debug for Presence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Presence")
            .field("instance", &format_args!("{:032x}", self.instance))
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct PresenceState {
    views: HashMap<Room, RoomView>,
    // Rooms whose snapshot must be published soon.
    dirty: HashSet<Room>,
    // Rooms this instance has published a non-empty snapshot for (and must retract).
    announced: HashSet<Room>,
    // When this instance last published a snapshot of a large room (see
    // `PresenceConfig::large_room_debounce`).
    large_published: HashMap<Room, Instant>,
    seq: u64,
}

#[derive(Default)]
struct RoomView {
    instances: HashMap<u128, InstanceView>,
    // The list last sent to local members, to send only changes, and its frame: what a member
    // joining a large room is answered with (computing the union per join would make a burst
    // of joins quadratic).
    emitted: Option<Vec<Arc<str>>>,
    frame: Option<Bytes>,
}

struct InstanceView {
    seq: u64,
    users: Vec<Arc<str>>,
    seen: Instant,
}

impl RoomView {
    fn union(&self, extra: Vec<Arc<str>>) -> Vec<Arc<str>> {
        let mut all = extra;
        for v in self.instances.values() {
            all.extend(v.users.iter().cloned());
        }
        all.sort_unstable();
        all.dedup();
        all
    }
}

impl Presence {
    fn new(config: PresenceConfig) -> Self {
        Self {
            // Random and time-ordered: distinct per process start, so a restarted instance never
            // has its fresh snapshots ignored as older than its previous life's.
            instance: MessageId::new().as_u128(),
            config,
            state: Mutex::new(PresenceState::default()),
            wake: Notify::new(),
        }
    }

    fn ttl(&self) -> Duration {
        self.config.interval.saturating_mul(3)
    }

    fn mark_dirty(&self, rooms: impl IntoIterator<Item = Room>) {
        let mut st = lock(&self.state);
        let before = st.dirty.len();
        st.dirty.extend(rooms);
        let changed = st.dirty.len() != before;
        drop(st);
        if changed {
            self.wake.notify_one();
        }
    }

    fn current(&self, room: &Room, local: Vec<Arc<str>>) -> Vec<Arc<str>> {
        let st = lock(&self.state);
        match st.views.get(room) {
            Some(view) => view.union(local),
            None => {
                drop(st);
                let mut local = local;
                local.sort_unstable();
                local
            }
        }
    }

    /// The last `presence` frame sent to the local members of `room`, if any.
    fn last_frame(&self, room: &Room) -> Option<Bytes> {
        lock(&self.state).views.get(room)?.frame.clone()
    }

    /// A snapshot arrived through the broker; returns the frame for local members if the union
    /// changed.
    fn on_snapshot(&self, room: &Room, snap: Snapshot) -> Option<Bytes> {
        let now = Instant::now();
        let ttl = self.ttl();
        let mut st = lock(&self.state);
        if snap.hello && snap.instance != self.instance && st.dirty.insert(room.clone()) {
            self.wake.notify_one();
        }
        let view = st.views.entry(room.clone()).or_default();
        if view
            .instances
            .get(&snap.instance)
            .is_some_and(|v| v.seq >= snap.seq)
        {
            return None;
        }
        // An empty snapshot is kept (not removed) so that its seq still rejects older ones that
        // arrive late; it expires with the others.
        view.instances.insert(
            snap.instance,
            InstanceView {
                seq: snap.seq,
                users: snap.users,
                seen: now,
            },
        );
        view.instances
            .retain(|_, v| now.saturating_duration_since(v.seen) < ttl);
        let online = view.union(Vec::new());
        if view.emitted.as_ref() == Some(&online) {
            return None;
        }
        let frame = protocol::presence(room, &online, self.config.max_listed);
        view.emitted = Some(online);
        view.frame = Some(frame.clone());
        Some(frame)
    }

    async fn run(self: Arc<Self>, hub: Hub, stats: Arc<ChatCounters>, stop: CancellationToken) {
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
            let rooms: Vec<Room> = {
                let mut st = lock(&self.state);
                let mut rooms: HashSet<Room> = st.dirty.drain().collect();
                if beat {
                    let live: HashSet<Room> = hub
                        .rooms()
                        .into_iter()
                        .filter(access::is_client_room)
                        .collect();
                    // Views of rooms without local members are not delivered to anyone.
                    st.views.retain(|r, _| live.contains(r));
                    st.large_published.retain(|r, _| live.contains(r));
                    rooms.extend(live);
                    rooms.extend(st.announced.iter().cloned());
                    next_beat = Instant::now() + self.config.interval;
                }
                rooms.into_iter().collect()
            };
            for room in rooms {
                if stop.is_cancelled() {
                    return;
                }
                if !beat {
                    if let Some(due) = self.defer_large(&hub, &room) {
                        deferred = Some(deferred.map_or(due, |d| d.min(due)));
                        continue;
                    }
                }
                self.publish(&hub, &stats, room).await;
            }
        }
    }

    /// For a large room (more local connections than `max_listed`) published less than
    /// `large_room_debounce` ago: keeps it dirty and returns when it is due. `None`: publish
    /// now (and, for a large room, remember when).
    fn defer_large(&self, hub: &Hub, room: &Room) -> Option<Instant> {
        if hub.local_sessions(room) <= self.config.max_listed {
            return None;
        }
        let now = Instant::now();
        let mut st = lock(&self.state);
        match st.large_published.get(room) {
            Some(&last) if now < last + self.config.large_room_debounce => {
                st.dirty.insert(room.clone());
                Some(last + self.config.large_room_debounce)
            }
            _ => {
                st.large_published.insert(room.clone(), now);
                None
            }
        }
    }

    /// Asks every instance for its snapshot of `room` and unions what arrives in time (for a
    /// room without local members, whose snapshots this instance does not follow).
    async fn query(&self, hub: &Hub, room: &Room) -> chatbus_core::Result<Vec<Arc<str>>> {
        // Subscribed before asking, so no answer can come before we listen.
        let mut sub = hub.broker().subscribe(Interest::room(room.clone())).await?;
        let seq = {
            let mut st = lock(&self.state);
            st.seq += 1;
            st.seq
        };
        // An empty snapshot that says hello: it lists nobody for this instance (true: it has
        // no members here) and makes every other instance publish its own.
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

    async fn publish(&self, hub: &Hub, stats: &ChatCounters, room: Room) {
        let mut users = hub.local_members(&room);
        users.sort_unstable();
        let (seq, hello) = {
            let mut st = lock(&self.state);
            let hello = if users.is_empty() {
                if !st.announced.remove(&room) {
                    // Never announced: nothing to retract.
                    return;
                }
                st.views.remove(&room);
                false
            } else {
                st.announced.insert(room.clone())
            };
            st.seq += 1;
            (st.seq, hello)
        };
        let snap = Snapshot {
            instance: self.instance,
            seq,
            hello,
            users,
        };
        let env = Envelope::ephemeral(room, payload::presence(&snap));
        match hub.publish(&env).await {
            Ok(_) => {
                stats.presence_published.fetch_add(1, Ordering::Relaxed);
            }
            // The next heartbeat republishes every announced room.
            Err(e) => tracing::warn!(room = %env.room, error = %e, "presence publish failed"),
        }
    }
}
