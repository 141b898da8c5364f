//! The few pieces of a WebSocket client (RFC 6455) the load generator needs: the upgrade
//! request, the check of the server's answer, masked client frames and unmasked server frames.
//!
//! Hand-rolled rather than tokio-tungstenite so that thousands of connections share one read
//! buffer and one thread: an idle connection costs a socket and a few dozen bytes here, and a
//! read of many frames is parsed in place without copying each frame into its own message.

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Opcodes this client understands.
pub(crate) const OP_CONT: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// Frames larger than this are a protocol error here: the servers under test never send one,
/// and the bound keeps a broken stream from making us buffer without limit.
pub(crate) const MAX_FRAME: usize = 16 * 1024 * 1024;

/// The GUID of RFC 6455 section 1.3, hashed with the key to prove the server speaks WebSocket.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Key` for a 16-byte nonce.
pub(crate) fn key(nonce: [u8; 16]) -> String {
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

/// The `Sec-WebSocket-Accept` a server must answer `key` with.
pub(crate) fn accept_for(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The HTTP/1.1 upgrade request.
pub(crate) fn upgrade_request(host: &str, path_and_query: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// The outcome of looking at the bytes received so far during the handshake.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// The header is not complete yet.
    Partial,
    /// Upgraded; frames start at this offset of the buffer.
    Done(usize),
    /// Refused or not WebSocket: the status line (or what was wrong).
    Failed(String),
}

/// Longest response header accepted: a server answering a handshake with more is broken.
const MAX_HEADER: usize = 16 * 1024;

/// Checks the server's answer to the upgrade request sent with `key`.
pub(crate) fn check_response(buf: &[u8], key: &str) -> Handshake {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_HEADER {
            Handshake::Failed("response header too long".into())
        } else {
            Handshake::Partial
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Handshake::Failed("response header is not UTF-8".into());
    };
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 101") {
        return Handshake::Failed(status.chars().take(80).collect());
    }
    let want = accept_for(key);
    let accepted = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == want
        })
    });
    if !accepted {
        return Handshake::Failed("missing or wrong Sec-WebSocket-Accept".into());
    }
    Handshake::Done(end + 4)
}

/// Appends a masked client frame (FIN set) to `out`.
///
/// The mask only has to be unpredictable to intermediaries that could be poisoned by crafted
/// bytes (RFC 6455 section 10.3); on loopback against our own servers a cheap xorshift key is
/// enough, and it still exercises the server's unmasking exactly as a browser would.
pub(crate) fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(l16) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&l16.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// One server frame, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    pub(crate) fin: bool,
    pub(crate) opcode: u8,
    pub(crate) payload: &'a [u8],
}

/// The result of parsing the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed<'a> {
    /// A complete frame and the bytes it took.
    Frame(Frame<'a>, usize),
    /// More bytes are needed.
    Partial,
    /// The stream is not valid WebSocket from a server (why).
    Invalid(&'static str),
}

/// Parses one server frame at the start of `buf`.
pub(crate) fn parse_frame(buf: &[u8]) -> Parsed<'_> {
    if buf.len() < 2 {
        return Parsed::Partial;
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        // No extension was negotiated, so the reserved bits must be clear.
        return Parsed::Invalid("reserved bits set");
    }
    if b1 & 0x80 != 0 {
        return Parsed::Invalid("masked frame from server");
    }
    let (len, mut pos) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Parsed::Partial;
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Parsed::Partial;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if len > MAX_FRAME as u64 {
        return Parsed::Invalid("frame larger than 16 MiB");
    }
    let len = len as usize;
    if buf.len() < pos + len {
        return Parsed::Partial;
    }
    let payload = &buf[pos..pos + len];
    pos += len;
    Parsed::Frame(
        Frame {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            payload,
        },
        pos,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_accept_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn round_trip_lengths() {
        for len in [0usize, 5, 125, 126, 65_535, 65_536] {
            let payload = vec![b'a'; len];
            let mut out = Vec::new();
            write_frame(&mut out, OP_TEXT, &payload, [1, 2, 3, 4]);
            // Unmask as a server would, then re-emit unmasked to test the reader.
            let hdr = match len {
                0..=125 => 2,
                126..=65_535 => 4,
                _ => 10,
            };
            let mask = [out[hdr], out[hdr + 1], out[hdr + 2], out[hdr + 3]];
            let body: Vec<u8> = out[hdr + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i & 3])
                .collect();
            assert_eq!(body, payload);
            let mut server = out[..hdr].to_vec();
            server[1] &= 0x7f;
            server.extend_from_slice(&body);
            server.extend_from_slice(b"rest");
            match parse_frame(&server) {
                Parsed::Frame(f, used) => {
                    assert!(f.fin);
                    assert_eq!(f.opcode, OP_TEXT);
                    assert_eq!(f.payload, &payload[..]);
                    assert_eq!(used, server.len() - 4);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(parse_frame(&server[..server.len() - 5]), Parsed::Partial);
        }
    }

    #[test]
    fn handshake_checks() {
        let k = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
                   sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(check_response(ok, k), Handshake::Done(ok.len() - 2));
        assert_eq!(check_response(&ok[..20], k), Handshake::Partial);
        assert!(matches!(
            check_response(b"HTTP/1.1 429 Too Many\r\n\r\n", k),
            Handshake::Failed(s) if s.contains("429")
        ));
        assert!(matches!(
            check_response(b"HTTP/1.1 101 OK\r\nsec-websocket-accept: x\r\n\r\n", k),
            Handshake::Failed(_)
        ));
    }
}
