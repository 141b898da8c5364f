//! [`Subscribers`]: the registry of a broker's local subscriptions, indexed by room. Every
//! backend (memory, DualBus, Redis, Kafka) registers and dispatches through it, so the rules
//! of who gets what, and of cleaning up after a subscriber that went away, live in one place.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::broker::{Interest, SendOutcome, Subscription, SubscriptionSender};
use crate::envelope::{Cursor, Envelope, Room};
use crate::Error;

/// The local subscriptions of one broker, indexed by room so that dispatching a message touches
/// only the subscribers that want it.
///
/// A broker implementation reads its source (a socket, a log) once and dispatches each message
/// here; each subscriber gets it through its own bounded buffer, so a slow one lags alone (see
/// [`SubscriptionSender`]).
///
/// # Registering
///
/// - [`subscribe`](Self::subscribe): registered at once, receives whatever is dispatched from
///   then on.
/// - [`subscribe_from`](Self::subscribe_from): the same, with a start position per partition
///   of the broker's log; dispatches aimed [`at`](Target::at) an earlier position skip it.
/// - [`prepare`](Self::prepare) then [`Pending::activate`]: for a broker that must do
///   something upstream before the subscription may receive (Redis confirms its `SUBSCRIBE`,
///   then drains what was read before the confirmation).
///
/// # Leaving
///
/// Dropping a `Subscription` removes it at once, from whatever thread drops it; a dispatch
/// that finds a subscriber gone removes it too. A broker that subscribes upstream per room
/// learns when a room (or the `Interest::All` set) has no subscriber left through the callback
/// given to [`with_on_vacated`](Self::with_on_vacated), and checks [`has_room`](Self::has_room)
/// / [`has_all`](Self::has_all) at the time it acts.
///
/// # Locking
///
/// One mutex guards the registry. A broker that keeps its own state in step with it (a log
/// position, a sequence number) takes its own lock first and this one inside it, never the
/// other way round; the on-vacated callback runs after this lock is released.
#[derive(Clone)]
pub struct Subscribers {
    shared: Arc<Shared>,
    capacity: usize,
}

type OnVacated = Box<dyn Fn(Vacated) + Send + Sync>;

struct Shared {
    registry: Mutex<Registry>,
    // Outside the lock: preparing a subscription takes an id without locking.
    next_id: AtomicU64,
    on_vacated: Option<OnVacated>,
}

#[derive(Default)]
struct Registry {
    by_room: HashMap<Room, Vec<Entry>>,
    all: Vec<Entry>,
}

/// One subscription in one room (or in the `Interest::All` set): a subscription to several
/// rooms has an entry in each.
#[derive(Clone)]
struct Entry {
    id: u64,
    tx: SubscriptionSender,
    /// Per partition, the first position this subscription receives (`subscribe_from`).
    start: Option<Arc<[Cursor]>>,
}

impl Entry {
    fn wants(&self, at: Option<Cursor>) -> bool {
        let (Some(start), Some(at)) = (&self.start, at) else {
            return true;
        };
        // `start` is normally indexed by partition (`Subscription::start`); look it up by
        // partition number only when it is not.
        let first = match usize::try_from(at.partition)
            .ok()
            .and_then(|p| start.get(p))
        {
            Some(c) if c.partition == at.partition => Some(c),
            _ => start.iter().find(|c| c.partition == at.partition),
        };
        first.is_some_and(|c| at.offset >= c.offset)
    }
}

/// Rooms left without any local subscriber, as told to the callback of
/// [`Subscribers::with_on_vacated`].
///
/// A room may be reported more than once, and also when its last subscription left before it
/// was ever [activated](Pending::activate): a broker acts on the state at the time it acts
/// ([`Subscribers::has_room`]), not on the report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Vacated {
    /// Rooms that have no room subscriber any more.
    pub rooms: Vec<Room>,
    /// Whether the `Interest::All` set became empty.
    pub all: bool,
}

impl Vacated {
    /// Whether nothing was vacated.
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty() && !self.all
    }
}

/// Which local subscriptions a dispatch, or an error, is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    rooms: bool,
    all: bool,
    at: Option<Cursor>,
}

impl Target {
    /// The subscribers of the message's room and every `Interest::All` subscriber; for an
    /// error, every subscriber.
    pub const EVERYONE: Self = Self {
        rooms: true,
        all: true,
        at: None,
    };
    /// Room subscribers only: for a source that brings `Interest::All` its own copy of each
    /// message (Redis: a channel message, whose pattern twin goes to `ALL_SUBSCRIBERS`).
    pub const ROOM_SUBSCRIBERS: Self = Self {
        rooms: true,
        all: false,
        at: None,
    };
    /// `Interest::All` subscribers only.
    pub const ALL_SUBSCRIBERS: Self = Self {
        rooms: false,
        all: true,
        at: None,
    };

    /// Narrowed to the subscriptions that start at or before `at`, the log position of the
    /// message (whether or not the envelope carries it as a cursor: an ephemeral record has a
    /// position too). Subscriptions registered without a start are not affected.
    #[must_use]
    pub const fn at(self, at: Cursor) -> Self {
        Self {
            at: Some(at),
            ..self
        }
    }
}

/// What a dispatch did with one message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivered {
    /// Subscriptions that buffered it.
    pub sent: usize,
    /// Subscriptions whose buffer was full: dropped for them, and they will be told they lagged.
    pub dropped: usize,
}

impl fmt::Debug for Subscribers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = lock(&self.shared.registry);
        f.debug_struct("Subscribers")
            .field("rooms", &r.by_room.len())
            .field("all", &r.all.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    // The registry is plain data that stays consistent between statements: a panic elsewhere
    // while it was locked leaves nothing half-done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn notify(&self, vacated: Vacated) {
        if let Some(f) = &self.on_vacated {
            if !vacated.is_empty() {
                f(vacated);
            }
        }
    }
}

impl Registry {
    fn insert(&mut self, id: u64, interest: &Interest, entry: &Entry) {
        let entry = Entry {
            id,
            ..entry.clone()
        };
        match interest {
            Interest::All => self.all.push(entry),
            Interest::Rooms(rooms) => {
                for room in rooms {
                    // Most rooms have one subscriber per instance (the hub's).
                    crate::push_compact(
                        self.by_room.entry(room.clone()).or_default(),
                        entry.clone(),
                    );
                }
            }
        }
    }

    /// Removes subscription `id`; reports the rooms of `interest` that have no subscriber
    /// after it, whether or not it was registered in them.
    fn remove(&mut self, id: u64, interest: &Interest) -> Vacated {
        let mut vacated = Vacated::default();
        match interest {
            Interest::All => {
                self.all.retain(|e| e.id != id);
                vacated.all = self.all.is_empty();
            }
            Interest::Rooms(rooms) => {
                for room in rooms {
                    if let Some(list) = self.by_room.get_mut(room) {
                        list.retain(|e| e.id != id);
                        if !list.is_empty() {
                            continue;
                        }
                        self.by_room.remove(room);
                    }
                    vacated.rooms.push(room.clone());
                }
            }
        }
        vacated
    }

    /// Removes every subscriber that went away; reports what that vacated.
    fn prune(&mut self) -> Vacated {
        let mut vacated = Vacated::default();
        if !self.all.is_empty() {
            self.all.retain(|e| !e.tx.is_closed());
            vacated.all = self.all.is_empty();
        }
        self.by_room.retain(|room, list| {
            list.retain(|e| !e.tx.is_closed());
            if list.is_empty() {
                vacated.rooms.push(room.clone());
            }
            !list.is_empty()
        });
        vacated
    }

    fn targets<'a>(
        &'a self,
        room: Option<&Room>,
        target: Target,
    ) -> impl Iterator<Item = &'a Entry> + 'a {
        // One room's list for a message, every room's for an error; no allocation either way.
        let one: &[Entry] = match (target.rooms, room) {
            (true, Some(room)) => self.by_room.get(room).map_or(&[], |v| &v[..]),
            _ => &[],
        };
        let every = (target.rooms && room.is_none())
            .then(|| self.by_room.values().flatten())
            .into_iter()
            .flatten();
        let all: &[Entry] = if target.all { &self.all } else { &[] };
        one.iter()
            .chain(every)
            .chain(all)
            .filter(move |e| e.wants(target.at))
    }
}

/// Removes its subscription from the registry when the [`Subscription`] is dropped.
struct Unregister {
    shared: Weak<Shared>,
    id: u64,
    interest: Interest,
    // Set (under the lock) when this runs, so that a `Pending` not activated yet never is.
    cancelled: Arc<AtomicBool>,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut r = lock(&shared.registry);
        self.cancelled.store(true, Ordering::Release);
        let vacated = r.remove(self.id, &self.interest);
        drop(r);
        shared.notify(vacated);
    }
}

/// A subscription from [`Subscribers::prepare`] that receives nothing until it is
/// [activated](Self::activate).
pub struct Pending {
    shared: Weak<Shared>,
    id: u64,
    interest: Interest,
    entry: Entry,
    cancelled: Arc<AtomicBool>,
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending")
            .field("id", &self.id)
            .field("interest", &self.interest)
            .field("cancelled", &self.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// What it subscribes to.
    pub fn interest(&self) -> &Interest {
        &self.interest
    }

    /// Whether its `Subscription` was dropped already: activating it would do nothing.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) || self.entry.tx.is_closed()
    }

    /// Registers it: from now on dispatches reach it. Returns false, registering nothing, when
    /// its `Subscription` was dropped meanwhile (or the registry is gone).
    ///
    /// Whatever the race with a drop on another thread, a subscription never stays registered
    /// after its `Subscription` was dropped: both sides decide under the registry's lock.
    pub fn activate(self) -> bool {
        let Some(shared) = self.shared.upgrade() else {
            return false;
        };
        let mut r = lock(&shared.registry);
        if self.cancelled.load(Ordering::Acquire) || self.entry.tx.is_closed() {
            return false;
        }
        r.insert(self.id, &self.interest, &self.entry);
        true
    }
}

/// The registry locked for a run of dispatches (a batch of records read together): one lock
/// for all of them, and no subscription comes or goes in between. Subscribers found gone are
/// removed when it is dropped.
pub struct Batch<'a> {
    shared: &'a Shared,
    // Taken by `drop`, which must release the lock before calling the on-vacated callback.
    registry: Option<MutexGuard<'a, Registry>>,
    closed: bool,
}

impl fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

impl Batch<'_> {
    /// Offers `envelope` to the subscriptions of `target` (room ones: of the envelope's room)
    /// without waiting.
    pub fn dispatch(&mut self, envelope: &Envelope, target: Target) -> Delivered {
        let mut delivered = Delivered::default();
        let Some(r) = &self.registry else {
            return delivered;
        };
        for entry in r.targets(Some(&envelope.room), target) {
            match entry.tx.send(envelope.clone()) {
                SendOutcome::Sent => delivered.sent += 1,
                SendOutcome::Dropped => delivered.dropped += 1,
                // The subscription is being dropped right now; its guard removes it, and so
                // does this batch when it ends, should the guard not have run yet.
                SendOutcome::Closed => self.closed = true,
            }
        }
        delivered
    }

    /// Sends an error made by `make` to the subscriptions of `target` (room ones: of every
    /// room), without waiting. A subscription to several rooms gets it once per room.
    pub fn send_error(&mut self, target: Target, make: impl Fn() -> Error) {
        let Some(r) = &self.registry else {
            return;
        };
        for entry in r.targets(None, target) {
            if entry.tx.send_error(make()) == SendOutcome::Closed {
                self.closed = true;
            }
        }
    }
}

impl Batch<'_> {
    /// Like [`send_error`](Self::send_error), to the room subscriptions of the rooms that
    /// `in_scope` accepts only (and to the `Interest::All` ones of `target`, which span every
    /// room): for a fault that concerns some rooms, such as a gap in one partition of a log,
    /// so that only their subscribers resync.
    pub fn send_error_where(
        &mut self,
        target: Target,
        in_scope: impl Fn(&Room) -> bool,
        make: impl Fn() -> Error,
    ) {
        let Some(r) = &self.registry else {
            return;
        };
        let rooms = r
            .by_room
            .iter()
            .filter(|(room, _)| target.rooms && in_scope(room))
            .flat_map(|(_, list)| list.iter());
        let all = r.all.iter().filter(|_| target.all);
        for entry in rooms.chain(all).filter(|e| e.wants(target.at)) {
            if entry.tx.send_error(make()) == SendOutcome::Closed {
                self.closed = true;
            }
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        let Some(mut r) = self.registry.take() else {
            return;
        };
        if !self.closed {
            return;
        }
        let vacated = r.prune();
        drop(r);
        self.shared.notify(vacated);
    }
}

impl Subscribers {
    /// An empty registry whose subscriptions buffer `capacity` messages each.
    pub fn new(capacity: usize) -> Self {
        Self::build(capacity, None)
    }

    /// Like [`new`](Self::new), calling `on_vacated` whenever a room (or the `Interest::All`
    /// set) is left without subscribers, so that the broker can unsubscribe upstream.
    ///
    /// It runs on the thread that removed the last subscriber (often the one dropping a
    /// `Subscription`, possibly an async worker), outside the registry's lock: it must be
    /// quick and must not block, typically a message to the task that owns the upstream
    /// connection.
    pub fn with_on_vacated(
        capacity: usize,
        on_vacated: impl Fn(Vacated) + Send + Sync + 'static,
    ) -> Self {
        Self::build(capacity, Some(Box::new(on_vacated)))
    }

    fn build(capacity: usize, on_vacated: Option<OnVacated>) -> Self {
        Self {
            shared: Arc::new(Shared {
                registry: Mutex::new(Registry::default()),
                next_id: AtomicU64::new(1),
                on_vacated,
            }),
            capacity,
        }
    }

    /// Adds a subscription that receives every later dispatch; dropping it removes it.
    pub fn subscribe(&self, interest: Interest) -> Subscription {
        self.register(interest, None)
    }

    /// Adds a subscription that starts, per partition of the broker's log, at `start` (listed
    /// in partition order, as [`Subscription::start`] reports it): dispatches aimed
    /// [`at`](Target::at) an earlier position of a partition, or at a partition not in
    /// `start`, skip it. The subscription's `start()` is set to `start`.
    pub fn subscribe_from(&self, interest: Interest, start: Vec<Cursor>) -> Subscription {
        let first = Arc::from(&start[..]);
        self.register(interest, Some(first)).with_start(start)
    }

    fn register(&self, interest: Interest, start: Option<Arc<[Cursor]>>) -> Subscription {
        let (pending, sub) = self.prepare_with(interest, start);
        // Nobody else holds the subscription yet, so it cannot have been dropped.
        let _: bool = pending.activate();
        sub
    }

    /// A subscription that receives nothing until its [`Pending`] half is
    /// [activated](Pending::activate); dropping the `Subscription` (before or after) removes
    /// it. For a broker that must confirm something upstream first.
    pub fn prepare(&self, interest: Interest) -> (Pending, Subscription) {
        self.prepare_with(interest, None)
    }

    fn prepare_with(
        &self,
        interest: Interest,
        start: Option<Arc<[Cursor]>>,
    ) -> (Pending, Subscription) {
        let (tx, sub) = Subscription::channel(self.capacity);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let cancelled = Arc::new(AtomicBool::new(false));
        let shared = Arc::downgrade(&self.shared);
        let sub = sub.with_guard(Unregister {
            shared: shared.clone(),
            id,
            interest: interest.clone(),
            cancelled: cancelled.clone(),
        });
        let pending = Pending {
            shared,
            id,
            interest,
            entry: Entry { id, tx, start },
            cancelled,
        };
        (pending, sub)
    }

    /// Offers `envelope` to every subscriber of its room and every `Interest::All` subscriber,
    /// without waiting. Returns how many took it.
    pub fn dispatch(&self, envelope: &Envelope) -> usize {
        self.dispatch_to(envelope, Target::EVERYONE).sent
    }

    /// Offers `envelope` to the subscriptions of `target`, without waiting.
    pub fn dispatch_to(&self, envelope: &Envelope, target: Target) -> Delivered {
        self.batch().dispatch(envelope, target)
    }

    /// Locks the registry for several dispatches in a row (see [`Batch`]).
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            shared: &self.shared,
            registry: Some(lock(&self.shared.registry)),
            closed: false,
        }
    }

    /// Sends an error to every subscriber (for example `Unavailable` on a lost connection, or
    /// `Lagged` when delivery resumes after a possible loss).
    pub fn broadcast_error(&self, make: impl Fn() -> Error) {
        self.batch().send_error(Target::EVERYONE, make);
    }

    /// Sends an error to the subscribers of the rooms `in_scope` accepts, and to every
    /// `Interest::All` subscriber (see [`Batch::send_error_where`]).
    pub fn error_where(&self, in_scope: impl Fn(&Room) -> bool, make: impl Fn() -> Error) {
        self.batch()
            .send_error_where(Target::EVERYONE, in_scope, make);
    }

    /// Ends every subscription: their senders are dropped, so each `Subscription` yields
    /// `None` once drained. For a broker shutting down; the on-vacated callback is not called.
    pub fn clear(&self) {
        let mut r = lock(&self.shared.registry);
        let gone = (std::mem::take(&mut r.by_room), std::mem::take(&mut r.all));
        drop(r);
        drop(gone);
    }

    /// The rooms that have at least one room subscriber.
    pub fn rooms(&self) -> Vec<Room> {
        lock(&self.shared.registry)
            .by_room
            .keys()
            .cloned()
            .collect()
    }

    /// Whether `room` has a room subscriber (`Interest::All` ones not counted).
    pub fn has_room(&self, room: &Room) -> bool {
        lock(&self.shared.registry).by_room.contains_key(room)
    }

    /// Whether any subscriber wants `room` (including `Interest::All` ones).
    pub fn wants(&self, room: &Room) -> bool {
        let r = lock(&self.shared.registry);
        !r.all.is_empty() || r.by_room.contains_key(room)
    }

    /// Whether there is an `Interest::All` subscriber.
    pub fn has_all(&self) -> bool {
        !lock(&self.shared.registry).all.is_empty()
    }

    /// Whether there is no subscriber at all.
    pub fn is_empty(&self) -> bool {
        let r = lock(&self.shared.registry);
        r.all.is_empty() && r.by_room.is_empty()
    }

    /// Registrations, for metrics: one per room of a room subscription, one per
    /// `Interest::All` subscription.
    pub fn len(&self) -> usize {
        let r = lock(&self.shared.registry);
        r.all.len() + r.by_room.values().map(Vec::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests;
