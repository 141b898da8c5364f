//! The run's shape (who connects where, who is in which room, who sends) and the messages the
//! controller and the engines exchange. Everything here is serialisable because an engine may
//! live in another process (`--procs`), talking JSON lines over its stdin/stdout.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::proto::Protocol;

/// One server endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Target {
    /// Loopback socket address.
    pub(crate) addr: SocketAddr,
    /// The `Host` header.
    pub(crate) host: String,
    /// Path and query of the upgrade request, without the per-client name.
    pub(crate) path: String,
}

/// Everything an engine needs to know, identical for every engine but `engine`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub(crate) protocol: Protocol,
    pub(crate) targets: Vec<Target>,
    pub(crate) clients: u32,
    pub(crate) rooms: u32,
    /// Each room's members on at most this many targets; 0 = every target.
    pub(crate) room_spread: u32,
    pub(crate) senders: u32,
    pub(crate) size: usize,
    /// Random per run: frames from another run (or another tool) are not counted.
    pub(crate) inst: u64,
    /// Source addresses to bind, spread round-robin; empty = let the kernel choose.
    pub(crate) sources: Vec<Ipv4Addr>,
    /// New connections per second, over all engines.
    pub(crate) connect_rate: u32,
    /// Connections in their handshake at once, per engine.
    pub(crate) max_pending: u32,
    pub(crate) connect_timeout_ms: u64,
    pub(crate) bucket_ms: u64,
    pub(crate) engine: u32,
    pub(crate) engines: u32,
}

impl Plan {
    /// The room of client `i`: rooms are contiguous blocks of clients, so with several server
    /// URLs (client `i` uses URL `i % urls`) every room spans every instance.
    pub(crate) fn room_of(&self, i: u32) -> u32 {
        (u64::from(i) * u64::from(self.rooms) / u64::from(self.clients)) as u32
    }

    /// The target (index into `targets`) client `i` connects to: `i % targets`, or with a
    /// room spread of `k`, the `j`-th member of room `r` on target `(r + j % k) % targets`.
    pub(crate) fn target_of(&self, i: u32) -> usize {
        let n = self.targets.len().max(1);
        if self.room_spread == 0 {
            return i as usize % n;
        }
        let r = self.room_of(i);
        let j = i - self.room_start(r);
        (r as usize + (j % self.room_spread) as usize) % n
    }

    /// The first client of room `r`.
    pub(crate) fn room_start(&self, r: u32) -> u32 {
        // ceil(r * clients / rooms): the smallest i with room_of(i) >= r.
        (u64::from(r) * u64::from(self.clients)).div_ceil(u64::from(self.rooms)) as u32
    }

    /// Members of room `r`.
    pub(crate) fn room_size(&self, r: u32) -> u32 {
        self.room_start(r + 1) - self.room_start(r)
    }

    /// Senders in room `r`: sender `j` is in room `j % rooms`.
    pub(crate) fn senders_in_room(&self, r: u32) -> u32 {
        self.senders / self.rooms + u32::from(r < self.senders % self.rooms)
    }

    /// Client `i`'s global sender number, if it sends. The `k`-th sender of a room is the
    /// room's `k`-th member, so its slot in the room is `k`.
    pub(crate) fn sender_of(&self, i: u32) -> Option<u32> {
        let r = self.room_of(i);
        let k = i - self.room_start(r);
        (k < self.senders_in_room(r)).then(|| k * self.rooms + r)
    }

    /// The slot (index among its room's senders) of sender `j`.
    pub(crate) fn slot_of_sender(&self, j: u32) -> u32 {
        j / self.rooms
    }

    /// The room of sender `j`.
    pub(crate) fn room_of_sender(&self, j: u32) -> u32 {
        j % self.rooms
    }

    /// Whether client `i` belongs to this engine.
    pub(crate) fn owns(&self, i: u32) -> bool {
        i % self.engines == self.engine
    }

    /// Checks that the shape is possible.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.clients == 0 || self.rooms == 0 {
            return Err("--clients and --rooms must be at least 1".into());
        }
        if self.rooms > self.clients {
            return Err("more rooms than clients".into());
        }
        let smallest = (0..self.rooms)
            .map(|r| self.room_size(r))
            .min()
            .unwrap_or(0);
        if self.senders.div_ceil(self.rooms) > smallest {
            return Err(format!(
                "{} senders over {} rooms need {} senders in a room of {smallest}",
                self.senders,
                self.rooms,
                self.senders.div_ceil(self.rooms)
            ));
        }
        if self.protocol == Protocol::Socketio && self.rooms != 1 {
            return Err("the Socket.IO peer broadcasts to everyone: use --rooms 1".into());
        }
        if self.protocol == Protocol::Floor && self.rooms != 1 {
            return Err("the floor sends every frame to everyone: use --rooms 1".into());
        }
        Ok(())
    }
}

/// A latency histogram in microseconds, 1 µs to 60 s.
pub(crate) fn new_hist(sigfig: u8) -> Histogram<u64> {
    // Constant bounds within hdrhistogram's limits (sigfig is 2 or 3): cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, sigfig).expect("histogram bounds")
}

/// A histogram as its recorded (value, count) pairs, to cross a process boundary.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct HistData(pub(crate) Vec<(u64, u64)>);

impl HistData {
    pub(crate) fn from_hist(h: &Histogram<u64>) -> Self {
        Self(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    pub(crate) fn add_to(&self, h: &mut Histogram<u64>) {
        for &(v, n) in &self.0 {
            // Values came out of a histogram with the same bounds.
            let _ = h.record_n(v.clamp(1, 60_000_000), n);
        }
    }
}

/// Controller → engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Cmd {
    /// Connect (and join) this engine's clients with a global index below `upto`.
    Connect { upto: u32 },
    /// Send for `duration_ms` from `start_us` (Unix µs) at `rate` messages/s per sender,
    /// then wait (at most `ack_wait_ms`) for the acks of what was sent, and report.
    Send {
        start_us: u64,
        epoch_us: u64,
        rate: f64,
        duration_ms: u64,
        ack_wait_ms: u64,
    },
    /// Wait until `expected` unique deliveries of the step arrived or `deadline_us` passes.
    Drain { expected: u64, deadline_us: u64 },
    /// Return the time series.
    Series,
    /// Close every connection and stop.
    Stop,
}

/// Engine → controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Reply {
    Progress {
        ready: u32,
        failed: u32,
        pending: u32,
    },
    Connected {
        ready: u32,
        failed: u32,
        errors: BTreeMap<String, u64>,
        /// Ready members per room (this engine's).
        members: Vec<u32>,
    },
    SendDone {
        /// Accepted sends (sent minus refused) per room.
        accepted: Vec<u64>,
        sent: u64,
        rejected: u64,
        unacked: u64,
        /// The worst lateness of a send behind its schedule, µs (the generator keeping up?).
        max_late_us: u64,
    },
    Drained(StepStats),
    Series(Vec<Bucket>),
    Stopped,
    Fatal(String),
}

/// What one engine saw during one step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct StepStats {
    pub(crate) unique: u64,
    pub(crate) dups: u64,
    pub(crate) reordered: u64,
    pub(crate) foreign: u64,
    pub(crate) lagged: u64,
    pub(crate) closed: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) first_us: u64,
    pub(crate) last_us: u64,
    pub(crate) latency: HistData,
    /// Gaps still open (sequence numbers never received) over all receivers, all steps.
    pub(crate) missing_total: u64,
}

/// One time bucket of the series.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Bucket {
    pub(crate) index: u64,
    pub(crate) deliveries: u64,
    pub(crate) latency: HistData,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(clients: u32, rooms: u32, senders: u32) -> Plan {
        Plan {
            protocol: Protocol::Chatbus,
            targets: Vec::new(),
            clients,
            rooms,
            room_spread: 0,
            senders,
            size: 100,
            inst: 1,
            sources: Vec::new(),
            connect_rate: 1,
            max_pending: 1,
            connect_timeout_ms: 1,
            bucket_ms: 1,
            engine: 0,
            engines: 1,
        }
    }

    #[test]
    fn a_room_spread_puts_each_room_on_that_many_targets() {
        let target = Target {
            addr: "127.0.0.1:1".parse().unwrap(),
            host: String::new(),
            path: String::new(),
        };
        let mut p = plan(20_000, 2_000, 0);
        p.targets = vec![target; 4];
        p.room_spread = 2;
        let mut on: BTreeMap<u32, std::collections::BTreeSet<usize>> = BTreeMap::new();
        let mut per_target = [0u32; 4];
        for i in 0..p.clients {
            on.entry(p.room_of(i)).or_default().insert(p.target_of(i));
            per_target[p.target_of(i)] += 1;
        }
        assert!(
            on.values().all(|t| t.len() == 2),
            "every room on exactly 2 targets"
        );
        assert_eq!(per_target, [5_000; 4], "and the clients spread evenly");
        p.room_spread = 0;
        let spans: usize = (0..10)
            .map(|i| p.target_of(i))
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        assert_eq!(
            spans, 4,
            "without a spread, room 0's 10 members use every target"
        );
    }

    #[test]
    fn shape_is_consistent() {
        for (n, r, s) in [
            (10, 1, 3),
            (10_000, 1_000, 1_000),
            (1_003, 10, 25),
            (7, 7, 7),
        ] {
            let p = plan(n, r, s);
            p.validate().expect("valid plan");
            let sizes: u32 = (0..r).map(|x| p.room_size(x)).sum();
            assert_eq!(sizes, n);
            let mut senders = Vec::new();
            for i in 0..n {
                assert!(p.room_start(p.room_of(i)) <= i);
                if let Some(j) = p.sender_of(i) {
                    assert_eq!(p.room_of_sender(j), p.room_of(i));
                    assert_eq!(p.room_start(p.room_of(i)) + p.slot_of_sender(j), i);
                    senders.push(j);
                }
            }
            senders.sort_unstable();
            assert_eq!(senders, (0..s).collect::<Vec<_>>());
        }
        assert!(plan(10, 5, 11).validate().is_err());
    }
}
