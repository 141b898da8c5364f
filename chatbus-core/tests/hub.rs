//! Hub behaviour over the memory broker: fan-out, isolation, resume, slow sessions.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatbus_core::{
    Broker, CloseReason, Cursor, Envelope, Hub, HubConfig, JoinOptions, MemoryBroker, MemoryConfig,
    Outbound, Result, Room, Session, SlowPolicy,
};

mod support;
use support::{room, Hooked, Hooks};

const T: Duration = Duration::from_secs(5);

async fn next_frame(s: &mut Session) -> Bytes {
    match tokio::time::timeout(T, s.recv()).await {
        Ok(Outbound::Frame(b)) => b,
        Ok(other) => panic!("expected a frame, got {other:?}"),
        Err(_) => panic!("no frame within {T:?}"),
    }
}

async fn silent(s: &mut Session) {
    if let Ok(o) = tokio::time::timeout(Duration::from_millis(200), s.recv()).await {
        panic!("expected nothing, got {o:?}");
    }
}

#[tokio::test]
async fn fan_out_reaches_every_member_once_and_only_members() -> Result<()> {
    let hub = Hub::new(Arc::new(MemoryBroker::new()));
    let (r1, r2) = (room("one"), room("two"));
    let mut a = hub.connect("a");
    let mut b = hub.connect("b");
    let mut c = hub.connect("c");
    a.handle().join(r1.clone()).await?;
    b.handle().join(r1.clone()).await?;
    c.handle().join(r2.clone()).await?;
    assert_eq!(hub.rooms().len(), 2);
    for i in 0..10 {
        hub.publish(&Envelope::new(r1.clone(), format!("m{i}")))
            .await?;
    }
    for s in [&mut a, &mut b] {
        for i in 0..10 {
            assert_eq!(next_frame(s).await, format!("m{i}"));
        }
        silent(s).await;
    }
    silent(&mut c).await;
    assert_eq!(hub.stats().deliveries, 20);
    // Leaving stops delivery; the last member leaving drops the room.
    assert!(a.handle().leave(&r1));
    hub.publish(&Envelope::new(r1.clone(), "after")).await?;
    assert_eq!(next_frame(&mut b).await, "after");
    silent(&mut a).await;
    drop(b);
    assert_eq!(hub.rooms(), vec![r2]);
    Ok(())
}

#[tokio::test]
async fn join_with_since_replays_exactly_the_missed_messages_then_live() -> Result<()> {
    let broker = Arc::new(MemoryBroker::new());
    let hub = Hub::new(broker.clone());
    let r = room("resume");
    let mut cursors: Vec<Cursor> = Vec::new();
    for i in 0..30 {
        let rc = hub
            .publish(&Envelope::new(r.clone(), format!("m{i}")))
            .await?;
        cursors.extend(rc.cursor);
    }
    let mut s = hub.connect("late");
    let joined = s
        .handle()
        .join_with(
            r.clone(),
            JoinOptions::default()
                .since(cursors[9])
                .reply(Bytes::from("joined")),
        )
        .await?;
    assert!(joined.resuming);
    // Live traffic while catching up.
    for i in 30..40 {
        hub.publish(&Envelope::new(r.clone(), format!("m{i}")))
            .await?;
    }
    assert_eq!(next_frame(&mut s).await, "joined");
    for i in 10..40 {
        assert_eq!(next_frame(&mut s).await, format!("m{i}"), "message {i}");
    }
    silent(&mut s).await;
    Ok(())
}

#[tokio::test]
async fn catch_up_over_many_pages_with_concurrent_traffic_has_no_gap_or_duplicate() -> Result<()> {
    let broker = Arc::new(MemoryBroker::with_config(
        MemoryConfig::default().with_history_len(10_000),
    ));
    let config = HubConfig::default()
        .with_replay_page(7)
        .with_pending_limit(5);
    let hub = Hub::with_config(broker.clone(), config);
    let r = room("pages");
    let first = hub.publish(&Envelope::new(r.clone(), "0")).await?;
    for i in 1..100 {
        hub.publish(&Envelope::new(r.clone(), i.to_string()))
            .await?;
    }
    let mut s = hub.connect("x");
    s.handle()
        .join_with(r.clone(), JoinOptions::default().since(first.cursor))
        .await?;
    let publisher = {
        let hub = hub.clone();
        let r = r.clone();
        tokio::spawn(async move {
            for i in 100..400 {
                hub.publish(&Envelope::new(r.clone(), i.to_string()))
                    .await?;
                if i % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            Ok::<_, chatbus_core::Error>(())
        })
    };
    for i in 1..400 {
        assert_eq!(next_frame(&mut s).await, i.to_string());
    }
    publisher.await.expect("task panicked")?;
    silent(&mut s).await;
    Ok(())
}

#[tokio::test]
async fn slow_session_is_resynced_without_slowing_others() -> Result<()> {
    let broker = Arc::new(MemoryBroker::with_config(
        MemoryConfig::default().with_history_len(10_000),
    ));
    let config = HubConfig::default().with_session_queue(8);
    let hub = Hub::with_config(broker, config);
    let r = room("slow");
    let mut fast = hub.connect("fast");
    let mut slow = hub.connect("slow");
    fast.handle().join(r.clone()).await?;
    slow.handle().join(r.clone()).await?;
    hub.publish(&Envelope::new(r.clone(), "base")).await?;
    assert_eq!(next_frame(&mut fast).await, "base");
    let n = 200;
    for i in 0..n {
        hub.publish(&Envelope::new(r.clone(), format!("m{i}")))
            .await?;
        // The fast one keeps reading: never affected by the slow one.
        assert_eq!(next_frame(&mut fast).await, format!("m{i}"));
    }
    assert!(hub.stats().lagged > 0);
    // Now the slow one reads everything: all 200, in order, no gap, no duplicate.
    assert_eq!(next_frame(&mut slow).await, "base");
    for i in 0..n {
        assert_eq!(
            next_frame(&mut slow).await,
            format!("m{i}"),
            "slow session message {i}"
        );
    }
    silent(&mut slow).await;
    Ok(())
}

#[tokio::test]
async fn slow_session_is_closed_with_close_policy() -> Result<()> {
    let config = HubConfig::default()
        .with_session_queue(4)
        .with_slow_policy(SlowPolicy::Close);
    let hub = Hub::with_config(Arc::new(MemoryBroker::new()), config);
    let r = room("close");
    let mut slow = hub.connect("slow");
    slow.handle().join(r.clone()).await?;
    for i in 0..20 {
        hub.publish(&Envelope::new(r.clone(), format!("m{i}")))
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Queued frames come first, then the close.
    let mut frames = 0;
    loop {
        match tokio::time::timeout(T, slow.recv()).await {
            Ok(Outbound::Frame(_)) => frames += 1,
            Ok(Outbound::Close(reason)) => {
                assert_eq!(reason, CloseReason::SlowConsumer);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(frames <= 4, "{frames} frames for a queue of 4");
    Ok(())
}

#[tokio::test]
async fn broker_without_history_reports_lag() -> Result<()> {
    let broker = Arc::new(MemoryBroker::with_config(
        MemoryConfig::default().with_history_len(0),
    ));
    assert!(!broker.capabilities().replay);
    let config = HubConfig::default().with_session_queue(2);
    let hub = Hub::with_config(broker, config);
    let r = room("nohist");
    let mut s = hub.connect("s");
    s.handle().join(r.clone()).await?;
    for i in 0..10 {
        hub.publish(&Envelope::new(r.clone(), format!("m{i}")))
            .await?;
    }
    let mut saw_lag = false;
    for _ in 0..10 {
        match tokio::time::timeout(Duration::from_millis(300), s.recv()).await {
            Ok(Outbound::Lagged { room, .. }) => {
                assert_eq!(room, r);
                saw_lag = true;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(
        saw_lag,
        "an overflow with nothing to replay must be reported"
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_closes_sessions_after_queued_frames() -> Result<()> {
    let hub = Hub::new(Arc::new(MemoryBroker::new()));
    let r = room("bye");
    let mut s = hub.connect("s");
    s.handle().join(r.clone()).await?;
    hub.publish(&Envelope::new(r, "last")).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    hub.shutdown();
    assert_eq!(next_frame(&mut s).await, "last");
    assert!(matches!(
        s.recv().await,
        Outbound::Close(CloseReason::Shutdown)
    ));
    Ok(())
}

// ---- Regressions found in review: membership generations, bad cursors, fairness, races ----

/// Everything the session gets until it stays quiet for 300 ms (frames as text, notices).
async fn drain(s: &mut Session) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(o) = tokio::time::timeout(Duration::from_millis(300), s.recv()).await {
        match o {
            Outbound::Frame(b) => out.push(String::from_utf8_lossy(&b).into_owned()),
            Outbound::Lagged { cursor, .. } => out.push(format!("LAGGED {cursor:?}")),
            Outbound::Reset { reason, .. } => out.push(format!("RESET {reason:?}")),
            Outbound::Close(r) => {
                out.push(format!("CLOSE {r:?}"));
                break;
            }
        }
    }
    out
}

async fn publish_n(b: &MemoryBroker, r: &Room, prefix: &str, n: usize) -> Result<Vec<Cursor>> {
    let mut cursors = Vec::new();
    for i in 0..n {
        let rc = b
            .publish(&Envelope::new(r.clone(), format!("{prefix}{i}")))
            .await?;
        cursors.extend(rc.cursor);
    }
    Ok(cursors)
}

#[tokio::test]
async fn leaving_during_a_catch_up_stops_it() -> Result<()> {
    let broker = Arc::new(MemoryBroker::new());
    let hub = Hub::new(broker.clone());
    let r = room("r");
    let cursors = publish_n(&broker, &r, "m", 6).await?;
    let mut s = hub.connect("u");
    s.handle().join_since(r.clone(), cursors[0]).await?;
    assert!(s.handle().leave(&r));
    let got = drain(&mut s).await;
    assert!(got.is_empty(), "received {got:?} after leaving");
    Ok(())
}

#[tokio::test]
async fn joining_again_during_a_catch_up_never_duplicates() -> Result<()> {
    let broker = Arc::new(MemoryBroker::new());
    let hub = Hub::new(broker.clone());
    let r = room("r");
    let cursors = publish_n(&broker, &r, "m", 4).await?;
    let mut s = hub.connect("u");
    s.handle().join_since(r.clone(), cursors[0]).await?;
    s.handle().join(r.clone()).await?;
    hub.publish(&Envelope::new(r.clone(), "live")).await?;
    let got = drain(&mut s).await;
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "duplicates: {got:?}");
    assert_eq!(
        got,
        ["live"],
        "the second join (no cursor) replaces the catch-up"
    );
    Ok(())
}

#[tokio::test]
async fn a_resume_cursor_beyond_the_log_does_not_silence_the_room() -> Result<()> {
    let hub = Hub::new(Arc::new(MemoryBroker::new()));
    let r = room("r");
    let mut s = hub.connect("u");
    s.handle()
        .join_since(r.clone(), Cursor::new(0, 1_000_000))
        .await?;
    let _ = drain(&mut s).await;
    for i in 0..3 {
        hub.publish(&Envelope::new(r.clone(), format!("live{i}")))
            .await?;
    }
    assert_eq!(drain(&mut s).await, ["live0", "live1", "live2"]);
    Ok(())
}

/// Waits (up to `T`, the bound for a broken hub) until the hub has queued `n` live frames in all:
/// the pump runs on its own task, so `publish` returning says nothing about delivery.
async fn until_delivered(hub: &Hub, n: u64) {
    let deliveries = || hub.stats().deliveries;
    let waited = tokio::time::timeout(T, async {
        while deliveries() < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{} of {n} frames queued within {T:?}",
        deliveries()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_does_not_hold_back_other_rooms() -> Result<()> {
    let broker = Arc::new(MemoryBroker::with_config(
        MemoryConfig::default().with_history_len(10_000),
    ));
    let config = HubConfig::default()
        .with_session_queue(8)
        .with_slow_policy(SlowPolicy::Close)
        .with_replay_page(2);
    let hub = Hub::with_config(broker.clone(), config);
    let (a, b) = (room("a"), room("b"));
    let cursors = publish_n(&broker, &a, "a", 200).await?;
    let mut s = hub.connect("u");
    s.handle().join(b.clone()).await?;
    s.handle().join_since(a.clone(), cursors[0]).await?;
    // One frame read: the catch-up of room a has started.
    assert_eq!(next_frame(&mut s).await, "a1");
    // Room b gets more live traffic than its queue holds while room a still has 198 messages
    // to replay. A client reading one frame per message keeps up only if each live frame is
    // written before the next catch-up frame; a hub that served the catch-up first would fill
    // b's queue and close the session. Each read waits until the pump has queued the frame, so
    // the schedule is the same however the machine is loaded (the pump batches what it finds:
    // a reader that does not wait for it can be handed 20 frames at once, which overflows a
    // queue of 8 by design).
    for i in 0..20 {
        hub.publish(&Envelope::new(b.clone(), format!("b{i}")))
            .await?;
        until_delivered(&hub, i + 1).await;
        assert_eq!(
            next_frame(&mut s).await,
            format!("b{i}"),
            "live frame {i} of room b waited behind the catch-up"
        );
    }
    // The rest of the catch-up, in order, and no close.
    for i in 2..200 {
        assert_eq!(next_frame(&mut s).await, format!("a{i}"));
    }
    silent(&mut s).await;
    Ok(())
}

#[tokio::test]
async fn the_room_stream_lagging_during_a_catch_up_loses_nothing() -> Result<()> {
    // A tiny broker buffer: the hub's room subscription lags while the member catches up.
    let broker = Arc::new(MemoryBroker::with_config(
        MemoryConfig::default().with_subscriber_capacity(4),
    ));
    let hub = Hub::new(broker.clone());
    let r = room("r");
    let cursors = publish_n(&broker, &r, "m", 4).await?;
    let mut s = hub.connect("u");
    s.handle().join_since(r.clone(), cursors[0]).await?;
    let mut got = Vec::new();
    if let Ok(Outbound::Frame(b)) = tokio::time::timeout(T, s.recv()).await {
        got.push(String::from_utf8_lossy(&b).into_owned());
    }
    publish_n(&broker, &r, "p", 11).await?;
    tokio::task::yield_now().await;
    got.extend(drain(&mut s).await);
    let expected: Vec<String> = (1..4)
        .map(|i| format!("m{i}"))
        .chain((0..11).map(|i| format!("p{i}")))
        .collect();
    assert_eq!(got, expected);
    Ok(())
}

/// `subscribe` waits for a signal, to drop a session in the middle of `join`.
#[derive(Debug)]
struct GatedSubscribe(Arc<tokio::sync::Notify>);

#[async_trait::async_trait]
impl Hooks for GatedSubscribe {
    async fn subscribe(
        &self,
        inner: &MemoryBroker,
        i: chatbus_core::Interest,
    ) -> Result<chatbus_core::Subscription> {
        self.0.notified().await;
        inner.subscribe(i).await
    }
}

#[tokio::test]
async fn a_session_dropped_during_join_leaves_no_member_behind() -> Result<()> {
    let gate = Arc::new(tokio::sync::Notify::new());
    let hub = Hub::new(Arc::new(Hooked::new(
        MemoryBroker::new(),
        GatedSubscribe(gate.clone()),
    )));
    let r = room("r");
    let s = hub.connect("ghost");
    let (h, r2) = (s.handle(), r.clone());
    let join = tokio::spawn(async move { h.join(r2).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(s);
    gate.notify_one();
    let joined = join.await.expect("task panicked");
    assert!(
        matches!(joined, Err(chatbus_core::Error::Closed)),
        "{joined:?}"
    );
    assert!(
        hub.local_members(&r).is_empty(),
        "dropped session still a member"
    );
    assert!(hub.rooms().is_empty());
    Ok(())
}

#[tokio::test]
async fn recv_is_cancel_safe_during_catch_up() -> Result<()> {
    use futures::FutureExt;
    let broker = Arc::new(MemoryBroker::with_config(
        MemoryConfig::default().with_history_len(10_000),
    ));
    let config = HubConfig::default().with_replay_page(50);
    let hub = Hub::with_config(broker.clone(), config);
    let r = room("r");
    let cursors = publish_n(&broker, &r, "", 1001).await?;
    let mut s = hub.connect("u");
    s.handle().join_since(r.clone(), cursors[0]).await?;
    // The transport's pattern: await one, then take what is ready without waiting (dropping
    // the pending call when nothing is).
    let mut got = Vec::new();
    while let Ok(Outbound::Frame(b)) =
        tokio::time::timeout(Duration::from_millis(300), s.recv()).await
    {
        got.push(String::from_utf8_lossy(&b).into_owned());
        for _ in 0..63 {
            match s.recv().now_or_never() {
                Some(Outbound::Frame(b)) => got.push(String::from_utf8_lossy(&b).into_owned()),
                Some(other) => panic!("{other:?}"),
                None => break,
            }
        }
    }
    let expected: Vec<String> = (1..1001).map(|i| i.to_string()).collect();
    assert_eq!(got, expected);
    Ok(())
}

/// The first subscription of each room forwards the broker's messages until `cut` is
/// notified, then ends (a broker that gave up reconnecting); later ones are the broker's own.
#[derive(Debug, Default)]
struct EndingSubscription {
    cut: Arc<tokio::sync::Notify>,
    made: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Hooks for EndingSubscription {
    async fn subscribe(
        &self,
        inner: &MemoryBroker,
        i: chatbus_core::Interest,
    ) -> Result<chatbus_core::Subscription> {
        let mut real = inner.subscribe(i).await?;
        if self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed) > 0 {
            return Ok(real);
        }
        let (tx, sub) = chatbus_core::Subscription::channel(64);
        let cut = self.cut.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    () = cut.notified() => return,
                    item = real.recv() => match item {
                        Some(Ok(e)) => { let _ = tx.send(e); }
                        Some(Err(e)) => { let _ = tx.send_error(e); }
                        None => return,
                    },
                }
            }
        });
        Ok(sub)
    }
}

// Paused time: the pump's 500 ms pause before it resubscribes passes on the test's clock.
#[tokio::test(start_paused = true)]
async fn an_ended_subscription_is_renewed_and_members_resync_what_it_missed() -> Result<()> {
    let hooks = EndingSubscription::default();
    let cut = hooks.cut.clone();
    let hub = Hub::new(Arc::new(Hooked::new(MemoryBroker::new(), hooks)));
    let r = room("r");
    let mut s = hub.connect("u");
    s.handle().join(r.clone()).await?;
    hub.publish(&Envelope::new(r.clone(), "m0")).await?;
    assert_eq!(next_frame(&mut s).await, "m0");
    // The broker ends the room's subscription; what is published meanwhile reaches no pump.
    cut.notify_one();
    for m in ["m1", "m2"] {
        hub.publish(&Envelope::new(r.clone(), m)).await?;
    }
    // The pump resubscribes and the member replays from its last cursor: nothing lost.
    assert_eq!(next_frame(&mut s).await, "m1");
    assert_eq!(next_frame(&mut s).await, "m2");
    hub.publish(&Envelope::new(r.clone(), "m3")).await?;
    assert_eq!(next_frame(&mut s).await, "m3");
    silent(&mut s).await;
    assert_eq!(hub.stats().broker_errors, 1);
    Ok(())
}

/// An encoder that marks every message of room `copies` as a copy of room `original`.
#[derive(Debug)]
struct CopyOf {
    copies: Room,
    original: Room,
}

impl chatbus_core::FrameEncoder for CopyOf {
    fn encode(&self, env: &Envelope) -> Option<chatbus_core::Frame> {
        let frame = chatbus_core::Frame::new(env.payload.clone());
        Some(if env.room == self.copies {
            frame.skip_members_of(self.original.clone())
        } else {
            frame
        })
    }
}

#[tokio::test]
async fn a_copy_skips_the_members_of_its_original_room() -> Result<()> {
    let (copies, original) = (room("inbox"), room("conversation"));
    let hub = Hub::builder(Arc::new(MemoryBroker::new()))
        .encoder(Arc::new(CopyOf {
            copies: copies.clone(),
            original: original.clone(),
        }))
        .build();
    let mut joined = hub.connect("ann");
    let mut inbox_only = hub.connect("ann");
    joined.handle().join(copies.clone()).await?;
    joined.handle().join(original.clone()).await?;
    inbox_only.handle().join(copies.clone()).await?;
    hub.publish(&Envelope::new(original.clone(), "m1")).await?;
    hub.publish(&Envelope::ephemeral(copies.clone(), "m1 (copy)"))
        .await?;
    // The member of the original gets the message once, from the original.
    assert_eq!(next_frame(&mut joined).await, "m1");
    silent(&mut joined).await;
    assert_eq!(next_frame(&mut inbox_only).await, "m1 (copy)");
    // Leaving the original brings the copies back.
    joined.handle().leave(&original);
    hub.publish(&Envelope::ephemeral(copies, "m2 (copy)"))
        .await?;
    assert_eq!(next_frame(&mut joined).await, "m2 (copy)");
    Ok(())
}

/// A reconnect wave (issue #11 item 4): 60 sessions resume one room from three nearby cursors
/// while traffic goes on. Each gets exactly what it missed, then the live messages, in order;
/// the log is read a few times for all of them, not once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_wave_shares_its_log_reads_and_loses_nothing() -> Result<()> {
    let broker = Arc::new(MemoryBroker::new());
    let hub = Hub::new(broker.clone());
    let r = room("wave");
    let cursors = publish_n(&broker, &r, "m", 50).await?;
    let froms = [37usize, 38, 40];
    let mut sessions = Vec::new();
    for i in 0..60 {
        let s = hub.connect(format!("u{i}"));
        let from = froms[i % froms.len()];
        s.handle().join_since(r.clone(), cursors[from]).await?;
        sessions.push((from, s));
    }
    for i in 50..60 {
        hub.publish(&Envelope::new(r.clone(), format!("m{i}")))
            .await?;
    }
    let mut readers = Vec::new();
    for (from, mut s) in sessions {
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 59 - from {
                got.push(String::from_utf8_lossy(&next_frame(&mut s).await).into_owned());
            }
            silent(&mut s).await;
            (from, got)
        }));
    }
    for t in readers {
        let (from, got) = t.await.expect("reader task");
        let want: Vec<String> = (from + 1..60).map(|i| format!("m{i}")).collect();
        assert_eq!(got, want, "session resuming after m{from}");
    }
    let stats = hub.stats();
    assert!(
        stats.replay_reads <= 6,
        "60 catch-ups of one room read the log {} times",
        stats.replay_reads
    );
    assert!(stats.replays_shared >= 54, "{stats:?}");
    Ok(())
}

/// A member that joins after the room's subscription lost messages (and before anything else
/// was handed out) must get the lost ones from the log: the pump's "last handed out" mark no
/// longer says where that member's held messages begin.
#[tokio::test(flavor = "current_thread")]
async fn a_join_after_the_room_stream_lagged_gets_the_lost_messages() -> Result<()> {
    let broker = Arc::new(MemoryBroker::with_config(
        MemoryConfig::default().with_subscriber_capacity(4),
    ));
    let hub = Hub::with_config(broker.clone(), HubConfig::default().with_replay_page(3));
    let r = room("lagged-then-joined");
    let mut a = hub.connect("a");
    a.handle().join(r.clone()).await?;
    let mut cursors = publish_n(&broker, &r, "m", 5).await?;
    drain(&mut a).await;
    // A burst the room's subscription cannot hold: it lags.
    for i in 5..21 {
        let rc = broker
            .publish(&Envelope::new(r.clone(), format!("m{i}")))
            .await?;
        cursors.extend(rc.cursor);
    }
    drain(&mut a).await;
    let mut b = hub.connect("b");
    b.handle().join_since(r.clone(), cursors[4]).await?;
    let want: Vec<String> = (5..21).map(|i| format!("m{i}")).collect();
    assert_eq!(drain(&mut b).await, want);
    Ok(())
}
