//! Redis broker for chatbus: live fan-out between server instances over Redis pub/sub, with an
//! optional history window in Redis Streams.
//!
//! [`RedisBroker`] implements [`chatbus_core::Broker`]. Put it under a
//! [`Hub`](chatbus_core::Hub) on every instance: a message published on one instance reaches
//! the sessions of its room on all of them, and an instance receives only the traffic of the
//! rooms it has members in.
//!
//! ```no_run
//! use std::sync::Arc;
//! use chatbus_core::{Envelope, Hub, Room};
//! use chatbus_redis::{RedisBroker, RedisConfig};
//!
//! # async fn run() -> chatbus_core::Result<()> {
//! // CHATBUS_REDIS_URL=redis://:password@127.0.0.1:6379/0 (or REDIS_HOST/REDIS_PORT/REDIS_PASSWORD)
//! let broker = RedisBroker::connect(RedisConfig::from_env()?.with_history_len(1000)).await?;
//! let hub = Hub::new(Arc::new(broker));
//! let session = hub.connect("alice");
//! let room = Room::new("general")?;
//! session.handle().join(room.clone()).await?;
//! hub.publish(&Envelope::new(room, "hello").with_from("alice")).await?;
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! **Names.** Everything lives under a configurable [prefix](RedisConfig::prefix) (default
//! `chatbus`), so one Redis can serve several apps. For a room `R`:
//!
//! | name | type | what |
//! |---|---|---|
//! | `<prefix>:{R}` | pub/sub channel | the room's live messages |
//! | `<prefix>:{R}:log` | stream | the history window (only when it is on) |
//! | `<prefix>:{R}:meta` | hash | the room's log: `seq`, its last sequence number, and `epoch`, drawn when `seq` is created (only with the window) |
//! | `<prefix>:{R}:seq` | string (counter) | the layout before epochs: moved into `:meta` by the first publish that finds it |
//! | `<prefix>:{*}` | pattern | what `Interest::All` subscribes to (single Redis) |
//! | `<prefix>:all` | pub/sub channel | what `Interest::All` subscribes to on a cluster, with the broadcast on |
//!
//! Room names cannot contain braces, so `{R}` is exactly the Redis Cluster *hash tag*: a room's
//! channel, stream and counter always hash to one slot.
//!
//! **Redis Cluster.** With [`RedisConfig::with_cluster`] (`CHATBUS_REDIS_CLUSTER`) the broker
//! speaks to a Redis Cluster (Redis 7+) with sharded pub/sub: `SPUBLISH <prefix>:{R}` (inside
//! the publish script, which runs on the master of the room's slot since every key it touches
//! shares the tag) and `SSUBSCRIBE <prefix>:{R}` on that master, so a message goes only to its
//! room's shard and to the instances subscribed there. `Interest::All` has no sharded
//! equivalent: it needs [`RedisConfig::with_cluster_broadcast`], which also `PUBLISH`es every
//! message on `<prefix>:all` (reaching every node). A master that dies, a `MOVED`, a migrated
//! slot: the subscriber re-reads the topology, keeps its connections to the healthy masters,
//! re-subscribes and yields `Lagged`. Details and measured failover times: the "Redis
//! Cluster" section of `docs/ARCHITECTURE.md`.
//!
//! **Connections.** Each broker holds two: a multiplexed connection (the `redis` crate's
//! connection manager, which reconnects by itself) for publishing and reading history —
//! concurrent publishes are pipelined on it — and a dedicated pub/sub connection, owned by one
//! task, for subscribing. All local subscriptions share that connection: a room is
//! `SUBSCRIBE`d when its first local subscription arrives and `UNSUBSCRIBE`d when its last one
//! is dropped, so an instance with no member in a room receives none of its traffic.
//!
//! **Wire format.** The payload of every pub/sub message and of every stream entry (field `e`)
//! is the envelope in the versioned binary encoding of [`chatbus_core::backend::codec`] (first byte =
//! version), nothing else. A frame that fails to decode, or whose room differs from its
//! channel's, is counted ([`RedisStats::decode_errors`]) and dropped.
//!
//! - History window off (the default): `publish` is `PUBLISH <prefix>:{R} <envelope>`. The
//!   envelope's `cursor` travels unchanged — a `DualBus` publishes to Kafka first and then
//!   through Redis with the Kafka cursor set, and subscribers receive that cursor.
//! - History window on ([`RedisConfig::history_len`] > 0): a durable message is published by a
//!   Lua script that, atomically, `HINCRBY`s `seq` of `<prefix>:{R}:meta` to get its sequence
//!   number `n` (creating the hash with a fresh random `epoch` `e` when it is missing), writes
//!   `n` and `e` into the envelope's cursor (the client encodes the envelope with a placeholder
//!   cursor and passes the byte position of the 8-byte offset, which the 4-byte epoch follows),
//!   `XADD`s it to `<prefix>:{R}:log` with the entry id `n-0` and `MAXLEN <history_len>`, and
//!   `PUBLISH`es the same bytes. So the cursor is `0-n-e`: cursors of a room are totally
//!   ordered within its epoch, every subscriber sees them in stream order, and the receipt
//!   carries the same cursor. A Redis that lost the hash (flushed, restarted empty, evicted,
//!   failed over to a replica that missed writes) starts the room at 1 with another epoch, and
//!   `replay`/`history` answer cursors of the old one with `Error::CursorReset`.
//!   Ephemeral messages are only `PUBLISH`ed (never `XADD`ed) and carry no cursor.
//!
//! **History.** `replay` from the beginning or after cursor `0-n` is one `XRANGE` (from id
//! `n+1-0`); replay from a time scans the window from its oldest entry, since entry ids are
//! sequence numbers; `history(before, limit)` is one `XREVRANGE`. Without the window both
//! answer `Error::Unsupported`. The window is as durable as the Redis it lives in: a Redis
//! restarted without persistence starts with empty streams and counters, so
//! `capabilities().durable` is false.
//!
//! **Failures.** When the pub/sub connection drops (or stops answering its periodic `PING`),
//! every subscription yields `Err(Unavailable)`, the task reconnects with capped exponential
//! backoff ([`RedisConfig::backoff_min`] … [`RedisConfig::backoff_max`], with jitter),
//! re-subscribes every room that still has local subscriptions, and then yields
//! `Err(Lagged { missed: 0 })` so that the Hub resyncs its members from their cursors
//! (replaying from the window when it is on). Meanwhile [`health`](chatbus_core::Broker::health)
//! reports `Down` (then `Degraded` while re-subscribing), and publishes and new subscriptions
//! fail with `Unavailable` or `Timeout` within [`RedisConfig::command_timeout`] instead of
//! hanging. A wrong password fails [`RedisBroker::connect`] at once with an error that says
//! "authentication failed".
//!
//! The `redis` client crate is re-exported as [`redis`] so that users who need it get the
//! matching version; no `redis` type appears in this crate's API.
//!
//! # Features
//!
//! - `tls`: `rediss://` URLs, with rustls (ring as the crypto provider, installed as the
//!   process default unless the application installed one). The server certificate is
//!   verified against the webpki roots, or against a private CA given as
//!   [`RedisConfig::tls_ca_file`] (`CHATBUS_REDIS_TLS_CA`).

#![cfg_attr(docsrs, feature(doc_cfg))]

mod broker;
mod cluster;
mod config;
mod error;
mod link;
mod subscriber;
mod tickets;
mod wire;

pub use broker::{RedisBroker, RedisStats};
pub use config::{RedisConfig, MAX_PREFIX_LEN};
/// The `redis` client crate this broker is built on, for matching versions.
pub use redis;
