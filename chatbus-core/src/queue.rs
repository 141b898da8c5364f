//! The buffer behind a [`Subscription`](crate::Subscription): bounded, never blocking the
//! sender, one consumer, and allocating nothing while empty.
//!
//! Why not `tokio::sync::mpsc`: its channel allocates its first block (32 slots) when it is
//! created, about 4.5 KiB for envelopes, and keeps it while idle. The hub holds one
//! subscription per room with local members, every connected user's personal channel
//! included, so that block was paid per connection. Here the slots live in a `VecDeque` that
//! is empty (unallocated) until a message arrives and is released again once drained.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tokio::sync::Notify;

/// A drained buffer keeps at most this many slots (reused while messages keep coming).
const KEEP_SLOTS: usize = 16;

struct Shared<T> {
    items: Mutex<VecDeque<T>>,
    capacity: usize,
    /// The consumer, woken by a push or by the last sender leaving.
    waker: AtomicWaker,
    senders: AtomicUsize,
    receiver_gone: AtomicBool,
    /// Wakes senders waiting in [`Sender::closed`].
    gone: Notify,
}

impl<T> Shared<T> {
    fn items(&self) -> MutexGuard<'_, VecDeque<T>> {
        // A queue stays consistent between statements; a panic elsewhere must not poison it.
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why [`Sender::try_send`] did not queue an item.
pub(crate) enum TrySendError {
    Full,
    Closed,
}

/// The producing side; cloneable.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The consuming side.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// A queue of at most `capacity` items (at least 1).
pub(crate) fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        items: Mutex::new(VecDeque::new()),
        capacity: capacity.max(1),
        waker: AtomicWaker::new(),
        senders: AtomicUsize::new(1),
        receiver_gone: AtomicBool::new(false),
        gone: Notify::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

impl<T> Sender<T> {
    /// Queues `item` unless the queue is full or the receiver is gone.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError> {
        if self.is_closed() {
            return Err(TrySendError::Closed);
        }
        let mut q = self.shared.items();
        if q.len() >= self.shared.capacity {
            return Err(TrySendError::Full);
        }
        q.push_back(item);
        drop(q);
        self.shared.waker.wake();
        Ok(())
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.shared.receiver_gone.load(Ordering::Acquire)
    }

    /// Resolves when the receiver is gone.
    pub(crate) async fn closed(&self) {
        loop {
            let notified = self.shared.gone.notified();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::AcqRel);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last sender: the receiver sees the end once the queue is drained.
            self.shared.waker.wake();
        }
    }
}

impl<T> Receiver<T> {
    /// Moves up to `limit` queued items into `out`; `Ready(0)` once every sender is gone and
    /// the queue is drained.
    pub(crate) fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<T>,
        limit: usize,
    ) -> Poll<usize> {
        if let Some(n) = self.take(out, limit) {
            return Poll::Ready(n);
        }
        self.shared.waker.register(cx.waker());
        // Checked again after registering: a push between the first check and the
        // registration would otherwise wake nobody.
        match self.take(out, limit) {
            Some(n) => Poll::Ready(n),
            None => Poll::Pending,
        }
    }

    /// The next item; `Ready(None)` once every sender is gone and the queue is drained.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(next) = self.take_one() {
            return Poll::Ready(next);
        }
        self.shared.waker.register(cx.waker());
        match self.take_one() {
            Some(next) => Poll::Ready(next),
            None => Poll::Pending,
        }
    }

    /// `Some(Some(item))`, `Some(None)` at the end; `None`: wait.
    fn take_one(&self) -> Option<Option<T>> {
        let mut q = self.shared.items();
        match q.pop_front() {
            Some(item) => {
                if q.is_empty() && q.capacity() > KEEP_SLOTS {
                    *q = VecDeque::new();
                }
                Some(Some(item))
            }
            None => (self.shared.senders.load(Ordering::Acquire) == 0).then_some(None),
        }
    }

    /// `Some(n)` when it took `n > 0` items, or `Some(0)` at the end; `None`: wait.
    fn take(&self, out: &mut Vec<T>, limit: usize) -> Option<usize> {
        let mut q = self.shared.items();
        if q.is_empty() {
            let ended = self.shared.senders.load(Ordering::Acquire) == 0;
            return ended.then_some(0);
        }
        let n = q.len().min(limit.max(1));
        out.extend(q.drain(..n));
        if q.is_empty() && q.capacity() > KEEP_SLOTS {
            *q = VecDeque::new();
        }
        Some(n)
    }

    pub(crate) fn len(&self) -> usize {
        self.shared.items().len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.shared.items().is_empty()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.shared.receiver_gone.store(true, Ordering::Release);
        // What was queued is nobody's any more.
        self.shared.items().clear();
        self.shared.gone.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    #[tokio::test]
    async fn bounded_ordered_and_ends_with_the_last_sender() {
        let (tx, mut rx) = bounded::<u32>(2);
        assert!(tx.try_send(1).is_ok() && tx.try_send(2).is_ok());
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full)));
        let tx2 = tx.clone();
        let mut out = Vec::new();
        assert_eq!(poll_fn(|cx| rx.poll_recv_many(cx, &mut out, 8)).await, 2);
        assert_eq!(out, [1, 2]);
        assert!(rx.is_empty());
        assert_eq!(rx.len(), 0);
        // A waiting receiver is woken by a push from another task.
        let push = tokio::spawn(async move {
            tokio::task::yield_now().await;
            assert!(tx2.try_send(4).is_ok());
        });
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(4));
        push.await.expect("push");
        drop(tx);
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, None);
    }

    #[tokio::test]
    async fn a_dropped_receiver_closes_the_senders() {
        let (tx, rx) = bounded::<u32>(4);
        assert!(tx.try_send(1).is_ok());
        let waiter = tokio::spawn({
            let tx = tx.clone();
            async move { tx.closed().await }
        });
        drop(rx);
        assert!(tx.is_closed());
        assert!(matches!(tx.try_send(2), Err(TrySendError::Closed)));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("closed() resolves")
            .expect("task");
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let (tx, rx) = bounded::<u64>(1000);
        for i in 0..100 {
            assert!(tx.try_send(i).is_ok());
        }
        let mut out = Vec::new();
        assert_eq!(rx.take(&mut out, 1000), Some(100));
        assert_eq!(rx.shared.items().capacity(), 0);
    }
}
