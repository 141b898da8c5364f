//! The data model: [`Envelope`] and the small types it is made of.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::{Error, Result};

/// A 128-bit, time-ordered message id (UUIDv7).
///
/// Assigned once where a message enters the system and carried unchanged everywhere after: it is
/// the key by which copies that arrive by two paths (see `DualBus`) are recognised as one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(u128);

impl MessageId {
    /// A fresh id: 48 bits of Unix milliseconds, then random bits (UUIDv7), so ids sort by
    /// creation time across instances.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7().as_u128())
    }

    /// An id from its 128-bit value.
    pub const fn from_u128(v: u128) -> Self {
        Self(v)
    }

    /// The 128-bit value.
    pub const fn as_u128(self) -> u128 {
        self.0
    }

    /// The 16 big-endian bytes.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_u128(self.0).hyphenated(), f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl FromStr for MessageId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        uuid::Uuid::parse_str(s)
            .map(|u| Self(u.as_u128()))
            .map_err(|_| Error::Decode("invalid message id"))
    }
}

/// The longest room name, in bytes.
pub const MAX_ROOM_LEN: usize = 128;

/// A validated room name: 1 to [`MAX_ROOM_LEN`] bytes of `[A-Za-z0-9._:-]`.
///
/// The charset keeps names safe to embed in Redis channel names, Kafka keys, URLs and logs
/// without escaping. Cloning is cheap (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Room(Arc<str>);

impl Room {
    /// Validates and wraps a room name.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        Self::validate(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// Checks a name without allocating.
    pub fn validate(name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidRoom { reason: "empty" });
        }
        if name.len() > MAX_ROOM_LEN {
            return Err(Error::InvalidRoom {
                reason: "longer than 128 bytes",
            });
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(Error::InvalidRoom {
                reason: "only A-Z, a-z, 0-9, '.', '_', ':' and '-' are allowed",
            });
        }
        Ok(())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Room({:?})", &*self.0)
    }
}

impl FromStr for Room {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl AsRef<str> for Room {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for Room {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Room {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::new(&*s).map_err(serde::de::Error::custom)
    }
}

/// Whether a message is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Kind {
    /// Persisted by durable brokers and returned by `replay` (chat messages).
    #[default]
    Durable,
    /// Live only: never stored, never replayed (typing indicators, presence).
    Ephemeral,
}

/// A position in a broker's log, handed to clients so they can resume.
///
/// A cursor is a `(partition, offset)` pair: a Kafka partition and offset, or partition `0` and
/// a sequence number for the memory broker and Redis streams. Within one room, cursors of one
/// broker are totally ordered (a room never changes partition), so "everything after this
/// cursor" is well defined. Clients treat the string form (`"3-1041"`) as opaque.
///
/// **Epochs.** A position means something only in the log it was taken from. A Redis that
/// comes back empty restarts a room's sequence at 1, a recreated Kafka topic restarts its
/// offsets at 0, a restarted process has a new memory broker: the same `(partition, offset)`
/// then names another message. So a cursor also carries the [`epoch`](Self::epoch) of its log,
/// a nonzero number that changes whenever the log starts over (see each broker's docs for where
/// it comes from). `0` means unknown (a cursor from before epochs, or a log whose first record
/// is gone) and matches every log: [`same_log`](Self::same_log).
///
/// Comparing two cursors (`<`, `>`) is meaningful only when [`same_log`](Self::same_log)
/// holds: every comparison used as a dedupe or resume bound checks it first. (`Ord` orders by
/// partition, then offset, then epoch, so that sorted collections still work.)
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cursor {
    /// The partition (0 where the broker has one sequence).
    pub partition: u32,
    /// The offset or sequence number within the partition.
    pub offset: u64,
    /// The log this position belongs to; 0 = unknown (matches every log).
    pub epoch: u32,
}

impl Cursor {
    /// A cursor from its parts, of an unknown epoch (0).
    pub const fn new(partition: u32, offset: u64) -> Self {
        Self {
            partition,
            offset,
            epoch: 0,
        }
    }

    /// A cursor from its parts, in the log of `epoch`.
    pub const fn with_epoch(partition: u32, offset: u64, epoch: u32) -> Self {
        Self {
            partition,
            offset,
            epoch,
        }
    }

    /// The same position, in the log of `epoch`.
    #[must_use]
    pub const fn in_epoch(self, epoch: u32) -> Self {
        Self { epoch, ..self }
    }

    /// Whether `self` and `other` may belong to the same log, so that comparing their
    /// positions means something: same epoch, or either epoch unknown (0).
    pub const fn same_log(&self, other: &Self) -> bool {
        self.epoch == 0 || other.epoch == 0 || self.epoch == other.epoch
    }

    /// Whether `self` is at or before `other` in one log (false for cursors of two logs):
    /// "a copy of something already had", the dedupe test.
    pub fn is_at_or_before(&self, other: &Self) -> bool {
        self.same_log(other) && (self.partition, self.offset) <= (other.partition, other.offset)
    }

    /// A fresh random nonzero epoch, for a log that starts now.
    pub fn new_epoch() -> u32 {
        // The last 32 bits of a UUIDv7 are random.
        nonzero(MessageId::new().as_u128() as u32)
    }
}

impl MessageId {
    /// A nonzero 32-bit fingerprint of the id: the epoch of a log derived from its first
    /// record, the same on every instance that reads it.
    pub fn epoch_fingerprint(self) -> u32 {
        let v = self.0;
        let folded = (v as u32) ^ ((v >> 32) as u32) ^ ((v >> 64) as u32) ^ ((v >> 96) as u32);
        nonzero(folded)
    }
}

/// `v`, or 1 where it is 0 (0 means "unknown epoch").
const fn nonzero(v: u32) -> u32 {
    if v == 0 {
        1
    } else {
        v
    }
}

/// `P-O` for an unknown epoch (the form from before epochs), `P-O-E` with `E` in lowercase hex
/// otherwise.
impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.epoch == 0 {
            write!(f, "{}-{}", self.partition, self.offset)
        } else {
            write!(f, "{}-{}-{:x}", self.partition, self.offset, self.epoch)
        }
    }
}

impl fmt::Debug for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cursor({self})")
    }
}

impl FromStr for Cursor {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidCursor(s.chars().take(64).collect());
        let mut parts = s.splitn(3, '-');
        let (Some(p), Some(o)) = (parts.next(), parts.next()) else {
            return Err(bad());
        };
        // `parse` accepts a leading '+'; a cursor string never has one.
        if p.starts_with('+') || o.starts_with('+') {
            return Err(bad());
        }
        let epoch = match parts.next() {
            None => 0,
            // One canonical form per cursor: lowercase hex, no sign, no leading zero, never 0
            // (an unknown epoch is written without the part).
            Some(e) => {
                let canonical = !e.is_empty()
                    && e.len() <= 8
                    && !e.starts_with('0')
                    && e.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                if !canonical {
                    return Err(bad());
                }
                u32::from_str_radix(e, 16).map_err(|_| bad())?
            }
        };
        Ok(Self {
            partition: p.parse().map_err(|_| bad())?,
            offset: o.parse().map_err(|_| bad())?,
            epoch,
        })
    }
}

impl serde::Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One message as it travels between instances.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The dedupe key, assigned once.
    pub id: MessageId,
    /// The room it is for.
    pub room: Room,
    /// Durable (kept, replayable) or ephemeral (live only).
    pub kind: Kind,
    /// The sender's user id, set by the server from the authenticated session, never by a client.
    pub from: Option<Arc<str>>,
    /// Creation time, Unix milliseconds.
    pub ts: u64,
    /// Opaque application data.
    pub payload: Bytes,
    /// Position in the durable log, set by the durable broker.
    pub cursor: Option<Cursor>,
    /// The room ticket the message was published with, under an interest-based DualBus (see
    /// [`Stamp`]); `None` otherwise.
    pub stamp: Option<Stamp>,
}

/// What a message carries of its room ticket ([`Tickets`](crate::Tickets)): the ticket taken
/// before its durable write and, on the fast path, the horizon read after the durable ack
/// (0 in the durable record, which is written before the horizon is known).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The ticket.
    pub ticket: crate::Ticket,
    /// The highest ticket of the room taken when this one was closed; 0 when unknown.
    pub horizon: u64,
}

impl Envelope {
    /// A durable message with a fresh id and the current time.
    pub fn new(room: Room, payload: impl Into<Bytes>) -> Self {
        Self {
            id: MessageId::new(),
            room,
            kind: Kind::Durable,
            from: None,
            ts: now_ms(),
            payload: payload.into(),
            cursor: None,
            stamp: None,
        }
    }

    /// An ephemeral message (never stored) with a fresh id and the current time.
    pub fn ephemeral(room: Room, payload: impl Into<Bytes>) -> Self {
        Self {
            kind: Kind::Ephemeral,
            ..Self::new(room, payload)
        }
    }

    /// Sets the sender.
    #[must_use]
    pub fn with_from(mut self, from: impl Into<Arc<str>>) -> Self {
        self.from = Some(from.into());
        self
    }

    /// Whether the message is durable.
    pub fn is_durable(&self) -> bool {
        self.kind == Kind::Durable
    }
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("room", &self.room)
            .field("kind", &self.kind)
            .field("from", &self.from)
            .field("ts", &self.ts)
            .field("payload_len", &self.payload.len())
            .field("cursor", &self.cursor)
            .field("stamp", &self.stamp)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_validation() {
        assert!(Room::new("general").is_ok());
        assert!(Room::new("team-1.dev:ops_2").is_ok());
        assert!(Room::new("a".repeat(128)).is_ok());
        assert!(Room::new("a".repeat(129)).is_err());
        assert!(Room::new("").is_err());
        assert!(Room::new("has space").is_err());
        assert!(Room::new("é").is_err());
        assert!(Room::new("a/b").is_err());
    }

    #[test]
    fn cursor_round_trip_and_rejects() {
        let c = Cursor::new(3, 1041);
        assert_eq!(c.to_string(), "3-1041");
        assert_eq!("3-1041".parse::<Cursor>().ok(), Some(c));
        let e = Cursor::with_epoch(3, 1041, 0x9f3a_01bc);
        assert_eq!(e.to_string(), "3-1041-9f3a01bc");
        assert_eq!("3-1041-9f3a01bc".parse::<Cursor>().ok(), Some(e));
        assert_eq!(
            "0-1-ffffffff".parse::<Cursor>().ok(),
            Some(Cursor::with_epoch(0, 1, u32::MAX))
        );
        for bad in [
            "",
            "3",
            "-1",
            "3-",
            "a-1",
            "+3-1",
            "3-+1",
            "3-1-",
            "3-1-0",
            "3-1-01",
            "3-1-+1",
            "3-1-A",
            "3-1-g",
            "3-1-100000000",
            "3-1-2-4",
            "99999999999-1",
        ] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?} parsed");
        }
        assert!(Cursor::new(0, 9) < Cursor::new(0, 10));
    }

    #[test]
    fn epochs_separate_logs_and_unknown_matches_any() {
        let (a, b) = (Cursor::with_epoch(0, 5, 7), Cursor::with_epoch(0, 9, 8));
        assert!(!a.same_log(&b));
        assert!(
            !a.is_at_or_before(&b),
            "positions of two logs are not ordered"
        );
        assert!(!b.is_at_or_before(&a));
        let legacy = Cursor::new(0, 9);
        assert!(legacy.same_log(&a) && a.same_log(&legacy));
        assert!(a.is_at_or_before(&legacy));
        assert!(a.is_at_or_before(&a.in_epoch(7)));
        assert!(!Cursor::with_epoch(0, 6, 7).is_at_or_before(&a));
        assert_ne!(Cursor::new_epoch(), 0);
        assert_ne!(MessageId::from_u128(0).epoch_fingerprint(), 0);
        let id = MessageId::new();
        assert_eq!(id.epoch_fingerprint(), id.epoch_fingerprint());
    }

    #[test]
    fn ids_are_time_ordered_and_parse() {
        let a = MessageId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = MessageId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<MessageId>().ok(), Some(a));
        assert!("nope".parse::<MessageId>().is_err());
    }
}
