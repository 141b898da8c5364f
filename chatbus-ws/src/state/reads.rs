//! What both endpoints read from the store: a `joined` reply's read state, `history` in
//! state (completed from the log where the store is short), the conversation list.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chatbus_core::store::ReadState;
use chatbus_core::{Cursor, Room};

use super::frames;
use crate::access;
use crate::chat::{history_item, ChatHub};

impl ChatHub {
    /// What `joined` says of `user`'s reading of `room`; records the membership for the
    /// conversation list. `None` (and a warning) when the store cannot answer: the join goes
    /// on without. `None` for the server's own channels.
    pub(crate) async fn joined_state(&self, room: &Room, user: &str) -> Option<ReadState> {
        if !access::is_client_room(room) {
            return None;
        }
        let store = self.store();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let state = async {
            store.join(room, user, now).await?;
            store.read_state(room, user).await
        };
        match state.await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(%room, error = %e, "store: no read state for a join");
                None
            }
        }
    }

    /// A `history` page in state from the store, as `message` frames, and the cursor to ask
    /// the next page with when the page is partial (as a log page's `more_before`): `None`
    /// when the store cannot answer it (a `before` it does not know, a room it has nothing
    /// of, an error), and the caller reads the log.
    ///
    /// A page the store answers short (fewer than `limit`, nothing older in the store) may be
    /// short only because the store started after the room did (a memory store fed live, or
    /// bounded): it is completed from the log, older messages as they were sent, and the log
    /// page's own partial marker is kept.
    pub(crate) async fn state_history(
        &self,
        room: &Room,
        viewer: &str,
        before: Option<Cursor>,
        limit: usize,
    ) -> Option<(Vec<Bytes>, Option<Cursor>)> {
        let page = match self.store().page(room, viewer, before, limit).await {
            Ok(page) => page?,
            Err(e) => {
                tracing::warn!(%room, error = %e, "store: history from the log instead");
                return None;
            }
        };
        if page.messages.is_empty() {
            return None;
        }
        let mut items: Vec<Bytes> = page.messages.iter().map(frames::stored_message).collect();
        let mut more_before = None;
        if !page.more && items.len() < limit {
            let oldest = page.messages.first().map(|m| m.cursor);
            let want = limit - items.len();
            if let Ok(older) = self.hub().history(room, oldest, want).await {
                let mut head: Vec<Bytes> = older.messages.iter().filter_map(history_item).collect();
                head.append(&mut items);
                items = head;
                more_before = older.more_before;
            }
        }
        Some((items, more_before))
    }
}
