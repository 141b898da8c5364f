//! The room registry: which local sessions are in which room, joining and leaving.
//!
//! Lock order, everywhere: the hub's room map, then a room's members, then a session's own
//! locks. A room entry leaves the map only under both of the first two, marked `removed`, so
//! a joiner that raced with the last leave retries on a fresh entry instead of joining a room
//! whose pump is gone.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::OnceCell;

use super::catchup::Holding;
use super::pump::pump;
use super::session::{Control, SessionShared};
use super::stats::inc;
use super::{lock, CloseReason, Hub, SessionHandle};
use crate::broker::Interest;
use crate::envelope::{Cursor, Room};
use crate::{Error, Result};

pub(super) struct RoomEntry {
    pub(super) room: Room,
    pub(super) members: Mutex<Members>,
    // Set once the broker subscription and its pump are running.
    pub(super) pump: OnceCell<tokio::task::AbortHandle>,
}

#[derive(Default)]
pub(super) struct Members {
    pub(super) list: Vec<Member>,
    // Set under this lock when the entry leaves the hub's map: a joiner holding a stale Arc
    // sees it and retries with a fresh entry.
    pub(super) removed: bool,
    // The cursor of the last message the pump handed to the members (set under this lock as
    // it fans out): a member that starts holding its live messages now holds everything after
    // it, so its catch-up is complete once it reaches it (see `catchup.rs`).
    pub(super) last_dispatched: Option<Cursor>,
    // When the room's subscription was established or last handed out a message, whichever is
    // later. Every broker with a log stores a message before it delivers it, and a message
    // not delivered to a subscription was stored before the subscription was established; so
    // a member that starts holding its live messages now needs from the log only what a read
    // begun at this instant sees.
    pub(super) last_event: Option<tokio::time::Instant>,
}

pub(super) struct Member {
    pub(super) session: Arc<SessionShared>,
    // The last cursor handed to this member: the resume point, and the dedupe bound. Only
    // cursors actually delivered go here, never a client's `since` (which may be wrong).
    pub(super) last: Option<Cursor>,
    pub(super) mode: Mode,
    // Which join this membership belongs to: a catch-up queued by an earlier join (or before
    // a leave) carries an older number and is dropped.
    pub(super) gen: u64,
}

pub(super) enum Mode {
    Live,
    CatchingUp {
        pending: VecDeque<(Option<Cursor>, Bytes)>,
        overflowed: bool,
    },
}

/// What a join did ([`SessionHandle::join`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Joined {
    /// A resume cursor was given and the broker keeps history: the missed messages will be
    /// delivered before live ones, or, when the cursor does not fit the room's log (another
    /// epoch, or beyond its end), an [`Outbound::Reset`](super::Outbound::Reset) and live ones.
    pub resuming: bool,
}

/// How to join a room ([`SessionHandle::join_with`]).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
#[must_use]
pub struct JoinOptions {
    /// Resume after this cursor: the messages after it are delivered first, then live ones.
    pub since: Option<Cursor>,
    /// A frame queued to the session before anything of the room (the join's ack).
    pub reply: Option<Bytes>,
}

impl JoinOptions {
    /// Sets [`since`](Self::since) (`None`: no resume, live from now on).
    pub fn since(mut self, cursor: impl Into<Option<Cursor>>) -> Self {
        self.since = cursor.into();
        self
    }

    /// Sets [`reply`](Self::reply).
    pub fn reply(mut self, frame: Bytes) -> Self {
        self.reply = Some(frame);
        self
    }
}

impl SessionHandle {
    /// Joins `room`: this session receives its live messages from now on.
    ///
    /// Joining a room the session is already in makes it live from now on; a catch-up still
    /// running from an earlier join of that room is abandoned.
    pub async fn join(&self, room: Room) -> Result<Joined> {
        self.join_with(room, JoinOptions::default()).await
    }

    /// Joins `room` resuming after `cursor`: the messages after it are delivered first, then
    /// live ones, with no gap and no duplicate (where the broker keeps history; see
    /// [`Joined::resuming`]).
    pub async fn join_since(&self, room: Room, cursor: Cursor) -> Result<Joined> {
        self.join_with(room, JoinOptions::default().since(cursor))
            .await
    }

    /// Joins `room` with [`JoinOptions`]. Fails with [`Error::Closed`] if the [`Session`]
    /// was dropped meanwhile (nothing is left behind), or with the broker's error if the
    /// room's subscription could not be made.
    ///
    /// [`Session`]: super::Session
    pub async fn join_with(&self, room: Room, options: JoinOptions) -> Result<Joined> {
        self.hub
            .join(self, room, options.since, options.reply)
            .await
    }

    /// Leaves `room`. Returns whether it was a member.
    pub fn leave(&self, room: &Room) -> bool {
        lock(&self.shared.rooms).remove(room);
        self.hub.remove_member(self.shared.id, room)
    }
}

impl Hub {
    async fn join(
        &self,
        session: &SessionHandle,
        room: Room,
        since: Option<Cursor>,
        reply: Option<Bytes>,
    ) -> Result<Joined> {
        let resuming = since.is_some() && self.inner.broker.capabilities().replay;
        loop {
            let entry = {
                let mut rooms = lock(&self.inner.rooms);
                rooms
                    .entry(room.clone())
                    .or_insert_with(|| {
                        inc(&self.inner.stats.rooms);
                        Arc::new(RoomEntry {
                            room: room.clone(),
                            members: Mutex::new(Members::default()),
                            pump: OnceCell::new(),
                        })
                    })
                    .clone()
            };
            // Subscribe before the member is added and before any replay, so that nothing
            // published from now on can fall between history and live.
            entry
                .pump
                .get_or_try_init(|| async {
                    let sub = self
                        .inner
                        .broker
                        .subscribe(Interest::room(room.clone()))
                        .await?;
                    lock(&entry.members).last_event = Some(tokio::time::Instant::now());
                    let task = tokio::spawn(pump(
                        Arc::downgrade(&self.inner),
                        Arc::downgrade(&entry),
                        sub,
                    ));
                    Ok::<_, Error>(task.abort_handle())
                })
                .await
                .inspect_err(|_| self.remove_if_empty(&entry))?;
            let gen = self.inner.next_gen.fetch_add(1, Ordering::Relaxed);
            let mut members = lock(&entry.members);
            if members.removed {
                continue;
            }
            // The reply goes first, before the member can receive anything.
            if let Some(reply) = reply {
                session
                    .shared
                    .push_control(Control::Reply(reply), usize::MAX);
            }
            let mode = if resuming {
                Mode::CatchingUp {
                    pending: VecDeque::new(),
                    overflowed: false,
                }
            } else {
                Mode::Live
            };
            match members
                .list
                .iter_mut()
                .find(|m| m.session.id == session.shared.id)
            {
                Some(m) => {
                    m.mode = mode;
                    m.gen = gen;
                }
                None => crate::push_compact(
                    &mut members.list,
                    Member {
                        session: session.shared.clone(),
                        last: None,
                        mode,
                        gen,
                    },
                ),
            }
            // Read under the lock that set the mode: the pump hands this member everything
            // after it from now on.
            let holding = Holding {
                since: members.last_event.unwrap_or_else(tokio::time::Instant::now),
                after: members.last_dispatched,
            };
            drop(members);
            lock(&session.shared.rooms).insert(room.clone(), gen);
            if session.shared.dropped.load(Ordering::Acquire) {
                // The Session was dropped while we joined: its Drop could not see this room.
                self.remove_member(session.shared.id, &room);
                return Err(Error::Closed);
            }
            if let (true, Some(since)) = (resuming, since) {
                let job = Control::CatchUp {
                    room,
                    since,
                    gen,
                    holding,
                };
                if !session
                    .shared
                    .push_control(job, self.inner.config.control_queue)
                {
                    session.shared.close(CloseReason::SlowConsumer);
                }
            }
            return Ok(Joined { resuming });
        }
    }

    pub(super) fn remove_member(&self, session_id: u64, room: &Room) -> bool {
        let entry = lock(&self.inner.rooms).get(room).cloned();
        let Some(entry) = entry else {
            return false;
        };
        let mut members = lock(&entry.members);
        let before = members.list.len();
        members.list.retain(|m| m.session.id != session_id);
        let removed = members.list.len() != before;
        drop(members);
        self.remove_if_empty(&entry);
        removed
    }

    fn remove_if_empty(&self, entry: &Arc<RoomEntry>) {
        let mut rooms = lock(&self.inner.rooms);
        let mut members = lock(&entry.members);
        if members.list.is_empty() && !members.removed {
            members.removed = true;
            if rooms
                .get(&entry.room)
                .is_some_and(|e| Arc::ptr_eq(e, entry))
            {
                rooms.remove(&entry.room);
                self.inner.stats.rooms.fetch_sub(1, Ordering::Relaxed);
            }
            // Dropping the pump drops the broker subscription (the broker unsubscribes).
            if let Some(pump) = entry.pump.get() {
                pump.abort();
            }
        }
    }
}
