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
//!   the envelope in chatbus' binary encoding ([`chatbus_core::backend::codec`]), timestamp = the
//!   envelope's `ts`. The partition is `murmur2(room) % partitions` (Kafka's own keyed
//!   partitioning, computed here so that replay knows where a room lives), so all messages of
//!   a room are in one partition, in one order. A cursor is `partition-offset`. The count is
//!   therefore fixed: `connect` refuses a topic with another count than
//!   [`KafkaConfig::partitions`], and a broker that sees the count change refuses publishes
//!   (see [`KafkaConfig::partition_check_interval`]).
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
//! - **Epochs**: a topic deleted and created again restarts at offset 0, so cursors carry the
//!   [epoch](chatbus_core::Cursor::epoch) of their partition's log: the fingerprint of the
//!   message id of the record at offset 0, the same on every instance without coordination.
//!   An instance learns it from its own publish at offset 0, from the tail reading offset 0,
//!   from a background probe at connect, and again whenever a replay or history cursor does
//!   not fit what it knows. `replay`/`history` answer a cursor of another epoch, or one
//!   beyond the end of the partition, with `Error::CursorReset`. Limit: once retention has
//!   deleted offset 0, an instance that had not read it cannot tell the epoch (0, which
//!   matches every cursor) and catches an old cursor only when it is beyond the new end.
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
//! Tested against Tansu 0.6 (see `docs/kafka-on-tansu.md` for the gaps found
//! there and the workarounds in this crate).

#![cfg_attr(docsrs, feature(doc_cfg))]

mod broker;
mod client;
mod config;
mod epoch;
mod log;
mod partition;
mod pool;
mod producer;
mod reader;
mod tail;
mod topic;

pub use broker::{KafkaBroker, KafkaStats};
pub use config::{KafkaConfig, ENV_PROP_PREFIX};
/// The rdkafka version this crate is built with, for custom configuration or tooling.
pub use rdkafka;
