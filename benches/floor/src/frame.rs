//! Client frames in, server frames out. The header is parsed by tungstenite's `FrameHeader`
//! (so length forms, reserved bits and opcodes are checked by a well-used parser), straight
//! from the bytes read; the payload is unmasked into the outgoing frame, which is built once
//! per message and then shared by every connection it goes to.

use std::io::Cursor;

use bytes::{BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Largest client frame payload accepted (the load generator's are ~100 bytes).
pub(crate) const MAX_PAYLOAD: u64 = 64 * 1024;

/// What a client frame asks of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A complete text or binary message: fan it out.
    Message,
    /// Answer with a pong carrying the same payload.
    Ping,
    /// Nothing to do.
    Pong,
    /// The client closes: answer and end the connection.
    Close,
}

/// One complete client frame at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientFrame {
    pub(crate) kind: Kind,
    /// The opcode to send it on with (text or binary; the control opcode for the rest).
    pub(crate) opcode: OpCode,
    /// Offset and length of the (still masked) payload in the buffer.
    pub(crate) at: usize,
    pub(crate) len: usize,
    pub(crate) mask: [u8; 4],
    /// Bytes of the buffer the frame took.
    pub(crate) used: usize,
}

/// The outcome of looking at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// Not a whole frame yet.
    Partial,
    Frame(ClientFrame),
    /// A protocol violation the floor does not put up with: the connection ends.
    Invalid(&'static str),
}

/// Parses the frame at the start of `buf`.
pub(crate) fn parse(buf: &[u8]) -> Parsed {
    let mut cur = Cursor::new(buf);
    let (header, len) = match FrameHeader::parse(&mut cur) {
        Ok(Some(h)) => h,
        Ok(None) => return Parsed::Partial,
        Err(_) => return Parsed::Invalid("bad frame header"),
    };
    if len > MAX_PAYLOAD {
        return Parsed::Invalid("frame too large");
    }
    let Some(mask) = header.mask else {
        return Parsed::Invalid("unmasked client frame");
    };
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Parsed::Invalid("reserved bits set");
    }
    let at = cur.position() as usize;
    let len = len as usize;
    if buf.len() < at + len {
        return Parsed::Partial;
    }
    let kind = match header.opcode {
        // Fragmented messages are legal WebSocket but no client of the benchmarks sends them;
        // a floor that reassembled them would only be slower.
        OpCode::Data(Data::Text | Data::Binary) if header.is_final => Kind::Message,
        OpCode::Data(_) => return Parsed::Invalid("fragmented messages are not supported"),
        OpCode::Control(Control::Ping) => Kind::Ping,
        OpCode::Control(Control::Pong) => Kind::Pong,
        OpCode::Control(Control::Close) => Kind::Close,
        OpCode::Control(_) => return Parsed::Invalid("reserved opcode"),
    };
    Parsed::Frame(ClientFrame {
        kind,
        opcode: header.opcode,
        at,
        len,
        mask,
        used: at + len,
    })
}

/// The server frame (unmasked, final) carrying `masked` unmasked with `mask`: encoded once,
/// shared by every connection that gets it.
pub(crate) fn server_frame(opcode: OpCode, masked: &[u8], mask: [u8; 4]) -> Bytes {
    let header = FrameHeader {
        is_final: true,
        opcode,
        mask: None,
        ..FrameHeader::default()
    };
    let len = masked.len() as u64;
    let mut w = BytesMut::with_capacity(header.len(len) + masked.len()).writer();
    // Writing into a BytesMut grows it; it cannot fail.
    let _ = header.format(len, &mut w);
    let mut out = w.into_inner();
    let start = out.len();
    out.extend_from_slice(masked);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
    out.freeze()
}

/// The greeting: a text frame `welcome`, sent once the connection receives the fan-out.
pub(crate) fn welcome() -> Bytes {
    server_frame(OpCode::Data(Data::Text), b"welcome", [0; 4])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser or the load generator writes it.
    fn client(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = vec![first];
        if payload.len() < 126 {
            v.push(0x80 | payload.len() as u8);
        } else {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        v
    }

    #[test]
    fn text_frame_round_trip() {
        let mask = [1, 2, 3, 4];
        let body = b"77:3:12:1700000000123456:xxxx";
        let mut buf = client(0x81, body, mask);
        buf.extend_from_slice(&client(0x89, b"p", mask)[..3]);
        let Parsed::Frame(f) = parse(&buf) else {
            panic!("no frame");
        };
        assert_eq!(f.kind, Kind::Message);
        assert_eq!(f.used, 2 + 4 + body.len());
        let out = server_frame(f.opcode, &buf[f.at..f.at + f.len], f.mask);
        assert_eq!(out[0], 0x81);
        assert_eq!(usize::from(out[1]), body.len());
        assert_eq!(&out[2..], body);
        // The rest of the buffer is a partial ping.
        assert_eq!(parse(&buf[f.used..]), Parsed::Partial);
    }

    #[test]
    fn long_frames_and_refusals() {
        let body = vec![b'x'; 300];
        let buf = client(0x82, &body, [9, 8, 7, 6]);
        let Parsed::Frame(f) = parse(&buf) else {
            panic!("no frame");
        };
        let out = server_frame(f.opcode, &buf[f.at..f.at + f.len], f.mask);
        assert_eq!(&out[..4], &[0x82, 126, 1, 44]);
        assert_eq!(&out[4..], &body[..]);
        assert_eq!(parse(&buf[..buf.len() - 1]), Parsed::Partial);
        // Unmasked, fragmented and reserved-bit frames end the connection.
        assert!(matches!(parse(&[0x81, 1, b'a']), Parsed::Invalid(_)));
        assert!(matches!(
            parse(&client(0x01, b"a", [0; 4])),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse(&client(0xC1, b"a", [0; 4])),
            Parsed::Invalid(_)
        ));
        let Parsed::Frame(close) = parse(&client(0x88, &1000u16.to_be_bytes(), [5; 4])) else {
            panic!("no close");
        };
        assert_eq!(close.kind, Kind::Close);
        assert_eq!(&welcome()[..], b"\x81\x07welcome");
    }
}
