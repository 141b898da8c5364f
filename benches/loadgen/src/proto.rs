//! What the load generator says and recognises in each protocol: chatbus protocol v1 (JSON
//! frames), Socket.IO v5 over Engine.IO v4 (the peer stack) and the floor's bare frames
//! (`benches/floor`), and the message body that carries the sender, its sequence number and
//! the send time.
//!
//! Received frames are not parsed as JSON on the hot path: a chat message is recognised by
//! finding `"body":"` (chatbus) or `"message":"` (Socket.IO) with memchr, and only the body's
//! fields are read. Bodies are made of ASCII digits, `:` and `x`, so they never contain an
//! escape and end at the next `"`. Rare frames (errors) are parsed with serde_json.

use std::fmt::Write as _;
use std::sync::OnceLock;

use memchr::memmem::Finder;
use serde::{Deserialize, Serialize};

/// The client protocol spoken to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Protocol {
    /// chatbus protocol v1: JSON frames on `/ws`, rooms, acks.
    Chatbus,
    /// Socket.IO v5 over raw WebSocket (the peer stack): one implicit room, no acks.
    Socketio,
    /// The floor (`benches/floor`): a frame's payload is the bare body, forwarded as it is to
    /// every connection; one implicit room, no acks; the server says `welcome` when ready.
    Floor,
}

/// A decoded message body: `inst:sender:seq:ts_us:padding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Body {
    /// The run's random instance number (frames of other runs are ignored).
    pub(crate) inst: u64,
    /// Global sender number.
    pub(crate) sender: u32,
    /// Per-sender sequence number, from 0.
    pub(crate) seq: u32,
    /// Send time, Unix microseconds.
    pub(crate) ts_us: u64,
}

/// Writes the body of a message, padded with `x` to at least `size` bytes.
pub(crate) fn write_body(out: &mut String, b: Body, size: usize) {
    let start = out.len();
    // Writing into a String cannot fail.
    let _ = write!(out, "{}:{}:{}:{}:", b.inst, b.sender, b.seq, b.ts_us);
    let len = out.len() - start;
    for _ in len..size {
        out.push('x');
    }
}

fn digits(s: &[u8]) -> Option<(u64, &[u8])> {
    let end = s.iter().position(|&c| !c.is_ascii_digit())?;
    if end == 0 || end > 19 || s[end] != b':' {
        return None;
    }
    let mut v = 0u64;
    for &c in &s[..end] {
        v = v * 10 + u64::from(c - b'0');
    }
    Some((v, &s[end + 1..]))
}

/// Parses the start of a body (the padding is not looked at).
pub(crate) fn parse_body(s: &[u8]) -> Option<Body> {
    let (inst, s) = digits(s)?;
    let (sender, s) = digits(s)?;
    let (seq, s) = digits(s)?;
    let (ts_us, _) = digits(s)?;
    Some(Body {
        inst,
        sender: u32::try_from(sender).ok()?,
        seq: u32::try_from(seq).ok()?,
        ts_us,
    })
}

/// The name of a room of the run.
pub(crate) fn room_name(room: u32) -> String {
    format!("lg-{room}")
}

/// A chatbus `join` request.
pub(crate) fn chatbus_join(room: u32) -> Vec<u8> {
    format!(r#"{{"type":"join","room":"{}"}}"#, room_name(room)).into_bytes()
}

/// Appends a chatbus `send` request for `body` to `out`; the sequence number is the client id,
/// so an error answer says which message it refused.
pub(crate) fn chatbus_send(out: &mut String, room: u32, b: Body, size: usize) {
    let _ = write!(out, r#"{{"type":"send","room":"lg-{room}","body":""#);
    write_body(out, b, size);
    let _ = write!(out, r#"","client_id":{}}}"#, b.seq);
}

/// Appends a Socket.IO `event:message` emit for `body` to `out`.
pub(crate) fn socketio_send(out: &mut String, b: Body, size: usize) {
    out.push_str(r#"42["event:message",""#);
    write_body(out, b, size);
    out.push_str(r#""]"#);
}

/// Appends a floor message (the body alone) to `out`.
pub(crate) fn floor_send(out: &mut String, b: Body, size: usize) {
    write_body(out, b, size);
}

/// What a received text frame is, as far as the load generator cares.
#[derive(Debug, PartialEq)]
pub(crate) enum Incoming<'a> {
    /// A chat message with this body (not yet parsed).
    Message(&'a [u8]),
    /// chatbus `welcome`.
    Welcome,
    /// chatbus `joined`.
    Joined,
    /// chatbus `ack`.
    Ack,
    /// chatbus `error`: code, and the client id (our sequence number) when it names a send.
    Error(String, Option<u32>),
    /// chatbus `lagged`: the server says this client fell behind and skipped messages.
    Lagged,
    /// Engine.IO `open` packet.
    EioOpen,
    /// Socket.IO `CONNECT` answer.
    SioConnected,
    /// Engine.IO `ping`: must be answered with `3`.
    EioPing,
    /// Engine.IO `close`, Socket.IO `DISCONNECT` or `CONNECT_ERROR`.
    SioClosed,
    /// Anything else (presence, typing, pongs, ...).
    Other,
}

fn finder(
    cell: &'static OnceLock<Finder<'static>>,
    needle: &'static [u8],
) -> &'static Finder<'static> {
    cell.get_or_init(|| Finder::new(needle))
}

/// The `type` of a chatbus frame: every server frame starts with `{"type":"`.
fn chatbus_type(text: &[u8]) -> Option<&[u8]> {
    let rest = text.strip_prefix(br#"{"type":""#)?;
    let end = memchr::memchr(b'"', rest)?;
    Some(&rest[..end])
}

/// The string after `needle` up to the next `"`.
fn string_after<'a>(text: &'a [u8], f: &Finder<'_>) -> Option<&'a [u8]> {
    let at = f.find(text)? + f.needle().len();
    let rest = &text[at..];
    let end = memchr::memchr(b'"', rest)?;
    Some(&rest[..end])
}

#[derive(Deserialize)]
struct ErrorFrame {
    #[serde(default)]
    code: String,
    #[serde(default)]
    client_id: Option<serde_json::Value>,
}

/// Classifies a chatbus server frame.
pub(crate) fn classify_chatbus(text: &[u8]) -> Incoming<'_> {
    static BODY: OnceLock<Finder<'static>> = OnceLock::new();
    let Some(ty) = chatbus_type(text) else {
        return Incoming::Other;
    };
    match ty {
        b"message" => match string_after(text, finder(&BODY, br#""body":""#)) {
            Some(body) => Incoming::Message(body),
            None => Incoming::Other,
        },
        b"ack" => Incoming::Ack,
        b"welcome" => Incoming::Welcome,
        b"joined" => Incoming::Joined,
        b"lagged" => Incoming::Lagged,
        b"error" => match serde_json::from_slice::<ErrorFrame>(text) {
            Ok(e) => {
                let cid = e
                    .client_id
                    .and_then(|v| v.as_u64())
                    .and_then(|v| u32::try_from(v).ok());
                Incoming::Error(e.code, cid)
            }
            Err(_) => Incoming::Error("unparsable".into(), None),
        },
        _ => Incoming::Other,
    }
}

/// Classifies an Engine.IO / Socket.IO text frame.
pub(crate) fn classify_socketio(text: &[u8]) -> Incoming<'_> {
    static MSG: OnceLock<Finder<'static>> = OnceLock::new();
    match text {
        [b'4', b'2', ..] => match string_after(text, finder(&MSG, br#""message":""#)) {
            Some(body) => Incoming::Message(body),
            None => Incoming::Other,
        },
        [b'2'] => Incoming::EioPing,
        [b'0', b'{', ..] => Incoming::EioOpen,
        [b'4', b'0', ..] => Incoming::SioConnected,
        [b'1', ..] | [b'4', b'1', ..] | [b'4', b'4', ..] => Incoming::SioClosed,
        _ => Incoming::Other,
    }
}

/// Classifies a floor frame: its greeting, or a body as the floor forwards it.
pub(crate) fn classify_floor(text: &[u8]) -> Incoming<'_> {
    match text {
        b"welcome" => Incoming::Welcome,
        [b'0'..=b'9', ..] => Incoming::Message(text),
        _ => Incoming::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Body {
        Body {
            inst: 77,
            sender: 3,
            seq: 12,
            ts_us: 1_700_000_000_123_456,
        }
    }

    #[test]
    fn body_round_trip_and_padding() {
        let mut s = String::new();
        write_body(&mut s, body(), 100);
        assert_eq!(s.len(), 100);
        assert_eq!(parse_body(s.as_bytes()), Some(body()));
        let mut short = String::new();
        write_body(&mut short, body(), 1);
        assert_eq!(parse_body(short.as_bytes()), Some(body()));
        assert_eq!(parse_body(b"1:2:3"), None);
        assert_eq!(parse_body(b"a:2:3:4:"), None);
        assert_eq!(parse_body(b"1:99999999999:3:4:"), None);
    }

    #[test]
    fn classifies_chatbus_frames() {
        let mut send = String::new();
        chatbus_send(&mut send, 4, body(), 40);
        let v: serde_json::Value = serde_json::from_str(&send).expect("send is JSON");
        assert_eq!(v["room"], "lg-4");
        assert_eq!(v["client_id"], 12);
        let msg = format!(
            r#"{{"type":"message","room":"lg-4","id":"x","from":"u","body":{},"ts":1,"cursor":null}}"#,
            v["body"]
        );
        match classify_chatbus(msg.as_bytes()) {
            Incoming::Message(b) => assert_eq!(parse_body(b), Some(body())),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            classify_chatbus(
                br#"{"type":"error","code":"rate_limited","message":"m","client_id":9}"#
            ),
            Incoming::Error("rate_limited".into(), Some(9))
        );
        assert_eq!(
            classify_chatbus(br#"{"type":"ack","client_id":1}"#),
            Incoming::Ack
        );
        assert_eq!(
            classify_chatbus(br#"{"type":"presence","room":"a","online":["body"]}"#),
            Incoming::Other
        );
    }

    #[test]
    fn classifies_socketio_frames() {
        let mut send = String::new();
        socketio_send(&mut send, body(), 50);
        assert!(send.starts_with(r#"42["event:message","77:3:12:"#));
        let echoed = send.replacen(r#""event:message","#, r#""message",{"message":"#, 1);
        let echoed = echoed.replacen("\"]", "\"}]", 1);
        match classify_socketio(echoed.as_bytes()) {
            Incoming::Message(b) => assert_eq!(parse_body(b), Some(body())),
            other => panic!("{other:?}"),
        }
        assert_eq!(classify_socketio(b"2"), Incoming::EioPing);
        assert_eq!(classify_socketio(br#"0{"sid":"a"}"#), Incoming::EioOpen);
        assert_eq!(
            classify_socketio(br#"40{"sid":"b"}"#),
            Incoming::SioConnected
        );
        assert_eq!(classify_socketio(b"41"), Incoming::SioClosed);
    }

    #[test]
    fn classifies_floor_frames() {
        let mut send = String::new();
        floor_send(&mut send, body(), 60);
        assert_eq!(send.len(), 60);
        match classify_floor(send.as_bytes()) {
            Incoming::Message(b) => assert_eq!(parse_body(b), Some(body())),
            other => panic!("{other:?}"),
        }
        assert_eq!(classify_floor(b"welcome"), Incoming::Welcome);
        assert_eq!(classify_floor(b"?"), Incoming::Other);
    }
}
