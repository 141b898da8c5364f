//! Per (receiver, sender) sequence tracking: tells in-order, late (filling a gap) and
//! duplicate deliveries apart with a bounded memory of gaps, so loss, reordering and
//! duplicates are counted exactly.

/// Per (receiver, sender): what arrived so far.
#[derive(Debug, Default)]
pub(super) struct Track {
    /// The next sequence number expected.
    pub(super) next: u32,
    /// Sequence numbers below `next` not received yet (usually empty).
    pub(super) missing: Vec<u32>,
}

/// What one received sequence number was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// The next expected, or past a gap (the gap is remembered).
    InOrder,
    /// Fills an earlier gap: arrived out of order.
    Late,
    /// Already received.
    Duplicate,
}

/// Gaps remembered per (receiver, sender) at most; past it a gap still counts as loss (the
/// delivered count is what loss is computed from), it just cannot be filled late any more.
const MAX_MISSING: usize = 100_000;

impl Track {
    pub(super) fn accept(&mut self, seq: u32) -> Seen {
        if seq == self.next {
            self.next = self.next.saturating_add(1);
            Seen::InOrder
        } else if seq > self.next {
            let room = MAX_MISSING.saturating_sub(self.missing.len());
            let gap_end = seq.min(self.next.saturating_add(room as u32));
            self.missing.extend(self.next..gap_end);
            self.next = seq.saturating_add(1);
            Seen::InOrder
        } else if let Some(p) = self.missing.iter().position(|&m| m == seq) {
            self.missing.swap_remove(p);
            Seen::Late
        } else {
            Seen::Duplicate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_tracking() {
        let mut t = Track::default();
        assert_eq!(t.accept(0), Seen::InOrder);
        assert_eq!(t.accept(1), Seen::InOrder);
        assert_eq!(t.accept(1), Seen::Duplicate);
        // 2 and 3 missing.
        assert_eq!(t.accept(4), Seen::InOrder);
        assert_eq!(t.missing.len(), 2);
        assert_eq!(t.accept(3), Seen::Late);
        assert_eq!(t.accept(3), Seen::Duplicate);
        assert_eq!(t.accept(0), Seen::Duplicate);
        assert_eq!(t.missing, vec![2]);
        assert_eq!(t.accept(5), Seen::InOrder);
        // A huge jump does not allocate without bound.
        assert_eq!(t.accept(u32::MAX - 1), Seen::InOrder);
        assert!(t.missing.len() <= MAX_MISSING);
    }
}
