//! Cursor epochs and resume points that do not fit the log (issue #11 items 1 and 5b), over
//! the memory broker: a cursor of another log is never a dedupe bound or a resume point, a
//! `since` beyond the end does not swallow the live messages, and the session is told
//! (`Outbound::Reset`) instead of being left with a silent gap.
//!
//! Every helper here sticks to what the Hub had before epochs (the catch-all arm prints any
//! other `Outbound` with `Debug`), so the same file builds against the code before the fix and
//! shows how it failed there.

use std::sync::Arc;
use std::time::Duration;

use chatbus_core::{Cursor, Envelope, Hub, MemoryBroker, Result, Room, Session};

const T: Duration = Duration::from_secs(5);

fn room(name: &str) -> Room {
    Room::new(name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// What the session writes until it has been quiet for a while.
async fn drain(s: &mut Session) -> Vec<String> {
    chatbus_core::conformance::drain_session(s, Duration::from_millis(300)).await
}

async fn publish_n(hub: &Hub, r: &Room, prefix: &str, n: usize) -> Result<Vec<Cursor>> {
    let mut cursors = Vec::new();
    for i in 1..=n {
        let rc = hub
            .publish(&Envelope::new(r.clone(), format!("{prefix}{i}")))
            .await?;
        cursors.extend(rc.cursor);
    }
    Ok(cursors)
}

/// Waits until the room's pump has taken `n` messages from the broker in all.
async fn until_pumped(hub: &Hub, n: u64) {
    let waited = tokio::time::timeout(T, async {
        while hub.stats().messages_in < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{} of {n} messages pumped",
        hub.stats().messages_in
    );
}

fn is_reset(frame: &str, reason: &str) -> bool {
    frame.starts_with("Reset {") && frame.contains(reason)
}

/// (b) A client resumes on a restarted process (a new memory broker, a new log) with the
/// cursor it got before the restart. Before epochs the cursor was read as a position of the
/// new log: the session got the new log's messages after that offset as if it had the ones
/// before (a silent gap), and nothing told it so.
#[tokio::test]
async fn resuming_with_a_cursor_of_a_restarted_broker_is_reset_and_goes_live() -> Result<()> {
    let r = room("restart");
    let before = Hub::new(Arc::new(MemoryBroker::new()));
    let old = publish_n(&before, &r, "old", 2).await?;
    let old_cursor = old[1];
    drop(before);

    let after = Hub::new(Arc::new(MemoryBroker::new()));
    // The new log passes the old cursor's offset: `new3` has offset 3 > 2.
    publish_n(&after, &r, "new", 3).await?;
    let mut s = after.connect("u");
    s.handle().join_since(r.clone(), old_cursor).await?;
    let first = drain(&mut s).await;
    assert_eq!(
        first.len(),
        1,
        "nothing replayed from a foreign cursor: {first:?}"
    );
    assert!(is_reset(&first[0], "OtherLog"), "{first:?}");
    publish_n(&after, &r, "live", 2).await?;
    assert_eq!(drain(&mut s).await, ["live1", "live2"]);
    Ok(())
}

/// (c) `since` beyond the end of the log. The messages published while the session's
/// catch-up had not run yet are held for it; before the fix the catch-up found nothing to
/// replay and then dropped every held message as a copy of one at or before `since`, silently.
#[tokio::test]
async fn a_since_beyond_the_end_is_reset_and_delivers_what_came_meanwhile() -> Result<()> {
    let r = room("beyond");
    let hub = Hub::new(Arc::new(MemoryBroker::new()));
    publish_n(&hub, &r, "old", 2).await?;
    let mut s = hub.connect("u");
    s.handle()
        .join_since(r.clone(), Cursor::new(0, 1_000))
        .await?;
    // The catch-up runs inside `recv`: these are held for the session until it does.
    publish_n(&hub, &r, "held", 3).await?;
    until_pumped(&hub, 3).await;
    let got = drain(&mut s).await;
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(is_reset(&got[0], "BeyondEnd"), "{got:?}");
    assert_eq!(got[1..], ["held1", "held2", "held3"]);
    publish_n(&hub, &r, "live", 1).await?;
    assert_eq!(drain(&mut s).await, ["live1"]);
    Ok(())
}

/// A `since` at the very end of the log is a normal resume: nothing to replay, no reset.
#[tokio::test]
async fn a_since_at_the_end_is_a_plain_resume() -> Result<()> {
    let r = room("at-end");
    let hub = Hub::new(Arc::new(MemoryBroker::new()));
    let cursors = publish_n(&hub, &r, "m", 2).await?;
    let mut s = hub.connect("u");
    s.handle().join_since(r.clone(), cursors[1]).await?;
    publish_n(&hub, &r, "live", 1).await?;
    assert_eq!(drain(&mut s).await, ["live1"]);
    assert_eq!(hub.stats().resets, 0);
    Ok(())
}

/// (a) A live member whose last cursor is of an older epoch of the log: the log restarted
/// (here simulated with `deliver_local`, which is exactly what the pump does with each message
/// the broker brings; the Redis test does it with a real `FLUSHALL`). Before the fix, every
/// message of the new log at or below the old position was dropped as a duplicate.
#[tokio::test]
async fn a_live_member_gets_a_new_epoch_s_messages_and_is_told_once() -> Result<()> {
    let r = room("live-reset");
    let hub = Hub::new(Arc::new(MemoryBroker::new()));
    let mut s = hub.connect("u");
    s.handle().join(r.clone()).await?;
    let at = |offset, epoch| {
        let mut e = Envelope::new(r.clone(), format!("{offset}@{epoch:x}"));
        e.cursor = Some(Cursor::with_epoch(0, offset, epoch));
        e
    };
    for offset in 1..=5 {
        hub.deliver_local(&at(offset, 0xaa));
    }
    assert_eq!(drain(&mut s).await.len(), 5);
    hub.deliver_local(&at(5, 0xaa)); // a real duplicate: still dropped
    for offset in 1..=3 {
        hub.deliver_local(&at(offset, 0xbb));
    }
    hub.deliver_local(&at(2, 0xbb)); // a duplicate within the new log
    let got = drain(&mut s).await;
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(is_reset(&got[0], "OtherLog"), "{got:?}");
    assert_eq!(got[1..], ["1@bb", "2@bb", "3@bb"]);
    assert_eq!(hub.stats().duplicates, 2);
    assert_eq!(hub.stats().resets, 1);
    Ok(())
}
