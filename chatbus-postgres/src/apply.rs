//! [`Store::apply`](chatbus_core::store::Store::apply): a batch of events in one transaction.
//!
//! Round trips per batch, whatever its size: `BEGIN`; one pipeline that creates and locks
//! the rows of the rooms receiving messages and finds which message ids are already stored;
//! one pipeline of every write; `COMMIT`. Consecutive messages become one
//! `INSERT ... SELECT FROM unnest(...)` (the bulk of a log); each edit, delete, reaction or
//! read is one prepared statement that decides by itself whether it counts (author check,
//! tombstone, forward-only read), so it needs no answer before the next is sent; all
//! memberships are two upserts at the end, the rooms' counters one update, and the partition's
//! position one upsert, inside the same transaction as the events.
//!
//! Sequence numbers are assigned here from the locked room rows, so two appliers of one room
//! (two projectors replaying the same log) take turns; the loser of the race then finds the
//! ids stored and skips them. Rooms are locked in sorted order, all at the start, so two
//! batches never wait on each other in a cycle; a deadlock or serialization failure anyway
//! (rows of other tables) is retried a few times.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use chatbus_core::store::{ChatEvent, EventKind};
use chatbus_core::{Cursor, Result};
use deadpool_postgres::{Object, Transaction};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Statement;
use uuid::Uuid;

use crate::convert::{self, SqlCursor};
use crate::error;

/// Creates the rows of the rooms about to get messages, then locks them all (new and old)
/// in sorted order. Two statements rather than one `ON CONFLICT DO UPDATE`, which would
/// write a new version of every row only to have the batch's end write another.
const CREATE_ROOMS: &str = "INSERT INTO chatbus_rooms (room) SELECT unnest($1::text[])
     ON CONFLICT (room) DO NOTHING";

const LOCK_ROOMS: &str = "SELECT room, last_seq, last_partition, last_epoch, last_pos
     FROM chatbus_rooms WHERE room = ANY($1::text[]) ORDER BY room FOR UPDATE";

const KNOWN_IDS: &str = "SELECT id FROM chatbus_messages WHERE id = ANY($1::uuid[])";

const INSERT_MESSAGES: &str = "INSERT INTO chatbus_messages
         (room, seq, id, author, name, to_user, body, ts, partition, epoch, pos)
     SELECT * FROM unnest($1::text[], $2::int8[], $3::uuid[], $4::text[], $5::text[],
                          $6::text[], $7::bytea[], $8::int8[], $9::int8[], $10::int8[],
                          $11::int8[])
     ON CONFLICT (id) DO NOTHING";

const EDIT: &str = "UPDATE chatbus_messages
     SET body = $4, edited_ts = GREATEST(COALESCE(edited_ts, $5), $5)
     WHERE id = $1 AND room = $2 AND author = $3 AND body IS NOT NULL";

const DELETE: &str = "WITH d AS (
         UPDATE chatbus_messages SET body = NULL
         WHERE id = $1 AND room = $2 AND author = $3 RETURNING id)
     DELETE FROM chatbus_reactions WHERE message IN (SELECT id FROM d)";

/// An emoji already on the message keeps its place (`ord`); a new one goes last.
const REACT_ON: &str = "INSERT INTO chatbus_reactions (message, emoji, user_id, ord)
     SELECT m.id, $3, $4, COALESCE(
         (SELECT min(x.ord) FROM chatbus_reactions x WHERE x.message = m.id AND x.emoji = $3),
         nextval('chatbus_reaction_ord'))
     FROM chatbus_messages m WHERE m.id = $1 AND m.room = $2 AND m.body IS NOT NULL
     ON CONFLICT DO NOTHING";

const REACT_OFF: &str = "DELETE FROM chatbus_reactions x USING chatbus_messages m
     WHERE x.message = $1 AND x.emoji = $3 AND x.user_id = $4
       AND m.id = x.message AND m.room = $2";

/// The seq read up to is the newest message at or before the cursor in its log (the memory
/// store's `is_at_or_before`): the first match of a backward scan of the room's (room, seq)
/// key. Reads are near the end, so this costs about the messages after the read position. The
/// `+ 0`s keep the filter off the cursor index: given the chance, the planner answers it with
/// a bitmap scan of the whole room and a sort, 10x slower for a read at the end. The row then
/// moves only forward: past a newer message, or to a cursor further along the same log.
const READ: &str = "WITH s AS (
         SELECT COALESCE((
             SELECT seq FROM chatbus_messages
             WHERE room = $1 AND (epoch + 0 = $4 OR epoch + 0 = 0 OR $4 = 0)
               AND (partition + 0, pos + 0) <= ($3, $5)
             ORDER BY seq DESC LIMIT 1), 0) AS seq)
     INSERT INTO chatbus_reads AS r (room, user_id, partition, epoch, pos, seq)
     SELECT $1, $2, $3, $4, $5, s.seq FROM s
     ON CONFLICT (room, user_id) DO UPDATE
     SET partition = EXCLUDED.partition, epoch = EXCLUDED.epoch, pos = EXCLUDED.pos,
         seq = EXCLUDED.seq
     WHERE EXCLUDED.seq > r.seq
        OR (EXCLUDED.seq = r.seq
            AND (r.epoch = EXCLUDED.epoch OR r.epoch = 0 OR EXCLUDED.epoch = 0)
            AND (r.partition, r.pos) <= (EXCLUDED.partition, EXCLUDED.pos)
            AND (r.partition, r.epoch, r.pos)
                IS DISTINCT FROM (EXCLUDED.partition, EXCLUDED.epoch, EXCLUDED.pos))";

const UPDATE_ROOMS: &str = "UPDATE chatbus_rooms r
     SET last_seq = u.seq, last_ts = u.ts, last_partition = u.partition,
         last_epoch = u.epoch, last_pos = u.pos
     FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[])
         AS u(room, seq, ts, partition, epoch, pos)
     WHERE r.room = u.room";

/// Memberships without a peer: a membership keeps its first `since`, so an existing one is
/// left alone (`DO NOTHING` does not even lock it: most messages come from members).
const INSERT_MEMBERS: &str = "INSERT INTO chatbus_members (user_id, room, since)
     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[])
     ON CONFLICT (user_id, room) DO NOTHING";

/// Memberships of direct conversations: `with_user` is set once, the first time a peer is
/// known.
const UPSERT_PEERS: &str = "INSERT INTO chatbus_members AS m (user_id, room, since, with_user)
     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[])
     ON CONFLICT (user_id, room) DO UPDATE SET with_user = EXCLUDED.with_user
     WHERE m.with_user IS NULL";

const UPSERT_POSITION: &str = "INSERT INTO chatbus_positions (partition, epoch, pos)
     VALUES ($1, $2, $3)
     ON CONFLICT (partition) DO UPDATE SET epoch = EXCLUDED.epoch, pos = EXCLUDED.pos";

/// Attempts of a batch that lost a deadlock or serialization race.
const ATTEMPTS: usize = 3;

/// Applies `events` and records `position`, in one transaction.
pub(crate) async fn apply(
    client: &mut Object,
    events: &[ChatEvent],
    position: Option<Cursor>,
    budget: Duration,
) -> Result<()> {
    // Everything that can be refused is refused before the transaction starts.
    let cursors = events
        .iter()
        .map(|e| SqlCursor::from_cursor(e.cursor))
        .collect::<Result<Vec<_>>>()?;
    let reads = events
        .iter()
        .map(|e| match &e.kind {
            EventKind::Read { cursor } => SqlCursor::from_cursor(*cursor).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let position = position.map(SqlCursor::from_cursor).transpose()?;
    if events.is_empty() && position.is_none() {
        return Ok(());
    }
    let mut attempt = 1;
    loop {
        match once(client, events, &cursors, &reads, position).await {
            Err(e) if attempt < ATTEMPTS && is_race(&e) => {
                tracing::debug!(attempt, error = %e, "chatbus-postgres: apply retried");
                attempt += 1;
            }
            r => return r.map_err(|e| error::db(e, "apply", budget)),
        }
    }
}

fn is_race(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// A room row as locked: its counter and newest message.
#[derive(Debug)]
struct RoomRow {
    seq: i64,
    last: Option<SqlCursor>,
    ts: i64,
    changed: bool,
}

/// Consecutive new messages, as the columns of one insert.
#[derive(Debug, Default)]
struct Run<'a> {
    room: Vec<&'a str>,
    seq: Vec<i64>,
    id: Vec<Uuid>,
    author: Vec<&'a str>,
    name: Vec<Option<&'a str>>,
    to: Vec<Option<&'a str>>,
    body: Vec<&'a [u8]>,
    ts: Vec<i64>,
    partition: Vec<i64>,
    epoch: Vec<i64>,
    pos: Vec<i64>,
}

/// One statement of the write pipeline.
#[derive(Debug)]
enum Step<'a> {
    Messages(Box<Run<'a>>),
    Edit {
        target: Uuid,
        room: &'a str,
        from: &'a str,
        body: &'a [u8],
        ts: i64,
    },
    Delete {
        target: Uuid,
        room: &'a str,
        from: &'a str,
    },
    React {
        target: Uuid,
        room: &'a str,
        emoji: &'a str,
        from: &'a str,
        on: bool,
    },
    Read {
        room: &'a str,
        from: &'a str,
        at: SqlCursor,
    },
}

/// Memberships to upsert, first occurrence first.
#[derive(Debug, Default)]
struct Members<'a> {
    at: HashMap<(&'a str, &'a str), usize>,
    rows: Vec<(&'a str, &'a str, i64, Option<&'a str>)>,
}

impl<'a> Members<'a> {
    /// The memory store's `member`: the first event makes the membership, the first peer
    /// known sticks.
    fn add(&mut self, user: &'a str, room: &'a str, since: i64, with: Option<&'a str>) {
        match self.at.get(&(user, room)) {
            Some(&i) => {
                if self.rows[i].3.is_none() {
                    self.rows[i].3 = with;
                }
            }
            None => {
                self.at.insert((user, room), self.rows.len());
                self.rows.push((user, room, since, with));
            }
        }
    }
}

async fn once(
    client: &mut Object,
    events: &[ChatEvent],
    cursors: &[SqlCursor],
    reads: &[Option<SqlCursor>],
    position: Option<SqlCursor>,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut rooms: Vec<&str> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Message { .. }))
        .map(|e| e.room.as_str())
        .collect();
    rooms.sort_unstable();
    rooms.dedup();
    let mut state: HashMap<String, RoomRow> = HashMap::with_capacity(rooms.len());
    let mut known: HashSet<Uuid> = HashSet::new();
    if !rooms.is_empty() {
        let ids: Vec<Uuid> = events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Message { .. }))
            .map(|e| convert::uuid(e.id))
            .collect();
        let create = tx.prepare_cached(CREATE_ROOMS).await?;
        let lock = tx.prepare_cached(LOCK_ROOMS).await?;
        let find = tx.prepare_cached(KNOWN_IDS).await?;
        // Pipelined, in this order: the ids are looked up once the rooms are ours, so a
        // concurrent applier's committed messages are seen.
        let (_, locked, found) = futures::future::try_join3(
            tx.execute(&create, &[&rooms]),
            tx.query(&lock, &[&rooms]),
            tx.query(&find, &[&ids]),
        )
        .await?;
        for row in locked {
            let last = match (
                row.try_get::<_, Option<i64>>("last_partition")?,
                row.try_get::<_, Option<i64>>("last_epoch")?,
                row.try_get::<_, Option<i64>>("last_pos")?,
            ) {
                (Some(partition), Some(epoch), Some(pos)) => Some(SqlCursor {
                    partition,
                    epoch,
                    pos,
                }),
                _ => None,
            };
            state.insert(
                row.try_get("room")?,
                RoomRow {
                    seq: row.try_get("last_seq")?,
                    last,
                    ts: 0,
                    changed: false,
                },
            );
        }
        for row in found {
            known.insert(row.try_get(0)?);
        }
    }

    let mut steps: Vec<Step<'_>> = Vec::new();
    let mut run = Run::default();
    let mut members = Members::default();
    for ((e, c), read) in events.iter().zip(cursors).zip(reads) {
        let room = e.room.as_str();
        let from = &*e.from;
        let ts = convert::ts(e.ts);
        if !matches!(e.kind, EventKind::Message { .. }) && !run.id.is_empty() {
            steps.push(Step::Messages(Box::new(std::mem::take(&mut run))));
        }
        match &e.kind {
            EventKind::Message { name, body, to } => {
                let id = convert::uuid(e.id);
                // Every room of a message was locked above; a row missing here would mean
                // the lock query answered for other rooms, which it cannot.
                let Some(r) = state.get_mut(room) else {
                    continue;
                };
                // Log order per room: a message at or before the newest one is a replay.
                let replay = r
                    .last
                    .is_some_and(|l| l.same_log(c) && l.partition == c.partition && c.pos <= l.pos);
                if replay || !known.insert(id) {
                    continue;
                }
                r.seq += 1;
                r.last = Some(*c);
                r.ts = ts;
                r.changed = true;
                run.room.push(room);
                run.seq.push(r.seq);
                run.id.push(id);
                run.author.push(from);
                run.name.push(name.as_deref());
                run.to.push(to.as_deref());
                run.body.push(body.as_bytes());
                run.ts.push(ts);
                run.partition.push(c.partition);
                run.epoch.push(c.epoch);
                run.pos.push(c.pos);
                members.add(from, room, ts, to.as_deref());
                if let Some(to) = to {
                    members.add(to, room, ts, Some(from));
                }
            }
            EventKind::Edit { target, body } => steps.push(Step::Edit {
                target: convert::uuid(*target),
                room,
                from,
                body: body.as_bytes(),
                ts,
            }),
            EventKind::Delete { target } => steps.push(Step::Delete {
                target: convert::uuid(*target),
                room,
                from,
            }),
            EventKind::React { target, emoji, on } => steps.push(Step::React {
                target: convert::uuid(*target),
                room,
                emoji,
                from,
                on: *on,
            }),
            EventKind::Read { .. } => {
                if let Some(at) = read {
                    steps.push(Step::Read {
                        room,
                        from,
                        at: *at,
                    });
                }
                members.add(from, room, ts, None);
            }
            // An event kind this store does not know yet changes nothing, as in a store
            // that predates it.
            _ => {}
        }
    }
    if !run.id.is_empty() {
        steps.push(Step::Messages(Box::new(run)));
    }

    // The counters, in sorted room order (the order they were locked in).
    let mut changed: Vec<(&str, &RoomRow)> = state
        .iter()
        .filter(|(_, r)| r.changed)
        .map(|(k, r)| (k.as_str(), r))
        .collect();
    changed.sort_unstable_by_key(|(k, _)| *k);
    let rooms_cols = (
        changed.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        changed.iter().map(|(_, r)| r.seq).collect::<Vec<_>>(),
        changed.iter().map(|(_, r)| r.ts).collect::<Vec<_>>(),
        changed
            .iter()
            .map(|(_, r)| r.last.map_or(0, |l| l.partition))
            .collect::<Vec<_>>(),
        changed
            .iter()
            .map(|(_, r)| r.last.map_or(0, |l| l.epoch))
            .collect::<Vec<_>>(),
        changed
            .iter()
            .map(|(_, r)| r.last.map_or(0, |l| l.pos))
            .collect::<Vec<_>>(),
    );
    // Sorted, so that concurrent batches lock membership rows in one order.
    let mut member_rows = members.rows;
    member_rows.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    type Member<'m> = &'m (&'m str, &'m str, i64, Option<&'m str>);
    let (peers, plain): (Vec<Member<'_>>, Vec<Member<'_>>) =
        member_rows.iter().partition(|m| m.3.is_some());
    let plain_cols = (
        plain.iter().map(|m| m.0).collect::<Vec<_>>(),
        plain.iter().map(|m| m.1).collect::<Vec<_>>(),
        plain.iter().map(|m| m.2).collect::<Vec<_>>(),
    );
    let peer_cols = (
        peers.iter().map(|m| m.0).collect::<Vec<_>>(),
        peers.iter().map(|m| m.1).collect::<Vec<_>>(),
        peers.iter().map(|m| m.2).collect::<Vec<_>>(),
        peers.iter().map(|m| m.3).collect::<Vec<_>>(),
    );

    let insert = tx.prepare_cached(INSERT_MESSAGES).await?;
    let edit = tx.prepare_cached(EDIT).await?;
    let delete = tx.prepare_cached(DELETE).await?;
    let react_on = tx.prepare_cached(REACT_ON).await?;
    let react_off = tx.prepare_cached(REACT_OFF).await?;
    let read_stmt = tx.prepare_cached(READ).await?;
    let update_rooms = tx.prepare_cached(UPDATE_ROOMS).await?;
    let insert_members = tx.prepare_cached(INSERT_MEMBERS).await?;
    let upsert_peers = tx.prepare_cached(UPSERT_PEERS).await?;
    let upsert_position = tx.prepare_cached(UPSERT_POSITION).await?;

    let mut pipeline: Vec<Pending<'_>> = Vec::with_capacity(steps.len() + 3);
    for step in &steps {
        pipeline.push(match step {
            Step::Messages(r) => exec(
                &tx,
                &insert,
                vec![
                    &r.room,
                    &r.seq,
                    &r.id,
                    &r.author,
                    &r.name,
                    &r.to,
                    &r.body,
                    &r.ts,
                    &r.partition,
                    &r.epoch,
                    &r.pos,
                ],
            ),
            Step::Edit {
                target,
                room,
                from,
                body,
                ts,
            } => exec(&tx, &edit, vec![target, room, from, body, ts]),
            Step::Delete { target, room, from } => exec(&tx, &delete, vec![target, room, from]),
            Step::React {
                target,
                room,
                emoji,
                from,
                on,
            } => {
                let stmt = if *on { &react_on } else { &react_off };
                exec(&tx, stmt, vec![target, room, emoji, from])
            }
            Step::Read { room, from, at } => exec(
                &tx,
                &read_stmt,
                vec![room, from, &at.partition, &at.epoch, &at.pos],
            ),
        });
    }
    if !rooms_cols.0.is_empty() {
        let (a, b, c, d, e, f) = &rooms_cols;
        pipeline.push(exec(&tx, &update_rooms, vec![a, b, c, d, e, f]));
    }
    // Each (user, room) is in one of the two: the batch's rows were merged above.
    if !peer_cols.0.is_empty() {
        let (a, b, c, d) = &peer_cols;
        pipeline.push(exec(&tx, &upsert_peers, vec![a, b, c, d]));
    }
    if !plain_cols.0.is_empty() {
        let (a, b, c) = &plain_cols;
        pipeline.push(exec(&tx, &insert_members, vec![a, b, c]));
    }
    if let Some(p) = &position {
        pipeline.push(exec(
            &tx,
            &upsert_position,
            vec![&p.partition, &p.epoch, &p.pos],
        ));
    }
    run_pipeline(pipeline).await?;
    tx.commit().await
}

type Param<'a> = &'a (dyn ToSql + Sync);
type Pending<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

fn exec<'a>(tx: &'a Transaction<'a>, stmt: &'a Statement, params: Vec<Param<'a>>) -> Pending<'a> {
    Box::pin(tx.execute_raw(stmt, params))
}

/// Runs statements pipelined: all are sent before the first answer is awaited, in order.
///
/// tokio-postgres sends a statement when its future is first polled, and the server runs a
/// connection's statements in the order received; so every future is polled once, in order,
/// before any is awaited. Answers come back in that order too, so afterwards only the oldest
/// unfinished one needs polling. The first error ends the pipeline (the transaction is then
/// aborted on the server, and dropped here).
async fn run_pipeline(pending: Vec<Pending<'_>>) -> Result<(), tokio_postgres::Error> {
    let mut pending: Vec<Option<Pending<'_>>> = pending.into_iter().map(Some).collect();
    let (mut sent, mut done) = (0, 0);
    std::future::poll_fn(move |cx| {
        // First polls, in order: that is what sends each statement.
        while sent < pending.len() {
            if let Some(f) = &mut pending[sent] {
                match f.as_mut().poll(cx) {
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(_)) => pending[sent] = None,
                    Poll::Pending => {}
                }
            }
            sent += 1;
        }
        // Then the oldest unfinished, as the answers arrive in order.
        while done < pending.len() {
            if let Some(f) = &mut pending[done] {
                match f.as_mut().poll(cx) {
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(_)) => pending[done] = None,
                    Poll::Pending => return Poll::Pending,
                }
            }
            done += 1;
        }
        Poll::Ready(Ok(()))
    })
    .await
}
