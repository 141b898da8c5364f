//! Core of chatbus: the data model, the [`Broker`] trait, the in-memory broker and the local
//! fan-out [`Hub`].
//!
//! - [`Envelope`] is one message as it travels between instances, encoded by
//!   [`backend::codec`] in a versioned binary format.
//! - [`Broker`] is the publish / subscribe / replay contract every backend implements:
//!   [`MemoryBroker`] here (no infrastructure), `RedisBroker` (`chatbus-redis`), `KafkaBroker`
//!   (`chatbus-kafka`).
//! - [`Hub`] delivers what the broker brings to the sessions of one instance, encoding each
//!   client frame once and isolating slow clients.
//! - [`DualBus`] composes a fast broker (Redis) with a durable one (Kafka): exactly once, gaps
//!   filled from the log.
//! - [`store`] holds chat state (edits, deletes, reactions, read positions, conversations)
//!   projected from the log: the [`Store`](store::Store) trait and [`MemoryStore`](store::MemoryStore).
//! - [`backend`] holds what only broker implementors need; `conformance` (feature
//!   `conformance`) is the suite every broker must pass.
//!
//! ```
//! use std::sync::Arc;
//! use chatbus_core::{Envelope, Hub, MemoryBroker, Outbound, Room};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> chatbus_core::Result<()> {
//! let hub = Hub::new(Arc::new(MemoryBroker::new()));
//! let mut alice = hub.connect("alice");
//! let room = Room::new("general")?;
//! alice.handle().join(room.clone()).await?;
//! hub.publish(&Envelope::new(room, "hello").with_from("bob")).await?;
//! match alice.recv().await {
//!     Outbound::Frame(bytes) => assert_eq!(bytes, "hello"),
//!     other => panic!("{other:?}"),
//! }
//! # Ok(()) }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
mod broker;
mod dual;
mod envelope;
mod error;
mod hub;
mod memory;
mod queue;
pub mod store;
mod subscribers;
mod tickets;

/// Pushes onto a vector that is often left with one to three elements (the members of a
/// personal channel, the subscribers of a room): the first pushes allocate exactly, where a
/// plain `push` would allocate four slots at once; from four on it grows as usual.
pub(crate) fn push_compact<T>(v: &mut Vec<T>, item: T) {
    if v.len() < 4 && v.len() == v.capacity() {
        v.reserve_exact(1);
    }
    v.push(item);
}

#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;

pub use broker::{
    Broker, BrokerExt, Capabilities, Health, HistoryPage, HistoryStream, Interest, Receipt,
    ReplayFrom, Subscription,
};
pub use dual::{DualBus, DualConfig, DualMode, DualStats, DurableDownPolicy};
pub use envelope::{Cursor, Envelope, Kind, MessageId, Room, Stamp, MAX_ROOM_LEN};
pub use error::{BoxError, Error, ResetReason, Result};
pub use hub::{
    CloseReason, Frame, FrameEncoder, Hub, HubBuilder, HubConfig, HubStats, JoinOptions, Joined,
    Outbound, RawPayload, Session, SessionHandle, SlowPolicy,
};
pub use memory::{MemoryBroker, MemoryConfig};
pub use tickets::{
    Baseline, Lease, Leases, Renewal, Ticket, Tickets, COUNTER_TTL, OPEN_TICKET_TTL,
};
