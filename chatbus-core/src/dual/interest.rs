//! The interest-based merger ([`DualConfig::interest`](super::DualConfig::interest)): one
//! fast subscription per local room instead of everything from both brokers, delivery in log
//! order per room from tickets ([`RoomSequence`]), lost fast copies filled by a targeted log
//! read of the room. See docs/ARCHITECTURE.md, "Interest-based DualBus", for the design.
//!
//! Tickets are trusted only while the instances' leases say that nobody writes without one
//! (`lease.rs`). Otherwise (a lease lapsed, the fast broker out of reach, a room that could not
//! be subscribed to) the merger is in *tail mode*: it reads the durable log from its end and
//! delivers its rooms' records in log order, and sends its rooms' subscribers `Lagged` when it
//! enters and when it leaves that mode, so that they resync from their cursors (by replay)
//! across the switch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{AbortHandle, Abortable, SelectAll};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, OnceCell};
// tokio's clock, like the merger's: the timeouts follow paused time in tests.
use tokio::time::Instant;

use super::lease::{self, Verdict};
use super::sequence::{Accepted, RoomSequence};
use super::stats::{inc, Counters};
use super::{DedupeWindow, DualConfig};
use crate::broker::{Broker, Interest, ReplayFrom, Subscription};
use crate::envelope::{Cursor, Envelope, Room};
use crate::subscribers::Subscribers;
use crate::tickets::{Baseline, Leases};
use crate::{Error, Result};

/// How long a message may wait for a missing ticket before the room's log is read for it. A
/// concurrent send's fast copy normally arrives within a Redis round trip and a Kafka ack.
const REPAIR_DELAY: Duration = Duration::from_millis(300);

/// Records read per repair.
const REPAIR_LIMIT: usize = 10_000;

/// The shortest tail mode: trust that comes and goes within it does not resync every room
/// twice.
const MIN_TAIL: Duration = Duration::from_secs(1);

/// Rooms whose baselines are read at once when tail mode ends.
const BASELINES_AT_ONCE: usize = 64;

pub(super) enum Cmd {
    /// A room to follow, its fast subscription live and its baseline read after it (None: the
    /// fast broker could not be reached; the room is followed through the log until it is).
    Follow {
        room: Room,
        sub: Option<Subscription>,
        baseline: Option<Baseline>,
    },
    /// The last local subscriber of the room left.
    Vacated(Room),
    /// A log read of the room finished.
    Repaired {
        room: Room,
        records: Result<Vec<Envelope>>,
    },
    /// A lease scan, sent at `sent`.
    Leases { sent: Instant, scan: Result<Leases> },
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
    // None until the room has a fast subscription and a baseline.
    seq: Option<RoomSequence<Envelope>>,
    // The cursor of the last message delivered: where a repair reads the log from.
    last: Option<Cursor>,
    repairing: bool,
    // Ends the room's fast subscription.
    stop: Option<AbortHandle>,
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
    verdict: Verdict,
    // When the last lease scan that allowed trusting tickets was sent.
    trusted_at: Option<Instant>,
    // In tail mode: since when, and the log's tail (None while it could not be opened).
    tailing: Option<Instant>,
    tail: Option<Subscription>,
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
            verdict: Verdict::default(),
            trusted_at: None,
            tailing: None,
            tail: None,
        }
    }

    /// Scans the leases once, now (before the merger starts, so that a healthy start trusts
    /// tickets from its first room on).
    pub(super) async fn scan_now(&mut self) {
        let sent = Instant::now();
        let scan = scan(&*self.fast).await;
        self.leases(sent, scan);
    }

    pub(super) async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let (repairs_tx, mut repairs) = mpsc::unbounded_channel::<Cmd>();
        let _scanner = AbortOnDrop(
            tokio::spawn(scan_leases(self.fast.clone(), repairs_tx.clone())).abort_handle(),
        );
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => return,
                },
                Some(cmd) = repairs.recv() => self.command(cmd).await,
                Some((room, item)) = self.streams.next(), if !self.streams.is_empty() => {
                    self.item(room, item).await;
                }
                item = next_of(&mut self.tail), if self.tail.is_some() => self.tail_item(item),
                _ = tick.tick() => {
                    self.check_trust().await;
                    if self.tailing.is_none() {
                        self.check_waits(&repairs_tx);
                    }
                }
            }
        }
    }

    async fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Follow {
                room,
                sub,
                baseline,
            } => {
                if self.rooms.contains_key(&room) {
                    return;
                }
                let stop = sub.map(|sub| self.push_stream(&room, sub));
                let seq = baseline.map(|b| RoomSequence::new(b, Instant::now()));
                self.rooms.insert(
                    room,
                    Followed {
                        seq,
                        last: None,
                        repairing: false,
                        stop,
                    },
                );
                self.check_trust().await;
            }
            Cmd::Vacated(room) => {
                // Under the lock `subscribe` follows rooms with, after its local subscription
                // is registered: a subscriber that came back in between keeps the room.
                let mut followed = self.shared.followed();
                if self.out.has_room(&room) {
                    return;
                }
                followed.remove(&room);
                if let Some(stop) = self.rooms.remove(&room).and_then(|f| f.stop) {
                    stop.abort();
                }
            }
            Cmd::Repaired { room, records } => {
                if self.tailing.is_none() {
                    self.repaired(room, records);
                } else if let Some(f) = self.rooms.get_mut(&room) {
                    f.repairing = false;
                }
            }
            Cmd::Leases { sent, scan } => {
                self.leases(sent, scan);
                self.check_trust().await;
            }
        }
    }

    /// Adds `room`'s fast subscription to the merged streams; returns what ends it.
    fn push_stream(&mut self, room: &Room, sub: Subscription) -> AbortHandle {
        let (stop, reg) = AbortHandle::new_pair();
        let tagged = room.clone();
        let stream: std::pin::Pin<Box<dyn Stream<Item = _> + Send>> =
            Box::pin(sub.map(move |item| (tagged.clone(), item)));
        self.streams.push(Abortable::new(stream, reg));
        stop
    }

    /// Takes a lease scan: tickets are trusted for `FRESH_FOR` after `sent` if it allows.
    fn leases(&mut self, sent: Instant, scan: Result<Leases>) {
        match scan {
            Ok(scan) if self.verdict.trusts(&scan) => {
                self.trusted_at = Some(self.trusted_at.map_or(sent, |t| t.max(sent)));
            }
            Ok(scan) => {
                if self.trusted_at.take().is_some() {
                    tracing::warn!(
                        lapsed = ?self.verdict.lapsed(scan.now_ms),
                        "an instance's lease lapsed: following this instance's rooms through \
                         the durable log"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "lease scan failed"),
        }
    }

    /// The last lease scan allowed trusting tickets and is recent enough.
    fn leases_allow(&self) -> bool {
        self.trusted_at
            .is_some_and(|t| t.elapsed() < lease::FRESH_FOR)
    }

    /// Tickets can be trusted, and every room is followed by them.
    fn trusted(&self) -> bool {
        self.leases_allow() && self.rooms.values().all(|f| f.seq.is_some())
    }

    /// Enters tail mode when tickets cannot be trusted, leaves it when they can again.
    async fn check_trust(&mut self) {
        match self.tailing {
            None if !self.trusted() => self.enter_tail().await,
            None => {}
            Some(since) => {
                if self.tail.is_none() {
                    self.open_tail().await;
                }
                if since.elapsed() >= MIN_TAIL && self.leases_allow() {
                    self.leave_tail().await;
                }
            }
        }
    }

    async fn enter_tail(&mut self) {
        tracing::info!(
            rooms = self.rooms.len(),
            "room tickets not trusted: reading the rooms from the durable log"
        );
        self.tailing = Some(Instant::now());
        self.stats
            .tailing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        inc(&self.stats.tail_periods);
        self.open_tail().await;
    }

    /// Opens the log's tail; once it is open, the rooms' subscribers resync from their
    /// cursors (the tail has everything after its start, the replay everything before).
    async fn open_tail(&mut self) {
        match self.durable.subscribe(Interest::All).await {
            Ok(tail) => {
                self.tail = Some(tail);
                self.lag_every_room();
            }
            Err(e) => tracing::warn!(error = %e, "cannot open the durable log's tail; retrying"),
        }
    }

    /// Back to tickets: every room gets a fast subscription (if it had none) and a new
    /// baseline, then the tail is closed and the rooms' subscribers resync from their cursors
    /// (what the tail had not read yet is in the log before the baselines).
    async fn leave_tail(&mut self) {
        let fast = self.fast.clone();
        let Some(tickets) = fast.tickets() else {
            return;
        };
        let unsubscribed: Vec<Room> = self
            .rooms
            .iter()
            .filter(|(_, f)| f.stop.is_none())
            .map(|(r, _)| r.clone())
            .collect();
        for room in unsubscribed {
            match fast.subscribe(Interest::room(room.clone())).await {
                Ok(sub) => {
                    let stop = self.push_stream(&room, sub);
                    if let Some(f) = self.rooms.get_mut(&room) {
                        f.stop = Some(stop);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, room = %room, "still no fast subscription");
                    return;
                }
            }
        }
        let rooms: Vec<Room> = self.rooms.keys().cloned().collect();
        let baselines: Vec<(Room, Result<Baseline>)> = futures::stream::iter(rooms)
            .map(|room| async move {
                let b = tickets.ticket_baseline(&room).await;
                (room, b)
            })
            .buffer_unordered(BASELINES_AT_ONCE)
            .collect()
            .await;
        if let Some((room, Err(e))) = baselines.iter().find(|(_, b)| b.is_err()) {
            tracing::debug!(error = %e, room = %room, "no baseline yet; staying on the log");
            return;
        }
        let now = Instant::now();
        for (room, baseline) in baselines {
            if let (Some(f), Ok(b)) = (self.rooms.get_mut(&room), baseline) {
                f.seq = Some(RoomSequence::new(b, now).after(f.last.map(|c| c.offset)));
                f.repairing = false;
            }
        }
        self.tail = None;
        self.tailing = None;
        self.stats
            .tailing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(rooms = self.rooms.len(), "room tickets trusted again");
        self.lag_every_room();
    }

    fn lag_every_room(&self) {
        self.out
            .error_where(|_| true, || Error::Lagged { missed: 0 });
    }

    /// A record of the log's tail (tail mode): delivered if it is of a followed room and after
    /// what the room last delivered.
    fn tail_item(&mut self, item: Option<Result<Envelope>>) {
        let env = match item {
            Some(Ok(env)) => env,
            Some(Err(Error::Lagged { .. })) => return self.lag_every_room(),
            Some(Err(e)) => return tracing::debug!(error = %e, "durable tail error"),
            // Reopened (and the rooms resynced) at the next tick.
            None => {
                self.tail = None;
                return;
            }
        };
        let (Some(f), Some(c)) = (self.rooms.get_mut(&env.room), env.cursor) else {
            return;
        };
        if f.last
            .is_some_and(|l| l.partition == c.partition && c.offset <= l.offset)
        {
            inc(&self.stats.duplicates);
            return;
        }
        if env.stamp.is_none() {
            // Written without a ticket: the fast path never had it.
            inc(&self.stats.gaps_filled);
        }
        f.last = Some(c);
        inc(&self.stats.via_durable);
        self.out.dispatch(&env);
    }

    async fn item(&mut self, room: Room, item: Result<Envelope>) {
        let env = match item {
            Ok(env) => env,
            // In tail mode, leaving it takes new baselines anyway.
            Err(Error::Lagged { .. }) if self.tailing.is_some() => return,
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
        let ticketed = env.stamp.is_some() || (env.is_durable() && env.cursor.is_some());
        if ticketed && !self.trusted() {
            // Tickets cannot be trusted now (this copy may have overtaken a ticketless record):
            // the log has it.
            if self.tailing.is_none() {
                self.enter_tail().await;
            }
            return;
        }
        let Some(f) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(seq) = f.seq.as_mut().filter(|_| ticketed) else {
            if !ticketed {
                // Ephemeral, or published fast-only (`DegradeToFast`): delivered once, by id.
                if self.ids.insert(env.id) {
                    inc(&self.stats.via_fast);
                    self.out.dispatch(&env);
                } else {
                    inc(&self.stats.duplicates);
                }
            }
            return;
        };
        let outcome = match (env.stamp, env.cursor) {
            // No legitimate ephemeral message has a stamp: it is a publisher's notice that the
            // durable write of that ticket failed.
            (Some(stamp), _) if !env.is_durable() => {
                seq.abandon(stamp.ticket, stamp.horizon, Instant::now())
            }
            (Some(stamp), Some(c)) => {
                seq.accept(stamp.ticket, stamp.horizon, c.offset, env, Instant::now())
            }
            // A durable record without a ticket (from an instance of another mode): only the
            // log orders it.
            (None, _) => return,
            (Some(_), None) => {
                // A stamped durable copy without a cursor: malformed, ignored.
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
        let Some(seq) = f.seq.as_mut() else {
            return;
        };
        seq.deliverable(&mut self.batch);
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
                    let last = f.last.map(|c| c.offset);
                    f.seq = Some(RoomSequence::new(baseline, Instant::now()).after(last));
                }
            }
            Err(e) => {
                // Followed through the log until a baseline can be read.
                tracing::warn!(error = %e, room = %room, "no new baseline");
                if let Some(f) = self.rooms.get_mut(&room) {
                    f.seq = None;
                }
            }
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
            let Some(seq) = f.seq.as_mut() else {
                continue;
            };
            let Some(since) = seq.blocked_since() else {
                continue;
            };
            let waited = now.saturating_duration_since(since);
            if waited >= timeout {
                let given_up = seq.give_up(now - timeout, &mut self.batch);
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
        let Some(seq) = f.seq.as_mut() else {
            return;
        };
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
        seq.fill_from_log(items, end, Instant::now(), &mut self.batch);
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

/// The next item of the log's tail (the caller polls it only while there is one).
async fn next_of(tail: &mut Option<Subscription>) -> Option<Result<Envelope>> {
    match tail {
        Some(tail) => tail.recv().await,
        None => std::future::pending().await,
    }
}

/// One lease scan, given up after `FRESH_FOR` (it could not make tickets trusted anyway).
async fn scan<F: Broker>(fast: &F) -> Result<Leases> {
    let tickets = fast
        .tickets()
        .ok_or_else(|| Error::Config("no tickets".to_owned()))?;
    tokio::time::timeout(lease::FRESH_FOR, tickets.leases(lease::KEEP_LAPSED))
        .await
        .map_err(|_| Error::Timeout {
            backend: "dual",
            op: "lease scan",
            after: lease::FRESH_FOR,
        })?
}

/// Scans the leases every `SCAN_EVERY`, one scan at a time, for the merger.
async fn scan_leases<F: Broker>(fast: Arc<F>, to: mpsc::UnboundedSender<Cmd>) {
    let mut every = tokio::time::interval(lease::SCAN_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let sent = Instant::now();
        let scan = scan(&*fast).await;
        if to.send(Cmd::Leases { sent, scan }).is_err() {
            return;
        }
    }
}

/// Aborts a task when dropped (the merger's scanner ends with the merger).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
