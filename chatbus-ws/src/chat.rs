//! [`ChatHub`]: a [`Hub`] whose frames are protocol v1 JSON, plus presence tracking.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use chatbus_core::store::{MemoryStore, Store};
use chatbus_core::{
    Broker, Envelope, Frame, FrameEncoder, Hub, HubConfig, MessageId, Receipt, Room,
};
use serde::Serialize;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::access;
use crate::auth::Identity;
use crate::idempotency::{SendKeyConfig, SendKeys};
use crate::payload::{self, Payload};
use crate::presence::{Presence, PresenceConfig, DEFAULT_MEMBERS, MAX_MEMBERS};
use crate::protocol::{self, AsDisplay, ClientId};
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

/// A snapshot of the chat layer's counters, from [`ChatHub::stats`]. Totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChatStats {
    /// Envelopes from the broker whose payload was not a chatbus-ws payload (dropped).
    pub decode_errors: u64,
    /// Presence announcements (full lists and diffs) published by this instance.
    pub presence_published: u64,
}

/// The live counters behind [`ChatStats`], shared by the encoder and the presence task.
#[derive(Debug, Default)]
pub(crate) struct ChatCounters {
    decode_errors: AtomicU64,
    pub(crate) presence_published: AtomicU64,
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
    /// announced itself (including this one), sorted. An instance follows the announcements of a
    /// room only while it has members there; for any room, use
    /// [`online_everywhere`](Self::online_everywhere).
    pub fn online(&self, room: &Room) -> Vec<Arc<str>> {
        self.shared
            .presence
            .current(room, self.hub.local_members(room))
    }

    /// A page of who is online in `room` as this instance knows it (see [`online`](Self::online)):
    /// up to `limit` users after `after`, in order, and whether there may be more.
    pub fn members(&self, room: &Room, after: Option<&str>, limit: usize) -> (Vec<Arc<str>>, bool) {
        self.shared
            .presence
            .page(room, self.hub.local_members(room), after, limit)
    }

    /// The `members` answer of a client: a page of up to `limit` (default
    /// [`DEFAULT_MEMBERS`], clamped to 1…[`MAX_MEMBERS`]) after `after`, with `next` when there
    /// may be more.
    pub(crate) fn members_frame(
        &self,
        room: &Room,
        after: Option<&str>,
        limit: Option<u64>,
        cid: Option<&ClientId>,
    ) -> Bytes {
        let limit = limit.map_or(DEFAULT_MEMBERS, |l| {
            usize::try_from(l).unwrap_or(usize::MAX)
        });
        let (users, more) = self.members(room, after, limit.clamp(1, MAX_MEMBERS));
        let next = more.then(|| users.last().map(AsRef::as_ref)).flatten();
        protocol::members(room, &users, next, cid)
    }

    /// Who is online in `room` on every instance, whether or not this one has members there:
    /// with local members, what [`online`](Self::online) knows; otherwise this instance
    /// subscribes to the room for a moment, asks the others for their full lists (a presence
    /// "hello") and collects what arrives within
    /// [`PRESENCE_QUERY_WAIT`](crate::PRESENCE_QUERY_WAIT), sorted.
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
            Some(Payload::PresenceDiff(diff)) => {
                return self.presence.on_diff(&env.room, diff).map(Frame::new)
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
