//! What clients receive: the frame a [`FrameEncoder`] makes of an envelope, once per message.

use std::fmt;

use bytes::Bytes;

use crate::envelope::Envelope;

/// A client frame produced by a [`FrameEncoder`].
#[derive(Debug, Clone)]
pub struct Frame {
    /// The bytes sent to each recipient, shared by all of them.
    pub bytes: Bytes,
    /// Do not deliver to sessions of the sending user (`Envelope::from`), e.g. typing events.
    pub skip_sender: bool,
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
        Some(Frame {
            bytes: envelope.payload.clone(),
            skip_sender: false,
        })
    }
}
