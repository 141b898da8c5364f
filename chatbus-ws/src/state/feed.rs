//! [`StoreFeed`]: a store fed from the broker's live stream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatbus_core::store::{ChatEvent, Store};
use chatbus_core::{Broker, Error, Interest};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::{CancellationToken, DropGuard};

/// Most events applied in one call: what arrived while the last call ran, so a busy feed
/// amortises the store's lock (or round trip) and a quiet one applies each event at once.
const BATCH: usize = 256;

/// How long the feed waits before subscribing again after the broker refused.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// Feeds a [`Store`] from a live subscription to every room: the memory store's default,
/// and the only feed for a broker without a log (Redis alone).
///
/// What the live stream misses, the store misses: a subscriber that lags loses messages (they
/// are counted in [`lost`](Self::lost)), and so does one that was disconnected. With a durable
/// log, a [`Projector`](super::Projector) feeds the store instead, exactly once. Stops when
/// dropped.
#[derive(Debug)]
pub struct StoreFeed {
    counters: Arc<FeedCounters>,
    _stop: DropGuard,
}

#[derive(Debug, Default)]
struct FeedCounters {
    applied: AtomicU64,
    lost: AtomicU64,
    errors: AtomicU64,
}

impl StoreFeed {
    /// Subscribes to every room of `broker` and applies what arrives to `store`, from now on.
    /// Needs a Tokio runtime.
    pub fn spawn(broker: Arc<dyn Broker>, store: Arc<dyn Store>) -> Self {
        let counters = Arc::new(FeedCounters::default());
        let stop = CancellationToken::new();
        tokio::spawn(run(broker, store, counters.clone(), stop.clone()));
        Self {
            counters,
            _stop: stop.drop_guard(),
        }
    }

    /// Events applied so far.
    pub fn applied(&self) -> u64 {
        self.counters.applied.load(Ordering::Relaxed)
    }

    /// Messages the live stream dropped before the feed saw them (a lagging subscription),
    /// where the broker could tell how many.
    pub fn lost(&self) -> u64 {
        self.counters.lost.load(Ordering::Relaxed)
    }

    /// Batches the store refused (their events are not applied).
    pub fn errors(&self) -> u64 {
        self.counters.errors.load(Ordering::Relaxed)
    }
}

async fn run(
    broker: Arc<dyn Broker>,
    store: Arc<dyn Store>,
    counters: Arc<FeedCounters>,
    stop: CancellationToken,
) {
    let mut batch: Vec<ChatEvent> = Vec::with_capacity(BATCH);
    while !stop.is_cancelled() {
        let mut sub = match broker.subscribe(Interest::All).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::warn!(error = %e, "store feed: subscribe failed; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RESUBSCRIBE) => continue,
                }
            }
        };
        loop {
            let first = tokio::select! {
                () = stop.cancelled() => return,
                item = sub.next() => item,
            };
            let Some(first) = first else { break };
            let mut item = Some(first);
            while let Some(got) = item.take() {
                match got {
                    Ok(env) => batch.extend(super::event(&env)),
                    Err(Error::Lagged { missed }) => {
                        counters.lost.fetch_add(missed, Ordering::Relaxed);
                        tracing::warn!(missed, "store feed lagged: the store misses messages");
                    }
                    // A disconnected broker: it reconnects by itself and says so.
                    Err(e) => tracing::debug!(error = %e, "store feed"),
                }
                if batch.len() < BATCH {
                    item = sub.next().now_or_never().flatten();
                }
            }
            if batch.is_empty() {
                continue;
            }
            match store.apply(&batch, None).await {
                Ok(()) => {
                    counters
                        .applied
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, events = batch.len(), "store feed: apply failed");
                }
            }
            batch.clear();
        }
    }
}
