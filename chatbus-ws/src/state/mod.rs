//! Chat state: edits, deletes, reactions, read positions and conversations, kept in a
//! [`Store`](chatbus_core::store::Store) that projects the log.
//!
//! - [`event`] reads a room's envelope as the store event it is (or `None`: typing, presence,
//!   copies in personal channels are not state);
//! - `frames` encodes the live frames of events and the state of messages for `history`;
//! - `actions` checks and publishes what clients ask for (`edit`, `delete`, `react`, `read`);
//! - [`StoreFeed`] feeds a store from the live stream (the memory store's default);
//!   [`Projector`] feeds it from the durable log, exactly once.

pub(crate) mod actions;
mod feed;
pub(crate) mod frames;
mod projector;
mod reads;

use chatbus_core::store::{ChatEvent, EventKind};
use chatbus_core::{Envelope, MessageId};

use crate::payload::{self, Payload};

pub use actions::PROJECTION_WAIT;
pub use feed::StoreFeed;
pub use projector::{Projector, ProjectorConfig, ProjectorStats};

/// The store event an envelope carries, or `None` when it is not chat state: ephemeral
/// envelopes (typing, presence), control payloads, copies of direct messages in personal
/// channels (the conversation's own envelope is the event), and anything without a sender or a
/// log position.
pub fn event(env: &Envelope) -> Option<ChatEvent> {
    let from = env.from.clone()?;
    let cursor = env.cursor?;
    let kind = match payload::decode(&env.payload)? {
        Payload::Message { name, body } => EventKind::Message {
            name: name.map(Into::into),
            body: body.into(),
            to: None,
        },
        Payload::Direct(d) if d.conv.is_none() => EventKind::Message {
            name: d.name.map(Into::into),
            body: d.body.into(),
            to: Some(d.to.into()),
        },
        Payload::Edit { target, body } => EventKind::Edit {
            target: MessageId::from_u128(target),
            body: body.into(),
        },
        Payload::Delete { target } => EventKind::Delete {
            target: MessageId::from_u128(target),
        },
        Payload::React { target, emoji, on } => EventKind::React {
            target: MessageId::from_u128(target),
            emoji: emoji.into(),
            on,
        },
        Payload::Read { cursor } => EventKind::Read {
            cursor: cursor.parse().ok()?,
        },
        _ => return None,
    };
    Some(ChatEvent {
        id: env.id,
        room: env.room.clone(),
        from,
        ts: env.ts,
        cursor,
        kind,
    })
}
