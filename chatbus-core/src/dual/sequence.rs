//! Per-room delivery order from tickets: the receiving half of the interest-based DualBus
//! (docs/ARCHITECTURE.md, "Interest-based DualBus").
//!
//! A publisher takes a ticket for the room (a per-room counter in the fast broker) before its
//! durable write, and after the durable ack publishes the message with its ticket and the
//! counter's value read then, the *horizon*. Every message of the room with a lower log offset
//! has a ticket at or below that horizon (its ticket was taken before its durable write, which
//! came before this message's ack, which came before the horizon was read). So a receiver may
//! deliver a message once every ticket up to its horizon is accounted for, in offset order.
//!
//! [`RoomSequence`] is that rule for one room, pure (the caller passes the time): it takes fast
//! copies, abandon notices and complete log reads, and hands out what may be delivered. It owns
//! no I/O; the merger decides when to read the log and when to give up.

use std::collections::BTreeMap;

// tokio's clock, like the merger's, so that paused time drives the caller's timeouts.
use tokio::time::Instant;

use crate::tickets::{Baseline, Ticket};

/// What became of a fast copy or an abandon notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// Kept; [`RoomSequence::deliverable`] hands it out when its turn comes.
    Queued,
    /// Already accounted for: a second copy, or a message from before the baseline.
    Duplicate,
    /// Of another counter epoch: the fast broker lost its counters (restarted), so this room
    /// needs a new baseline.
    OtherEpoch,
    /// The horizon jumped further than [`MAX_OUTSTANDING`] tickets: continuity cannot be kept
    /// in bounded memory, so this room needs a new baseline (and its members a resync).
    Overrun,
}

/// Tickets a room may have outstanding (taken, not yet accounted for) before the sequence gives
/// up on continuity. Outstanding tickets are the concurrent sends to one room, so this is far
/// above any real concurrency; it bounds memory against a corrupt or hostile horizon.
pub(crate) const MAX_OUTSTANDING: u64 = 65_536;

/// The delivery order of one room. See the module docs.
#[derive(Debug)]
pub(crate) struct RoomSequence<T> {
    epoch: u64,
    // The highest ticket known to exist (the largest counter value seen).
    top: u64,
    // Tickets at or below `top` not accounted for yet, with when each was first known.
    pending: BTreeMap<u64, Instant>,
    // Received, not delivered: by log offset, with each message's horizon.
    ready: BTreeMap<u64, (u64, T)>,
    // The last offset delivered (or known to hold nothing more of this room).
    last: Option<u64>,
}

impl<T> RoomSequence<T> {
    /// A room followed from `baseline` on.
    pub(crate) fn new(baseline: Baseline, now: Instant) -> Self {
        let pending = baseline
            .open
            .iter()
            .filter(|&&t| t <= baseline.counter)
            .map(|&t| (t, now))
            .collect();
        Self {
            epoch: baseline.epoch,
            top: baseline.counter,
            pending,
            ready: BTreeMap::new(),
            last: None,
        }
    }

    /// The same, for a room already delivered up to `last` (a copy at or below it is a
    /// duplicate).
    pub(crate) fn after(mut self, last: Option<u64>) -> Self {
        self.last = last;
        self
    }

    /// A fast copy: the message at log `offset`, with its ticket and horizon.
    pub(crate) fn accept(
        &mut self,
        ticket: Ticket,
        horizon: u64,
        offset: u64,
        message: T,
        now: Instant,
    ) -> Accepted {
        if ticket.epoch != self.epoch {
            return Accepted::OtherEpoch;
        }
        if self.last.is_some_and(|l| offset <= l) || self.ready.contains_key(&offset) {
            return Accepted::Duplicate;
        }
        match self.account(ticket.n, horizon, now) {
            Accepted::Queued => {
                self.ready.insert(offset, (horizon, message));
                Accepted::Queued
            }
            other => other,
        }
    }

    /// A ticket whose durable write failed, announced by its publisher with the horizon it
    /// read then: nothing will carry it.
    pub(crate) fn abandon(&mut self, ticket: Ticket, horizon: u64, now: Instant) -> Accepted {
        if ticket.epoch != self.epoch {
            return Accepted::OtherEpoch;
        }
        self.account(ticket.n, horizon, now)
    }

    /// Marks ticket `n` accounted for, after learning that tickets up to `max(n, horizon)`
    /// exist.
    fn account(&mut self, n: u64, horizon: u64, now: Instant) -> Accepted {
        let known = self.top;
        let top = n.max(horizon);
        if top > known {
            if top - known > MAX_OUTSTANDING {
                return Accepted::Overrun;
            }
            self.pending.extend((known + 1..=top).map(|t| (t, now)));
            self.top = top;
        }
        if self.pending.remove(&n).is_some() {
            Accepted::Queued
        } else {
            Accepted::Duplicate
        }
    }

    /// Every ticket below this one is accounted for.
    fn accounted(&self) -> u64 {
        self.pending
            .first_key_value()
            .map_or(self.top, |(&t, _)| t - 1)
    }

    /// Appends the messages that may be delivered now, in log order.
    pub(crate) fn deliverable(&mut self, out: &mut Vec<T>) {
        let accounted = self.accounted();
        while let Some(entry) = self.ready.first_entry() {
            if entry.get().0 > accounted {
                break;
            }
            let offset = *entry.key();
            let (_, message) = entry.remove();
            self.last = Some(offset);
            out.push(message);
        }
    }

    /// A complete read of the log: `records` are *all* this room's records at offsets after
    /// [`last_delivered`](Self::last_delivered) up to and including `end`, in offset order,
    /// each with its ticket if it has one (a ticketless record was written while its publisher
    /// could not reach the fast broker). They are delivered at once, in that order, into
    /// `out`; their tickets are accounted for, and copies of them waiting in the sequence are
    /// dropped. Nothing of this room at or below `end` can come later.
    pub(crate) fn fill_from_log(
        &mut self,
        records: impl IntoIterator<Item = (Option<Ticket>, u64, T)>,
        end: u64,
        now: Instant,
        out: &mut Vec<T>,
    ) {
        for (ticket, offset, message) in records {
            if offset > end || self.last.is_some_and(|l| offset <= l) {
                continue;
            }
            if let Some(t) = ticket.filter(|t| t.epoch == self.epoch) {
                // No horizon on a log record: it only says that its own ticket exists.
                let _ = self.account(t.n, 0, now);
            }
            self.ready.remove(&offset);
            self.last = Some(offset);
            out.push(message);
        }
        // Waiting copies at or below `end` are in `records` (the read is complete).
        let keep = self.ready.split_off(&end.saturating_add(1));
        self.ready = keep;
        if self.last.is_none_or(|l| l < end) {
            self.last = Some(end);
        }
        self.deliverable(out);
    }

    /// The last offset delivered, or known to hold nothing more of this room. (The merger keeps
    /// the whole cursor of what it delivered; this is for the tests.)
    #[cfg(test)]
    pub(crate) fn last_delivered(&self) -> Option<u64> {
        self.last
    }

    /// When the oldest ticket that holds back a received message was first known: the caller
    /// reads the log once it has waited long enough, and gives up later still.
    pub(crate) fn blocked_since(&self) -> Option<Instant> {
        let (&first, _) = self.ready.first_key_value()?;
        let (horizon, _) = self.ready.get(&first)?;
        self.pending
            .range(..=*horizon)
            .map(|(_, &since)| since)
            .min()
    }

    /// The tickets not accounted for, oldest first (for the tests).
    #[cfg(test)]
    pub(crate) fn missing(&self) -> impl Iterator<Item = u64> + '_ {
        self.pending.keys().copied()
    }

    /// Gives up on every ticket first known at or before `before` (the caller's gap timeout):
    /// they count as never written, and what waited behind them follows into `out`. Returns
    /// how many; if any, the caller tells the room's subscribers to resync from their cursors,
    /// so a message that did reach the log is still read from there. The gap timeout must
    /// exceed the durable broker's publish timeout, so that no write lands after it.
    pub(crate) fn give_up(&mut self, before: Instant, out: &mut Vec<T>) -> usize {
        let stale: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, &since)| since <= before)
            .map(|(&t, _)| t)
            .collect();
        for t in &stale {
            self.pending.remove(t);
        }
        self.deliverable(out);
        stale.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const E: u64 = 7;

    fn t(n: u64) -> Ticket {
        Ticket { epoch: E, n }
    }

    fn seq(counter: u64, open: &[u64]) -> (RoomSequence<&'static str>, Instant) {
        let now = Instant::now();
        let b = Baseline {
            epoch: E,
            counter,
            open: open.to_vec(),
        };
        (RoomSequence::new(b, now), now)
    }

    fn out(s: &mut RoomSequence<&'static str>) -> Vec<&'static str> {
        let mut v = Vec::new();
        s.deliverable(&mut v);
        v
    }

    #[tokio::test]
    async fn in_order_sends_are_delivered_at_once() {
        let (mut s, now) = seq(0, &[]);
        assert_eq!(s.accept(t(1), 1, 10, "a", now), Accepted::Queued);
        assert_eq!(out(&mut s), ["a"]);
        assert_eq!(s.accept(t(2), 2, 11, "b", now), Accepted::Queued);
        assert_eq!(out(&mut s), ["b"]);
        assert_eq!(s.last_delivered(), Some(11));
        assert_eq!(s.accept(t(2), 2, 11, "b", now), Accepted::Duplicate);
        assert!(out(&mut s).is_empty());
    }

    /// Two concurrent sends: ticket 2 was written to the log first (offset 10) but its fast
    /// copy came second. The copy of ticket 1 (offset 11) read horizon 2, so it waits for
    /// ticket 2 and both go out in log order.
    #[tokio::test]
    async fn a_concurrent_send_is_waited_for_and_log_order_kept() {
        let (mut s, now) = seq(0, &[]);
        assert_eq!(s.accept(t(1), 2, 11, "second", now), Accepted::Queued);
        assert!(out(&mut s).is_empty());
        assert_eq!(s.blocked_since(), Some(now));
        assert_eq!(s.missing().collect::<Vec<_>>(), [2]);
        assert_eq!(s.accept(t(2), 2, 10, "first", now), Accepted::Queued);
        assert_eq!(out(&mut s), ["first", "second"]);
        assert_eq!(s.blocked_since(), None);
    }

    /// A message whose horizon is accounted for is not held back by a later ticket still in
    /// flight: that ticket's offset will be higher.
    #[tokio::test]
    async fn a_later_ticket_in_flight_holds_nothing_back() {
        let (mut s, now) = seq(0, &[]);
        // Ticket 3's copy comes first: tickets 1 and 2 exist, so it waits.
        assert_eq!(s.accept(t(3), 3, 12, "c", now), Accepted::Queued);
        assert!(out(&mut s).is_empty());
        // Ticket 1 read horizon 1: nothing before it can come, ticket 2 is after it.
        assert_eq!(s.accept(t(1), 1, 10, "a", now), Accepted::Queued);
        assert_eq!(out(&mut s), ["a"]);
        assert_eq!(s.accept(t(2), 3, 11, "b", now), Accepted::Queued);
        assert_eq!(out(&mut s), ["b", "c"]);
    }

    #[tokio::test]
    async fn an_abandoned_ticket_releases_what_waited() {
        let (mut s, now) = seq(0, &[]);
        assert_eq!(s.accept(t(2), 2, 10, "b", now), Accepted::Queued);
        assert!(out(&mut s).is_empty());
        assert_eq!(s.abandon(t(1), 2, now), Accepted::Queued);
        assert_eq!(out(&mut s), ["b"]);
    }

    /// At the baseline, tickets that are not open were published before it: dropped if they
    /// show up; open ones are waited for.
    #[tokio::test]
    async fn the_baseline_waits_for_open_tickets_only() {
        let (mut s, now) = seq(5, &[4]);
        assert_eq!(s.accept(t(3), 5, 8, "old", now), Accepted::Duplicate);
        assert_eq!(s.accept(t(6), 6, 12, "new", now), Accepted::Queued);
        assert!(out(&mut s).is_empty(), "ticket 4 is in flight");
        assert_eq!(s.accept(t(4), 6, 11, "open", now), Accepted::Queued);
        assert_eq!(out(&mut s), ["open", "new"]);
    }

    /// A lost fast copy is found by a log read: the read is complete up to its end, so what it
    /// holds goes out in log order, the waiting copy it also holds is dropped, and what is past
    /// its end keeps waiting for its own turn.
    #[tokio::test]
    async fn a_log_read_fills_a_lost_copy() {
        let (mut s, now) = seq(0, &[]);
        assert_eq!(s.accept(t(1), 1, 10, "a", now), Accepted::Queued);
        assert_eq!(out(&mut s), ["a"]);
        // Ticket 2 (offset 11) lost on the fast path; 3 and 4 arrive; 4 read horizon 5.
        assert_eq!(s.accept(t(3), 3, 12, "c", now), Accepted::Queued);
        assert_eq!(s.accept(t(4), 5, 14, "d", now), Accepted::Queued);
        assert!(out(&mut s).is_empty());
        let mut got = Vec::new();
        let records = [
            (Some(t(2)), 11, "b"),
            (None, 13, "ticketless"),
            (Some(t(3)), 12, "c"),
        ];
        let mut records = records.to_vec();
        records.sort_by_key(|r| r.1);
        s.fill_from_log(records, 13, now, &mut got);
        assert_eq!(got, ["b", "c", "ticketless"]);
        assert_eq!(s.last_delivered(), Some(13));
        // "d" still waits for ticket 5.
        assert_eq!(s.missing().collect::<Vec<_>>(), [5]);
        assert_eq!(s.accept(t(5), 5, 15, "e", now), Accepted::Queued);
        assert_eq!(out(&mut s), ["d", "e"]);
        // A late fast copy of a message the log read delivered is a duplicate.
        assert_eq!(s.accept(t(2), 2, 11, "b", now), Accepted::Duplicate);
    }

    #[tokio::test]
    async fn giving_up_releases_what_waited_on_old_tickets_only() {
        let (mut s, now) = seq(0, &[]);
        assert_eq!(s.accept(t(2), 2, 11, "b", now), Accepted::Queued);
        let later = now + Duration::from_secs(1);
        assert_eq!(s.accept(t(4), 4, 13, "d", later), Accepted::Queued);
        let mut got = Vec::new();
        assert_eq!(s.give_up(now, &mut got), 1, "ticket 1 only");
        assert_eq!(got, ["b"]);
        assert_eq!(s.missing().collect::<Vec<_>>(), [3]);
    }

    #[tokio::test]
    async fn another_epoch_or_a_huge_jump_asks_for_a_new_baseline() {
        let (mut s, now) = seq(0, &[]);
        let other = Ticket { epoch: E + 1, n: 1 };
        assert_eq!(s.accept(other, 1, 1, "x", now), Accepted::OtherEpoch);
        assert_eq!(s.abandon(other, 1, now), Accepted::OtherEpoch);
        assert_eq!(
            s.accept(t(1), MAX_OUTSTANDING + 1, 2, "y", now),
            Accepted::Overrun
        );
        assert_eq!(s.missing().count(), 0, "nothing was allocated for the jump");
    }

    /// Randomised: concurrent publishers whose log order differs from their fast order, some
    /// fast copies lost and recovered by a log read. Every message goes out once, in log order.
    #[tokio::test]
    async fn any_interleaving_is_delivered_once_in_log_order() {
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        for _ in 0..200 {
            // 40 sends; ticket i is taken in order, written to the log at a shuffled position
            // among the sends in flight, and published on the fast path after its ack.
            let n = 40u64;
            let mut in_flight: Vec<u64> = Vec::new(); // tickets taken, not yet in the log
            let mut log: Vec<u64> = Vec::new(); // tickets by offset
            let mut acked: Vec<(u64, u64)> = Vec::new(); // (ticket, offset) acked, not fast-published
            let mut fast: Vec<(u64, u64, u64)> = Vec::new(); // (ticket, horizon, offset)
            let mut taken = 0;
            while fast.len() < n as usize {
                match next(3) {
                    0 if taken < n => {
                        taken += 1;
                        in_flight.push(taken);
                    }
                    1 if !in_flight.is_empty() => {
                        let i = next(in_flight.len() as u64) as usize;
                        let tk = in_flight.swap_remove(i);
                        acked.push((tk, log.len() as u64));
                        log.push(tk);
                    }
                    _ if !acked.is_empty() => {
                        let i = next(acked.len() as u64) as usize;
                        let (tk, off) = acked.swap_remove(i);
                        fast.push((tk, taken, off));
                    }
                    _ => {}
                }
            }
            let now = Instant::now();
            let mut s: RoomSequence<u64> = RoomSequence::new(
                Baseline {
                    epoch: E,
                    counter: 0,
                    open: vec![],
                },
                now,
            );
            let mut got = Vec::new();
            for &(tk, h, off) in &fast {
                // One copy in five is lost on the fast path.
                if next(5) != 0 {
                    s.accept(t(tk), h, off, off, now);
                }
                s.deliverable(&mut got);
                if next(4) == 0 {
                    // A log read of what the log holds so far.
                    let from = s.last_delivered().map_or(0, |l| l + 1);
                    let end = log.len() as u64 - 1;
                    if from <= end {
                        let recs: Vec<_> = (from..=end)
                            .map(|o| (Some(t(log[o as usize])), o, o))
                            .collect();
                        s.fill_from_log(recs, end, now, &mut got);
                    }
                }
            }
            let from = s.last_delivered().map_or(0, |l| l + 1);
            let end = log.len() as u64 - 1;
            if from <= end {
                let recs: Vec<_> = (from..=end)
                    .map(|o| (Some(t(log[o as usize])), o, o))
                    .collect();
                s.fill_from_log(recs, end, now, &mut got);
            }
            assert_eq!(got, (0..n).collect::<Vec<_>>());
        }
    }
}
