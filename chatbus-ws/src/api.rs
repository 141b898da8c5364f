//! The server-side API ([`WsService::publish`], [`send_to_user`](WsService::send_to_user),
//! [`disconnect_user`](WsService::disconnect_user), [`online`](WsService::online)) and the one
//! publish path every chat message takes, from a client or from the server: the
//! [`Hooks::on_publish`](crate::Hooks::on_publish) hook, then the broker.
//!
//! A direct message is published once, durably, in its conversation's room (so history and
//! resume work for both participants), then copied as an ephemeral envelope into the personal
//! channel of each participant, carrying the original's id and cursor (each copy an envelope
//! with an id of its own, as brokers deduplicate by envelope id): every connection of both
//! users, on any instance, gets it live without joining anything. A connection that did join
//! the conversation skips the copy and gets the message from the room. A copy lost on the way
//! (its broker down) is a live notification missed, never a message lost: the conversation
//! has it.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use chatbus_core::{Envelope, Receipt, Room};

use crate::access::{direct_room, user_channel};
use crate::auth::{validate_user, Identity};
use crate::hooks::{self, Denied, HookKind, Publish};
use crate::idempotency::{self, Claim, Guard, SendKey};
use crate::metrics::WsCounters;
use crate::payload::{self, Direct};
use crate::protocol::ErrorCode;
use crate::service::WsService;

/// Why a message of the server API (or of a client) was not published, or a user not
/// disconnected.
#[derive(Debug)]
#[non_exhaustive]
pub enum ApiError {
    /// The [`on_publish`](crate::Hooks::on_publish) hook refused it (or failed).
    Denied(Denied),
    /// An argument is invalid: a user id, an empty body.
    Invalid(String),
    /// The body is longer than [`WsConfig::max_frame_size`](crate::WsConfig::max_frame_size),
    /// the bound a client's message has too.
    TooLarge {
        /// The bound, in bytes.
        limit: usize,
    },
    /// The broker did not take it.
    Broker(chatbus_core::Error),
    /// The message an edit, delete or reaction names is not in the room (or is deleted).
    NotFound(String),
    /// An edit or delete of a message by someone other than its author.
    NotAuthor(String),
    /// The chat state store could not answer.
    Store(chatbus_core::Error),
}

impl ApiError {
    /// The protocol error code for it (what a client is answered, what an HTTP API maps to a
    /// status).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Denied(_) => ErrorCode::Forbidden,
            Self::Invalid(_) => ErrorCode::BadRequest,
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::Broker(e) | Self::Store(e) => ErrorCode::for_error(e),
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::NotAuthor(_) => ErrorCode::Forbidden,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The hook's reason as is: it is written for the client.
            Self::Denied(d) => write!(f, "{d}"),
            Self::Invalid(m) => f.write_str(m),
            Self::TooLarge { limit } => write!(f, "`body` longer than {limit} bytes"),
            Self::Broker(e) => write!(f, "broker: {e}"),
            Self::NotFound(m) | Self::NotAuthor(m) => f.write_str(m),
            Self::Store(e) => write!(f, "store: {e}"),
        }
    }
}

impl std::error::Error for ApiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Broker(e) | Self::Store(e) => Some(e),
            Self::Denied(d) => Some(d),
            Self::Invalid(_) | Self::TooLarge { .. } | Self::NotFound(_) | Self::NotAuthor(_) => {
                None
            }
        }
    }
}

/// A chat message on its way to the broker (see [`WsService::publish_message`]).
pub(crate) struct Outgoing<'a> {
    pub(crate) room: Room,
    pub(crate) from: Arc<str>,
    pub(crate) to: Option<Arc<str>>,
    pub(crate) body: Cow<'a, str>,
    pub(crate) by_server: bool,
    /// The client's idempotency key, if it gave one (`idempotency.rs`).
    pub(crate) key: Option<SendKey>,
}

/// What [`WsService::publish_message`] did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Published {
    pub(crate) receipt: Receipt,
    /// The key was sent before: nothing was published, `receipt` is the original's.
    pub(crate) duplicate: bool,
}

fn user(id: &str, what: &str) -> Result<Arc<str>, ApiError> {
    validate_user(id)
        .map(|()| Arc::from(id))
        .map_err(|e| ApiError::Invalid(format!("`{what}`: {e}")))
}

fn body(body: &str, limit: usize) -> Result<(), ApiError> {
    if body.is_empty() {
        return Err(ApiError::Invalid("`body` is empty".into()));
    }
    if body.len() > limit {
        return Err(ApiError::TooLarge { limit });
    }
    Ok(())
}

impl WsService {
    /// Publishes a chat message to `room` as user `from` (for bots, announcements, backend
    /// events): the [`on_publish`](crate::Hooks::on_publish) hook runs as for a client's send,
    /// then the room's members on every instance get a `message` frame.
    pub async fn publish(&self, room: Room, from: &str, text: &str) -> Result<Receipt, ApiError> {
        body(text, self.config().max_frame_size)?;
        let out = Outgoing {
            room,
            from: user(from, "from")?,
            to: None,
            body: Cow::Borrowed(text),
            by_server: true,
            key: None,
        };
        Ok(self.publish_message(out, None).await?.receipt)
    }

    /// Sends a direct message from user `from` to user `to`; returns the conversation's room
    /// and the receipt. Every connection of both users, on every instance, gets it.
    pub async fn send_to_user(
        &self,
        from: &str,
        to: &str,
        text: &str,
    ) -> Result<(Room, Receipt), ApiError> {
        body(text, self.config().max_frame_size)?;
        let (from, to) = (user(from, "from")?, user(to, "to")?);
        let room = direct_room(&from, &to);
        let out = Outgoing {
            room: room.clone(),
            from,
            to: Some(to),
            body: Cow::Borrowed(text),
            by_server: true,
            key: None,
        };
        let receipt = self.publish_message(out, None).await?.receipt;
        Ok((room, receipt))
    }

    /// Closes every connection of `user`, on every instance, with close code 4009
    /// ([`CloseCode::Disconnected`](crate::CloseCode::Disconnected)). Returns how many were
    /// open on this instance (the others close as the broker brings them the order).
    ///
    /// Without a working broker only this instance's connections close (and the error says
    /// so).
    pub async fn disconnect_user(&self, user_id: &str) -> Result<usize, ApiError> {
        let user_id = user(user_id, "user")?;
        let here = self.chat().users().kick(&user_id);
        let env = Envelope::ephemeral(user_channel(&user_id), payload::kick(&user_id));
        self.chat()
            .hub()
            .publish(&env)
            .await
            .map_err(ApiError::Broker)?;
        Ok(here)
    }

    /// The users online in `room` on every instance, sorted (see
    /// [`ChatHub::online_everywhere`](crate::ChatHub::online_everywhere): immediate where this
    /// instance has members in the room, else up to
    /// [`PRESENCE_QUERY_WAIT`](crate::PRESENCE_QUERY_WAIT) to hear the others).
    pub async fn online(&self, room: &Room) -> Result<Vec<Arc<str>>, ApiError> {
        self.chat()
            .online_everywhere(room)
            .await
            .map_err(ApiError::Broker)
    }

    /// The path of every chat message: a send with a key already published is answered with
    /// the original; else the publish hook, then the broker (for a direct message, the
    /// conversation's room and then the two personal copies). `name` is the sender's display
    /// name, if any.
    pub(crate) async fn publish_message(
        &self,
        out: Outgoing<'_>,
        name: Option<&str>,
    ) -> Result<Published, ApiError> {
        let Some(key) = out.key.clone() else {
            return self.publish_new(out, name, None).await;
        };
        let keys = self.chat().send_keys();
        let guard = match keys.claim(&out.room, &out.from, &key.key).await {
            Claim::Known(receipt) => return Ok(self.duplicate(receipt, "window")),
            Claim::Fresh(guard) => guard,
        };
        if key.retry {
            let broker = self.chat().hub().broker().clone();
            let found =
                idempotency::search_log(&*broker, &out.room, &out.from, &key.key, keys.window())
                    .await;
            WsCounters::inc(&self.counters().send_key_searches);
            match found {
                Ok(Some(receipt)) => {
                    guard.complete(receipt);
                    return Ok(self.duplicate(receipt, "log"));
                }
                Ok(None) => {}
                // Not knowing whether the original is stored, publishing could make a second
                // copy: the client retries later instead.
                Err(e) => return Err(ApiError::Broker(e)),
            }
        }
        self.publish_new(out, name, Some(guard)).await
    }

    /// A client's `send` (from `/ws` or Socket.IO), checked already: published through the one
    /// path and counted when it is new.
    pub(crate) async fn client_send(
        &self,
        identity: &Identity,
        room: Room,
        to: Option<Arc<str>>,
        body: Cow<'_, str>,
        key: Option<SendKey>,
    ) -> Result<Published, ApiError> {
        let out = Outgoing {
            room,
            from: identity.user.clone(),
            to,
            body,
            by_server: false,
            key,
        };
        let published = self
            .publish_message(out, identity.display_name_if_different())
            .await?;
        if !published.duplicate {
            WsCounters::inc(&self.counters().messages_in);
        }
        Ok(published)
    }

    fn duplicate(&self, receipt: Receipt, found_in: &str) -> Published {
        WsCounters::inc(&self.counters().send_key_duplicates);
        tracing::debug!(id = %receipt.id, found_in, "send with a known key answered with its original");
        Published {
            receipt,
            duplicate: true,
        }
    }

    async fn publish_new(
        &self,
        out: Outgoing<'_>,
        name: Option<&str>,
        guard: Option<Guard>,
    ) -> Result<Published, ApiError> {
        let cfg = self.config();
        let Outgoing {
            room,
            from,
            to,
            body: text,
            by_server,
            key,
        } = out;
        // The key goes into the payload, so every instance and every reader of the log can
        // recognise a retry of it.
        let wrap = |inner: Bytes| match &key {
            Some(k) => payload::keyed(&k.key, &inner),
            None => inner,
        };
        let text = match &cfg.hooks {
            // No hooks: the body is published from the client's frame as it was parsed.
            None => text,
            Some(h) => {
                let mut publish = Publish {
                    room: room.clone(),
                    from: from.clone(),
                    to: to.clone(),
                    body: text.into_owned(),
                    by_server,
                };
                hooks::call(
                    &self.counters().hooks,
                    HookKind::Publish,
                    cfg.hook_timeout,
                    h.on_publish(&mut publish),
                )
                .await
                .map_err(ApiError::Denied)?;
                // Only the body is the hook's to change: where a message goes and who sent it
                // were checked before the hook ran.
                if publish.body.is_empty() {
                    return Err(ApiError::Invalid("`body` is empty after the hook".into()));
                }
                Cow::Owned(publish.body)
            }
        };
        let hub = self.chat().hub();
        let published = |receipt: Receipt| {
            if let Some(g) = guard {
                g.complete(receipt);
            }
            Published {
                receipt,
                duplicate: false,
            }
        };
        let Some(to) = to else {
            let env = Envelope::new(room, wrap(payload::message(name, &text))).with_from(from);
            let receipt = hub.publish(&env).await.map_err(ApiError::Broker)?;
            return Ok(published(receipt));
        };
        let mut direct = Direct {
            name,
            to: &to,
            conv: None,
            cursor: None,
            id: None,
            body: &text,
        };
        let env =
            Envelope::new(room.clone(), wrap(payload::direct(&direct))).with_from(from.clone());
        let receipt = hub.publish(&env).await.map_err(ApiError::Broker)?;
        let done = published(receipt);
        let ts = env.ts;
        let cursor = receipt.cursor.map(|c| c.to_string());
        direct.conv = Some(room.as_str());
        direct.cursor = cursor.as_deref();
        direct.id = Some(receipt.id.as_u128());
        let copy = wrap(payload::direct(&direct));
        let targets: &[&Arc<str>] = if to == from { &[&to] } else { &[&to, &from] };
        for target in targets {
            let mut env =
                Envelope::ephemeral(user_channel(target), copy.clone()).with_from(from.clone());
            // The copy's frame shows the original's id (in the payload) and time; the envelope
            // keeps an id of its own, since brokers drop a second envelope with the same id.
            env.ts = ts;
            if let Err(e) = hub.publish(&env).await {
                tracing::warn!(room = %room, error = %e, "direct message copy not published; the conversation has it");
            }
        }
        Ok(done)
    }
}
