//! The controller: sends each engine its commands (connect, send, drain, series, stop) and
//! gathers their replies, with a timeout on every wait. It keeps what the steps need between
//! them (ready members per room) and reads the watched processes' CPU around each step.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::cli::RunArgs;
use crate::engine::unix_us;
use crate::link::Link;
use crate::plan::{new_hist, Cmd, Plan, Reply};
use crate::procstat::{self, Snapshot, Watched};
use crate::progress;
use crate::report::{ConnectOut, Point, StepOut};
use crate::segments;
use crate::summary::{self, StepInput};

/// How long `gather` waits for a reply before it reports that time passed.
const TICK: Duration = Duration::from_millis(100);

/// What `gather` passes to its `progress` callback while it waits.
pub(crate) enum Waiting {
    /// Connect counts summed over the engines (ready, failed, still in their handshake).
    Progress {
        ready: u32,
        failed: u32,
        pending: u32,
    },
    /// No reply for `TICK`.
    Tick,
}

pub(crate) struct Controller {
    pub(crate) args: RunArgs,
    pub(crate) plan: Plan,
    pub(crate) links: Vec<Link>,
    pub(crate) replies: Receiver<(u32, Reply)>,
    pub(crate) watched: Vec<Watched>,
    pub(crate) ticks: u64,
    /// Ready members per room, per engine (from the last `Connected`).
    pub(crate) members: Vec<Vec<u32>>,
    pub(crate) deadline: Instant,
    pub(crate) started: Instant,
    pub(crate) tty: bool,
}

impl Controller {
    fn broadcast(&mut self, cmd: &Cmd) -> Result<(), String> {
        for l in &mut self.links {
            l.send(cmd)?;
        }
        Ok(())
    }

    /// Waits for one reply that `pick` accepts from every engine, telling `progress` about
    /// the engines' connect counts and, when nothing arrived for a while, that time passed (so
    /// a progress bar can move while an engine is busy sending).
    fn gather<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pick: impl FnMut(Reply) -> Option<T>,
        mut progress: impl FnMut(Waiting),
    ) -> Result<Vec<T>, String> {
        let n = self.links.len();
        let mut got: Vec<Option<T>> = (0..n).map(|_| None).collect();
        let mut prog = vec![(0u32, 0u32, 0u32); n];
        let end = Instant::now() + timeout;
        while got.iter().any(Option::is_none) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("timed out waiting for {what}"));
            }
            match self.replies.recv_timeout(left.min(TICK)) {
                Ok((e, Reply::Fatal(msg))) => return Err(format!("engine {e}: {msg}")),
                Ok((
                    e,
                    Reply::Progress {
                        ready,
                        failed,
                        pending,
                    },
                )) => {
                    prog[e as usize] = (ready, failed, pending);
                    let sum = prog
                        .iter()
                        .fold((0, 0, 0), |a, p| (a.0 + p.0, a.1 + p.1, a.2 + p.2));
                    progress(Waiting::Progress {
                        ready: sum.0,
                        failed: sum.1,
                        pending: sum.2,
                    });
                }
                Ok((e, reply)) => {
                    if let Some(v) = pick(reply) {
                        got[e as usize] = Some(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => progress(Waiting::Tick),
                Err(RecvTimeoutError::Disconnected) => return Err("engines ended".into()),
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// The servers' listening ports (their client sockets' local port).
    fn server_ports(&self) -> Vec<u16> {
        let mut p: Vec<u16> = self.plan.targets.iter().map(|t| t.addr.port()).collect();
        p.sort_unstable();
        p.dedup();
        p
    }

    pub(crate) fn snapshot(&self) -> Result<Snapshot, String> {
        Snapshot::take(&self.watched, self.ticks)
    }

    /// CPU µs of this process and the worker processes.
    fn own_cpu(&self) -> u64 {
        let me = procstat::sample(std::process::id(), self.ticks).map_or(0, |s| s.cpu_us);
        let workers: u64 = self
            .links
            .iter()
            .filter_map(Link::pid)
            .filter_map(|p| procstat::sample(p, self.ticks).ok())
            .map(|s| s.cpu_us)
            .sum();
        me + workers
    }

    /// Connects the clients numbered below `upto` not connected yet and waits until every
    /// engine is done with them; `out` gets the totals so far.
    pub(crate) fn connect(&mut self, upto: u32, out: &mut ConnectOut) -> Result<(), String> {
        let t0 = Instant::now();
        let ready0 = out.ready;
        self.broadcast(&Cmd::Connect { upto })?;
        let tty = self.tty;
        let bar = progress::connect(tty, upto);
        bar.set_position(u64::from(ready0));
        let mut last_print = Instant::now();
        let timeout = Duration::from_secs_f64(
            f64::from(upto) / f64::from(self.args.connect_rate.max(1)) * 3.0
                + self.args.connect_timeout * 2.0
                + 10.0,
        );
        let replies = self.gather(
            "connections",
            timeout,
            |r| match r {
                Reply::Connected {
                    ready,
                    failed,
                    errors,
                    members,
                } => Some((ready, failed, errors, members)),
                _ => None,
            },
            |w| {
                let Waiting::Progress {
                    ready,
                    failed,
                    pending,
                } = w
                else {
                    bar.tick();
                    return;
                };
                let rate = f64::from(ready.saturating_sub(ready0))
                    / t0.elapsed().as_secs_f64().max(1e-3);
                if tty {
                    bar.set_position(u64::from(ready));
                    bar.set_message(format!(
                        "{failed} failed  {pending} in handshake  {rate:.0}/s"
                    ));
                } else if last_print.elapsed() >= Duration::from_secs(1) {
                    // No terminal (CI, a script): one plain line a second, as a log reads best.
                    last_print = Instant::now();
                    eprintln!(
                        "[connect] {ready:>6}/{upto} ready  {failed} failed  {pending} in handshake  {rate:.0}/s"
                    );
                }
            },
        );
        bar.finish_and_clear();
        let replies = replies?;
        out.ready = 0;
        out.failed = 0;
        out.errors.clear();
        self.members.clear();
        for (ready, failed, errors, members) in replies {
            out.ready += ready;
            out.failed += failed;
            for (k, v) in errors {
                *out.errors.entry(k).or_default() += v;
            }
            self.members.push(members);
        }
        out.secs += t0.elapsed().as_secs_f64();
        eprintln!(
            "[connect] {} ready, {} failed in {:.1} s {:?}",
            out.ready,
            out.failed,
            t0.elapsed().as_secs_f64(),
            out.errors
        );
        Ok(())
    }

    /// Step number `n`: `rate` messages per second over all senders for `secs`, then the
    /// drain; returns its results.
    pub(crate) fn step(
        &mut self,
        n: usize,
        rate: f64,
        secs: f64,
        epoch_us: u64,
    ) -> Result<StepOut, String> {
        // Read outside the CPU window: `ss` is the generator's work, not the machine's noise.
        let ports = self.server_ports();
        let segs_before = segments::data_segs_out(&ports);
        let before = self.snapshot()?;
        let own_before = self.own_cpu();
        let machine_before = procstat::machine_cpu(self.ticks);
        let start_us = unix_us() + 100_000;
        let duration_ms = (secs * 1000.0) as u64;
        self.broadcast(&Cmd::Send {
            start_us,
            epoch_us,
            rate: rate / f64::from(self.plan.senders.max(1)),
            duration_ms,
            ack_wait_ms: 3_000,
        })?;
        let bar = progress::step(self.tty, n, rate, secs);
        let mut acks_shown = false;
        let done = self.gather(
            "sends",
            Duration::from_millis(duration_ms + 15_000),
            |r| match r {
                Reply::SendDone {
                    accepted,
                    sent,
                    rejected,
                    unacked,
                    max_late_us,
                } => Some((accepted, sent, rejected, unacked, max_late_us)),
                _ => None,
            },
            |_| {
                let done_ms = unix_us().saturating_sub(start_us) / 1000;
                bar.set_position(done_ms.min(duration_ms));
                if done_ms >= duration_ms && !acks_shown {
                    acks_shown = true;
                    bar.set_message("waiting for the last acks");
                }
            },
        )?;
        let rooms = self.plan.rooms as usize;
        let mut accepted = vec![0u64; rooms];
        let (mut sent, mut rejected, mut unacked, mut late) = (0, 0, 0, 0);
        for (a, s, r, u, l) in done {
            for (i, v) in a.into_iter().enumerate().take(rooms) {
                accepted[i] += v;
            }
            sent += s;
            rejected += r;
            unacked += u;
            late = late.max(l);
        }
        let drain_deadline = unix_us() + (self.args.drain_secs * 1e6) as u64;
        let mut expected_total = 0;
        for (e, link) in self.links.iter_mut().enumerate() {
            let expected: u64 = self.members[e]
                .iter()
                .zip(&accepted)
                .map(|(&m, &a)| u64::from(m) * a)
                .sum();
            expected_total += expected;
            link.send(&Cmd::Drain {
                expected,
                deadline_us: drain_deadline,
            })?;
        }
        bar.set_message(format!("draining: {expected_total} deliveries expected"));
        let stats = self.gather(
            "deliveries",
            Duration::from_secs_f64(self.args.drain_secs + 10.0),
            |r| match r {
                Reply::Drained(s) => Some(s),
                _ => None,
            },
            |_| bar.tick(),
        );
        // Cleared before the caller prints the step's line, which would otherwise be drawn over.
        bar.finish_and_clear();
        let stats = stats?;
        let after = self.snapshot()?;
        let own_after = self.own_cpu();
        let machine_busy_us = match (machine_before, procstat::machine_cpu(self.ticks)) {
            (Some((b0, _)), Some((b1, _))) => b1.saturating_sub(b0),
            _ => 0,
        };
        let segs = segs_before
            .zip(segments::data_segs_out(&ports))
            .map(|(a, b)| b.saturating_sub(a));
        let wall = match (before.at, after.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => secs,
        };
        Ok(summary::summarize(
            &self.plan,
            &self.members,
            &self.watched,
            self.args.p99_limit_ms,
            StepInput {
                rate,
                secs,
                start_us,
                epoch_us,
                sent,
                rejected,
                unacked,
                late_us: late,
                expected: expected_total,
                stats,
                before,
                after,
                wall,
                own_cpu_us: own_after.saturating_sub(own_before),
                segments: segs,
                machine_busy_us,
            },
        ))
    }

    pub(crate) fn series(&mut self) -> Result<Vec<Point>, String> {
        self.broadcast(&Cmd::Series)?;
        let all = self.gather(
            "series",
            Duration::from_secs(10),
            |r| match r {
                Reply::Series(b) => Some(b),
                _ => None,
            },
            |_| {},
        )?;
        let mut merged: BTreeMap<u64, (u64, hdrhistogram::Histogram<u64>)> = BTreeMap::new();
        for buckets in all {
            for b in buckets {
                let e = merged.entry(b.index).or_insert_with(|| (0, new_hist(2)));
                e.0 += b.deliveries;
                b.latency.add_to(&mut e.1);
            }
        }
        let secs = self.plan.bucket_ms as f64 / 1000.0;
        Ok(merged
            .into_iter()
            .map(|(i, (n, h))| Point {
                t: i as f64 * secs,
                deliveries_per_s: n as f64 / secs,
                p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
                p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
                p999_ms: h.value_at_quantile(0.999) as f64 / 1000.0,
            })
            .collect())
    }

    pub(crate) fn stop(mut self) {
        let _ = self.broadcast(&Cmd::Stop);
        let _ = self.gather(
            "stop",
            Duration::from_secs(10),
            |r| matches!(r, Reply::Stopped).then_some(()),
            |_| {},
        );
        for l in self.links.drain(..) {
            l.finish();
        }
    }
}
