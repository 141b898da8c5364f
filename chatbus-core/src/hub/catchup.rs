//! Catch-up: replaying a member's missed messages from the log, then switching it to live
//! with no gap and no duplicate. It runs inside [`Session::recv`], paced by the writer.

use std::time::Duration;

use futures::StreamExt;

use super::registry::Mode;
use super::replays::Page;
use super::session::Control;
use super::stats::inc;
use super::{lock, CloseReason, Outbound, Session};
use crate::broker::HistoryStream;
use crate::envelope::{Cursor, Room};
use crate::{Error, ResetReason, Result};

/// A replay request in flight, kept across cancellations of `Session::recv` (transports call it
/// inside `select!`), so that a cancelled call neither loses nor repeats work.
type Fetch = futures::future::BoxFuture<'static, Result<Page>>;

pub(super) struct CatchUp {
    room: Room,
    // The membership this catch-up belongs to.
    gen: u64,
    // Where the client said it was.
    since: Cursor,
    // The last cursor replayed to it: replay continues strictly after it.
    delivered: Option<Cursor>,
    fetch: Option<Fetch>,
    stream: Option<HistoryStream>,
    // The current page was full: the log may go on after it.
    more: bool,
    // When the current page was read.
    page_read: tokio::time::Instant,
    // Where the member's held live messages begin.
    holding: Holding,
    // The last page ended the log as it was before the member held its live messages, and did
    // not reach where they begin: the next read must be newer than that.
    need_fresh: bool,
    count: usize,
    // Failed replay requests in a row; transient errors are retried a few times.
    failures: u32,
}

impl CatchUp {
    pub(super) fn new(room: Room, gen: u64, since: Cursor, holding: Holding) -> Self {
        Self {
            room,
            gen,
            since,
            delivered: None,
            fetch: None,
            stream: None,
            more: false,
            page_read: holding.since,
            holding,
            need_fresh: false,
            count: 0,
            failures: 0,
        }
    }

    /// The position replay continues from.
    fn position(&self) -> Cursor {
        self.delivered.unwrap_or(self.since)
    }

    /// Whether the member has everything before its held live messages: it reached the last
    /// message handed out before it started holding, or the last page reached the end of a log
    /// read after that.
    fn has_all_before_held(&self) -> bool {
        let reached = self
            .holding
            .after
            .is_some_and(|a| a.is_at_or_before(&self.position()));
        reached || (!self.more && self.page_read >= self.holding.since)
    }

    /// The held messages were dropped (they overflowed) and are held afresh from now on.
    fn holding_again(&mut self) {
        self.holding = Holding {
            since: tokio::time::Instant::now(),
            after: None,
        };
    }
}

/// Where a member's held live messages begin: a log read begun at or after `since` sees every
/// message it does not hold (the room's last event before it started holding), and (when
/// known) the room's pump had handed out everything up to `after` by then, so it holds every
/// message after `after`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Holding {
    pub(super) since: tokio::time::Instant,
    pub(super) after: Option<Cursor>,
}

/// Replay requests retried after a failure before the client is told it lagged.
const CATCHUP_RETRIES: u32 = 3;

impl Session {
    /// Advances the current catch-up by at most one message; `None` when it made progress
    /// without a frame to send (a new page, a skipped copy, or the switch back to live).
    pub(super) async fn step_catchup(&mut self) -> Option<Outbound> {
        let inner = self.handle.hub.inner.clone();
        let page = inner.config.replay_page.max(1);
        let shared = self.handle.shared.clone();
        let cu = self.catchup.as_mut()?;
        if shared.gen(&cu.room) != Some(cu.gen) {
            // Left, or joined again (which queued its own catch-up): abandon this one.
            self.catchup = None;
            return None;
        }
        if cu.stream.is_none() {
            let fetch = cu.fetch.get_or_insert_with(|| {
                let (broker, replays, room, from) = (
                    inner.broker.clone(),
                    inner.replays.clone(),
                    cu.room.clone(),
                    cu.delivered.unwrap_or(cu.since),
                );
                let fresh = cu.need_fresh.then_some(cu.holding.since);
                let backoff = Duration::from_millis(200 << cu.failures.min(4));
                let wait = cu.failures > 0;
                Box::pin(async move {
                    if wait {
                        tokio::time::sleep(backoff).await;
                    }
                    // Shared with the other members resuming this room from about here.
                    replays.fetch(&broker, &room, from, page, fresh).await
                })
            });
            let result = fetch.await;
            cu.fetch = None;
            match result {
                Ok(p) => {
                    cu.more = p.more;
                    cu.page_read = p.started;
                    cu.need_fresh = false;
                    cu.failures = 0;
                    cu.stream = Some(p.stream);
                }
                Err(Error::CursorReset { reason, .. }) => {
                    return Some(self.end_catchup_reset(reason));
                }
                Err(e) if e.is_transient() && cu.failures < CATCHUP_RETRIES => {
                    cu.failures += 1;
                    tracing::debug!(room = %cu.room, error = %e, "catch-up replay failed; retrying");
                    return None;
                }
                Err(e) => {
                    tracing::warn!(room = %cu.room, error = %e, "catch-up replay failed");
                    return Some(self.end_catchup_lagged());
                }
            }
        }
        let stream = cu.stream.as_mut()?;
        match stream.next().await {
            Some(Ok(env)) => {
                let c = env.cursor?;
                if c.is_at_or_before(&cu.position()) {
                    return None;
                }
                cu.delivered = Some(c);
                cu.count += 1;
                inc(&inner.stats.replayed);
                let frame = inner.encoder.encode(&env).map(|f| f.bytes);
                if cu.count >= inner.config.max_catchup {
                    // Enough: go live from here and tell the client what it did not get.
                    let lagged = self.end_catchup_lagged();
                    if let Outbound::Lagged { room, cursor } = lagged {
                        shared.push_control(Control::Lagged { room, cursor }, usize::MAX);
                    }
                }
                frame.map(Outbound::Frame)
            }
            Some(Err(Error::CursorReset { reason, .. })) => {
                cu.stream = None;
                Some(self.end_catchup_reset(reason))
            }
            Some(Err(e)) => {
                tracing::warn!(room = %cu.room, error = %e, "catch-up replay failed");
                cu.stream = None;
                if e.is_transient() && cu.failures < CATCHUP_RETRIES {
                    cu.failures += 1;
                    return None;
                }
                Some(self.end_catchup_lagged())
            }
            None => {
                cu.stream = None;
                // A full page means the log may go on: fetch the next. A short page reached the
                // end of the log as it was when fetched; everything published since then is
                // either held for us (pending) or not yet fanned out (the pump will deliver it
                // live, after our cursor).
                if !cu.has_all_before_held() {
                    // A full page: the log goes on. A short page read (for another member)
                    // before this one held its live messages: what came in between is in
                    // neither, so read on with a newer read.
                    cu.need_fresh = !cu.more;
                    return None;
                }
                if self.go_live(false, false) {
                    self.catchup = None;
                } else if let Some(cu) = self.catchup.as_mut() {
                    cu.holding_again();
                }
                None
            }
        }
    }

    /// Ends a catch-up whose position does not fit the room's log (another epoch, or beyond
    /// its end): nothing can be replayed from it, so the member goes live at once with every
    /// message held meanwhile (none of them is a copy of something it has), and the client is
    /// told to reload.
    fn end_catchup_reset(&mut self, reason: ResetReason) -> Outbound {
        self.go_live(true, true);
        let Some(cu) = self.catchup.take() else {
            return Outbound::Close(CloseReason::Shutdown);
        };
        inc(&self.handle.hub.inner.stats.resets);
        tracing::debug!(room = %cu.room, since = %cu.since, %reason, "resume cursor does not fit the log; live from now on");
        Outbound::Reset {
            room: cu.room,
            reason,
        }
    }

    /// Gives up a catch-up (replay failed or the limit was reached): the member goes live and
    /// the client is told it lagged, with the last cursor it got.
    fn end_catchup_lagged(&mut self) -> Outbound {
        self.go_live(true, false);
        let Some(cu) = self.catchup.take() else {
            return Outbound::Close(CloseReason::Shutdown);
        };
        let cursor = Some(cu.position());
        Outbound::Lagged {
            room: cu.room,
            cursor,
        }
    }

    /// Moves this session's member of the catching-up room to live: the live messages held
    /// meanwhile that come after what the client has are queued (older ones are copies of
    /// replayed ones). Without `force`, refuses when held messages overflowed or the room's
    /// live stream lagged meanwhile (returns false: what was missed is in the log, so the
    /// caller replays on; the buffer starts empty again). With `reset`, what the client had is
    /// of no use as a bound (it is not a position of this log): every held message is queued.
    fn go_live(&mut self, force: bool, reset: bool) -> bool {
        let Some(cu) = self.catchup.as_ref() else {
            return true;
        };
        let inner = self.handle.hub.inner.clone();
        let entry = lock(&inner.rooms).get(&cu.room).cloned();
        let Some(entry) = entry else { return true };
        let mut members = lock(&entry.members);
        let Some(m) = members
            .list
            .iter_mut()
            .find(|m| m.session.id == self.handle.shared.id && m.gen == cu.gen)
        else {
            return true;
        };
        let Mode::CatchingUp {
            pending,
            overflowed,
        } = &mut m.mode
        else {
            return true;
        };
        if *overflowed && !force {
            pending.clear();
            *overflowed = false;
            return false;
        }
        let held = std::mem::take(pending);
        // What the client has: what was replayed to it, or else what it said it had.
        let mut bound = (!reset).then(|| cu.position());
        if reset {
            m.last = None;
        } else if let Some(d) = cu.delivered {
            if m.last.is_none_or(|l| !l.same_log(&d) || l < d) {
                m.last = Some(d);
            }
        }
        let mut other_log = false;
        for (c, frame) in held {
            if let Some(c) = c {
                if let Some(b) = bound {
                    if c.is_at_or_before(&b) {
                        inc(&inner.stats.duplicates);
                        continue;
                    }
                    // The log started over while this member caught up: what follows is new.
                    other_log |= !c.same_log(&b);
                }
                bound = Some(c);
                m.last = Some(c);
            }
            self.ready.push_back(frame);
        }
        if other_log {
            inc(&inner.stats.resets);
            let note = Control::Reset {
                room: cu.room.clone(),
                reason: ResetReason::OtherLog,
            };
            self.handle.shared.push_control(note, usize::MAX);
        }
        m.mode = Mode::Live;
        true
    }
}
