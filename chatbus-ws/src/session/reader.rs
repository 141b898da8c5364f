//! The reader half of a session: client frames in, hub calls and queued replies out.
//!
//! Each text frame is size-checked, rate-limited, parsed once and answered on the session's
//! control queue (so replies overtake queued messages); refusals are `error` frames counted by
//! code. The reader also owns the idle timeout and notices shutdown between frames.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chatbus_core::{Cursor, Envelope, JoinOptions, Room, SessionHandle};
use futures::{Stream, StreamExt};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

mod members;
mod state;

use super::{End, TransportError, WsMessage};
use crate::access::{self, direct_room, status_channel};
use crate::api::{ApiError, Published};
use crate::chat::history_item;
use crate::config::{RateLimit, WsConfig};
use crate::hooks::{self, Conn, HookKind};
use crate::idempotency::SendKey;
use crate::metrics::WsCounters;
use crate::payload;
use crate::protocol::{self, ClientId, ErrorCode, Request};
use crate::service::WsService;

/// A token bucket; `tokio::time::Instant` so tests can pause time. Also the per-address
/// attempt limit of the handshake ([`crate::ip`]).
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    last: Instant,
    limit: RateLimit,
}

impl TokenBucket {
    pub(crate) fn new(limit: RateLimit) -> Self {
        let burst = f64::from(limit.burst.max(1));
        Self {
            tokens: burst,
            last: Instant::now(),
            limit: RateLimit {
                burst: limit.burst.max(1),
                per_second: limit.per_second.max(0.0),
            },
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens =
            (self.tokens + elapsed * self.limit.per_second).min(f64::from(self.limit.burst));
    }

    /// Whether the bucket refilled completely (it then says nothing a fresh one would not).
    pub(crate) fn is_full(&mut self) -> bool {
        self.refill();
        self.tokens >= f64::from(self.limit.burst)
    }

    pub(crate) fn allow(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub(super) struct Reader<'a> {
    svc: &'a WsService,
    handle: SessionHandle,
    conn: &'a Conn,
    bucket: Option<TokenBucket>,
    /// Pings and pongs: tungstenite answers each ping by itself (keeping at most one pong
    /// pending), so without this budget a client could make the server read and answer pings
    /// as fast as it can send them.
    control: Option<TokenBucket>,
    /// When the connection's token expires (armed only for identities with an expiry, so an
    /// anonymous connection carries no timer); a `refresh` moves it.
    expiry: Option<Pin<Box<Sleep>>>,
}

/// The timer for a credential that expires at `at`; `None` for no expiry, or one so far ahead
/// (over a year) that the timer wheel would not hold it, which is none in practice.
pub(crate) fn expiry_timer(at: Option<SystemTime>) -> Option<Pin<Box<Sleep>>> {
    let left = at?
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    if left > Duration::from_secs(365 * 24 * 3600) {
        return None;
    }
    Some(Box::pin(tokio::time::sleep_until(Instant::now() + left)))
}

/// Resolves when the token expires; never without one.
pub(crate) async fn expired(expiry: &mut Option<Pin<Box<Sleep>>>) {
    match expiry {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

impl<'a> Reader<'a> {
    pub(super) fn new(
        svc: &'a WsService,
        handle: SessionHandle,
        conn: &'a Conn,
        cfg: &WsConfig,
    ) -> Self {
        Self {
            svc,
            handle,
            conn,
            bucket: cfg.rate_limit.map(TokenBucket::new),
            control: cfg.control_rate_limit.map(TokenBucket::new),
            expiry: expiry_timer(conn.identity.expires_at),
        }
    }

    pub(super) async fn run<St>(
        &mut self,
        stream: &mut St,
        end_tx: &mut oneshot::Sender<End>,
    ) -> End
    where
        St: Stream<Item = Result<WsMessage, TransportError>> + Unpin,
    {
        let cfg = self.svc.config();
        let shutdown = self.svc.shutdown_token();
        loop {
            if self.handle.is_closed() {
                return End::WriterStopped;
            }
            // Only the wait for the next frame is raced against shutdown: a frame being handled
            // (a publish in flight) always completes and gets its answer.
            let next = tokio::select! {
                biased;
                () = end_tx.closed() => return End::WriterStopped,
                () = shutdown.cancelled() => return End::Shutdown,
                () = expired(&mut self.expiry) => {
                    self.error(
                        ErrorCode::Unauthorized,
                        "token expired; closing (send `refresh` before it expires)",
                        None,
                        None,
                    );
                    return End::TokenExpired;
                }
                next = tokio::time::timeout(cfg.idle_timeout, stream.next()) => next,
            };
            let msg = match next {
                Err(_) => return End::Idle,
                Ok(None) => return End::ClientGone,
                Ok(Some(Ok(msg))) => msg,
                Ok(Some(Err(TransportError::TooLarge))) => {
                    let limit = cfg.hard_frame_size;
                    self.error(
                        ErrorCode::TooLarge,
                        &format!("frame larger than {limit} bytes; closing"),
                        None,
                        None,
                    );
                    return End::TooLarge;
                }
                Ok(Some(Err(TransportError::InvalidUtf8))) => {
                    self.error(
                        ErrorCode::BadRequest,
                        "text frame is not valid UTF-8; closing",
                        None,
                        None,
                    );
                    return End::InvalidUtf8;
                }
                Ok(Some(Err(TransportError::Other(e)))) => {
                    tracing::debug!(session = self.handle.id(), error = %e, "socket read failed");
                    return End::ClientGone;
                }
            };
            match msg {
                WsMessage::Text(bytes) => {
                    WsCounters::inc(&self.svc.counters().frames_in);
                    let allowed = self.bucket.as_mut().is_none_or(TokenBucket::allow);
                    // Boxed: a client frame is rare next to deliveries, and inline its state
                    // (join, publish, history futures) would size the idle reader.
                    Box::pin(self.text(&bytes, allowed)).await;
                }
                WsMessage::Binary(_) => {
                    WsCounters::inc(&self.svc.counters().frames_in);
                    // Charged like any frame, so binary floods are limited too.
                    if self.bucket.as_mut().is_none_or(TokenBucket::allow) {
                        self.error(
                            ErrorCode::BadRequest,
                            "binary frames are not supported; send JSON text frames",
                            None,
                            None,
                        );
                    } else {
                        self.rate_limited(None, None);
                    }
                }
                WsMessage::Ping(_) | WsMessage::Pong(_) => {
                    if !self.control.as_mut().is_none_or(TokenBucket::allow) {
                        self.error(
                            ErrorCode::RateLimited,
                            "control frames (pings/pongs) over the limit; closing",
                            None,
                            None,
                        );
                        return End::Flood;
                    }
                }
                WsMessage::Close(_) => return End::ClientGone,
            }
        }
    }

    /// A `refresh`: verified like a connect token; it must prove the same user. Only the
    /// expiry changes (the display name stays the one of the handshake). A refused refresh
    /// changes nothing: the old expiry still holds.
    async fn refresh(&mut self, token: &str, cid: Option<&ClientId>) {
        let Some(verifier) = &self.svc.config().verifier else {
            self.error(
                ErrorCode::Unsupported,
                "this server checks no tokens; there is nothing to refresh",
                cid,
                None,
            );
            return;
        };
        match verifier.verify(token).await {
            Err(e) => {
                let message = format!("refresh refused: {}", e.message());
                self.error(ErrorCode::Unauthorized, &message, cid, None);
            }
            Ok(id) if id.user != self.conn.identity.user => self.error(
                ErrorCode::Unauthorized,
                "refresh refused: the token is for another user",
                cid,
                None,
            ),
            Ok(id) => {
                self.expiry = expiry_timer(id.expires_at);
                let ms = id
                    .expires_at
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                self.handle.reply(protocol::refreshed(ms, cid));
            }
        }
    }

    fn error(&self, code: ErrorCode, message: &str, cid: Option<&ClientId>, room: Option<&Room>) {
        self.svc.counters().count_error(code);
        self.handle.reply(protocol::error(code, message, cid, room));
    }

    fn rate_limited(&self, cid: Option<&ClientId>, room: Option<&Room>) {
        self.error(
            ErrorCode::RateLimited,
            "rate limit exceeded; frame dropped",
            cid,
            room,
        );
    }

    async fn text(&mut self, bytes: &[u8], allowed: bool) {
        let cfg = self.svc.config();
        if bytes.len() > cfg.max_frame_size {
            let limit = cfg.max_frame_size;
            self.error(
                ErrorCode::TooLarge,
                &format!(
                    "frame of {} bytes exceeds the limit of {limit}",
                    bytes.len()
                ),
                None,
                None,
            );
            return;
        }
        let (req, cid) = match protocol::parse(bytes) {
            Ok(parsed) => parsed,
            Err(r) => {
                self.error(r.code, &r.message, r.client_id.as_ref(), None);
                return;
            }
        };
        let cid = cid.as_ref();
        if !allowed {
            self.rate_limited(cid, req.room());
            return;
        }
        match req {
            Request::Ping => {
                self.handle.reply(Bytes::from_static(protocol::PONG));
            }
            Request::Refresh { token } => self.refresh(&token, cid).await,
            Request::Join { room, since } => self.join(room, since, cid).await,
            Request::Leave { room } => {
                // The personal and status channels are the server's, not the client's to leave
                // (`unwatch` ends a watch).
                if access::is_internal(&room) {
                    // Refused by the access check (answered `forbidden`).
                    let _ = self.access(&room, cid);
                    return;
                }
                if !self.handle.leave(&room) {
                    self.not_joined(cid, &room);
                    return;
                }
                self.handle.reply(protocol::left(&room, cid));
                self.svc.chat().presence_changed([room]);
            }
            Request::Send { room, body, key } => {
                // Access first: a third user learns nothing of a room it may not use.
                if !self.access(&room, cid) {
                    return;
                }
                if !self.handle.is_member(&room) {
                    self.not_joined(cid, &room);
                    return;
                }
                if self.hook(HookKind::Send, &room, Some(&body), cid).await {
                    self.send(room, None, body, key, cid).await;
                }
            }
            Request::Direct { to, body, key } => {
                let room = direct_room(&self.conn.identity.user, &to);
                if self.access(&room, cid)
                    && self.hook(HookKind::Send, &room, Some(&body), cid).await
                {
                    self.send(room, Some(to), body, key, cid).await;
                }
            }
            Request::Typing { room } => {
                if !self.access(&room, cid) {
                    return;
                }
                if !self.handle.is_member(&room) {
                    self.not_joined(cid, &room);
                    return;
                }
                if !self.hook(HookKind::Typing, &room, None, cid).await {
                    return;
                }
                let env = Envelope::ephemeral(
                    room,
                    payload::typing(self.conn.identity.display_name_if_different()),
                )
                .with_from(self.conn.identity.user.clone());
                if let Err(e) = self.svc.chat().hub().publish(&env).await {
                    self.broker_error(&e, cid, &env.room, "typing");
                }
            }
            Request::History {
                room,
                before,
                limit,
            } => self.history(room, before, limit, cid).await,
            Request::Target { room, id, action } => self.change(room, id, action, cid).await,
            Request::Read { room, cursor } => self.read(room, cursor, cid).await,
            Request::Conversations { before, limit } => {
                self.conversations(before, limit, cid).await;
            }
            Request::Members { room, after, limit } => self.members(&room, after, limit, cid),
            Request::Watch { users } => self.watch(users, cid).await,
            Request::Unwatch { users } => {
                for u in &users {
                    self.handle.leave(&status_channel(u));
                }
            }
        }
    }

    /// The application's hook for this action (after [`access`](Self::access) passed);
    /// answers `forbidden` and returns false if it refuses.
    async fn hook(
        &self,
        kind: HookKind,
        room: &Room,
        body: Option<&str>,
        cid: Option<&ClientId>,
    ) -> bool {
        let (cfg, counters) = (self.svc.config(), &self.svc.counters().hooks);
        match hooks::room_action(cfg, counters, self.conn, kind, room, body).await {
            Ok(()) => true,
            Err(denied) => {
                self.error(ErrorCode::Forbidden, denied.reason(), cid, Some(room));
                false
            }
        }
    }

    /// The built-in checks ([`access::check`]: reserved rooms, other pairs' conversations,
    /// the token's grants); answers `forbidden` and returns false if they refuse. Runs first,
    /// before membership and hooks, so a third user learns nothing of a room.
    fn access(&self, room: &Room, cid: Option<&ClientId>) -> bool {
        match access::check(&self.conn.identity, room) {
            Ok(()) => true,
            Err(reason) => {
                self.error(ErrorCode::Forbidden, reason, cid, Some(room));
                false
            }
        }
    }

    async fn join(&mut self, room: Room, since: Option<Cursor>, cid: Option<&ClientId>) {
        let cfg = self.svc.config();
        let chat = self.svc.chat();
        let member = self.handle.is_member(&room);
        if !member && self.client_rooms() >= cfg.max_rooms {
            let max = cfg.max_rooms;
            self.error(
                ErrorCode::Forbidden,
                &format!("room limit reached ({max} per connection)"),
                cid,
                Some(&room),
            );
            return;
        }
        if !self.access(&room, cid) || !self.hook(HookKind::Join, &room, None, cid).await {
            return;
        }
        // Same test as the hub's: a resume replays only where the broker keeps history.
        let resuming = since.is_some() && chat.hub().broker().capabilities().replay;
        let read = chat.joined_state(&room, &self.conn.identity.user).await;
        let reply = protocol::joined(&room, resuming, cid, read);
        let options = JoinOptions::default().since(since).reply(reply);
        if let Err(e) = self.handle.join_with(room.clone(), options).await {
            self.broker_error(&e, cid, &room, "join");
            return;
        }
        chat.presence_changed([room.clone()]);
        self.handle.reply(chat.join_presence(&room));
    }

    /// Rooms the client joined (its personal and status channels do not count).
    fn client_rooms(&self) -> usize {
        self.handle
            .rooms()
            .iter()
            .filter(|r| access::is_client_room(r))
            .count()
    }

    async fn send(
        &self,
        room: Room,
        to: Option<Arc<str>>,
        body: Cow<'_, str>,
        key: Option<SendKey>,
        cid: Option<&ClientId>,
    ) {
        let direct = to.is_some();
        match self
            .svc
            .client_send(&self.conn.identity, room.clone(), to, body, key)
            .await
        {
            Ok(Published { receipt, duplicate }) => {
                let conversation = direct.then_some(&room);
                self.handle.reply(protocol::ack(
                    cid,
                    receipt.id,
                    receipt.cursor,
                    conversation,
                    duplicate,
                ));
            }
            Err(ApiError::Broker(e)) => self.broker_error(&e, cid, &room, "send"),
            Err(e) => {
                let message = match &e {
                    ApiError::Denied(d) => d.reason().to_owned(),
                    other => other.to_string(),
                };
                self.error(e.code(), &message, cid, Some(&room));
            }
        }
    }

    async fn history(
        &self,
        room: Room,
        before: Option<Cursor>,
        limit: Option<u64>,
        cid: Option<&ClientId>,
    ) {
        // A participant may read its direct conversations without joining them.
        if !self.access(&room, cid) {
            return;
        }
        let direct = room.as_str().starts_with(access::DIRECT_PREFIX);
        if !direct && !self.handle.is_member(&room) {
            self.not_joined(cid, &room);
            return;
        }
        if !self.hook(HookKind::History, &room, None, cid).await {
            return;
        }
        let cfg = self.svc.config();
        let max = cfg.max_history.max(1);
        let limit = limit.map_or(cfg.default_history, |l| {
            usize::try_from(l).unwrap_or(usize::MAX)
        });
        let limit = limit.clamp(1, max);
        let chat = self.svc.chat();
        let viewer = &self.conn.identity.user;
        if let Some((items, more)) = chat.state_history(&room, viewer, before, limit).await {
            let more = more.map(|c| c.to_string());
            self.handle
                .reply(protocol::history(&room, &items, more.as_deref(), cid));
            return;
        }
        match self.svc.chat().hub().history(&room, before, limit).await {
            Ok(page) => {
                let items: Vec<Bytes> = page.messages.iter().filter_map(history_item).collect();
                let more = page.more_before.map(|c| c.to_string());
                self.handle
                    .reply(protocol::history(&room, &items, more.as_deref(), cid));
            }
            Err(e) => self.broker_error(&e, cid, &room, "history"),
        }
    }

    /// A `watch`: subscribe to each user's status channel (so announcements reach this
    /// instance), probe the users not tracked yet, then answer each one's status.
    async fn watch(&self, users: Vec<Arc<str>>, cid: Option<&ClientId>) {
        let cfg = self.svc.config();
        let watching = self
            .handle
            .rooms()
            .iter()
            .filter(|r| access::is_status_channel(r))
            .count();
        let new = users
            .iter()
            .filter(|u| !self.handle.is_member(&status_channel(u)))
            .count();
        if watching + new > cfg.max_watch {
            let max = cfg.max_watch;
            self.error(
                ErrorCode::Forbidden,
                &format!("watch limit reached ({max} users per connection)"),
                cid,
                None,
            );
            return;
        }
        let chat = self.svc.chat();
        let status = chat.users();
        for u in &users {
            if let Err(e) = self.handle.join(status_channel(u)).await {
                let code = ErrorCode::for_error(&e);
                self.error(code, &format!("watch failed: {e}"), cid, None);
                return;
            }
            if status.watch(u) {
                status.probe(chat.hub(), u).await;
            }
        }
        for (user, online) in status.settle(&users).await {
            self.handle.reply(protocol::status(&user, online));
        }
    }

    fn not_joined(&self, cid: Option<&ClientId>, room: &Room) {
        self.error(ErrorCode::NotJoined, "join the room first", cid, Some(room));
    }

    fn broker_error(&self, e: &chatbus_core::Error, cid: Option<&ClientId>, room: &Room, op: &str) {
        let code = ErrorCode::for_error(e);
        if code == ErrorCode::Internal {
            tracing::warn!(session = self.handle.id(), %room, error = %e, "{op} failed");
        } else {
            tracing::debug!(session = self.handle.id(), %room, error = %e, "{op} failed");
        }
        // The client sees the broker's message (no secrets in there: the backend crates keep
        // credentials out of their errors) except for internal errors.
        let message = match code {
            ErrorCode::Internal => format!("{op} failed"),
            _ => e.to_string(),
        };
        self.error(code, &message, cid, Some(room));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_refills() {
        let mut b = TokenBucket::new(RateLimit {
            burst: 3,
            per_second: 2.0,
        });
        assert!(b.allow() && b.allow() && b.allow());
        assert!(!b.allow());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(b.allow());
        assert!(!b.allow());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!((0..10).filter(|_| b.allow()).count(), 3);
    }
}
