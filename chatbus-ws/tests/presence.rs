//! Presence between instances at scale: diffs instead of full lists, heartbeats in flight
//! together instead of one round trip per room.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chatbus_core::{
    Broker, Capabilities, Envelope, Health, HistoryPage, HistoryStream, HubConfig, Interest,
    MemoryBroker, Receipt, ReplayFrom, Room,
};
use chatbus_ws::{ChatHub, PresenceConfig, WsConfig};
use common::{Client, Server};
use serde_json::json;

/// Reads frames until a `presence` frame of `room` with `count`.
async fn until_count(c: &mut Client, room: &str, count: u64) {
    let wait = async {
        loop {
            let v = c.next().await;
            if v["type"] == "presence" && v["room"] == room && v["count"] == count {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("no presence frame of {room} with count {count}"));
}

/// After its first full list, an instance announces only what changed: one more join to a
/// room of 300 costs an announcement of about one name, not of 301; and another instance
/// that learns the room from full lists keeps the right count through the diffs.
#[tokio::test]
async fn joins_to_a_big_room_are_announced_as_diffs_and_counted_right_elsewhere() {
    let broker = Arc::new(MemoryBroker::new());
    let presence = PresenceConfig::default().with_large_room_debounce(Duration::from_millis(50));
    let chat = ChatHub::with_config(broker.clone(), HubConfig::default(), presence.clone());
    let one = Server::with_chat(chat, WsConfig::default()).await;
    let mut first = one.client("m000").await;
    first.join("d").await;
    let mut members = Vec::new();
    for i in 1..300 {
        let mut c = one.client(&format!("m{i:03}")).await;
        c.join("d").await;
        members.push(c);
    }
    until_count(&mut first, "d", 300).await;

    // What instance one publishes in the room from now on, as another instance's broker sees it.
    let room = Room::new("d").unwrap();
    let mut sub = broker
        .subscribe(Interest::room(room.clone()))
        .await
        .unwrap();
    let mut late = one.client("late").await;
    late.join("d").await;
    until_count(&mut first, "d", 301).await;
    let mut sizes = Vec::new();
    while let Ok(Some(Ok(env))) = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await
    {
        if !env.is_durable() {
            sizes.push(env.payload.len());
        }
    }
    assert!(!sizes.is_empty(), "the join was announced");
    // A full list of 301 names of 4 bytes is over 1,500 bytes; a diff of one name is ~50.
    assert!(
        sizes.iter().all(|&n| n < 200),
        "announcement sizes: {sizes:?}"
    );

    // A second instance joins the room: it learns instance one's full list (hello)...
    let chat = ChatHub::with_config(broker.clone(), HubConfig::default(), presence);
    let two = Server::with_chat(chat, WsConfig::default()).await;
    let mut other = two.client("other").await;
    other.join("d").await;
    until_count(&mut other, "d", 302).await;
    // ...and follows instance one's diffs from there.
    let mut later = one.client("later").await;
    later.join("d").await;
    until_count(&mut other, "d", 303).await;
    drop(late);
    until_count(&mut other, "d", 302).await;
}

/// A broker that takes 20 ms per publish and records how many were in flight at once.
#[derive(Debug)]
struct Slow {
    inner: MemoryBroker,
    in_flight: AtomicUsize,
    most: AtomicUsize,
}

#[async_trait]
impl Broker for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }
    async fn publish(&self, envelope: &Envelope) -> chatbus_core::Result<Receipt> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.inner.publish(envelope).await
    }
    async fn subscribe(
        &self,
        interest: Interest,
    ) -> chatbus_core::Result<chatbus_core::Subscription> {
        self.inner.subscribe(interest).await
    }
    async fn replay(
        &self,
        room: &Room,
        from: ReplayFrom,
        limit: usize,
    ) -> chatbus_core::Result<HistoryStream> {
        self.inner.replay(room, from, limit).await
    }
    async fn history(
        &self,
        room: &Room,
        before: Option<chatbus_core::Cursor>,
        limit: usize,
    ) -> chatbus_core::Result<HistoryPage> {
        self.inner.history(room, before, limit).await
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn health(&self) -> Health {
        self.inner.health().await
    }
}

/// A heartbeat announces every room of the instance with many publishes in flight (which the
/// Redis broker pipelines on one connection), not one awaited round trip per room: with 100
/// rooms and 20 ms per publish, one at a time would take 2 s per heartbeat.
#[tokio::test]
async fn heartbeats_publish_many_rooms_at_once() {
    let slow = Arc::new(Slow {
        inner: MemoryBroker::new(),
        in_flight: AtomicUsize::new(0),
        most: AtomicUsize::new(0),
    });
    let presence = PresenceConfig::default().with_interval(Duration::from_millis(500));
    let chat = ChatHub::with_config(slow.clone(), HubConfig::default(), presence);
    // 100 joins at once: past the default limits on rooms and control frames.
    let config = WsConfig::default()
        .with_max_rooms(100)
        .with_control_rate_limit(None)
        .with_rate_limit(None);
    let server = Server::with_chat(chat.clone(), config).await;
    let mut c = server.client("many").await;
    for i in 0..100 {
        c.join(&format!("r{i}")).await;
    }
    // Each room's first announcement (the joins may be announced together too)...
    let published = |n: u64| {
        let chat = chat.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while chat.stats().presence_published < n && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            chat.stats().presence_published >= n
        }
    };
    assert!(published(100).await, "every room was announced");
    // ...then a heartbeat: every room again.
    let before = chat.stats().presence_published;
    slow.most.store(0, Ordering::SeqCst);
    assert!(
        published(before + 100).await,
        "a heartbeat announced every room"
    );
    let most = slow.most.load(Ordering::SeqCst);
    assert!(
        most >= 10,
        "at most {most} presence publishes were in flight at once"
    );
}

/// A room with more online than `max_listed`: `presence` frames carry the count only (a
/// frame every member gets on every change must not grow with the room), and `members` pages
/// through the names of every instance, in order.
#[tokio::test]
async fn big_rooms_get_counts_and_page_their_members() {
    let broker = Arc::new(MemoryBroker::new());
    let presence = PresenceConfig::default().with_max_listed(3);
    let hub =
        |b: Arc<MemoryBroker>| ChatHub::with_config(b, HubConfig::default(), presence.clone());
    let one = Server::with_chat(hub(broker.clone()), WsConfig::default()).await;
    let two = Server::with_chat(hub(broker.clone()), WsConfig::default()).await;
    let mut ann = one.client("ann").await;
    ann.join("big").await;
    let mut small = Vec::new();
    for (server, name) in [(&two, "bob"), (&one, "cat"), (&two, "dan"), (&one, "eve")] {
        let mut c = server.client(name).await;
        c.join("big").await;
        small.push(c);
    }
    let wait = async {
        loop {
            let v = ann.next().await;
            if v["type"] == "presence" && v["count"] == 5 {
                return v;
            }
        }
    };
    let frame = tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("a presence frame counting all five");
    assert_eq!(frame["online"], json!([]), "{frame}");
    assert_eq!(frame["paged"], true, "{frame}");

    ann.send(json!({"type":"members","room":"big","limit":2,"client_id":1}))
        .await;
    let page = ann.expect("members").await;
    assert_eq!(page["users"], json!(["ann", "bob"]), "{page}");
    assert_eq!(page["next"], "bob");
    assert_eq!(page["client_id"], 1);
    ann.send(json!({"type":"members","room":"big","after":"bob","limit":2}))
        .await;
    let page = ann.expect("members").await;
    assert_eq!(page["users"], json!(["cat", "dan"]), "{page}");
    ann.send(json!({"type":"members","room":"big","after":"dan"}))
        .await;
    let page = ann.expect("members").await;
    assert_eq!(page["users"], json!(["eve"]), "{page}");
    assert!(page.get("next").is_none(), "the last page: {page}");

    // Only for members, and a bad `after` is a bad request; the connection lives on.
    let mut out = one.client("outsider").await;
    out.send(json!({"type":"members","room":"big"})).await;
    out.expect_error("not_joined").await;
    ann.send(json!({"type":"members","room":"big","after":""}))
        .await;
    ann.expect_error("bad_request").await;
    ann.assert_alive().await;
}
