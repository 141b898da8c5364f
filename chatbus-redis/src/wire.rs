//! Channel and key names, and the frame written to Redis.
//!
//! See the crate docs ("How it works") for the layout; this module is its single source.

use bytes::Bytes;
use chatbus_core::backend::codec;
use chatbus_core::{Cursor, Envelope, Error, ResetReason, Result, Room};

/// Names of the Redis channels and keys of one deployment (one prefix).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    // "<prefix>:{", shared by every name so that parsing a channel is a prefix check.
    head: String,
    // "<prefix>:all": see `broadcast`.
    broadcast: String,
    // "<prefix>:leases": see `leases`.
    leases: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            head: format!("{prefix}:{{"),
            broadcast: format!("{prefix}:all"),
            leases: format!("{prefix}:leases"),
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

    /// `<prefix>:{<room>}:meta`: the hash of the room's log, fields `seq` (the counter that
    /// numbers its durable messages) and `epoch` (drawn when the counter is created). One key
    /// for both, so that whatever loses one (`FLUSHALL`, eviction, a failover to a replica
    /// that missed the writes) loses the other: a sequence that starts over always comes with
    /// a new epoch.
    pub(crate) fn meta(&self, room: &Room) -> String {
        format!("{}{}}}:meta", self.head, room.as_str())
    }

    /// `<prefix>:{<room>}:seq`: the counter of the layout before epochs (a plain string). The
    /// publish script moves it into [`meta`](Self::meta) the first time it runs for a room.
    pub(crate) fn legacy_seq(&self, room: &Room) -> String {
        format!("{}{}}}:seq", self.head, room.as_str())
    }

    /// `<prefix>:{<room>}:tk`: the room's ticket counter (`tickets.rs`), fields `e` (epoch)
    /// and `n`.
    pub(crate) fn tickets(&self, room: &Room) -> String {
        format!("{}{}}}:tk", self.head, room.as_str())
    }

    /// `<prefix>:{<room>}:open`: the room's open tickets (`tickets.rs`), scored by when they
    /// were taken.
    pub(crate) fn open_tickets(&self, room: &Room) -> String {
        format!("{}{}}}:open", self.head, room.as_str())
    }

    /// `<prefix>:leases`: the instances' leases (`tickets.rs`), a hash of instance to expiry.
    /// No braces: no room's key or channel is ever named like it.
    pub(crate) fn leases(&self) -> &str {
        &self.leases
    }

    /// `<prefix>:{*}`: matches the channel of every room (and nothing of another prefix, since
    /// room names contain no braces).
    pub(crate) fn pattern(&self) -> String {
        format!("{}*}}", self.head)
    }

    /// `<prefix>:all`: in Redis Cluster mode with the broadcast on, every message is also
    /// published (classic `PUBLISH`, which the cluster forwards to every node) on this one
    /// channel, which `Interest::All` subscribes to. It has no hash tag and no braces, so no
    /// room's channel and no pattern subscription of a single Redis ever matches it.
    pub(crate) fn broadcast(&self) -> String {
        self.broadcast.clone()
    }

    /// The room name inside a channel name of this prefix.
    pub(crate) fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&self.head)?.strip_suffix('}')
    }
}

/// Encodes a durable envelope for the publish script: with a placeholder cursor whose 8-byte
/// offset and 4-byte epoch (which follows it) the script overwrites with the room's sequence
/// number and epoch. Returns the bytes and the 0-based position of that offset.
pub(crate) fn encode_for_script(env: &Envelope) -> Result<(Bytes, usize)> {
    let mut env = env.clone();
    // A nonzero placeholder epoch, so that the codec writes the epoch field.
    env.cursor = Some(Cursor::with_epoch(0, 0, u32::MAX));
    let bytes = codec::encode(&env)?;
    // The codec ends with: cursor (u32 partition, u64 offset, u32 epoch), the stamp if any
    // (24 bytes), u32 payload length, payload.
    let stamp = if env.stamp.is_some() { 24 } else { 0 };
    let pos = bytes.len() - env.payload.len() - 4 - stamp - 4 - 8;
    Ok((bytes, pos))
}

/// The head of a room's log as Redis has it now: the last sequence number and the epoch
/// (`None` when the room has no log: never published to, or lost with a flush).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogHead {
    pub(crate) seq: u64,
    /// 0 for a counter of the layout before epochs.
    pub(crate) epoch: u32,
}

/// Whether `c` names a position of the log whose head is `head` (see `Error::CursorReset`).
pub(crate) fn check_cursor(c: Cursor, head: Option<LogHead>) -> Result<()> {
    let reason = match head {
        // No log: every position a message had is gone with it.
        None if c.epoch != 0 => ResetReason::OtherLog,
        None if c.offset > 0 => ResetReason::BeyondEnd,
        None => return Ok(()),
        Some(h) if !c.same_log(&Cursor::with_epoch(0, 0, h.epoch)) => ResetReason::OtherLog,
        Some(h) if c.offset > h.seq => ResetReason::BeyondEnd,
        Some(_) => return Ok(()),
    };
    Err(Error::CursorReset { cursor: c, reason })
}

/// The publish script of the history window: numbers the message, appends it to the room's
/// stream (trimmed to the window) and publishes the very same bytes, atomically, so that
/// subscribers see cursors in stream order and every cursor they see is in the stream.
///
/// The first message of a log creates the room's meta hash with its epoch (a random number
/// the client passes: scripts cannot draw one). A counter of the layout before epochs is
/// moved into it, keeping the stream (its cursors, of epoch 0, stay valid); otherwise a
/// stream left without its counter (evicted alone) belongs to a log that is gone, and is
/// dropped so that the new log's ids start at 1.
///
/// KEYS[1] meta hash, KEYS[2] stream, KEYS[3] legacy counter; ARGV[1] channel, ARGV[2]
/// envelope (placeholder cursor), ARGV[3] position of the cursor offset, ARGV[4] window
/// length, ARGV[5] a fresh epoch, ARGV[6] the publish command (`PUBLISH`, or `SPUBLISH` on a
/// cluster: the channel shares the keys' hash tag, so the script's node owns it), ARGV[7]
/// the broadcast channel to `PUBLISH` on as well (empty: none). Returns `{sequence number,
/// epoch}`.
pub(crate) const PUBLISH_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  local legacy = redis.call('GET', KEYS[3])
  if legacy then
    redis.call('HSET', KEYS[1], 'seq', legacy)
    redis.call('DEL', KEYS[3])
  else
    redis.call('DEL', KEYS[2])
  end
end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[5])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch'))
local function be(v, width)
  local b = {}
  for i = width, 1, -1 do
    b[i] = string.char(v % 256)
    v = math.floor(v / 256)
  end
  return table.concat(b)
end
local pos = tonumber(ARGV[3])
local env = ARGV[2]
local frame = string.sub(env, 1, pos) .. be(seq, 8) .. be(epoch, 4) .. string.sub(env, pos + 13)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], string.format('%d-0', seq), 'e', frame)
redis.call(ARGV[6], ARGV[1], frame)
if ARGV[7] ~= '' then
  redis.call('PUBLISH', ARGV[7], frame)
end
return {seq, epoch}
";

/// The live-only publish on a cluster with the broadcast on: `SPUBLISH` on the room's channel
/// and `PUBLISH` on the broadcast channel, from the room's own master, in one step. From one
/// node, so that the broadcast copies of a room keep the room's order (the cluster bus
/// forwards one node's publishes in order; two publishes of a room sent to two nodes would
/// not be).
///
/// KEYS[1] the room's channel (it routes the script); ARGV[1] envelope, ARGV[2] broadcast
/// channel.
pub(crate) const FANOUT_SCRIPT: &str = r"
redis.call('SPUBLISH', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
";

/// Reads the head of a room's log: `HMGET meta seq epoch` and the legacy counter.
/// KEYS[1] meta hash, KEYS[2] legacy counter. Returns `{seq, epoch}` (`epoch` 0 for a legacy
/// counter) or an empty array when the room has no log.
pub(crate) const HEAD_SCRIPT: &str = r"
local m = redis.call('HMGET', KEYS[1], 'seq', 'epoch')
if m[1] then
  return {tonumber(m[1]), tonumber(m[2] or '0')}
end
local legacy = redis.call('GET', KEYS[2])
if legacy then
  return {tonumber(legacy), 0}
end
return {}
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
        assert_eq!(k.meta(&r), "app:{general}:meta");
        assert_eq!(k.legacy_seq(&r), "app:{general}:seq");
        assert_eq!(k.pattern(), "app:{*}");
        assert_eq!(k.broadcast(), "app:all");
        assert_eq!(k.room_of_channel(&k.broadcast()), None);
        assert_eq!(k.room_of_channel("app:{general}"), Some("general"));
        assert_eq!(k.room_of_channel("app2:{general}"), None);
        assert_eq!(k.room_of_channel("app:{general"), None);
        Ok(())
    }

    /// The position is where the codec keeps the cursor offset: splicing a value there (as
    /// the script does) decodes to that cursor.
    #[test]
    fn script_splice_position() -> Result<()> {
        let stamp = chatbus_core::Stamp {
            ticket: chatbus_core::Ticket { epoch: 3, n: 4 },
            horizon: 5,
        };
        for (from, stamp) in [(None, None), (Some("alice"), None), (None, Some(stamp))] {
            let mut env = Envelope::new(Room::new("r.1")?, "payload bytes");
            env.from = from.map(Into::into);
            env.stamp = stamp;
            let (bytes, pos) = encode_for_script(&env)?;
            let seq: u64 = 0x0102_0304_0506_0708;
            let epoch: u32 = 0x0a0b_0c0d;
            let mut v = bytes.to_vec();
            v[pos..pos + 8].copy_from_slice(&seq.to_be_bytes());
            v[pos + 8..pos + 12].copy_from_slice(&epoch.to_be_bytes());
            let got = codec::decode(&Bytes::from(v))?;
            assert_eq!(got.cursor, Some(Cursor::with_epoch(0, seq, epoch)));
            assert_eq!((got.id, got.payload), (env.id, env.payload));
            assert_eq!(got.stamp, stamp);
        }
        Ok(())
    }

    #[test]
    fn cursors_are_checked_against_the_head_of_the_log() {
        let head = Some(LogHead { seq: 10, epoch: 7 });
        let reason = |c: Cursor, h: Option<LogHead>| match check_cursor(c, h) {
            Err(Error::CursorReset { reason, .. }) => Some(reason),
            _ => None,
        };
        assert_eq!(reason(Cursor::with_epoch(0, 10, 7), head), None);
        assert_eq!(reason(Cursor::new(0, 3), head), None, "legacy cursor");
        assert_eq!(
            reason(Cursor::with_epoch(0, 3, 8), head),
            Some(ResetReason::OtherLog)
        );
        assert_eq!(
            reason(Cursor::with_epoch(0, 11, 7), head),
            Some(ResetReason::BeyondEnd)
        );
        assert_eq!(
            reason(Cursor::with_epoch(0, 3, 7), None),
            Some(ResetReason::OtherLog)
        );
        assert_eq!(
            reason(Cursor::new(0, 3), None),
            Some(ResetReason::BeyondEnd)
        );
        assert_eq!(reason(Cursor::new(0, 0), None), None);
    }
}
