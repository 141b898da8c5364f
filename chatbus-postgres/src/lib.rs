//! PostgreSQL store for chatbus: the [`Store`](chatbus_core::store::Store) trait on tables, so
//! that chat state (messages as they are now, with edits, deletes and reactions; read
//! positions and unread counts; each user's conversation list) outlives a process and is
//! shared by every instance.
//!
//! The broker's log stays the source of truth. A projector reads it and calls
//! [`apply`](chatbus_core::store::Store::apply) with batches of events; servers read pages,
//! read states and conversation lists from here. What each event means is the core's
//! (`chatbus_core::store`), the same as in the `MemoryStore`: the conformance suite and a
//! differential test against the `MemoryStore` (`tests/parity.rs`) hold this store to it.
//!
//! ```no_run
//! use chatbus_core::store::Store;
//! use chatbus_postgres::{PostgresConfig, PostgresStore};
//!
//! # async fn f() -> chatbus_core::Result<()> {
//! let store = PostgresStore::connect(PostgresConfig::new("postgres://chat@db/chat")).await?;
//! let room = chatbus_core::Room::new("general")?;
//! let page = store.page(&room, "alice", None, 50).await?;
//! # Ok(()) }
//! ```
//!
//! # Schema
//!
//! Created by `migrations/0001_init.sql`, applied by [`PostgresStore::connect`] in one
//! transaction under `pg_advisory_xact_lock`, so instances starting together do not race;
//! each applied version is a row of `chatbus_migrations(version, applied_at)`, and connecting
//! again applies nothing. Tables are prefixed `chatbus_` to share a database with the
//! application.
//!
//! | table | key | holds | why this key / index |
//! |---|---|---|---|
//! | `chatbus_rooms` | `room` | `last_seq`, newest message's `ts` and cursor | the per-room counter: its row lock serialises appliers of a room; conversations order by `last_ts` |
//! | `chatbus_messages` | `(room, seq)`, `id` unique | author, name, `to_user`, `body` (NULL once deleted), `ts`, cursor (`partition`, `epoch`, `pos`), `edited_ts` | a page is a backward range scan of `(room, seq)` with `LIMIT`: O(page); unread is a forward range scan after the read seq: O(unread) |
//! | index `(room, partition, epoch, pos)` | | | a page `before` a cursor finds its message by exact cursor |
//! | `chatbus_reactions` | `(message, emoji, user_id)` | `ord`, shared by all rows of one emoji | a set per (message, emoji, user); a message's reactions are a prefix scan; `ord` keeps emojis in order of first use |
//! | `chatbus_reads` | `(room, user_id)` | cursor read up to, and the seq of the newest message at or before it | unread counts after `seq` without resolving the cursor again |
//! | `chatbus_members` | `(user_id, room)` | `since`, `with_user` | user first: a conversation list reads only the user's rows, O(user's rooms) |
//! | `chatbus_positions` | `partition` | the last log position applied | where a projector resumes |
//!
//! The store's sessions run with `enable_seqscan = off`: every statement is meant to be an
//! index lookup or range scan, and a cached generic plan made while a table was nearly empty
//! (a fresh store being filled before autovacuum's first `ANALYZE`) would otherwise keep
//! scanning the whole table as it grows.
//!
//! Text that is compared or ordered is `COLLATE "C"` (byte order, as Rust's `str`), so the
//! conversation order does not depend on the database's locale. Cursor parts and times are
//! `bigint`: a `u32` partition or epoch fits without wrapping; an offset above `i64::MAX`
//! (which no broker produces) makes `apply` fail with `InvalidCursor`, and a time above it
//! is stored as `i64::MAX`. Bodies are `bytea` holding UTF-8, because PostgreSQL `text`
//! cannot hold U+0000; other strings (users, emojis, names) are `text`, and one with a
//! U+0000 makes its batch fail with `Backend` (see *Errors*).
//!
//! # Applying a batch
//!
//! One transaction per `apply`, with a fixed number of round trips whatever the batch size:
//! the rows of the rooms receiving messages are created or locked (in sorted order, so two
//! batches never deadlock on them) together with a lookup of the message ids already stored;
//! then every write is sent as one pipeline of prepared statements: consecutive messages as
//! one `INSERT ... SELECT FROM unnest(...)`, each edit, delete, reaction or read as one
//! statement that decides for itself whether it counts (the author check, the tombstone, the
//! forward-only read), then the rooms' counters, all memberships and the partition's position.
//! A batch that fails anywhere leaves nothing. A deadlock or serialization failure is retried
//! (3 attempts).
//!
//! # Exactly-once projection
//!
//! The position of the batch's partition is written in the same transaction as its events.
//! A projector resumes strictly after [`position`](chatbus_core::store::Store::position), so
//! after a crash it either finds the batch and its position, or neither, and replays; and
//! replaying is harmless anyway (a message is added once by id and a replayed cursor is
//! skipped; reactions are sets; reads move forward only). [`claim`](chatbus_core::store::Store::claim)
//! makes one projector per partition do the work: it takes a session advisory lock
//! `pg_try_advisory_lock(0x63627573 /* "cbus" */, partition)` on a connection of its own
//! (not pooled, which would hand the lock to the next borrower), kept in the returned claim.
//! Dropping the claim closes the connection and frees the lock; if the server ends the
//! session (restart, `pg_terminate_backend`, a broken network), `is_held()` turns false and
//! the projector should stop and claim again. Correctness does not rest on claims: two
//! projectors applying the same events serialise on the room rows and the second changes
//! nothing.
//!
//! # Errors, timeouts and restarts
//!
//! Every call has a budget of `connect_timeout + statement_timeout` (5 s + 5 s by default)
//! for getting a pooled connection and running its statements; past it the call fails with
//! `Timeout`, so a server that does not answer never hangs a caller. The server cancels a
//! statement past `statement_timeout` too (`Timeout`). A server that is down, restarting,
//! out of connections, or a connection that broke, is `Unavailable`; a statement refused for
//! its data (a U+0000 in a user name) is `Backend`, which retrying does not fix.
//!
//! After a PostgreSQL restart nothing needs doing: the pool checks each connection with a
//! round trip before handing it out (deadpool's `RecyclingMethod::Verified`), replaces the
//! broken ones, and the first call after the server is back succeeds. Calls made during the
//! outage fail at once with `Unavailable` (connection refused) or, if the server hangs, with
//! `Timeout` after the budget. Claims are lost with their sessions, as above.
//!
//! The crate speaks plain TCP (`NoTls`); TLS to the database is not implemented yet.

mod apply;
mod claim;
mod config;
mod convert;
mod error;
mod migrate;
mod query;
mod store;

pub use config::PostgresConfig;
pub use store::PostgresStore;
/// The driver, re-exported so that applications use the version this crate was built with.
pub use tokio_postgres;
