//! [`DedupeWindow`]: the bounded memory of recently seen message ids.

use std::collections::{HashSet, VecDeque};

use crate::envelope::MessageId;

/// A bounded set of recently seen message ids: the dedupe window of [`DualBus`](super::DualBus) for messages
/// without a cursor. Remembers the last `cap` ids (a hash set plus a ring for eviction, about
/// 40 bytes per id).
#[derive(Debug)]
pub struct DedupeWindow {
    set: HashSet<MessageId>,
    order: VecDeque<MessageId>,
    cap: usize,
}

impl DedupeWindow {
    /// A window of `cap` ids (at least 1).
    pub fn new(cap: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Whether `id` is in the window.
    pub fn contains(&self, id: &MessageId) -> bool {
        self.set.contains(id)
    }

    /// Records `id`; returns false if it was already in the window (a duplicate).
    pub fn insert(&mut self, id: MessageId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}
