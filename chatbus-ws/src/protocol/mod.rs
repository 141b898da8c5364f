//! Protocol v1: the JSON frames clients send and receive, and the error codes.
//!
//! The full reference, with every field, is `docs/protocol.md` in the repository. This module
//! parses client frames into [`Request`]s (validating rooms, cursors and fields once, here);
//! `frames.rs` builds the server's frames.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use chatbus_core::store::ConversationKey;
use chatbus_core::{Cursor, MessageId, Room};
use serde::{Deserialize, Serialize};

use crate::idempotency::SendKey;

mod frames;
pub(crate) use frames::*;

/// The protocol version announced in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest `client_id` string accepted, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// The longest idempotency `key` of a `send` accepted, in bytes.
pub const MAX_KEY_LEN: usize = 64;

/// The `code` of an `error` frame (and of refused handshakes).
///
/// Every error is counted per code in [`WsMetrics`](crate::WsMetrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame is not valid protocol v1: malformed JSON, unknown `type`, a missing or
    /// mistyped field, an invalid room name or cursor, a binary frame, invalid UTF-8.
    BadRequest,
    /// The frame is larger than the configured maximum.
    TooLarge,
    /// The connection sent more frames than its rate limit allows; the frame was dropped.
    RateLimited,
    /// The handshake carried no valid token (HTTP 401), or a `refresh` frame's token is
    /// invalid or for another user, or the connection's token expired (then close 4003).
    Unauthorized,
    /// Not allowed: a foreign `Origin` or a connect hook's refusal (HTTP 403 at the
    /// handshake), too many rooms or watched users, a room the token does not grant, a
    /// reserved room, another pair's direct conversation, or an application hook's denial.
    Forbidden,
    /// The request names a room this connection has not joined.
    NotJoined,
    /// The broker cannot be reached right now; retrying later may succeed.
    Unavailable,
    /// The broker does not offer this operation (for example history on a broker without it).
    Unsupported,
    /// An unexpected server error.
    Internal,
    /// The message an `edit`, `delete` or `react` names does not exist in that room (or is
    /// deleted, for an edit or a reaction).
    NotFound,
}

impl ErrorCode {
    /// Every code, in a stable order (used to label metrics).
    pub const ALL: [ErrorCode; 10] = [
        Self::BadRequest,
        Self::TooLarge,
        Self::RateLimited,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotJoined,
        Self::Unavailable,
        Self::Unsupported,
        Self::Internal,
        Self::NotFound,
    ];

    /// The wire name, e.g. `"bad_request"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotJoined => "not_joined",
            Self::Unavailable => "unavailable",
            Self::Unsupported => "unsupported",
            Self::Internal => "internal",
            Self::NotFound => "not_found",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// The code for a broker error.
    pub fn for_error(e: &chatbus_core::Error) -> Self {
        use chatbus_core::Error as E;
        match e {
            E::Unavailable { .. } | E::Timeout { .. } | E::Closed | E::Lagged { .. } => {
                Self::Unavailable
            }
            E::TooLarge { .. } => Self::TooLarge,
            E::Unsupported { .. } => Self::Unsupported,
            E::InvalidRoom { .. } | E::InvalidCursor(_) | E::CursorReset { .. } => Self::BadRequest,
            _ => Self::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A client-chosen request id, echoed in the answer: a string of at most
/// [`MAX_CLIENT_ID_LEN`] bytes, or a number.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub(crate) enum ClientId {
    Num(serde_json::Number),
    Str(String),
}

/// A validated client request.
#[derive(Debug)]
pub(crate) enum Request<'a> {
    Join {
        room: Room,
        since: Option<Cursor>,
    },
    Leave {
        room: Room,
    },
    Send {
        room: Room,
        body: Cow<'a, str>,
        key: Option<SendKey>,
    },
    /// A `send` with `to`: a direct message.
    Direct {
        to: Arc<str>,
        body: Cow<'a, str>,
        key: Option<SendKey>,
    },
    Watch {
        users: Vec<Arc<str>>,
    },
    Unwatch {
        users: Vec<Arc<str>>,
    },
    Typing {
        room: Room,
    },
    History {
        room: Room,
        before: Option<Cursor>,
        limit: Option<u64>,
    },
    Ping,
    Refresh {
        token: Cow<'a, str>,
    },
    /// `edit`, `delete` and `react`: an event on the message `id` of `room`.
    Target {
        room: Room,
        id: MessageId,
        action: TargetAction<'a>,
    },
    Read {
        room: Room,
        cursor: Cursor,
    },
    Conversations {
        before: Option<ConversationKey>,
        limit: Option<u64>,
    },
    /// A page of who is online in `room`, in order, after the user id `after`.
    Members {
        room: Room,
        after: Option<Arc<str>>,
        limit: Option<u64>,
    },
}

/// What an `edit`, `delete` or `react` does to its message (from a `/ws` frame, borrowed, or
/// a Socket.IO event, owned).
#[derive(Debug, PartialEq)]
pub(crate) enum TargetAction<'a> {
    Edit { body: Cow<'a, str> },
    Delete,
    React { emoji: Cow<'a, str>, on: bool },
}

/// The longest reaction `emoji` accepted, in bytes (a few code points: flags, skin tones and
/// joined sequences take several).
pub const MAX_EMOJI_LEN: usize = 32;

impl Request<'_> {
    pub(crate) fn room(&self) -> Option<&Room> {
        match self {
            Self::Join { room, .. }
            | Self::Leave { room }
            | Self::Send { room, .. }
            | Self::Typing { room }
            | Self::History { room, .. }
            | Self::Target { room, .. }
            | Self::Read { room, .. }
            | Self::Members { room, .. } => Some(room),
            Self::Conversations { .. }
            | Self::Ping
            | Self::Refresh { .. }
            | Self::Direct { .. }
            | Self::Watch { .. }
            | Self::Unwatch { .. } => None,
        }
    }
}

/// A request that could not be accepted, with what to tell the client.
#[derive(Debug)]
pub(crate) struct Rejected {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
    pub(crate) client_id: Option<ClientId>,
}

impl Rejected {
    fn bad(message: impl Into<String>, client_id: Option<ClientId>) -> Self {
        Self {
            code: ErrorCode::BadRequest,
            message: message.into(),
            client_id,
        }
    }
}

// Every field any request may carry; which ones are required depends on `type`. Parsing into one
// flat struct (rather than a serde-tagged enum) lets us name the missing field and the unknown
// type precisely, and keep the `client_id` for the error reply. Unknown fields are ignored.
#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(rename = "type", borrow, default)]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    since: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    before: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    body: Option<Cow<'a, str>>,
    #[serde(default)]
    client_id: Option<ClientId>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    users: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    key: Option<Cow<'a, str>>,
    #[serde(default)]
    retry: Option<bool>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    emoji: Option<Cow<'a, str>>,
    #[serde(default)]
    on: Option<bool>,
    #[serde(borrow, default)]
    cursor: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    after: Option<Cow<'a, str>>,
}

/// The most user ids one `watch` or `unwatch` frame may list (the per-connection bound is
/// [`WsConfig::max_watch`](crate::WsConfig::max_watch)).
const MAX_USERS_PER_FRAME: usize = 1000;

/// Parses one text frame.
pub(crate) fn parse(text: &[u8]) -> Result<(Request<'_>, Option<ClientId>), Rejected> {
    let raw: Raw<'_> = serde_json::from_slice(text)
        .map_err(|e| Rejected::bad(format!("malformed frame: {e}"), None))?;
    let client_id = match raw.client_id {
        Some(ClientId::Str(s)) if s.len() > MAX_CLIENT_ID_LEN => {
            return Err(Rejected::bad(
                format!("client_id longer than {MAX_CLIENT_ID_LEN} bytes"),
                None,
            ))
        }
        other => other,
    };
    let cid = || client_id.clone();
    let Some(ty) = raw.ty else {
        return Err(Rejected::bad("missing field `type`", cid()));
    };
    let room = |field: Option<Cow<'_, str>>| -> Result<Room, Rejected> {
        let name = field.ok_or_else(|| Rejected::bad("missing field `room`", cid()))?;
        Room::new(&*name).map_err(|e| Rejected::bad(e.to_string(), cid()))
    };
    let cursor = |field: Option<Cow<'_, str>>, name: &str| -> Result<Option<Cursor>, Rejected> {
        field
            .map(|s| {
                s.parse::<Cursor>()
                    .map_err(|_| Rejected::bad(format!("invalid cursor in `{name}`"), cid()))
            })
            .transpose()
    };
    let req = match &*ty {
        "join" => Request::Join {
            room: room(raw.room)?,
            since: cursor(raw.since, "since")?,
        },
        "leave" => Request::Leave {
            room: room(raw.room)?,
        },
        "send" => {
            let body = raw
                .body
                .ok_or_else(|| Rejected::bad("missing field `body`", cid()))?;
            if body.is_empty() {
                return Err(Rejected::bad("`body` is empty", cid()));
            }
            let key = match (raw.key, raw.retry.unwrap_or(false)) {
                (None, false) => None,
                (None, true) => return Err(Rejected::bad("`retry` needs a `key`", cid())),
                (Some(k), _) if k.is_empty() || k.len() > MAX_KEY_LEN => {
                    return Err(Rejected::bad(
                        format!("`key` must be 1 to {MAX_KEY_LEN} bytes"),
                        cid(),
                    ))
                }
                (Some(k), retry) => Some(SendKey {
                    key: Arc::from(&*k),
                    retry,
                }),
            };
            match (raw.room, raw.to) {
                (Some(_), Some(_)) => {
                    return Err(Rejected::bad(
                        "a `send` has either `room` or `to`, not both",
                        cid(),
                    ))
                }
                (None, Some(to)) => Request::Direct {
                    to: user_id(&to).map_err(|m| Rejected::bad(format!("`to`: {m}"), cid()))?,
                    body,
                    key,
                },
                (room_name, None) => Request::Send {
                    room: room(room_name)?,
                    body,
                    key,
                },
            }
        }
        "watch" | "unwatch" => {
            let list = raw
                .users
                .ok_or_else(|| Rejected::bad("missing field `users`", cid()))?;
            if list.len() > MAX_USERS_PER_FRAME {
                return Err(Rejected::bad(
                    format!("more than {MAX_USERS_PER_FRAME} users in one frame"),
                    cid(),
                ));
            }
            let mut users: Vec<Arc<str>> = Vec::with_capacity(list.len());
            for u in &list {
                let u = user_id(u).map_err(|m| Rejected::bad(format!("`users`: {m}"), cid()))?;
                if !users.contains(&u) {
                    users.push(u);
                }
            }
            if &*ty == "watch" {
                Request::Watch { users }
            } else {
                Request::Unwatch { users }
            }
        }
        "typing" => Request::Typing {
            room: room(raw.room)?,
        },
        "history" => Request::History {
            room: room(raw.room)?,
            before: cursor(raw.before, "before")?,
            limit: raw.limit,
        },
        "edit" | "delete" | "react" => {
            let id = raw
                .id
                .ok_or_else(|| Rejected::bad("missing field `id`", cid()))?
                .parse::<MessageId>()
                .map_err(|_| Rejected::bad("invalid message `id`", cid()))?;
            let action = match &*ty {
                "edit" => {
                    let body = raw
                        .body
                        .ok_or_else(|| Rejected::bad("missing field `body`", cid()))?;
                    if body.is_empty() {
                        return Err(Rejected::bad("`body` is empty", cid()));
                    }
                    TargetAction::Edit { body }
                }
                "delete" => TargetAction::Delete,
                _ => {
                    let emoji = raw
                        .emoji
                        .ok_or_else(|| Rejected::bad("missing field `emoji`", cid()))?;
                    if emoji.is_empty()
                        || emoji.len() > MAX_EMOJI_LEN
                        || emoji.chars().any(char::is_control)
                    {
                        return Err(Rejected::bad(
                            format!(
                                "`emoji` must be 1 to {MAX_EMOJI_LEN} bytes, no control characters"
                            ),
                            cid(),
                        ));
                    }
                    let on = raw
                        .on
                        .ok_or_else(|| Rejected::bad("missing field `on`", cid()))?;
                    TargetAction::React { emoji, on }
                }
            };
            Request::Target {
                room: room(raw.room)?,
                id,
                action,
            }
        }
        "read" => Request::Read {
            room: room(raw.room)?,
            cursor: cursor(raw.cursor, "cursor")?
                .ok_or_else(|| Rejected::bad("missing field `cursor`", cid()))?,
        },
        "conversations" => Request::Conversations {
            before: raw
                .before
                .map(|b| {
                    b.parse::<ConversationKey>()
                        .map_err(|_| Rejected::bad("invalid `before`", cid()))
                })
                .transpose()?,
            limit: raw.limit,
        },
        "members" => Request::Members {
            room: room(raw.room)?,
            after: raw
                .after
                .map(|a| {
                    user_id(&a).map_err(|e| Rejected::bad(format!("invalid `after`: {e}"), cid()))
                })
                .transpose()?,
            limit: raw.limit,
        },
        "ping" => Request::Ping,
        "refresh" => Request::Refresh {
            token: raw
                .token
                .filter(|t| !t.is_empty())
                .ok_or_else(|| Rejected::bad("missing field `token`", cid()))?,
        },
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(Rejected::bad(format!("unknown type {shown:?}"), cid()));
        }
    };
    Ok((req, client_id))
}

/// A reaction's emoji: 1 to [`MAX_EMOJI_LEN`] bytes without control characters (clients
/// choose their set; the server only bounds it).
pub(crate) fn validate_emoji(emoji: &str) -> Result<(), String> {
    if emoji.is_empty() || emoji.len() > MAX_EMOJI_LEN || emoji.chars().any(char::is_control) {
        return Err(format!(
            "`emoji` must be 1 to {MAX_EMOJI_LEN} bytes, no control characters"
        ));
    }
    Ok(())
}

/// A user id named by a client (`to`, `users`), validated like an authenticated one.
fn user_id(s: &str) -> Result<Arc<str>, String> {
    crate::auth::validate_user(s)
        .map(|()| Arc::from(s))
        .map_err(|e| e.message().to_owned())
}

/// The fuzz property (see `crate::__fuzz`): parsing never panics, an accepted request holds
/// what the session takes for granted without checking again, and the `client_id` we keep, from
/// an accepted or a rejected frame, echoes back in a reply frame as itself.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_check(bytes: &[u8]) -> bool {
    fn cursor_round_trips(c: Option<Cursor>) {
        if let Some(c) = c {
            assert_eq!(c.to_string().parse::<Cursor>().ok(), Some(c));
        }
    }
    fn users_valid(users: &[Arc<str>]) {
        assert!(users.len() <= MAX_USERS_PER_FRAME);
        for (i, u) in users.iter().enumerate() {
            assert!(crate::auth::validate_user(u).is_ok(), "{u:?}");
            assert!(!users[..i].contains(u), "duplicate {u:?}");
        }
    }
    let (ok, client_id) = match parse(bytes) {
        Ok((req, client_id)) => {
            if let Some(room) = req.room() {
                assert!(Room::new(room.as_str()).is_ok(), "{room:?}");
            }
            match &req {
                Request::Join { since, .. } => cursor_round_trips(*since),
                Request::History { before, .. } => cursor_round_trips(*before),
                Request::Send { body, .. } => assert!(!body.is_empty()),
                Request::Direct { to, body, .. } => {
                    assert!(!body.is_empty());
                    assert!(crate::auth::validate_user(to).is_ok(), "{to:?}");
                }
                Request::Watch { users } | Request::Unwatch { users } => users_valid(users),
                Request::Refresh { token } => assert!(!token.is_empty()),
                Request::Target { action, .. } => match action {
                    TargetAction::Edit { body } => assert!(!body.is_empty()),
                    TargetAction::React { emoji, .. } => {
                        assert!(!emoji.is_empty() && emoji.len() <= MAX_EMOJI_LEN)
                    }
                    TargetAction::Delete => {}
                },
                Request::Read { cursor, .. } => cursor_round_trips(Some(*cursor)),
                Request::Members { after, .. } => {
                    if let Some(a) = after {
                        assert!(crate::auth::validate_user(a).is_ok(), "{a:?}");
                    }
                }
                Request::Leave { .. }
                | Request::Typing { .. }
                | Request::Ping
                | Request::Conversations { .. } => {}
            }
            (true, client_id)
        }
        Err(rejected) => {
            assert_eq!(rejected.code, ErrorCode::BadRequest);
            (false, rejected.client_id)
        }
    };
    if let Some(ClientId::Str(s)) = &client_id {
        assert!(s.len() <= MAX_CLIENT_ID_LEN);
    }
    let frame = error(ErrorCode::BadRequest, "x", client_id.as_ref(), None);
    #[derive(Deserialize)]
    struct Echo {
        client_id: Option<ClientId>,
    }
    let echo: Echo = serde_json::from_slice(&frame).unwrap_or_else(|e| panic!("{e}: {frame:?}"));
    assert_eq!(echo.client_id, client_id);
    ok
}

#[cfg(test)]
mod tests;
