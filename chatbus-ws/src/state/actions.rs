//! The state changes a client (or the server API) asks for: checked against the store, then
//! published as durable events of the room, so that every instance, the log and the store see
//! them in one order.

use std::time::Duration;

use chatbus_core::store::{Store, StoredMessage};
use chatbus_core::{Cursor, Envelope, MessageId, Receipt, Room};

use crate::api::ApiError;
use crate::auth::Identity;
use crate::chat::ChatHub;
use crate::payload;

/// How long a change waits for the store to know the message it targets (or the position it
/// reads up to). The store follows the log a little behind (a projector's poll and batch, or
/// the live feed's hop): a client that edits the message it was just acked for must not be
/// told `not_found` for that.
pub const PROJECTION_WAIT: Duration = Duration::from_secs(2);

const POLL: Duration = Duration::from_millis(20);

/// What a change does to its message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Change<'a> {
    Edit { body: &'a str },
    Delete,
    React { emoji: &'a str, on: bool },
}

fn store_error(e: chatbus_core::Error) -> ApiError {
    ApiError::Store(e)
}

/// The message `id` of `room` as the store has it, waiting up to [`PROJECTION_WAIT`] for it to
/// arrive.
async fn target(
    store: &dyn Store,
    room: &Room,
    id: MessageId,
    viewer: &str,
) -> Result<StoredMessage, ApiError> {
    let deadline = tokio::time::Instant::now() + PROJECTION_WAIT;
    loop {
        if let Some(m) = store.message(room, id, viewer).await.map_err(store_error)? {
            return Ok(m);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::NotFound(format!("no message {id} in {room}")));
        }
        tokio::time::sleep(POLL).await;
    }
}

impl ChatHub {
    /// Replaces the text of message `id` of `room` as its author `from`, like a client's
    /// `edit` (for bots and the server API). Members receive an `edit` frame.
    ///
    /// Errors: [`ApiError::NotFound`] (no such message, or deleted), [`ApiError::NotAuthor`],
    /// [`ApiError::Invalid`] (an empty body), the store's or the broker's.
    pub async fn edit(
        &self,
        room: Room,
        from: &Identity,
        id: MessageId,
        body: &str,
    ) -> Result<Receipt, ApiError> {
        if body.is_empty() {
            return Err(ApiError::Invalid("the body is empty".into()));
        }
        self.change(room, from, id, Change::Edit { body }).await
    }

    /// Deletes message `id` of `room` as its author `from`, like a client's `delete`.
    pub async fn delete(
        &self,
        room: Room,
        from: &Identity,
        id: MessageId,
    ) -> Result<Receipt, ApiError> {
        self.change(room, from, id, Change::Delete).await
    }

    /// Adds (`on`) or removes `from`'s `emoji` reaction to message `id` of `room`, like a
    /// client's `react`.
    pub async fn react(
        &self,
        room: Room,
        from: &Identity,
        id: MessageId,
        emoji: &str,
        on: bool,
    ) -> Result<Receipt, ApiError> {
        crate::protocol::validate_emoji(emoji).map_err(ApiError::Invalid)?;
        self.change(room, from, id, Change::React { emoji, on })
            .await
    }

    /// Applies `change` to the message `id` of `room` on behalf of `from`: checks that the
    /// message exists (and is not deleted) and, for an edit or a delete, that `from` wrote it;
    /// then publishes the event. Members of the room receive its frame (`edit`, `delete`,
    /// `reaction`); the store applies it from the log.
    pub(crate) async fn change(
        &self,
        room: Room,
        from: &Identity,
        id: MessageId,
        change: Change<'_>,
    ) -> Result<Receipt, ApiError> {
        self.ensure_started();
        let store = self.store();
        let m = target(&*store, &room, id, &from.user).await?;
        if m.deleted {
            return Err(ApiError::NotFound(format!("message {id} is deleted")));
        }
        let author_only = match change {
            Change::Edit { .. } => Some("edit"),
            Change::Delete => Some("delete"),
            Change::React { .. } => None,
        };
        if let Some(what) = author_only.filter(|_| m.from != from.user) {
            return Err(ApiError::NotAuthor(format!(
                "only the author may {what} a message"
            )));
        }
        let bytes = match change {
            Change::Edit { body } => payload::edit(id, body),
            Change::Delete => payload::delete(id),
            Change::React { emoji, on } => payload::react(id, emoji, on),
        };
        let env = Envelope::new(room, bytes).with_from(from.user.clone());
        self.hub().publish(&env).await.map_err(ApiError::Broker)
    }

    /// Moves `user`'s read position in `room` to `cursor`. `seen` is the last cursor of the
    /// room handed to the asking connection: a cursor at or before it is a position the user
    /// can have read, taken as it is. A cursor beyond it (a client that read elsewhere, or a
    /// made-up one) is clamped to the newest message the store knows, waiting up to
    /// [`PROJECTION_WAIT`] for the store to reach it, so a cursor from the future cannot mark
    /// messages read before they exist. `Ok(None)` when that is not further than the position
    /// already stored: nothing is published.
    pub(crate) async fn mark_read(
        &self,
        room: Room,
        user: &Identity,
        cursor: Cursor,
        seen: Option<Cursor>,
    ) -> Result<Option<Receipt>, ApiError> {
        self.ensure_started();
        let store = self.store();
        let cursor = if seen.is_some_and(|s| cursor.is_at_or_before(&s)) {
            cursor
        } else {
            clamp(&*store, &room, &user.user, cursor).await?
        };
        let state = store
            .read_state(&room, &user.user)
            .await
            .map_err(store_error)?;
        if state.cursor.is_some_and(|c| cursor.is_at_or_before(&c)) {
            return Ok(None);
        }
        let env = Envelope::new(room, payload::read(cursor)).with_from(user.user.clone());
        self.hub()
            .publish(&env)
            .await
            .map(Some)
            .map_err(ApiError::Broker)
    }
}

/// `cursor`, or the cursor of the newest message of `room` the store has when `cursor` is
/// beyond it (after waiting up to [`PROJECTION_WAIT`] for the store to get that far).
async fn clamp(
    store: &dyn Store,
    room: &Room,
    viewer: &str,
    cursor: Cursor,
) -> Result<Cursor, ApiError> {
    let deadline = tokio::time::Instant::now() + PROJECTION_WAIT;
    let newest = loop {
        let page = store
            .page(room, viewer, None, 1)
            .await
            .map_err(store_error)?;
        let newest = page.and_then(|p| p.messages.last().map(|m| m.cursor));
        match newest {
            Some(n) if cursor.is_at_or_before(&n) => break Some(n),
            _ if tokio::time::Instant::now() >= deadline => break newest,
            _ => tokio::time::sleep(POLL).await,
        }
    };
    let Some(newest) = newest else {
        return Err(ApiError::NotFound(format!("no messages in {room} yet")));
    };
    if !newest.same_log(&cursor) || newest.partition != cursor.partition {
        return Err(ApiError::Invalid(format!(
            "cursor {cursor} is not of {room}'s log"
        )));
    }
    Ok(if cursor.is_at_or_before(&newest) {
        cursor
    } else {
        newest
    })
}
