-- chatbus store schema, version 1. Applied once by PostgresStore::connect (see migrate.rs).
--
-- Text that is compared or ordered (rooms, users) uses the "C" collation: byte order, the
-- order Rust's `str` has, so `conversations` pages exactly like MemoryStore whatever the
-- database's locale. Cursor parts are bigint: u32 partitions and epochs fit without wrapping,
-- and offsets are refused above i64::MAX (no broker makes them).

-- One row per room that has had a message: the per-room sequence counter (its row lock
-- serialises appliers of one room) and the newest message, which the conversation list
-- orders by and a replayed message is compared with.
CREATE TABLE chatbus_rooms (
    room            text COLLATE "C" PRIMARY KEY,
    last_seq        bigint NOT NULL DEFAULT 0,
    last_ts         bigint,
    last_partition  bigint,
    last_epoch      bigint,
    last_pos        bigint
);

-- Messages in their current state. (room, seq) is the primary key so that a page is a
-- backward index range scan of the room, O(page); `body` is NULL once deleted. The body is
-- bytea, not text: PostgreSQL text cannot hold U+0000, which a client may well send.
CREATE TABLE chatbus_messages (
    room       text COLLATE "C" NOT NULL,
    seq        bigint NOT NULL,
    id         uuid NOT NULL UNIQUE,
    author     text COLLATE "C" NOT NULL,
    name       text,
    to_user    text COLLATE "C",
    body       bytea,
    ts         bigint NOT NULL,
    partition  bigint NOT NULL,
    epoch      bigint NOT NULL,
    pos        bigint NOT NULL,
    edited_ts  bigint,
    PRIMARY KEY (room, seq)
);

-- A page `before` a cursor starts at the message with exactly that cursor.
CREATE INDEX chatbus_messages_cursor ON chatbus_messages (room, partition, epoch, pos);

-- Reactions: one row per (message, emoji, user). All rows of one emoji on one message share
-- `ord`, taken from the sequence when the emoji is first used, so the emojis keep their order
-- of first use even after the first user takes theirs back.
CREATE SEQUENCE chatbus_reaction_ord;
CREATE TABLE chatbus_reactions (
    message  uuid NOT NULL,
    emoji    text COLLATE "C" NOT NULL,
    user_id  text COLLATE "C" NOT NULL,
    ord      bigint NOT NULL,
    PRIMARY KEY (message, emoji, user_id)
);

-- Read positions: the cursor read up to and the seq of the newest message at or before it,
-- so unread is a range scan of (room, seq) after it, O(unread).
CREATE TABLE chatbus_reads (
    room       text COLLATE "C" NOT NULL,
    user_id    text COLLATE "C" NOT NULL,
    partition  bigint NOT NULL,
    epoch      bigint NOT NULL,
    pos        bigint NOT NULL,
    seq        bigint NOT NULL,
    PRIMARY KEY (room, user_id)
);

-- Memberships, keyed by user first: a user's conversation list reads only their rows.
CREATE TABLE chatbus_members (
    user_id    text COLLATE "C" NOT NULL,
    room       text COLLATE "C" NOT NULL,
    since      bigint NOT NULL,
    with_user  text COLLATE "C",
    PRIMARY KEY (user_id, room)
);

-- The last log position applied per partition, written in the same transaction as the
-- events: what makes the projection exactly-once.
CREATE TABLE chatbus_positions (
    partition  bigint PRIMARY KEY,
    epoch      bigint NOT NULL,
    pos        bigint NOT NULL
);
