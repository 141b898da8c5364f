//! The interest-based merger ([`DualConfig::interest`](super::DualConfig::interest),
//! experimental): one fast subscription per local room instead of everything from both
//! brokers, delivery in log order per room from tickets ([`RoomSequence`]), lost fast copies
//! filled by a targeted log read of the room. See docs/ARCHITECTURE.md, "Interest-based
//! DualBus", for the design and for what is not built yet (the leases and the partition tail
//! that keep delivery going while the fast broker is out of reach).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{AbortHandle, Abortable, SelectAll};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, OnceCell};
// tokio's clock, like the merger's: the timeouts follow paused time in tests.
use tokio::time::Instant;

use super::sequence::{Accepted, RoomSequence};
use super::stats::{inc, Counters};
use super::{DedupeWindow, DualConfig};
use crate::broker::{Broker, ReplayFrom, Subscription};
use crate::envelope::{Cursor, Envelope, Room};
use crate::subscribers::Subscribers;
use crate::tickets::Baseline;
use crate::{Error, Result};

/// How long a message may wait for a missing ticket before the room's log is read for it. A
/// concurrent send's fast copy normally arrives within a Redis round trip and a Kafka ack.
const REPAIR_DELAY: Duration = Duration::from_millis(300);

/// Records read per repair.
const REPAIR_LIMIT: usize = 10_000;

pub(super) enum Cmd {
    /// A room to follow, its fast subscription live and its baseline read after it.
    Follow {
        room: Room,
        sub: Subscription,
        baseline: Baseline,
    },
    /// The last local subscriber of the room left.
    Vacated(Room),
    /// A log read of the room finished.
    Repaired {
        room: Room,
        records: Result<Vec<Envelope>>,
    },
}

/// What `DualBus::subscribe` and the merger share: the rooms being followed (each becomes
/// ready once its `Follow` was sent) and the merger's command queue.
pub(super) struct Shared {
    pub(super) cmds: mpsc::UnboundedSender<Cmd>,
    pub(super) followed: Mutex<HashMap<Room, Arc<OnceCell<()>>>>,
}

impl Shared {
    pub(super) fn followed(&self) -> std::sync::MutexGuard<'_, HashMap<Room, Arc<OnceCell<()>>>> {
        // A map of cells: nothing is left half-updated by a panic elsewhere.
        self.followed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Followed {
    seq: RoomSequence<Envelope>,
    // The cursor of the last message delivered: where a repair reads the log from.
    last: Option<Cursor>,
    repairing: bool,
    stop: AbortHandle,
}

type Items =
    SelectAll<Abortable<std::pin::Pin<Box<dyn Stream<Item = (Room, Result<Envelope>)> + Send>>>>;

pub(super) struct InterestMerger<F, D> {
    config: DualConfig,
    out: Subscribers,
    stats: Arc<Counters>,
    shared: Arc<Shared>,
    fast: Arc<F>,
    durable: Arc<D>,
    rooms: HashMap<Room, Followed>,
    streams: Items,
    ids: DedupeWindow,
    batch: Vec<Envelope>,
}

impl<F: Broker, D: Broker> InterestMerger<F, D> {
    pub(super) fn new(
        config: DualConfig,
        out: Subscribers,
        stats: Arc<Counters>,
        shared: Arc<Shared>,
        fast: Arc<F>,
        durable: Arc<D>,
    ) -> Self {
        let ids = DedupeWindow::new(config.dedupe_window);
        Self {
            config,
            out,
            stats,
            shared,
            fast,
            durable,
            rooms: HashMap::new(),
            streams: SelectAll::new(),
            ids,
            batch: Vec::new(),
        }
    }

    pub(super) async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let (repairs_tx, mut repairs) = mpsc::unbounded_channel::<Cmd>();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                Some(cmd) = repairs.recv() => self.command(cmd),
                Some((room, item)) = self.streams.next(), if !self.streams.is_empty() => {
                    self.item(room, item).await;
                }
                _ = tick.tick() => self.check_waits(&repairs_tx),
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Follow {
                room,
                sub,
                baseline,
            } => {
                if self.rooms.contains_key(&room) {
                    return;
                }
                let (stop, reg) = AbortHandle::new_pair();
                let tagged = room.clone();
                let stream: std::pin::Pin<Box<dyn Stream<Item = _> + Send>> =
                    Box::pin(sub.map(move |item| (tagged.clone(), item)));
                self.streams.push(Abortable::new(stream, reg));
                self.rooms.insert(
                    room,
                    Followed {
                        seq: RoomSequence::new(baseline, Instant::now()),
                        last: None,
                        repairing: false,
                        stop,
                    },
                );
            }
            Cmd::Vacated(room) => {
                // Under the lock `subscribe` follows rooms with, after its local subscription
                // is registered: a subscriber that came back in between keeps the room.
                let mut followed = self.shared.followed();
                if self.out.has_room(&room) {
                    return;
                }
                followed.remove(&room);
                if let Some(f) = self.rooms.remove(&room) {
                    f.stop.abort();
                }
            }
            Cmd::Repaired { room, records } => self.repaired(room, records),
        }
    }

    async fn item(&mut self, room: Room, item: Result<Envelope>) {
        let env = match item {
            Ok(env) => env,
            Err(Error::Lagged { .. }) => {
                // The fast path may have lost anything of this room: start it over from a new
                // baseline, and let its subscribers resync from their cursors.
                self.rebaseline(room).await;
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, room = %room, "fast path error");
                return;
            }
        };
        let Some(f) = self.rooms.get_mut(&room) else {
            return;
        };
        let outcome = match (env.stamp, env.cursor) {
            // No legitimate ephemeral message has a stamp: it is a publisher's notice that the
            // durable write of that ticket failed.
            (Some(stamp), _) if !env.is_durable() => {
                f.seq.abandon(stamp.ticket, stamp.horizon, Instant::now())
            }
            (Some(stamp), Some(c)) => {
                f.seq
                    .accept(stamp.ticket, stamp.horizon, c.offset, env, Instant::now())
            }
            _ => {
                // Ephemeral, or published without a ticket: delivered once, by id.
                if self.ids.insert(env.id) {
                    inc(&self.stats.via_fast);
                    self.out.dispatch(&env);
                } else {
                    inc(&self.stats.duplicates);
                }
                return;
            }
        };
        match outcome {
            Accepted::Queued => self.deliver(&room),
            Accepted::Duplicate => inc(&self.stats.duplicates),
            Accepted::OtherEpoch | Accepted::Overrun => self.rebaseline(room).await,
        }
    }

    /// Dispatches what `room`'s sequence lets out.
    fn deliver(&mut self, room: &Room) {
        let Some(f) = self.rooms.get_mut(room) else {
            return;
        };
        f.seq.deliverable(&mut self.batch);
        dispatch(
            &mut self.batch,
            &mut f.last,
            &self.stats.via_fast,
            &self.out,
        );
    }

    async fn rebaseline(&mut self, room: Room) {
        let Some(tickets) = self.fast.tickets() else {
            return;
        };
        match tickets.ticket_baseline(&room).await {
            Ok(baseline) => {
                if let Some(f) = self.rooms.get_mut(&room) {
                    f.seq = RoomSequence::new(baseline, Instant::now());
                }
            }
            Err(e) => tracing::warn!(error = %e, room = %room, "no new baseline"),
        }
        self.out
            .error_where(|r| r == &room, || Error::Lagged { missed: 0 });
    }

    /// Repairs rooms that have waited long enough for a missing ticket, and gives up on
    /// those that waited `gap_timeout`.
    fn check_waits(&mut self, repairs: &mpsc::UnboundedSender<Cmd>) {
        let now = Instant::now();
        let timeout = self.config.gap_timeout;
        let mut lagged = Vec::new();
        for (room, f) in &mut self.rooms {
            let Some(since) = f.seq.blocked_since() else {
                continue;
            };
            let waited = now.saturating_duration_since(since);
            if waited >= timeout {
                let given_up = f.seq.give_up(now - timeout, &mut self.batch);
                dispatch(
                    &mut self.batch,
                    &mut f.last,
                    &self.stats.via_fast,
                    &self.out,
                );
                if given_up > 0 {
                    inc(&self.stats.gap_timeouts);
                    lagged.push(room.clone());
                }
            } else if waited >= REPAIR_DELAY && !f.repairing {
                let Some(from) = f.last else {
                    // Nothing delivered since the baseline: no position to read from; the gap
                    // timeout settles it.
                    continue;
                };
                f.repairing = true;
                let (durable, room, tx) = (self.durable.clone(), room.clone(), repairs.clone());
                tokio::spawn(async move {
                    let records = read_after(&*durable, &room, from).await;
                    let _ = tx.send(Cmd::Repaired { room, records });
                });
            }
        }
        for room in lagged {
            tracing::warn!(room = %room, "tickets not accounted for in time; skipping them");
            self.out
                .error_where(|r| r == &room, || Error::Lagged { missed: 0 });
        }
    }

    fn repaired(&mut self, room: Room, records: Result<Vec<Envelope>>) {
        let Some(f) = self.rooms.get_mut(&room) else {
            return;
        };
        f.repairing = false;
        let records = match records {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, room = %room, "log read for a missing ticket failed");
                return;
            }
        };
        let Some(end) = records
            .iter()
            .filter_map(|e| e.cursor)
            .map(|c| c.offset)
            .max()
        else {
            return;
        };
        // Everything of the room after `last` up to `end` is in `records`: the read is
        // complete up to the newest record it found.
        let items = records
            .into_iter()
            .filter_map(|e| Some((e.stamp.map(|s| s.ticket), e.cursor?.offset, e)));
        f.seq
            .fill_from_log(items, end, Instant::now(), &mut self.batch);
        if !self.batch.is_empty() {
            inc(&self.stats.gaps_filled);
        }
        dispatch(
            &mut self.batch,
            &mut f.last,
            &self.stats.via_durable,
            &self.out,
        );
    }
}

/// Hands a room's deliverable messages to the local subscribers, in order, remembering the
/// last cursor (where a repair reads from) and counting them on the path they came by.
fn dispatch(
    batch: &mut Vec<Envelope>,
    last: &mut Option<Cursor>,
    path: &std::sync::atomic::AtomicU64,
    out: &Subscribers,
) {
    for env in batch.drain(..) {
        *last = env.cursor.or(*last);
        inc(path);
        out.dispatch(&env);
    }
}

async fn read_after<D: Broker>(durable: &D, room: &Room, from: Cursor) -> Result<Vec<Envelope>> {
    let mut stream = durable
        .replay(room, ReplayFrom::Cursor(from), REPAIR_LIMIT)
        .await?;
    let mut out = Vec::new();
    while let Some(item) = stream.next().await {
        out.push(item?);
    }
    Ok(out)
}
