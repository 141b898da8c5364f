//! The receiving side of presence: per room, each instance's announced list and the union,
//! as one count per user of the instances listing it, so a diff costs O(changes) and a frame
//! O(`max_listed`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use chatbus_core::Room;
use tokio::time::Instant;

use crate::protocol;

#[derive(Default)]
pub(super) struct RoomView {
    pub(super) instances: HashMap<u128, InstanceView>,
    // The union: per user, how many instances list it.
    pub(super) online: BTreeMap<Arc<str>, u32>,
    // The last frame sent to local members: what a member joining a large room is answered
    // with (computing the list per join would make a burst of joins quadratic).
    pub(super) frame: Option<Bytes>,
}

pub(super) struct InstanceView {
    pub(super) seq: u64,
    pub(super) users: HashSet<Arc<str>>,
    pub(super) seen: Instant,
    // Set when a diff did not fit: when this instance last asked for full lists.
    pub(super) asked: Option<Instant>,
}

impl RoomView {
    /// Adds or removes one instance's listing of `user`; true if the union changed.
    pub(super) fn count(&mut self, user: &Arc<str>, add: bool) -> bool {
        if add {
            let n = self.online.entry(user.clone()).or_insert(0);
            *n += 1;
            *n == 1
        } else {
            match self.online.get_mut(user) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    self.online.remove(user);
                    true
                }
                None => false,
            }
        }
    }

    pub(super) fn drop_instance(&mut self, instance: u128) -> bool {
        let Some(v) = self.instances.remove(&instance) else {
            return false;
        };
        let mut changed = false;
        for u in &v.users {
            changed |= self.count(u, false);
        }
        changed
    }

    /// Replaces an instance's list; true if the union changed.
    pub(super) fn replace(
        &mut self,
        instance: u128,
        seq: u64,
        users: Vec<Arc<str>>,
        now: Instant,
    ) -> bool {
        let mut changed = self.drop_instance(instance);
        let users: HashSet<Arc<str>> = users.into_iter().collect();
        for u in &users {
            changed |= self.count(u, true);
        }
        self.instances.insert(
            instance,
            InstanceView {
                seq,
                users,
                seen: now,
                asked: None,
            },
        );
        changed
    }

    /// The union with `extra` (this instance's local members), sorted.
    pub(super) fn with(&self, extra: Vec<Arc<str>>) -> Vec<Arc<str>> {
        let mut all = extra;
        all.extend(self.online.keys().cloned());
        all.sort_unstable();
        all.dedup();
        all
    }

    pub(super) fn render(&mut self, room: &Room, max_listed: usize) -> Bytes {
        // Beyond `max_listed`, the count only (the names are paged with `members`).
        let listed: Vec<&str> = if self.online.len() > max_listed {
            Vec::new()
        } else {
            self.online.keys().map(AsRef::as_ref).collect()
        };
        let frame = protocol::presence_listed(room, listed, self.online.len());
        self.frame = Some(frame.clone());
        frame
    }
}
