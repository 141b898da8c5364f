//! A Redis that comes back empty (here `FLUSHALL`; the same for a restart without
//! persistence, eviction, or a failover to a replica that missed the writes) restarts every
//! room's sequence at 1 (issue #11 item 1). With the history window on, before epochs:
//!
//! - a member already joined dropped every new message as a "duplicate" of a cursor it had
//!   seen before the flush, until the new sequence passed its old position;
//! - a client resuming with a cursor of the old log was replayed the new log's messages after
//!   that offset, as if it had the ones before (a silent gap).
//!
//! Now the room's sequence lives in one hash with its epoch, so a flush loses both: the new
//! messages carry another epoch, the member gets them and is told (`Outbound::Reset`), and a
//! resume with an old cursor is answered with a reset and goes live.
//!
//! The helpers stick to what the Hub had before epochs (other `Outbound`s are printed with
//! `Debug`), so this file also builds against the code before the fix and shows it failing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chatbus_core::conformance::unique_room;
use chatbus_core::{Broker, Cursor, Envelope, Hub, ReplayFrom, Room, Session};
use chatbus_testkit::redis::RedisServer;

const HISTORY: usize = 100;

/// What the session writes until it has been quiet for a while.
async fn drain(s: &mut Session) -> Vec<String> {
    chatbus_core::conformance::drain_session(s, Duration::from_millis(500)).await
}

async fn publish_n(hub: &Hub, r: &Room, prefix: &str, n: usize) -> Vec<Cursor> {
    let mut cursors = Vec::new();
    for i in 1..=n {
        match hub
            .publish(&Envelope::new(r.clone(), format!("{prefix}{i}")))
            .await
        {
            Ok(rc) => cursors.extend(rc.cursor),
            Err(e) => panic!("publish {prefix}{i}: {e}"),
        }
    }
    cursors
}

async fn flushall(server: &RedisServer) {
    let mut conn = common::raw(server).await;
    let ok: String = match chatbus_redis::redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
    {
        Ok(ok) => ok,
        Err(e) => panic!("FLUSHALL: {e}"),
    };
    assert_eq!(ok, "OK");
}

fn is_reset(frame: &str, reason: &str) -> bool {
    frame.starts_with("Reset {") && frame.contains(reason)
}

/// (a) A member joined before the flush keeps receiving: the new log's messages are not
/// dropped as copies of the old log's, and the session is told once that its history reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_flushall_a_joined_member_gets_the_new_messages_and_is_told() {
    let server = RedisServer::start().await;
    let hub = Hub::new(Arc::new(common::broker(&server, HISTORY).await));
    let r = unique_room("flush-live");
    let mut s = hub.connect("u");
    if let Err(e) = s.handle().join(r.clone()).await {
        panic!("join: {e}");
    }
    publish_n(&hub, &r, "old", 5).await;
    assert_eq!(
        drain(&mut s).await,
        ["old1", "old2", "old3", "old4", "old5"]
    );

    flushall(&server).await;
    // Sequence numbers 1..=3 again, all at or below the member's last cursor (5).
    let new = publish_n(&hub, &r, "new", 3).await;
    assert_eq!(
        new.iter().map(|c| c.offset).collect::<Vec<_>>(),
        [1, 2, 3],
        "the flush restarted the room's sequence"
    );
    let got = drain(&mut s).await;
    assert_eq!(
        got.iter()
            .filter(|f| f.starts_with("new"))
            .collect::<Vec<_>>(),
        ["new1", "new2", "new3"],
        "new messages after the flush were dropped: {got:?}"
    );
    assert!(is_reset(&got[0], "OtherLog"), "told first: {got:?}");
    assert_eq!(got.len(), 4, "{got:?}");
}

/// (b) A client that had a cursor before the flush resumes after it, when the new log has
/// passed that offset: it is told its history reset and goes live, instead of getting the new
/// log's tail as if nothing was missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_flushall_resuming_with_an_old_cursor_is_reset_and_goes_live() {
    let server = RedisServer::start().await;
    let broker = Arc::new(common::broker(&server, HISTORY).await);
    let hub = Hub::new(broker.clone());
    let r = unique_room("flush-resume");
    let old = publish_n(&hub, &r, "old", 2).await;
    flushall(&server).await;
    publish_n(&hub, &r, "new", 4).await;

    match broker.replay(&r, ReplayFrom::Cursor(old[1]), 10).await {
        // `Error::CursorReset`, matched by its message so that this file builds before the fix.
        Err(e) if e.to_string().contains("earlier epoch") => {}
        Err(e) => panic!("replay from a cursor of the flushed log: {e}"),
        Ok(_) => panic!("replay from a cursor of the flushed log was answered as a position"),
    }

    let mut s = hub.connect("u");
    if let Err(e) = s.handle().join_since(r.clone(), old[1]).await {
        panic!("join: {e}");
    }
    let first = drain(&mut s).await;
    assert_eq!(
        first.len(),
        1,
        "nothing replayed from the old cursor: {first:?}"
    );
    assert!(is_reset(&first[0], "OtherLog"), "{first:?}");
    publish_n(&hub, &r, "live", 2).await;
    assert_eq!(drain(&mut s).await, ["live1", "live2"]);
}

/// (c) `since` beyond the end of the room's log: the messages published before the session's
/// catch-up ran are held for it, and were dropped as copies of ones "at or before" `since`
/// before the fix. Now: told, and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_beyond_the_end_is_reset_and_the_next_messages_arrive() {
    let server = RedisServer::start().await;
    let hub = Hub::new(Arc::new(common::broker(&server, HISTORY).await));
    let r = unique_room("beyond");
    publish_n(&hub, &r, "old", 2).await;
    let mut s = hub.connect("u");
    if let Err(e) = s
        .handle()
        .join_since(r.clone(), Cursor::new(0, 1_000))
        .await
    {
        panic!("join: {e}");
    }
    // The catch-up runs inside `recv`: these are held for the session until it does.
    publish_n(&hub, &r, "held", 3).await;
    chatbus_core::conformance::eventually(Duration::from_secs(5), "messages pumped", || {
        let hub = hub.clone();
        async move { hub.stats().messages_in >= 3 }
    })
    .await;
    let got = drain(&mut s).await;
    assert_eq!(
        got.iter()
            .filter(|f| f.starts_with("held"))
            .collect::<Vec<_>>(),
        ["held1", "held2", "held3"],
        "messages held during the catch-up were dropped: {got:?}"
    );
    assert!(is_reset(&got[0], "BeyondEnd"), "{got:?}");
    publish_n(&hub, &r, "live", 1).await;
    assert_eq!(drain(&mut s).await, ["live1"]);
}

/// Rooms of a Redis written by a version before epochs (a plain `:seq` counter) keep their
/// numbering and history: the counter moves into the new hash, old cursors stay valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_from_before_epochs_is_carried_over() {
    let server = RedisServer::start().await;
    let broker = common::broker(&server, HISTORY).await;
    let r = unique_room("legacy");
    let prefix = broker.config().prefix.clone();
    let mut conn = common::raw(&server).await;
    let set: Result<(), _> = chatbus_redis::redis::cmd("SET")
        .arg(format!("{prefix}:{{{}}}:seq", r.as_str()))
        .arg(41)
        .query_async(&mut conn)
        .await;
    if let Err(e) = set {
        panic!("SET: {e}");
    }
    let receipt = match broker.publish(&Envelope::new(r.clone(), "after")).await {
        Ok(rc) => rc,
        Err(e) => panic!("publish: {e}"),
    };
    let Some(c) = receipt.cursor else {
        panic!("no cursor with the window on");
    };
    assert_eq!(c.offset, 42, "numbering goes on from the old counter");
    assert_ne!(c.epoch, 0);
    // An old cursor (no epoch) still resumes.
    match broker
        .replay(&r, ReplayFrom::Cursor(Cursor::new(0, 41)), 10)
        .await
    {
        Ok(s) => {
            let got: Vec<_> = futures::StreamExt::collect::<Vec<_>>(s).await;
            assert_eq!(got.len(), 1);
        }
        Err(e) => panic!("replay: {e}"),
    }
}
