//! The per-room ticket counters of the interest-based DualBus ([`Tickets`]) in Redis.
//!
//! Two keys per room, both with the room's hash tag, so on a cluster they live in the room's
//! slot beside its channel and one script touches both: the hash `<prefix>:{R}:tk` (field `e`,
//! the epoch: the Redis `TIME` in microseconds when the hash was created; field `n`, the
//! counter) and the sorted set `<prefix>:{R}:open` (open tickets, scored by the millisecond
//! they were taken). Whatever loses the hash (a restart without persistence, `FLUSHALL`,
//! expiry after [`COUNTER_TTL`] idle) creates it again with a new epoch, so a counter that
//! starts over is never mistaken for the old one.

use async_trait::async_trait;
use chatbus_core::{Baseline, Result, Room, Ticket, Tickets, COUNTER_TTL, OPEN_TICKET_TTL};

use crate::broker::RedisBroker;
use crate::error;

/// Creates the counter hash (KEYS[1]) if it is missing; leaves `t` (the server's `TIME`) and
/// `e` (the epoch) for the script that follows. ARGV[1] is the keys' time to live in seconds.
/// The epoch is built as a string: Lua numbers are doubles, and Redis would format 16 digits
/// with an exponent.
const ENSURE: &str = r"
local t = redis.call('TIME')
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = t[1] .. string.sub('000000' .. t[2], -6)
  redis.call('HSET', KEYS[1], 'e', e, 'n', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// Takes a ticket: KEYS[1] the counter, KEYS[2] the open set; returns {epoch, n}.
const TAKE: &str = r"
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('ZADD', KEYS[2], ms, n)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {e, n}
";

/// Closes ticket ARGV[3] of epoch ARGV[2]; returns the counter {epoch, n} ({'0', 0} when it is
/// gone: closing must not create it, the ticket's epoch is then over anyway).
const CLOSE: &str = r"
local v = redis.call('HMGET', KEYS[1], 'e', 'n')
if not v[1] then return {'0', 0} end
if v[1] == ARGV[2] then redis.call('ZREM', KEYS[2], ARGV[3]) end
return {v[1], v[2]}
";

/// The baseline: {epoch, n, open tickets}, forgetting tickets open for longer than ARGV[2] ms.
const BASELINE: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms - tonumber(ARGV[2]))
return {e, redis.call('HGET', KEYS[1], 'n'), redis.call('ZRANGE', KEYS[2], 0, -1)}
";

/// The three scripts, hashed once.
pub(crate) struct Scripts {
    take: redis::Script,
    close: redis::Script,
    baseline: redis::Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            take: redis::Script::new(&format!("{ENSURE}{TAKE}")),
            close: redis::Script::new(CLOSE),
            baseline: redis::Script::new(&format!("{ENSURE}{BASELINE}")),
        }
    }
}

/// Runs one of the scripts on `room`'s two keys, with the keys' time to live and then `args`,
/// within the command timeout.
async fn run<T: redis::FromRedisValue>(
    broker: &RedisBroker,
    op: &'static str,
    script: fn(&Scripts) -> &redis::Script,
    room: &Room,
    args: &[u64],
) -> Result<T> {
    let (mut conn, keys, scripts, t) = broker.ticket_parts();
    let mut call = script(scripts).key(keys.tickets(room));
    call.key(keys.open_tickets(room)).arg(COUNTER_TTL.as_secs());
    for arg in args {
        call.arg(*arg);
    }
    broker
        .bounded(op, async {
            call.invoke_async(&mut conn)
                .await
                .map_err(|e| error::map(op, e, t))
        })
        .await
}

#[async_trait]
impl Tickets for RedisBroker {
    async fn take_ticket(&self, room: &Room) -> Result<Ticket> {
        let (epoch, n) = run(self, "take_ticket", |s| &s.take, room, &[]).await?;
        Ok(Ticket { epoch, n })
    }

    async fn close_ticket(&self, room: &Room, ticket: Ticket) -> Result<Ticket> {
        let args = [ticket.epoch, ticket.n];
        let (epoch, n) = run(self, "close_ticket", |s| &s.close, room, &args).await?;
        Ok(Ticket { epoch, n })
    }

    async fn ticket_baseline(&self, room: &Room) -> Result<Baseline> {
        let ttl = OPEN_TICKET_TTL.as_millis() as u64;
        let (epoch, counter, mut open): (u64, u64, Vec<u64>) =
            run(self, "ticket_baseline", |s| &s.baseline, room, &[ttl]).await?;
        // The set is ordered by the time taken, which can differ from the number's order.
        open.sort_unstable();
        Ok(Baseline {
            epoch,
            counter,
            open,
        })
    }
}
