//! Reading ranges of the log for `replay` and `history`: planning a replay, reading it in
//! chunks, and paging history backwards, with the readers of the pool (`pool.rs`).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatbus_core::backend::codec;
use chatbus_core::{
    Cursor, Envelope, Error, HistoryPage, HistoryStream, ReplayFrom, ResetReason, Result, Room,
};
use futures::StreamExt;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::client::{self, blocking};
use crate::epoch::Epochs;
use crate::pool::{Cancel, CancelOnDrop, Reader, Readers};

/// How long one poll of a scan blocks, which bounds how late it notices a cancelled read.
const POLL: Duration = Duration::from_millis(100);
/// Most messages a replay reads per turn with a reader. The stream holds them while its caller
/// drains it, with the reader already given back, so a slow client never keeps a reader (or a
/// blocking thread) busy; past them, it waits for a reader again and reads on. As large as the
/// Hub's default catch-up page, which then takes one turn.
const REPLAY_CHUNK: usize = 512;

impl Readers {
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

    /// Reads the record at offset 0 of `partition`, if the log still has it, to learn the
    /// partition's epoch (see `epoch.rs`). Blocking.
    pub(crate) fn probe_epoch(
        &self,
        reader: &Reader,
        partition: u32,
        low: i64,
        high: i64,
    ) -> Result<()> {
        if low != 0 || high <= 0 {
            return Ok(());
        }
        // Decoding the record learns the epoch.
        self.scan(reader, partition, 0, 1, &Cancel::default(), |_| {
            ControlFlow::Break(())
        })
    }

    /// Whether `c` names a position of `partition`'s log as it is now (watermarks `low`,
    /// `high`): of its epoch and at most `last`, else `Error::CursorReset`. Offset 0 is
    /// read again first when the epoch is not known yet or the cursor does not fit it, since
    /// the topic may have been recreated since it was learned. Blocking.
    pub(crate) fn check_in_log(
        &self,
        reader: &Reader,
        c: Cursor,
        (low, high): (i64, i64),
        last: i64,
    ) -> Result<()> {
        let beyond = i64::try_from(c.offset).map_or(true, |o| o > last);
        let known = self.epochs.get(c.partition);
        if known == 0 || beyond || (c.epoch != 0 && c.epoch != known) {
            self.probe_epoch(reader, c.partition, low, high)?;
        }
        let now = Cursor::with_epoch(c.partition, 0, self.epochs.get(c.partition));
        let reason = if !c.same_log(&now) || (high == 0 && c.epoch != 0) {
            ResetReason::OtherLog
        } else if beyond {
            ResetReason::BeyondEnd
        } else {
            return Ok(());
        };
        Err(Error::CursorReset { cursor: c, reason })
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
    /// Stops early with `Error::Closed` once `cancel` is set.
    pub(crate) fn scan(
        &self,
        reader: &Reader,
        partition: u32,
        from: i64,
        to: i64,
        cancel: &Cancel,
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
        let result = self.scan_assigned(reader, partition, from, to, cancel, &mut f);
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
        cancel: &Cancel,
        f: &mut impl FnMut(Option<Envelope>) -> ControlFlow<()>,
    ) -> Result<()> {
        let mut next = from;
        let mut progress = Instant::now();
        let timeout = self.timeout();
        while next < to {
            if cancel.is_set() {
                return Err(Error::Closed);
            }
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
                    let env = decode(&msg, partition, &self.epochs);
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

/// Decodes a record and sets its cursor (durable only, in the partition's epoch, which a
/// record at offset 0 sets); `None` if it is malformed.
fn decode(
    msg: &rdkafka::message::BorrowedMessage<'_>,
    partition: u32,
    epochs: &Epochs,
) -> Option<Envelope> {
    let payload = msg.payload()?;
    match codec::decode(&Bytes::copy_from_slice(payload)) {
        Ok(mut env) => {
            if msg.offset() == 0 {
                epochs.learn(partition, env.id);
            }
            env.cursor = env.is_durable().then(|| {
                epochs.stamp(Cursor::new(
                    partition,
                    u64::try_from(msg.offset()).unwrap_or(0),
                ))
            });
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

/// A replay: the room's durable messages in `partition` after `from`, at most `limit`.
pub(crate) struct ReplayQuery {
    pub(crate) room: Room,
    /// The room's partition (and the cursor's, checked by the caller).
    pub(crate) partition: u32,
    pub(crate) from: ReplayFrom,
    pub(crate) limit: usize,
}

/// A page of history: the newest `limit` durable messages of the room before `before` (or the
/// end), reading at most `scan_limit` records.
pub(crate) struct HistoryQuery {
    pub(crate) room: Room,
    /// The room's partition (and the cursor's, checked by the caller).
    pub(crate) partition: u32,
    pub(crate) before: Option<Cursor>,
    pub(crate) limit: usize,
    pub(crate) scan_limit: i64,
}

/// Plans a replay and reads its first chunk with one reader, so that errors (cluster down)
/// are returned by `replay` itself; the stream reads the rest chunk by chunk.
pub(crate) async fn replay(readers: &Arc<Readers>, query: ReplayQuery) -> Result<HistoryStream> {
    let ReplayQuery {
        room,
        partition,
        from,
        limit,
    } = query;
    if limit == 0 {
        return Ok(chatbus_core::backend::history_stream(Vec::new()));
    }
    // Set if this future (and later the stream) is dropped: the read stops early.
    let cancel = CancelOnDrop::default();
    let since = match from {
        ReplayFrom::Time(ms) => Some(ms),
        _ => None,
    };
    let slot = readers.acquire().await?;
    let first = blocking({
        let (readers, token) = (readers.clone(), cancel.token());
        move || {
            let lease = slot.lease()?;
            let Some((start, end)) = plan(&readers, &lease, partition, from)? else {
                return Ok(None);
            };
            let mut rest = ReplayRest {
                room,
                partition,
                since,
                next: start,
                end,
                left: limit,
            };
            let chunk = rest.read(&readers, &lease, true, &token)?;
            Ok(Some((chunk, rest)))
        }
    })
    .await?;
    let Some((chunk, rest)) = first else {
        return Ok(chatbus_core::backend::history_stream(Vec::new()));
    };
    if rest.is_done() {
        return Ok(chatbus_core::backend::history_stream(chunk));
    }
    let state = ReplayState {
        readers: readers.clone(),
        rest,
        chunk: chunk.into_iter(),
        failed: false,
        cancel,
    };
    Ok(futures::stream::unfold(state, ReplayState::next).boxed())
}

/// Reads one page of history with one reader.
pub(crate) async fn history(readers: &Arc<Readers>, query: HistoryQuery) -> Result<HistoryPage> {
    if query.limit == 0 {
        return Ok(HistoryPage::default());
    }
    // Set if this future is dropped: the scan stops early and gives its reader back.
    let cancel = CancelOnDrop::default();
    let token = cancel.token();
    let slot = readers.acquire().await?;
    let readers = readers.clone();
    let page = blocking(move || {
        let lease = slot.lease()?;
        history_page(&readers, &lease, &query, &token)
    })
    .await;
    drop(cancel);
    page
}

/// The offsets `start..end` a replay reads, or `None` when there is nothing to read.
fn plan(
    readers: &Readers,
    reader: &Reader,
    partition: u32,
    from: ReplayFrom,
) -> Result<Option<(i64, i64)>> {
    let (low, high) = readers.watermarks(reader, partition)?;
    if let ReplayFrom::Cursor(c) = from {
        // Replay goes on after `c`: it must be a record of the log, at most the last one.
        readers.check_in_log(reader, c, (low, high), high - 1)?;
    }
    let start = match from {
        ReplayFrom::Beginning => low,
        ReplayFrom::Cursor(c) => i64::try_from(c.offset)
            .ok()
            .and_then(|o| o.checked_add(1))
            .ok_or_else(|| Error::InvalidCursor(c.to_string()))?,
        ReplayFrom::Time(ms) => match readers.offset_for_time(reader, partition, ms)? {
            Some(o) => o,
            None => return Ok(None),
        },
    };
    // Below `low`, retention has deleted the records: start with what is left.
    let start = start.max(low);
    Ok((start < high).then_some((start, high)))
}

/// Where a replay goes on from, and what it still may return.
#[derive(Clone)]
struct ReplayRest {
    room: Room,
    partition: u32,
    since: Option<u64>,
    /// The next offset to read.
    next: i64,
    /// The end of the partition when the replay started.
    end: i64,
    /// Messages it may still return (the limit, less what it read).
    left: usize,
}

impl ReplayRest {
    fn is_done(&self) -> bool {
        self.left == 0 || self.next >= self.end
    }

    /// Reads the next chunk of the room's messages (at most [`REPLAY_CHUNK`]) with `reader`,
    /// and moves the position past it. Blocking.
    fn read(
        &mut self,
        readers: &Readers,
        reader: &Reader,
        first: bool,
        cancel: &Cancel,
    ) -> Result<Vec<Envelope>> {
        let max = self.left.min(REPLAY_CHUNK);
        let mut items = Vec::new();
        let mut is_first = first;
        let mut stop = false;
        let (room, since) = (&self.room, self.since);
        readers.scan(reader, self.partition, self.next, self.end, cancel, |env| {
            let first = std::mem::take(&mut is_first);
            let Some(env) = env else {
                return ControlFlow::Continue(());
            };
            if let Some(ms) = since {
                // Kafka answers a time lookup with the first offset whose timestamp is at or
                // after it, so that record is never older. Tansu 0.6 answers 0 instead of
                // "none" when every record is older: detect it here.
                if first && env.ts < ms {
                    stop = true;
                    return ControlFlow::Break(());
                }
                // Timestamps of one room need not be monotonic (several producers' clocks):
                // keep exactly the messages at or after the time.
                if env.ts < ms {
                    return ControlFlow::Continue(());
                }
            }
            if !is_of(&env, room) {
                return ControlFlow::Continue(());
            }
            items.push(env);
            if items.len() >= max {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        self.left -= items.len();
        // A full chunk stopped at its last message; anything else read up to the end.
        let last = items
            .last()
            .and_then(|e| e.cursor)
            .and_then(|c| i64::try_from(c.offset).ok());
        self.next = match last {
            Some(offset) if !stop && items.len() >= max => offset + 1,
            _ => self.end,
        };
        Ok(items)
    }
}

/// A replay stream past its first chunk: yields the chunk it holds, then waits for a reader
/// and reads the next one.
struct ReplayState {
    readers: Arc<Readers>,
    rest: ReplayRest,
    chunk: std::vec::IntoIter<Envelope>,
    failed: bool,
    // Dropped with the stream: stops a chunk being read for nobody.
    cancel: CancelOnDrop,
}

impl ReplayState {
    async fn next(mut self) -> Option<(Result<Envelope>, Self)> {
        loop {
            if let Some(env) = self.chunk.next() {
                return Some((Ok(env), self));
            }
            if self.failed || self.rest.is_done() {
                return None;
            }
            match self.read_chunk().await {
                Ok(chunk) => self.chunk = chunk.into_iter(),
                Err(e) => {
                    self.failed = true;
                    return Some((Err(e), self));
                }
            }
        }
    }

    async fn read_chunk(&mut self) -> Result<Vec<Envelope>> {
        let slot = self.readers.acquire().await?;
        let readers = self.readers.clone();
        let token = self.cancel.token();
        // The position moves on only when the read succeeded, so `rest` goes to the blocking
        // thread and comes back with the chunk.
        let mut rest = self.rest.clone();
        let (rest, chunk) = blocking(move || {
            let lease = slot.lease()?;
            let chunk = rest.read(&readers, &lease, false, &token)?;
            Ok((rest, chunk))
        })
        .await?;
        self.rest = rest;
        Ok(chunk)
    }
}

/// Reads backwards from `query.before` (or the end) in growing chunks, at most `scan_limit`
/// records. Blocking. The page is partial (`more_before` = the oldest offset read) when the
/// scan limit stopped it before it found `limit` messages or reached the low watermark.
fn history_page(
    readers: &Readers,
    reader: &Reader,
    query: &HistoryQuery,
    cancel: &Cancel,
) -> Result<HistoryPage> {
    let HistoryQuery {
        room,
        partition,
        before,
        limit,
        scan_limit,
    } = query;
    let (partition, before, limit, scan_limit) = (*partition, *before, *limit, *scan_limit);
    let (low, high) = readers.watermarks(reader, partition)?;
    if let Some(c) = before {
        // `before` is exclusive: the end of the log itself is a valid bound.
        readers.check_in_log(reader, c, (low, high), high)?;
    }
    let mut end = before.map_or(high, |c| {
        i64::try_from(c.offset).unwrap_or(i64::MAX).min(high)
    });
    // A room usually shares its partition with others: start with a few pages' worth of
    // records and double, so a busy room costs one read and a quiet one a few.
    let mut chunk = i64::try_from(limit)
        .unwrap_or(i64::MAX)
        .saturating_mul(4)
        .max(256);
    let mut scanned = 0i64;
    let mut found: Vec<Envelope> = Vec::new();
    while end > low && found.len() < limit && scanned < scan_limit {
        let size = chunk.min(scan_limit - scanned);
        let start = end.saturating_sub(size).max(low);
        let mut older = Vec::new();
        readers.scan(reader, partition, start, end, cancel, |env| {
            if let Some(env) = env.filter(|e| is_of(e, room)) {
                older.push(env);
            }
            ControlFlow::Continue(())
        })?;
        scanned += end - start;
        older.append(&mut found);
        found = older;
        end = start;
        chunk = chunk.saturating_mul(2);
    }
    if found.len() < limit && end > low {
        // Stopped by the scan limit: offsets below `end` were not read, and `before` is
        // exclusive, so `end` is exactly where the next page starts.
        let next = readers
            .epochs
            .stamp(Cursor::new(partition, u64::try_from(end).unwrap_or(0)));
        return Ok(HistoryPage::partial(found, next));
    }
    let skip = found.len().saturating_sub(limit);
    found.drain(..skip);
    Ok(HistoryPage::complete(found))
}
