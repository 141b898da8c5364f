//! A quiet room in a busy partition: `history` scans backwards at most
//! `history_scan_limit` records, and a page cut short by that says so (`more_before`)
//! instead of coming back silently short or empty. Following `more_before` finds every
//! message. Against a real Tansu.

mod common;

use chatbus_core::{Broker, Envelope, MessageId, Room};
use chatbus_kafka::KafkaBroker;
use chatbus_testkit::tansu::Tansu;
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_of_a_quiet_room_behind_busy_ones_is_complete_or_says_it_is_not() {
    let tansu = Tansu::start().await;
    // One partition: every room shares it. A scan limit of 1,000 records against 10,000
    // records of other rooms after the quiet room's 3.
    let broker = KafkaBroker::connect(
        common::config(&tansu, "history-scan", 1).with_history_scan_limit(1_000),
    )
    .await
    .expect("connect");
    let quiet = Room::new("quiet").expect("room");
    let mut ids: Vec<MessageId> = Vec::new();
    for i in 0..3 {
        let env = Envelope::new(quiet.clone(), format!("quiet {i}"));
        broker.publish(&env).await.expect("publish quiet");
        ids.push(env.id);
    }
    let busy: Vec<Room> = (0..8)
        .map(|i| Room::new(format!("busy-{i}")).expect("room"))
        .collect();
    futures::stream::iter(0..10_000usize)
        .map(|i| {
            let env = Envelope::new(busy[i % busy.len()].clone(), format!("busy {i}"));
            let broker = broker.clone();
            async move { broker.publish(&env).await.expect("publish busy") }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;

    let page = broker.history(&quiet, None, 50).await.expect("history");
    let got: Vec<MessageId> = page.messages.iter().map(|e| e.id).collect();
    assert!(
        got == ids || !page.is_complete(),
        "a page with {} of the room's 3 messages claims to be complete",
        got.len()
    );
    // The scan limit is far below the 10,000 records in between: this page is partial.
    assert!(!page.is_complete(), "expected a partial page, got {got:?}");

    // Going on from `more_before` reaches the room's messages, oldest first, each once.
    let mut all = got;
    let mut before = page.more_before;
    let mut pages = 1;
    while let Some(cursor) = before {
        let next = broker
            .history(&quiet, Some(cursor), 50)
            .await
            .expect("next history page");
        let mut older: Vec<MessageId> = next.messages.iter().map(|e| e.id).collect();
        older.append(&mut all);
        all = older;
        before = next.more_before;
        pages += 1;
        assert!(pages <= 20, "more pages than 10,003 records / 1,000 allow");
    }
    assert_eq!(all, ids, "after {pages} pages");
}
