//! The versioned binary encoding of [`Envelope`] used between instances.
//!
//! Layout of version 1 (all integers big-endian):
//!
//! ```text
//! u8   version (= 1)
//! u8   flags: bit 0 ephemeral, bit 1 has `from`, bit 2 has `cursor`, bit 3 the cursor has an
//!      epoch (only with bit 2), bit 4 has a `stamp`; other bits must be 0
//! [16] message id
//! u64  ts (Unix ms)
//! u8   room length, then the room bytes (validated as a Room on decode)
//! if from:   u16 length, then UTF-8 bytes
//! if cursor: u32 partition, u64 offset
//! if epoch:  u32 epoch (nonzero)
//! if stamp:  u64 ticket epoch (nonzero), u64 ticket number, u64 horizon
//! u32  payload length, then the payload bytes (zero-copy slice of the input on decode)
//! ```
//!
//! The first byte names the version so a future layout can be rolled out instance by instance:
//! a decoder rejects versions it does not know instead of misreading them. Decoding never
//! panics and never allocates more than the input's length, whatever the bytes.
//!
//! The epoch bit came after the first release: a cursor of an unknown epoch (0) is written
//! without it, byte for byte as before, and only cursors of a known log set it. A decoder from
//! before the bit rejects such frames (unknown flag) rather than misreading them, so mixed
//! versions of chatbus must not share a broker that assigns epochs. The stamp bit (the
//! interest-based DualBus) came later still, the same way: an envelope without a stamp is
//! written as before.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::envelope::{Cursor, Envelope, Kind, MessageId, Room, Stamp};
use crate::tickets::Ticket;
use crate::{Error, Result};

/// The version this build writes.
pub const VERSION: u8 = 1;

const F_EPHEMERAL: u8 = 1;
const F_FROM: u8 = 1 << 1;
const F_CURSOR: u8 = 1 << 2;
const F_EPOCH: u8 = 1 << 3;
const F_STAMP: u8 = 1 << 4;
const F_KNOWN: u8 = F_EPHEMERAL | F_FROM | F_CURSOR | F_EPOCH | F_STAMP;

/// The number of bytes [`encode`] writes for `env`.
pub fn encoded_len(env: &Envelope) -> usize {
    1 + 1
        + 16
        + 8
        + 1
        + env.room.as_str().len()
        + env.from.as_ref().map_or(0, |f| 2 + f.len())
        + env.cursor.map_or(0, |c| if c.epoch == 0 { 12 } else { 16 })
        + env.stamp.map_or(0, |_| 24)
        + 4
        + env.payload.len()
}

/// Appends the encoding of `env` to `buf`.
///
/// Fails only when a field does not fit its length prefix (`from` over 65,535 bytes or a payload
/// over 4 GiB), which callers that enforce a message size limit never hit.
pub fn encode_into(env: &Envelope, buf: &mut BytesMut) -> Result<()> {
    let from_len = match &env.from {
        Some(f) => Some(u16::try_from(f.len()).map_err(|_| Error::TooLarge {
            size: f.len(),
            limit: u16::MAX as usize,
        })?),
        None => None,
    };
    let payload_len = u32::try_from(env.payload.len()).map_err(|_| Error::TooLarge {
        size: env.payload.len(),
        limit: u32::MAX as usize,
    })?;
    let mut flags = 0;
    if env.kind == Kind::Ephemeral {
        flags |= F_EPHEMERAL;
    }
    if from_len.is_some() {
        flags |= F_FROM;
    }
    if let Some(c) = env.cursor {
        flags |= F_CURSOR;
        if c.epoch != 0 {
            flags |= F_EPOCH;
        }
    }
    if env.stamp.is_some() {
        flags |= F_STAMP;
    }
    buf.reserve(encoded_len(env));
    buf.put_u8(VERSION);
    buf.put_u8(flags);
    buf.put_slice(&env.id.to_bytes());
    buf.put_u64(env.ts);
    let room = env.room.as_str().as_bytes();
    // Room::new guarantees at most 128 bytes.
    buf.put_u8(room.len() as u8);
    buf.put_slice(room);
    if let (Some(len), Some(from)) = (from_len, &env.from) {
        buf.put_u16(len);
        buf.put_slice(from.as_bytes());
    }
    if let Some(c) = env.cursor {
        buf.put_u32(c.partition);
        buf.put_u64(c.offset);
        if c.epoch != 0 {
            buf.put_u32(c.epoch);
        }
    }
    if let Some(stamp) = env.stamp {
        buf.put_u64(stamp.ticket.epoch);
        buf.put_u64(stamp.ticket.n);
        buf.put_u64(stamp.horizon);
    }
    buf.put_u32(payload_len);
    buf.put_slice(&env.payload);
    Ok(())
}

/// Encodes `env` into a new buffer.
pub fn encode(env: &Envelope) -> Result<Bytes> {
    let mut buf = BytesMut::with_capacity(encoded_len(env));
    encode_into(env, &mut buf)?;
    Ok(buf.freeze())
}

/// A bounds-checked reader over the input.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or(Error::Decode(what))?;
        let s = self.buf.get(self.pos..end).ok_or(Error::Decode(what))?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }
}

/// Decodes one envelope. The payload is a zero-copy slice of `bytes`.
pub fn decode(bytes: &Bytes) -> Result<Envelope> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let [version] = r.array::<1>("truncated header")?;
    if version != VERSION {
        return Err(Error::Decode("unknown encoding version"));
    }
    let [flags] = r.array::<1>("truncated header")?;
    if flags & !F_KNOWN != 0 {
        return Err(Error::Decode("unknown flags"));
    }
    if flags & F_EPOCH != 0 && flags & F_CURSOR == 0 {
        return Err(Error::Decode("epoch without a cursor"));
    }
    let id = MessageId::from_u128(u128::from_be_bytes(r.array("truncated id")?));
    let ts = u64::from_be_bytes(r.array("truncated timestamp")?);
    let [room_len] = r.array::<1>("truncated room")?;
    let room = std::str::from_utf8(r.take(room_len.into(), "truncated room")?)
        .map_err(|_| Error::Decode("room is not UTF-8"))?;
    let room = Room::new(room).map_err(|_| Error::Decode("invalid room name"))?;
    let from = if flags & F_FROM != 0 {
        let len = u16::from_be_bytes(r.array("truncated sender")?);
        let s = std::str::from_utf8(r.take(len.into(), "truncated sender")?)
            .map_err(|_| Error::Decode("sender is not UTF-8"))?;
        Some(Arc::<str>::from(s))
    } else {
        None
    };
    let cursor = if flags & F_CURSOR != 0 {
        let partition = u32::from_be_bytes(r.array("truncated cursor")?);
        let offset = u64::from_be_bytes(r.array("truncated cursor")?);
        let epoch = if flags & F_EPOCH != 0 {
            match u32::from_be_bytes(r.array("truncated cursor epoch")?) {
                // Written without the bit; one encoding per envelope.
                0 => return Err(Error::Decode("zero cursor epoch")),
                e => e,
            }
        } else {
            0
        };
        Some(Cursor::with_epoch(partition, offset, epoch))
    } else {
        None
    };
    let stamp = if flags & F_STAMP != 0 {
        let epoch = u64::from_be_bytes(r.array("truncated stamp")?);
        let n = u64::from_be_bytes(r.array("truncated stamp")?);
        let horizon = u64::from_be_bytes(r.array("truncated stamp")?);
        if epoch == 0 {
            return Err(Error::Decode("zero ticket epoch"));
        }
        Some(Stamp {
            ticket: Ticket { epoch, n },
            horizon,
        })
    } else {
        None
    };
    let len = u32::from_be_bytes(r.array("truncated payload length")?);
    let start = r.pos;
    r.take(len as usize, "truncated payload")?;
    if r.pos != bytes.len() {
        return Err(Error::Decode("trailing bytes"));
    }
    Ok(Envelope {
        id,
        room,
        kind: if flags & F_EPHEMERAL != 0 {
            Kind::Ephemeral
        } else {
            Kind::Durable
        },
        from,
        ts,
        payload: bytes.slice(start..r.pos),
        cursor,
        stamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Envelope {
        Envelope::new(Room::new("general").expect("valid room name"), "hello").with_from("alice")
    }

    #[test]
    fn round_trip_all_shapes() {
        let mut e = sample();
        for (from, cursor, kind) in [
            (None, None, Kind::Durable),
            (Some("bob"), Some(Cursor::new(7, 1 << 40)), Kind::Durable),
            (Some(""), None, Kind::Ephemeral),
            (None, Some(Cursor::new(0, 0)), Kind::Ephemeral),
            (
                Some("eve"),
                Some(Cursor::with_epoch(2, 9, 0xdead_beef)),
                Kind::Durable,
            ),
        ] {
            e.from = from.map(Arc::from);
            e.cursor = cursor;
            e.kind = kind;
            for stamp in [
                None,
                Some(Stamp {
                    ticket: Ticket { epoch: 1, n: 0 },
                    horizon: 0,
                }),
                Some(Stamp {
                    ticket: Ticket {
                        epoch: 1_764_800_000_123_456,
                        n: u64::MAX,
                    },
                    horizon: 42,
                }),
            ] {
                e.stamp = stamp;
                let b = encode(&e).unwrap_or_else(|err| panic!("{err}"));
                assert_eq!(b.len(), encoded_len(&e));
                assert_eq!(b[0], VERSION);
                assert_eq!(decode(&b).ok(), Some(e.clone()));
            }
        }
    }

    /// An envelope without a stamp encodes exactly as before the stamp bit existed; a stamp of
    /// epoch 0 (never handed out) is refused.
    #[test]
    fn the_stamp_is_an_optional_block() {
        let plain = sample();
        let mut stamped = plain.clone();
        stamped.stamp = Some(Stamp {
            ticket: Ticket { epoch: 9, n: 3 },
            horizon: 5,
        });
        let a = encode(&plain).expect("encodes");
        let b = encode(&stamped).expect("encodes");
        assert_eq!(a[1] & F_STAMP, 0);
        assert_eq!(b[1], a[1] | F_STAMP);
        assert_eq!(b.len(), a.len() + 24);
        let mut v = b.to_vec();
        // The stamp block sits right before the payload length and the payload.
        let at = v.len() - 4 - plain.payload.len() - 24;
        v[at..at + 8].copy_from_slice(&0u64.to_be_bytes());
        assert!(matches!(
            decode(&Bytes::from(v)),
            Err(Error::Decode("zero ticket epoch"))
        ));
    }

    #[test]
    fn rejects_bad_input() {
        let b = encode(&sample()).expect("encodes");
        assert!(decode(&Bytes::new()).is_err());
        for cut in 0..b.len() {
            assert!(
                decode(&b.slice(..cut)).is_err(),
                "truncated at {cut} accepted"
            );
        }
        let mut v = b.to_vec();
        v.push(0);
        assert!(decode(&Bytes::from(v)).is_err(), "trailing byte accepted");
        let mut v = b.to_vec();
        v[0] = 2;
        assert!(matches!(
            decode(&Bytes::from(v)),
            Err(Error::Decode("unknown encoding version"))
        ));
        let mut v = b.to_vec();
        v[1] |= 0x80;
        assert!(decode(&Bytes::from(v)).is_err(), "unknown flag accepted");
        let mut v = b.to_vec();
        v[1] |= F_EPOCH;
        assert!(
            decode(&Bytes::from(v)).is_err(),
            "epoch without cursor accepted"
        );
    }

    /// A cursor of an unknown epoch encodes exactly as before the epoch bit existed, so frames
    /// without epochs stay readable by older decoders; with one, the bit and 4 bytes are added.
    #[test]
    fn epoch_zero_keeps_the_old_layout() {
        let mut e = sample();
        e.cursor = Some(Cursor::new(1, 2));
        let old = encode(&e).expect("encodes");
        assert_eq!(old[1] & F_EPOCH, 0);
        e.cursor = Some(Cursor::new(1, 2).in_epoch(5));
        let new = encode(&e).expect("encodes");
        assert_eq!(new[1], old[1] | F_EPOCH);
        assert_eq!(new.len(), old.len() + 4);
        assert_eq!(decode(&new).ok().and_then(|d| d.cursor), e.cursor);
        // The same bytes with the epoch zeroed are refused (not a second encoding of epoch 0).
        let mut v = new.to_vec();
        let at = v.len() - e.payload.len() - 4 - 4;
        v[at..at + 4].copy_from_slice(&[0; 4]);
        assert!(decode(&Bytes::from(v)).is_err());
    }

    fn arb_envelope() -> impl Strategy<Value = Envelope> {
        (
            any::<u128>(),
            "[A-Za-z0-9._:-]{1,128}",
            any::<bool>(),
            proptest::option::of(".{0,40}"),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..512),
            proptest::option::of((any::<u32>(), any::<u64>(), any::<u32>())),
            proptest::option::of((1..u64::MAX, any::<u64>(), any::<u64>())),
        )
            .prop_map(
                |(id, room, eph, from, ts, payload, cursor, stamp)| Envelope {
                    id: MessageId::from_u128(id),
                    room: Room::new(room).expect("valid room name"),
                    kind: if eph { Kind::Ephemeral } else { Kind::Durable },
                    from: from.map(Arc::from),
                    ts,
                    payload: Bytes::from(payload),
                    cursor: cursor.map(|(p, o, e)| Cursor::with_epoch(p, o, e)),
                    stamp: stamp.map(|(epoch, n, horizon)| Stamp {
                        ticket: Ticket { epoch, n },
                        horizon,
                    }),
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn decode_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&Bytes::from(bytes));
        }

        /// Arbitrary bytes behind a valid version byte and flags (to reach deeper branches) never
        /// panic the decoder either.
        #[test]
        fn decode_arbitrary_body_never_panics(flags in 0u8..16, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut v = vec![VERSION, flags];
            v.extend(body);
            let _ = decode(&Bytes::from(v));
        }

        /// Every envelope survives a round trip, and corrupting one byte never panics.
        #[test]
        fn round_trip_and_corruption(env in arb_envelope(), at in any::<prop::sample::Index>(), x in any::<u8>()) {
            let b = encode(&env).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(decode(&b).ok(), Some(env));
            let mut v = b.to_vec();
            let i = at.index(v.len());
            v[i] ^= x;
            let _ = decode(&Bytes::from(v));
        }
    }
}
