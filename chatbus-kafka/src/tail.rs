//! The shared tail consumer: one consumer per broker reads the end of every partition and
//! dispatches each record to the local subscriptions of its room.
//!
//! Why one consumer and not one per subscription: the Hub subscribes once per room, so a busy
//! instance holds thousands of subscriptions; a librdkafka consumer costs threads, sockets and
//! a prefetch buffer each, and every one of them would read the whole topic anyway (a room is
//! not a partition). One reader with a room index costs one of each, whatever the number of
//! rooms.
//!
//! Why `assign` and not a group subscription: every instance must see every message, so no
//! partition may be shared with or taken away by another instance, and a rebalance must never
//! pause delivery.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use chatbus_core::backend::{codec, Subscribers, Target};
use chatbus_core::{Cursor, Envelope, Error, Interest, Result, Subscription};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::client::{self, lock, Context};
use crate::config::KafkaConfig;
use crate::epoch::Epochs;
use crate::partition::partition_for;

type TailConsumer = BaseConsumer<Context>;

/// How long one poll of the tail thread blocks, which bounds how late it notices shutdown.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Records taken from librdkafka's queue before dispatching them under one lock.
const BATCH: usize = 512;

/// Counters of the tail consumer.
#[derive(Debug, Default)]
pub(crate) struct TailStats {
    pub(crate) records: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) gaps: AtomicU64,
}

/// The running tail consumer. Dropping it stops its thread.
pub(crate) struct Tail {
    shared: Arc<Shared>,
    consumer: Arc<TailConsumer>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    topic: String,
    /// Per partition, the next offset the thread will dispatch. Locked around every
    /// registration and every dispatch (and before `subscribers`' own lock), so that a
    /// subscription's start and what the thread delivers to it agree.
    positions: Mutex<Vec<i64>>,
    subscribers: Subscribers,
    stop: AtomicBool,
    stats: TailStats,
    epochs: Arc<Epochs>,
}

/// The position of a record, as the cursor it would have.
fn cursor(partition: usize, offset: i64) -> Cursor {
    Cursor::new(
        u32::try_from(partition).unwrap_or(u32::MAX),
        u64::try_from(offset).unwrap_or(0),
    )
}

impl Tail {
    /// Starts reading every partition of the topic at `ends` (the current end offsets).
    /// Blocking: call from a blocking thread.
    pub(crate) fn start(
        config: &KafkaConfig,
        ctx: Context,
        ends: Vec<i64>,
        epochs: Arc<Epochs>,
    ) -> Result<Self> {
        let consumer: TailConsumer = client::consumer_config(config, "tail", config.fetch_wait)
            .create_with_context(ctx)
            .map_err(|e| Error::backend(client::BACKEND, e))?;
        let mut tpl = TopicPartitionList::new();
        for (p, offset) in ends.iter().enumerate() {
            let p = i32::try_from(p).map_err(|_| Error::Config("too many partitions".into()))?;
            tpl.add_partition_offset(&config.topic, p, Offset::Offset(*offset))
                .map_err(|e| Error::backend(client::BACKEND, e))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| Error::backend(client::BACKEND, e))?;
        let consumer = Arc::new(consumer);
        let shared = Arc::new(Shared {
            topic: config.topic.clone(),
            positions: Mutex::new(ends),
            subscribers: Subscribers::new(config.subscriber_capacity),
            stop: AtomicBool::new(false),
            stats: TailStats::default(),
            epochs,
        });
        let thread = {
            let (shared, consumer) = (shared.clone(), consumer.clone());
            std::thread::Builder::new()
                .name("chatbus-kafka-tail".into())
                .spawn(move || run(&shared, &consumer))
                .map_err(|e| Error::backend(client::BACKEND, e))?
        };
        Ok(Self {
            shared,
            consumer,
            thread: Some(thread),
        })
    }

    /// Registers a subscription that receives every record at or after `ends` (the end offsets
    /// read just now) and after what the thread already dispatched.
    pub(crate) fn subscribe(&self, interest: Interest, ends: &[i64]) -> Subscription {
        let positions = lock(&self.shared.positions);
        // A record below the current end was published before this call; one the thread
        // already dispatched cannot be delivered any more. The later of the two is where this
        // subscription starts, and the thread dispatches every record from there on.
        let start = positions
            .iter()
            .enumerate()
            .map(|(p, pos)| {
                let c = cursor(p, (*pos).max(ends.get(p).copied().unwrap_or(0)));
                self.shared.epochs.stamp(c)
            })
            .collect();
        // Registered before the positions are unlocked, so no batch falls in between.
        let sub = self.shared.subscribers.subscribe_from(interest, start);
        drop(positions);
        sub
    }

    /// The consumer, for offset lookups that need one.
    pub(crate) fn consumer(&self) -> &Arc<BaseConsumer<Context>> {
        &self.consumer
    }

    pub(crate) fn stats(&self) -> &TailStats {
        &self.shared.stats
    }

    /// Live subscriptions, for metrics.
    pub(crate) fn subscriptions(&self) -> usize {
        self.shared.subscribers.len()
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        // The thread notices within one poll interval, then drops the last reference to the
        // consumer and closes it there: nothing blocks the (possibly async) dropping thread.
        self.shared.stop.store(true, Ordering::Release);
        drop(self.thread.take());
    }
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail")
            .field("topic", &self.shared.topic)
            .finish_non_exhaustive()
    }
}

/// One decoded record.
struct Record {
    partition: usize,
    offset: i64,
    envelope: Option<Envelope>,
}

fn run(shared: &Shared, consumer: &TailConsumer) {
    let mut batch: Vec<Record> = Vec::with_capacity(BATCH);
    while !shared.stop.load(Ordering::Acquire) {
        let mut timeout = POLL_INTERVAL;
        while batch.len() < BATCH {
            match consumer.poll(timeout) {
                None => break,
                Some(Ok(msg)) => {
                    consumer.context().conn.mark_up();
                    batch.push(decode(shared, &msg));
                    // Take whatever else is already queued without waiting.
                    timeout = Duration::ZERO;
                }
                Some(Err(e)) => {
                    // librdkafka retries by itself and resumes at its fetch position when the
                    // broker returns; nothing to do but note it.
                    tracing::debug!(error = %e, "kafka tail consumer error");
                    break;
                }
            }
        }
        if !batch.is_empty() {
            dispatch(shared, &mut batch);
        }
    }
}

fn decode(shared: &Shared, msg: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    let partition = usize::try_from(msg.partition()).unwrap_or(usize::MAX);
    let offset = msg.offset();
    shared.stats.records.fetch_add(1, Ordering::Relaxed);
    let envelope = match msg
        .payload()
        .map(|p| codec::decode(&Bytes::copy_from_slice(p)))
    {
        Some(Ok(mut env)) => {
            let p = u32::try_from(partition).unwrap_or(u32::MAX);
            if offset == 0 {
                // The first record of the log: its epoch (a new one if the topic was
                // recreated under this running consumer).
                if let Some(old) = shared.epochs.learn(p, env.id) {
                    tracing::warn!(partition, old, "Kafka partition restarted at offset 0 with another first record: the topic was recreated");
                }
            }
            env.cursor = env.is_durable().then(|| {
                shared
                    .epochs
                    .stamp(Cursor::new(p, u64::try_from(offset).unwrap_or(0)))
            });
            Some(env)
        }
        Some(Err(e)) => {
            shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(partition, offset, error = %e, "dropping a malformed Kafka record");
            None
        }
        None => {
            shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(partition, offset, "dropping a Kafka record without a value");
            None
        }
    };
    Record {
        partition,
        offset,
        envelope,
    }
}

fn dispatch(shared: &Shared, batch: &mut Vec<Record>) {
    let mut positions = lock(&shared.positions);
    let partitions = positions.len();
    // One lock for the whole batch; subscribers found gone are removed when it ends.
    let mut out = shared.subscribers.batch();
    for record in batch.drain(..) {
        let Some(position) = positions.get_mut(record.partition) else {
            continue;
        };
        if record.offset < *position {
            // Already dispatched (librdkafka re-fetched after a reset): never twice.
            continue;
        }
        if record.offset > *position {
            // Records were skipped, e.g. deleted by retention while this consumer was behind:
            // subscribers must resync from their cursors.
            let missed = u64::try_from(record.offset - *position).unwrap_or(0);
            shared.stats.gaps.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                partition = record.partition,
                missed,
                "gap in the Kafka tail"
            );
            // Only subscriptions that would have received the first missing record, and only
            // those of the rooms that live in this partition: the others lost nothing.
            let from = cursor(record.partition, *position);
            let (partition, count) = (
                from.partition,
                u32::try_from(partitions).unwrap_or(u32::MAX),
            );
            out.send_error_where(
                Target::EVERYONE.at(from),
                |room| partition_for(room.as_str().as_bytes(), count) == partition,
                || Error::Lagged { missed },
            );
        }
        *position = record.offset + 1;
        let Some(env) = record.envelope else {
            continue;
        };
        let at = cursor(record.partition, record.offset);
        out.dispatch(&env, Target::EVERYONE.at(at));
    }
}
