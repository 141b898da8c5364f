//! What only broker implementors need: the wire codec, the subscription plumbing and the room
//! registry every backend shares.
//!
//! An application that uses the brokers does not need anything here; a crate that implements
//! [`Broker`](crate::Broker) for a new backend does:
//!
//! - [`codec`] encodes an [`Envelope`](crate::Envelope) for the wire (versioned binary; the
//!   first byte is the version) and decodes it, rejecting what it does not understand.
//! - [`Subscribers`] is the room → subscriber registry: a backend hands every envelope it
//!   receives to it, and it fans the envelope out to the matching [`Subscription`]s, each
//!   through its own bounded [`SubscriptionSender`] (a full one drops for that subscriber only
//!   and reports [`SendOutcome::Dropped`]; the subscriber is told it lagged).
//! - [`history_stream`] turns a page of envelopes into the stream `replay` returns.
//! - [`DedupeWindow`] remembers the last N message ids, to drop second copies.
//!
//! [`Subscription`]: crate::Subscription

pub mod codec;

pub use crate::broker::{history_stream, SendOutcome, SubscriptionSender};
pub use crate::dual::DedupeWindow;
pub use crate::envelope::now_ms;
pub use crate::subscribers::{Batch, Delivered, Pending, Subscribers, Target, Vacated};
