//! Instance leases of the interest-based DualBus: what lets an instance publish without room
//! tickets while it cannot reach the fast broker, and lets every receiver know when tickets
//! cannot be trusted (docs/ARCHITECTURE.md, "Interest-based DualBus").
//!
//! A receiver that follows only its rooms learns of a message from its ticket. A *ticketless*
//! record (written by an instance cut from the fast broker) carries none, so a receiver that
//! trusts tickets would deliver later offsets of its room before it, or never learn of it.
//! Hence:
//!
//! - Every instance holds a lease in the fast broker ([`Holder`]), renewed every
//!   [`RENEW_EVERY`] for [`LEASE_TTL`]. A renewal carries a deadline in the broker's clock
//!   (what the instance last read of it, plus the time since, plus [`RENEW_LATENESS`]), so a
//!   request delayed in the network cannot renew the lease after the instance counts it as
//!   lapsed. The instance therefore knows the latest moment its lease may run until, by its
//!   own clock.
//! - An instance without the fast broker writes ticketless only from [`LEASE_TTL`] / 4 +
//!   [`MARGIN`] after that moment, and for at most [`TICKETLESS_FOR`] after its last
//!   successful renewal. Before it renews its lease again it waits for its ticketless writes
//!   in flight, so none lands after the others went back to tickets.
//! - A receiver ([`Verdict`]) trusts tickets only while its last lease scan that found every
//!   lease live (or lapsed long enough ago to be over: [`RETIRE_AFTER`]) was *sent* less
//!   than [`FRESH_FOR`] ago. If a lease is live at the scan, the instance cannot write
//!   ticketless until `FRESH_FOR` after the scan was sent, so every message the receiver
//!   delivers from tickets until then has a lower offset than any ticketless record. Otherwise
//!   it reads its rooms from the log (the merger's tail mode).
//!
//! Only clock *rates* are compared across processes (durations measured by each), never two
//! clocks' readings, except the fast broker's against itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Notify, RwLock, RwLockReadGuard};
// tokio's clock, like the merger's: paused time in tests moves the leases too.
use tokio::time::Instant;

use crate::tickets::{Leases, Renewal, Tickets};

/// How long a lease runs after a renewal. Short, because a send that finds the fast broker
/// gone waits for its instance's lease to lapse: `RENEW_LATENESS + LEASE_TTL + LEASE_TTL / 4 +
/// MARGIN` = 2 s after the last renewal at most, as long as a send waits for a fast
/// broker's command timeout anyway.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(1);

/// How often a lease is renewed.
const RENEW_EVERY: Duration = Duration::from_millis(300);

/// How late after it was sent a renewal may still take effect (its deadline).
const RENEW_LATENESS: Duration = Duration::from_millis(250);

/// Slack for scheduling delays between a receiver's scan and its deliveries.
const MARGIN: Duration = Duration::from_millis(500);

/// How long an instance cut from the fast broker keeps publishing without tickets, counted
/// from its last successful renewal; after it, durable sends are refused until it is back.
pub(crate) const TICKETLESS_FOR: Duration = Duration::from_secs(20);

/// Longer than any durable write takes to land or fail (Kafka's publish timeout, 5 s by
/// default, plus its retries' slack).
pub(crate) const DURABLE_WRITE_BOUND: Duration = Duration::from_secs(10);

/// How long after its lease lapsed an instance has certainly stopped writing ticketless and
/// its writes are in the log: receivers stop waiting for it then.
pub(crate) const RETIRE_AFTER: Duration =
    Duration::from_secs(TICKETLESS_FOR.as_secs() + DURABLE_WRITE_BOUND.as_secs() + 2);

/// How old (since it was sent) a receiver's last good lease scan may be for it to trust
/// tickets. At most `LEASE_TTL / 4 + MARGIN` (see the module docs); a little less, for the
/// time between the check and the delivery.
pub(crate) const FRESH_FOR: Duration = Duration::from_millis(650);

/// How often a receiver scans the leases: well inside [`FRESH_FOR`].
pub(crate) const SCAN_EVERY: Duration = Duration::from_millis(150);

/// How long a lease let lapse on purpose ([`Holder::suspend`]) stays lapsed before the
/// instance tries tickets again.
const SUSPENDED_FOR: Duration = Duration::from_secs(1);

/// How long a probe of the fast broker's clock may take while the lease is lost.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// How long the fast broker keeps a lapsed lease listed.
pub(crate) const KEEP_LAPSED: Duration = Duration::from_secs(2 * RETIRE_AFTER.as_secs());

/// What a receiver concluded from a lease scan.
#[derive(Debug, Default)]
pub(super) struct Verdict {
    // Instance -> the latest expiry seen: an instance missing from a later scan (the fast broker
    // lost its leases) still counts until it is retired.
    known: std::collections::HashMap<String, u64>,
}

impl Verdict {
    /// Takes a scan; true if tickets can be trusted: no lease lapsed without being over, and
    /// the lease set not recreated so recently that a lapsed one may have been lost with it.
    pub(super) fn trusts(&mut self, scan: &Leases) -> bool {
        let now = scan.now_ms;
        for lease in &scan.leases {
            let e = self.known.entry(lease.instance.clone()).or_default();
            *e = (*e).max(lease.expires_ms);
        }
        let retire = ms(RETIRE_AFTER);
        self.known.retain(|_, &mut e| e + retire > now);
        let reset_over = scan.reset_ms == 0 || scan.reset_ms + ms(LEASE_TTL) + retire <= now;
        reset_over && self.known.values().all(|&e| e > now)
    }

    /// The instances whose leases lapsed and are not over yet (for the logs).
    pub(super) fn lapsed(&self, now_ms: u64) -> Vec<&str> {
        self.known
            .iter()
            .filter(|(_, &e)| e <= now_ms)
            .map(|(i, _)| i.as_str())
            .collect()
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// This instance's lease. See the module docs.
#[derive(Debug)]
pub(super) struct Holder {
    pub(super) id: String,
    state: Mutex<State>,
    // Ticketless writes hold it shared; a renewal after a lapse takes it alone.
    gate: RwLock<()>,
    renewed: Notify,
    // Set by a publish that got no ticket while the lease was live (a cluster shard failing
    // over, say): the lease is let lapse, so that sends can go on without tickets.
    suspended: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    // The fast broker's clock read at some point: its value, when the request was sent and how
    // long it took (the reading happened within that window).
    clock: Option<(u64, Instant, Duration)>,
    // The latest instant the lease may run until, counting every renewal sent (answered or not).
    may_run_until: Option<Instant>,
    // When the last successful renewal was sent.
    renewed_at: Option<Instant>,
}

/// What a publish without a ticket may do now.
pub(super) enum Ticketless<'a> {
    /// Write ticketless, holding this until the write is acknowledged or failed.
    Go(RwLockReadGuard<'a, ()>),
    /// The lease is back: take a ticket.
    Retry,
    /// Refused, saying why.
    Refused(String),
}

impl Holder {
    pub(super) fn new() -> Self {
        Self {
            id: uuid::Uuid::now_v7().simple().to_string(),
            state: Mutex::new(State::default()),
            gate: RwLock::new(()),
            renewed: Notify::new(),
            suspended: AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain values, never left half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From when to when a ticketless write is allowed; None before any lease was held.
    fn window(&self) -> Option<(Instant, Instant)> {
        let s = self.state();
        let from = s.may_run_until? + LEASE_TTL / 4 + MARGIN;
        let until = s.renewed_at? + LEASE_TTL + TICKETLESS_FOR;
        Some((from, until))
    }

    /// True while ticketless writes are allowed: the lease has certainly lapsed (so a publish
    /// need not wait for a ticket that will not come).
    pub(super) fn lapsed(&self) -> bool {
        let now = Instant::now();
        self.window()
            .is_some_and(|(from, until)| now >= from && now < until)
    }

    /// A publish got no ticket although the lease is live: stop renewing it, so that it lapses
    /// and publishes go on without tickets (receivers then read the log). The renewer tries
    /// again [`SUSPENDED_FOR`] after the lapse.
    pub(super) fn suspend(&self) {
        if !self.suspended.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "no room ticket from the fast broker: letting this instance's lease lapse to \
                 publish without tickets"
            );
        }
    }

    /// Waits (until `give_up_at` at most) until a ticketless write is allowed.
    pub(super) async fn ticketless(&self, give_up_at: Instant) -> Ticketless<'_> {
        loop {
            let Some((from, until)) = self.window() else {
                return Ticketless::Refused(
                    "this instance has not held a lease in the fast broker yet, so it cannot \
                     publish without a room ticket"
                        .to_owned(),
                );
            };
            let now = Instant::now();
            if now >= until {
                return Ticketless::Refused(format!(
                    "this instance has been cut from the fast broker for longer than {}s; \
                     durable sends resume when it is back",
                    TICKETLESS_FOR.as_secs()
                ));
            }
            if now >= from {
                let guard = self.gate.read().await;
                // The renewer may have renewed while this waited for the gate.
                return match self.window() {
                    Some((from, until)) if Instant::now() >= from && Instant::now() < until => {
                        Ticketless::Go(guard)
                    }
                    _ => Ticketless::Retry,
                };
            }
            if from > give_up_at {
                return Ticketless::Refused(
                    "no room ticket from the fast broker, and this instance's lease had not \
                     lapsed in time to publish without one"
                        .to_owned(),
                );
            }
            let renewed = self.renewed.notified();
            tokio::select! {
                () = tokio::time::sleep_until(from) => {}
                () = renewed => return Ticketless::Retry,
            }
        }
    }

    /// Renews the lease for as long as `tickets` lives; run in its own task.
    pub(super) async fn run(&self, tickets: &dyn Tickets) {
        let mut probing = true;
        loop {
            if probing {
                let sent = Instant::now();
                match tokio::time::timeout(PROBE_TIMEOUT, tickets.lease_clock()).await {
                    Ok(Ok(read)) => self.state().clock = Some((read, sent, sent.elapsed())),
                    _ => {
                        tokio::time::sleep(PROBE_TIMEOUT).await;
                        continue;
                    }
                }
            }
            if self.suspended.load(Ordering::Relaxed) {
                // Let the lease lapse; once it has for a while, try tickets again.
                let lapsed_long = self
                    .state()
                    .may_run_until
                    .is_none_or(|u| Instant::now() >= u + SUSPENDED_FOR);
                if !lapsed_long {
                    tokio::time::sleep(RENEW_EVERY).await;
                    continue;
                }
                self.suspended.store(false, Ordering::Relaxed);
            }
            probing = !self.renew(tickets).await;
            tokio::time::sleep(if probing { PROBE_TIMEOUT } else { RENEW_EVERY }).await;
        }
    }

    /// One renewal; false if its outcome is unknown or it failed (probe before the next one:
    /// a renewal sent without an answer to the last one could keep the lease running
    /// unknowingly).
    async fn renew(&self, tickets: &dyn Tickets) -> bool {
        let now = Instant::now();
        let may_have_lapsed = self.state().may_run_until.is_some_and(|u| now >= u);
        // After a possible lapse, ticketless writes may be in flight: wait for them, and
        // hold new ones back, so that none lands once the lease is seen again.
        let _gate = if may_have_lapsed {
            Some(self.gate.write().await)
        } else {
            None
        };
        let (deadline, held_before) = {
            let mut s = self.state();
            let Some((read, at, took)) = s.clock else {
                return false;
            };
            let sent = Instant::now();
            // The broker's clock now is at most `ms` plus the time since that request was sent.
            let deadline = read + ms(sent - at + RENEW_LATENESS);
            // The renewal takes effect, if at all, by `sent + RENEW_LATENESS + took`.
            let until = sent + RENEW_LATENESS + took + LEASE_TTL;
            s.may_run_until = Some(s.may_run_until.map_or(until, |u| u.max(until)));
            (deadline, s.renewed_at.is_some())
        };
        let sent = Instant::now();
        match tickets
            .renew_lease(&self.id, LEASE_TTL, deadline, held_before)
            .await
        {
            Ok(Renewal::Renewed { now_ms }) => {
                let mut s = self.state();
                s.clock = Some((now_ms, sent, sent.elapsed()));
                s.renewed_at = Some(sent);
                drop(s);
                self.renewed.notify_waiters();
                true
            }
            Ok(Renewal::TooLate { now_ms }) => {
                // The reading it was based on was off: take this one, try again.
                self.state().clock = Some((now_ms, sent, sent.elapsed()));
                tracing::debug!("a lease renewal arrived past its deadline");
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "lease renewal failed");
                false
            }
        }
    }
}
