//! The mapping between Socket.IO events and protocol v1: client events in, v1 frames out as
//! Socket.IO events.
//!
//! Outbound, there is one rule for every frame: the event is the frame's `type` and its data
//! is the frame without `type`; a `message` (live, replayed, or inside a `history` answer)
//! also renames `body` to `message`, the field the seed's clients read. Answers to requests
//! (acks) are built with the same v1 builders as the native endpoint and go through the same
//! rule, so the two endpoints cannot drift apart field by field.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use chatbus_core::store::ConversationKey;
use chatbus_core::{Cursor, MessageId, Room};
use serde_json::{Map, Value};

use crate::auth::validate_user;
use crate::idempotency::SendKey;
use crate::protocol::{validate_emoji, ErrorCode, TargetAction, MAX_KEY_LEN};

/// A client event the endpoint acts on, validated.
#[derive(Debug, PartialEq)]
pub(super) enum Event {
    /// `event:message`, `send`: publish `body` to `room` (`None`: the default room).
    Send {
        room: Option<Room>,
        body: String,
        key: Option<SendKey>,
    },
    /// `send` with `to`: a direct message to that user.
    Direct {
        to: Arc<str>,
        body: String,
        key: Option<SendKey>,
    },
    Join {
        room: Room,
        since: Option<Cursor>,
    },
    Leave {
        room: Room,
    },
    Typing {
        room: Room,
    },
    History {
        room: Room,
        before: Option<Cursor>,
        limit: Option<u64>,
    },
    /// A new token for the same user, before the current one expires.
    Refresh {
        token: String,
    },
    /// `edit`, `delete`, `react` of the message `id` of `room`.
    Change {
        room: Room,
        id: MessageId,
        action: TargetAction<'static>,
    },
    Read {
        room: Room,
        cursor: Cursor,
    },
    Conversations {
        before: Option<ConversationKey>,
        limit: Option<u64>,
    },
    Members {
        room: Room,
        after: Option<Arc<str>>,
        limit: Option<u64>,
    },
}

/// A refused event: the code and the message the client gets.
#[derive(Debug, PartialEq)]
pub(super) struct Bad {
    pub(super) code: ErrorCode,
    pub(super) message: String,
}

fn bad(message: impl Into<String>) -> Bad {
    Bad {
        code: ErrorCode::BadRequest,
        message: message.into(),
    }
}

/// The event name the seed's clients emit their messages with.
pub(super) const SEED_EVENT: &str = "event:message";

/// Parses client event `name` with its first argument `data`.
///
/// Where an event takes only a room (`join`, `leave`, `typing`) a bare string is the room, as
/// a bare string is the message for `event:message`: the seed's clients send strings.
pub(super) fn parse(name: &str, data: Value) -> Result<Event, Bad> {
    match name {
        SEED_EVENT => match data {
            Value::String(body) => Ok(Event::Send {
                room: None,
                body: nonempty(body)?,
                key: None,
            }),
            Value::Object(mut o) => {
                let body = match o.remove("message") {
                    Some(Value::String(s)) => nonempty(s)?,
                    _ => return Err(bad("`event:message` takes a string or `{message: string}`")),
                };
                Ok(Event::Send {
                    room: None,
                    body,
                    key: key(&mut o)?,
                })
            }
            _ => Err(bad("`event:message` takes a string or `{message: string}`")),
        },
        "send" => {
            let mut o = object(data, "send")?;
            let body = match o.remove("body") {
                Some(Value::String(s)) => nonempty(s)?,
                _ => return Err(bad("`send` needs `body`, a string")),
            };
            match o.remove("to") {
                None | Some(Value::Null) => Ok(Event::Send {
                    room: Some(room(o.remove("room"))?),
                    body,
                    key: key(&mut o)?,
                }),
                Some(_) if o.get("room").is_some_and(|r| !r.is_null()) => {
                    Err(bad("`send` takes `room` or `to`, not both"))
                }
                Some(Value::String(to)) => {
                    validate_user(&to).map_err(|e| bad(format!("`to`: {e}")))?;
                    Ok(Event::Direct {
                        to: Arc::from(to),
                        body,
                        key: key(&mut o)?,
                    })
                }
                Some(_) => Err(bad("`to` must be a user id, a string")),
            }
        }
        "join" => {
            let (room, mut o) = room_arg(data, "join")?;
            Ok(Event::Join {
                room,
                since: cursor(o.remove("since"), "since")?,
            })
        }
        "leave" => Ok(Event::Leave {
            room: room_arg(data, "leave")?.0,
        }),
        "typing" => Ok(Event::Typing {
            room: room_arg(data, "typing")?.0,
        }),
        "history" => {
            let (room, mut o) = room_arg(data, "history")?;
            Ok(Event::History {
                room,
                before: cursor(o.remove("before"), "before")?,
                limit: limit(o.remove("limit"))?,
            })
        }
        "members" => {
            let (room, mut o) = room_arg(data, "members")?;
            let after = match o.remove("after") {
                None | Some(Value::Null) => None,
                Some(Value::String(a)) => {
                    validate_user(&a).map_err(|e| bad(format!("`after`: {e}")))?;
                    Some(Arc::from(a))
                }
                Some(_) => return Err(bad("`after` must be a string")),
            };
            Ok(Event::Members {
                room,
                after,
                limit: limit(o.remove("limit"))?,
            })
        }
        "edit" | "delete" | "react" => {
            let mut o = object(data, name)?;
            let room = room(o.remove("room"))?;
            let id = match o.remove("id") {
                Some(Value::String(s)) => s
                    .parse::<MessageId>()
                    .map_err(|_| bad("`id` is not a message id"))?,
                _ => return Err(bad(format!("`{name}` needs `id`, a message id"))),
            };
            let action = match name {
                "edit" => match o.remove("body") {
                    Some(Value::String(s)) => TargetAction::Edit {
                        body: Cow::Owned(nonempty(s)?),
                    },
                    _ => return Err(bad("`edit` needs `body`, a string")),
                },
                "delete" => TargetAction::Delete,
                _ => {
                    let Some(Value::String(emoji)) = o.remove("emoji") else {
                        return Err(bad("`react` needs `emoji`, a string"));
                    };
                    validate_emoji(&emoji).map_err(bad)?;
                    let Some(Value::Bool(on)) = o.remove("on") else {
                        return Err(bad("`react` needs `on`, a boolean"));
                    };
                    TargetAction::React {
                        emoji: Cow::Owned(emoji),
                        on,
                    }
                }
            };
            Ok(Event::Change { room, id, action })
        }
        "read" => {
            let mut o = object(data, "read")?;
            let room = room(o.remove("room"))?;
            let cursor = cursor(o.remove("cursor"), "cursor")?
                .ok_or_else(|| bad("`read` needs `cursor`"))?;
            Ok(Event::Read { room, cursor })
        }
        "conversations" => {
            let mut o = match data {
                Value::Null => Map::new(),
                other => object(other, "conversations")?,
            };
            let before = match o.remove("before") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => {
                    Some(s.parse().map_err(|_| bad("`before` is not a page key"))?)
                }
                Some(_) => return Err(bad("`before` must be a string")),
            };
            Ok(Event::Conversations {
                before,
                limit: limit(o.remove("limit"))?,
            })
        }
        "refresh" => match data {
            Value::String(token) if !token.is_empty() => Ok(Event::Refresh { token }),
            Value::Object(mut o) => match o.remove("token") {
                Some(Value::String(token)) if !token.is_empty() => Ok(Event::Refresh { token }),
                _ => Err(bad("`refresh` needs `token`, a non-empty string")),
            },
            _ => Err(bad("`refresh` takes a token or `{token}`")),
        },
        other => Err(bad(format!(
            "unknown event `{}`; see docs/protocol.md, \"Socket.IO endpoint\"",
            other.chars().take(64).collect::<String>()
        ))),
    }
}

fn limit(v: Option<Value>) -> Result<Option<u64>, Bad> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad("`limit` must be a positive integer")),
        Some(_) => Err(bad("`limit` must be a positive integer")),
    }
}

fn nonempty(body: String) -> Result<String, Bad> {
    if body.is_empty() {
        return Err(bad("the message is empty"));
    }
    Ok(body)
}

fn object(data: Value, event: &str) -> Result<Map<String, Value>, Bad> {
    match data {
        Value::Object(o) => Ok(o),
        _ => Err(bad(format!("`{event}` takes an object"))),
    }
}

/// A room given as a bare string or as `{room, ...}` (then the rest of the object too).
fn room_arg(data: Value, event: &str) -> Result<(Room, Map<String, Value>), Bad> {
    match data {
        Value::String(s) => Ok((room(Some(Value::String(s)))?, Map::new())),
        Value::Object(mut o) => Ok((room(o.remove("room"))?, o)),
        _ => Err(bad(format!("`{event}` takes a room name or `{{room}}`"))),
    }
}

fn room(v: Option<Value>) -> Result<Room, Bad> {
    match v {
        Some(Value::String(s)) => Room::new(s).map_err(|e| bad(format!("`room`: {e}"))),
        _ => Err(bad("`room` is required, a string")),
    }
}

fn cursor(v: Option<Value>, field: &str) -> Result<Option<Cursor>, Bad> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| bad(format!("`{field}` is not a cursor"))),
        Some(_) => Err(bad(format!("`{field}` must be a cursor string"))),
    }
}

/// The optional idempotency key (`key`, `retry`), checked like a native `send`'s.
fn key(o: &mut Map<String, Value>) -> Result<Option<SendKey>, Bad> {
    let retry = match o.remove("retry") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(bad("`retry` must be a boolean")),
    };
    match o.remove("key") {
        None | Some(Value::Null) if retry => Err(bad("`retry` needs `key`")),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(k)) if k.is_empty() || k.len() > MAX_KEY_LEN => {
            Err(bad(format!("`key` must be 1 to {MAX_KEY_LEN} bytes")))
        }
        Some(Value::String(k)) => Ok(Some(SendKey {
            key: Arc::from(k),
            retry,
        })),
        Some(_) => Err(bad("`key` must be a string")),
    }
}

/// A protocol v1 frame as a Socket.IO event: `(type, the frame without type)`, with a
/// message's `body` as `message`. `None` for bytes that are not a v1 frame (never built by
/// this crate; dropped rather than sent half-translated).
pub(super) fn outbound(frame: &[u8]) -> Option<(String, Value)> {
    let Ok(Value::Object(mut o)) = serde_json::from_slice::<Value>(frame) else {
        return None;
    };
    let Some(Value::String(ty)) = o.remove("type") else {
        return None;
    };
    match ty.as_str() {
        "message" | "edit" => rename_body(&mut o),
        "conversations" => {
            if let Some(Value::Array(items)) = o.get_mut("conversations") {
                for item in items {
                    if let Some(Value::Object(m)) = item.get_mut("last") {
                        m.remove("type");
                        rename_body(m);
                    }
                }
            }
        }
        "history" => {
            if let Some(Value::Array(items)) = o.get_mut("messages") {
                for item in items {
                    if let Value::Object(m) = item {
                        m.remove("type");
                        rename_body(m);
                    }
                }
            }
        }
        _ => {}
    }
    Some((ty, Value::Object(o)))
}

/// The data of a v1 answer frame (an ack, `joined`, an `error`): [`outbound`] without the
/// event name. An error answer is recognised by its `code` field.
pub(super) fn answer(frame: &[u8]) -> Value {
    outbound(frame).map_or(Value::Null, |(_, data)| data)
}

fn rename_body(o: &mut Map<String, Value>) {
    if let Some(body) = o.remove("body") {
        o.insert("message".to_owned(), body);
    }
}

/// Frames last translated into Socket.IO events, shared by the instance's sessions.
///
/// The hub encodes a message once and gives every recipient the same bytes; without this,
/// each of a room's sockets would parse and rebuild the same event. An entry holds its frame,
/// so the allocation it is recognised by (pointer and length) cannot be freed and reused
/// for another frame while the entry exists.
#[derive(Debug, Default)]
pub(super) struct Translations {
    recent: Mutex<VecDeque<(Bytes, Translated)>>,
}

/// A frame as a Socket.IO event: its name and argument.
type Translated = Arc<(String, Value)>;

/// Frames remembered: the messages in flight at once in a busy instance's rooms; a miss only
/// costs the translation.
const TRANSLATIONS: usize = 64;

impl Translations {
    pub(super) fn get(&self, frame: &Bytes) -> Option<Translated> {
        let same = |b: &Bytes| b.as_ptr() == frame.as_ptr() && b.len() == frame.len();
        {
            let recent = crate::chat::lock(&self.recent);
            if let Some((_, t)) = recent.iter().find(|(b, _)| same(b)) {
                return Some(t.clone());
            }
        }
        // Translated outside the lock; two sessions may both do it once, which is harmless.
        let translated = Arc::new(outbound(frame)?);
        let mut recent = crate::chat::lock(&self.recent);
        if recent.len() >= TRANSLATIONS {
            recent.pop_front();
        }
        recent.push_back((frame.clone(), translated.clone()));
        Some(translated)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn room_of(s: &str) -> Room {
        Room::new(s).expect("valid room")
    }

    #[test]
    fn seed_events_are_sends_to_the_default_room() {
        assert_eq!(
            parse(SEED_EVENT, json!("hi")),
            Ok(Event::Send {
                room: None,
                body: "hi".into(),
                key: None
            })
        );
        assert_eq!(
            parse(SEED_EVENT, json!({"message": "hi", "key": "k1"})),
            Ok(Event::Send {
                room: None,
                body: "hi".into(),
                key: Some(SendKey {
                    key: Arc::from("k1"),
                    retry: false
                })
            })
        );
        for refused in [json!(""), json!(3), json!({"msg": "x"}), json!(null)] {
            let err = parse(SEED_EVENT, refused.clone()).expect_err("refused");
            assert_eq!(err.code, ErrorCode::BadRequest, "{refused}");
        }
    }

    #[test]
    fn room_events_take_a_string_or_an_object() {
        assert_eq!(
            parse("join", json!("lobby")),
            Ok(Event::Join {
                room: room_of("lobby"),
                since: None
            })
        );
        let since: Cursor = "0-41".parse().expect("cursor");
        assert_eq!(
            parse("join", json!({"room": "lobby", "since": "0-41"})),
            Ok(Event::Join {
                room: room_of("lobby"),
                since: Some(since)
            })
        );
        assert_eq!(
            parse("leave", json!({"room": "lobby"})),
            Ok(Event::Leave {
                room: room_of("lobby")
            })
        );
        assert!(parse("join", json!({"room": "a b"})).is_err());
        assert!(parse("join", json!({"room": "x", "since": "nope"})).is_err());
        assert!(parse("history", json!({"room": "x", "limit": -1})).is_err());
        assert!(parse("send", json!({"room": "x"})).is_err());
        assert_eq!(
            parse("send", json!({"to": "bob", "body": "psst"})),
            Ok(Event::Direct {
                to: Arc::from("bob"),
                body: "psst".into(),
                key: None
            })
        );
        assert!(parse("send", json!({"to": "bob", "room": "x", "body": "b"})).is_err());
        assert!(parse("send", json!({"to": "", "body": "b"})).is_err());
        assert!(parse("send", json!({"room": "x", "body": "b", "retry": true})).is_err());
        assert!(parse(
            "send",
            json!({"room": "x", "body": "b", "key": "k".repeat(65)})
        )
        .is_err());
        assert_eq!(
            parse("refresh", json!({"token": "t"})),
            Ok(Event::Refresh { token: "t".into() })
        );
        assert!(parse("refresh", json!({"token": ""})).is_err());
        let unknown = parse("subscribe", json!({})).expect_err("unknown");
        assert!(unknown.message.contains("unknown event `subscribe`"));
    }

    #[test]
    fn frames_become_events_with_message_for_body() {
        let frame = br#"{"type":"message","room":"lobby","id":"x","from":"ann","body":"hi","ts":5,"cursor":"0-1"}"#;
        let (event, data) = outbound(frame).expect("a frame");
        assert_eq!(event, "message");
        assert_eq!(
            data,
            json!({"room":"lobby","id":"x","from":"ann","message":"hi","ts":5,"cursor":"0-1"})
        );
        let history =
            br#"{"type":"history","room":"r","messages":[{"type":"message","body":"a"}]}"#;
        assert_eq!(
            outbound(history).map(|(_, d)| d),
            Some(json!({"room":"r","messages":[{"message":"a"}]}))
        );
        assert_eq!(
            answer(br#"{"type":"error","code":"not_joined","message":"join first"}"#),
            json!({"code":"not_joined","message":"join first"})
        );
        assert_eq!(outbound(b"not json"), None);
        assert_eq!(outbound(br#"{"no":"type"}"#), None);
    }

    fn frame(body: &str) -> Bytes {
        Bytes::from(format!(
            r#"{{"type":"message","room":"r","id":"i","from":"u","body":"{body}","ts":1,"cursor":null}}"#
        ))
    }

    #[test]
    fn a_shared_frame_is_translated_once_and_never_confused() {
        let t = Translations::default();
        let a = frame("one");
        let first = t.get(&a).expect("a frame");
        // Another recipient's clone of the same frame: the same translation.
        let again = t.get(&a.clone()).expect("a frame");
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(first.0, "message");
        assert_eq!(first.1["message"], "one");
        // Equal bytes elsewhere, and a prefix of the same allocation, are other frames.
        let b = frame("two");
        assert_eq!(t.get(&b).expect("a frame").1["message"], "two");
        let prefix = a.slice(0..a.len() - 1);
        assert!(t.get(&prefix).is_none(), "a truncated frame is not JSON");
        // Past the bound the oldest go; what is translated stays right.
        for i in 0..2 * TRANSLATIONS {
            let f = frame(&format!("m{i}"));
            assert_eq!(t.get(&f).expect("a frame").1["message"], format!("m{i}"));
        }
        assert_eq!(crate::chat::lock(&t.recent).len(), TRANSLATIONS);
        assert_eq!(t.get(&a).expect("a frame").1["message"], "one");
    }
}
