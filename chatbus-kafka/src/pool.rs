//! The pool of replay consumers ("readers") that `replay` and `history` share.
//!
//! Everything that reads blocks (librdkafka's consumer API is synchronous): callers run it on
//! tokio's blocking threads, holding a [`Slot`] for the whole time. The slots bound how many
//! reads run at once, so a crowd of clients resuming together (every client of an instance
//! that died) queues for a few readers instead of each opening its own consumer (threads,
//! connections) and occupying a blocking thread. What a reader reads is in `reader.rs`.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatbus_core::{Error, Result};
use rdkafka::consumer::BaseConsumer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::client::{self, lock, Context};
use crate::config::KafkaConfig;
use crate::epoch::Epochs;

pub(crate) type Reader = BaseConsumer<Context>;

const READER_FETCH_WAIT: Duration = Duration::from_millis(5);

/// A pool of replay consumers, at most [`KafkaConfig::max_concurrent_replays`] of them.
pub(crate) struct Readers {
    config: KafkaConfig,
    ctx: Context,
    /// Readers not in use, kept for reuse: creating a librdkafka consumer costs threads, a
    /// connection and a metadata round trip, too much for every page of history. A reader is
    /// only created by a slot holder that found none idle, so there are never more readers
    /// than slots, idle or not.
    idle: Mutex<Vec<Reader>>,
    slots: Arc<Semaphore>,
    /// Readers created so far (a metric).
    pub(crate) created: AtomicU64,
    /// Callers waiting for a slot (a metric).
    waiting: AtomicUsize,
    /// The partitions' epochs, learned by the readers too (see `epoch.rs`).
    pub(crate) epochs: Arc<Epochs>,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers")
            .field("idle", &lock(&self.idle).len())
            .field("active", &self.active())
            .field("waiting", &self.waiting())
            .finish_non_exhaustive()
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        // Closing a consumer blocks (it joins librdkafka's threads): not on an async worker.
        let idle = std::mem::take(&mut *lock(&self.idle));
        if !idle.is_empty() {
            crate::producer::retire(idle);
        }
    }
}

/// The right to read with one reader; see [`Readers::acquire`].
pub(crate) struct Slot {
    readers: Arc<Readers>,
    permit: OwnedSemaphorePermit,
}

impl Slot {
    /// An idle reader, or a new one; it goes back to the pool when the lease is dropped.
    /// Blocking (creating a consumer starts its threads): call it on a blocking thread.
    pub(crate) fn lease(self) -> Result<Lease> {
        let reader = self.readers.take()?;
        Ok(Lease {
            readers: self.readers,
            reader: Some(reader),
            _permit: self.permit,
        })
    }
}

/// A reader in use. Dropping it, wherever that happens (a finished read, an error, a replay
/// future or stream dropped by its caller), returns the reader to the pool and then frees its
/// slot for the next caller.
pub(crate) struct Lease {
    readers: Arc<Readers>,
    reader: Option<Reader>,
    // Dropped after `drop` ran, so the reader is back in the pool before a waiter wakes up.
    _permit: OwnedSemaphorePermit,
}

impl Deref for Lease {
    type Target = Reader;

    fn deref(&self) -> &Reader {
        // Only `drop` takes the reader out.
        self.reader
            .as_ref()
            .unwrap_or_else(|| unreachable!("a lease holds its reader until dropped"))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            // Every read leaves the reader unassigned (see `scan`), so it is clean for the next.
            self.readers.give(reader);
        }
    }
}

/// Set when the caller of a read went away, so that a blocking read stops early and gives its
/// reader back instead of finishing work nobody wants.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Sets its [`Cancel`] when dropped: kept by the future or stream that waits for a read.
#[derive(Debug, Default)]
pub(crate) struct CancelOnDrop(Cancel);

impl CancelOnDrop {
    pub(crate) fn token(&self) -> Cancel {
        self.0.clone()
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0 .0.store(true, Ordering::Relaxed);
    }
}

/// Counts a caller waiting for a slot while it exists (also when the wait is cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Readers {
    pub(crate) fn new(config: KafkaConfig, ctx: Context, epochs: Arc<Epochs>) -> Self {
        // `validate` keeps it within 1..=Semaphore::MAX_PERMITS.
        let slots = config
            .max_concurrent_replays
            .clamp(1, Semaphore::MAX_PERMITS);
        Self {
            config,
            ctx,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(slots)),
            created: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            epochs,
        }
    }

    /// Waits for a free slot, in arrival order, at most [`KafkaConfig::request_timeout`].
    ///
    /// Cancel-safe: a caller that stops waiting takes no slot.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Result<Slot> {
        let timeout = self.config.request_timeout;
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let waiting = Waiting(&self.waiting);
        let permit = tokio::time::timeout(timeout, self.slots.clone().acquire_owned()).await;
        drop(waiting);
        match permit {
            Ok(Ok(permit)) => Ok(Slot {
                readers: self.clone(),
                permit,
            }),
            // The semaphore is never closed.
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout {
                backend: client::BACKEND,
                op: "waiting for a free replay reader (max_concurrent_replays)",
                after: timeout,
            }),
        }
    }

    /// Reads running now (slots taken).
    pub(crate) fn active(&self) -> usize {
        self.config
            .max_concurrent_replays
            .clamp(1, Semaphore::MAX_PERMITS)
            .saturating_sub(self.slots.available_permits())
    }

    /// Callers waiting for a slot now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// An idle reader, or a new one.
    fn take(&self) -> Result<Reader> {
        if let Some(r) = lock(&self.idle).pop() {
            return Ok(r);
        }
        // A reader only asks for offsets below the high watermark, so Kafka answers its
        // fetches at once whatever the wait. Tansu 0.6 holds every fetch for the full wait even
        // when it has data: keep the wait short so a replay is not paced by it.
        let reader = client::consumer_config(&self.config, "reader", READER_FETCH_WAIT)
            .create_with_context(self.ctx.clone())
            .map_err(|e| Error::backend(client::BACKEND, e))?;
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok(reader)
    }

    /// Returns a reader to the pool (it must have no assignment).
    fn give(&self, reader: Reader) {
        let mut idle = lock(&self.idle);
        // Never more readers than slots exist, so this always has room; the check only keeps
        // the pool bounded should that ever change.
        if idle.len() < self.config.max_concurrent_replays {
            idle.push(reader);
        } else {
            drop(idle);
            // Closing blocks, and this may run on an async worker (a dropped replay future).
            crate::producer::retire(reader);
        }
    }

    pub(crate) fn topic(&self) -> &str {
        &self.config.topic
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.config.request_timeout
    }

    pub(crate) fn conn(&self) -> &client::ConnState {
        &self.ctx.conn
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn readers(slots: usize, timeout: Duration) -> Arc<Readers> {
        // Slots alone need no cluster: nothing here creates a reader.
        let config = KafkaConfig::new("127.0.0.1:1")
            .with_max_concurrent_replays(slots)
            .with_request_timeout(timeout);
        Arc::new(Readers::new(
            config,
            Context::default(),
            Arc::new(Epochs::new(1)),
        ))
    }

    #[tokio::test]
    async fn callers_beyond_the_slots_queue_then_time_out() {
        let timeout = Duration::from_millis(200);
        let r = readers(2, timeout);
        let a = r.acquire().await.expect("first slot");
        let b = r.acquire().await.expect("second slot");
        assert_eq!((r.active(), r.waiting()), (2, 0));

        let t = Instant::now();
        match r.acquire().await {
            Err(Error::Timeout { after, .. }) => assert_eq!(after, timeout),
            Err(e) => panic!("expected a timeout, got {e}"),
            Ok(_) => panic!("a third slot out of two"),
        }
        assert!(t.elapsed() >= timeout && t.elapsed() < timeout * 5);
        assert_eq!(r.waiting(), 0);

        // A waiter is served as soon as a slot is given back.
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.acquire().await.map(|_| ()) }
        });
        while r.waiting() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(a);
        tokio::time::timeout(timeout, waiter)
            .await
            .expect("served in time")
            .expect("task")
            .expect("slot");

        // A waiter that gives up takes no slot and is no longer counted.
        let c = r.acquire().await.expect("the slot the waiter gave back");
        let cancelled = tokio::time::timeout(Duration::from_millis(20), r.acquire()).await;
        assert!(cancelled.is_err(), "a third slot out of two");
        assert_eq!((r.active(), r.waiting()), (2, 0));
        drop((b, c));
        assert_eq!((r.active(), r.waiting()), (0, 0));
    }

    #[test]
    fn cancel_is_set_when_its_guard_is_dropped() {
        let guard = CancelOnDrop::default();
        let token = guard.token();
        assert!(!token.is_set());
        drop(guard);
        assert!(token.is_set());
    }
}
