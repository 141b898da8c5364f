//! Channel and key names, and the frame written to Redis.
//!
//! See the crate docs ("How it works") for the layout; this module is its single source.

use bytes::Bytes;
use chatbus_core::backend::codec;
use chatbus_core::{Cursor, Envelope, Result, Room};

/// Names of the Redis channels and keys of one deployment (one prefix).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    // "<prefix>:{", shared by every name so that parsing a channel is a prefix check.
    head: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            head: format!("{prefix}:{{"),
        }
    }

    /// `<prefix>:{<room>}`: the pub/sub channel of a room. The braces make the room the Redis
    /// Cluster hash tag, so the channel and the room's keys live in one slot.
    pub(crate) fn channel(&self, room: &Room) -> String {
        format!("{}{}}}", self.head, room.as_str())
    }

    /// `<prefix>:{<room>}:log`: the history stream of a room.
    pub(crate) fn stream(&self, room: &Room) -> String {
        format!("{}{}}}:log", self.head, room.as_str())
    }

    /// `<prefix>:{<room>}:seq`: the counter that numbers a room's durable messages.
    pub(crate) fn seq(&self, room: &Room) -> String {
        format!("{}{}}}:seq", self.head, room.as_str())
    }

    /// `<prefix>:{*}`: matches the channel of every room (and nothing of another prefix, since
    /// room names contain no braces).
    pub(crate) fn pattern(&self) -> String {
        format!("{}*}}", self.head)
    }

    /// The room name inside a channel name of this prefix.
    pub(crate) fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&self.head)?.strip_suffix('}')
    }
}

/// Encodes a durable envelope for the publish script: with a zero cursor whose 8-byte offset
/// the script overwrites with the room's sequence number. Returns the bytes and the 0-based
/// position of that offset.
pub(crate) fn encode_for_script(env: &Envelope) -> Result<(Bytes, usize)> {
    let mut env = env.clone();
    env.cursor = Some(Cursor::new(0, 0));
    let bytes = codec::encode(&env)?;
    // Codec v1 ends with: cursor (u32 partition, u64 offset), u32 payload length, payload.
    let pos = bytes.len() - env.payload.len() - 4 - 8;
    Ok((bytes, pos))
}

/// The publish script of the history window: numbers the message, appends it to the room's
/// stream (trimmed to the window) and publishes the very same bytes, atomically, so that
/// subscribers see cursors in stream order and every cursor they see is in the stream.
///
/// KEYS[1] counter, KEYS[2] stream; ARGV[1] channel, ARGV[2] envelope (zero cursor),
/// ARGV[3] position of the cursor offset, ARGV[4] window length. Returns the sequence number.
pub(crate) const PUBLISH_SCRIPT: &str = r"
local seq = redis.call('INCR', KEYS[1])
local n = seq
local b = {}
for i = 8, 1, -1 do
  b[i] = string.char(n % 256)
  n = math.floor(n / 256)
end
local pos = tonumber(ARGV[3])
local env = ARGV[2]
local frame = string.sub(env, 1, pos) .. table.concat(b) .. string.sub(env, pos + 9)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], string.format('%d-0', seq), 'e', frame)
redis.call('PUBLISH', ARGV[1], frame)
return seq
";

/// The stream field holding the encoded envelope.
pub(crate) const FIELD: &str = "e";

/// The stream entry id of sequence number `seq`.
pub(crate) fn entry_id(seq: u64) -> String {
    format!("{seq}-0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() -> Result<()> {
        let k = Keys::new("app");
        let r = Room::new("general")?;
        assert_eq!(k.channel(&r), "app:{general}");
        assert_eq!(k.stream(&r), "app:{general}:log");
        assert_eq!(k.seq(&r), "app:{general}:seq");
        assert_eq!(k.pattern(), "app:{*}");
        assert_eq!(k.room_of_channel("app:{general}"), Some("general"));
        assert_eq!(k.room_of_channel("app2:{general}"), None);
        assert_eq!(k.room_of_channel("app:{general"), None);
        Ok(())
    }

    /// The position is where the codec keeps the cursor offset: splicing a value there (as
    /// the script does) decodes to that cursor.
    #[test]
    fn script_splice_position() -> Result<()> {
        for from in [None, Some("alice")] {
            let mut env = Envelope::new(Room::new("r.1")?, "payload bytes");
            env.from = from.map(Into::into);
            let (bytes, pos) = encode_for_script(&env)?;
            let seq: u64 = 0x0102_0304_0506_0708;
            let mut v = bytes.to_vec();
            v[pos..pos + 8].copy_from_slice(&seq.to_be_bytes());
            let got = codec::decode(&Bytes::from(v))?;
            assert_eq!(got.cursor, Some(Cursor::new(0, seq)));
            assert_eq!((got.id, got.payload), (env.id, env.payload));
        }
        Ok(())
    }
}
