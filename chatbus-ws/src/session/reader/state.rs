//! The reader's chat-state requests: `edit`, `delete`, `react`, `read`, `conversations`.

use chatbus_core::{Cursor, MessageId, Room};

use super::Reader;
use crate::access;
use crate::api::ApiError;
use crate::hooks::HookKind;
use crate::protocol::{self, ClientId, ErrorCode, TargetAction};
use crate::state::actions::Change;
use crate::state::frames;

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
        let seen = self.handle.last_cursor(&room);
        match chat
            .mark_read(room.clone(), &self.conn.identity, cursor, seen)
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
        let limit = limit.map_or(frames::DEFAULT_CONVERSATIONS, |l| {
            usize::try_from(l).unwrap_or(usize::MAX)
        });
        let limit = limit.clamp(1, frames::MAX_CONVERSATIONS);
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
}
