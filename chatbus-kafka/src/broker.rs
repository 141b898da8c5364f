//! [`KafkaBroker`]: the [`Broker`] over one Kafka topic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chatbus_core::backend::codec;
use chatbus_core::{
    Broker, Capabilities, Cursor, Envelope, Error, Health, HistoryStream, Interest, Receipt,
    ReplayFrom, Result, Room, Subscription,
};
use rdkafka::producer::{FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use tokio::sync::OnceCell;

use crate::client::{self, blocking, Context, BACKEND};
use crate::config::KafkaConfig;
use crate::epoch::Epochs;
use crate::partition;
use crate::pool::Readers;
use crate::producer::ProducerSlot;
use crate::reader::{self, HistoryQuery, ReplayQuery};
use crate::tail::Tail;
use crate::topic::{self, PartitionWatch, TopicState};

/// How long `health` waits for the cluster to answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// The topic's partition count against the one rooms are hashed by.
    watch: PartitionWatch,
    partition_changes: AtomicU64,
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
    /// `docs/kafka-on-tansu.md`).
    pub producer_replacements: u64,
    /// Replay readers (librdkafka consumers for `replay` and `history`) created so far. At
    /// most [`KafkaConfig::max_concurrent_replays`] exist at once; they are reused.
    pub replay_readers: u64,
    /// Replay and history reads running now (at most
    /// [`KafkaConfig::max_concurrent_replays`]).
    pub replays_active: usize,
    /// Replay and history calls waiting for a free reader now.
    pub replays_waiting: usize,
    /// Times the topic's partition count was seen to differ from the one rooms are hashed by
    /// (0 or 1: once seen, publishes are refused until a restart).
    pub partition_count_changes: u64,
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
    /// The partition count is fixed from then on: connect fails with `Error::Config` when the
    /// topic exists with another count than [`KafkaConfig::partitions`] (unless
    /// [`KafkaConfig::adopt_existing_partitions`]), and a background task re-reads the count
    /// every [`KafkaConfig::partition_check_interval`]; once it changes, `publish` fails with
    /// `Error::Unavailable` saying so and `health` is `Down` (see `docs/kafka-on-tansu.md`).
    ///
    /// Errors: `Error::Config` for a bad configuration, a missing topic that may not be
    /// created or a topic with another partition count, `Error::Unavailable` / `Error::Timeout` when the cluster does not answer within
    /// [`KafkaConfig::request_timeout`].
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let ctx = Context::default();
        let producer = ProducerSlot::new(&config, &ctx)?;
        let partitions = topic::ensure_topic(&config, &ctx, &producer.peek()).await?;
        let epochs = Arc::new(Epochs::new(partitions));
        let readers = Arc::new(Readers::new(config.clone(), ctx.clone(), epochs));
        let broker = Self {
            inner: Arc::new(Inner {
                config,
                partitions,
                ctx,
                producer,
                tail: OnceCell::new(),
                readers,
                published: AtomicU64::new(0),
                publish_errors: AtomicU64::new(0),
                watch: PartitionWatch::new(partitions),
                partition_changes: AtomicU64::new(0),
            }),
        };
        broker.spawn_partition_check();
        if broker.inner.config.probe_epochs_at_connect {
            broker.spawn_epoch_probe();
        }
        Ok(broker)
    }

    /// Learns the epoch of every partition that still has its offset 0, in the background
    /// (one short read each), so that cursors carry it from the start. Partitions that are
    /// empty now learn it when their first record is written (see `epoch.rs`).
    fn spawn_epoch_probe(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let Some(inner) = weak.upgrade() else { return };
            let (readers, partitions) = (inner.readers.clone(), inner.partitions);
            drop(inner);
            let Ok(slot) = readers.acquire().await else {
                return;
            };
            let probed = blocking(move || {
                let lease = slot.lease()?;
                for p in 0..partitions {
                    let (low, high) = readers.watermarks(&lease, p)?;
                    readers.probe_epoch(&lease, p, low, high)?;
                }
                Ok(())
            })
            .await;
            if let Err(e) = probed {
                // Learned later, from offset 0 or the next replay that checks a cursor.
                tracing::debug!(error = %e, "kafka epoch probe failed");
            }
        });
    }

    /// Re-reads the topic's metadata every `partition_check_interval` until the broker is
    /// dropped (the task holds only a weak reference). Publishes name their partition
    /// explicitly, so librdkafka's own metadata refresh would never surface a grown topic.
    fn spawn_partition_check(&self) {
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.config.partition_check_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                let broker = Self { inner };
                // Unreachable or leaderless: nothing learned; `health` reports those.
                if let Ok(TopicState::Ready(n)) = broker.describe(HEALTH_TIMEOUT).await {
                    broker.observe_partitions(n);
                }
            }
        });
    }

    async fn describe(&self, wait: Duration) -> Result<TopicState> {
        let producer = self.inner.producer.peek();
        let topic = self.inner.config.topic.clone();
        blocking(move || Ok(topic::describe(&producer, &topic, wait))).await
    }

    /// Records a partition count read from the cluster; logs and counts the first change.
    fn observe_partitions(&self, found: u32) {
        if self.inner.watch.observe(found) {
            self.inner.partition_changes.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                topic = %self.inner.config.topic,
                from = self.inner.partitions,
                to = found,
                "the Kafka topic's partition count changed; refusing publishes until a restart \
                 with a configuration that matches the topic (see docs/kafka-on-tansu.md)"
            );
        }
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

    /// The replay readers, which the [`Log`](chatbus_core::store::Log) impl (`log.rs`)
    /// reads with too.
    pub(crate) fn readers(&self) -> &Arc<Readers> {
        &self.inner.readers
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
            partition_count_changes: load(&self.inner.partition_changes),
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
                    Tail::start(&config, ctx, ends?, readers.epochs.clone())
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
        if let Err(e) = self.inner.watch.check(&config.topic) {
            self.inner.publish_errors.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
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
                let p = u32::try_from(delivery.partition).unwrap_or(0);
                let epochs = &self.inner.readers.epochs;
                if delivery.offset == 0 {
                    // This message starts the partition's log: its id is the epoch.
                    epochs.learn(p, envelope.id);
                }
                let cursor = envelope.is_durable().then(|| {
                    epochs.stamp(Cursor::new(p, u64::try_from(delivery.offset).unwrap_or(0)))
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
        let query = ReplayQuery {
            room: room.clone(),
            partition: self.partition_for_cursor(room, cursor)?,
            from,
            limit,
        };
        reader::replay(&self.inner.readers, query).await
    }

    /// Reads the room's partition backwards from `before` (or its end) in growing chunks and
    /// returns the newest `limit` durable messages of the room, oldest first. Reads at most
    /// [`KafkaConfig::history_scan_limit`] records: when that stops it before it found `limit`
    /// messages or the start of the partition (a quiet room in a busy partition), the page is
    /// partial and `more_before` is the oldest offset read, to continue from. Shares the replay readers: `Error::Timeout` when none came free
    /// within [`KafkaConfig::request_timeout`].
    async fn history(
        &self,
        room: &Room,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<chatbus_core::HistoryPage> {
        let query = HistoryQuery {
            room: room.clone(),
            partition: self.partition_for_cursor(room, before)?,
            before,
            limit,
            scan_limit: i64::try_from(self.inner.config.history_scan_limit).unwrap_or(i64::MAX),
        };
        reader::history(&self.inner.readers, query).await
    }

    fn log_partition(&self, room: &Room) -> Option<u32> {
        Some(self.partition_of(room))
    }

    /// The topic read by partition (see `log.rs`).
    fn as_log(&self) -> Option<&dyn chatbus_core::store::Log> {
        Some(self)
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
    /// `Down` otherwise (with the reason), after a fatal producer error, or once the topic's
    /// partition count changed (this check also notices that).
    async fn health(&self) -> Health {
        if let Some((_, reason)) = self.inner.producer.peek().client().fatal_error() {
            return Health::Down(format!("fatal Kafka producer error: {reason}"));
        }
        match self.describe(HEALTH_TIMEOUT).await {
            Ok(TopicState::Ready(n)) => {
                self.inner.ctx.conn.mark_up();
                self.observe_partitions(n);
                match self.inner.watch.check(&self.inner.config.topic) {
                    Ok(()) => Health::Healthy,
                    Err(e) => Health::Down(e.to_string()),
                }
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

/// Quick checks against librdkafka's in-process mock cluster. They run without Tansu, but the
/// mock is not Kafka: the integration tests in `tests/` run everything against a real broker.
#[cfg(test)]
mod mock_tests {
    use super::*;
    use chatbus_core::BrokerExt;
    use rdkafka::mocking::MockCluster;
    use std::time::Instant;

    async fn broker(mock: &MockCluster<'_, impl rdkafka::ClientContext>) -> KafkaBroker {
        mock.create_topic("mocked", 3, 1).expect("mock topic");
        let config = KafkaConfig::new(mock.bootstrap_servers())
            .with_topic("mocked")
            .with_partitions(3)
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
        // The empty partition's epoch was unknown when the subscription started; the first
        // record (offset 0) sets it.
        let first = start[cursor.partition as usize];
        assert_eq!((cursor.offset, first.offset, first.epoch), (0, 0, 0));
        assert_eq!(cursor.epoch, env.id.epoch_fingerprint());
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
