//! The `reset` frame (issue #11 items 1 and 5b): a `since` that names no position of the
//! room's log as it is now — a cursor from before a restart of the process that held the log
//! (here: a new memory broker, as after a server restart), or one beyond the log's end — is
//! answered with `{"type":"reset",...}` and live messages, never with a silent gap or
//! silence. See docs/protocol.md, "reset".

mod common;

use std::sync::Arc;
use std::time::Duration;

use chatbus_core::MemoryBroker;
use chatbus_ws::WsConfig;
use common::Server;
use serde_json::json;

#[tokio::test]
async fn a_cursor_from_before_a_restart_is_answered_with_reset_then_live_messages() {
    let mut first = Server::start(WsConfig::default()).await;
    let mut ann = first.client("ann").await;
    ann.join("r").await;
    ann.say("r", "m1", "1").await;
    let (ack, _) = ann.say("r", "m2", "2").await;
    let cursor = ack["cursor"].as_str().expect("cursor").to_owned();
    first.stop().await;

    // The restarted server: a new memory broker, whose log passes the old cursor's offset.
    let mut second = Server::with_broker(Arc::new(MemoryBroker::new()), WsConfig::default()).await;
    let mut ann = second.client("ann").await;
    ann.join("r").await;
    for i in 1..=3 {
        ann.say("r", &format!("n{i}"), &format!("n{i}")).await;
    }
    let mut bob = second.client("bob").await;
    bob.send(json!({"type":"join","room":"r","since":cursor}))
        .await;
    assert_eq!(bob.expect("joined").await["resuming"], true);
    let reset = bob.expect("reset").await;
    assert_eq!(
        reset,
        json!({"type":"reset","room":"r","reason":"log_reset"})
    );
    ann.say("r", "n4", "n4").await;
    assert_eq!(bob.expect("message").await["body"], "n4");
    assert!(bob.quiet(Duration::from_millis(300)).await.is_empty());
    second.stop().await;
}

#[tokio::test]
async fn a_since_beyond_the_end_is_answered_with_reset_then_live_messages() {
    let mut server = Server::start(WsConfig::default()).await;
    let mut ann = server.client("ann").await;
    ann.join("r").await;
    ann.say("r", "m1", "1").await;
    let mut bob = server.client("bob").await;
    bob.send(json!({"type":"join","room":"r","since":"0-1000000"}))
        .await;
    assert_eq!(bob.expect("joined").await["resuming"], true);
    let reset = bob.expect("reset").await;
    assert_eq!(reset["reason"], "beyond_end");
    ann.say("r", "m2", "2").await;
    assert_eq!(bob.expect("message").await["body"], "m2");
    let metrics = server.scrape();
    assert!(metrics.contains("chatbus_resets_total 1"), "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn a_history_before_a_cursor_of_another_log_is_a_bad_request() {
    let mut server = Server::start(WsConfig::default()).await;
    let mut ann = server.client("ann").await;
    ann.join("r").await;
    ann.say("r", "m1", "1").await;
    // Epoch 1 is never drawn by a running broker in practice (a random one is), so this names
    // another log.
    ann.send(json!({"type":"history","room":"r","before":"0-1-1","client_id":"h"}))
        .await;
    let err = ann.expect_error("bad_request").await;
    assert_eq!(err["client_id"], "h");
    // Without `before`: the page of the log there is.
    ann.send(json!({"type":"history","room":"r"})).await;
    let page = ann.expect("history").await;
    assert_eq!(page["messages"][0]["body"], "m1");
    server.stop().await;
}
