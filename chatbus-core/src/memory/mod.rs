//! [`MemoryBroker`]: the embedded default, no infrastructure needed.

mod tickets;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use crate::broker::{
    history_stream, Broker, Capabilities, Health, HistoryStream, Interest, Receipt, ReplayFrom,
    Subscription,
};
use crate::envelope::{Cursor, Envelope, Room};
use crate::subscribers::Subscribers;
use crate::Result;

/// Configuration of a [`MemoryBroker`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// Durable messages kept per room for `replay`/`history` (oldest evicted first).
    /// Default 1,024. 0 makes the broker a plain relay like Redis pub/sub: no history
    /// (`capabilities().replay` is false), no cursors assigned, messages keep the cursor they
    /// carry.
    pub history_len: usize,
    /// Rooms whose history is kept. Past it, publishing to a room that has none evicts the
    /// history of the *least recently published* room (replay and history of that room then
    /// return nothing, as for a room that never had messages). Without this bound a client
    /// that creates endless rooms, one message each, would grow the broker without limit:
    /// with it, the history holds at most `history_rooms × history_len` messages. Default
    /// 4,096 (with the default `history_len`, at most about 4 million messages; the rooms a
    /// single process serves at once are far fewer). At least 1.
    pub history_rooms: usize,
    /// Buffer of each subscription, in messages. Default 4,096.
    pub subscriber_capacity: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            history_len: 1024,
            history_rooms: 4096,
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

    /// Sets [`history_rooms`](Self::history_rooms) (at least 1).
    #[must_use]
    pub fn with_history_rooms(mut self, n: usize) -> Self {
        self.history_rooms = n.max(1);
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
///   within a room they increase but are not contiguous. Their [epoch](Cursor::epoch) is a
///   random number drawn per broker: a restarted process has a new log, and a cursor of the
///   old one is answered with `Error::CursorReset` instead of being taken as a position of the
///   new one.
/// - History is lost when the process exits (`capabilities().durable` is false) and holds the
///   last [`MemoryConfig::history_len`] durable messages of each of the
///   [`MemoryConfig::history_rooms`] most recently published rooms.
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
    // This broker's log: every cursor it assigns carries it.
    epoch: u32,
    state: Mutex<State>,
    subscribers: Subscribers,
    tickets: tickets::Counters,
}

#[derive(Debug, Default)]
struct State {
    seq: u64,
    history: HashMap<Room, RoomHistory>,
    /// The rooms of `history` by the `seq` of their last durable message, oldest first: the
    /// eviction order. Sequence numbers are unique, so each room has exactly one entry.
    by_last: BTreeMap<u64, Room>,
}

#[derive(Debug, Default)]
struct RoomHistory {
    /// The key of this room in [`State::by_last`].
    last: u64,
    messages: VecDeque<Envelope>,
}

impl State {
    /// Appends a durable message (its cursor already assigned from `seq`) to its room's
    /// history, evicting the oldest message of the room and, for a new room past
    /// `max_rooms`, the least recently published room.
    fn store(&mut self, env: &Envelope, max_len: usize, max_rooms: usize) {
        let seq = self.seq;
        if let Some(h) = self.history.get_mut(&env.room) {
            self.by_last.remove(&h.last);
        } else {
            while self.history.len() >= max_rooms {
                let Some((_, oldest)) = self.by_last.pop_first() else {
                    break;
                };
                self.history.remove(&oldest);
            }
        }
        let h = self.history.entry(env.room.clone()).or_default();
        h.last = seq;
        if h.messages.len() >= max_len {
            h.messages.pop_front();
        }
        h.messages.push_back(env.clone());
        self.by_last.insert(seq, env.room.clone());
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
                subscribers: Subscribers::new(config.subscriber_capacity),
                config,
                epoch: Cursor::new_epoch(),
                state: Mutex::new(State::default()),
                tickets: tickets::Counters::default(),
            }),
        }
    }

    fn check_history(&self, what: &'static str) -> Result<()> {
        if self.shared.config.history_len == 0 {
            return Err(crate::Error::Unsupported {
                backend: "memory",
                what,
            });
        }
        Ok(())
    }

    /// A cursor of another epoch (a broker before a restart), or past the last sequence number
    /// assigned, names nothing in this log.
    fn check_cursor(&self, c: Cursor) -> Result<()> {
        let mine = Cursor::with_epoch(0, 0, self.shared.epoch);
        let reason = if !c.same_log(&mine) {
            crate::ResetReason::OtherLog
        } else if c.offset > self.shared.lock().seq {
            crate::ResetReason::BeyondEnd
        } else {
            return Ok(());
        };
        Err(crate::Error::CursorReset { cursor: c, reason })
    }

    fn room_history(&self, room: &Room) -> Vec<Envelope> {
        let state = self.shared.lock();
        state
            .history
            .get(room)
            .map(|h| h.messages.iter().cloned().collect())
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
        let history_len = self.shared.config.history_len;
        if history_len == 0 {
            // A plain relay (like Redis pub/sub): the message keeps whatever cursor it carries,
            // which is what a DualBus fast path needs.
        } else if env.is_durable() {
            state.seq += 1;
            env.cursor = Some(Cursor::with_epoch(0, state.seq, self.shared.epoch));
        } else {
            env.cursor = None;
        }
        if env.is_durable() && history_len > 0 {
            state.store(&env, history_len, self.shared.config.history_rooms.max(1));
        }
        let receipt = Receipt {
            id: env.id,
            cursor: env.cursor,
        };
        // Dispatch under the state lock: every subscriber sees the sequence order.
        self.shared.subscribers.dispatch(&env);
        drop(state);
        Ok(receipt)
    }

    async fn subscribe(&self, interest: Interest) -> Result<Subscription> {
        // Under the state lock so that no publish falls between the start and the registration.
        let state = self.shared.lock();
        let sub = self.shared.subscribers.subscribe(interest);
        if self.shared.config.history_len == 0 {
            return Ok(sub);
        }
        Ok(sub.with_start(vec![Cursor::with_epoch(
            0,
            state.seq + 1,
            self.shared.epoch,
        )]))
    }

    async fn replay(&self, room: &Room, from: ReplayFrom, limit: usize) -> Result<HistoryStream> {
        self.check_history("replay")?;
        if let ReplayFrom::Cursor(c) = from {
            self.check_cursor(c)?;
        }
        let items: Vec<Envelope> = self
            .room_history(room)
            .into_iter()
            .filter(|e| match from {
                ReplayFrom::Beginning => true,
                ReplayFrom::Cursor(c) => e.cursor.is_some_and(|ec| ec.offset > c.offset),
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
    ) -> Result<crate::HistoryPage> {
        self.check_history("history")?;
        if let Some(c) = before {
            self.check_cursor(c)?;
        }
        let mut items: Vec<Envelope> = self
            .room_history(room)
            .into_iter()
            .filter(|e| match (before, e.cursor) {
                (Some(b), Some(c)) => c.offset < b.offset,
                (None, _) => true,
                (Some(_), None) => false,
            })
            .collect();
        let skip = items.len().saturating_sub(limit);
        items.drain(..skip);
        // The window is all there is: a page is always complete.
        Ok(crate::HistoryPage::complete(items))
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

    fn tickets(&self) -> Option<&dyn crate::Tickets> {
        Some(self)
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
            b.publish(&Envelope::new(room.clone(), format!("{i}")))
                .await?;
        }
        let all = b.replay_vec(&room, ReplayFrom::Beginning, 100).await?;
        let bodies: Vec<_> = all.iter().map(|e| e.payload.clone()).collect();
        assert_eq!(bodies, ["2", "3", "4"]);
        let page = b.history(&room, all[2].cursor, 1).await?.messages;
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].payload, "3");
        Ok(())
    }

    /// A client creating endless rooms cannot grow the history: past `history_rooms`, the
    /// least recently published room is forgotten (issue #11).
    #[tokio::test]
    async fn history_is_bounded_in_rooms_evicting_the_least_recently_published() -> Result<()> {
        let b = MemoryBroker::with_config(MemoryConfig::default().with_history_rooms(3));
        let rooms: Vec<Room> = (0..4)
            .map(|i| Room::new(format!("r{i}")))
            .collect::<Result<_>>()?;
        for room in &rooms[..3] {
            b.publish(&Envelope::new(room.clone(), "x")).await?;
        }
        // r0 is published again: r1 is now the least recently published.
        b.publish(&Envelope::new(rooms[0].clone(), "y")).await?;
        b.publish(&Envelope::new(rooms[3].clone(), "z")).await?;
        let kept = |room: &Room| b.room_history(room).len();
        assert_eq!(
            rooms.iter().map(kept).collect::<Vec<_>>(),
            [2, 0, 1, 1],
            "r1 evicted, r0 kept whole"
        );
        for i in 0..10_000 {
            b.publish(&Envelope::new(Room::new(format!("n{i}"))?, "x"))
                .await?;
        }
        let state = b.shared.lock();
        assert_eq!(state.history.len(), 3);
        assert_eq!(state.by_last.len(), 3);
        Ok(())
    }

    /// A cursor of another memory broker (this process before a restart) or beyond the last
    /// sequence number is refused with `CursorReset`, never read as a position of this log
    /// (issue #11 item 1).
    #[tokio::test]
    async fn cursors_of_another_log_or_beyond_the_end_are_reset() -> Result<()> {
        let room = Room::new("r")?;
        let before_restart = MemoryBroker::new();
        let old = before_restart
            .publish(&Envelope::new(room.clone(), "old"))
            .await?
            .cursor;
        let b = MemoryBroker::new();
        let mine = b.publish(&Envelope::new(room.clone(), "new")).await?.cursor;
        let (Some(old), Some(mine)) = (old, mine) else {
            panic!("durable messages get cursors");
        };
        assert_eq!(old.offset, mine.offset, "both logs start at 1");
        assert!(!old.same_log(&mine));
        let reset = |r: Result<HistoryStream>| match r {
            Err(crate::Error::CursorReset { reason, .. }) => Some(reason),
            _ => None,
        };
        assert_eq!(
            reset(b.replay(&room, ReplayFrom::Cursor(old), 10).await),
            Some(crate::ResetReason::OtherLog)
        );
        assert_eq!(
            reset(
                b.replay(
                    &room,
                    ReplayFrom::Cursor(Cursor::new(0, mine.offset + 1)),
                    10
                )
                .await
            ),
            Some(crate::ResetReason::BeyondEnd)
        );
        assert!(b
            .replay_vec(&room, ReplayFrom::Cursor(mine), 10)
            .await?
            .is_empty());
        assert_eq!(
            b.replay_vec(&room, ReplayFrom::Cursor(Cursor::new(0, 0)), 10)
                .await?
                .len(),
            1,
            "a cursor without an epoch still resumes"
        );
        Ok(())
    }

    #[tokio::test]
    async fn dropped_subscription_is_forgotten() -> Result<()> {
        let b = MemoryBroker::new();
        let room = Room::new("r")?;
        let sub = b.subscribe(Interest::room(room.clone())).await?;
        let all = b.subscribe(Interest::All).await?;
        assert_eq!(b.shared.subscribers.rooms(), vec![room]);
        drop((sub, all));
        assert!(b.shared.subscribers.is_empty());
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_relay_passes_conformance() {
        let relay = MemoryBroker::with_config(MemoryConfig::default().with_history_len(0));
        crate::conformance::run_all(&relay).await;
    }

    #[tokio::test]
    async fn memory_tickets_pass_conformance() {
        crate::conformance::tickets::run_all(&MemoryBroker::new()).await;
    }
}
