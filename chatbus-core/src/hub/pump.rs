//! The per-room pump: reads the room's broker subscription and fans each message out to the
//! room's members, encoded once; members that cannot keep up lag or are closed.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use super::catchup::Holding;
use super::registry::{Member, Mode, RoomEntry};
use super::session::Control;
use super::stats::inc;
use super::{lock, CloseReason, HubInner, SlowPolicy};
use crate::broker::{Interest, Subscription};
use crate::envelope::{Cursor, Envelope, Room};
use crate::{Error, ResetReason};

/// Reads one room's broker subscription and fans every message out to the room's members.
pub(super) async fn pump(hub: Weak<HubInner>, entry: Weak<RoomEntry>, mut sub: Subscription) {
    // Allocated when messages arrive (by `recv_many`) and released once the subscription is
    // drained: there is one pump per room with local members (every connected user's personal
    // channel included), and a 64-envelope buffer held by each idle one was ~9 KiB per room.
    let mut batch = Vec::new();
    loop {
        if sub.recv_many(&mut batch, 64).await == 0 {
            // The broker ended the subscription (it gave up reconnecting): resubscribe, and let
            // members resync from their cursors since messages may have been missed.
            // Boxed: inline, its timer and the broker's future made every pump task (one per
            // room, and every connection has its personal channel's) larger, idle or not.
            match Box::pin(resubscribe(&hub, &entry)).await {
                Some(Some(s)) => sub = s,
                Some(None) => {}
                None => return,
            }
            continue;
        }
        let (Some(hub), Some(entry)) = (hub.upgrade(), entry.upgrade()) else {
            return;
        };
        for item in batch.drain(..) {
            match item {
                Ok(env) => {
                    fan_out(&hub, &entry, &env);
                }
                Err(e) => {
                    inc(&hub.stats.broker_errors);
                    tracing::debug!(room = %entry.room, error = %e, "broker subscription error");
                    if matches!(e, Error::Lagged { .. }) {
                        resync_all(&hub, &entry);
                    }
                }
            }
        }
        if sub.is_empty() {
            // Idle now: give the buffer back. While messages keep coming it is reused.
            batch = Vec::new();
        }
    }
}

/// After the broker ended the subscription: a new one (`Some(None)` if that failed, to retry),
/// with every member resynced; `None` when the room or the hub is gone.
async fn resubscribe(
    hub: &Weak<HubInner>,
    entry: &Weak<RoomEntry>,
) -> Option<Option<Subscription>> {
    let (hub, entry) = (hub.upgrade()?, entry.upgrade()?);
    inc(&hub.stats.broker_errors);
    tokio::time::sleep(Duration::from_millis(500)).await;
    match hub
        .broker
        .subscribe(Interest::room(entry.room.clone()))
        .await
    {
        Ok(s) => {
            resync_all(&hub, &entry);
            Some(Some(s))
        }
        Err(e) => {
            tracing::warn!(room = %entry.room, error = %e, "resubscribe failed");
            Some(None)
        }
    }
}

/// Every live member of the room replays from its last cursor (or is told it lagged).
fn resync_all(hub: &HubInner, entry: &RoomEntry) {
    let mut members = lock(&entry.members);
    // The lost messages were never handed out, so "everything after the last one handed out"
    // is no longer what a member that joins now will hold: a join from here on needs a read
    // begun after this (they were stored before the loss was reported).
    members.last_dispatched = None;
    members.last_event = Some(tokio::time::Instant::now());
    for m in &mut members.list {
        match &mut m.mode {
            // The subscription lost messages the pump never handed out: where the held ones
            // begin says nothing about them (`None`).
            Mode::Live => lag_member(hub, &entry.room, m, None, None),
            // What the live stream lost may be in neither the page already fetched nor the
            // held messages: make its catch-up replay again before going live.
            Mode::CatchingUp { overflowed, .. } => *overflowed = true,
        }
    }
}

/// `missed` is the cursor of the message that did not fit, if known: with no cursor delivered
/// yet, replay resumes just before it. `live_from`: the last message handed out before the
/// member starts holding (`missed` itself, which it did not get), if nothing else was lost.
fn lag_member(
    hub: &HubInner,
    room: &Room,
    m: &mut Member,
    missed: Option<Cursor>,
    live_from: Option<Cursor>,
) {
    inc(&hub.stats.lagged);
    let before_missed = missed.filter(|c| c.offset > 0).map(|c| Cursor {
        offset: c.offset - 1,
        ..c
    });
    match (
        hub.config.slow_policy,
        m.last.or(before_missed),
        hub.broker.capabilities().replay,
    ) {
        (SlowPolicy::Close, _, _) => {
            inc(&hub.stats.slow_closed);
            m.session.close(CloseReason::SlowConsumer);
        }
        (SlowPolicy::Resync, Some(since), true) => {
            m.mode = Mode::CatchingUp {
                pending: VecDeque::new(),
                overflowed: false,
            };
            let job = Control::CatchUp {
                room: room.clone(),
                since,
                gen: m.gen,
                holding: Holding {
                    since: tokio::time::Instant::now(),
                    after: live_from,
                },
            };
            if !m.session.push_control(job, hub.config.control_queue) {
                m.session.close(CloseReason::SlowConsumer);
            }
        }
        (SlowPolicy::Resync, cursor, _) => {
            // Nothing to replay from: the loss is reported and live delivery goes on.
            let note = Control::Lagged {
                room: room.clone(),
                cursor,
            };
            if !m.session.push_control(note, hub.config.control_queue) {
                m.session.close(CloseReason::SlowConsumer);
            }
        }
    }
}

pub(super) fn fan_out(hub: &HubInner, entry: &RoomEntry, env: &Envelope) -> u64 {
    inc(&hub.stats.messages_in);
    let Some(frame) = hub.encoder.encode(env) else {
        return 0;
    };
    let mut delivered = 0u64;
    let mut duplicates = 0u64;
    let mut members = lock(&entry.members);
    // Before the loop: a member that lags on this message starts holding after it, so its
    // catch-up must reach it.
    if env.cursor.is_some() {
        members.last_dispatched = env.cursor;
        members.last_event = Some(tokio::time::Instant::now());
    }
    for m in &mut members.list {
        if frame.skip_sender && env.from.as_deref() == Some(&*m.session.user) {
            continue;
        }
        if let Some(room) = &frame.skip_members_of {
            if m.session.gen(room).is_some() {
                continue;
            }
        }
        // Cursors of one room only grow within one log, so a cursor at or below the member's
        // last is a copy it already has (replayed during catch-up, or delivered twice by the
        // broker). A cursor of another epoch is never a copy: the log started over (Redis came
        // back empty, ...) and its positions are unrelated to the old ones.
        let reset = match (env.cursor, m.last) {
            (Some(c), Some(l)) if c.is_at_or_before(&l) => {
                duplicates += 1;
                continue;
            }
            (Some(c), Some(l)) => !c.same_log(&l),
            _ => false,
        };
        match &mut m.mode {
            Mode::Live => {
                if reset {
                    // Told ahead of the message (replies go first): its history no longer
                    // matches the log, so it reloads; what follows is new.
                    let note = Control::Reset {
                        room: entry.room.clone(),
                        reason: ResetReason::OtherLog,
                    };
                    if !m.session.push_control(note, hub.config.control_queue) {
                        m.session.close(CloseReason::SlowConsumer);
                        continue;
                    }
                    inc(&hub.stats.resets);
                    // The old position is no resume point either, should this frame not fit.
                    m.last = None;
                }
                if m.session
                    .push_frame(frame.bytes.clone(), hub.config.session_queue.max(1))
                {
                    delivered += 1;
                    if env.cursor.is_some() {
                        m.last = env.cursor;
                    }
                } else {
                    lag_member(hub, &entry.room, m, env.cursor, env.cursor);
                }
            }
            Mode::CatchingUp {
                pending,
                overflowed,
            } => {
                if pending.len() < hub.config.pending_limit {
                    pending.push_back((env.cursor, frame.bytes.clone()));
                } else {
                    *overflowed = true;
                }
            }
        }
    }
    drop(members);
    hub.stats.deliveries.fetch_add(delivered, Ordering::Relaxed);
    hub.stats
        .duplicates
        .fetch_add(duplicates, Ordering::Relaxed);
    delivered
}
