//! Rooms created and abandoned by one client leave the server's memory flat (issue #11, "Bounded
//! everything"). Alone in its test binary: the server runs in this process, so the process's
//! memory is the server's only while no other test runs beside it.

mod common;

use std::time::Duration;

use chatbus_core::HubConfig;
use chatbus_core::MemoryBroker;
use chatbus_ws::{ChatHub, PresenceConfig, WsConfig};
use common::{Client, Event, Server};
use futures::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Rooms per round: each is joined, sent one (durable) message and left.
const ROOMS: usize = 10_000;
/// Rooms in flight at once: below `max_rooms` (64), and few enough replies (3 per room) that
/// they never fill the session's control queue (256) while the client is still writing.
const BATCH: usize = 50;
/// What the second round may add to the process's RSS. A room the server failed to forget
/// costs it far more than 200 bytes: without the memory broker's room bound, one message of
/// history and its room's entry cost about 760 bytes (the second round measured +7.4 MiB);
/// with it, +0.1 to 0.2 MiB. 2 MiB over 10,000 rooms is 210 bytes each, and leaves room for
/// allocator noise (pages of a few arenas touched for the first time).
const MAX_GROWTH_KIB: u64 = 2 * 1024;

/// One round: `ROOMS` fresh rooms, each joined, sent to and left, in batches of `BATCH`.
async fn churn(c: &mut Client, round: usize) {
    for batch in 0..ROOMS / BATCH {
        for i in 0..BATCH {
            let room = format!("churn-{round}-{}", batch * BATCH + i);
            for frame in [
                json!({"type": "join", "room": room}),
                json!({"type": "send", "room": room, "body": "a message in a room nobody comes back to"}),
                json!({"type": "leave", "room": room}),
            ] {
                c.ws.feed(Message::text(frame.to_string()))
                    .await
                    .expect("send");
            }
        }
        c.ws.flush().await.expect("flush");
        let mut left = 0;
        while left < BATCH {
            match c.recv_within(Duration::from_secs(10)).await {
                Some(Event::Frame(v)) => match v["type"].as_str() {
                    Some("left") => left += 1,
                    Some("error") => panic!("round {round}: {v}"),
                    _ => {}
                },
                other => panic!("round {round}: connection ended: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_abandoned_rooms_leave_server_memory_flat() {
    // A short presence interval, so that the heartbeat that prunes presence views of rooms
    // without local members runs between the rounds (it is 10 s by default).
    let presence = PresenceConfig::default().with_interval(Duration::from_millis(500));
    let chat = ChatHub::with_config(
        std::sync::Arc::new(MemoryBroker::new()),
        HubConfig::default(),
        presence,
    );
    // No rate limit: 30,000 frames a round at the default 20/s would take 25 minutes; the
    // limit bounds a client's pace, not what its rooms leave behind.
    let mut server = Server::with_chat(chat, WsConfig::default().with_rate_limit(None)).await;
    let mut c = server.client("churner").await;
    let rss = || chatbus_testkit::rss_kib(std::process::id()).expect("VmRSS readable");
    let settle = || tokio::time::sleep(Duration::from_secs(2));

    churn(&mut c, 0).await;
    settle().await;
    let warm = rss();
    churn(&mut c, 1).await;
    settle().await;
    let after = rss();

    let hub = server.ws.chat().hub().stats();
    assert_eq!(hub.sessions, 1);
    // Only the connection's own channels (personal, status) are left.
    assert!(
        hub.rooms <= 2,
        "the hub forgot the abandoned rooms: {hub:?}"
    );
    let growth = after.saturating_sub(warm);
    eprintln!("RSS after warm-up {warm} KiB, after a second round of {ROOMS} rooms {after} KiB (+{growth} KiB)");
    assert!(
        growth < MAX_GROWTH_KIB,
        "{ROOMS} abandoned rooms grew the server by {growth} KiB (bound {MAX_GROWTH_KIB} KiB)"
    );
    // Echoes of the last messages may still arrive after their room's `left` (replies
    // overtake queued messages); they are not what is checked here.
    c.quiet(Duration::from_millis(500)).await;
    c.assert_alive().await;
    server.stop().await;
}
