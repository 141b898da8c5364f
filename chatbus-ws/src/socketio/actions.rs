//! What a Socket.IO session does with each client event: the checks of `/ws` in the same
//! order (access, membership, limits, hooks), then the hub or the one publish path; every
//! answer a protocol v1 frame, translated like everything else the socket receives.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use chatbus_core::{Envelope, JoinOptions, Room};

use super::events::{self, Bad, Event};
use super::inbox::{answer_now, Inbound};
use super::session::{Answer, Me};
use crate::access;
use crate::api::{ApiError, Published};
use crate::chat::history_item;
use crate::hooks::{self, HookKind};
use crate::protocol::{self, ErrorCode, TargetAction};
use crate::state::{self, frames};

impl Me<'_> {
    pub(super) async fn handle(&self, inbound: Inbound, allowed: bool) {
        let answer = match (&inbound.event, &inbound.data) {
            (Err(e), _) | (_, Err(e)) => Err(self.error(
                ErrorCode::BadRequest,
                &format!("undecodable event: {e}"),
                None,
            )),
            (Ok(_), Ok(_)) if !allowed => Err(self.error(
                ErrorCode::RateLimited,
                "rate limit exceeded; event dropped",
                None,
            )),
            (Ok(name), Ok(data)) => match events::parse(name, data.clone()) {
                Err(Bad { code, message }) => Err(self.error(code, &message, None)),
                Ok(event) => self.act(event).await,
            },
        };
        let frame = match answer {
            Ok(f) | Err(f) => f,
        };
        answer_now(self.socket, *inbound, &frame);
    }

    async fn act(&self, event: Event) -> Answer {
        match event {
            Event::Send { room, body, key } => {
                let room = room.unwrap_or_else(|| self.settings.default_room.clone());
                self.send(room, None, body, key).await
            }
            Event::Direct { to, body, key } => {
                let room = access::direct_room(&self.conn.identity.user, &to);
                self.send(room, Some(to), body, key).await
            }
            Event::Join { room, since } => self.join(room, since).await,
            Event::Leave { room } => {
                // The personal and status channels are the server's, not the client's to leave.
                self.access(&room)?;
                if !self.handle.leave(&room) {
                    return Err(self.not_joined(&room));
                }
                self.svc.chat().presence_changed([room.clone()]);
                Ok(protocol::left(&room, None))
            }
            Event::Refresh { token } => self.refresh(&token).await,
            Event::Typing { room } => {
                self.access(&room)?;
                self.member(&room)?;
                self.hook(HookKind::Typing, &room, None).await?;
                let env = Envelope::ephemeral(
                    room,
                    crate::payload::typing(self.conn.identity.display_name_if_different()),
                )
                .with_from(self.conn.identity.user.clone());
                match self.svc.chat().hub().publish(&env).await {
                    Ok(_) => Ok(Bytes::from_static(b"{\"type\":\"typing\"}")),
                    Err(e) => Err(self.broker_error(&e, &env.room, "typing")),
                }
            }
            Event::Change { room, id, action } => {
                self.access(&room)?;
                if !room.as_str().starts_with(access::DIRECT_PREFIX) {
                    self.member(&room)?;
                }
                let change = match &action {
                    TargetAction::Edit { body } => {
                        self.hook(HookKind::Send, &room, Some(body)).await?;
                        state::actions::Change::Edit { body }
                    }
                    TargetAction::Delete => state::actions::Change::Delete,
                    TargetAction::React { emoji, on } => {
                        state::actions::Change::React { emoji, on: *on }
                    }
                };
                let chat = self.svc.chat();
                match chat
                    .change(room.clone(), &self.conn.identity, id, change)
                    .await
                {
                    Ok(r) => Ok(protocol::ack(None, r.id, r.cursor, None, false)),
                    Err(e) => Err(self.api_error(&e, &room, "change")),
                }
            }
            Event::Read { room, cursor } => {
                self.access(&room)?;
                if !room.as_str().starts_with(access::DIRECT_PREFIX) {
                    self.member(&room)?;
                }
                let chat = self.svc.chat();
                let seen = self.handle.last_cursor(&room);
                match chat
                    .mark_read(room.clone(), &self.conn.identity, cursor, seen)
                    .await
                {
                    Ok(Some(r)) => Ok(protocol::ack(None, r.id, r.cursor, None, false)),
                    Ok(None) => Ok(frames::read_unchanged(None, &room)),
                    Err(e) => Err(self.api_error(&e, &room, "read")),
                }
            }
            Event::Members { room, after, limit } => {
                self.access(&room)?;
                self.member(&room)?;
                Ok(self
                    .svc
                    .chat()
                    .members_frame(&room, after.as_deref(), limit, None))
            }
            Event::Conversations { before, limit } => {
                let limit = limit
                    .map_or(frames::DEFAULT_CONVERSATIONS, |l| {
                        usize::try_from(l).unwrap_or(usize::MAX)
                    })
                    .clamp(1, frames::MAX_CONVERSATIONS);
                let store = self.svc.chat().store();
                match store
                    .conversations(&self.conn.identity.user, before.as_ref(), limit)
                    .await
                {
                    Ok(page) => Ok(frames::conversations(&page, None)),
                    Err(e) => {
                        let code = ErrorCode::for_error(&e);
                        Err(self.error(code, &format!("conversations failed: {e}"), None))
                    }
                }
            }
            Event::History {
                room,
                before,
                limit,
            } => {
                self.access(&room)?;
                if !room.as_str().starts_with(access::DIRECT_PREFIX) {
                    self.member(&room)?;
                }
                self.hook(HookKind::History, &room, None).await?;
                let cfg = self.svc.config();
                let limit = limit
                    .map_or(cfg.default_history, |l| {
                        usize::try_from(l).unwrap_or(usize::MAX)
                    })
                    .clamp(1, cfg.max_history.max(1));
                let chat = self.svc.chat();
                let viewer = &self.conn.identity.user;
                if let Some((items, more)) = chat.state_history(&room, viewer, before, limit).await
                {
                    let more = more.map(|c| c.to_string());
                    return Ok(protocol::history(&room, &items, more.as_deref(), None));
                }
                match chat.hub().history(&room, before, limit).await {
                    Ok(page) => {
                        let items: Vec<Bytes> =
                            page.messages.iter().filter_map(history_item).collect();
                        let more = page.more_before.map(|c| c.to_string());
                        Ok(protocol::history(&room, &items, more.as_deref(), None))
                    }
                    Err(e) => Err(self.broker_error(&e, &room, "history")),
                }
            }
        }
    }

    /// The built-in access checks (reserved rooms, other pairs' conversations, the token's
    /// grants), first, as on `/ws`: a third user learns nothing of a room.
    fn access(&self, room: &Room) -> Result<(), Bytes> {
        access::check(&self.conn.identity, room)
            .map_err(|reason| self.error(ErrorCode::Forbidden, reason, Some(room)))
    }

    fn member(&self, room: &Room) -> Result<(), Bytes> {
        if self.handle.is_member(room) {
            Ok(())
        } else {
            Err(self.not_joined(room))
        }
    }

    fn not_joined(&self, room: &Room) -> Bytes {
        self.error(ErrorCode::NotJoined, "join the room first", Some(room))
    }

    async fn hook(&self, kind: HookKind, room: &Room, body: Option<&str>) -> Result<(), Bytes> {
        let (cfg, counters) = (self.svc.config(), &self.svc.counters().hooks);
        hooks::room_action(cfg, counters, self.conn, kind, room, body)
            .await
            .map_err(|d| self.error(ErrorCode::Forbidden, d.reason(), Some(room)))
    }

    pub(super) async fn join(&self, room: Room, since: Option<chatbus_core::Cursor>) -> Answer {
        let cfg = self.svc.config();
        let chat = self.svc.chat();
        if !self.handle.is_member(&room) {
            let joined = self
                .handle
                .rooms()
                .iter()
                .filter(|r| access::is_client_room(r))
                .count();
            if joined >= cfg.max_rooms {
                let max = cfg.max_rooms;
                return Err(self.error(
                    ErrorCode::Forbidden,
                    &format!("room limit reached ({max} per connection)"),
                    Some(&room),
                ));
            }
        }
        self.access(&room)?;
        self.hook(HookKind::Join, &room, None).await?;
        let resuming = since.is_some() && chat.hub().broker().capabilities().replay;
        if let Err(e) = self
            .handle
            .join_with(room.clone(), JoinOptions::default().since(since))
            .await
        {
            return Err(self.broker_error(&e, &room, "join"));
        }
        chat.presence_changed([room.clone()]);
        let read = chat.joined_state(&room, &self.conn.identity.user).await;
        Ok(protocol::joined(&room, resuming, None, read))
    }

    /// A send to `room`, or (with `to`) a direct message in the conversation `room`, which
    /// needs no join, as on `/ws`.
    async fn send(
        &self,
        room: Room,
        to: Option<Arc<str>>,
        body: String,
        key: Option<crate::idempotency::SendKey>,
    ) -> Answer {
        self.access(&room)?;
        if to.is_none() {
            self.member(&room)?;
        }
        let limit = self.svc.config().max_frame_size;
        if body.len() > limit {
            return Err(self.error(
                ErrorCode::TooLarge,
                &format!(
                    "message of {} bytes exceeds the limit of {limit}",
                    body.len()
                ),
                Some(&room),
            ));
        }
        self.hook(HookKind::Send, &room, Some(&body)).await?;
        let direct = to.is_some();
        match self
            .svc
            .client_send(&self.conn.identity, room.clone(), to, Cow::Owned(body), key)
            .await
        {
            Ok(Published { receipt, duplicate }) => {
                // A direct message's ack names its conversation, as on `/ws`.
                let conversation = direct.then_some(&room);
                Ok(protocol::ack(
                    None,
                    receipt.id,
                    receipt.cursor,
                    conversation,
                    duplicate,
                ))
            }
            Err(ApiError::Broker(e)) => Err(self.broker_error(&e, &room, "send")),
            Err(e) => {
                let message = match &e {
                    ApiError::Denied(d) => d.reason().to_owned(),
                    other => other.to_string(),
                };
                Err(self.error(e.code(), &message, Some(&room)))
            }
        }
    }

    /// A `refresh`: verified like a connect token, for the same user; only the expiry
    /// changes. A refused one changes nothing. (As the native `refresh` frame.)
    async fn refresh(&self, token: &str) -> Answer {
        let Some(verifier) = &self.svc.config().verifier else {
            return Err(self.error(
                ErrorCode::Unsupported,
                "this server checks no tokens; there is nothing to refresh",
                None,
            ));
        };
        match verifier.verify(token).await {
            Err(e) => Err(self.error(
                ErrorCode::Unauthorized,
                &format!("refresh refused: {}", e.message()),
                None,
            )),
            Ok(id) if id.user != self.conn.identity.user => Err(self.error(
                ErrorCode::Unauthorized,
                "refresh refused: the token is for another user",
                None,
            )),
            Ok(id) => {
                self.expiry.send_replace(id.expires_at);
                let ms = id
                    .expires_at
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                Ok(protocol::refreshed(ms, None))
            }
        }
    }

    fn api_error(&self, e: &ApiError, room: &Room, op: &str) -> Bytes {
        match e {
            ApiError::Broker(e) | ApiError::Store(e) => self.broker_error(e, room, op),
            ApiError::Denied(d) => self.error(e.code(), d.reason(), Some(room)),
            other => self.error(other.code(), &other.to_string(), Some(room)),
        }
    }

    fn broker_error(&self, e: &chatbus_core::Error, room: &Room, op: &str) -> Bytes {
        let code = ErrorCode::for_error(e);
        tracing::debug!(socket = %self.socket.id, %room, error = %e, "socket.io {op} failed");
        // As on `/ws`: the broker's message, except for internal errors.
        let message = match code {
            ErrorCode::Internal => format!("{op} failed"),
            _ => e.to_string(),
        };
        self.error(code, &message, Some(room))
    }
}
