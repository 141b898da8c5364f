#![doc = include_str!("../README.md")]
//!
//! # The API at a glance
//!
//! - Messages: [`Envelope`] (id, room, kind, sender, time, payload, cursor), [`Room`],
//!   [`MessageId`], [`Kind`], [`Cursor`].
//! - Brokers: the [`Broker`] trait (+ [`BrokerExt`]), [`MemoryBroker`], [`DualBus`]; behind
//!   features, [`redis`] (`RedisBroker`), [`kafka`] (`KafkaBroker`).
//! - Local fan-out: [`Hub`] and its [`Session`]s / [`SessionHandle`]s.
//! - The WebSocket transport: [`ws`] (feature `ws`).
//! - Chat state: the [`store`] trait and memory store here; [`postgres`] (`PostgresStore`,
//!   feature `postgres`).
//! - Writing a broker: [`backend`].
//!
//! Features: `redis`, `kafka`, `ws`, `socketio`, `postgres`; `full` enables all of them.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub use chatbus_core::backend;
pub use chatbus_core::store;
pub use chatbus_core::{BoxError, Error, Result};
pub use chatbus_core::{
    Broker, BrokerExt, Capabilities, Health, HistoryStream, Interest, Receipt, ReplayFrom,
    Subscription,
};
pub use chatbus_core::{
    CloseReason, Frame, FrameEncoder, Hub, HubBuilder, HubConfig, HubStats, JoinOptions, Joined,
    Outbound, RawPayload, Session, SessionHandle, SlowPolicy,
};
pub use chatbus_core::{Cursor, Envelope, Kind, MessageId, Room, MAX_ROOM_LEN};
pub use chatbus_core::{DualBus, DualConfig, DualMode, DualStats, DurableDownPolicy};
pub use chatbus_core::{MemoryBroker, MemoryConfig};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use chatbus_redis as redis;

#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use chatbus_kafka as kafka;

#[cfg(feature = "ws")]
#[cfg_attr(docsrs, doc(cfg(feature = "ws")))]
pub use chatbus_ws as ws;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use chatbus_postgres as postgres;
