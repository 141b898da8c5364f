//! The reader's `members` request: a page of who is online in a room.

use std::sync::Arc;

use chatbus_core::Room;

use super::Reader;
use crate::protocol::ClientId;

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
        let frame = self
            .svc
            .chat()
            .members_frame(room, after.as_deref(), limit, cid);
        self.handle.reply(frame);
    }
}
