//! The reader's chat-state requests: `edit`, `delete`, `react`, `read`, `conversations`, and
//! what `join` and `history` take from the store.

use bytes::Bytes;
use chatbus_core::store::ReadState;
use std::time::{SystemTime, UNIX_EPOCH};

use chatbus_core::{Cursor, MessageId, Room};

use super::Reader;
use crate::access;
use crate::api::ApiError;
use crate::hooks::HookKind;
use crate::protocol::{self, ClientId, ErrorCode, TargetAction};
use crate::state::actions::Change;
use crate::state::frames;

/// The most conversations one `conversations` reply lists.
pub(crate) const MAX_CONVERSATIONS: usize = 100;
/// Conversations listed when the request names no `limit`.
const DEFAULT_CONVERSATIONS: usize = 20;

impl Reader<'_> {
    /// Whether this connection may change or read the state of `room`: the access checks,
    /// then membership (a participant of a direct conversation need not join it). Answers the
    /// refusal itself.
    fn may_use(&self, room: &Room, cid: Option<&ClientId>) -> bool {
        if !self.access(room, cid) {
            return false;
        }
        let direct = room.as_str().starts_with(access::DIRECT_PREFIX);
        if !direct && !self.handle.is_member(room) {
            self.not_joined(cid, room);
            return false;
        }
        true
    }

    fn api_error(&self, e: &ApiError, cid: Option<&ClientId>, room: &Room, op: &str) {
        match e {
            ApiError::Broker(e) | ApiError::Store(e) => self.broker_error(e, cid, room, op),
            ApiError::Denied(d) => self.error(e.code(), d.reason(), cid, Some(room)),
            other => self.error(other.code(), &other.to_string(), cid, Some(room)),
        }
    }

    /// `edit`, `delete`, `react`.
    pub(super) async fn change(
        &self,
        room: Room,
        id: MessageId,
        action: TargetAction<'_>,
        cid: Option<&ClientId>,
    ) {
        if !self.may_use(&room, cid) {
            return;
        }
        let change = match &action {
            TargetAction::Edit { body } => {
                // The application's moderation sees an edit's new text as it sees a send's.
                if !self.hook(HookKind::Send, &room, Some(body), cid).await {
                    return;
                }
                Change::Edit { body }
            }
            TargetAction::Delete => Change::Delete,
            TargetAction::React { emoji, on } => Change::React { emoji, on: *on },
        };
        let chat = self.svc.chat();
        match chat
            .change(room.clone(), &self.conn.identity, id, change)
            .await
        {
            Ok(receipt) => {
                self.handle
                    .reply(protocol::ack(cid, receipt.id, receipt.cursor, None, false));
            }
            Err(e) => self.api_error(&e, cid, &room, "change"),
        }
    }

    /// `read`.
    pub(super) async fn read(&self, room: Room, cursor: Cursor, cid: Option<&ClientId>) {
        if !self.may_use(&room, cid) {
            return;
        }
        let chat = self.svc.chat();
        match chat
            .mark_read(room.clone(), &self.conn.identity, cursor)
            .await
        {
            Ok(Some(receipt)) => {
                self.handle
                    .reply(protocol::ack(cid, receipt.id, receipt.cursor, None, false));
            }
            Ok(None) => {
                self.handle.reply(frames::read_unchanged(cid, &room));
            }
            Err(e) => self.api_error(&e, cid, &room, "read"),
        }
    }

    /// `conversations`.
    pub(super) async fn conversations(
        &self,
        before: Option<chatbus_core::store::ConversationKey>,
        limit: Option<u64>,
        cid: Option<&ClientId>,
    ) {
        let limit = limit.map_or(DEFAULT_CONVERSATIONS, |l| {
            usize::try_from(l).unwrap_or(usize::MAX)
        });
        let limit = limit.clamp(1, MAX_CONVERSATIONS);
        let store = self.svc.chat().store();
        match store
            .conversations(&self.conn.identity.user, before.as_ref(), limit)
            .await
        {
            Ok(page) => {
                self.handle.reply(frames::conversations(&page, cid));
            }
            Err(e) => {
                let code = ErrorCode::for_error(&e);
                tracing::debug!(session = self.handle.id(), error = %e, "conversations failed");
                self.error(code, &format!("conversations failed: {e}"), cid, None);
            }
        }
    }

    /// What `joined` says of the user's reading of `room`; records the membership for the
    /// conversation list. `None` (and a warning) when the store cannot answer: the join goes
    /// on without.
    pub(super) async fn joined_state(&self, room: &Room) -> Option<ReadState> {
        if !access::is_client_room(room) {
            return None;
        }
        let store = self.svc.chat().store();
        let user = &self.conn.identity.user;
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

    /// A `history` page in state from the store: `None` when the store cannot answer it (a
    /// `before` it does not know, an error), and the caller reads the log instead.
    ///
    /// A page the store answers short (fewer than `limit`, nothing older in the store) may be
    /// short only because the store started after the room did (a memory store fed live): it
    /// is completed from the log, older messages as they were sent.
    pub(super) async fn state_history(
        &self,
        room: &Room,
        before: Option<Cursor>,
        limit: usize,
    ) -> Option<Vec<Bytes>> {
        let store = self.svc.chat().store();
        let page = match store
            .page(room, &self.conn.identity.user, before, limit)
            .await
        {
            Ok(page) => page?,
            Err(e) => {
                tracing::warn!(%room, error = %e, "store: history from the log instead");
                return None;
            }
        };
        let mut items: Vec<Bytes> = page.messages.iter().map(frames::stored_message).collect();
        if !page.more && items.len() < limit {
            let oldest = page.messages.first().map(|m| m.cursor).or(before);
            let want = limit - items.len();
            if let Ok(older) = self.svc.chat().hub().history(room, oldest, want).await {
                let mut head: Vec<Bytes> = older
                    .messages
                    .iter()
                    .filter_map(crate::chat::history_item)
                    .collect();
                head.append(&mut items);
                items = head;
            }
        }
        Some(items)
    }
}
