//! [`RedisBroker`]: the [`Broker`] over Redis pub/sub and, optionally, Redis Streams.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chatbus_core::backend::{codec, history_stream, Subscribers};
use chatbus_core::{
    Broker, Capabilities, Cursor, Envelope, Error, Health, HistoryStream, Interest, Receipt,
    ReplayFrom, Result, Room, Subscription,
};
use redis::aio::ConnectionManagerConfig;
use redis::Value;
use tokio::sync::mpsc;

use crate::config::RedisConfig;
use crate::error::{self, BACKEND};
use crate::link::{Connector, Link, Publisher};
use crate::subscriber::{self, Actor, Command, ConnState, Shared, Timing};
use crate::tickets;
use crate::wire::{self, Keys};

/// Entries read per `XRANGE` while scanning the window for a replay by time.
const SCAN_PAGE: usize = 256;

/// A [`Broker`] over Redis: pub/sub for live fan-out between instances, and an optional
/// history window in Redis Streams. See the [crate docs](crate) for how it works.
///
/// - **publish**: one `PUBLISH` (or, for durable messages with the history window on, one
///   atomic script: number, append to the stream, publish). Returns once Redis ran it. With
///   the window off the envelope's `cursor` travels unchanged and the receipt has none.
/// - **subscribe**: only the rooms of the interest are subscribed in Redis (`Interest::All`
///   is one pattern subscription over the prefix), on one pub/sub connection per broker that
///   all local subscriptions share.
/// - **ordering**: Redis runs the commands of one connection in order and delivers a
///   channel's messages in the order it ran the publishes, so a room has one order for every
///   subscriber, and one caller's awaited publishes keep theirs.
/// - **slow subscribers**: each subscription has a buffer of
///   [`RedisConfig::subscriber_capacity`]; when it is full its messages are dropped (for it
///   only) and it gets `Err(Lagged { missed })`.
/// - **reconnects**: when the connection drops, subscribers get `Err(Unavailable)` (once per
///   outage); the broker reconnects with capped exponential backoff, re-subscribes every
///   room, then yields `Err(Lagged { missed: 0 })` so that subscribers resync from their
///   cursors (what was published meanwhile is lost to the live stream, and still in the
///   window if it is on). Only a connection that served for 5 s is retried at once when it
///   drops; a re-subscribe that fails (an ACL denying `SUBSCRIBE`) or a connection the
///   server closes soon after it opened keeps backing off, so a server that keeps refusing
///   is not hammered.
///   Publishes and new subscriptions fail meanwhile (within
///   [`RedisConfig::command_timeout`]); [`health`](Broker::health) reports `Down`, then
///   `Degraded` while re-subscribing. On a Redis Cluster ([`RedisConfig::with_cluster`]) a
///   lost master affects only the subscriptions of the rooms it served: the connections to
///   the other masters are kept (see the crate docs).
/// - **epochs**: a room's sequence lives in one hash with its epoch, drawn when the sequence
///   is created, so a Redis that lost the sequence (`FLUSHALL`, eviction, failover to a
///   replica that missed writes) also starts a new epoch: cursors of the old log are answered
///   with `Error::CursorReset` by `replay`/`history`, and the Hub never takes them for bounds.
/// - **history**: `replay`/`history` read the window (the last
///   [`RedisConfig::history_len`] durable messages of each room), or return
///   `Error::Unsupported` when it is off. The window lives in Redis memory (and its
///   persistence, if configured), so `capabilities().durable` is false.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    keys: Keys,
    publisher: Publisher,
    script: redis::Script,
    head_script: redis::Script,
    fanout_script: redis::Script,
    ticket_scripts: tickets::Scripts,
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    // Local subscriptions; the actor activates them and unsubscribes the rooms they leave.
    subs: Subscribers,
    actor: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Ends the pub/sub connection and, with it, every subscription.
        self.actor.abort();
    }
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBroker")
            .field("config", &self.inner.config)
            .field("state", &self.inner.shared.state())
            .finish_non_exhaustive()
    }
}

/// Counters of one [`RedisBroker`], from [`RedisBroker::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStats {
    /// Messages published successfully.
    pub published: u64,
    /// Publishes that failed (including timeouts).
    pub publish_errors: u64,
    /// Messages read from the pub/sub connection.
    pub received: u64,
    /// Messages handed to local subscriptions (one per subscription).
    pub delivered: u64,
    /// Messages dropped because a subscription's buffer was full.
    pub dropped: u64,
    /// Frames that failed to decode (or named the wrong room), dropped.
    pub decode_errors: u64,
    /// Successful reconnects of the pub/sub connection.
    pub reconnects: u64,
}

impl RedisBroker {
    /// Connects to Redis: opens the pub/sub connection and the publishing connection.
    ///
    /// Fails at once (within [`RedisConfig::connect_timeout`]) when the server cannot be
    /// reached or refuses the credentials — an `Error::Backend` whose message starts with
    /// "authentication failed" for a wrong password — rather than retrying in the background.
    /// Once connected, the broker reconnects by itself.
    ///
    /// Must be called inside a Tokio runtime.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        #[cfg(feature = "tls")]
        {
            // rustls needs a process-wide crypto provider; keep one that the application may
            // have installed already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let keys = Keys::new(&config.prefix);
        let (connector, publisher, first) = if config.is_cluster() {
            Self::connect_cluster(&config, &keys).await?
        } else {
            Self::connect_single(&config, &keys).await?
        };
        let shared = Arc::new(Shared::new());
        let (commands, rx) = subscriber::command_channel();
        let subs = subscriber::registry(config.subscriber_capacity, &commands, &shared);
        let actor = Actor::new(
            connector,
            publisher.clone(),
            keys.clone(),
            shared.clone(),
            subs.clone(),
            rx,
            Timing::of(&config),
        );
        let actor = tokio::spawn(actor.run(first)).abort_handle();
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                keys,
                publisher,
                script: redis::Script::new(wire::PUBLISH_SCRIPT),
                head_script: redis::Script::new(wire::HEAD_SCRIPT),
                fanout_script: redis::Script::new(wire::FANOUT_SCRIPT),
                ticket_scripts: tickets::Scripts::default(),
                shared,
                commands,
                subs,
                actor,
            }),
        })
    }

    /// A single Redis: a pub/sub connection and a connection manager.
    async fn connect_single(
        config: &RedisConfig,
        keys: &Keys,
    ) -> Result<(Connector, Publisher, Link)> {
        let info = config.connection_info()?;
        let client = Self::client(config, info)?;
        // The pub/sub connection first: it reports an unreachable server or a wrong password
        // straight away, where the connection manager would retry with backoff.
        let connector = Connector::Single(client.clone());
        let first = connector
            .connect(keys, config.connect_timeout, config.command_timeout)
            .await?;
        let cm_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_min_delay(config.backoff_min)
            .set_max_delay(config.backoff_max)
            .set_exponent_base(2.0)
            // Many concurrent publishes are pipelined on the one connection: let them queue.
            .set_pipeline_buffer_size(4096);
        let publisher = match tokio::time::timeout(
            config.connect_timeout,
            client.get_connection_manager_with_config(cm_config),
        )
        .await
        {
            Err(_) => return Err(error::timeout("connect", config.connect_timeout)),
            Ok(Err(e)) => return Err(error::map("connect", e, config.connect_timeout)),
            Ok(Ok(c)) => c,
        };
        // A server with a password accepts a connection that sent none and refuses its first
        // command (NOAUTH): find out now, not at the first publish.
        let mut probe = publisher.clone();
        match tokio::time::timeout(
            config.connect_timeout,
            redis::cmd("PING").query_async::<String>(&mut probe),
        )
        .await
        {
            Err(_) => return Err(error::timeout("connect", config.connect_timeout)),
            Ok(Err(e)) => return Err(error::map("connect", e, config.connect_timeout)),
            Ok(Ok(_)) => {}
        }
        Ok((connector, Publisher::Single(publisher), first))
    }

    /// A Redis Cluster: a cluster connection for commands (it follows `MOVED` and fails
    /// over by itself) and the sharded pub/sub link of [`crate::cluster`].
    async fn connect_cluster(
        config: &RedisConfig,
        keys: &Keys,
    ) -> Result<(Connector, Publisher, Link)> {
        let nodes = config.cluster_nodes()?;
        let settings = config.connection_info()?.redis_settings().clone();
        let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.command_timeout)
            // Retries of one command (MOVED, a node down) stay within the command timeout,
            // which bounds every operation anyway.
            .min_retry_wait(u64::try_from(config.backoff_min.as_millis()).unwrap_or(100))
            .max_retry_wait(u64::try_from(config.backoff_max.as_millis()).unwrap_or(2000));
        if let Some(pw) = settings.password() {
            builder = builder.password(pw);
        }
        if let Some(user) = settings.username() {
            builder = builder.username(user);
        }
        let client = builder
            .build()
            .map_err(|e| error::config(format!("invalid Redis Cluster settings: {e}")))?;
        let t = config.connect_timeout;
        let publisher = match tokio::time::timeout(t, client.get_async_connection()).await {
            Err(_) => return Err(error::timeout("connect", t)),
            Ok(Err(e)) => return Err(error::map("connect", e, t)),
            Ok(Ok(c)) => c,
        };
        let connector = Connector::Cluster {
            publisher: publisher.clone(),
            settings,
        };
        let first = connector
            .connect(keys, config.connect_timeout, config.command_timeout)
            .await?;
        Ok((connector, Publisher::Cluster(publisher), first))
    }

    fn client(config: &RedisConfig, info: redis::ConnectionInfo) -> Result<redis::Client> {
        let bad =
            |e: redis::RedisError| error::config(format!("invalid Redis connection settings: {e}"));
        #[cfg(feature = "tls")]
        if let Some(path) = &config.tls_ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                error::config(format!(
                    "cannot read the TLS CA file {}: {e}",
                    path.display()
                ))
            })?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            return redis::Client::build_with_tls(info, certs).map_err(bad);
        }
        // Without the feature, validation already refused TLS settings.
        #[cfg(not(feature = "tls"))]
        let _ = config;
        redis::Client::open(info).map_err(bad)
    }

    /// The configuration it was connected with.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RedisStats {
        let c = &self.inner.shared.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        RedisStats {
            published: get(&c.published),
            publish_errors: get(&c.publish_errors),
            received: get(&c.received),
            delivered: get(&c.delivered),
            dropped: get(&c.dropped),
            decode_errors: get(&c.decode_errors),
            reconnects: get(&c.reconnects),
        }
    }

    fn history_on(&self) -> bool {
        self.inner.config.history_len > 0
    }

    fn require_history(&self, what: &'static str) -> Result<()> {
        if self.history_on() {
            Ok(())
        } else {
            Err(Error::Unsupported {
                backend: BACKEND,
                what,
            })
        }
    }

    /// Runs `f` within the command timeout.
    pub(crate) async fn bounded<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let t = self.inner.config.command_timeout;
        tokio::time::timeout(t, f)
            .await
            .unwrap_or_else(|_| Err(error::timeout(op, t)))
    }

    /// What the ticket counters (`tickets.rs`) run their scripts through: the command
    /// connection, the key names, the scripts and the command timeout.
    pub(crate) fn ticket_parts(&self) -> (Publisher, &Keys, &tickets::Scripts, Duration) {
        let inner = &self.inner;
        (
            inner.publisher.clone(),
            &inner.keys,
            &inner.ticket_scripts,
            inner.config.command_timeout,
        )
    }

    async fn publish_inner(&self, env: &Envelope) -> Result<Receipt> {
        let inner = &self.inner;
        let t = inner.config.command_timeout;
        let mut conn = inner.publisher.clone();
        let channel = inner.keys.channel(&env.room);
        let cluster = inner.config.is_cluster();
        // On a cluster, room channels are shard channels; the broadcast copy is for
        // `Interest::All` subscribers (see `RedisConfig::cluster_broadcast`).
        let publish_cmd = if cluster { "SPUBLISH" } else { "PUBLISH" };
        let broadcast = if cluster && inner.config.cluster_broadcast {
            inner.keys.broadcast()
        } else {
            String::new()
        };
        if env.is_durable() && self.history_on() {
            let (bytes, pos) = wire::encode_for_script(env)?;
            let (seq, epoch): (u64, u32) = inner
                .script
                .key(inner.keys.meta(&env.room))
                .key(inner.keys.stream(&env.room))
                .key(inner.keys.legacy_seq(&env.room))
                .arg(channel)
                .arg(bytes.as_ref())
                .arg(pos)
                .arg(inner.config.history_len)
                .arg(Cursor::new_epoch())
                .arg(publish_cmd)
                .arg(&broadcast)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| error::map("publish", e, t))?;
            return Ok(Receipt {
                id: env.id,
                cursor: Some(Cursor::with_epoch(0, seq, epoch)),
            });
        }
        let bytes = if self.history_on() && env.cursor.is_some() {
            // With the window on, cursors are this broker's sequence numbers; an ephemeral
            // message has none.
            let mut e = env.clone();
            e.cursor = None;
            codec::encode(&e)?
        } else {
            codec::encode(env)?
        };
        if broadcast.is_empty() {
            let _receivers: i64 = redis::cmd(publish_cmd)
                .arg(channel)
                .arg(bytes.as_ref())
                .query_async(&mut conn)
                .await
                .map_err(|e| error::map("publish", e, t))?;
        } else {
            let _: i64 = inner
                .fanout_script
                .key(channel)
                .arg(bytes.as_ref())
                .arg(&broadcast)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| error::map("publish", e, t))?;
        }
        Ok(Receipt {
            id: env.id,
            cursor: None,
        })
    }

    /// One `XRANGE` page: `(sequence number, envelope)` in stream order.
    async fn xrange(&self, room: &Room, start: &str, count: usize) -> Result<Vec<(u64, Envelope)>> {
        let t = self.inner.config.command_timeout;
        let mut conn = self.inner.publisher.clone();
        let reply: Value = redis::cmd("XRANGE")
            .arg(self.inner.keys.stream(room))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await
            .map_err(|e| error::map("replay", e, t))?;
        Ok(self.parse_entries(reply))
    }

    /// Turns an `XRANGE`/`XREVRANGE` reply into envelopes, skipping (and counting) entries
    /// that do not decode.
    fn parse_entries(&self, reply: Value) -> Vec<(u64, Envelope)> {
        let Value::Array(entries) = reply else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let parsed = parse_entry(entry);
            match parsed {
                Some(item) => out.push(item),
                None => {
                    self.inner
                        .shared
                        .counters
                        .decode_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        out
    }

    fn check_cursor(c: Cursor) -> Result<()> {
        if c.partition == 0 {
            Ok(())
        } else {
            Err(Error::InvalidCursor(c.to_string()))
        }
    }

    /// The head of the room's log (last sequence number and epoch), `None` if it has none.
    async fn log_head(&self, room: &Room) -> Result<Option<wire::LogHead>> {
        let t = self.inner.config.command_timeout;
        let mut conn = self.inner.publisher.clone();
        let head: Vec<u64> = self
            .inner
            .head_script
            .key(self.inner.keys.meta(room))
            .key(self.inner.keys.legacy_seq(room))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| error::map("replay", e, t))?;
        Ok(match head[..] {
            [seq, epoch] => Some(wire::LogHead {
                seq,
                epoch: u32::try_from(epoch).unwrap_or(0),
            }),
            _ => None,
        })
    }

    /// A cursor of this room's log as it is now: of its epoch, not beyond its end (see
    /// `Error::CursorReset`). One more round trip, paid by resumes and "load older" only.
    async fn check_in_log(&self, room: &Room, c: Cursor) -> Result<()> {
        Self::check_cursor(c)?;
        wire::check_cursor(c, self.log_head(room).await?)
    }
}

/// One stream entry `[id, [field, value, ...]]` → `(seq, envelope)`.
fn parse_entry(entry: Value) -> Option<(u64, Envelope)> {
    let Value::Array(mut parts) = entry else {
        return None;
    };
    if parts.len() != 2 {
        return None;
    }
    let fields = parts.pop()?;
    let id = parts.pop()?;
    let seq = match id {
        Value::BulkString(b) => std::str::from_utf8(&b)
            .ok()?
            .split_once('-')?
            .0
            .parse::<u64>()
            .ok()?,
        _ => return None,
    };
    let Value::Array(fields) = fields else {
        return None;
    };
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if matches!(&k, Value::BulkString(name) if name.as_slice() == wire::FIELD.as_bytes()) {
            if let Value::BulkString(bytes) = v {
                let env = codec::decode(&Bytes::from(bytes)).ok()?;
                return Some((seq, env));
            }
        }
    }
    None
}

#[async_trait]
impl Broker for RedisBroker {
    fn name(&self) -> &'static str {
        BACKEND
    }

    /// See [`RedisBroker`]: one `PUBLISH`, or the history script for durable messages when the
    /// window is on. Fails with `Unavailable`/`Timeout` during an outage (never waits past
    /// [`RedisConfig::command_timeout`]); the message may then not have been published.
    async fn publish(&self, envelope: &Envelope) -> Result<Receipt> {
        let r = self.bounded("publish", self.publish_inner(envelope)).await;
        let c = &self.inner.shared.counters;
        match &r {
            Ok(_) => c.published.fetch_add(1, Ordering::Relaxed),
            Err(_) => c.publish_errors.fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    /// See [`RedisBroker`]: the subscription is live when this returns (Redis confirmed the
    /// `SUBSCRIBE`). Fails with `Unavailable` while disconnected.
    async fn subscribe(&self, interest: Interest) -> Result<Subscription> {
        if matches!(interest, Interest::All)
            && self.inner.config.is_cluster()
            && !self.inner.config.cluster_broadcast
        {
            return Err(error::config(
                "Interest::All on a Redis Cluster needs the broadcast channel: set \
                 RedisConfig::with_cluster_broadcast(true) (CHATBUS_REDIS_CLUSTER_BROADCAST=true); \
                 every message then also reaches every node",
            ));
        }
        if let Interest::Rooms(rooms) = &interest {
            if rooms.is_empty() {
                // Nothing to subscribe in Redis; the subscription simply never yields.
                let (tx, sub) = Subscription::channel(1);
                return Ok(sub.with_guard(tx));
            }
        }
        subscriber::subscribe(
            &self.inner.shared,
            &self.inner.commands,
            &self.inner.subs,
            interest,
            self.inner.config.command_timeout,
        )
        .await
    }

    /// Reads the window (`XRANGE`). `ReplayFrom::Time` scans the window from its oldest entry
    /// (it is bounded), since stream ids are sequence numbers, not times.
    /// `Error::Unsupported` when the window is off.
    async fn replay(&self, room: &Room, from: ReplayFrom, limit: usize) -> Result<HistoryStream> {
        self.require_history("replay")?;
        if limit == 0 {
            return Ok(history_stream(Vec::new()));
        }
        let items = self
            .bounded("replay", async {
                match from {
                    ReplayFrom::Beginning => Ok(self.xrange(room, "-", limit).await?),
                    ReplayFrom::Cursor(c) => {
                        self.check_in_log(room, c).await?;
                        match c.offset.checked_add(1) {
                            Some(next) => {
                                Ok(self.xrange(room, &wire::entry_id(next), limit).await?)
                            }
                            None => Ok(Vec::new()),
                        }
                    }
                    ReplayFrom::Time(ms) => {
                        let mut out = Vec::new();
                        let mut start = "-".to_owned();
                        loop {
                            let page = self.xrange(room, &start, SCAN_PAGE).await?;
                            let full = page.len() == SCAN_PAGE;
                            let Some(&(last, _)) = page.last() else { break };
                            out.extend(page.into_iter().filter(|(_, e)| e.ts >= ms));
                            if out.len() >= limit || !full {
                                break;
                            }
                            start = wire::entry_id(last.saturating_add(1));
                        }
                        out.truncate(limit);
                        Ok(out)
                    }
                }
            })
            .await?;
        Ok(history_stream(items.into_iter().map(|(_, e)| e).collect()))
    }

    /// The newest `limit` entries of the window before `before` (`XREVRANGE`), oldest first.
    /// `Error::Unsupported` when the window is off.
    async fn history(
        &self,
        room: &Room,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<chatbus_core::HistoryPage> {
        self.require_history("history")?;
        let end = match before {
            None => "+".to_owned(),
            Some(c) => {
                self.bounded("history", self.check_in_log(room, c)).await?;
                match c.offset.checked_sub(1) {
                    // Every entry of sequence number `offset - 1`, whatever its id's second
                    // part.
                    Some(prev) if prev > 0 => format!("{prev}-{}", u64::MAX),
                    _ => return Ok(chatbus_core::HistoryPage::default()),
                }
            }
        };
        if limit == 0 {
            return Ok(chatbus_core::HistoryPage::default());
        }
        let t = self.inner.config.command_timeout;
        let mut conn = self.inner.publisher.clone();
        let reply: Value = self
            .bounded("history", async {
                redis::cmd("XREVRANGE")
                    .arg(self.inner.keys.stream(room))
                    .arg(&end)
                    .arg("-")
                    .arg("COUNT")
                    .arg(limit)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| error::map("history", e, t))
            })
            .await?;
        let mut items: Vec<Envelope> = self
            .parse_entries(reply)
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        items.reverse();
        // XREVRANGE with COUNT reads the stream's index, not a bounded scan: always complete.
        Ok(chatbus_core::HistoryPage::complete(items))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable: false,
            replay: self.history_on(),
            room_order: true,
            interest_filtering: true,
        }
    }

    /// Per-room ticket counters in Redis (`tickets.rs`), for an interest-based DualBus.
    fn tickets(&self) -> Option<&dyn chatbus_core::Tickets> {
        Some(self)
    }

    /// `Down` while the pub/sub connection is lost (publishes fail), `Degraded` while it
    /// re-subscribes after a reconnect; otherwise a `PING` on the publishing connection
    /// (bounded by [`RedisConfig::command_timeout`]) decides between `Healthy` and `Down`.
    async fn health(&self) -> Health {
        match self.inner.shared.state() {
            ConnState::Down { since, reason } => Health::Down(format!(
                "redis connection lost {:.1}s ago, reconnecting: {reason}",
                since.elapsed().as_secs_f64()
            )),
            ConnState::Resubscribing { .. } => {
                Health::Degraded("redis reconnected, re-subscribing rooms".to_owned())
            }
            ConnState::Up => {
                let t = self.inner.config.command_timeout;
                let mut conn = self.inner.publisher.clone();
                let ping = self
                    .bounded("health", async {
                        redis::cmd("PING")
                            .query_async::<String>(&mut conn)
                            .await
                            .map_err(|e| error::map("health", e, t))
                    })
                    .await;
                match ping {
                    Ok(_) => Health::Healthy,
                    Err(e) => Health::Down(format!("redis publishing connection: {e}")),
                }
            }
        }
    }
}
