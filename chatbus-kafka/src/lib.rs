//! [`KafkaBroker`]: the durable chatbus broker on Kafka (or anything that speaks the Kafka
//! protocol, such as Tansu or Redpanda).
//!
//! Every message is stored in one topic before `publish` returns, so nothing acknowledged is
//! lost and anything missed can be replayed by offset or by time. Use it alone (every message
//! then takes the Kafka path, a few milliseconds), or as the durable half of `DualBus` with
//! Redis as the fast path.
//!
//! ```no_run
//! use chatbus_core::{Broker, Envelope, Interest, ReplayFrom, Room};
//! use chatbus_kafka::{KafkaBroker, KafkaConfig};
//! use futures::StreamExt;
//!
//! # async fn run() -> chatbus_core::Result<()> {
//! // CHATBUS_KAFKA_BROKERS=kafka:9092 CHATBUS_KAFKA_TOPIC=chat ...
//! let broker = KafkaBroker::connect(KafkaConfig::from_env()?).await?;
//! let room = Room::new("general")?;
//!
//! let mut live = broker.subscribe(Interest::room(room.clone())).await?;
//! let receipt = broker.publish(&Envelope::new(room.clone(), "hello")).await?;
//! let got = live.recv().await.expect("subscription open")?;
//! assert_eq!(got.cursor, receipt.cursor); // "3-1041": partition 3, offset 1041
//!
//! // Later: everything after a cursor the client kept.
//! if let Some(cursor) = receipt.cursor {
//!     let mut missed = broker.replay(&room, ReplayFrom::Cursor(cursor), 100).await?;
//!     while let Some(env) = missed.next().await {
//!         println!("{:?}", env?);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! - **One topic** ([`KafkaConfig::topic`], created with the admin API when missing with
//!   [`KafkaConfig::partitions`] partitions). A record is one message: key = room name, value =
//!   the envelope in chatbus' binary encoding ([`chatbus_core::codec`]), timestamp = the
//!   envelope's `ts`. The partition is `murmur2(room) % partitions` (Kafka's own keyed
//!   partitioning, computed here so that replay knows where a room lives), so all messages of
//!   a room are in one partition, in one order. A cursor is `partition-offset`.
//! - **Publish**: an idempotent producer (`enable.idempotence=true`, `acks=all`): retries after
//!   a lost connection never duplicate or reorder a record. `publish` returns after the
//!   acknowledgement, with the record's offset as cursor, or fails with `Error::Timeout` /
//!   `Error::Unavailable` within [`KafkaConfig::publish_timeout`] while the cluster is
//!   unreachable; a producer that gave up on a message is replaced by a fresh one (new
//!   producer id) for the next publish. [`KafkaConfig::linger`] (default 0) trades latency
//!   for batching.
//! - **Ephemeral** messages (typing, presence) are produced to the same topic, so a Kafka-only
//!   deployment still carries them between instances, in order with the room's other
//!   messages; they are delivered live with no cursor, and skipped by `replay` and `history`.
//!   They do occupy offsets: in a partition, the offsets of *durable* messages are contiguous
//!   except where an ephemeral record sits between them.
//! - **Subscribe**: one tail consumer per `KafkaBroker`, started by the first `subscribe`,
//!   reads every partition from its end (`assign`, no consumer group: each instance sees
//!   every message and no rebalance ever pauses it) and dispatches each record to the local
//!   subscriptions of its room. [`Subscription::start`](chatbus_core::Subscription::start)
//!   gives, per partition, the first offset the subscription delivers: the end of the
//!   partition when `subscribe` was called. When the cluster goes away, the consumer keeps
//!   retrying and resumes at the next offset when it returns, so the live stream has no gap
//!   (Kafka keeps what was published meanwhile). Delivery latency on Kafka is a few
//!   milliseconds; on Tansu it is about [`KafkaConfig::fetch_wait`] (Tansu holds every fetch
//!   for the full wait), so set that to 10–20 ms there.
//! - **Replay** reads the room's partition from the cursor, from the first offset at or after
//!   a time (`ListOffsets` by timestamp) or from the beginning, keeps that room's durable
//!   messages, and stops at `limit` or at the partition's end as it was when the replay
//!   started. **History** reads backwards from a cursor (or the end) in growing chunks until
//!   it has a page, bounded by [`KafkaConfig::history_scan_limit`] records.
//! - **Replay readers**: replay and history read with a pool of consumers, at most
//!   [`KafkaConfig::max_concurrent_replays`] (default 8) reading at once, each on a blocking
//!   thread; further calls queue in arrival order for up to [`KafkaConfig::request_timeout`],
//!   then fail with `Error::Timeout`. A replay stream reads up to 512 messages per turn and
//!   holds them while its caller drains it, with the reader already back in the pool, so
//!   thousands of clients resuming at once cost a few consumers and threads, not one each.
//!   Dropping a replay future or stream stops its read and gives the reader back.
//!
//! The client is rust-rdkafka 0.39 over librdkafka 2.12, built from source (bundled, no
//! system library, so the version is the one tested): it has everything this broker needs
//! (idempotence, offsets by time, manual assignment, SASL/TLS, any librdkafka property through
//! [`KafkaConfig::with_property`]) and librdkafka is the library most Kafka clients share. It
//! is re-exported as [`rdkafka`]. The crate feature `ssl` builds librdkafka with OpenSSL for
//! TLS and SASL SCRAM.
//!
//! Retention: what the topic's retention keeps bounds what `replay` and `history` return.
//! Dropping the last clone of a `KafkaBroker` stops the tail consumer and closes every
//! client on background threads (closing a librdkafka client blocks).
//!
//! Tested against Tansu 0.6 (see `docs/ARCHITECTURE.md`, "Kafka on Tansu", for the gaps found
//! there and the workarounds in this crate).

#![cfg_attr(docsrs, feature(doc_cfg))]

mod client;
mod config;
mod partition;
mod producer;
mod reader;
mod tail;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chatbus_core::{
    codec, Broker, Capabilities, Cursor, Envelope, Error, Health, HistoryStream, Interest, Receipt,
    ReplayFrom, Result, Room, Subscription,
};
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use tokio::sync::OnceCell;

pub use config::{KafkaConfig, ENV_PROP_PREFIX};
/// The rdkafka version this crate is built with, for custom configuration or tooling.
pub use rdkafka;

use client::{Context, BACKEND};
use producer::{Producer, ProducerSlot};
use reader::{is_of, Cancel, CancelOnDrop, Readers};
use tail::Tail;

/// How long `health` waits for the cluster to answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Most messages a replay reads per turn with a reader. The stream holds them while its caller
/// drains it, with the reader already given back, so a slow client never keeps a reader (or a
/// blocking thread) busy; past them, it waits for a reader again and reads on. As large as the
/// Hub's default catch-up page, which then takes one turn.
const REPLAY_CHUNK: usize = 512;

/// The Kafka broker. Cheap to clone (clones share the clients and the tail consumer).
///
/// See the [crate docs](crate) for how it maps chatbus onto Kafka, and [`Broker`] for the
/// contract of each method.
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    partitions: u32,
    ctx: Context,
    producer: ProducerSlot,
    tail: OnceCell<Tail>,
    readers: Arc<Readers>,
    published: AtomicU64,
    publish_errors: AtomicU64,
}

/// Counters of a [`KafkaBroker`], for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct KafkaStats {
    /// Messages acknowledged by the cluster.
    pub published: u64,
    /// Publishes that failed.
    pub publish_errors: u64,
    /// Records read by the tail consumer.
    pub tail_records: u64,
    /// Records the tail consumer dropped because they did not decode.
    pub malformed: u64,
    /// Times the tail consumer found records missing (retention deleted them while it was
    /// behind); subscribers were told they lagged.
    pub gaps: u64,
    /// Errors librdkafka reported (mostly connection failures).
    pub client_errors: u64,
    /// Live subscriptions (one per room for a subscription to several rooms).
    pub subscriptions: usize,
    /// Times the producer was replaced by a fresh one after a failed delivery (see
    /// `docs/ARCHITECTURE.md`, "Kafka on Tansu").
    pub producer_replacements: u64,
    /// Replay readers (librdkafka consumers for `replay` and `history`) created so far. At
    /// most [`KafkaConfig::max_concurrent_replays`] exist at once; they are reused.
    pub replay_readers: u64,
    /// Replay and history reads running now (at most
    /// [`KafkaConfig::max_concurrent_replays`]).
    pub replays_active: usize,
    /// Replay and history calls waiting for a free reader now.
    pub replays_waiting: usize,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("brokers", &self.inner.config.brokers)
            .field("topic", &self.inner.config.topic)
            .field("partitions", &self.inner.partitions)
            .finish_non_exhaustive()
    }
}

impl KafkaBroker {
    /// Connects to the cluster, creates the topic if it is missing (and
    /// [`KafkaConfig::create_topic`] allows it) and waits until every partition has a leader.
    ///
    /// Errors: `Error::Config` for a bad configuration or a missing topic that may not be
    /// created, `Error::Unavailable` / `Error::Timeout` when the cluster does not answer within
    /// [`KafkaConfig::request_timeout`].
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let ctx = Context::default();
        let producer = ProducerSlot::new(&config, &ctx)?;
        let partitions = ensure_topic(&config, &ctx, &producer.peek()).await?;
        let readers = Arc::new(Readers::new(config.clone(), ctx.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                partitions,
                ctx,
                producer,
                tail: OnceCell::new(),
                readers,
                published: AtomicU64::new(0),
                publish_errors: AtomicU64::new(0),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// The number of partitions of the topic (read at connect).
    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// The partition that holds `room`'s messages.
    pub fn partition_of(&self, room: &Room) -> u32 {
        partition::partition_for(room.as_str().as_bytes(), self.inner.partitions)
    }

    /// Counters for metrics.
    pub fn stats(&self) -> KafkaStats {
        let tail = self.inner.tail.get().map(Tail::stats);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        KafkaStats {
            published: load(&self.inner.published),
            publish_errors: load(&self.inner.publish_errors),
            tail_records: tail.map_or(0, |t| load(&t.records)),
            malformed: tail.map_or(0, |t| load(&t.malformed)),
            gaps: tail.map_or(0, |t| load(&t.gaps)),
            client_errors: load(&self.inner.ctx.conn.errors),
            subscriptions: self.inner.tail.get().map_or(0, Tail::subscriptions),
            producer_replacements: self.inner.producer.replaced(),
            replay_readers: load(&self.inner.readers.created),
            replays_active: self.inner.readers.active(),
            replays_waiting: self.inner.readers.waiting(),
        }
    }

    /// Waits until every message handed to the producer is acknowledged or failed, at most
    /// `timeout` (for a graceful shutdown; `publish` already waits for its own message).
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let producer = self.inner.producer.peek();
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)))
            .await
            .map_err(|e| Error::backend(BACKEND, e))?
            .map_err(|e| client::map_error("flush", e, timeout, &self.inner.ctx.conn))
    }

    async fn tail(&self) -> Result<&Tail> {
        self.inner
            .tail
            .get_or_try_init(|| async {
                let (config, ctx, readers) = (
                    self.inner.config.clone(),
                    self.inner.ctx.clone(),
                    self.inner.readers.clone(),
                );
                let partitions = self.inner.partitions;
                let slot = readers.acquire().await?;
                blocking(move || {
                    let lease = slot.lease()?;
                    let ends = readers.end_offsets(&lease, partitions);
                    drop(lease);
                    Tail::start(&config, ctx, ends?)
                })
                .await
            })
            .await
    }

    /// The end offset of every partition, read through the tail consumer's client.
    async fn end_offsets(&self, tail: &Tail) -> Result<Vec<i64>> {
        let consumer = tail.consumer().clone();
        let readers = self.inner.readers.clone();
        let partitions = self.inner.partitions;
        blocking(move || readers.end_offsets(&consumer, partitions)).await
    }

    /// The room's partition, checking that `cursor` (if any) belongs to it.
    fn partition_for_cursor(&self, room: &Room, cursor: Option<Cursor>) -> Result<u32> {
        let partition = self.partition_of(room);
        match cursor {
            Some(c) if c.partition != partition => Err(Error::InvalidCursor(format!(
                "{c} is not a cursor of room {room} (partition {partition})"
            ))),
            _ => Ok(partition),
        }
    }
}

/// Runs blocking librdkafka calls off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::backend(BACKEND, e))?
}

/// Creates the topic if needed and waits for its partitions to have leaders; returns the
/// partition count.
async fn ensure_topic(
    config: &KafkaConfig,
    ctx: &Context,
    producer: &Arc<Producer>,
) -> Result<u32> {
    let deadline = Instant::now() + config.request_timeout;
    let topic = config.topic.clone();
    let mut created = false;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let probe = {
            let (producer, topic) = (producer.clone(), topic.clone());
            let wait = remaining
                .min(Duration::from_secs(2))
                .max(Duration::from_millis(100));
            blocking(move || Ok(describe(&producer, &topic, wait))).await?
        };
        match probe {
            TopicState::Ready(n) => {
                ctx.conn.mark_up();
                return Ok(n);
            }
            TopicState::Missing if !config.create_topic => {
                return Err(Error::Config(format!(
                    "Kafka topic {topic:?} does not exist and create_topic is off"
                )));
            }
            TopicState::Missing if !created => {
                create_topic(config, ctx).await?;
                created = true;
            }
            TopicState::Missing | TopicState::NotReady => {}
            TopicState::Unreachable(reason) => {
                if Instant::now() >= deadline {
                    return Err(Error::Unavailable {
                        backend: BACKEND,
                        reason: format!(
                            "cannot reach Kafka at {} within {:?}: {reason}",
                            config.brokers, config.request_timeout
                        ),
                    });
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                backend: BACKEND,
                op: "waiting for the topic's partition leaders",
                after: config.request_timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

enum TopicState {
    Ready(u32),
    Missing,
    NotReady,
    Unreachable(String),
}

fn describe(producer: &Producer, topic: &str, wait: Duration) -> TopicState {
    let md = match producer.client().fetch_metadata(Some(topic), wait) {
        Ok(md) => md,
        Err(e) => return TopicState::Unreachable(e.to_string()),
    };
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return TopicState::Missing;
    };
    match t.error().map(RDKafkaErrorCode::from) {
        None => {}
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            return TopicState::Missing;
        }
        Some(_) => return TopicState::NotReady,
    }
    let parts = t.partitions();
    if parts.is_empty() || parts.iter().any(|p| p.leader() < 0 || p.error().is_some()) {
        return TopicState::NotReady;
    }
    match u32::try_from(parts.len()) {
        Ok(n) => TopicState::Ready(n),
        Err(_) => TopicState::NotReady,
    }
}

async fn create_topic(config: &KafkaConfig, ctx: &Context) -> Result<()> {
    let admin: AdminClient<Context> = client::admin_config(config)
        .create_with_context(ctx.clone())
        .map_err(|e| Error::backend(BACKEND, e))?;
    let partitions = i32::try_from(config.partitions).unwrap_or(i32::MAX);
    let replication = i32::try_from(config.replication).unwrap_or(1);
    let topic = NewTopic::new(
        &config.topic,
        partitions,
        TopicReplication::Fixed(replication),
    );
    let opts = AdminOptions::new().request_timeout(Some(config.request_timeout));
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .map_err(|e| client::map_error("create topic", e, config.request_timeout, &ctx.conn))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(Error::backend(
                    BACKEND,
                    format!("cannot create topic {name:?}: {code}"),
                ));
            }
        }
    }
    tracing::info!(topic = %config.topic, partitions, replication, "created Kafka topic");
    Ok(())
}

#[async_trait]
impl Broker for KafkaBroker {
    fn name(&self) -> &'static str {
        BACKEND
    }

    /// Produces the message to its room's partition and waits for `acks=all`.
    ///
    /// The receipt's cursor is the record's `partition-offset` (none for ephemeral messages,
    /// which are produced too but never replayed). Fails with `Error::Timeout` or
    /// `Error::Unavailable` within [`KafkaConfig::publish_timeout`] when the cluster is
    /// unreachable; such a message may still have been stored (an ack lost in transit).
    async fn publish(&self, envelope: &Envelope) -> Result<Receipt> {
        let config = &self.inner.config;
        // The log position is the record's own offset: never store a stale cursor.
        let value = if envelope.cursor.is_some() {
            codec::encode(&Envelope {
                cursor: None,
                ..envelope.clone()
            })?
        } else {
            codec::encode(envelope)?
        };
        if value.len() > config.max_message_bytes {
            return Err(Error::TooLarge {
                size: value.len(),
                limit: config.max_message_bytes,
            });
        }
        let partition = reader::to_i32(self.partition_of(&envelope.room))?;
        let record = FutureRecord::to(&config.topic)
            .key(envelope.room.as_str())
            .payload(&value[..])
            .partition(partition)
            .timestamp(i64::try_from(envelope.ts).unwrap_or(i64::MAX));
        let producer = self.inner.producer.get()?;
        let timeout = config.publish_timeout;
        // librdkafka fails the message after `message.timeout.ms` (= publish_timeout); the
        // outer bound only guards against a lost callback.
        let sent = tokio::time::timeout(
            timeout + Duration::from_secs(1),
            producer.send(record, Timeout::After(timeout)),
        )
        .await;
        let result = match sent {
            Ok(Ok(delivery)) => {
                self.inner.ctx.conn.mark_up();
                self.inner.published.fetch_add(1, Ordering::Relaxed);
                let cursor = envelope.is_durable().then(|| {
                    Cursor::new(
                        u32::try_from(delivery.partition).unwrap_or(0),
                        u64::try_from(delivery.offset).unwrap_or(0),
                    )
                });
                Ok(Receipt {
                    id: envelope.id,
                    cursor,
                })
            }
            Ok(Err((e, _))) => {
                self.inner.publish_errors.fetch_add(1, Ordering::Relaxed);
                self.inner.producer.failed(&producer, Some(&e));
                Err(client::map_error(
                    "publish",
                    e,
                    timeout,
                    &self.inner.ctx.conn,
                ))
            }
            Err(_) => {
                self.inner.publish_errors.fetch_add(1, Ordering::Relaxed);
                self.inner.producer.failed(&producer, None);
                Err(Error::Timeout {
                    backend: BACKEND,
                    op: "publish",
                    after: timeout,
                })
            }
        };
        self.inner.producer.release(producer);
        result
    }

    /// Registers a subscription with the shared tail consumer (started by the first call).
    ///
    /// Delivers every message (durable and ephemeral) of the rooms of interest from the end
    /// of each partition at the time of the call, in log order, which is publish order within
    /// a room. `start()` is set to that position per partition. Durable messages carry their
    /// cursor, ephemeral ones none.
    ///
    /// Slow subscriber: a full buffer ([`KafkaConfig::subscriber_capacity`]) drops messages for
    /// that subscriber only, which then gets `Err(Error::Lagged)` and resyncs with `replay`.
    /// Cluster outage: the subscription stays open and silent; the consumer reconnects and
    /// resumes at the next offset, so nothing published meanwhile is missed. Subscribing
    /// during an outage works once the tail consumer runs (it starts from where the tail is);
    /// the very first `subscribe` needs the cluster, to learn where the partitions end.
    async fn subscribe(&self, interest: Interest) -> Result<Subscription> {
        let tail = self.tail().await?;
        // Normally start at the current end offsets (so nothing older is delivered even when
        // the tail is behind). When the cluster is known to be unreachable, start where the
        // tail is: still no message published after this call can be missed, since its offset
        // will be at or after the tail's position.
        let ends = if self.inner.ctx.conn.is_down() {
            Vec::new()
        } else {
            match self.end_offsets(tail).await {
                Ok(ends) => ends,
                Err(e) => {
                    tracing::warn!(error = %e, "end offsets unavailable; subscribing at the tail's position");
                    Vec::new()
                }
            }
        };
        Ok(tail.subscribe(interest, &ends))
    }

    /// Streams the room's durable messages after a cursor, from a time, or from the
    /// beginning, up to `limit` and up to the end of the partition when the call was made.
    ///
    /// `Error::InvalidCursor` for a cursor of another partition than the room's.
    /// `Error::Timeout` when no replay reader came free within
    /// [`KafkaConfig::request_timeout`] (see [`KafkaConfig::max_concurrent_replays`]); the
    /// stream waits for one the same way before each further chunk of 512 messages.
    async fn replay(&self, room: &Room, from: ReplayFrom, limit: usize) -> Result<HistoryStream> {
        let cursor = match from {
            ReplayFrom::Cursor(c) => Some(c),
            _ => None,
        };
        let partition = self.partition_for_cursor(room, cursor)?;
        if limit == 0 {
            return Ok(chatbus_core::history_stream(Vec::new()));
        }
        let readers = self.inner.readers.clone();
        // Set if this future (and later the stream) is dropped: the read stops early.
        let cancel = CancelOnDrop::default();
        let since = match from {
            ReplayFrom::Time(ms) => Some(ms),
            _ => None,
        };
        // Plan and read the first chunk with one reader, so that errors (cluster down) are
        // returned by `replay` itself.
        let slot = readers.acquire().await?;
        let first = blocking({
            let (readers, room, token) = (readers.clone(), room.clone(), cancel.token());
            move || {
                let lease = slot.lease()?;
                let Some((start, end)) = plan(&readers, &lease, partition, from)? else {
                    return Ok(None);
                };
                let mut rest = ReplayRest {
                    room,
                    partition,
                    since,
                    next: start,
                    end,
                    left: limit,
                };
                let chunk = rest.read(&readers, &lease, true, &token)?;
                Ok(Some((chunk, rest)))
            }
        })
        .await?;
        let Some((chunk, rest)) = first else {
            return Ok(chatbus_core::history_stream(Vec::new()));
        };
        if rest.is_done() {
            return Ok(chatbus_core::history_stream(chunk));
        }
        let state = ReplayState {
            readers,
            rest,
            chunk: chunk.into_iter(),
            failed: false,
            cancel,
        };
        Ok(futures::stream::unfold(state, ReplayState::next).boxed())
    }

    /// Reads the room's partition backwards from `before` (or its end) in growing chunks and
    /// returns the newest `limit` durable messages of the room, oldest first. Reads at most
    /// [`KafkaConfig::history_scan_limit`] records, so a quiet room in a busy partition may
    /// get a short page. Shares the replay readers: `Error::Timeout` when none came free
    /// within [`KafkaConfig::request_timeout`].
    async fn history(
        &self,
        room: &Room,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<Envelope>> {
        let partition = self.partition_for_cursor(room, before)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let readers = self.inner.readers.clone();
        let room = room.clone();
        let scan_limit = i64::try_from(self.inner.config.history_scan_limit).unwrap_or(i64::MAX);
        // Set if this future is dropped: the scan stops early and gives its reader back.
        let cancel = CancelOnDrop::default();
        let token = cancel.token();
        let slot = readers.acquire().await?;
        let page = blocking(move || {
            let lease = slot.lease()?;
            history_page(
                &readers, &lease, partition, &room, before, limit, scan_limit, &token,
            )
        })
        .await;
        drop(cancel);
        page
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable: true,
            replay: true,
            room_order: true,
            interest_filtering: false,
        }
    }

    /// `Healthy` when the cluster answers a metadata request for the topic within 2 s,
    /// `Down` otherwise (with the reason) or after a fatal producer error.
    async fn health(&self) -> Health {
        let producer = self.inner.producer.peek();
        if let Some((_, reason)) = producer.client().fatal_error() {
            return Health::Down(format!("fatal Kafka producer error: {reason}"));
        }
        let topic = self.inner.config.topic.clone();
        let probe = blocking(move || Ok(describe(&producer, &topic, HEALTH_TIMEOUT))).await;
        match probe {
            Ok(TopicState::Ready(_)) => {
                self.inner.ctx.conn.mark_up();
                Health::Healthy
            }
            Ok(TopicState::Unreachable(reason)) => Health::Down(format!(
                "Kafka unreachable at {}: {reason}",
                self.inner.config.brokers
            )),
            Ok(TopicState::Missing) => Health::Down(format!(
                "Kafka topic {:?} does not exist",
                self.inner.config.topic
            )),
            Ok(TopicState::NotReady) => Health::Degraded(format!(
                "a partition of Kafka topic {:?} has no leader",
                self.inner.config.topic
            )),
            Err(e) => Health::Down(e.to_string()),
        }
    }
}

/// The offsets `start..end` a replay reads, or `None` when there is nothing to read.
fn plan(
    readers: &Readers,
    reader: &reader::Reader,
    partition: u32,
    from: ReplayFrom,
) -> Result<Option<(i64, i64)>> {
    let (low, high) = readers.watermarks(reader, partition)?;
    let start = match from {
        ReplayFrom::Beginning => low,
        ReplayFrom::Cursor(c) => i64::try_from(c.offset)
            .ok()
            .and_then(|o| o.checked_add(1))
            .ok_or_else(|| Error::InvalidCursor(c.to_string()))?,
        ReplayFrom::Time(ms) => match readers.offset_for_time(reader, partition, ms)? {
            Some(o) => o,
            None => return Ok(None),
        },
    };
    // Below `low`, retention has deleted the records: start with what is left.
    let start = start.max(low);
    Ok((start < high).then_some((start, high)))
}

/// Where a replay goes on from, and what it still may return.
#[derive(Clone)]
struct ReplayRest {
    room: Room,
    partition: u32,
    since: Option<u64>,
    /// The next offset to read.
    next: i64,
    /// The end of the partition when the replay started.
    end: i64,
    /// Messages it may still return (the limit, less what it read).
    left: usize,
}

impl ReplayRest {
    fn is_done(&self) -> bool {
        self.left == 0 || self.next >= self.end
    }

    /// Reads the next chunk of the room's messages (at most [`REPLAY_CHUNK`]) with `reader`,
    /// and moves the position past it. Blocking.
    fn read(
        &mut self,
        readers: &Readers,
        reader: &reader::Reader,
        first: bool,
        cancel: &Cancel,
    ) -> Result<Vec<Envelope>> {
        let max = self.left.min(REPLAY_CHUNK);
        let mut items = Vec::new();
        let mut is_first = first;
        let mut stop = false;
        let (room, since) = (&self.room, self.since);
        readers.scan(reader, self.partition, self.next, self.end, cancel, |env| {
            let first = std::mem::take(&mut is_first);
            let Some(env) = env else {
                return ControlFlow::Continue(());
            };
            if let Some(ms) = since {
                // Kafka answers a time lookup with the first offset whose timestamp is at or
                // after it, so that record is never older. Tansu 0.6 answers 0 instead of
                // "none" when every record is older: detect it here.
                if first && env.ts < ms {
                    stop = true;
                    return ControlFlow::Break(());
                }
                // Timestamps of one room need not be monotonic (several producers' clocks):
                // keep exactly the messages at or after the time.
                if env.ts < ms {
                    return ControlFlow::Continue(());
                }
            }
            if !is_of(&env, room) {
                return ControlFlow::Continue(());
            }
            items.push(env);
            if items.len() >= max {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        self.left -= items.len();
        // A full chunk stopped at its last message; anything else read up to the end.
        let last = items
            .last()
            .and_then(|e| e.cursor)
            .and_then(|c| i64::try_from(c.offset).ok());
        self.next = match last {
            Some(offset) if !stop && items.len() >= max => offset + 1,
            _ => self.end,
        };
        Ok(items)
    }
}

/// A replay stream past its first chunk: yields the chunk it holds, then waits for a reader
/// and reads the next one.
struct ReplayState {
    readers: Arc<Readers>,
    rest: ReplayRest,
    chunk: std::vec::IntoIter<Envelope>,
    failed: bool,
    // Dropped with the stream: stops a chunk being read for nobody.
    cancel: CancelOnDrop,
}

impl ReplayState {
    async fn next(mut self) -> Option<(Result<Envelope>, Self)> {
        loop {
            if let Some(env) = self.chunk.next() {
                return Some((Ok(env), self));
            }
            if self.failed || self.rest.is_done() {
                return None;
            }
            match self.read_chunk().await {
                Ok(chunk) => self.chunk = chunk.into_iter(),
                Err(e) => {
                    self.failed = true;
                    return Some((Err(e), self));
                }
            }
        }
    }

    async fn read_chunk(&mut self) -> Result<Vec<Envelope>> {
        let slot = self.readers.acquire().await?;
        let readers = self.readers.clone();
        let token = self.cancel.token();
        // The position moves on only when the read succeeded, so `rest` goes to the blocking
        // thread and comes back with the chunk.
        let mut rest = self.rest.clone();
        let (rest, chunk) = blocking(move || {
            let lease = slot.lease()?;
            let chunk = rest.read(&readers, &lease, false, &token)?;
            Ok((rest, chunk))
        })
        .await?;
        self.rest = rest;
        Ok(chunk)
    }
}

#[allow(clippy::too_many_arguments)]
fn history_page(
    readers: &Readers,
    reader: &reader::Reader,
    partition: u32,
    room: &Room,
    before: Option<Cursor>,
    limit: usize,
    scan_limit: i64,
    cancel: &Cancel,
) -> Result<Vec<Envelope>> {
    let (low, high) = readers.watermarks(reader, partition)?;
    let mut end = before.map_or(high, |c| {
        i64::try_from(c.offset).unwrap_or(i64::MAX).min(high)
    });
    // A room usually shares its partition with others: start with a few pages' worth of
    // records and double, so a busy room costs one read and a quiet one a few.
    let mut chunk = i64::try_from(limit)
        .unwrap_or(i64::MAX)
        .saturating_mul(4)
        .max(256);
    let mut scanned = 0i64;
    let mut found: Vec<Envelope> = Vec::new();
    while end > low && found.len() < limit && scanned < scan_limit {
        let size = chunk.min(scan_limit - scanned);
        let start = end.saturating_sub(size).max(low);
        let mut older = Vec::new();
        readers.scan(reader, partition, start, end, cancel, |env| {
            if let Some(env) = env.filter(|e| is_of(e, room)) {
                older.push(env);
            }
            ControlFlow::Continue(())
        })?;
        scanned += end - start;
        older.append(&mut found);
        found = older;
        end = start;
        chunk = chunk.saturating_mul(2);
    }
    let skip = found.len().saturating_sub(limit);
    found.drain(..skip);
    Ok(found)
}

/// Quick checks against librdkafka's in-process mock cluster. They run without Tansu, but the
/// mock is not Kafka: the integration tests in `tests/` run everything against a real broker.
#[cfg(test)]
mod mock_tests {
    use super::*;
    use chatbus_core::BrokerExt;
    use rdkafka::mocking::MockCluster;

    async fn broker(mock: &MockCluster<'_, impl rdkafka::ClientContext>) -> KafkaBroker {
        mock.create_topic("mocked", 3, 1).expect("mock topic");
        let config = KafkaConfig::new(mock.bootstrap_servers())
            .with_topic("mocked")
            .with_publish_timeout(Duration::from_millis(1500))
            .with_fetch_wait(Duration::from_millis(10));
        KafkaBroker::connect(config)
            .await
            .expect("connect to the mock cluster")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publish_subscribe_replay_on_the_mock_cluster() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let b = broker(&mock).await;
        assert_eq!(b.partitions(), 3);
        let room = Room::new("mock-room").expect("room");
        let mut sub = b
            .subscribe(Interest::room(room.clone()))
            .await
            .expect("subscribe");
        let start = sub.start().expect("start").to_vec();
        assert_eq!(start.len(), 3);
        let env = Envelope::new(room.clone(), "hello").with_from("alice");
        let receipt = b.publish(&env).await.expect("publish");
        let cursor = receipt.cursor.expect("durable cursor");
        assert_eq!(cursor.partition, b.partition_of(&room));
        assert_eq!(cursor, start[cursor.partition as usize]);
        let got = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("delivered in time")
            .expect("open")
            .expect("ok");
        assert_eq!(
            (got.id, got.cursor, got.from),
            (env.id, Some(cursor), env.from)
        );

        let typing = b
            .publish(&Envelope::ephemeral(room.clone(), "typing"))
            .await
            .expect("publish");
        assert_eq!(typing.cursor, None);
        let got = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("delivered in time")
            .expect("open")
            .expect("ok");
        assert_eq!((got.payload.as_ref(), got.cursor), (&b"typing"[..], None));
        let all = b
            .replay_vec(&room, ReplayFrom::Beginning, 10)
            .await
            .expect("replay");
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), [env.id]);
        assert_eq!(b.stats().subscriptions, 1);
        drop(sub);
        assert_eq!(b.stats().subscriptions, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publish_fails_within_the_timeout_when_the_broker_is_down() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let b = broker(&mock).await;
        let room = Room::new("mock-down").expect("room");
        b.publish(&Envelope::new(room.clone(), "up"))
            .await
            .expect("publish while up");
        mock.broker_down(-1).expect("down");
        let t = Instant::now();
        let err = b
            .publish(&Envelope::new(room.clone(), "down"))
            .await
            .expect_err("publish must fail while the broker is down");
        assert!(err.is_transient(), "{err}");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "took {:?}",
            t.elapsed()
        );
        assert!(matches!(b.health().await, Health::Down(_)));
        mock.broker_up(-1).expect("up");
        let t = Instant::now();
        loop {
            match b.publish(&Envelope::new(room.clone(), "again")).await {
                Ok(_) => break,
                Err(e) => assert!(t.elapsed() < Duration::from_secs(20), "still failing: {e}"),
            }
        }
        assert_eq!(b.health().await, Health::Healthy);
    }

    #[tokio::test]
    async fn rejects_oversized_messages_and_foreign_cursors_without_io() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let b = broker(&mock).await;
        let room = Room::new("mock-big").expect("room");
        let big = Envelope::new(room.clone(), vec![0u8; 2_000_000]);
        assert!(matches!(b.publish(&big).await, Err(Error::TooLarge { .. })));
        let other = (b.partition_of(&room) + 1) % b.partitions();
        let foreign = Cursor::new(other, 0);
        assert!(matches!(
            b.replay(&room, ReplayFrom::Cursor(foreign), 1).await,
            Err(Error::InvalidCursor(_))
        ));
        assert!(matches!(
            b.history(&room, Some(foreign), 1).await,
            Err(Error::InvalidCursor(_))
        ));
    }
}
