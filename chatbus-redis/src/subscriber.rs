//! The subscriber: one dedicated pub/sub connection per broker, owned by one task (the
//! "actor") that subscribes, dispatches messages to local subscriptions and reconnects.
//!
//! Only the actor touches the table of local subscriptions, and it handles their arrival and
//! departure in order with the messages of the connection. That order is what makes the
//! subscription contract hold:
//!
//! - a new subscription is added only after Redis confirmed its `SUBSCRIBE` (or a `PING`, when
//!   the channel was already subscribed) and after every message read before that
//!   confirmation was dispatched, so it receives exactly the messages published after
//!   `subscribe` returned, never an older one still in flight;
//! - the last local subscription of a room leaving sends `UNSUBSCRIBE` from the same task, so
//!   it can never overtake the `SUBSCRIBE` of a newer subscription to that room.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatbus_core::{
    codec, Error, Interest, Result, Room, SendOutcome, Subscription, SubscriptionSender,
};
use futures::{FutureExt, StreamExt};
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{mpsc, oneshot};

use crate::error::{self, RedisBrokerError};
use crate::wire::Keys;

/// Channels per `SUBSCRIBE` command when re-subscribing many rooms at once.
const CHUNK: usize = 512;

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
    next_id: AtomicU64,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(ConnState::Up),
            counters: Counters::default(),
            next_id: AtomicU64::new(1),
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
        id: u64,
        interest: Interest,
        sender: SubscriptionSender,
        reply: oneshot::Sender<Result<()>>,
    },
    Unsubscribe {
        id: u64,
        interest: Interest,
    },
}

/// Sends `Unsubscribe` when the [`Subscription`] it is attached to is dropped.
struct Guard {
    cmd: mpsc::UnboundedSender<Command>,
    id: u64,
    interest: Option<Interest>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(interest) = self.interest.take() {
            // Fails only when the actor is gone, and then there is nothing to clean up.
            let _ = self.cmd.send(Command::Unsubscribe {
                id: self.id,
                interest,
            });
        }
    }
}

/// What the broker's `subscribe` does: asks the actor and waits for its answer.
pub(crate) async fn subscribe(
    shared: &Shared,
    cmd: &mpsc::UnboundedSender<Command>,
    interest: Interest,
    capacity: usize,
    timeout: Duration,
) -> Result<Subscription> {
    if let ConnState::Down { reason, .. } = shared.state() {
        return Err(error::unavailable(format!(
            "cannot subscribe while disconnected ({reason}); reconnecting"
        )));
    }
    let (sender, sub) = Subscription::channel(capacity);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (reply, answer) = oneshot::channel();
    // Armed before the request: if we stop waiting (timeout, or the caller drops this future)
    // after the actor added the subscription, the guard removes it again.
    let guard = Guard {
        cmd: cmd.clone(),
        id,
        interest: Some(interest.clone()),
    };
    cmd.send(Command::Subscribe {
        id,
        interest,
        sender,
        reply,
    })
    .map_err(|_| Error::Closed)?;
    match tokio::time::timeout(timeout, answer).await {
        Err(_) => Err(error::timeout("subscribe", timeout)),
        Ok(Err(_)) => Err(Error::Closed),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Ok(Ok(()))) => Ok(sub.with_guard(guard)),
    }
}

/// Local subscriptions: only the actor touches them.
#[derive(Default)]
struct Table {
    rooms: HashMap<Room, Vec<(u64, SubscriptionSender)>>,
    all: Vec<(u64, SubscriptionSender)>,
}

impl Table {
    fn insert(&mut self, id: u64, interest: &Interest, sender: SubscriptionSender) {
        match interest {
            Interest::All => self.all.push((id, sender)),
            Interest::Rooms(rooms) => {
                for room in rooms {
                    self.rooms
                        .entry(room.clone())
                        .or_default()
                        .push((id, sender.clone()));
                }
            }
        }
    }

    fn remove(&mut self, id: u64, interest: &Interest) {
        match interest {
            Interest::All => self.all.retain(|(i, _)| *i != id),
            Interest::Rooms(rooms) => {
                for room in rooms {
                    if let Some(list) = self.rooms.get_mut(room) {
                        list.retain(|(i, _)| *i != id);
                        if list.is_empty() {
                            self.rooms.remove(room);
                        }
                    }
                }
            }
        }
    }

    fn for_each_sender(&self, mut f: impl FnMut(&SubscriptionSender)) {
        for (_, s) in self.rooms.values().flatten().chain(&self.all) {
            f(s);
        }
    }

    fn clear(&mut self) {
        self.rooms.clear();
        self.all.clear();
    }
}

/// Why a connection's session ended.
enum End {
    /// The broker was dropped: stop.
    Shutdown,
    /// The connection failed: reconnect.
    Lost(String),
}

/// Everything the actor needs to (re)connect.
pub(crate) struct Actor {
    pub(crate) client: redis::Client,
    // The publishing connection, checked before subscribers are told to resync (they replay
    // through it).
    publisher: redis::aio::ConnectionManager,
    pub(crate) keys: Keys,
    pub(crate) shared: Arc<Shared>,
    pub(crate) commands: mpsc::UnboundedReceiver<Command>,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) ping_interval: Duration,
    table: Table,
    // What Redis has confirmed on the current connection.
    subscribed: HashSet<Room>,
    psubscribed: bool,
    // Rooms whose last subscriber may have gone (a closed sender seen while dispatching).
    maybe_empty: HashSet<Room>,
    // The same for the pattern subscription.
    all_maybe_empty: bool,
    // Subscribers were told Unavailable and not yet Lagged (the outage is still going on).
    told_down: bool,
}

/// Opens the pub/sub connection (authenticating), bounded by `timeout`.
pub(crate) async fn connect_pubsub(
    client: &redis::Client,
    timeout: Duration,
) -> Result<(PubSubSink, PubSubStream)> {
    match tokio::time::timeout(timeout, client.get_async_pubsub()).await {
        Err(_) => Err(error::timeout("connect", timeout)),
        Ok(Err(e)) => Err(error::map("connect", e, timeout)),
        Ok(Ok(p)) => Ok(p.split()),
    }
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
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        client: redis::Client,
        publisher: redis::aio::ConnectionManager,
        keys: Keys,
        shared: Arc<Shared>,
        commands: mpsc::UnboundedReceiver<Command>,
        connect_timeout: Duration,
        command_timeout: Duration,
        backoff_min: Duration,
        backoff_max: Duration,
        ping_interval: Duration,
    ) -> Self {
        Self {
            client,
            publisher,
            keys,
            shared,
            commands,
            connect_timeout,
            command_timeout,
            backoff_min,
            backoff_max,
            ping_interval,
            table: Table::default(),
            subscribed: HashSet::new(),
            psubscribed: false,
            maybe_empty: HashSet::new(),
            all_maybe_empty: false,
            told_down: false,
        }
    }

    /// Runs until the broker is dropped (the command channel closes), starting with an
    /// established connection.
    pub(crate) async fn run(mut self, first: (PubSubSink, PubSubStream)) {
        let mut conn = Some(first);
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
                let wait = backoff(self.backoff_min, self.backoff_max, attempt, &mut seed);
                attempt = attempt.saturating_add(1);
                if self.wait_down(wait).await {
                    return self.shutdown();
                }
            }
            let (mut sink, mut stream) = match conn.take() {
                Some(c) => c,
                None => match connect_pubsub(&self.client, self.connect_timeout).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, attempt, "redis reconnect failed");
                        self.note_down(&e.to_string());
                        wait_first = true;
                        continue;
                    }
                },
            };
            if reconnecting {
                self.set_resubscribing();
                if let Err(e) = self.resubscribe_all(&mut sink).await {
                    tracing::warn!(error = %e, attempt, "redis re-subscribe failed");
                    self.lost(&e);
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
                // stream, so every subscriber is told to resync from its cursor.
                self.table.for_each_sender(|s| {
                    let _: SendOutcome = s.send_error(Error::Lagged { missed: 0 });
                });
                self.told_down = false;
                tracing::info!(rooms = self.subscribed.len(), "redis pub/sub reconnected");
            }
            self.shared.set_state(ConnState::Up);
            let opened = Instant::now();
            match self.session(&mut sink, &mut stream).await {
                End::Shutdown => return self.shutdown(),
                End::Lost(reason) => {
                    tracing::warn!(%reason, attempt, "redis pub/sub connection lost");
                    self.lost(&reason);
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

    fn shutdown(mut self) {
        // Dropping the senders ends every local subscription.
        self.table.clear();
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

    /// The connection broke: forget what it had subscribed and tell every subscriber, once
    /// per outage (a failed re-subscribe is the same outage going on, and repeating the
    /// notice would only fill their buffers).
    fn lost(&mut self, reason: &str) {
        self.note_down(reason);
        self.subscribed.clear();
        self.psubscribed = false;
        if std::mem::replace(&mut self.told_down, true) {
            return;
        }
        let reason = format!("connection lost ({reason}); reconnecting");
        self.table.for_each_sender(|s| {
            let _: SendOutcome = s.send_error(error::unavailable(reason.clone()));
        });
    }

    /// Sleeps `wait` while answering requests (with `Unavailable`). Returns true on shutdown.
    async fn wait_down(&mut self, wait: Duration) -> bool {
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
                    Some(Command::Unsubscribe { id, interest }) => self.table.remove(id, &interest),
                },
            }
        }
    }

    async fn with_timeout<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> std::result::Result<T, String> {
        match tokio::time::timeout(self.command_timeout, f).await {
            Err(_) => Err(format!(
                "{what}: no answer within {:?}",
                self.command_timeout
            )),
            Ok(Err(e)) => {
                Err(RedisBrokerError::from_redis(what, e, self.command_timeout).to_string())
            }
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Subscribes every room (and the pattern) that local subscriptions want.
    async fn resubscribe_all(&mut self, sink: &mut PubSubSink) -> std::result::Result<(), String> {
        let rooms: Vec<Room> = self.table.rooms.keys().cloned().collect();
        for chunk in rooms.chunks(CHUNK) {
            let channels: Vec<String> = chunk.iter().map(|r| self.keys.channel(r)).collect();
            self.with_timeout("SUBSCRIBE", sink.subscribe(&channels))
                .await?;
            self.subscribed.extend(chunk.iter().cloned());
        }
        if !self.table.all.is_empty() {
            self.with_timeout("PSUBSCRIBE", sink.psubscribe(self.keys.pattern()))
                .await?;
            self.psubscribed = true;
        }
        Ok(())
    }

    /// Serves one connection until it fails or the broker is dropped.
    async fn session(&mut self, sink: &mut PubSubSink, stream: &mut PubSubStream) -> End {
        let mut ping = tokio::time::interval(self.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    if let Err(reason) = self.apply(batch, sink, stream).await {
                        return End::Lost(reason);
                    }
                    last_activity = Instant::now();
                }
                _ = ping.tick() => {
                    if last_activity.elapsed() >= self.ping_interval {
                        if let Err(reason) = self.with_timeout("PING", sink.ping::<redis::Value>()).await {
                            return End::Lost(reason);
                        }
                        last_activity = Instant::now();
                    }
                }
                msg = stream.next() => match msg {
                    None => return End::Lost("the server closed the connection".into()),
                    Some(msg) => {
                        last_activity = Instant::now();
                        self.dispatch(&msg);
                        if !self.maybe_empty.is_empty() || self.all_maybe_empty {
                            if let Err(reason) = self.apply(Vec::new(), sink, stream).await {
                                return End::Lost(reason);
                            }
                        }
                    }
                },
            }
        }
    }

    /// Applies a batch of requests: one `UNSUBSCRIBE` for rooms nobody wants any more, one
    /// `SUBSCRIBE` for new rooms, a barrier, then the new subscriptions join the table.
    async fn apply(
        &mut self,
        batch: Vec<Command>,
        sink: &mut PubSubSink,
        stream: &mut PubSubStream,
    ) -> std::result::Result<(), String> {
        let mut joining = Vec::new();
        let mut touched: HashSet<Room> = std::mem::take(&mut self.maybe_empty);
        let mut touched_all = std::mem::take(&mut self.all_maybe_empty);
        for cmd in batch {
            match cmd {
                Command::Unsubscribe { id, interest } => {
                    match &interest {
                        Interest::All => touched_all = true,
                        Interest::Rooms(rooms) => touched.extend(rooms.iter().cloned()),
                    }
                    // Also cancels a request still in this batch (its caller gave up).
                    joining.retain(|(i, _, _, _): &(u64, _, _, _)| *i != id);
                    self.table.remove(id, &interest);
                }
                Command::Subscribe {
                    id,
                    interest,
                    sender,
                    reply,
                } => joining.push((id, interest, sender, reply)),
            }
        }
        let mut wanted: HashSet<Room> = HashSet::new();
        let mut want_all = false;
        for (_, interest, _, _) in &joining {
            match interest {
                Interest::All => want_all = true,
                Interest::Rooms(rooms) => wanted.extend(rooms.iter().cloned()),
            }
        }
        let leave: Vec<String> = touched
            .iter()
            .filter(|r| {
                self.subscribed.contains(*r)
                    && !self.table.rooms.contains_key(*r)
                    && !wanted.contains(*r)
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
                self.with_timeout("UNSUBSCRIBE", sink.unsubscribe(&leave))
                    .await?;
                for r in &touched {
                    if !self.table.rooms.contains_key(r) && !wanted.contains(r) {
                        self.subscribed.remove(r);
                    }
                }
            }
            if touched_all && self.psubscribed && self.table.all.is_empty() && !want_all {
                self.with_timeout("PUNSUBSCRIBE", sink.punsubscribe(self.keys.pattern()))
                    .await?;
                self.psubscribed = false;
            }
            for chunk in enter.chunks(CHUNK) {
                let channels: Vec<String> = chunk.iter().map(|r| self.keys.channel(r)).collect();
                self.with_timeout("SUBSCRIBE", sink.subscribe(&channels))
                    .await?;
                self.subscribed.extend(chunk.iter().cloned());
            }
            if want_all && !self.psubscribed {
                self.with_timeout("PSUBSCRIBE", sink.psubscribe(self.keys.pattern()))
                    .await?;
                self.psubscribed = true;
            }
            if !joining.is_empty() {
                // The barrier: replies come in order with messages, so once this PONG is here
                // every message published before `subscribe` was called has been read.
                self.with_timeout("PING", sink.ping::<redis::Value>())
                    .await?;
            }
            Ok::<_, String>(())
        }
        .await;
        if let Err(reason) = result {
            for (_, _, _, reply) in joining {
                let _ = reply.send(Err(error::unavailable(reason.clone())));
            }
            return Err(reason);
        }
        // Deliver what was read before the barrier to the subscriptions that were there.
        while let Some(next) = stream.next().now_or_never() {
            match next {
                Some(msg) => self.dispatch(&msg),
                None => break,
            }
        }
        for (id, interest, sender, reply) in joining {
            // A caller that stopped waiting would never receive from this subscription.
            if reply.is_closed() {
                continue;
            }
            self.table.insert(id, &interest, sender);
            if reply.send(Ok(())).is_err() {
                self.table.remove(id, &interest);
            }
        }
        Ok(())
    }

    /// Hands one message to the local subscriptions that want it.
    fn dispatch(&mut self, msg: &redis::Msg) {
        let counters = &self.shared.counters;
        counters.received.fetch_add(1, Ordering::Relaxed);
        let Some(room_name) = self.keys.room_of_channel(msg.get_channel_name()) else {
            counters.decode_errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
        let env = match codec::decode(&payload) {
            Ok(env) if env.room.as_str() == room_name => env,
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
        let targets = if msg.from_pattern() {
            Some(&mut self.table.all)
        } else {
            self.table.rooms.get_mut(&env.room)
        };
        let Some(targets) = targets else { return };
        let mut closed = false;
        for (_, tx) in targets.iter() {
            match tx.send(env.clone()) {
                SendOutcome::Sent => counters.delivered.fetch_add(1, Ordering::Relaxed),
                SendOutcome::Dropped => counters.dropped.fetch_add(1, Ordering::Relaxed),
                SendOutcome::Closed => {
                    closed = true;
                    0
                }
            };
        }
        if closed {
            // Normally the guard's Unsubscribe removes it; this covers a subscriber that
            // vanished without one.
            targets.retain(|(_, tx)| !tx.is_closed());
            if targets.is_empty() {
                if msg.from_pattern() {
                    self.all_maybe_empty = true;
                } else {
                    self.table.rooms.remove(&env.room);
                    self.maybe_empty.insert(env.room);
                }
            }
        }
    }
}
