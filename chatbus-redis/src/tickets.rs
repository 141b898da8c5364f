//! The per-room ticket counters of the interest-based DualBus ([`Tickets`]) in Redis.
//!
//! Two keys per room, both with the room's hash tag, so on a cluster they live in the room's
//! slot beside its channel and one script touches both: the hash `<prefix>:{R}:tk` (field `e`,
//! the epoch: the Redis `TIME` in microseconds when the hash was created; field `n`, the
//! counter) and the sorted set `<prefix>:{R}:open` (open tickets, scored by the millisecond
//! they were taken). Whatever loses the hash (a restart without persistence, `FLUSHALL`,
//! expiry after [`COUNTER_TTL`] idle) creates it again with a new epoch, so a counter that
//! starts over is never mistaken for the old one.
//!
//! The leases are one hash, `<prefix>:leases` (no hash tag: one key, so one slot on a
//! cluster): field per instance, value its expiry in the server's milliseconds, and the field
//! `_reset`, when the hash was created by an instance that had held a lease before (the
//! server had lost it). Every time is the server's `TIME`, so instances' clocks are never
//! compared with each other.

use async_trait::async_trait;
use std::time::Duration;

use chatbus_core::{
    Baseline, Lease, Leases, Renewal, Result, Room, Ticket, Tickets, COUNTER_TTL, OPEN_TICKET_TTL,
};

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

/// The server's clock in milliseconds, as `ms`.
const CLOCK: &str = r"
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// Renews lease ARGV[1] (KEYS[1] the lease hash) for ARGV[2] ms unless the clock is past
/// ARGV[3]; ARGV[4] is 1 if the instance held a lease before, ARGV[5] how long the hash
/// outlives its last renewal. Returns {1, ms} renewed, {0, ms} too late.
const RENEW: &str = r"
if ms > tonumber(ARGV[3]) then return {0, ms} end
if redis.call('EXISTS', KEYS[1]) == 0 and ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], '_reset', ms)
end
redis.call('HSET', KEYS[1], ARGV[1], ms + tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[5]))
return {1, ms}
";

/// Every lease of KEYS[1], forgetting those lapsed more than ARGV[1] ms ago: returns {ms,
/// reset, {instances}, {expiries}}.
const LEASES: &str = r"
local all = redis.call('HGETALL', KEYS[1])
local reset, ids, exps = 0, {}, {}
for i = 1, #all, 2 do
  local v = tonumber(all[i + 1])
  if all[i] == '_reset' then reset = v
  elseif v + tonumber(ARGV[1]) < ms then redis.call('HDEL', KEYS[1], all[i])
  else ids[#ids + 1] = all[i]; exps[#exps + 1] = v end
end
return {ms, reset, ids, exps}
";

/// The scripts, hashed once.
pub(crate) struct Scripts {
    take: redis::Script,
    close: redis::Script,
    baseline: redis::Script,
    renew: redis::Script,
    clock: redis::Script,
    leases: redis::Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            take: redis::Script::new(&format!("{ENSURE}{TAKE}")),
            close: redis::Script::new(CLOSE),
            baseline: redis::Script::new(&format!("{ENSURE}{BASELINE}")),
            renew: redis::Script::new(&format!("{CLOCK}{RENEW}")),
            clock: redis::Script::new(&format!("{CLOCK}return ms")),
            leases: redis::Script::new(&format!("{CLOCK}{LEASES}")),
        }
    }
}

/// The keys and the leading arguments of a script call.
enum On<'a> {
    /// `room`'s two keys, then the keys' time to live.
    Room(&'a Room),
    /// The lease hash.
    Leases,
}

/// Runs one of the scripts on its keys with `args`, within the command timeout.
async fn run<T: redis::FromRedisValue>(
    broker: &RedisBroker,
    op: &'static str,
    script: fn(&Scripts) -> &redis::Script,
    on: On<'_>,
    args: &[String],
) -> Result<T> {
    let (mut conn, keys, scripts, t) = broker.ticket_parts();
    let mut call = match on {
        On::Room(room) => {
            let mut call = script(scripts).key(keys.tickets(room));
            call.key(keys.open_tickets(room)).arg(COUNTER_TTL.as_secs());
            call
        }
        On::Leases => script(scripts).key(keys.leases()),
    };
    for arg in args {
        call.arg(arg);
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
        let (epoch, n) = run(self, "take_ticket", |s| &s.take, On::Room(room), &[]).await?;
        Ok(Ticket { epoch, n })
    }

    async fn close_ticket(&self, room: &Room, ticket: Ticket) -> Result<Ticket> {
        let args = [ticket.epoch.to_string(), ticket.n.to_string()];
        let (epoch, n) = run(self, "close_ticket", |s| &s.close, On::Room(room), &args).await?;
        Ok(Ticket { epoch, n })
    }

    async fn ticket_baseline(&self, room: &Room) -> Result<Baseline> {
        let ttl = OPEN_TICKET_TTL.as_millis().to_string();
        let (epoch, counter, mut open): (u64, u64, Vec<u64>) = run(
            self,
            "ticket_baseline",
            |s| &s.baseline,
            On::Room(room),
            &[ttl],
        )
        .await?;
        // The set is ordered by the time taken, which can differ from the number's order.
        open.sort_unstable();
        Ok(Baseline {
            epoch,
            counter,
            open,
        })
    }

    async fn renew_lease(
        &self,
        instance: &str,
        ttl: Duration,
        deadline_ms: u64,
        held_before: bool,
    ) -> Result<Renewal> {
        let args = [
            instance.to_owned(),
            ttl.as_millis().to_string(),
            deadline_ms.to_string(),
            u8::from(held_before).to_string(),
            LEASES_OUTLIVE.as_millis().to_string(),
        ];
        let (renewed, now_ms): (u8, u64) =
            run(self, "renew_lease", |s| &s.renew, On::Leases, &args).await?;
        Ok(if renewed == 1 {
            Renewal::Renewed { now_ms }
        } else {
            Renewal::TooLate { now_ms }
        })
    }

    async fn lease_clock(&self) -> Result<u64> {
        run(self, "lease_clock", |s| &s.clock, On::Leases, &[]).await
    }

    async fn leases(&self, keep: Duration) -> Result<Leases> {
        let args = [keep.as_millis().to_string()];
        let (now_ms, reset_ms, ids, expiries): (u64, u64, Vec<String>, Vec<u64>) =
            run(self, "leases", |s| &s.leases, On::Leases, &args).await?;
        Ok(Leases {
            now_ms,
            reset_ms,
            leases: ids
                .into_iter()
                .zip(expiries)
                .map(|(instance, expires_ms)| Lease {
                    instance,
                    expires_ms,
                })
                .collect(),
        })
    }
}

/// How long the lease hash outlives its last renewal: every lease in it has lapsed so long
/// ago by then that no receiver needs it (`DualBus` retires a lapsed lease within a minute).
const LEASES_OUTLIVE: Duration = Duration::from_secs(600);
