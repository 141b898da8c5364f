//! chatbus: real-time chat fan-out to WebSocket clients spread over many server instances.
//!
//! This facade re-exports [`chatbus_core`] and, behind features, the backends:
//! `redis` ([`RedisBroker`](redis::RedisBroker)), `kafka` ([`KafkaBroker`](kafka::KafkaBroker)),
//! `ws` (the WebSocket transport), `full` (all of them).

#![cfg_attr(docsrs, feature(doc_cfg))]

pub use chatbus_core::*;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use chatbus_redis as redis;

#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use chatbus_kafka as kafka;

#[cfg(feature = "ws")]
#[cfg_attr(docsrs, doc(cfg(feature = "ws")))]
pub use chatbus_ws as ws;
