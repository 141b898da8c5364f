#![doc = include_str!("../README.md")]
//!
//! This facade re-exports `chatbus_core` and, behind features, the backends as modules:
//! `redis`, `kafka`, `ws` (feature `full` enables all of them).

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
