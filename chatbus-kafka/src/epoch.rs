//! Per-partition epochs: which log a partition's offsets count in.
//!
//! A topic deleted and recreated under the same name restarts every partition at offset 0,
//! so a cursor `3-1041` taken before names another message after. The epoch of a partition is
//! derived from the log itself, the fingerprint of the message id of its record at offset 0
//! ([`MessageId::epoch_fingerprint`]): every instance that reads that record computes the same
//! number without coordinating, and a recreated topic (whose offset 0 is another message) has
//! another one.
//!
//! Learned when an instance sees offset 0: its own publish acknowledged there, the tail reading
//! it (a partition that was empty when the tail started), or a replay or history read probing
//! it (a background probe at connect, and again whenever a cursor does not fit what is known).
//! Unknown (0, which matches every cursor) until then, and for good once retention has
//! deleted offset 0 before this instance read it: then an old cursor of a recreated topic is
//! caught only by being beyond the end of the new log.

use std::sync::atomic::{AtomicU32, Ordering};

use chatbus_core::{Cursor, MessageId};

/// The epochs of a topic's partitions (0 = not known yet).
#[derive(Debug)]
pub(crate) struct Epochs(Box<[AtomicU32]>);

impl Epochs {
    pub(crate) fn new(partitions: u32) -> Self {
        Self((0..partitions).map(|_| AtomicU32::new(0)).collect())
    }

    /// The epoch of `partition`, 0 when not known.
    pub(crate) fn get(&self, partition: u32) -> u32 {
        self.0
            .get(partition as usize)
            .map_or(0, |e| e.load(Ordering::Relaxed))
    }

    /// Records the message found at offset 0 of `partition`. Returns the epoch it had before,
    /// when it changed (the topic was recreated since it was learned).
    pub(crate) fn learn(&self, partition: u32, first: MessageId) -> Option<u32> {
        let epoch = first.epoch_fingerprint();
        let slot = self.0.get(partition as usize)?;
        let before = slot.swap(epoch, Ordering::Relaxed);
        (before != 0 && before != epoch).then_some(before)
    }

    /// `c` in the epoch of its partition (as known now).
    pub(crate) fn stamp(&self, c: Cursor) -> Cursor {
        c.in_epoch(self.get(c.partition))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_from_offset_zero_the_same_everywhere() {
        let (a, b) = (Epochs::new(2), Epochs::new(2));
        let first = MessageId::new();
        assert_eq!(a.get(1), 0);
        assert_eq!(a.stamp(Cursor::new(1, 5)).epoch, 0);
        assert_eq!(a.learn(1, first), None);
        assert_eq!(b.learn(1, first), None);
        assert_eq!(a.get(1), b.get(1));
        assert_ne!(a.get(1), 0);
        assert_eq!(a.get(0), 0, "per partition");
        let recreated = MessageId::new();
        assert_eq!(a.learn(1, recreated), Some(first.epoch_fingerprint()));
        assert_eq!(
            a.stamp(Cursor::new(1, 5)).epoch,
            recreated.epoch_fingerprint()
        );
        assert_eq!(a.learn(9, first), None, "out of range is ignored");
    }
}
