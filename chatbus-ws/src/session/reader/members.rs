//! The reader's `members` request: a page of who is online in a room.

use std::sync::Arc;

use chatbus_core::Room;

use super::Reader;
use crate::protocol::{self, ClientId};

/// Users per `members` page unless the client asks for fewer or more.
pub(crate) const DEFAULT_MEMBERS: usize = 100;
/// The most users one `members` page holds.
pub(crate) const MAX_MEMBERS: usize = 1000;

impl Reader<'_> {
    /// `members`: only for a member of the room (like `history`), from this instance's view of
    /// the room (what every instance announced, and its own connections).
    pub(super) fn members(
        &self,
        room: &Room,
        after: Option<Arc<str>>,
        limit: Option<u64>,
        cid: Option<&ClientId>,
    ) {
        if !self.access(room, cid) {
            return;
        }
        if !self.handle.is_member(room) {
            self.not_joined(cid, room);
            return;
        }
        let limit = limit.map_or(DEFAULT_MEMBERS, |l| {
            usize::try_from(l).unwrap_or(usize::MAX)
        });
        let limit = limit.clamp(1, MAX_MEMBERS);
        let (users, more) = self.svc.chat().members(room, after.as_deref(), limit);
        let next = more.then(|| users.last().map(AsRef::as_ref)).flatten();
        self.handle
            .reply(protocol::members(room, &users, next, cid));
    }
}
