//! The server's frames of protocol v1 (`docs/protocol.md`, "Server frames"): each built once
//! into the bytes every recipient shares.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use chatbus_core::store::ReadState;
use chatbus_core::{Cursor, Room};
use serde::Serialize;

use super::{ClientId, ErrorCode, PROTOCOL_VERSION};

fn to_bytes<T: Serialize>(v: &T) -> Bytes {
    // Serialising these plain structs into a Vec cannot fail (no maps with non-string keys, no
    // fallible Serialize impls); an empty frame would be a bug, and is never sent as such.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// Serialises a value with its `Display` form (message ids).
pub(crate) struct AsDisplay<T>(pub(crate) T);

impl<T: fmt::Display> Serialize for AsDisplay<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

#[derive(Serialize)]
struct Welcome<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    session: u64,
    user: &'a str,
    name: &'a str,
    protocol: u32,
    limits: Limits,
}

/// The limits announced in `welcome`, so clients can stay within them.
#[derive(Serialize)]
pub(crate) struct Limits {
    pub(crate) max_frame_size: usize,
    pub(crate) max_rooms: usize,
    pub(crate) max_history: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rate_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rate_burst: Option<u32>,
}

impl Limits {
    /// The limits `config` sets.
    pub(crate) fn of(config: &crate::WsConfig) -> Self {
        Self {
            max_frame_size: config.max_frame_size,
            max_rooms: config.max_rooms,
            max_history: config.max_history,
            rate_per_second: config.rate_limit.map(|r| r.per_second),
            rate_burst: config.rate_limit.map(|r| r.burst),
        }
    }
}

pub(crate) fn welcome(session: u64, user: &str, name: &str, limits: Limits) -> Bytes {
    to_bytes(&Welcome {
        ty: "welcome",
        session,
        user,
        name,
        protocol: PROTOCOL_VERSION,
        limits,
    })
}

#[derive(Serialize)]
struct RoomReply<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    room: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    resuming: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a ClientId>,
    /// The user's read position (`null`: nothing read yet), when the store answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    read: Option<Option<Cursor>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unread: Option<u64>,
}

/// The `joined` reply; `read` carries the user's read position and unread count from the
/// store (left out when the store could not answer).
pub(crate) fn joined(
    room: &Room,
    resuming: bool,
    client_id: Option<&ClientId>,
    read: Option<ReadState>,
) -> Bytes {
    to_bytes(&RoomReply {
        ty: "joined",
        room: room.as_str(),
        resuming: Some(resuming),
        client_id,
        read: read.map(|r| r.cursor),
        unread: read.map(|r| r.unread),
    })
}

pub(crate) fn left(room: &Room, client_id: Option<&ClientId>) -> Bytes {
    to_bytes(&RoomReply {
        ty: "left",
        room: room.as_str(),
        resuming: None,
        client_id,
        read: None,
        unread: None,
    })
}

#[derive(Serialize)]
struct Ack<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a ClientId>,
    id: AsDisplay<chatbus_core::MessageId>,
    cursor: Option<Cursor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

/// The `ack` of a send; `room` is set for a direct message (its conversation's room);
/// `duplicate` when the send's `key` was sent before and nothing was published again (`id` and
/// `cursor` are then the original's).
pub(crate) fn ack(
    client_id: Option<&ClientId>,
    id: chatbus_core::MessageId,
    cursor: Option<Cursor>,
    room: Option<&Room>,
    duplicate: bool,
) -> Bytes {
    to_bytes(&Ack {
        ty: "ack",
        client_id,
        id: AsDisplay(id),
        cursor,
        room: room.map(Room::as_str),
        duplicate,
    })
}

#[derive(Serialize)]
struct Status<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    user: &'a str,
    online: bool,
}

/// `{"type":"status","user":U,"online":B}`.
pub(crate) fn status(user: &str, online: bool) -> Bytes {
    to_bytes(&Status {
        ty: "status",
        user,
        online,
    })
}

#[derive(Serialize)]
struct Refreshed<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    expires: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a ClientId>,
}

/// The answer to an accepted `refresh`: the new expiry (Unix ms), `null` for none.
pub(crate) fn refreshed(expires_ms: Option<u64>, client_id: Option<&ClientId>) -> Bytes {
    to_bytes(&Refreshed {
        ty: "refreshed",
        expires: expires_ms,
        client_id,
    })
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    code: ErrorCode,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a ClientId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
}

/// An `error` frame.
pub(crate) fn error(
    code: ErrorCode,
    message: &str,
    client_id: Option<&ClientId>,
    room: Option<&Room>,
) -> Bytes {
    to_bytes(&ErrorFrame {
        ty: "error",
        code,
        message,
        client_id,
        room: room.map(Room::as_str),
    })
}

/// The JSON body of a refused handshake (401 / 403 / 400).
pub(crate) fn handshake_error(code: ErrorCode, message: &str) -> Bytes {
    error(code, message, None, None)
}

#[derive(Serialize)]
struct Lagged<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    room: &'a str,
    cursor: Option<Cursor>,
}

pub(crate) fn lagged(room: &Room, cursor: Option<Cursor>) -> Bytes {
    to_bytes(&Lagged {
        ty: "lagged",
        room: room.as_str(),
        cursor,
    })
}

#[derive(Serialize)]
struct Reset<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    room: &'a str,
    reason: &'static str,
}

/// `{"type":"reset","room":R,"reason":"log_reset"|"beyond_end"}`: the connection's position in
/// the room does not fit the room's log; it is live from now on and should reload the room.
pub(crate) fn reset(room: &Room, reason: chatbus_core::ResetReason) -> Bytes {
    to_bytes(&Reset {
        ty: "reset",
        room: room.as_str(),
        reason: reason.as_str(),
    })
}

#[derive(Serialize)]
struct Presence<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    room: &'a str,
    online: Vec<&'a str>,
    count: usize,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    paged: bool,
}

/// `{"type":"presence","room":R,"online":[...],"count":N}`: every name while the room has at
/// most `max_listed` online; beyond, `"online":[]` and `"paged":true`, and a client asks for
/// the names page by page (`members`). Every member gets the frame on every change, so a list
/// in it would cost n × n names for a room of n, and each connection's write buffer would
/// keep the size of the largest frame it ever sent.
pub(crate) fn presence<U: AsRef<str>>(room: &Room, online: &[U], max_listed: usize) -> Bytes {
    if online.len() > max_listed {
        return presence_listed(room, Vec::new(), online.len());
    }
    presence_listed(
        room,
        online.iter().map(AsRef::as_ref).collect(),
        online.len(),
    )
}

/// A `presence` frame listing `listed` (every name, in order) or, when `listed` is shorter
/// than `count`, none (paged).
pub(crate) fn presence_listed(room: &Room, listed: Vec<&str>, count: usize) -> Bytes {
    let paged = listed.len() < count;
    to_bytes(&Presence {
        ty: "presence",
        room: room.as_str(),
        online: if paged { Vec::new() } else { listed },
        count,
        paged,
    })
}

#[derive(Serialize)]
struct Members<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    room: &'a str,
    users: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a ClientId>,
}

/// `{"type":"members","room":R,"users":[...],"next":U}`: a page of who is online, in order;
/// `next` (the last user of the page) when there may be more, to ask the next page with.
pub(crate) fn members(
    room: &Room,
    users: &[Arc<str>],
    next: Option<&str>,
    client_id: Option<&ClientId>,
) -> Bytes {
    to_bytes(&Members {
        ty: "members",
        room: room.as_str(),
        users: users.iter().map(AsRef::as_ref).collect(),
        next,
        client_id,
    })
}

pub(crate) const PONG: &[u8] = br#"{"type":"pong"}"#;

/// `{"type":"history","room":R,"messages":[m1,m2,...]}` from already encoded message frames,
/// so history reuses the exact bytes live delivery sends (no second serialisation path).
/// A partial page (the broker stopped scanning first) adds `"complete":false` and `"before"`,
/// the cursor to ask the next page with.
pub(crate) fn history(
    room: &Room,
    messages: &[Bytes],
    more_before: Option<&str>,
    client_id: Option<&ClientId>,
) -> Bytes {
    let room_json = serde_json::to_string(room.as_str()).unwrap_or_default();
    let mut out = Vec::with_capacity(64 + messages.iter().map(Bytes::len).sum::<usize>());
    out.extend_from_slice(br#"{"type":"history","room":"#);
    out.extend_from_slice(room_json.as_bytes());
    if let Some(cid) = client_id {
        out.extend_from_slice(br#","client_id":"#);
        out.extend_from_slice(&serde_json::to_vec(cid).unwrap_or_default());
    }
    if let Some(before) = more_before {
        out.extend_from_slice(br#","complete":false,"before":"#);
        out.extend_from_slice(&serde_json::to_vec(before).unwrap_or_default());
    }
    out.extend_from_slice(br#","messages":["#);
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(m);
    }
    out.extend_from_slice(b"]}");
    Bytes::from(out)
}
