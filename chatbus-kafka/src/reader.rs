//! Reading ranges of the log for `replay` and `history`, with a small pool of consumers.
//!
//! Everything here blocks (librdkafka's consumer API is synchronous): callers run it on
//! tokio's blocking threads.

use std::ops::ControlFlow;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatbus_core::{codec, Cursor, Envelope, Error, Result, Room};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::client::{self, lock, Context};
use crate::config::KafkaConfig;

pub(crate) type Reader = BaseConsumer<Context>;

/// Idle readers kept for reuse: creating a librdkafka consumer costs threads, a connection and
/// a metadata round trip, too much for every page of history.
const MAX_IDLE: usize = 4;
const POLL: Duration = Duration::from_millis(100);
const READER_FETCH_WAIT: Duration = Duration::from_millis(5);

/// A pool of replay consumers.
pub(crate) struct Readers {
    config: KafkaConfig,
    ctx: Context,
    idle: Mutex<Vec<Reader>>,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers")
            .field("idle", &lock(&self.idle).len())
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

impl Readers {
    pub(crate) fn new(config: KafkaConfig, ctx: Context) -> Self {
        Self {
            config,
            ctx,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// An idle reader, or a new one.
    pub(crate) fn take(&self) -> Result<Reader> {
        if let Some(r) = lock(&self.idle).pop() {
            return Ok(r);
        }
        // A reader only asks for offsets below the high watermark, so Kafka answers its
        // fetches at once whatever the wait. Tansu 0.6 holds every fetch for the full wait even
        // when it has data: keep the wait short so a replay is not paced by it.
        client::consumer_config(&self.config, "reader", READER_FETCH_WAIT)
            .create_with_context(self.ctx.clone())
            .map_err(|e| Error::backend(client::BACKEND, e))
    }

    /// Returns a reader to the pool (it must have no assignment).
    pub(crate) fn give(&self, reader: Reader) {
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(reader);
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

    /// `(low, high)` watermarks of a partition: the first offset kept and the next offset to
    /// be written.
    pub(crate) fn watermarks(&self, reader: &Reader, partition: u32) -> Result<(i64, i64)> {
        reader
            .fetch_watermarks(self.topic(), to_i32(partition)?, self.timeout())
            .map_err(|e| client::map_error("fetch watermarks", e, self.timeout(), self.conn()))
    }

    /// The end offset (high watermark) of every partition, in one request.
    pub(crate) fn end_offsets(&self, reader: &Reader, partitions: u32) -> Result<Vec<i64>> {
        // ListOffsets with the timestamp -1 ("latest") is how Kafka reports the end of a
        // partition; asking for every partition at once costs one round trip instead of one per
        // partition.
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(self.topic(), to_i32(p)?, Offset::End)
                .map_err(|e| Error::backend(client::BACKEND, e))?;
        }
        let found = reader
            .offsets_for_times(tpl, self.timeout())
            .map_err(|e| client::map_error("list offsets", e, self.timeout(), self.conn()))?;
        let mut ends = vec![0; partitions as usize];
        for e in found.elements() {
            e.error().map_err(|err| {
                client::map_error("list offsets", err, self.timeout(), self.conn())
            })?;
            let (Ok(p), Offset::Offset(o)) = (usize::try_from(e.partition()), e.offset()) else {
                return Err(Error::Unavailable {
                    backend: client::BACKEND,
                    reason: format!("no end offset for partition {}", e.partition()),
                });
            };
            if let Some(slot) = ends.get_mut(p) {
                *slot = o;
            }
        }
        Ok(ends)
    }

    /// The first offset of `partition` whose timestamp is at or after `ms`, or `None` when
    /// no record is that recent.
    pub(crate) fn offset_for_time(
        &self,
        reader: &Reader,
        partition: u32,
        ms: u64,
    ) -> Result<Option<i64>> {
        let mut tpl = TopicPartitionList::new();
        let ts = i64::try_from(ms).unwrap_or(i64::MAX);
        tpl.add_partition_offset(self.topic(), to_i32(partition)?, Offset::Offset(ts))
            .map_err(|e| Error::backend(client::BACKEND, e))?;
        let found = reader
            .offsets_for_times(tpl, self.timeout())
            .map_err(|e| client::map_error("offsets for times", e, self.timeout(), self.conn()))?;
        let Some(e) = found.elements().into_iter().next() else {
            return Ok(None);
        };
        e.error().map_err(|err| {
            client::map_error("offsets for times", err, self.timeout(), self.conn())
        })?;
        Ok(match e.offset() {
            Offset::Offset(o) => Some(o),
            // -1: no record at or after that time.
            _ => None,
        })
    }

    /// Reads offsets `from..to` of `partition` in order, calling `f` for each record (`None`
    /// for a record that does not decode), until `f` breaks or `to` is reached.
    ///
    /// Leaves the reader unassigned so it can go back to the pool.
    pub(crate) fn scan(
        &self,
        reader: &Reader,
        partition: u32,
        from: i64,
        to: i64,
        mut f: impl FnMut(Option<Envelope>) -> ControlFlow<()>,
    ) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        let p = to_i32(partition)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(self.topic(), p, Offset::Offset(from))
            .map_err(|e| Error::backend(client::BACKEND, e))?;
        reader
            .assign(&tpl)
            .map_err(|e| Error::backend(client::BACKEND, e))?;
        let result = self.scan_assigned(reader, partition, from, to, &mut f);
        let _ = reader.unassign();
        // Drop anything fetched for the old assignment so the next user starts clean.
        while let Some(item) = reader.poll(Duration::ZERO) {
            drop(item);
        }
        result
    }

    fn scan_assigned(
        &self,
        reader: &Reader,
        partition: u32,
        from: i64,
        to: i64,
        f: &mut impl FnMut(Option<Envelope>) -> ControlFlow<()>,
    ) -> Result<()> {
        let mut next = from;
        let mut progress = Instant::now();
        let timeout = self.timeout();
        while next < to {
            match reader.poll(POLL) {
                Some(Ok(msg)) => {
                    let offset = msg.offset();
                    if msg.partition() != to_i32(partition)? || offset < next {
                        continue;
                    }
                    progress = Instant::now();
                    next = offset + 1;
                    if offset >= to {
                        break;
                    }
                    let env = decode(&msg, partition);
                    if f(env).is_break() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "kafka replay consumer error");
                    if progress.elapsed() > timeout {
                        return Err(client::map_error("replay", e, timeout, self.conn()));
                    }
                }
                None => {
                    if progress.elapsed() > timeout {
                        return Err(Error::Timeout {
                            backend: client::BACKEND,
                            op: "replay",
                            after: timeout,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Decodes a record and sets its cursor (durable only); `None` if it is malformed.
fn decode(msg: &rdkafka::message::BorrowedMessage<'_>, partition: u32) -> Option<Envelope> {
    let payload = msg.payload()?;
    match codec::decode(&Bytes::copy_from_slice(payload)) {
        Ok(mut env) => {
            env.cursor = env
                .is_durable()
                .then(|| Cursor::new(partition, u64::try_from(msg.offset()).unwrap_or(0)));
            Some(env)
        }
        Err(e) => {
            tracing::warn!(partition, offset = msg.offset(), error = %e, "skipping a malformed Kafka record");
            None
        }
    }
}

/// Whether a decoded record is a durable message of `room`.
pub(crate) fn is_of(env: &Envelope, room: &Room) -> bool {
    env.is_durable() && env.room == *room
}

pub(crate) fn to_i32(p: u32) -> Result<i32> {
    i32::try_from(p).map_err(|_| Error::InvalidCursor(format!("partition {p}")))
}
