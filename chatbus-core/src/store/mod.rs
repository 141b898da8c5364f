//! Chat state: the [`Store`] trait, the events it applies and the state it answers with.
//!
//! The broker's log is the source of truth; a store is a projection of it, kept so that
//! questions the log answers badly are cheap: "the last 50 messages of this room as they are
//! now, with their edits, deletes and reactions", "how many messages has this user not read",
//! "this user's conversations, most recent first". Events arrive in log order (a room's events
//! in one order on every instance) and are applied idempotently, so a projector that replays
//! part of the log after a crash changes nothing.
//!
//! What an event means is decided here, at apply time, the same way by every store (the
//! suite in `conformance::store` holds each implementation to it):
//!
//! - a [`Message`](EventKind::Message) is added once (by its id) to the end of its room;
//! - an [`Edit`](EventKind::Edit) or [`Delete`](EventKind::Delete) counts only when it comes
//!   from the message's author: a server checks before publishing, and the check here makes a
//!   forbidden event that reached the log anyway a no-op on every store alike;
//! - a [`React`](EventKind::React) sets or clears one (user, message, emoji): idempotent;
//! - a [`Read`](EventKind::Read) moves the user's read position forward, never back.
//!
//! Implementations: [`MemoryStore`] here (no infrastructure, bounded per room), and
//! `PostgresStore` in `chatbus-postgres`.

mod log;
mod memory;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;

use crate::envelope::{Cursor, MessageId, Room};
use crate::{Error, Result};

pub use log::{Log, LogBatch};
pub use memory::{MemoryStore, MemoryStoreConfig};

/// One event of a room's log, as a store applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatEvent {
    /// The envelope's id: a message's id, and what makes applying an event twice a no-op.
    pub id: MessageId,
    /// The room (or direct conversation) it belongs to.
    pub room: Room,
    /// The user who sent it.
    pub from: Arc<str>,
    /// When it was sent, Unix milliseconds.
    pub ts: u64,
    /// Its position in the log.
    pub cursor: Cursor,
    /// What it is.
    pub kind: EventKind,
}

/// What a [`ChatEvent`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// A new message.
    Message {
        /// The sender's display name, where it differs from the user id.
        name: Option<Arc<str>>,
        /// The text.
        body: Arc<str>,
        /// The other participant, for a message of a direct conversation.
        to: Option<Arc<str>>,
    },
    /// The author replaces the text of `target`.
    Edit {
        /// The message edited.
        target: MessageId,
        /// The new text.
        body: Arc<str>,
    },
    /// The author deletes `target`: it stays as a tombstone, without its text.
    Delete {
        /// The message deleted.
        target: MessageId,
    },
    /// The sender adds (`on`) or removes its `emoji` reaction to `target`.
    React {
        /// The message reacted to.
        target: MessageId,
        /// The reaction.
        emoji: Arc<str>,
        /// Added or removed.
        on: bool,
    },
    /// The sender has read the room up to `cursor` (the cursor of a message or event of it).
    Read {
        /// How far.
        cursor: Cursor,
    },
}

/// A message as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its id.
    pub id: MessageId,
    /// Its room.
    pub room: Room,
    /// The author.
    pub from: Arc<str>,
    /// The author's display name, where it differs from the user id.
    pub name: Option<Arc<str>>,
    /// The other participant of a direct conversation.
    pub to: Option<Arc<str>>,
    /// The current text; `None` once deleted.
    pub body: Option<Arc<str>>,
    /// When it was sent, Unix milliseconds.
    pub ts: u64,
    /// Its position in the log.
    pub cursor: Cursor,
    /// When it was last edited, Unix milliseconds.
    pub edited: Option<u64>,
    /// Deleted (a tombstone).
    pub deleted: bool,
    /// Reactions, one entry per emoji with at least one user, in order of first use.
    pub reactions: Vec<Reaction>,
}

/// The users' reactions to a message with one emoji.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaction {
    /// The emoji.
    pub emoji: Arc<str>,
    /// How many users reacted with it.
    pub count: u64,
    /// Whether the user who asked is one of them.
    pub me: bool,
}

/// One page of a room's messages in their current state, from [`Store::page`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatePage {
    /// Oldest first.
    pub messages: Vec<StoredMessage>,
    /// Whether older messages exist before the first one.
    pub more: bool,
}

/// A user's read position in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadState {
    /// The furthest cursor the user has read, if any.
    pub cursor: Option<Cursor>,
    /// Messages of the room after it that others sent and that are not deleted.
    pub unread: u64,
}

/// A room or direct conversation of a user, from [`Store::conversations`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The room (for a direct conversation, its room).
    pub room: Room,
    /// The other participant, for a direct conversation.
    pub with: Option<Arc<str>>,
    /// The newest message, if the room has one.
    pub last: Option<StoredMessage>,
    /// Messages the user has not read.
    pub unread: u64,
    /// When the room was last active (its newest message, else when the user joined), Unix
    /// milliseconds: what the list is ordered by.
    pub ts: u64,
}

impl Conversation {
    /// The position of this entry in the list, to page on from it.
    pub fn key(&self) -> ConversationKey {
        ConversationKey {
            ts: self.ts,
            room: self.room.clone(),
        }
    }
}

/// A position in a user's conversation list, which is ordered by `ts` then `room`, newest
/// first. Its string form `<ts>:<room>` is what clients page with.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConversationKey {
    /// Last activity, Unix milliseconds.
    pub ts: u64,
    /// The room.
    pub room: Room,
}

impl fmt::Display for ConversationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ts, self.room)
    }
}

impl FromStr for ConversationKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidCursor(s.to_owned());
        let (ts, room) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            ts: ts.parse().map_err(|_| bad())?,
            room: Room::new(room).map_err(|_| bad())?,
        })
    }
}

/// One page of a user's conversations, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConversationPage {
    /// The conversations.
    pub items: Vec<Conversation>,
    /// Where the next page starts, when there is one.
    pub next: Option<ConversationKey>,
}

/// Held while this process is the one projector of a log partition (see [`Store::claim`]).
pub trait Claim: Send + Sync + fmt::Debug {
    /// Whether the claim still holds. A store whose claims live on a connection (PostgreSQL's
    /// session advisory locks) loses them with it; the projector then stops and claims again.
    fn is_held(&self) -> bool;
}

/// Indexed chat state, projected from the log.
///
/// Dyn-compatible, like [`Broker`](crate::Broker): a server picks its store at run time.
/// Errors: `Unavailable` or `Timeout` while the store cannot be reached; nothing is applied
/// then (a batch is atomic).
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and metrics (`"memory"`, `"postgres"`).
    fn name(&self) -> &'static str;

    /// Applies `events`, in order, and, in the same atomic step, records `position` as the
    /// last log position applied in its partition (for [`position`](Store::position)).
    ///
    /// Idempotent: an event already applied (same id) is skipped, so a projector may replay
    /// from an older position after a crash. The events of one room must come in log order.
    async fn apply(&self, events: &[ChatEvent], position: Option<Cursor>) -> Result<()>;

    /// The last log position recorded for `partition` by [`apply`](Store::apply): a projector
    /// resumes strictly after it.
    async fn position(&self, partition: u32) -> Result<Option<Cursor>>;

    /// A message in its current state (deleted ones too), `None` if the store has no such
    /// message in `room`. `viewer` decides [`Reaction::me`].
    async fn message(
        &self,
        room: &Room,
        id: MessageId,
        viewer: &str,
    ) -> Result<Option<StoredMessage>>;

    /// The newest `limit` messages of `room` strictly before the message whose cursor is
    /// `before` (or the newest of all), oldest first, in their current state.
    ///
    /// `Ok(None)` when `before` names no message the store has: the caller asks the log.
    async fn page(
        &self,
        room: &Room,
        viewer: &str,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<Option<StatePage>>;

    /// `user`'s read position and unread count in `room`.
    async fn read_state(&self, room: &Room, user: &str) -> Result<ReadState>;

    /// Records that `user` is a member of `room`, so it is in the user's conversation list
    /// from now on (sending, being sent a direct message and reading make one a member too).
    async fn join(&self, room: &Room, user: &str, ts: u64) -> Result<()>;

    /// Claims `partition` for this process's projector: `None` while another process holds
    /// it. Claims make one projector per partition do the work while the others stand by;
    /// correctness does not rest on them (two projectors applying the same events change
    /// nothing, `apply` being idempotent). Dropping the claim releases it.
    async fn claim(&self, partition: u32) -> Result<Option<Box<dyn Claim>>>;

    /// `user`'s conversations, newest activity first, starting strictly after `after`.
    async fn conversations(
        &self,
        user: &str,
        after: Option<&ConversationKey>,
        limit: usize,
    ) -> Result<ConversationPage>;
}
