//! What clients receive: the frame a [`FrameEncoder`] makes of an envelope, once per message.

use std::fmt;

use bytes::Bytes;

use crate::envelope::{Envelope, Room};

/// A client frame produced by a [`FrameEncoder`]: the bytes, and whom of the room's members
/// to leave out.
///
/// ```
/// use chatbus_core::{Frame, Room};
///
/// let frame = Frame::new("hello").skip_sender();
/// assert!(frame.skip_sender && frame.skip_members_of.is_none());
/// let copy = Frame::new("dm").skip_members_of(Room::new("dm.a.b")?);
/// assert_eq!(copy.skip_members_of.map(|r| r.to_string()).as_deref(), Some("dm.a.b"));
/// # Ok::<(), chatbus_core::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Frame {
    /// The bytes sent to each recipient, shared by all of them.
    pub bytes: Bytes,
    /// Do not deliver to sessions of the sending user (`Envelope::from`), e.g. typing events.
    pub skip_sender: bool,
    /// Do not deliver to sessions that are members of this room: for a copy of a message of
    /// that room sent through another channel (a direct message copied to its recipient's
    /// personal channel), which a member already gets from the room itself, in order and
    /// deduplicated by cursor.
    pub skip_members_of: Option<Room>,
}

impl Frame {
    /// A frame for every member.
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        Self {
            bytes: bytes.into(),
            skip_sender: false,
            skip_members_of: None,
        }
    }

    /// Sets [`skip_sender`](Self::skip_sender).
    #[must_use]
    pub fn skip_sender(mut self) -> Self {
        self.skip_sender = true;
        self
    }

    /// Sets [`skip_members_of`](Self::skip_members_of).
    #[must_use]
    pub fn skip_members_of(mut self, room: Room) -> Self {
        self.skip_members_of = Some(room);
        self
    }
}

/// Turns an envelope into the frame clients receive. Called once per message per instance.
pub trait FrameEncoder: Send + Sync + fmt::Debug + 'static {
    /// The frame for `envelope`, or `None` to deliver nothing to clients.
    fn encode(&self, envelope: &Envelope) -> Option<Frame>;
}

/// The default encoder: the envelope's payload, as is.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawPayload;

impl FrameEncoder for RawPayload {
    fn encode(&self, envelope: &Envelope) -> Option<Frame> {
        Some(Frame::new(envelope.payload.clone()))
    }
}
