//! [`MemoryBroker`]: the embedded default, no infrastructure needed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_trait::async_trait;

use crate::broker::{
    history_stream, Broker, Capabilities, Health, HistoryStream, Interest, Receipt, ReplayFrom,
    SendOutcome, Subscription, SubscriptionSender,
};
use crate::envelope::{Cursor, Envelope, Room};
use crate::Result;

/// Configuration of a [`MemoryBroker`].
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Durable messages kept per room for `replay`/`history` (oldest evicted first).
    /// Default 1,024; 0 keeps none (then `replay` and `history` return nothing and
    /// `capabilities().replay` is false).
    pub history_len: usize,
    /// Buffer of each subscription, in messages. Default 4,096.
    pub subscriber_capacity: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            history_len: 1024,
            subscriber_capacity: 4096,
        }
    }
}

impl MemoryConfig {
    /// Sets [`history_len`](Self::history_len).
    #[must_use]
    pub fn with_history_len(mut self, n: usize) -> Self {
        self.history_len = n;
        self
    }

    /// Sets [`subscriber_capacity`](Self::subscriber_capacity).
    #[must_use]
    pub fn with_subscriber_capacity(mut self, n: usize) -> Self {
        self.subscriber_capacity = n;
        self
    }
}

/// An in-process broker: publish/subscribe between the tasks of one process, with a bounded
/// per-room history so that replay and resume work with no infrastructure.
///
/// - Cursors are `0-N` where `N` is one sequence over all rooms (like a one-partition log), so
///   within a room they increase but are not contiguous.
/// - History is lost when the process exits (`capabilities().durable` is false) and holds the
///   last [`MemoryConfig::history_len`] durable messages of each room.
/// - Delivery happens inside `publish`, so every subscriber sees one global order.
/// - Slow subscribers lose messages and get `Lagged` (see [`Broker::subscribe`]).
///
/// ```
/// use chatbus_core::{Broker, Envelope, Interest, MemoryBroker, Room};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> chatbus_core::Result<()> {
/// let broker = MemoryBroker::new();
/// let room = Room::new("general")?;
/// let mut sub = broker.subscribe(Interest::room(room.clone())).await?;
/// let receipt = broker.publish(&Envelope::new(room, "hi")).await?;
/// let got = sub.recv().await.expect("open")?;
/// assert_eq!(got.cursor, receipt.cursor);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: MemoryConfig,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    seq: u64,
    next_sub: u64,
    history: HashMap<Room, VecDeque<Envelope>>,
    // Indexed by room so a publish touches only the subscribers that want it.
    by_room: HashMap<Room, Vec<(u64, SubscriptionSender)>>,
    all: Vec<(u64, SubscriptionSender)>,
}

/// Removes a subscription from the broker when the `Subscription` is dropped.
struct Unsubscribe {
    shared: Weak<Shared>,
    id: u64,
    interest: Interest,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let mut state = shared.lock();
            state.remove(self.id, &self.interest);
        }
    }
}

impl State {
    fn remove(&mut self, id: u64, interest: &Interest) {
        match interest {
            Interest::All => self.all.retain(|(i, _)| *i != id),
            Interest::Rooms(rooms) => {
                for room in rooms {
                    if let Some(subs) = self.by_room.get_mut(room) {
                        subs.retain(|(i, _)| *i != id);
                        if subs.is_empty() {
                            self.by_room.remove(room);
                        }
                    }
                }
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than losing the broker, so recover from poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A broker with the default configuration.
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A broker with the given configuration.
    pub fn with_config(config: MemoryConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(State::default()),
            }),
        }
    }

    fn room_history(&self, room: &Room) -> Vec<Envelope> {
        let state = self.shared.lock();
        state
            .history
            .get(room)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, envelope: &Envelope) -> Result<Receipt> {
        let mut env = envelope.clone();
        let mut state = self.shared.lock();
        env.cursor = if env.is_durable() {
            state.seq += 1;
            Some(Cursor::new(0, state.seq))
        } else {
            None
        };
        let history_len = self.shared.config.history_len;
        if env.is_durable() && history_len > 0 {
            let h = state.history.entry(env.room.clone()).or_default();
            if h.len() >= history_len {
                h.pop_front();
            }
            h.push_back(env.clone());
        }
        let receipt = Receipt {
            id: env.id,
            cursor: env.cursor,
        };
        let subs = state
            .by_room
            .get(&env.room)
            .into_iter()
            .flatten()
            .chain(state.all.iter());
        for (_, tx) in subs {
            // A closed sender belongs to a subscription being dropped right now; its guard
            // removes it, so the outcome needs no handling here.
            let _: SendOutcome = tx.send(env.clone());
        }
        Ok(receipt)
    }

    async fn subscribe(&self, interest: Interest) -> Result<Subscription> {
        let (tx, sub) = Subscription::channel(self.shared.config.subscriber_capacity);
        let mut state = self.shared.lock();
        state.next_sub += 1;
        let id = state.next_sub;
        match &interest {
            Interest::All => state.all.push((id, tx)),
            Interest::Rooms(rooms) => {
                for room in rooms {
                    state
                        .by_room
                        .entry(room.clone())
                        .or_default()
                        .push((id, tx.clone()));
                }
            }
        }
        let start = Cursor::new(0, state.seq + 1);
        drop(state);
        Ok(sub.with_start(vec![start]).with_guard(Unsubscribe {
            shared: Arc::downgrade(&self.shared),
            id,
            interest,
        }))
    }

    async fn replay(&self, room: &Room, from: ReplayFrom, limit: usize) -> Result<HistoryStream> {
        let items: Vec<Envelope> = self
            .room_history(room)
            .into_iter()
            .filter(|e| match from {
                ReplayFrom::Beginning => true,
                ReplayFrom::Cursor(c) => e.cursor.is_some_and(|ec| ec > c),
                ReplayFrom::Time(ms) => e.ts >= ms,
            })
            .take(limit)
            .collect();
        Ok(history_stream(items))
    }

    async fn history(
        &self,
        room: &Room,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<Envelope>> {
        let mut items: Vec<Envelope> = self
            .room_history(room)
            .into_iter()
            .filter(|e| match (before, e.cursor) {
                (Some(b), Some(c)) => c < b,
                (None, _) => true,
                (Some(_), None) => false,
            })
            .collect();
        let skip = items.len().saturating_sub(limit);
        items.drain(..skip);
        Ok(items)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable: false,
            replay: self.shared.config.history_len > 0,
            room_order: true,
            interest_filtering: true,
        }
    }

    async fn health(&self) -> Health {
        Health::Healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BrokerExt;

    #[tokio::test]
    async fn history_is_bounded() -> Result<()> {
        let b = MemoryBroker::with_config(MemoryConfig::default().with_history_len(3));
        let room = Room::new("r")?;
        for i in 0..5 {
            b.publish(&Envelope::new(room.clone(), format!("{i}"))).await?;
        }
        let all = b.replay_vec(&room, ReplayFrom::Beginning, 100).await?;
        let bodies: Vec<_> = all.iter().map(|e| e.payload.clone()).collect();
        assert_eq!(bodies, ["2", "3", "4"]);
        let page = b.history(&room, all[2].cursor, 1).await?;
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].payload, "3");
        Ok(())
    }

    #[tokio::test]
    async fn dropped_subscription_is_forgotten() -> Result<()> {
        let b = MemoryBroker::new();
        let room = Room::new("r")?;
        let sub = b.subscribe(Interest::room(room.clone())).await?;
        let all = b.subscribe(Interest::All).await?;
        assert_eq!(b.shared.lock().by_room.len(), 1);
        drop((sub, all));
        let state = b.shared.lock();
        assert!(state.by_room.is_empty() && state.all.is_empty());
        Ok(())
    }
}

#[cfg(all(test, feature = "conformance"))]
mod conformance_tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_broker_passes_conformance() {
        crate::conformance::run_all(&MemoryBroker::new()).await;
    }
}
