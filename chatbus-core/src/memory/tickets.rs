//! The memory broker's ticket counters (see [`Tickets`]): what a DualBus over two memory
//! brokers, or a test, uses as the fast path's counters.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::MemoryBroker;
use crate::envelope::Room;
use crate::tickets::{Baseline, Lease, Leases, Renewal, Ticket, Tickets, OPEN_TICKET_TTL};
use crate::Result;

/// Counters kept before idle ones (no open ticket) are forgotten; a forgotten room gets a new
/// epoch at its next use, which receivers handle like a restarted fast broker.
const MAX_COUNTERS: usize = 65_536;

#[derive(Debug, Default)]
pub(super) struct Counters {
    rooms: Mutex<HashMap<Room, Counter>>,
    // Epochs handed out by this broker: unique, so two counters of a room never share one.
    epochs: AtomicU64,
    leases: Mutex<LeaseSet>,
    clock: Clock,
}

#[derive(Debug, Default)]
struct LeaseSet {
    created: bool,
    reset_ms: u64,
    // Instance -> when its lease runs out (ms of `Clock`).
    expires: HashMap<String, u64>,
}

/// Unix milliseconds that follow tokio's clock, so that a test with paused time moves the
/// leases' clock with the DualBus's timers.
#[derive(Debug)]
struct Clock {
    unix_ms: u64,
    at: tokio::time::Instant,
}

impl Default for Clock {
    fn default() -> Self {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            unix_ms,
            at: tokio::time::Instant::now(),
        }
    }
}

impl Clock {
    fn now_ms(&self) -> u64 {
        self.unix_ms + self.at.elapsed().as_millis() as u64
    }
}

#[derive(Debug)]
struct Counter {
    epoch: u64,
    n: u64,
    open: BTreeSet<(u64, Instant)>,
}

impl Counters {
    fn with_room<R>(&self, base: u32, room: &Room, f: impl FnOnce(&mut Counter) -> R) -> R {
        // Recover from poisoning: a counter is a number and a set, never half-updated.
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if rooms.len() >= MAX_COUNTERS && !rooms.contains_key(room) {
            rooms.retain(|_, c| !c.open.is_empty());
        }
        let counter = rooms.entry(room.clone()).or_insert_with(|| Counter {
            epoch: (u64::from(base) << 32) | (self.epochs.fetch_add(1, Ordering::Relaxed) + 1),
            n: 0,
            open: BTreeSet::new(),
        });
        f(counter)
    }
}

#[async_trait]
impl Tickets for MemoryBroker {
    async fn take_ticket(&self, room: &Room) -> Result<Ticket> {
        let now = Instant::now();
        Ok(self.shared.tickets.with_room(self.shared.epoch, room, |c| {
            c.n += 1;
            c.open.insert((c.n, now));
            Ticket {
                epoch: c.epoch,
                n: c.n,
            }
        }))
    }

    async fn close_ticket(&self, room: &Room, ticket: Ticket) -> Result<Ticket> {
        Ok(self.shared.tickets.with_room(self.shared.epoch, room, |c| {
            if c.epoch == ticket.epoch {
                c.open.retain(|&(n, _)| n != ticket.n);
            }
            Ticket {
                epoch: c.epoch,
                n: c.n,
            }
        }))
    }

    async fn ticket_baseline(&self, room: &Room) -> Result<Baseline> {
        let now = Instant::now();
        Ok(self.shared.tickets.with_room(self.shared.epoch, room, |c| {
            c.open
                .retain(|&(_, since)| now.duration_since(since) < OPEN_TICKET_TTL);
            Baseline {
                epoch: c.epoch,
                counter: c.n,
                open: c.open.iter().map(|&(n, _)| n).collect(),
            }
        }))
    }

    async fn renew_lease(
        &self,
        instance: &str,
        ttl: Duration,
        deadline_ms: u64,
        held_before: bool,
    ) -> Result<Renewal> {
        let t = &self.shared.tickets;
        let now_ms = t.clock.now_ms();
        if now_ms > deadline_ms {
            return Ok(Renewal::TooLate { now_ms });
        }
        let mut set = t.leases.lock().unwrap_or_else(|e| e.into_inner());
        if !set.created && held_before {
            set.reset_ms = now_ms;
        }
        set.created = true;
        set.expires
            .insert(instance.to_owned(), now_ms + ttl.as_millis() as u64);
        Ok(Renewal::Renewed { now_ms })
    }

    async fn lease_clock(&self) -> Result<u64> {
        Ok(self.shared.tickets.clock.now_ms())
    }

    async fn leases(&self, keep: Duration) -> Result<Leases> {
        let t = &self.shared.tickets;
        let now_ms = t.clock.now_ms();
        let mut set = t.leases.lock().unwrap_or_else(|e| e.into_inner());
        let keep = keep.as_millis() as u64;
        set.expires.retain(|_, &mut e| e + keep >= now_ms);
        Ok(Leases {
            now_ms,
            reset_ms: set.reset_ms,
            leases: set
                .expires
                .iter()
                .map(|(i, &e)| Lease {
                    instance: i.clone(),
                    expires_ms: e,
                })
                .collect(),
        })
    }
}
