//! [`Log`] for [`KafkaBroker`]: a partition of the topic read in offset order, for
//! projectors, with the replay readers of the pool (`pool.rs`) and their `scan`
//! (`reader.rs`), so a projector shares the bound on concurrent reads with replay and history.
//!
//! A batch covers the offsets `start..end` with `end - start <= limit`, where `start` follows
//! the cursor asked for (or is the low watermark) and `end` is at most the high watermark
//! read when the call started: so it only asks for records that exist and never waits for
//! new ones. The batch's `next` is `end - 1`, the last offset covered, whatever sits there
//! (a record that does not decode, an ephemeral one): the next read starts at `end`.

use std::ops::ControlFlow;
use std::sync::Arc;

use async_trait::async_trait;
use chatbus_core::store::{Log, LogBatch};
use chatbus_core::{Cursor, Error, Result};

use crate::broker::KafkaBroker;
use crate::client::blocking;
use crate::pool::{Cancel, CancelOnDrop, Reader, Readers};

#[async_trait]
impl Log for KafkaBroker {
    fn partitions(&self) -> u32 {
        KafkaBroker::partitions(self)
    }

    /// Reads offsets after `after` (or from the low watermark) up to the high watermark as it
    /// is at the call, at most `limit` offsets, keeping the durable records that decode.
    ///
    /// Shares the replay readers: `Error::Timeout` when none came free within
    /// [`KafkaConfig::request_timeout`](crate::KafkaConfig::request_timeout). Dropping the
    /// future stops the read and gives the reader back.
    async fn read(&self, partition: u32, after: Option<Cursor>, limit: usize) -> Result<LogBatch> {
        let partitions = KafkaBroker::partitions(self);
        if partition >= partitions {
            return Err(Error::InvalidCursor(format!(
                "partition {partition} of a log with {partitions}"
            )));
        }
        if let Some(c) = after.filter(|c| c.partition != partition) {
            return Err(Error::InvalidCursor(format!(
                "{c} is not a cursor of partition {partition}"
            )));
        }
        if limit == 0 {
            return Ok(LogBatch::default());
        }
        read(self.readers(), partition, after, limit).await
    }
}

async fn read(
    readers: &Arc<Readers>,
    partition: u32,
    after: Option<Cursor>,
    limit: usize,
) -> Result<LogBatch> {
    // Set if this future is dropped (a projector stopping): the scan stops early.
    let cancel = CancelOnDrop::default();
    let token = cancel.token();
    let slot = readers.acquire().await?;
    let readers = readers.clone();
    let batch = blocking(move || {
        let lease = slot.lease()?;
        read_batch(&readers, &lease, partition, after, limit, &token)
    })
    .await;
    drop(cancel);
    batch
}

/// One batch, with one reader. Blocking.
fn read_batch(
    readers: &Readers,
    reader: &Reader,
    partition: u32,
    after: Option<Cursor>,
    limit: usize,
    cancel: &Cancel,
) -> Result<LogBatch> {
    let (low, high) = readers.watermarks(reader, partition)?;
    let start = match after {
        None => low,
        Some(c) => {
            // Reading goes on after `c`: it must be a record of this log, at most the last.
            readers.check_in_log(reader, c, (low, high), high - 1)?;
            i64::try_from(c.offset)
                .ok()
                .and_then(|o| o.checked_add(1))
                .ok_or_else(|| Error::InvalidCursor(c.to_string()))?
        }
    };
    // Below `low`, retention deleted the records: go on with what is left.
    let start = start.max(low);
    if start >= high {
        return Ok(LogBatch::default());
    }
    let end = start
        .saturating_add(i64::try_from(limit).unwrap_or(i64::MAX))
        .min(high);
    let mut envelopes = Vec::new();
    readers.scan(reader, partition, start, end, cancel, |env| {
        // `None` did not decode (logged by the scan); no cursor is an ephemeral record.
        if let Some(env) = env.filter(|e| e.cursor.is_some()) {
            envelopes.push(env);
        }
        ControlFlow::Continue(())
    })?;
    // Stamped after the scan: reading offset 0 may just have taught the epoch.
    let next = readers
        .epochs
        .stamp(Cursor::new(partition, u64::try_from(end - 1).unwrap_or(0)));
    Ok(LogBatch::new(envelopes, Some(next)))
}
