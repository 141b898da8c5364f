//! [`Subscribers`]: the set of local subscriptions of a broker, shared by the implementations.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::broker::{Interest, SendOutcome, Subscription, SubscriptionSender};
use crate::envelope::{Envelope, Room};
use crate::Error;

/// The local subscriptions of one broker, indexed by room so that dispatching a message touches
/// only the subscribers that want it.
///
/// A broker implementation reads its source (a socket, a log) once and calls
/// [`dispatch`](Self::dispatch) per message; each subscriber gets it through its own bounded
/// buffer, so a slow one lags alone (see [`SubscriptionSender`]). Dropping a `Subscription`
/// removes it here; [`Subscribers::rooms`] tells which rooms still have subscribers (for a
/// broker that subscribes upstream per room).
#[derive(Clone)]
pub struct Subscribers {
    registry: Arc<Mutex<Registry>>,
    capacity: usize,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    by_room: HashMap<Room, Vec<(u64, SubscriptionSender)>>,
    all: Vec<(u64, SubscriptionSender)>,
}

impl fmt::Debug for Subscribers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = lock(&self.registry);
        f.debug_struct("Subscribers")
            .field("rooms", &r.by_room.len())
            .field("all", &r.all.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

fn lock(m: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Unregister {
    registry: Weak<Mutex<Registry>>,
    id: u64,
    interest: Interest,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let mut r = lock(&registry);
        match &self.interest {
            Interest::All => r.all.retain(|(i, _)| *i != self.id),
            Interest::Rooms(rooms) => {
                for room in rooms {
                    if let Some(subs) = r.by_room.get_mut(room) {
                        subs.retain(|(i, _)| *i != self.id);
                        if subs.is_empty() {
                            r.by_room.remove(room);
                        }
                    }
                }
            }
        }
    }
}

impl Subscribers {
    /// An empty set whose subscriptions buffer `capacity` messages each.
    pub fn new(capacity: usize) -> Self {
        Self {
            registry: Arc::new(Mutex::new(Registry::default())),
            capacity,
        }
    }

    /// Adds a subscription; dropping it removes it.
    pub fn subscribe(&self, interest: Interest) -> Subscription {
        let (tx, sub) = Subscription::channel(self.capacity);
        let mut r = lock(&self.registry);
        r.next_id += 1;
        let id = r.next_id;
        match &interest {
            Interest::All => r.all.push((id, tx)),
            Interest::Rooms(rooms) => {
                for room in rooms {
                    r.by_room
                        .entry(room.clone())
                        .or_default()
                        .push((id, tx.clone()));
                }
            }
        }
        drop(r);
        sub.with_guard(Unregister {
            registry: Arc::downgrade(&self.registry),
            id,
            interest,
        })
    }

    /// Offers `envelope` to every subscriber of its room and every `Interest::All` subscriber,
    /// without waiting. Returns how many took it.
    pub fn dispatch(&self, envelope: &Envelope) -> usize {
        let r = lock(&self.registry);
        let mut sent = 0;
        for (_, tx) in r
            .by_room
            .get(&envelope.room)
            .into_iter()
            .flatten()
            .chain(r.all.iter())
        {
            // Closed means the subscription is being dropped right now; its guard removes it.
            if tx.send(envelope.clone()) == SendOutcome::Sent {
                sent += 1;
            }
        }
        sent
    }

    /// Sends an error to every subscriber (for example `Unavailable` on a lost connection, or
    /// `Lagged` when delivery resumes after a possible loss).
    pub fn broadcast_error(&self, make: impl Fn() -> Error) {
        let r = lock(&self.registry);
        for (_, tx) in r.by_room.values().flatten().chain(r.all.iter()) {
            let _: SendOutcome = tx.send_error(make());
        }
    }

    /// The rooms that have at least one room subscriber.
    pub fn rooms(&self) -> Vec<Room> {
        lock(&self.registry).by_room.keys().cloned().collect()
    }

    /// Whether any subscriber wants `room` (including `Interest::All` ones).
    pub fn wants(&self, room: &Room) -> bool {
        let r = lock(&self.registry);
        !r.all.is_empty() || r.by_room.contains_key(room)
    }

    /// Whether there is an `Interest::All` subscriber.
    pub fn has_all(&self) -> bool {
        !lock(&self.registry).all.is_empty()
    }

    /// Whether there is no subscriber at all.
    pub fn is_empty(&self) -> bool {
        let r = lock(&self.registry);
        r.all.is_empty() && r.by_room.is_empty()
    }
}
