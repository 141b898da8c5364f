//! Shared catch-up reads. When many members resume one room at once (an instance died and its
//! clients reconnect here with `since`), their cursors are the same or close together: one log
//! read serves every catch-up it covers, and the reads in flight are bounded per hub, so a mass
//! reconnect queues for the log instead of overloading it (a member waiting for its read keeps
//! its live messages held, so waiting costs latency, never a `lagged`).
//!
//! A page read before a member started holding its live messages may end before the first
//! message held for it. The catch-up (`catchup.rs`) knows where its held messages begin: a page
//! that reaches the last message the room's pump handed out before the member joined, or a page
//! that reached the end of the log and was read at or after the room's last event before the
//! join ([`Page::started`]), completes it; otherwise it asks for a newer read.
//!
//! Finished reads are dropped by the next catch-up after [`KEEP`]; until then they hold at most
//! the pages of the last reconnect wave.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::TryStreamExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::broker::{history_stream, Broker, HistoryStream, ReplayFrom};
use crate::envelope::{Cursor, Envelope, Room};
use crate::Result;

/// How long a finished read stays available to catch-ups that start right after it: long
/// enough for a reconnect wave, short enough that the pages held stay few.
const KEEP: Duration = Duration::from_secs(2);

/// One page of the log, as read for a catch-up.
pub(super) struct Page {
    /// The messages strictly after the cursor asked for, oldest first.
    pub(super) stream: HistoryStream,
    /// The read returned a full page: the log may go on after it.
    pub(super) more: bool,
    /// When the read began: the page shows the log as it was then (or later).
    pub(super) started: Instant,
}

struct Read {
    from: Cursor,
    limit: usize,
    // When the read was registered; it reads the log only after this.
    started: Instant,
    // `None`: the read failed (each waiter then reads for itself, and sees the error itself).
    result: Shared<BoxFuture<'static, Option<Arc<Fetched>>>>,
}

struct Fetched {
    items: Vec<Envelope>,
    full: bool,
    done: Instant,
}

impl Fetched {
    /// Whether this page holds what comes after `from`, for a read that started at `start`
    /// (at or before `from`). A full page must go past `from` (else the next page is needed);
    /// a page that reached the end of the log must reach `from` (a `from` beyond it is for
    /// the broker to answer: `CursorReset`).
    fn covers(&self, start: Cursor, from: Cursor) -> bool {
        let last = self.items.last().and_then(|e| e.cursor).unwrap_or(start);
        if self.full {
            // Past `from` in the same log: a cursor of another log is the broker's to refuse.
            last.same_log(&from) && !last.is_at_or_before(&from)
        } else {
            from.is_at_or_before(&last)
        }
    }
}

/// The hub's shared catch-up reads (see the module docs).
pub(super) struct Replays {
    permits: Arc<Semaphore>,
    reads: Mutex<HashMap<Room, Vec<Arc<Read>>>>,
    log_reads: AtomicU64,
    shared: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is one insert or retain; a panic elsewhere cannot leave it half-done.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Replays {
    pub(super) fn new(max_reads: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_reads.max(1))),
            reads: Mutex::default(),
            log_reads: AtomicU64::new(0),
            shared: AtomicU64::new(0),
        }
    }

    /// Log reads made so far.
    pub(super) fn log_reads(&self) -> u64 {
        self.log_reads.load(Ordering::Relaxed)
    }

    /// Catch-up pages served by a read made for another member.
    pub(super) fn shared_reads(&self) -> u64 {
        self.shared.load(Ordering::Relaxed)
    }

    /// The messages of `room` after `from`, at most `limit`, from a read begun at or after
    /// `min_started` if given, shared with the other catch-ups it covers.
    pub(super) async fn fetch(
        &self,
        broker: &Arc<dyn Broker>,
        room: &Room,
        from: Cursor,
        limit: usize,
        min_started: Option<Instant>,
    ) -> Result<Page> {
        let (read, mine) = self.find_or_start(broker, room, from, limit, min_started);
        if let Some(fetched) = read.result.clone().await {
            if fetched.covers(read.from, from) {
                if !mine {
                    self.shared.fetch_add(1, Ordering::Relaxed);
                }
                let items: Vec<Envelope> = fetched
                    .items
                    .iter()
                    .filter(|e| e.cursor.is_some_and(|c| !c.is_at_or_before(&from)))
                    .cloned()
                    .collect();
                return Ok(Page {
                    stream: history_stream(items),
                    more: fetched.full,
                    started: read.started,
                });
            }
        }
        // The shared read failed, or ended before `from`: read for this member alone, so that
        // it gets the broker's own error if there is one.
        let _permit = self.permits.acquire().await;
        let started = Instant::now();
        self.log_reads.fetch_add(1, Ordering::Relaxed);
        let stream = broker.replay(room, ReplayFrom::Cursor(from), limit).await?;
        let items: Vec<Envelope> = stream.try_collect().await?;
        let more = items.len() >= limit;
        Ok(Page {
            stream: history_stream(items),
            more,
            started,
        })
    }

    /// A read of `room` that serves `from` (begun at or after `min_started`, if given), or a
    /// new one; `true` when it is new.
    fn find_or_start(
        &self,
        broker: &Arc<dyn Broker>,
        room: &Room,
        from: Cursor,
        limit: usize,
        min_started: Option<Instant>,
    ) -> (Arc<Read>, bool) {
        let now = Instant::now();
        let mut reads = lock(&self.reads);
        // Forget finished reads past KEEP (every room, so rooms nobody resumes again do not
        // keep theirs).
        reads.retain(|_, list| {
            list.retain(|r| match r.result.peek() {
                Some(Some(f)) => now.saturating_duration_since(f.done) < KEEP,
                Some(None) => false,
                None => true,
            });
            !list.is_empty()
        });
        let list = reads.entry(room.clone()).or_default();
        let usable = list.iter().find(|r| {
            min_started.is_none_or(|t| r.started >= t)
                && r.limit == limit
                && r.from.partition == from.partition
                // The same epoch exactly: an epoch-less read (0 matches any log) must not serve
                // a cursor of another log, which the broker would answer with `CursorReset`.
                && r.from.epoch == from.epoch
                && r.from.is_at_or_before(&from)
                && match r.result.peek() {
                    Some(Some(f)) => f.covers(r.from, from),
                    Some(None) => false,
                    // In flight: most likely covers it (cursors of one reconnect wave are
                    // close); if not, `fetch` reads again.
                    None => true,
                }
        });
        if let Some(r) = usable {
            return (r.clone(), false);
        }
        let (broker, room_owned, permits) = (broker.clone(), room.clone(), self.permits.clone());
        // A task of its own: it runs to the end and gives its permit back even when every
        // catch-up waiting for it went away (a read only polled by its waiters would keep the
        // permit for good once they were all dropped, and `max_replays` such reads would stall
        // every catch-up of the hub).
        let task = tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.ok()?;
            let stream = broker
                .replay(&room_owned, ReplayFrom::Cursor(from), limit)
                .await
                .ok()?;
            let items: Vec<Envelope> = stream.try_collect().await.ok()?;
            let full = items.len() >= limit;
            Some(Arc::new(Fetched {
                items,
                full,
                done: Instant::now(),
            }))
        });
        let result = task.map(|r| r.ok().flatten()).boxed().shared();
        self.log_reads.fetch_add(1, Ordering::Relaxed);
        let read = Arc::new(Read {
            from,
            limit,
            started: now,
            result,
        });
        list.push(read.clone());
        (read, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, MemoryBroker};

    async fn broker_with(room: &Room, n: usize) -> (Arc<dyn Broker>, Vec<Cursor>) {
        let b: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
        let mut cursors = Vec::new();
        for i in 0..n {
            let r = b
                .publish(&Envelope::new(room.clone(), format!("m{i}")))
                .await
                .unwrap();
            cursors.push(r.cursor.unwrap());
        }
        (b, cursors)
    }

    async fn bodies(p: Page) -> Vec<String> {
        let items: Vec<Envelope> = p.stream.try_collect().await.unwrap();
        items
            .iter()
            .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn concurrent_catch_ups_of_one_room_share_one_read() {
        let room = Room::new("r").unwrap();
        let (b, c) = broker_with(&room, 10).await;
        let replays = Arc::new(Replays::new(4));
        // Members resuming from 3 different cursors of one reconnect wave.
        let mut tasks = Vec::new();
        for from in [c[2], c[2], c[4], c[2], c[5]] {
            let (replays, b, room) = (replays.clone(), b.clone(), room.clone());
            tasks.push(tokio::spawn(async move {
                let page = replays.fetch(&b, &room, from, 100, None).await.unwrap();
                (page.more, bodies(page).await)
            }));
        }
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        let want = |from: usize| (from + 1..10).map(|i| format!("m{i}")).collect::<Vec<_>>();
        assert_eq!(got[0], (false, want(2)));
        assert_eq!(got[2], (false, want(4)));
        assert_eq!(got[4], (false, want(5)));
        assert_eq!(replays.log_reads(), 1, "one log read for the whole wave");
        assert_eq!(replays.shared_reads(), 4);
    }

    #[tokio::test]
    async fn a_shared_page_says_when_it_was_read_and_a_fresh_one_can_be_asked_for() {
        let room = Room::new("r").unwrap();
        let (b, c) = broker_with(&room, 5).await;
        let replays = Replays::new(4);
        let first = replays.fetch(&b, &room, c[0], 100, None).await.unwrap();
        let read_at = first.started;
        assert_eq!(bodies(first).await.len(), 4);
        b.publish(&Envelope::new(room.clone(), "late"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let joined = Instant::now();
        // Shared: the same page, from before the join (so it cannot end that catch-up) ...
        let page = replays.fetch(&b, &room, c[0], 100, None).await.unwrap();
        assert_eq!(page.started, read_at);
        assert!(page.started < joined);
        assert_eq!(bodies(page).await, ["m1", "m2", "m3", "m4"]);
        // ... and a read begun after the join has the late one.
        let page = replays
            .fetch(&b, &room, c[4], 100, Some(joined))
            .await
            .unwrap();
        assert!(page.started >= joined && !page.more);
        assert_eq!(bodies(page).await, ["late"]);
        assert_eq!(replays.log_reads(), 2);
    }

    #[tokio::test]
    async fn a_full_page_that_ends_before_the_cursor_is_not_used() {
        let room = Room::new("r").unwrap();
        let (b, c) = broker_with(&room, 10).await;
        let replays = Replays::new(4);
        let p = replays.fetch(&b, &room, c[0], 3, None).await.unwrap();
        assert!(p.more);
        assert_eq!(bodies(p).await, ["m1", "m2", "m3"]);
        // From m3 on, that page has nothing: a new read, which goes on from the cursor.
        let p = replays.fetch(&b, &room, c[3], 3, None).await.unwrap();
        assert_eq!(bodies(p).await, ["m4", "m5", "m6"]);
        // Within the first page: served from it, still marked as a full page.
        let p = replays.fetch(&b, &room, c[1], 3, None).await.unwrap();
        assert!(p.more);
        assert_eq!(bodies(p).await, ["m2", "m3"]);
        assert_eq!(replays.log_reads(), 2);
    }

    #[tokio::test]
    async fn reads_in_flight_are_bounded() {
        let room = Room::new("r").unwrap();
        let (b, c) = broker_with(&room, 3).await;
        let replays = Replays::new(1);
        let held = replays.permits.clone().acquire_owned().await.unwrap();
        let fetch = replays.fetch(&b, &room, c[0], 100, None);
        tokio::pin!(fetch);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut fetch)
                .await
                .is_err(),
            "the read waits for a permit"
        );
        drop(held);
        assert_eq!(bodies(fetch.await.unwrap()).await, ["m1", "m2"]);
    }

    #[tokio::test]
    async fn a_read_whose_waiters_all_went_away_still_gives_its_permit_back() {
        let (room, other) = (Room::new("r").unwrap(), Room::new("o").unwrap());
        let (b, c) = broker_with(&room, 3).await;
        let oc = b
            .publish(&Envelope::new(other.clone(), "o0"))
            .await
            .unwrap()
            .cursor
            .unwrap();
        b.publish(&Envelope::new(other.clone(), "o1"))
            .await
            .unwrap();
        let replays = Replays::new(1);
        let held = replays.permits.clone().acquire_owned().await.unwrap();
        {
            // A catch-up starts a read that waits for the permit, then its session goes away.
            let fetch = replays.fetch(&b, &room, c[0], 100, None);
            tokio::pin!(fetch);
            let _ = tokio::time::timeout(Duration::from_millis(20), &mut fetch).await;
        }
        drop(held);
        let page = tokio::time::timeout(
            Duration::from_secs(2),
            replays.fetch(&b, &other, oc, 100, None),
        )
        .await
        .expect("another room's catch-up must get the permit back")
        .unwrap();
        assert_eq!(bodies(page).await, ["o1"]);
    }

    #[tokio::test]
    async fn a_cursor_of_another_log_is_never_served_from_an_epoch_less_read() {
        let room = Room::new("r").unwrap();
        let (b, c) = broker_with(&room, 10).await;
        let stale = Cursor::with_epoch(0, c[4].offset, c[0].epoch.wrapping_add(1).max(1));
        let replays = Replays::new(4);
        // A full page read from an epoch-less cursor (0 matches every log) ...
        let p = replays
            .fetch(&b, &room, Cursor::new(0, c[1].offset), 3, None)
            .await
            .unwrap();
        assert!(p.more);
        // ... does not serve a cursor of another log: the broker answers it with a reset.
        match replays.fetch(&b, &room, stale, 3, None).await {
            Err(crate::Error::CursorReset { .. }) => {}
            Ok(_) => panic!("a cursor of another log was served a page of this one"),
            Err(e) => panic!("{e}"),
        }
    }
}
