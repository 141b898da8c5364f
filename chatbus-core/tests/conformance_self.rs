//! The conformance suite itself must be able to fail: brokers with planted bugs are run through
//! it and the right checks must report them.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use chatbus_core::conformance;
use chatbus_core::{
    Broker, Cursor, Envelope, HistoryStream, Interest, MemoryBroker, Receipt, ReplayFrom, Result,
    Room, Subscription,
};

mod support;
use support::{Hooked, Hooks};

/// Which bug to plant.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bug {
    /// Replay from a cursor also returns the message at the cursor: one message too many.
    ReplayOneTooMany,
    /// Every 37th publish is acknowledged but never delivered.
    LosesMessages,
    /// Ephemeral messages are stored and replayed.
    ReplaysEphemeral,
    /// Messages of every room reach room subscribers.
    LeaksRooms,
    /// A resume point that does not fit the log is answered with an empty replay.
    SilentResets,
}

/// The planted bug and a publish counter.
#[derive(Debug)]
struct Buggy {
    bug: Bug,
    count: AtomicU64,
}

#[async_trait]
impl Hooks for Buggy {
    async fn publish(&self, inner: &MemoryBroker, envelope: &Envelope) -> Result<Receipt> {
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        if self.bug == Bug::LosesMessages && n % 37 == 36 {
            return Ok(Receipt {
                id: envelope.id,
                cursor: Some(Cursor::new(0, u64::MAX)),
            });
        }
        let mut env = envelope.clone();
        if self.bug == Bug::ReplaysEphemeral {
            env.kind = chatbus_core::Kind::Durable;
        }
        inner.publish(&env).await
    }
    async fn subscribe(&self, inner: &MemoryBroker, interest: Interest) -> Result<Subscription> {
        let interest = if self.bug == Bug::LeaksRooms {
            Interest::All
        } else {
            interest
        };
        inner.subscribe(interest).await
    }
    async fn replay(
        &self,
        inner: &MemoryBroker,
        room: &Room,
        from: ReplayFrom,
        limit: usize,
    ) -> Result<HistoryStream> {
        let from = match (self.bug, from) {
            (Bug::ReplayOneTooMany, ReplayFrom::Cursor(c)) if c.offset > 0 => {
                ReplayFrom::Cursor(Cursor::new(c.partition, c.offset - 1))
            }
            (_, f) => f,
        };
        match inner.replay(room, from, limit).await {
            Err(chatbus_core::Error::CursorReset { .. }) if self.bug == Bug::SilentResets => {
                Ok(chatbus_core::backend::history_stream(Vec::new()))
            }
            r => r,
        }
    }
}

async fn failed_checks(bug: Bug) -> Vec<&'static str> {
    let b = Hooked::new(
        MemoryBroker::new(),
        Buggy {
            bug,
            count: AtomicU64::new(0),
        },
    );
    conformance::failures(&b)
        .await
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

#[tokio::test]
async fn correct_broker_passes() {
    assert!(conformance::failures(&MemoryBroker::new()).await.is_empty());
}

#[tokio::test]
async fn replay_one_too_many_is_caught() {
    assert!(failed_checks(Bug::ReplayOneTooMany)
        .await
        .contains(&"replay"));
}

#[tokio::test]
async fn lost_messages_are_caught() {
    let failed = failed_checks(Bug::LosesMessages).await;
    assert!(
        failed.contains(&"room_order") || failed.contains(&"concurrent_publishers"),
        "{failed:?}"
    );
}

#[tokio::test]
async fn replayed_ephemeral_messages_are_caught() {
    assert!(failed_checks(Bug::ReplaysEphemeral)
        .await
        .contains(&"ephemeral"));
}

#[tokio::test]
async fn room_leaks_are_caught() {
    assert!(failed_checks(Bug::LeaksRooms)
        .await
        .contains(&"room_isolation"));
}

#[tokio::test]
async fn silent_resets_are_caught() {
    assert_eq!(failed_checks(Bug::SilentResets).await, ["resume_points"]);
}
