//! The frames of chat state: live events (`edit`, `delete`, `reaction`, `read`), messages in
//! their current state (`history` from a store) and the `conversations` reply.

use bytes::Bytes;
use chatbus_core::store::{Conversation, ConversationPage, StoredMessage};
use chatbus_core::{Cursor, Envelope, MessageId};
use serde::Serialize;

use crate::protocol::{AsDisplay, ClientId};

/// The most conversations one `conversations` reply lists.
pub(crate) const MAX_CONVERSATIONS: usize = 100;
/// Conversations listed when the request names no `limit`.
pub(crate) const DEFAULT_CONVERSATIONS: usize = 20;

pub(crate) fn to_bytes(v: &impl Serialize) -> Bytes {
    // Serialising these structs (strings, numbers, options) cannot fail.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

#[derive(Serialize)]
struct EventOut<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    room: &'a str,
    id: AsDisplay<MessageId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    emoji: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    on: Option<bool>,
    from: &'a str,
    /// `reaction` names the reacting user `user` (as the protocol has it), the others `from`.
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    ts: u64,
    cursor: Option<Cursor>,
}

/// The live frame of an `edit`, `delete` or `react` envelope: `id` is the message it targets;
/// `cursor` is the event's own position, for a client that resumes with `since`.
pub(crate) fn target_event(
    env: &Envelope,
    ty: &'static str,
    from: &str,
    target: MessageId,
    body: Option<&str>,
    reaction: Option<(&str, bool)>,
) -> Bytes {
    to_bytes(&EventOut {
        ty,
        room: env.room.as_str(),
        id: AsDisplay(target),
        body,
        emoji: reaction.map(|r| r.0),
        on: reaction.map(|r| r.1),
        from,
        user: reaction.map(|_| from),
        ts: env.ts,
        cursor: env.cursor,
    })
}

/// The live frame of a `read` envelope: `cursor` is how far `user` has read; `at` is the
/// event's own position.
pub(crate) fn read(env: &Envelope, user: &str, cursor: &str) -> Bytes {
    #[derive(Serialize)]
    struct Out<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        room: &'a str,
        user: &'a str,
        cursor: &'a str,
        ts: u64,
        at: Option<Cursor>,
    }
    to_bytes(&Out {
        ty: "read",
        room: env.room.as_str(),
        user,
        cursor,
        ts: env.ts,
        at: env.cursor,
    })
}

#[derive(Serialize)]
pub(crate) struct ReactionOut<'a> {
    emoji: &'a str,
    count: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    me: bool,
}

#[derive(Serialize)]
/// A `message` frame's fields: every message frame, live or in a `history` answer, is this
/// one struct (the state fields are absent on a live message, which has none yet).
pub(crate) struct MessageState<'a> {
    #[serde(rename = "type")]
    pub(crate) ty: &'static str,
    pub(crate) room: &'a str,
    pub(crate) id: AsDisplay<MessageId>,
    pub(crate) from: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) body: Option<&'a str>,
    pub(crate) ts: u64,
    pub(crate) cursor: Option<Cursor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) edited: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) deleted: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) reactions: Vec<ReactionOut<'a>>,
}

fn message_state(m: &StoredMessage) -> MessageState<'_> {
    MessageState {
        ty: "message",
        room: m.room.as_str(),
        id: AsDisplay(m.id),
        from: &m.from,
        to: m.to.as_deref(),
        name: m.name.as_deref(),
        body: m.body.as_deref(),
        ts: m.ts,
        cursor: Some(m.cursor),
        edited: m.edited,
        deleted: m.deleted,
        reactions: m
            .reactions
            .iter()
            .map(|r| ReactionOut {
                emoji: &r.emoji,
                count: r.count,
                me: r.me,
            })
            .collect(),
    }
}

/// A `message` frame of a message as it is now (a `history` item from the store): `edited`
/// (when), `deleted` (a tombstone, without `body`) and `reactions` where they apply.
pub(crate) fn stored_message(m: &StoredMessage) -> Bytes {
    to_bytes(&message_state(m))
}

/// The answer to a `read` that moves nothing (the position stored is as far or further):
/// `{"type":"ack","room":R,"duplicate":true}`, nothing published.
pub(crate) fn read_unchanged(client_id: Option<&ClientId>, room: &chatbus_core::Room) -> Bytes {
    #[derive(Serialize)]
    struct Out<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a ClientId>,
        room: &'a str,
        duplicate: bool,
    }
    to_bytes(&Out {
        ty: "ack",
        client_id,
        room: room.as_str(),
        duplicate: true,
    })
}

/// `{"type":"conversations","conversations":[...],"next":K|null}`, newest first.
pub(crate) fn conversations(page: &ConversationPage, client_id: Option<&ClientId>) -> Bytes {
    #[derive(Serialize)]
    struct Item<'a> {
        room: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        with: Option<&'a str>,
        ts: u64,
        unread: u64,
        last: Option<MessageState<'a>>,
    }
    #[derive(Serialize)]
    struct Out<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a ClientId>,
        conversations: Vec<Item<'a>>,
        next: Option<String>,
    }
    fn item(c: &Conversation) -> Item<'_> {
        Item {
            room: c.room.as_str(),
            with: c.with.as_deref(),
            ts: c.ts,
            unread: c.unread,
            last: c.last.as_ref().map(message_state),
        }
    }
    to_bytes(&Out {
        ty: "conversations",
        client_id,
        conversations: page.items.iter().map(item).collect(),
        next: page.next.as_ref().map(ToString::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatbus_core::Room;

    #[test]
    fn a_tombstone_has_no_body_and_no_reactions() {
        let m = StoredMessage {
            id: MessageId::from_u128(1),
            room: Room::new("r").unwrap(),
            from: "a".into(),
            name: None,
            to: None,
            body: None,
            ts: 5,
            cursor: Cursor::new(0, 3),
            edited: None,
            deleted: true,
            reactions: Vec::new(),
        };
        let f = stored_message(&m);
        let v: serde_json::Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v["deleted"], true);
        assert!(v.get("body").is_none());
        assert!(v.get("reactions").is_none());
        assert_eq!(v["cursor"], "0-3");
    }
}
