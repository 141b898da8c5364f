//! The read side of the store: messages, pages, read states and conversation lists.
//!
//! Each call is one statement (one round trip): a message's reactions are aggregated in a
//! `LATERAL` subquery on the reactions' primary key, and a conversation list joins each room's
//! newest message and unread count the same way. The viewer is always `$1`.

use std::sync::Arc;

use chatbus_core::store::{
    Conversation, ConversationKey, ConversationPage, Reaction, ReadState, StatePage, StoredMessage,
};
use chatbus_core::{Cursor, MessageId, Result, Room};
use deadpool_postgres::Object;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::convert::{self, SqlCursor};
use crate::error::{self, corrupt};

/// A message's columns (`m`) and its reactions (`rx`, per emoji in order of first use, with
/// whether the viewer `$1` is among the users), for [`stored`].
macro_rules! message_select {
    ($from:literal) => {
        concat!(
            "SELECT m.id, m.author, m.name, m.to_user, m.body, m.ts, m.partition, m.epoch,
                    m.pos, m.edited_ts, rx.r_emoji, rx.r_count, rx.r_me
             FROM ",
            $from,
            " LEFT JOIN LATERAL (
                 SELECT array_agg(g.emoji ORDER BY g.o) AS r_emoji,
                        array_agg(g.n ORDER BY g.o) AS r_count,
                        array_agg(g.me ORDER BY g.o) AS r_me
                 FROM (SELECT emoji, min(ord) AS o, count(*) AS n, bool_or(user_id = $1) AS me
                       FROM chatbus_reactions WHERE message = m.id GROUP BY emoji) g
             ) rx ON true"
        )
    };
}

const MESSAGE: &str = concat!(
    message_select!("chatbus_messages m"),
    " WHERE m.id = $3 AND m.room = $2"
);

/// The newest `$3` messages of room `$2`, newest first: a backward scan of (room, seq).
const PAGE_NEWEST: &str = concat!(
    message_select!(
        "(SELECT * FROM chatbus_messages WHERE room = $2 ORDER BY seq DESC LIMIT $3) m"
    ),
    " ORDER BY m.seq DESC"
);

/// The message with cursor ($4, $5, $6) (the anchor, first) and the `$3 - 1` before it.
/// The anchor comes back so that "no such cursor" (no rows) differs from "nothing before it"
/// (only the anchor).
const PAGE_BEFORE: &str = concat!(
    message_select!(
        "(SELECT * FROM chatbus_messages
          WHERE room = $2 AND seq <= (
              SELECT seq FROM chatbus_messages
              WHERE room = $2 AND partition = $4 AND epoch = $5 AND pos = $6
              ORDER BY seq DESC LIMIT 1)
          ORDER BY seq DESC LIMIT $3) m"
    ),
    " ORDER BY m.seq DESC"
);

/// Unread: others' messages after the read seq, not deleted; a range scan of (room, seq).
const READ_STATE: &str = "SELECT r.partition, r.epoch, r.pos,
         (SELECT count(*) FROM chatbus_messages m
          WHERE m.room = $2 AND m.seq > COALESCE(r.seq, 0) AND m.author <> $1
            AND m.body IS NOT NULL) AS unread
     FROM (SELECT 1) one
     LEFT JOIN chatbus_reads r ON r.room = $2 AND r.user_id = $1";

/// A user's rooms (their members rows, by primary key prefix) ordered by activity, strictly
/// after the key ($2, $3) when one is given, with each room's newest message and unread.
const CONVERSATIONS: &str = concat!(
    "WITH c AS (
         SELECT mb.room, mb.with_user, COALESCE(r.last_ts, mb.since) AS cts, r.last_seq
         FROM chatbus_members mb LEFT JOIN chatbus_rooms r ON r.room = mb.room
         WHERE mb.user_id = $1
           AND ($2::int8 IS NULL OR (COALESCE(r.last_ts, mb.since), mb.room) < ($2, $3::text))
         ORDER BY cts DESC, mb.room DESC
         LIMIT $4)
     SELECT c.room, c.with_user, c.cts, u.unread, last.*
     FROM c
     LEFT JOIN LATERAL (",
    message_select!("chatbus_messages m"),
    " WHERE m.room = c.room AND m.seq = c.last_seq) last ON true
     LEFT JOIN LATERAL (
         SELECT count(*) AS unread FROM chatbus_messages x
         WHERE x.room = c.room
           AND x.seq > COALESCE(
               (SELECT seq FROM chatbus_reads WHERE room = c.room AND user_id = $1), 0)
           AND x.author <> $1 AND x.body IS NOT NULL) u ON true
     ORDER BY c.cts DESC, c.room DESC"
);

/// `limit` as a SQL LIMIT, plus `extra` rows (to see whether there is more).
fn sql_limit(limit: usize, extra: usize) -> i64 {
    i64::try_from(limit.saturating_add(extra)).unwrap_or(i64::MAX)
}

/// The message of a row of [`message_select!`]; `None` when its columns are NULL (no message
/// joined).
fn stored(row: &Row, room: &Room) -> Result<Option<StoredMessage>> {
    let e = |e| error::db(e, "decode", std::time::Duration::ZERO);
    let Some(id) = row.try_get::<_, Option<Uuid>>("id").map_err(e)? else {
        return Ok(None);
    };
    let text = |col: &str| -> Result<Option<Arc<str>>> {
        Ok(row
            .try_get::<_, Option<&str>>(col)
            .map_err(e)?
            .map(Arc::from))
    };
    let body = match row.try_get::<_, Option<&[u8]>>("body").map_err(e)? {
        Some(b) => Some(Arc::from(
            std::str::from_utf8(b).map_err(|_| corrupt("body is not UTF-8"))?,
        )),
        None => None,
    };
    let emojis: Option<Vec<&str>> = row.try_get("r_emoji").map_err(e)?;
    let counts: Option<Vec<i64>> = row.try_get("r_count").map_err(e)?;
    let mes: Option<Vec<bool>> = row.try_get("r_me").map_err(e)?;
    let reactions = match (body.is_some(), emojis, counts, mes) {
        (true, Some(emojis), Some(counts), Some(mes)) => emojis
            .into_iter()
            .zip(counts)
            .zip(mes)
            .map(|((emoji, n), me)| {
                Ok(Reaction {
                    emoji: emoji.into(),
                    count: convert::count(n)?,
                    me,
                })
            })
            .collect::<Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    Ok(Some(StoredMessage {
        id: convert::id(id),
        room: room.clone(),
        from: text("author")?.ok_or_else(|| corrupt("author"))?,
        name: text("name")?,
        to: text("to_user")?,
        deleted: body.is_none(),
        body,
        ts: convert::ts_back(row.try_get("ts").map_err(e)?)?,
        cursor: convert::cursor(
            row.try_get("partition").map_err(e)?,
            row.try_get("epoch").map_err(e)?,
            row.try_get("pos").map_err(e)?,
        )?,
        edited: row
            .try_get::<_, Option<i64>>("edited_ts")
            .map_err(e)?
            .map(convert::ts_back)
            .transpose()?,
        reactions,
    }))
}

/// [`Store::message`](chatbus_core::store::Store::message).
pub(crate) async fn message(
    client: &Object,
    room: &Room,
    id: MessageId,
    viewer: &str,
    budget: std::time::Duration,
) -> Result<Option<StoredMessage>> {
    let e = |e| error::db(e, "message", budget);
    let stmt = client.prepare_cached(MESSAGE).await.map_err(e)?;
    let row = client
        .query_opt(&stmt, &[&viewer, &room.as_str(), &convert::uuid(id)])
        .await
        .map_err(e)?;
    match row {
        Some(row) => stored(&row, room),
        None => Ok(None),
    }
}

/// [`Store::page`](chatbus_core::store::Store::page).
pub(crate) async fn page(
    client: &Object,
    room: &Room,
    viewer: &str,
    before: Option<Cursor>,
    limit: usize,
    budget: std::time::Duration,
) -> Result<Option<StatePage>> {
    let e = |e| error::db(e, "page", budget);
    let rows = match before {
        None => {
            let stmt = client.prepare_cached(PAGE_NEWEST).await.map_err(e)?;
            client
                .query(&stmt, &[&viewer, &room.as_str(), &sql_limit(limit, 1)])
                .await
                .map_err(e)?
        }
        Some(c) => {
            // An offset no row can have names no stored message.
            let Some(c) = SqlCursor::lookup(c) else {
                return Ok(None);
            };
            let stmt = client.prepare_cached(PAGE_BEFORE).await.map_err(e)?;
            let mut rows = client
                .query(
                    &stmt,
                    &[
                        &viewer,
                        &room.as_str(),
                        &sql_limit(limit, 2),
                        &c.partition,
                        &c.epoch,
                        &c.pos,
                    ],
                )
                .await
                .map_err(e)?;
            if rows.is_empty() {
                return Ok(None);
            }
            rows.remove(0);
            rows
        }
    };
    let more = rows.len() > limit;
    let mut messages = rows
        .iter()
        .take(limit)
        .filter_map(|r| stored(r, room).transpose())
        .collect::<Result<Vec<_>>>()?;
    messages.reverse();
    Ok(Some(StatePage { messages, more }))
}

/// [`Store::read_state`](chatbus_core::store::Store::read_state).
pub(crate) async fn read_state(
    client: &Object,
    room: &Room,
    user: &str,
    budget: std::time::Duration,
) -> Result<ReadState> {
    let e = |e| error::db(e, "read_state", budget);
    let stmt = client.prepare_cached(READ_STATE).await.map_err(e)?;
    let row = client
        .query_one(&stmt, &[&user, &room.as_str()])
        .await
        .map_err(e)?;
    let cursor = match (
        row.try_get::<_, Option<i64>>("partition").map_err(e)?,
        row.try_get::<_, Option<i64>>("epoch").map_err(e)?,
        row.try_get::<_, Option<i64>>("pos").map_err(e)?,
    ) {
        (Some(p), Some(ep), Some(o)) => Some(convert::cursor(p, ep, o)?),
        _ => None,
    };
    Ok(ReadState {
        cursor,
        unread: convert::count(row.try_get("unread").map_err(e)?)?,
    })
}

/// [`Store::conversations`](chatbus_core::store::Store::conversations).
pub(crate) async fn conversations(
    client: &Object,
    user: &str,
    after: Option<&ConversationKey>,
    limit: usize,
    budget: std::time::Duration,
) -> Result<ConversationPage> {
    let e = |e| error::db(e, "conversations", budget);
    let stmt = client.prepare_cached(CONVERSATIONS).await.map_err(e)?;
    let after_ts = after.map(|k| convert::ts(k.ts));
    let after_room = after.map(|k| k.room.as_str());
    let rows = client
        .query(
            &stmt,
            &[&user, &after_ts, &after_room, &sql_limit(limit, 1)],
        )
        .await
        .map_err(e)?;
    let more = rows.len() > limit;
    let mut items = Vec::with_capacity(rows.len().min(limit));
    for row in rows.iter().take(limit) {
        let room: &str = row.try_get("room").map_err(e)?;
        let room = Room::new(room).map_err(|_| corrupt("room name"))?;
        items.push(Conversation {
            last: stored(row, &room)?,
            with: row
                .try_get::<_, Option<&str>>("with_user")
                .map_err(e)?
                .map(Arc::from),
            unread: convert::count(row.try_get("unread").map_err(e)?)?,
            ts: convert::ts_back(row.try_get("cts").map_err(e)?)?,
            room,
        });
    }
    let next = if more {
        items.last().map(Conversation::key)
    } else {
        None
    };
    Ok(ConversationPage { items, next })
}
