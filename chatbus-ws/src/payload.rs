//! The envelope payloads chatbus-ws puts on the broker, shared by every instance.
//!
//! Compact binary, one tag byte then the body (documented in `docs/protocol.md`, section
//! "Between instances"). Any instance must decode what any other instance publishes, so a
//! change here needs a new tag, never a new meaning for an old one.
//!
//! ```text
//! message   'M' name_len:u8 name[name_len] body (UTF-8, the rest)
//! typing    'T' name_len:u8 name[name_len]
//! presence  'P' instance:u128be seq:u64be flags:u8 count:u32be { len:u8 user[len] }*count
//! ```
//!
//! `name` is the sender's display name when it differs from its user id (else empty); the user
//! id itself is the envelope's `from`, set from the authenticated session. Presence flags: bit 0
//! = "hello" (the sender just started tracking the room and asks the others for their
//! snapshots).

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

pub(crate) const TAG_MESSAGE: u8 = b'M';
pub(crate) const TAG_TYPING: u8 = b'T';
pub(crate) const TAG_PRESENCE: u8 = b'P';

const FLAG_HELLO: u8 = 1;

/// A decoded payload, borrowing from the envelope's bytes.
#[derive(Debug, PartialEq)]
pub(crate) enum Payload<'a> {
    Message {
        name: Option<&'a str>,
        body: &'a str,
    },
    Typing {
        name: Option<&'a str>,
    },
    Presence(Snapshot),
}

/// One instance's view of who is online in a room.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snapshot {
    pub(crate) instance: u128,
    pub(crate) seq: u64,
    pub(crate) hello: bool,
    pub(crate) users: Vec<Arc<str>>,
}

fn short(s: Option<&str>) -> &[u8] {
    // Names and user ids are validated to at most 64 bytes where they enter (auth); the cut is
    // a second line of defence that keeps the length in one byte.
    let b = s.unwrap_or("").as_bytes();
    &b[..b.len().min(255)]
}

pub(crate) fn message(name: Option<&str>, body: &str) -> Bytes {
    let name = short(name);
    let mut out = BytesMut::with_capacity(2 + name.len() + body.len());
    out.put_u8(TAG_MESSAGE);
    out.put_u8(name.len() as u8);
    out.put_slice(name);
    out.put_slice(body.as_bytes());
    out.freeze()
}

pub(crate) fn typing(name: Option<&str>) -> Bytes {
    let name = short(name);
    let mut out = BytesMut::with_capacity(2 + name.len());
    out.put_u8(TAG_TYPING);
    out.put_u8(name.len() as u8);
    out.put_slice(name);
    out.freeze()
}

pub(crate) fn presence(s: &Snapshot) -> Bytes {
    let size = 30 + s.users.iter().map(|u| 1 + u.len()).sum::<usize>();
    let mut out = BytesMut::with_capacity(size);
    out.put_u8(TAG_PRESENCE);
    out.put_u128(s.instance);
    out.put_u64(s.seq);
    out.put_u8(if s.hello { FLAG_HELLO } else { 0 });
    out.put_u32(u32::try_from(s.users.len()).unwrap_or(u32::MAX));
    for u in &s.users {
        let u = short(Some(u));
        out.put_u8(u.len() as u8);
        out.put_slice(u);
    }
    out.freeze()
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn short_str(&mut self) -> Option<&'a str> {
        let n = usize::from(self.u8()?);
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Decodes a payload; `None` for anything malformed or with an unknown tag (counted and dropped
/// by the caller, never a panic).
pub(crate) fn decode(bytes: &[u8]) -> Option<Payload<'_>> {
    let mut r = Reader(bytes);
    match r.u8()? {
        TAG_MESSAGE => {
            let name = non_empty(r.short_str()?);
            let body = std::str::from_utf8(r.0).ok()?;
            Some(Payload::Message { name, body })
        }
        TAG_TYPING => {
            let name = non_empty(r.short_str()?);
            r.0.is_empty().then_some(Payload::Typing { name })
        }
        TAG_PRESENCE => {
            let instance = u128::from_be_bytes(r.array()?);
            let seq = u64::from_be_bytes(r.array()?);
            let hello = r.u8()? & FLAG_HELLO != 0;
            let count = u32::from_be_bytes(r.array()?) as usize;
            // Each user takes at least one byte, so a count beyond the remaining bytes is a lie;
            // checking first keeps a hostile count from reserving memory.
            if count > r.0.len() {
                return None;
            }
            let mut users = Vec::with_capacity(count);
            for _ in 0..count {
                users.push(Arc::from(r.short_str()?));
            }
            r.0.is_empty().then_some(Payload::Presence(Snapshot {
                instance,
                seq,
                hello,
                users,
            }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let m = message(Some("Ann"), "hi ✓");
        assert_eq!(
            decode(&m),
            Some(Payload::Message {
                name: Some("Ann"),
                body: "hi ✓"
            })
        );
        assert_eq!(
            decode(&message(None, "")),
            Some(Payload::Message {
                name: None,
                body: ""
            })
        );
        assert_eq!(decode(&typing(None)), Some(Payload::Typing { name: None }));
        let s = Snapshot {
            instance: 7 << 100,
            seq: 9,
            hello: true,
            users: vec![Arc::from("a"), Arc::from("bé")],
        };
        assert_eq!(decode(&presence(&s)), Some(Payload::Presence(s)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            &b""[..],
            b"X",
            b"M",
            b"M\x05ab",
            b"M\x00\xff",
            b"T\x00extra",
            b"P\x00",
            b"P\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
