//! Rust values ↔ SQL columns: cursors and timestamps as bigint, ids as uuid.
//!
//! Never a panic or a silent wrap: a u32 always fits a bigint; a u64 offset above i64::MAX
//! (which no broker produces: Kafka offsets and Redis counters are i64) is refused with
//! `InvalidCursor`; a timestamp above it saturates, keeping the order of times.

use chatbus_core::{Cursor, Error, MessageId, Result};
use uuid::Uuid;

use crate::error::corrupt;

/// A cursor as its three columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SqlCursor {
    pub(crate) partition: i64,
    pub(crate) epoch: i64,
    pub(crate) pos: i64,
}

impl SqlCursor {
    /// The columns of `c`, or `InvalidCursor` for an offset beyond i64.
    pub(crate) fn from_cursor(c: Cursor) -> Result<Self> {
        Ok(Self {
            partition: i64::from(c.partition),
            epoch: i64::from(c.epoch),
            pos: i64::try_from(c.offset).map_err(|_| Error::InvalidCursor(c.to_string()))?,
        })
    }

    /// The columns of `c`, `None` for an offset beyond i64: no stored row can have it.
    pub(crate) fn lookup(c: Cursor) -> Option<Self> {
        Self::from_cursor(c).ok()
    }

    /// The memory store's `same_log`: equal epochs, or either unknown (0).
    pub(crate) fn same_log(&self, other: &Self) -> bool {
        self.epoch == 0 || other.epoch == 0 || self.epoch == other.epoch
    }
}

/// A cursor read back from its columns.
pub(crate) fn cursor(partition: i64, epoch: i64, pos: i64) -> Result<Cursor> {
    Ok(Cursor::with_epoch(
        u32::try_from(partition).map_err(|_| corrupt("partition"))?,
        u64::try_from(pos).map_err(|_| corrupt("offset"))?,
        u32::try_from(epoch).map_err(|_| corrupt("epoch"))?,
    ))
}

/// Unix milliseconds as a bigint, saturating.
pub(crate) fn ts(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Unix milliseconds read back.
pub(crate) fn ts_back(ms: i64) -> Result<u64> {
    u64::try_from(ms).map_err(|_| corrupt("timestamp"))
}

/// A message id as a uuid.
pub(crate) fn uuid(id: MessageId) -> Uuid {
    Uuid::from_u128(id.as_u128())
}

/// A uuid read back as a message id.
pub(crate) fn id(u: Uuid) -> MessageId {
    MessageId::from_u128(u.as_u128())
}

/// A count read back.
pub(crate) fn count(n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|_| corrupt("count"))
}
