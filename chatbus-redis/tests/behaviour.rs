//! Redis-specific behaviour beyond the conformance suite: interest filtering, UNSUBSCRIBE on
//! drop (also of an abandoned subscribe), prefixes, cursor pass-through, the history window's
//! length, bad frames, slow subscribers.

mod common;

use std::time::Duration;

use chatbus_core::conformance::{eventually, room};
use chatbus_core::{
    Broker, BrokerExt, Cursor, Envelope, Error, Interest, ReplayFrom, Subscription,
};
use chatbus_redis::redis::AsyncCommands;
use chatbus_testkit::redis::RedisServer;
use futures::future::join_all;

const WAIT: Duration = Duration::from_secs(10);

async fn recv(sub: &mut Subscription) -> chatbus_core::Result<Envelope> {
    match tokio::time::timeout(WAIT, sub.recv()).await {
        Err(_) => panic!("nothing received within {WAIT:?}"),
        Ok(None) => panic!("subscription ended"),
        Ok(Some(item)) => item,
    }
}

async fn recv_ok(sub: &mut Subscription) -> Envelope {
    match recv(sub).await {
        Ok(e) => e,
        Err(e) => panic!("subscription error: {e}"),
    }
}

async fn publish(b: &impl Broker, env: &Envelope) -> chatbus_core::Receipt {
    match b.publish(env).await {
        Ok(r) => r,
        Err(e) => panic!("publish failed: {e}"),
    }
}

async fn subscribe(b: &impl Broker, interest: Interest) -> Subscription {
    match b.subscribe(interest).await {
        Ok(s) => s,
        Err(e) => panic!("subscribe failed: {e}"),
    }
}

/// `PUBSUB NUMSUB channel` as seen by the server.
async fn numsub(server: &RedisServer, channel: &str) -> i64 {
    let mut c = common::raw(server).await;
    let reply: Vec<(String, i64)> = match chatbus_redis::redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut c)
        .await
    {
        Ok(r) => r,
        Err(e) => panic!("PUBSUB NUMSUB: {e}"),
    };
    reply.first().map_or(0, |(_, n)| *n)
}

async fn numpat(server: &RedisServer) -> i64 {
    let mut c = common::raw(server).await;
    match chatbus_redis::redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut c)
        .await
    {
        Ok(n) => n,
        Err(e) => panic!("PUBSUB NUMPAT: {e}"),
    }
}

/// An instance receives only the traffic of rooms it subscribed to.
#[tokio::test]
async fn interest_filtering() {
    let server = RedisServer::start().await;
    let a = common::broker(&server, 0).await;
    let b = common::broker(&server, 0).await;
    let idle = common::broker(&server, 0).await;
    let mut sub = subscribe(&a, Interest::room(room("wanted"))).await;
    for i in 0..50 {
        publish(&b, &Envelope::new(room("other"), format!("{i}"))).await;
    }
    publish(&b, &Envelope::new(room("wanted"), "yes")).await;
    assert_eq!(recv_ok(&mut sub).await.payload, "yes");
    assert_eq!(
        a.stats().received,
        1,
        "traffic of other rooms reached the instance"
    );
    assert_eq!(idle.stats().received, 0);
}

/// Dropping the last local subscription of a room UNSUBSCRIBEs it; one of two does not.
#[tokio::test]
async fn drop_unsubscribes_in_redis() {
    let server = RedisServer::start().await;
    let b = common::broker(&server, 0).await;
    let r = room("unsub");
    let channel = format!("{}:{{unsub}}", b.config().prefix);
    let s1 = subscribe(&b, Interest::room(r.clone())).await;
    let mut s2 = subscribe(&b, Interest::Rooms(vec![r.clone(), room("unsub2")])).await;
    assert_eq!(
        numsub(&server, &channel).await,
        1,
        "one connection per broker"
    );
    drop(s1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        numsub(&server, &channel).await,
        1,
        "unsubscribed while still wanted"
    );
    publish(&b, &Envelope::new(r.clone(), "still")).await;
    assert_eq!(recv_ok(&mut s2).await.payload, "still");
    drop(s2);
    eventually(WAIT, "UNSUBSCRIBE after the last drop", || async {
        numsub(&server, &channel).await == 0
    })
    .await;

    let all = subscribe(&b, Interest::All).await;
    assert_eq!(numpat(&server).await, 1);
    drop(all);
    eventually(WAIT, "PUNSUBSCRIBE after drop", || async {
        numpat(&server).await == 0
    })
    .await;
}

/// A `subscribe` abandoned before Redis answered (its future dropped after sending the
/// request) leaves no channel subscribed, whether the caller gave up before the actor saw the
/// request, while its SUBSCRIBE was in flight, or just after the answer; a later subscription
/// to the room still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_subscribes_leave_nothing_subscribed() {
    let server = RedisServer::start().await;
    let b = common::broker(&server, 0).await;
    let r = room("abandoned");
    let channel = format!("{}:{{abandoned}}", b.config().prefix);
    for i in 0..60u64 {
        // Growing patience: the early ones give up at once, the late ones get their
        // subscription and drop it straight away.
        let patience = Duration::from_micros(i * i * 10);
        let _ = tokio::time::timeout(patience, b.subscribe(Interest::room(r.clone()))).await;
    }
    eventually(WAIT, "UNSUBSCRIBE of the abandoned room", || async {
        numsub(&server, &channel).await == 0
    })
    .await;
    let mut sub = subscribe(&b, Interest::room(r.clone())).await;
    assert_eq!(numsub(&server, &channel).await, 1);
    publish(&b, &Envelope::new(r, "after")).await;
    assert_eq!(recv_ok(&mut sub).await.payload, "after");
}

/// More subscriptions than the actor's request queue holds (1,024), subscribed at once (the
/// later ones wait for room in the queue) and dropped at once (on this single-threaded runtime
/// the actor cannot run in between, so most of the `Vacated` requests find the queue full and
/// are folded into one flag): every room is still unsubscribed in Redis, and the one room
/// still wanted is kept. Issue #11.
#[tokio::test]
async fn a_mass_drop_past_the_request_queue_still_unsubscribes_every_room() {
    const ROOMS: usize = 3000;
    let server = RedisServer::start().await;
    let b = common::broker(&server, 0).await;
    let prefix = b.config().prefix.clone();
    let mut kept = subscribe(&b, Interest::room(room("kept"))).await;
    let subscribes = (0..ROOMS).map(|i| b.subscribe(Interest::room(room(&format!("mass-{i}")))));
    let subs: Vec<Subscription> = join_all(subscribes)
        .await
        .into_iter()
        .map(|s| s.unwrap_or_else(|e| panic!("subscribe failed: {e}")))
        .collect();
    let channels = || async {
        let mut c = common::raw(&server).await;
        let names: Vec<String> = chatbus_redis::redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("PUBSUB CHANNELS: {e}"));
        names.len()
    };
    assert_eq!(channels().await, ROOMS + 1);
    drop(subs);
    eventually(WAIT, "every dropped room unsubscribed", || async {
        channels().await == 1
    })
    .await;
    publish(&b, &Envelope::new(room("kept"), "still here")).await;
    assert_eq!(recv_ok(&mut kept).await.payload, "still here");
}

/// Two prefixes on one Redis never see each other's traffic, even with `Interest::All`.
#[tokio::test]
async fn prefixes_isolate_apps() {
    let server = RedisServer::start().await;
    let app1 = common::connect(common::config(&server, 0).with_prefix("app1")).await;
    let app2 = common::connect(common::config(&server, 0).with_prefix("app1:x")).await;
    let mut all1 = subscribe(&app1, Interest::All).await;
    let mut all2 = subscribe(&app2, Interest::All).await;
    publish(&app2, &Envelope::new(room("general"), "for app2")).await;
    publish(&app1, &Envelope::new(room("general"), "for app1")).await;
    assert_eq!(recv_ok(&mut all1).await.payload, "for app1");
    assert_eq!(recv_ok(&mut all2).await.payload, "for app2");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), all1.recv())
            .await
            .is_err()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), all2.recv())
            .await
            .is_err()
    );
}

/// Without the window, a publish carries the envelope's cursor unchanged (what DualBus relies
/// on); with it, durable messages get the room's sequence and ephemeral ones none.
#[tokio::test]
async fn cursor_pass_through_and_sequence() {
    let server = RedisServer::start().await;
    let plain = common::broker(&server, 0).await;
    let r = room("cursors");
    let mut sub = subscribe(&plain, Interest::room(r.clone())).await;
    let mut env = Envelope::new(r.clone(), "from kafka");
    env.cursor = Some(Cursor::new(3, 1041));
    let receipt = publish(&plain, &env).await;
    assert_eq!(receipt.cursor, None);
    let got = recv_ok(&mut sub).await;
    assert_eq!((got.id, got.cursor), (env.id, Some(Cursor::new(3, 1041))));
    assert!(matches!(
        plain.replay(&r, ReplayFrom::Beginning, 10).await,
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        plain.history(&r, None, 10).await,
        Err(Error::Unsupported { .. })
    ));

    let windowed = common::broker(&server, 100).await;
    let r2 = room("cursors2");
    let mut sub = subscribe(&windowed, Interest::room(r2.clone())).await;
    let mut epoch = None;
    for expected in 1..=3u64 {
        let mut env = Envelope::new(r2.clone(), "x");
        env.cursor = Some(Cursor::new(3, 1041));
        let Some(c) = publish(&windowed, &env).await.cursor else {
            panic!("no cursor with the window on");
        };
        // The room's log has one epoch, drawn with its sequence.
        assert_ne!(c.epoch, 0);
        assert_eq!(*epoch.get_or_insert(c.epoch), c.epoch);
        assert_eq!(c, Cursor::with_epoch(0, expected, c.epoch));
        assert_eq!(recv_ok(&mut sub).await.cursor, Some(c));
    }
    let mut eph = Envelope::ephemeral(r2.clone(), "typing");
    eph.cursor = Some(Cursor::new(0, 99));
    assert_eq!(publish(&windowed, &eph).await.cursor, None);
    assert_eq!(recv_ok(&mut sub).await.cursor, None);
    assert!(matches!(
        windowed
            .replay(&r2, ReplayFrom::Cursor(Cursor::new(1, 1)), 10)
            .await,
        Err(Error::InvalidCursor(_))
    ));
}

/// The window keeps the last `history_len` durable messages of a room.
#[tokio::test]
async fn window_is_bounded() {
    let server = RedisServer::start().await;
    let b = common::broker(&server, 5).await;
    let r = room("window");
    for i in 1..=12 {
        publish(&b, &Envelope::new(r.clone(), format!("{i}"))).await;
    }
    let all = match b.replay_vec(&r, ReplayFrom::Beginning, 100).await {
        Ok(v) => v,
        Err(e) => panic!("replay: {e}"),
    };
    let cursors: Vec<_> = all
        .iter()
        .filter_map(|e| e.cursor)
        .map(|c| c.offset)
        .collect();
    assert_eq!(cursors, [8, 9, 10, 11, 12]);
    let page = match b.history(&r, Some(Cursor::new(0, 11)), 2).await {
        Ok(v) => v.messages,
        Err(e) => panic!("history: {e}"),
    };
    assert_eq!(
        page.iter().map(|e| e.payload.clone()).collect::<Vec<_>>(),
        ["9", "10"]
    );
    let mut c = common::raw(&server).await;
    let len: usize = match c
        .xlen(format!("{}:{{window}}:log", b.config().prefix))
        .await
    {
        Ok(n) => n,
        Err(e) => panic!("XLEN: {e}"),
    };
    assert_eq!(len, 5);
}

/// A frame that is not an envelope is counted and dropped; delivery goes on.
#[tokio::test]
async fn bad_frames_are_counted_and_dropped() {
    let server = RedisServer::start().await;
    let b = common::broker(&server, 0).await;
    let r = room("bad");
    let mut sub = subscribe(&b, Interest::room(r.clone())).await;
    let mut c = common::raw(&server).await;
    let channel = format!("{}:{{bad}}", b.config().prefix);
    let _: i64 = match c.publish(&channel, "not an envelope").await {
        Ok(n) => n,
        Err(e) => panic!("PUBLISH: {e}"),
    };
    // A valid envelope of another room on this room's channel is refused too.
    let foreign = match chatbus_core::backend::codec::encode(&Envelope::new(room("elsewhere"), "x"))
    {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    let _: i64 = match c.publish(&channel, foreign.as_ref()).await {
        Ok(n) => n,
        Err(e) => panic!("PUBLISH: {e}"),
    };
    publish(&b, &Envelope::new(r, "good")).await;
    assert_eq!(recv_ok(&mut sub).await.payload, "good");
    assert_eq!(b.stats().decode_errors, 2);
}

/// A subscriber that does not read loses messages beyond its buffer, is told how many, and
/// receives the later ones; other subscribers are unaffected.
#[tokio::test]
async fn slow_subscriber_lags_alone() {
    let server = RedisServer::start().await;
    let b = common::connect(common::config(&server, 0).with_subscriber_capacity(4)).await;
    let r = room("slow");
    let mut slow = subscribe(&b, Interest::room(r.clone())).await;
    let mut fast = subscribe(&b, Interest::room(r.clone())).await;
    for i in 0..10 {
        publish(&b, &Envelope::new(r.clone(), format!("{i}"))).await;
        // The fast one keeps up.
        assert_eq!(recv_ok(&mut fast).await.payload, format!("{i}"));
    }
    for i in 0..4 {
        assert_eq!(recv_ok(&mut slow).await.payload, format!("{i}"));
    }
    publish(&b, &Envelope::new(r.clone(), "late")).await;
    match recv(&mut slow).await {
        Err(Error::Lagged { missed }) => assert_eq!(missed, 6),
        other => panic!("expected Lagged, got {other:?}"),
    }
    assert_eq!(recv_ok(&mut slow).await.payload, "late");
    assert_eq!(b.stats().dropped, 6);
}

/// Dropping the broker ends its subscriptions.
#[tokio::test]
async fn dropping_the_broker_ends_subscriptions() {
    let server = RedisServer::start().await;
    let b = common::broker(&server, 0).await;
    let mut sub = subscribe(&b, Interest::room(room("end"))).await;
    drop(b);
    match tokio::time::timeout(WAIT, sub.recv()).await {
        Ok(None) => {}
        other => panic!("expected the end of the subscription, got {other:?}"),
    }
}
