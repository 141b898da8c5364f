//! Sessions: the shared queues the fan-out fills, the reader-side [`SessionHandle`] and the
//! writer-side [`Session`] whose `recv` decides what is written next.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use super::catchup::{CatchUp, Holding};
use super::stats::inc;
use super::{lock, Hub};
use crate::envelope::{Cursor, Room};
use crate::ResetReason;

/// Why a session was closed by the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// It could not keep up ([`SlowPolicy::Close`](super::SlowPolicy::Close), or too many unread replies).
    SlowConsumer,
    /// The hub is shutting down.
    Shutdown,
    /// The application closed it (e.g. "disconnect this user everywhere").
    Disconnected,
}

/// What [`Session::recv`] hands to the transport's writer.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A frame to send as is (a message, or a reply queued with [`SessionHandle::reply`]).
    Frame(Bytes),
    /// Messages of `room` were lost for this session and cannot be replayed (the broker keeps
    /// no history, or the catch-up limit was reached). `cursor` is the last one it received.
    Lagged {
        /// The room.
        room: Room,
        /// The last cursor delivered in that room.
        cursor: Option<Cursor>,
    },
    /// The session's position in `room` no longer fits the room's log, so what it had is not
    /// a base to build on: its resume cursor (or the last cursor it received) is of a log that
    /// was reset since (another [epoch](Cursor::epoch)), or beyond the end of the log. It is
    /// live from now on: every message that follows is new and delivered, none is dropped as a
    /// copy. The client should reload the room's history (it cannot resume from its cursor).
    Reset {
        /// The room.
        room: Room,
        /// Why.
        reason: ResetReason,
    },
    /// The session is closed; send a close frame and stop.
    Close(CloseReason),
}

/// A session's frame queue keeps at most this much capacity once drained.
const SHRINK_ABOVE: usize = 64;

pub(super) struct SessionShared {
    pub(super) id: u64,
    pub(super) user: Arc<str>,
    // Live frames, bounded by `HubConfig::session_queue`. A plain deque under a mutex rather
    // than a tokio mpsc channel: it allocates nothing until a frame is queued (the channel's
    // first block cost about 1.5 KiB per connection, idle or not), and one lock per push is
    // cheaper than the channel's semaphore and block list.
    pub(super) frames: Mutex<VecDeque<Bytes>>,
    pub(super) control: Mutex<VecDeque<Control>>,
    pub(super) notify: Notify,
    pub(super) closed: Mutex<Option<CloseReason>>,
    pub(super) is_closed: AtomicBool,
    // Rooms joined, with the generation of the join.
    pub(super) rooms: Mutex<HashMap<Room, u64>>,
    // Bytes of queued replies (bounded by `HubConfig::control_bytes`).
    pub(super) control_bytes: AtomicUsize,
    // Set when the `Session` is dropped: a `join` finishing afterwards undoes itself.
    pub(super) dropped: AtomicBool,
}

pub(super) enum Control {
    Reply(Bytes),
    CatchUp {
        room: Room,
        since: Cursor,
        gen: u64,
        // Where the member's held live messages begin.
        holding: Holding,
    },
    Lagged {
        room: Room,
        cursor: Option<Cursor>,
    },
    Reset {
        room: Room,
        reason: ResetReason,
    },
}

impl SessionShared {
    pub(super) fn new(id: u64, user: Arc<str>) -> Self {
        Self {
            id,
            user,
            frames: Mutex::new(VecDeque::new()),
            control: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            closed: Mutex::new(None),
            is_closed: AtomicBool::new(false),
            rooms: Mutex::new(HashMap::new()),
            control_bytes: AtomicUsize::new(0),
            dropped: AtomicBool::new(false),
        }
    }

    /// Queues a live frame; false when the queue is full (the member lags).
    pub(super) fn push_frame(&self, frame: Bytes, limit: usize) -> bool {
        let mut q = lock(&self.frames);
        if q.len() >= limit {
            return false;
        }
        let was_empty = q.is_empty();
        q.push_back(frame);
        drop(q);
        // The writer only waits after it found the queue empty (under this lock), so a push
        // onto a non-empty queue has nobody to wake: at high rates most pushes skip the wake.
        if was_empty {
            self.notify.notify_one();
        }
        true
    }

    /// Moves every queued frame to the end of `into` (one lock per batch: the fan-out, which
    /// pushes under this lock, rarely finds it held by the writer). False if there were none.
    pub(super) fn take_frames(&self, into: &mut VecDeque<Bytes>) -> bool {
        let mut q = lock(&self.frames);
        if q.is_empty() {
            return false;
        }
        if into.is_empty() {
            std::mem::swap(&mut *q, into);
        } else {
            into.extend(q.drain(..));
        }
        true
    }

    pub(super) fn push_control(&self, c: Control, limit: usize) -> bool {
        let mut q = lock(&self.control);
        if q.len() >= limit {
            return false;
        }
        if let Control::Reply(b) = &c {
            self.control_bytes.fetch_add(b.len(), Ordering::Relaxed);
        }
        q.push_back(c);
        drop(q);
        self.notify.notify_one();
        true
    }

    pub(super) fn pop_control(&self) -> Option<Control> {
        let mut q = lock(&self.control);
        let c = q.pop_front();
        if q.is_empty() && q.capacity() > 0 {
            // Replies come in bursts (the welcome, a join's ack) and most sessions then go
            // quiet: a drained queue gives its block back (4 slots, 320 bytes per idle
            // connection) instead of keeping it for the next reply.
            *q = VecDeque::new();
        }
        drop(q);
        if let Some(Control::Reply(b)) = &c {
            self.control_bytes.fetch_sub(b.len(), Ordering::Relaxed);
        }
        c
    }

    /// The generation of this session's membership of `room`, if it is a member.
    pub(super) fn gen(&self, room: &Room) -> Option<u64> {
        lock(&self.rooms).get(room).copied()
    }

    pub(super) fn close(&self, reason: CloseReason) {
        let mut c = lock(&self.closed);
        if c.is_none() {
            *c = Some(reason);
            self.is_closed.store(true, Ordering::Release);
        }
        drop(c);
        self.notify.notify_one();
    }
}

/// The reader side of a session: cloneable, used to join and leave rooms
/// ([`join`](Self::join), [`join_since`](Self::join_since), [`leave`](Self::leave)) and to
/// queue replies.
#[derive(Clone)]
pub struct SessionHandle {
    pub(super) hub: Hub,
    pub(super) shared: Arc<SessionShared>,
}

impl fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionHandle")
            .field("id", &self.shared.id)
            .field("user", &self.shared.user)
            .finish()
    }
}

impl SessionHandle {
    /// The session id, unique within this hub.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The user this session belongs to.
    pub fn user(&self) -> &Arc<str> {
        &self.shared.user
    }

    /// The hub.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The rooms this session is in.
    pub fn rooms(&self) -> Vec<Room> {
        lock(&self.shared.rooms).keys().cloned().collect()
    }

    /// Whether this session is in `room`.
    pub fn is_member(&self, room: &Room) -> bool {
        lock(&self.shared.rooms).contains_key(room)
    }

    /// The cursor of the last message of `room` handed to this session (live or replayed):
    /// how far it can have shown the room. `None` when it got none, or is not a member.
    pub fn last_cursor(&self, room: &Room) -> Option<Cursor> {
        let entry = lock(&self.hub.inner.rooms).get(room).cloned()?;
        let members = lock(&entry.members);
        members
            .list
            .iter()
            .find(|m| Arc::ptr_eq(&m.session, &self.shared))
            .and_then(|m| m.last)
    }

    /// Queues a reply frame (ack, error, pong) to this session only, ahead of further messages.
    /// Returns `false` and closes the session as slow if too many replies (by count or by
    /// bytes) are unread.
    pub fn reply(&self, frame: Bytes) -> bool {
        let config = &self.hub.inner.config;
        let ok = self.shared.control_bytes.load(Ordering::Relaxed) + frame.len()
            <= config.control_bytes.max(1)
            && self
                .shared
                .push_control(Control::Reply(frame), config.control_queue);
        if !ok {
            self.close(CloseReason::SlowConsumer);
        }
        ok
    }

    /// Closes the session: its writer gets [`Outbound::Close`].
    pub fn close(&self, reason: CloseReason) {
        if reason == CloseReason::SlowConsumer {
            inc(&self.hub.inner.stats.slow_closed);
        }
        self.shared.close(reason);
    }

    /// Whether the session was closed.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed.load(Ordering::Acquire)
    }
}

/// The writer side of a session. Dropping it leaves every room.
pub struct Session {
    pub(super) handle: SessionHandle,
    // Live frames taken from the shared queue, written before the next take.
    pub(super) live: VecDeque<Bytes>,
    pub(super) catchup: Option<CatchUp>,
    // Catch-ups not started yet, one per room, run one after another.
    pub(super) waiting: VecDeque<(Room, Cursor, u64, Holding)>,
    pub(super) ready: VecDeque<Bytes>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.handle.shared.id)
            .field("user", &self.handle.shared.user)
            .finish_non_exhaustive()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.handle.shared.dropped.store(true, Ordering::Release);
        let rooms: Vec<Room> = lock(&self.handle.shared.rooms)
            .drain()
            .map(|(r, _)| r)
            .collect();
        for room in rooms {
            self.handle.hub.remove_member(self.handle.shared.id, &room);
        }
        let inner = &self.handle.hub.inner;
        lock(&inner.sessions).remove(&self.handle.shared.id);
        inner.stats.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Session {
    pub(super) fn new(handle: SessionHandle) -> Self {
        Self {
            handle,
            live: VecDeque::new(),
            catchup: None,
            waiting: VecDeque::new(),
            ready: VecDeque::new(),
        }
    }

    /// A handle for the reader side.
    pub fn handle(&self) -> SessionHandle {
        self.handle.clone()
    }

    /// The next thing to write to the client. Never returns `None` while the hub lives; after
    /// [`Outbound::Close`] the transport should stop calling it.
    ///
    /// Cancel-safe: it may be used in `select!`; nothing is lost or repeated when a call is
    /// dropped before it returns.
    pub async fn recv(&mut self) -> Outbound {
        let shared = self.handle.shared.clone();
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Outbound::Frame(b);
            }
            let closed = *lock(&shared.closed);
            if closed == Some(CloseReason::SlowConsumer) {
                return Outbound::Close(CloseReason::SlowConsumer);
            }
            // Replies first: an ack must not wait behind a burst of messages.
            match shared.pop_control() {
                Some(Control::Reply(b)) => return Outbound::Frame(b),
                Some(Control::Lagged { room, cursor }) => return Outbound::Lagged { room, cursor },
                Some(Control::Reset { room, reason }) => return Outbound::Reset { room, reason },
                Some(Control::CatchUp {
                    room,
                    since,
                    gen,
                    holding,
                }) => {
                    // A newer join of a room replaces a catch-up still waiting for it.
                    self.waiting.retain(|(r, ..)| *r != room);
                    self.waiting.push_back((room, since, gen, holding));
                    continue;
                }
                None => {}
            }
            if self.catchup.is_none() {
                if let Some((room, since, gen, holding)) = self.waiting.pop_front() {
                    if shared.gen(&room) != Some(gen) {
                        continue; // left or re-joined since: stale
                    }
                    // Frames of this room queued before it stopped live delivery come first;
                    // none are added while it catches up.
                    self.ready.append(&mut self.live);
                    shared.take_frames(&mut self.ready);
                    self.catchup = Some(CatchUp::new(room, gen, since, holding));
                    continue;
                }
            }
            // Live frames (of other rooms: the one catching up gets none) go on meanwhile.
            if let Some(b) = self.live.pop_front() {
                return Outbound::Frame(b);
            }
            // Give back the memory of a burst once it is written: idle connections stay small.
            if self.live.capacity() > SHRINK_ABOVE {
                self.live = VecDeque::new();
            }
            if shared.take_frames(&mut self.live) {
                continue;
            }
            if self.catchup.is_some() {
                // A reply or a live frame arriving meanwhile interrupts a slow replay request.
                tokio::select! {
                    out = self.step_catchup() => {
                        if let Some(out) = out {
                            return out;
                        }
                    }
                    () = shared.notify.notified() => {}
                }
                continue;
            }
            // On shutdown, what was queued before is still sent, then the close.
            if let Some(reason) = closed {
                return Outbound::Close(reason);
            }
            // Frames, replies, catch-up jobs and closes all notify; a permit stored by a push
            // that raced with the checks above makes this return at once.
            shared.notify.notified().await;
        }
    }
}
