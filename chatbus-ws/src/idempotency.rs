//! Idempotent sends: a `send` that carries a `key` is published at most once per user, room and
//! key within [`SendKeyConfig::window`] (default 10 minutes); a second `send`
//! with the same key (a client retrying because the `ack` was lost) is answered with the
//! original's `ack` (`"duplicate":true`, the original `id` and `cursor`) and publishes nothing.
//!
//! Where the original is found, cheapest first:
//! 1. **This instance's window** ([`SendKeys`]): every keyed message this instance published,
//!    is publishing (a retry that overtakes the original waits for it instead of racing it), or
//!    saw on the broker (live fan-out and catch-up replays of its rooms, and the direct-message
//!    copies of its users), for the window. So a retry on the same instance, or on any instance
//!    that has members in the room, needs no I/O.
//! 2. **The room's log**, for a send marked `"retry":true` that the window does not know: the
//!    messages of the room from the last window are read back (at most [`SCAN_LIMIT`]) and
//!    searched for the user's key. The durable log is the one place every instance's publishes
//!    meet, so this holds across instances and with the fast broker down (DualBus reads Kafka).
//!    Only retries pay it: a fresh send is one map lookup. A log that cannot be read answers
//!    `unavailable` (the client retries later), never a guess.
//!
//! The key travels inside the message (payload tag `I`, see `payload.rs`), so every instance
//! and every later reader of the log can recognise it.
//!
//! Memory: one entry per keyed message seen in the window, about 200 bytes plus the key
//! (`ENTRY_BYTES`; the room and the user are shared with the strings the server holds already),
//! at most [`SendKeyConfig::capacity`] entries (default 100,000: about 20 MiB). Past the capacity the oldest entries leave early; retries
//! marked `retry` still find them in the log.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chatbus_core::{Cursor, Envelope, Error, MessageId, Receipt, ReplayFrom, Room};
use futures::StreamExt;
use tokio::sync::watch;

use crate::payload::{self, Payload};

/// The most messages one log search reads (in pages of [`SCAN_PAGE`]) before it gives up and
/// the send is published as new: a room with more messages than this within the window is
/// searched only this far back from the window's start. 20,000 messages in 10 minutes is 33
/// per second in one room, sustained.
pub const SCAN_LIMIT: usize = 20_000;
const SCAN_PAGE: usize = 1_000;

/// Bytes one window entry takes, for the documented memory cost: the map slot (key `Slot`,
/// value `Entry`, hash-table control byte and load factor), the expiry queue's copy of the slot,
/// and the string headers; the key's bytes come on top.
#[cfg(test)]
const ENTRY_BYTES: usize = 200;

/// How long, and for how many messages, an instance remembers the idempotency keys of sends
/// ([`ChatHub::with_send_keys`](crate::ChatHub::with_send_keys)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendKeyConfig {
    /// A retry with the same key within this long of the original is answered with the
    /// original. Default 10 minutes.
    pub window: Duration,
    /// The most keys one instance holds (about 200 bytes each plus the key); past it the
    /// oldest leave before the window ends (a `retry` then still finds them in the log).
    /// Default 100,000.
    pub capacity: usize,
}

impl Default for SendKeyConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(600),
            capacity: 100_000,
        }
    }
}

impl SendKeyConfig {
    /// A configuration with this window and capacity.
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self { window, capacity }
    }
}

/// A client's idempotency key, as parsed from a `send`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SendKey {
    pub(crate) key: Arc<str>,
    /// The client says it is re-sending a key whose `ack` it did not get: look in the log too.
    pub(crate) retry: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Slot {
    room: Room,
    user: Arc<str>,
    key: Arc<str>,
}

#[derive(Debug)]
enum Entry {
    /// Being published by this instance; retries wait for the outcome.
    Pending(watch::Receiver<Option<Receipt>>),
    Done(Receipt),
}

#[derive(Debug, Default)]
struct State {
    config: SendKeyConfig,
    map: HashMap<Slot, (Instant, Entry)>,
    // Insertion order, for expiry and the capacity bound. An entry replaced later keeps its
    // first place here; the pop checks the time to tell.
    order: VecDeque<(Instant, Slot)>,
}

/// What [`SendKeys::claim`] found.
#[derive(Debug)]
pub(crate) enum Claim {
    /// Not seen: the caller publishes, then completes (or drops) the guard.
    Fresh(Guard),
    /// Published already: answer with this.
    Known(Receipt),
}

/// The window of keys this instance knows (see the module docs).
#[derive(Debug)]
pub(crate) struct SendKeys {
    state: Mutex<State>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state is a cache whose every update is one insert or remove; a panic elsewhere
    // cannot leave it half-updated, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SendKeys {
    pub(crate) fn new(config: SendKeyConfig) -> Self {
        let keys = Self {
            state: Mutex::default(),
        };
        keys.configure(config);
        keys
    }

    pub(crate) fn configure(&self, config: SendKeyConfig) {
        let mut st = lock(&self.state);
        st.config = SendKeyConfig {
            capacity: config.capacity.max(1),
            ..config
        };
        self.expire(&mut st, Instant::now(), 0);
    }

    pub(crate) fn window(&self) -> Duration {
        lock(&self.state).config.window
    }

    /// Entries held now.
    pub(crate) fn len(&self) -> usize {
        lock(&self.state).map.len()
    }

    /// Drops what is older than the window, and the oldest until `room` more fit.
    fn expire(&self, st: &mut State, now: Instant, room: usize) {
        let SendKeyConfig { window, capacity } = st.config;
        while let Some((at, _)) = st.order.front() {
            let old = now.saturating_duration_since(*at) >= window;
            if !old && st.order.len() + room <= capacity {
                break;
            }
            let Some((at, slot)) = st.order.pop_front() else {
                break;
            };
            // A pending entry is never dropped (its publisher still completes it); anything
            // else goes only if this queue item is the one that inserted it.
            if let Some((t, entry)) = st.map.get(&slot) {
                if *t == at && !matches!(entry, Entry::Pending(_)) {
                    st.map.remove(&slot);
                }
            }
        }
    }

    /// Looks `key` up for `user` in `room`. A key being published right now (by this instance)
    /// is waited for: its receipt if that publish succeeds, else the caller may publish.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        room: &Room,
        user: &Arc<str>,
        key: &Arc<str>,
    ) -> Claim {
        let slot = Slot {
            room: room.clone(),
            user: user.clone(),
            key: key.clone(),
        };
        loop {
            let mut waiting = {
                let now = Instant::now();
                let mut st = lock(&self.state);
                self.expire(&mut st, now, 1);
                match st.map.get(&slot) {
                    Some((_, Entry::Done(r))) => return Claim::Known(*r),
                    Some((_, Entry::Pending(rx))) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        st.map.insert(slot.clone(), (now, Entry::Pending(rx)));
                        st.order.push_back((now, slot.clone()));
                        return Claim::Fresh(Guard {
                            keys: self.clone(),
                            slot: Some(slot),
                            tx,
                        });
                    }
                }
            };
            // The original is in flight: its outcome decides. `Err` = its publisher gave up
            // (failed or was cancelled) and removed the entry: look again, and maybe publish.
            let outcome = waiting
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|r| *r);
            if let Some(r) = outcome {
                return Claim::Known(r);
            }
        }
    }

    /// Records a keyed message seen on the broker (or found in the log). Does not replace an
    /// entry: the first receipt known for a key is the one every retry gets.
    pub(crate) fn observe(&self, room: &Room, user: &Arc<str>, key: &str, receipt: Receipt) {
        let now = Instant::now();
        let mut st = lock(&self.state);
        self.expire(&mut st, now, 1);
        let slot = Slot {
            room: room.clone(),
            user: user.clone(),
            key: Arc::from(key),
        };
        if st.map.contains_key(&slot) {
            return;
        }
        st.map.insert(slot.clone(), (now, Entry::Done(receipt)));
        st.order.push_back((now, slot));
    }

    /// Records what the encoder decoded from a broker envelope, if it is a keyed chat message.
    pub(crate) fn observe_envelope(&self, env: &Envelope, decoded: &Payload<'_>) {
        let (Some(key), Some(from)) = (payload::key(&env.payload), env.from.as_ref()) else {
            return;
        };
        match decoded {
            Payload::Message { .. } => self.observe(
                &env.room,
                from,
                key,
                Receipt {
                    id: env.id,
                    cursor: env.cursor,
                },
            ),
            Payload::Direct(d) => match (d.conv, d.id) {
                (None, _) => self.observe(
                    &env.room,
                    from,
                    key,
                    Receipt {
                        id: env.id,
                        cursor: env.cursor,
                    },
                ),
                // A copy in a personal channel: the original's room, id and cursor.
                (Some(conv), Some(id)) => {
                    if let Ok(conv) = Room::new(conv) {
                        let cursor = d.cursor.and_then(|c| c.parse::<Cursor>().ok());
                        self.observe(
                            &conv,
                            from,
                            key,
                            Receipt {
                                id: MessageId::from_u128(id),
                                cursor,
                            },
                        );
                    }
                }
                (Some(_), None) => {}
            },
            _ => {}
        }
    }
}

/// The right to publish a fresh key; completes the entry with the receipt, or removes it when
/// dropped without one (the publish failed: a retry may try again).
#[derive(Debug)]
pub(crate) struct Guard {
    keys: Arc<SendKeys>,
    slot: Option<Slot>,
    tx: watch::Sender<Option<Receipt>>,
}

impl Guard {
    pub(crate) fn complete(mut self, receipt: Receipt) {
        if let Some(slot) = self.slot.take() {
            let mut st = lock(&self.keys.state);
            let now = Instant::now();
            if let Some(entry) = st.map.get_mut(&slot) {
                // The window runs from the publish; and the expiry may have passed over the
                // pending entry meanwhile, so it gets a queue place of its own again.
                *entry = (now, Entry::Done(receipt));
                st.order.push_back((now, slot));
            }
        }
        // Wakes the retries waiting for it; no receiver is fine.
        let _ = self.tx.send(Some(receipt));
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            lock(&self.keys.state).map.remove(&slot);
            // Dropping `tx` wakes the waiters with an error: they look again.
        }
    }
}

/// Searches the log of `room` for the message `user` sent with `key` within the last `window`:
/// `Ok(None)` when it is not there (or the broker keeps no log), `Err` when the log could not
/// be read.
pub(crate) async fn search_log(
    broker: &dyn chatbus_core::Broker,
    room: &Room,
    user: &str,
    key: &str,
    window: Duration,
) -> Result<Option<Receipt>, Error> {
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut from = ReplayFrom::Time(now_ms.saturating_sub(window_ms));
    let mut read = 0;
    while read < SCAN_LIMIT {
        let mut stream = match broker.replay(room, from, SCAN_PAGE).await {
            Ok(s) => s,
            // No log: nothing to search, only the window counts.
            Err(Error::Unsupported { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut page = 0;
        let mut last = None;
        while let Some(item) = stream.next().await {
            let env = item?;
            page += 1;
            last = env.cursor.or(last);
            if env.from.as_deref() == Some(user) && payload::key(&env.payload) == Some(key) {
                return Ok(Some(Receipt {
                    id: env.id,
                    cursor: env.cursor,
                }));
            }
        }
        read += page;
        match last {
            Some(c) if page >= SCAN_PAGE => from = ReplayFrom::Cursor(c),
            _ => return Ok(None),
        }
    }
    tracing::warn!(%room, "idempotency search stopped after {SCAN_LIMIT} messages of the window");
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(n: u128) -> Receipt {
        Receipt {
            id: MessageId::from_u128(n),
            cursor: Some(Cursor::new(0, n as u64)),
        }
    }

    fn room() -> Room {
        Room::new("r").unwrap()
    }

    #[tokio::test]
    async fn a_key_is_fresh_once_then_known_and_a_failed_publish_frees_it() {
        let keys = Arc::new(SendKeys::new(SendKeyConfig::new(
            Duration::from_secs(60),
            100,
        )));
        let (u, k): (Arc<str>, Arc<str>) = (Arc::from("ann"), Arc::from("k1"));
        let Claim::Fresh(g) = keys.claim(&room(), &u, &k).await else {
            panic!("first claim must be fresh");
        };
        drop(g); // the publish failed
        let Claim::Fresh(g) = keys.claim(&room(), &u, &k).await else {
            panic!("a failed publish must not block a retry");
        };
        g.complete(receipt(7));
        assert!(matches!(keys.claim(&room(), &u, &k).await, Claim::Known(r) if r == receipt(7)));
        // Another user, or another room, with the same key is another message.
        let bob: Arc<str> = Arc::from("bob");
        assert!(matches!(
            keys.claim(&room(), &bob, &k).await,
            Claim::Fresh(_)
        ));
        let other = Room::new("s").unwrap();
        assert!(matches!(keys.claim(&other, &u, &k).await, Claim::Fresh(_)));
    }

    #[tokio::test]
    async fn a_retry_that_overtakes_the_original_waits_for_its_receipt() {
        let keys = Arc::new(SendKeys::new(SendKeyConfig::new(
            Duration::from_secs(60),
            100,
        )));
        let (u, k): (Arc<str>, Arc<str>) = (Arc::from("ann"), Arc::from("k1"));
        let Claim::Fresh(g) = keys.claim(&room(), &u, &k).await else {
            panic!("fresh");
        };
        let retry = {
            let (keys, u, k) = (keys.clone(), u.clone(), k.clone());
            tokio::spawn(async move { keys.claim(&room(), &u, &k).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!retry.is_finished(), "the retry must wait for the original");
        g.complete(receipt(9));
        let got = retry.await.unwrap();
        assert!(matches!(got, Claim::Known(r) if r == receipt(9)));
    }

    #[tokio::test]
    async fn entries_expire_after_the_window_and_the_capacity_bounds_them() {
        let keys = Arc::new(SendKeys::new(SendKeyConfig::new(
            Duration::from_millis(50),
            3,
        )));
        let u: Arc<str> = Arc::from("ann");
        for i in 0..5u128 {
            keys.observe(&room(), &u, &format!("k{i}"), receipt(i));
        }
        assert_eq!(keys.len(), 3, "capacity bound");
        let k4: Arc<str> = Arc::from("k4");
        assert!(matches!(
            keys.claim(&room(), &u, &k4).await,
            Claim::Known(_)
        ));
        let k0: Arc<str> = Arc::from("k0");
        assert!(
            matches!(keys.claim(&room(), &u, &k0).await, Claim::Fresh(_)),
            "oldest evicted"
        );
        tokio::time::sleep(Duration::from_millis(80)).await;
        keys.observe(&room(), &u, "late", receipt(99));
        assert_eq!(keys.len(), 1, "everything older than the window expired");
    }

    #[test]
    fn the_documented_entry_size_holds() {
        // The map slot plus the expiry queue's copy; hashbrown adds one control byte per
        // bucket and keeps at most 7/8 full.
        let map = std::mem::size_of::<(Slot, (Instant, Entry))>() + 1;
        let queue = std::mem::size_of::<(Instant, Slot)>();
        let total = map * 8 / 7 + queue;
        assert!(total <= ENTRY_BYTES, "{total} bytes per entry");
    }
}
