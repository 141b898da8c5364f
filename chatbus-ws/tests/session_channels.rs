//! The session logic driven over plain channels (no socket): the `Sink`/`Stream` seam.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatbus_core::MemoryBroker;
use chatbus_ws::{ChatHub, CloseCode, Identity, TransportError, WsConfig, WsMessage, WsService};
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};

type ToServer = mpsc::Sender<Result<WsMessage, TransportError>>;
type FromServer = mpsc::Receiver<WsMessage>;

fn start(svc: &WsService, user: &str) -> (ToServer, FromServer, tokio::task::JoinHandle<()>) {
    let (to_server, server_in) = mpsc::channel(16);
    let (server_out, from_server) = mpsc::channel(16);
    let identity = Identity::new(user).expect("identity");
    let svc = svc.clone();
    let task = tokio::spawn(async move { svc.run_session(identity, server_out, server_in).await });
    (to_server, from_server, task)
}

async fn next(rx: &mut FromServer) -> WsMessage {
    tokio::time::timeout(Duration::from_secs(5), rx.next())
        .await
        .expect("frame in time")
        .expect("session open")
}

async fn next_json(rx: &mut FromServer) -> Value {
    loop {
        match next(rx).await {
            WsMessage::Text(b) => {
                let v: Value = serde_json::from_slice(&b).expect("json");
                if v["type"] != "presence" {
                    return v;
                }
            }
            WsMessage::Ping(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn text(v: Value) -> Result<WsMessage, TransportError> {
    Ok(WsMessage::Text(Bytes::from(v.to_string())))
}

#[tokio::test]
async fn session_over_channels() {
    let svc = WsService::new(
        ChatHub::new(Arc::new(MemoryBroker::new())),
        WsConfig::default(),
    );
    let (mut tx, mut rx, task) = start(&svc, "ann");
    let welcome = next_json(&mut rx).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user"], "ann");

    tx.send(text(json!({"type":"join","room":"c"})))
        .await
        .expect("send");
    assert_eq!(next_json(&mut rx).await["type"], "joined");
    tx.send(text(
        json!({"type":"send","room":"c","body":"over a channel","client_id":"1"}),
    ))
    .await
    .expect("send");
    let mut types = vec![
        next_json(&mut rx).await["type"].clone(),
        next_json(&mut rx).await["type"].clone(),
    ];
    types.sort_by_key(ToString::to_string);
    assert_eq!(types, [json!("ack"), json!("message")]);

    // Invalid UTF-8 handed over as text is a bad request, not a crash.
    tx.send(Ok(WsMessage::Text(Bytes::from_static(b"\xff\xfe"))))
        .await
        .expect("send");
    assert_eq!(next_json(&mut rx).await["code"], "bad_request");

    // The transport's size error ends the connection with 1009 after the error frame.
    tx.send(Err(TransportError::TooLarge)).await.expect("send");
    assert_eq!(next_json(&mut rx).await["code"], "too_large");
    match next(&mut rx).await {
        WsMessage::Close(Some(c)) => assert_eq!(c.code, u16::from(CloseCode::TooLarge)),
        other => panic!("expected close, got {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("session ends")
        .expect("no panic");
    assert_eq!(svc.metrics().connections, 0);
}

#[tokio::test]
async fn shutdown_over_channels_closes_with_going_away() {
    let svc = WsService::new(
        ChatHub::new(Arc::new(MemoryBroker::new())),
        WsConfig::default(),
    );
    let (_tx, mut rx, task) = start(&svc, "bob");
    assert_eq!(next_json(&mut rx).await["type"], "welcome");
    tokio::time::timeout(Duration::from_secs(10), svc.shutdown())
        .await
        .expect("shutdown in time");
    match next(&mut rx).await {
        WsMessage::Close(Some(c)) => assert_eq!(c.code, u16::from(CloseCode::GoingAway)),
        other => panic!("expected close, got {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("session ends")
        .expect("no panic");
}

#[tokio::test]
async fn client_close_ends_the_session_and_leaves_rooms() {
    let chat = ChatHub::new(Arc::new(MemoryBroker::new()));
    let svc = WsService::new(chat.clone(), WsConfig::default());
    let (mut tx, mut rx, task) = start(&svc, "cy");
    next_json(&mut rx).await;
    tx.send(text(json!({"type":"join","room":"z"})))
        .await
        .expect("send");
    next_json(&mut rx).await;
    let room = chatbus_core::Room::new("z").expect("room");
    assert_eq!(chat.hub().local_members(&room).len(), 1);
    tx.send(Ok(WsMessage::Close(None))).await.expect("send");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("session ends")
        .expect("no panic");
    assert!(chat.hub().local_members(&room).is_empty());
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_others_are_unaffected() {
    let hub_config = chatbus_core::HubConfig::default().with_session_queue(8);
    let chat = ChatHub::with_config(
        Arc::new(MemoryBroker::new()),
        hub_config,
        chatbus_ws::PresenceConfig::default(),
    );
    let config = WsConfig::default().with_write_timeout(Duration::from_millis(300));
    let svc = WsService::new(chat.clone(), config);

    // The slow client joins, then never reads again: its writer blocks once the channel (its
    // "socket") is full.
    let (mut slow_tx, _slow_rx, slow_task) = start(&svc, "slow");
    slow_tx
        .send(text(json!({"type":"join","room":"busy"})))
        .await
        .expect("send");
    let (mut fast_tx, mut fast_rx, _fast_task) = start(&svc, "fast");
    assert_eq!(next_json(&mut fast_rx).await["type"], "welcome");
    fast_tx
        .send(text(json!({"type":"join","room":"busy"})))
        .await
        .expect("send");
    assert_eq!(next_json(&mut fast_rx).await["type"], "joined");

    let room = chatbus_core::Room::new("busy").expect("room");
    let poster = Identity::new("bot").expect("identity");
    for i in 0..200 {
        chat.post(room.clone(), &poster, &format!("m{i}"))
            .await
            .expect("post");
    }
    for i in 0..200 {
        let m = next_json(&mut fast_rx).await;
        assert_eq!(
            m["body"],
            format!("m{i}"),
            "the reading client gets everything in order"
        );
    }
    // The stuck one is dropped after the write timeout, freeing what it held.
    tokio::time::timeout(Duration::from_secs(10), slow_task)
        .await
        .expect("the slow session ends")
        .expect("no panic");
    assert!(svc.metrics().slow_closed >= 1);
    assert_eq!(chat.hub().local_members(&room).len(), 1);
}
