//! [`Log`]: a broker's durable log read partition by partition, which is what a projector
//! needs and what [`Broker::replay`](crate::Broker::replay) (one room at a time) is not.
//!
//! A projector keeps a [`Store`](super::Store) up to date with every durable record of the
//! log: it reads each partition in offset order after the position the store recorded, and
//! applies the records with the position of the last one in one atomic step. Reading by
//! partition, not by room, is what makes that position a single cursor per partition.

use std::fmt;

use async_trait::async_trait;

use crate::envelope::{Cursor, Envelope};
use crate::Result;

/// One read of a [`Log`] partition.
///
/// `next` is where the read stopped, which is not always the cursor of the last envelope:
/// records that do not decode and ephemeral records occupy positions of the log but are not
/// returned, and a read may end on one of them (or consist only of them). A reader that
/// resumes after `next` goes on past them instead of reading them again forever.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct LogBatch {
    /// The durable envelopes read, oldest first, each with its cursor (in its partition's
    /// epoch).
    pub envelopes: Vec<Envelope>,
    /// The position of the last record covered by the read, returned or skipped: pass it as
    /// `after` to read on. `None` when there was nothing newer to read (caught up).
    pub next: Option<Cursor>,
}

impl LogBatch {
    /// A batch of `envelopes` read up to `next`.
    pub fn new(envelopes: Vec<Envelope>, next: Option<Cursor>) -> Self {
        Self { envelopes, next }
    }

    /// Whether the read found nothing newer than the position asked for.
    pub fn is_caught_up(&self) -> bool {
        self.next.is_none()
    }
}

/// A broker's durable log, read by partition (see
/// [`Broker::as_log`](crate::Broker::as_log)).
///
/// Dyn-compatible like [`Broker`](crate::Broker). Errors: `Unavailable` or `Timeout` while
/// the log cannot be read; `InvalidCursor` for a partition out of range or a cursor of another
/// partition.
#[async_trait]
pub trait Log: Send + Sync + fmt::Debug {
    /// Partitions of the log (cursors' `partition` is `0..partitions()`).
    fn partitions(&self) -> u32;

    /// The durable records of `partition` strictly after `after` (from the oldest kept when
    /// `None`), oldest first, at most `limit` positions of the log: see [`LogBatch`] for why
    /// the batch says where it stopped. Returns promptly: a batch is what the log holds now,
    /// never a wait for records not written yet (`next` is `None` when there are none).
    ///
    /// Records that retention deleted before they were read are not returned: a read after
    /// a position below the oldest record kept starts at the oldest record kept.
    ///
    /// `Error::CursorReset` when `after` names no position of the partition as it is now: of
    /// another [epoch](Cursor::epoch) (the log started over), or beyond its end. A cursor of
    /// an unknown epoch (0) is taken as a position of the current log.
    async fn read(&self, partition: u32, after: Option<Cursor>, limit: usize) -> Result<LogBatch>;
}
