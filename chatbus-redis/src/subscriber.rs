//! The subscriber: one dedicated pub/sub link per broker, owned by one task (the "actor")
//! that subscribes, dispatches messages to local subscriptions and reconnects. The link is one
//! connection to a single Redis, or one connection per master of a Redis Cluster
//! (`cluster.rs`); `link.rs` hides the difference, so that the ordering below is written once.
//!
//! The local subscriptions live in the shared [`Subscribers`] registry, but only the actor
//! activates them, and it learns of rooms left empty through the registry's on-vacated
//! callback, in order with its other requests. That order is what makes the subscription
//! contract hold:
//!
//! - a new subscription is activated only after Redis confirmed its `SUBSCRIBE` (`SSUBSCRIBE`
//!   on a cluster) and a `PING` (on every master of a cluster) and after every message read
//!   before that
//!   confirmation was dispatched, so it receives exactly the messages published after
//!   `subscribe` returned, never an older one still in flight;
//! - the `UNSUBSCRIBE` of a room whose last local subscription left is sent from the same
//!   task, after checking that the room is still empty, so it can never overtake the
//!   `SUBSCRIBE` of a newer subscription to that room.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatbus_core::backend::{codec, Pending, Subscribers, Target, Vacated};
use chatbus_core::{Error, Interest, Result, Room, Subscription};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::cluster::Event;
use crate::config::RedisConfig;
use crate::error::{self, RedisBrokerError};
use crate::link::{Connector, Link, Publisher};
use crate::wire::Keys;

/// Channels per `SUBSCRIBE` command when re-subscribing many rooms at once.
const CHUNK: usize = 512;

/// Requests queued for the actor. The queue was unbounded: while the actor waited on a slow
/// Redis (up to the command timeout per round trip), every subscription dropped meanwhile
/// queued a `Vacated` request, with no limit. Now a `subscribe` waits for room in the queue
/// (within its timeout: back-pressure), and a `Vacated` that finds it full is not queued but
/// folded into one flag, after which the actor re-checks every room it has subscribed. The
/// actor takes the whole queue per round trip, so 1,024 is many round trips' worth.
pub(crate) const COMMAND_QUEUE: usize = 1024;

/// The actor's request queue (see [`COMMAND_QUEUE`]).
pub(crate) fn command_channel() -> (mpsc::Sender<Command>, mpsc::Receiver<Command>) {
    mpsc::channel(COMMAND_QUEUE)
}

/// How long a connection must serve before its loss resets the backoff and is retried at
/// once. Shorter-lived connections keep backing off: the server keeps refusing or closing them.
const STABLE_AFTER: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are plain data that stay consistent between statements.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connection state as the rest of the broker sees it.
#[derive(Debug, Clone)]
pub(crate) enum ConnState {
    Up,
    /// Connected again; the rooms are being re-subscribed. `since`: when the outage began.
    Resubscribing {
        since: Instant,
    },
    Down {
        since: Instant,
        reason: String,
    },
}

/// Counters, shared with the broker.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) decode_errors: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) published: AtomicU64,
    pub(crate) publish_errors: AtomicU64,
}

/// State shared between the actor and the broker handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) state: Mutex<ConnState>,
    pub(crate) counters: Counters,
    /// Set when a `Vacated` request found the queue full and was dropped: the actor must then
    /// find the rooms left empty itself, among those it has subscribed.
    vacated_overflow: AtomicBool,
    /// Wakes the actor when `vacated_overflow` is set (a permit is kept if it is busy).
    overflow: Notify,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(ConnState::Up),
            counters: Counters::default(),
            vacated_overflow: AtomicBool::new(false),
            overflow: Notify::new(),
        }
    }

    pub(crate) fn state(&self) -> ConnState {
        lock(&self.state).clone()
    }

    fn set_state(&self, s: ConnState) {
        *lock(&self.state) = s;
    }
}

/// A request to the actor.
pub(crate) enum Command {
    Subscribe {
        pending: Pending,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Rooms (or the pattern) that may have lost their last local subscriber.
    Vacated(Vacated),
}

/// The registry of local subscriptions: it tells the actor, through `cmd`, of every room left
/// without subscribers, so that the actor unsubscribes it.
pub(crate) fn registry(
    capacity: usize,
    cmd: &mpsc::Sender<Command>,
    shared: &Arc<Shared>,
) -> Subscribers {
    let cmd = cmd.clone();
    let shared = shared.clone();
    Subscribers::with_on_vacated(capacity, move |vacated| {
        // Called where a subscription is dropped, which cannot wait: never block here.
        match cmd.try_send(Command::Vacated(vacated)) {
            // Closed: the actor is gone, and then there is nothing to unsubscribe.
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                shared.vacated_overflow.store(true, Ordering::Release);
                shared.overflow.notify_one();
            }
        }
    })
}

/// What the broker's `subscribe` does: asks the actor and waits for its answer.
pub(crate) async fn subscribe(
    shared: &Shared,
    cmd: &mpsc::Sender<Command>,
    subs: &Subscribers,
    interest: Interest,
    timeout: Duration,
) -> Result<Subscription> {
    if let ConnState::Down { reason, .. } = shared.state() {
        return Err(error::unavailable(format!(
            "cannot subscribe while disconnected ({reason}); reconnecting"
        )));
    }
    // The subscription exists before the request: if we stop waiting (timeout, or the caller
    // drops this future), dropping it cancels the activation or, if the actor activated it
    // already, removes it again, and the actor hears of the rooms left empty.
    let (pending, sub) = subs.prepare(interest);
    let (reply, answer) = oneshot::channel();
    // Waiting for room in the actor's queue is part of the timeout: a full queue (a stalled
    // Redis) slows subscribers down and then fails them, it never grows.
    let request = async {
        cmd.send(Command::Subscribe { pending, reply })
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    };
    match tokio::time::timeout(timeout, request).await {
        Err(_) => Err(error::timeout("subscribe", timeout)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => Ok(sub),
    }
}

/// The actor's timing settings, from the broker's configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) ping_interval: Duration,
}

impl Timing {
    pub(crate) fn of(config: &RedisConfig) -> Self {
        Self {
            connect_timeout: config.connect_timeout,
            command_timeout: config.command_timeout,
            backoff_min: config.backoff_min,
            backoff_max: config.backoff_max,
            ping_interval: config.ping_interval,
        }
    }
}

/// Why a connection's session ended.
enum End {
    /// The broker was dropped: stop.
    Shutdown,
    /// The connection failed: reconnect. With the index of the cluster node whose connection
    /// was lost, when only that one was (`None`: anything may have lost messages).
    Lost(String, Option<usize>),
}

/// Everything the actor needs to (re)connect.
pub(crate) struct Actor {
    connector: Connector,
    // The publishing connection, checked before subscribers are told to resync (they replay
    // through it).
    publisher: Publisher,
    pub(crate) keys: Keys,
    pub(crate) shared: Arc<Shared>,
    pub(crate) commands: mpsc::Receiver<Command>,
    timing: Timing,
    subs: Subscribers,
    // What Redis has confirmed on the current connection.
    subscribed: HashSet<Room>,
    psubscribed: bool,
    // Subscribers were told Unavailable and not yet Lagged (the outage is still going on).
    told_down: bool,
    // The rooms that may have lost messages in the current outage (None: every room): those
    // of a lost cluster node; the rooms whose master changed are added when it ends.
    affected: Option<HashSet<Room>>,
    // The node serving each room when the outage began (cluster only).
    owners_before: HashMap<Room, Option<usize>>,
}

/// Capped exponential backoff with jitter (50–100 % of the step), so that many instances
/// that lost one server do not reconnect in lockstep.
fn backoff(min: Duration, max: Duration, attempt: u32, seed: &mut u64) -> Duration {
    let step = min.saturating_mul(1u32 << attempt.min(20)).min(max);
    // xorshift64: plenty for jitter, and no extra dependency.
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    let frac = 0.5 + (*seed % 1000) as f64 / 2000.0;
    step.mul_f64(frac)
}

fn jitter_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (u64::from(std::process::id()) << 32 | u64::from(nanos)) | 1
}

impl Actor {
    pub(crate) fn new(
        connector: Connector,
        publisher: Publisher,
        keys: Keys,
        shared: Arc<Shared>,
        subs: Subscribers,
        commands: mpsc::Receiver<Command>,
        timing: Timing,
    ) -> Self {
        Self {
            connector,
            publisher,
            keys,
            shared,
            commands,
            timing,
            subs,
            subscribed: HashSet::new(),
            psubscribed: false,
            told_down: false,
            affected: None,
            owners_before: HashMap::new(),
        }
    }

    /// Runs until the broker is dropped (the command channel closes), starting with an
    /// established connection.
    pub(crate) async fn run(mut self, first: Link) {
        let mut current = Some(first);
        // Whether `current` can serve as it is (only the first link, straight from connect).
        let mut usable = true;
        let mut reconnecting = false;
        // Failed attempts since the last connection that proved stable: the backoff step.
        let mut attempt = 0u32;
        // Whether to back off before the next attempt. Only a connection that served for
        // STABLE_AFTER earns an immediate reconnect; one refused or closed right after it
        // opened (an ACL that denies SUBSCRIBE, a server at maxclients that closes every new
        // connection) must not turn the loop into a busy connect/SUBSCRIBE cycle.
        let mut wait_first = false;
        let mut seed = jitter_seed();
        loop {
            if std::mem::take(&mut wait_first) {
                let wait = backoff(
                    self.timing.backoff_min,
                    self.timing.backoff_max,
                    attempt,
                    &mut seed,
                );
                attempt = attempt.saturating_add(1);
                if self.wait_down(wait, current.as_mut()).await {
                    // Dropping the actor ends every subscription (see `Drop`).
                    return;
                }
            }
            if !usable {
                let reconnect = self.connector.reconnect(
                    &mut current,
                    &self.keys,
                    self.timing.connect_timeout,
                    self.timing.command_timeout,
                );
                if let Err(e) = reconnect.await {
                    tracing::debug!(error = %e, attempt, "redis reconnect failed");
                    self.note_down(&e.to_string());
                    wait_first = true;
                    continue;
                }
            }
            // Whatever ends this attempt (a failed re-subscribe, a lost session) needs a
            // reconnect.
            usable = false;
            let Some(link) = current.as_mut() else {
                wait_first = true;
                continue;
            };
            if reconnecting {
                self.set_resubscribing();
                if let Err(e) = self.resubscribe_all(link).await {
                    tracing::warn!(error = %e, attempt, "redis re-subscribe failed");
                    self.lost(&e, None, link);
                    wait_first = true;
                    continue;
                }
                self.shared
                    .counters
                    .reconnects
                    .fetch_add(1, Ordering::Relaxed);
                // Subscribers act on the Lagged notice by replaying through the publishing
                // connection, which reconnects on its own schedule: give it the chance to be
                // back first (bounded; on failure the notice goes out anyway).
                let mut publisher = self.publisher.clone();
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<String>(&mut publisher);
                if let Err(e) = self.with_timeout("PING", ping).await {
                    tracing::warn!(error = %e, "redis publishing connection not back yet");
                }
                // Live delivery resumes now; what was published meanwhile is lost to the live
                // stream, so every subscriber that may have missed something is told to resync
                // from its cursor.
                self.tell_lagged(link);
                self.told_down = false;
                tracing::info!(
                    rooms = self.subscribed.len(),
                    link = link.describe(),
                    "redis pub/sub reconnected"
                );
            }
            self.shared.set_state(ConnState::Up);
            let opened = Instant::now();
            match self.session(link).await {
                End::Shutdown => return,
                End::Lost(reason, node) => {
                    tracing::warn!(%reason, attempt, "redis pub/sub connection lost");
                    self.lost(&reason, node, link);
                    reconnecting = true;
                    if opened.elapsed() >= STABLE_AFTER {
                        // A one-off drop of a good connection: reconnect at once.
                        attempt = 0;
                    } else {
                        wait_first = true;
                    }
                }
            }
        }
    }

    fn note_down(&self, reason: &str) {
        let mut state = lock(&self.shared.state);
        match &mut *state {
            ConnState::Down { reason: r, .. } => reason.clone_into(r),
            // Still the same outage: keep when it began.
            ConnState::Resubscribing { since } => {
                *state = ConnState::Down {
                    since: *since,
                    reason: reason.to_owned(),
                }
            }
            ConnState::Up => {
                *state = ConnState::Down {
                    since: Instant::now(),
                    reason: reason.to_owned(),
                }
            }
        }
    }

    fn set_resubscribing(&self) {
        let mut state = lock(&self.shared.state);
        let since = match &*state {
            ConnState::Down { since, .. } | ConnState::Resubscribing { since } => *since,
            ConnState::Up => Instant::now(),
        };
        *state = ConnState::Resubscribing { since };
    }

    /// The connection broke: forget what it had subscribed and tell the subscribers that may
    /// lose messages, once per outage (a failed re-subscribe is the same outage going on, and
    /// repeating the notice would only fill their buffers).
    ///
    /// On a cluster whose link lost one node's connection (`node`), those are the subscribers
    /// of the rooms that node served (and every `Interest::All` one): the other masters'
    /// connections are kept, and their rooms lose nothing.
    fn lost(&mut self, reason: &str, node: Option<usize>, link: &Link) {
        self.note_down(reason);
        self.subscribed.clear();
        self.psubscribed = false;
        let rooms = self.subs.rooms();
        let scope: Option<HashSet<Room>> = node.map(|n| {
            rooms
                .iter()
                .filter(|r| link.owner(&self.keys.channel(r)) == Some(n))
                .cloned()
                .collect()
        });
        if std::mem::replace(&mut self.told_down, true) {
            // The same outage going on: whatever it may have lost adds up.
            self.affected = match (self.affected.take(), scope) {
                (Some(mut a), Some(b)) => {
                    a.extend(b);
                    Some(a)
                }
                _ => None,
            };
            return;
        }
        self.owners_before = rooms
            .into_iter()
            .map(|r| {
                let owner = link.owner(&self.keys.channel(&r));
                (r, owner)
            })
            .collect();
        let reason = format!("connection lost ({reason}); reconnecting");
        match &scope {
            None => self
                .subs
                .broadcast_error(|| error::unavailable(reason.clone())),
            Some(rooms) => self
                .subs
                .error_where(|r| rooms.contains(r), || error::unavailable(reason.clone())),
        }
        self.affected = scope;
    }

    /// The end of an outage: `Lagged` to the subscribers of the rooms that may have lost
    /// messages: those of [`affected`](Self::affected), and those whose master changed.
    fn tell_lagged(&mut self, link: &Link) {
        let before = std::mem::take(&mut self.owners_before);
        match self.affected.take() {
            None => self.subs.broadcast_error(|| Error::Lagged { missed: 0 }),
            Some(mut rooms) => {
                for r in self.subs.rooms() {
                    let now = link.owner(&self.keys.channel(&r));
                    if before.get(&r).copied().flatten() != now || now.is_none() {
                        rooms.insert(r);
                    }
                }
                self.subs
                    .error_where(|r| rooms.contains(r), || Error::Lagged { missed: 0 });
            }
        }
    }

    /// Sleeps `wait` while answering requests (with `Unavailable`). Returns true on shutdown.
    ///
    /// A cluster link keeps delivering meanwhile what its healthy masters' connections bring
    /// (their subscriptions are intact), so that one shard's failover does not stall the
    /// others' rooms; a further loss is noted like the first.
    async fn wait_down(&mut self, wait: Duration, mut link: Option<&mut Link>) -> bool {
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return false,
                cmd = self.commands.recv() => match cmd {
                    None => return true,
                    Some(Command::Subscribe { reply, .. }) => {
                        let _ = reply.send(Err(error::unavailable(
                            "the connection to redis is down; reconnecting",
                        )));
                    }
                    // Nothing is subscribed upstream while down: the re-subscribe after the
                    // outage reads the rooms from the registry.
                    Some(Command::Vacated(_)) => {}
                },
                event = kept_event(&mut link) => match (event, link.as_deref()) {
                    (Event::Message(msg), _) => self.dispatch(&msg),
                    (Event::NodeLost { node, reason }, Some(l)) => self.lost(&reason, Some(node), l),
                    (Event::Lost(reason), Some(l)) => self.lost(&reason, None, l),
                    (_, None) => {}
                },
            }
        }
    }

    async fn with_timeout<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> std::result::Result<T, String> {
        let timeout = self.timing.command_timeout;
        match tokio::time::timeout(timeout, f).await {
            Err(_) => Err(format!("{what}: no answer within {timeout:?}")),
            Ok(Err(e)) => Err(RedisBrokerError::from_redis(what, e, timeout).to_string()),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Subscribes every room (and the pattern) that local subscriptions want.
    async fn resubscribe_all(&mut self, link: &mut Link) -> std::result::Result<(), String> {
        let rooms: Vec<Room> = self.subs.rooms();
        for chunk in rooms.chunks(CHUNK) {
            let channels: Vec<String> = chunk.iter().map(|r| self.keys.channel(r)).collect();
            self.with_timeout("SUBSCRIBE", link.subscribe(&channels))
                .await?;
            self.subscribed.extend(chunk.iter().cloned());
        }
        let wanted: HashSet<String> = rooms.iter().map(|r| self.keys.channel(r)).collect();
        self.with_timeout("UNSUBSCRIBE", link.prune(&wanted))
            .await?;
        if self.subs.has_all() {
            self.with_timeout("PSUBSCRIBE", link.subscribe_all(&self.keys))
                .await?;
            self.psubscribed = true;
        }
        Ok(())
    }

    /// Serves one connection until it fails or the broker is dropped.
    async fn session(&mut self, link: &mut Link) -> End {
        // Due one `ping_interval` after the last sign of life: a hung server is noticed within
        // `ping_interval + command_timeout` of its last message (a fixed-period tick would
        // ping up to two intervals after it). Re-armed when it fires, not on every message.
        let interval = self.timing.ping_interval;
        let idle = tokio::time::sleep(interval);
        tokio::pin!(idle);
        let mut last_activity = Instant::now();
        loop {
            tokio::select! {
                biased;
                cmd = self.commands.recv() => {
                    let Some(first) = cmd else { return End::Shutdown };
                    let mut batch = vec![first];
                    // Requests that queued up meanwhile share one round trip.
                    while let Ok(c) = self.commands.try_recv() {
                        batch.push(c);
                    }
                    if let Err(reason) = self.apply(batch, link).await {
                        return End::Lost(reason, None);
                    }
                    last_activity = Instant::now();
                }
                () = self.shared.overflow.notified() => {
                    // Vacated requests were dropped on a full queue: `apply` re-checks them all.
                    if let Err(reason) = self.apply(Vec::new(), link).await {
                        return End::Lost(reason, None);
                    }
                    last_activity = Instant::now();
                }
                () = &mut idle => {
                    let due = last_activity + interval;
                    if Instant::now() >= due {
                        if let Err(reason) = self.with_timeout("PING", link.barrier()).await {
                            return End::Lost(reason, None);
                        }
                        last_activity = Instant::now();
                        idle.as_mut().reset(tokio::time::Instant::from_std(last_activity + interval));
                    } else {
                        idle.as_mut().reset(tokio::time::Instant::from_std(due));
                    }
                }
                event = link.next() => match event {
                    Event::Lost(reason) => return End::Lost(reason, None),
                    Event::NodeLost { node, reason } => return End::Lost(reason, Some(node)),
                    Event::Message(msg) => {
                        last_activity = Instant::now();
                        // A subscriber found gone here comes back as a `Vacated` request.
                        self.dispatch(&msg);
                    }
                },
            }
        }
    }

    /// Applies a batch of requests: one `UNSUBSCRIBE` for rooms nobody wants any more, one
    /// `SUBSCRIBE` for new rooms, a barrier, then the new subscriptions are activated.
    async fn apply(
        &mut self,
        batch: Vec<Command>,
        link: &mut Link,
    ) -> std::result::Result<(), String> {
        let mut joining = Vec::new();
        let mut touched: HashSet<Room> = HashSet::new();
        let mut touched_all = false;
        if self.shared.vacated_overflow.swap(false, Ordering::AcqRel) {
            // Some rooms left empty were not reported: any subscribed one may be.
            touched.extend(self.subscribed.iter().cloned());
            touched_all = true;
        }
        for cmd in batch {
            match cmd {
                Command::Vacated(vacated) => {
                    touched.extend(vacated.rooms);
                    touched_all |= vacated.all;
                }
                Command::Subscribe { pending, reply } => joining.push((pending, reply)),
            }
        }
        // A caller that gave up already (its subscription dropped) needs no SUBSCRIBE.
        joining.retain(|(pending, reply): &(Pending, _)| {
            !pending.is_cancelled() && !reply.is_closed()
        });
        let mut wanted: HashSet<Room> = HashSet::new();
        let mut want_all = false;
        for (pending, _) in &joining {
            match pending.interest() {
                Interest::All => want_all = true,
                Interest::Rooms(rooms) => wanted.extend(rooms.iter().cloned()),
            }
        }
        let leave: Vec<String> = touched
            .iter()
            .filter(|r| {
                self.subscribed.contains(*r) && !self.subs.has_room(r) && !wanted.contains(*r)
            })
            .map(|r| self.keys.channel(r))
            .collect();
        let enter: Vec<Room> = wanted
            .iter()
            .filter(|r| !self.subscribed.contains(*r))
            .cloned()
            .collect();
        let result = async {
            if !leave.is_empty() {
                self.with_timeout("UNSUBSCRIBE", link.unsubscribe(&leave))
                    .await?;
                for r in &touched {
                    if !self.subs.has_room(r) && !wanted.contains(r) {
                        self.subscribed.remove(r);
                    }
                }
            }
            if touched_all && self.psubscribed && !self.subs.has_all() && !want_all {
                self.with_timeout("PUNSUBSCRIBE", link.unsubscribe_all(&self.keys))
                    .await?;
                self.psubscribed = false;
            }
            for chunk in enter.chunks(CHUNK) {
                let channels: Vec<String> = chunk.iter().map(|r| self.keys.channel(r)).collect();
                self.with_timeout("SUBSCRIBE", link.subscribe(&channels))
                    .await?;
                self.subscribed.extend(chunk.iter().cloned());
            }
            if want_all && !self.psubscribed {
                self.with_timeout("PSUBSCRIBE", link.subscribe_all(&self.keys))
                    .await?;
                self.psubscribed = true;
            }
            if !joining.is_empty() {
                // The barrier: replies come in order with messages, so once this PONG is here
                // every message published before `subscribe` was called has been read.
                self.with_timeout("PING", link.barrier()).await?;
            }
            Ok::<_, String>(())
        }
        .await;
        if let Err(reason) = result {
            for (_, reply) in joining {
                let _ = reply.send(Err(error::unavailable(reason.clone())));
            }
            return Err(reason);
        }
        // Deliver what was read before the barrier to the subscriptions that were there.
        while let Some(next) = link.try_next() {
            match next {
                Event::Message(msg) => self.dispatch(&msg),
                Event::Lost(reason) | Event::NodeLost { reason, .. } => {
                    for (_, reply) in joining {
                        let _ = reply.send(Err(error::unavailable(reason.clone())));
                    }
                    return Err(reason);
                }
            }
        }
        for (pending, reply) in joining {
            // A caller that stopped waiting would never receive from this subscription.
            if reply.is_closed() || !pending.activate() {
                continue;
            }
            // Should the caller give up right now, dropping its subscription removes it.
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    /// Hands one message to the local subscriptions that want it.
    fn dispatch(&mut self, msg: &redis::Msg) {
        let counters = &self.shared.counters;
        counters.received.fetch_add(1, Ordering::Relaxed);
        let channel = msg.get_channel_name();
        // In cluster mode, `Interest::All` subscribers listen to the broadcast channel, which
        // names no room: its envelopes are checked by decoding alone.
        let broadcast = channel == self.keys.broadcast();
        let room_name = self.keys.room_of_channel(channel);
        if room_name.is_none() && !broadcast {
            counters.decode_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
        let env = match codec::decode(&payload) {
            Ok(env) if broadcast || Some(env.room.as_str()) == room_name => env,
            Ok(_) => {
                counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    channel = msg.get_channel_name(),
                    "envelope of another room dropped"
                );
                return;
            }
            Err(e) => {
                counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(channel = msg.get_channel_name(), error = %e, "undecodable frame dropped");
                return;
            }
        };
        // A message of a room arrives twice when both are subscribed: on its channel for the
        // room's subscribers, and through the pattern for `Interest::All` ones.
        let target = if msg.from_pattern() || broadcast {
            Target::ALL_SUBSCRIBERS
        } else {
            Target::ROOM_SUBSCRIBERS
        };
        let delivered = self.subs.dispatch_to(&env, target);
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        counters
            .delivered
            .fetch_add(count(delivered.sent), Ordering::Relaxed);
        counters
            .dropped
            .fetch_add(count(delivered.dropped), Ordering::Relaxed);
    }
}

/// The next event of a cluster link's kept connections; never, for a single Redis's link
/// (which is gone while down) or none.
async fn kept_event(link: &mut Option<&mut Link>) -> Event {
    match link {
        Some(Link::Cluster(c)) => c.next().await,
        _ => std::future::pending().await,
    }
}

impl Drop for Actor {
    fn drop(&mut self) {
        // Also when the task is aborted (the broker was dropped): dropping the senders ends
        // every local subscription.
        self.subs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #11: subscriptions dropped while the actor is busy (here: never reading) cannot
    /// grow its queue past [`COMMAND_QUEUE`]; what did not fit is one flag and one wake-up.
    /// (On the unbounded queue before, all 10,240 requests were queued.)
    #[tokio::test]
    async fn dropped_subscriptions_cannot_grow_the_command_queue() {
        let shared = Arc::new(Shared::new());
        let (tx, mut rx) = command_channel();
        let subs = registry(16, &tx, &shared);
        for i in 0..10 * COMMAND_QUEUE {
            let room = Room::new(format!("r{i}")).expect("room");
            drop(subs.subscribe(Interest::room(room)));
        }
        assert!(rx.len() <= COMMAND_QUEUE, "{} requests queued", rx.len());
        assert!(shared.vacated_overflow.load(Ordering::Acquire));
        // The actor is woken to reconcile, even though nothing more is queued after the drain.
        while rx.try_recv().is_ok() {}
        tokio::time::timeout(Duration::from_secs(1), shared.overflow.notified())
            .await
            .expect("the actor is woken for the dropped requests");
    }

    #[test]
    fn backoff_doubles_from_min_up_to_max_with_jitter_in_the_upper_half() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for attempt in 0..40 {
            let step = min.saturating_mul(1 << attempt.min(20)).min(max);
            for _ in 0..50 {
                let wait = backoff(min, max, attempt, &mut seed);
                assert!(
                    wait >= step / 2 && wait <= step,
                    "attempt {attempt}: {wait:?} outside [{:?}, {step:?}]",
                    step / 2
                );
            }
        }
        // Two instances that start from different seeds do not retry in lockstep.
        let (mut a, mut b) = (1u64, 2u64);
        let same = (0..20)
            .filter(|_| backoff(min, max, 5, &mut a) == backoff(min, max, 5, &mut b))
            .count();
        assert!(same < 20, "jitter never differed");
    }
}
