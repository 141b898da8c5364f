//! Hub behaviour over the memory broker: fan-out, isolation, resume, slow sessions.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatbus_core::{
    Broker, CloseReason, Cursor, Envelope, Hub, HubConfig, MemoryBroker, MemoryConfig, Outbound,
    RawPayload, Result, Room, Session, SlowPolicy,
};

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

fn room(name: &str) -> Room {
    Room::new(name).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn fan_out_reaches_every_member_once_and_only_members() -> Result<()> {
    let hub = Hub::new(Arc::new(MemoryBroker::new()));
    let (r1, r2) = (room("one"), room("two"));
    let mut a = hub.connect("a");
    let mut b = hub.connect("b");
    let mut c = hub.connect("c");
    hub.join(&a.handle(), r1.clone(), None, None).await?;
    hub.join(&b.handle(), r1.clone(), None, None).await?;
    hub.join(&c.handle(), r2.clone(), None, None).await?;
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
    assert_eq!(
        hub.stats()
            .deliveries
            .load(std::sync::atomic::Ordering::Relaxed),
        20
    );
    // Leaving stops delivery; the last member leaving drops the room.
    assert!(hub.leave(&a.handle(), &r1));
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
    let joined = hub
        .join(
            &s.handle(),
            r.clone(),
            Some(cursors[9]),
            Some(Bytes::from("joined")),
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
    let config = HubConfig {
        replay_page: 7,
        pending_limit: 5,
        ..HubConfig::default()
    };
    let hub = Hub::with_encoder(broker.clone(), Arc::new(RawPayload), config);
    let r = room("pages");
    let first = hub.publish(&Envelope::new(r.clone(), "0")).await?;
    for i in 1..100 {
        hub.publish(&Envelope::new(r.clone(), i.to_string()))
            .await?;
    }
    let mut s = hub.connect("x");
    hub.join(&s.handle(), r.clone(), first.cursor, None).await?;
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
    publisher.await.unwrap_or_else(|e| panic!("{e}"))?;
    silent(&mut s).await;
    Ok(())
}

#[tokio::test]
async fn slow_session_is_resynced_without_slowing_others() -> Result<()> {
    let broker = Arc::new(MemoryBroker::with_config(
        MemoryConfig::default().with_history_len(10_000),
    ));
    let config = HubConfig {
        session_queue: 8,
        ..HubConfig::default()
    };
    let hub = Hub::with_encoder(broker, Arc::new(RawPayload), config);
    let r = room("slow");
    let mut fast = hub.connect("fast");
    let mut slow = hub.connect("slow");
    hub.join(&fast.handle(), r.clone(), None, None).await?;
    hub.join(&slow.handle(), r.clone(), None, None).await?;
    hub.publish(&Envelope::new(r.clone(), "base")).await?;
    assert_eq!(next_frame(&mut fast).await, "base");
    let n = 200;
    for i in 0..n {
        hub.publish(&Envelope::new(r.clone(), format!("m{i}")))
            .await?;
        // The fast one keeps reading: never affected by the slow one.
        assert_eq!(next_frame(&mut fast).await, format!("m{i}"));
    }
    assert!(
        hub.stats()
            .lagged
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
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
    let config = HubConfig {
        session_queue: 4,
        slow_policy: SlowPolicy::Close,
        ..HubConfig::default()
    };
    let hub = Hub::with_encoder(Arc::new(MemoryBroker::new()), Arc::new(RawPayload), config);
    let r = room("close");
    let mut slow = hub.connect("slow");
    hub.join(&slow.handle(), r.clone(), None, None).await?;
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
    let config = HubConfig {
        session_queue: 2,
        ..HubConfig::default()
    };
    let hub = Hub::with_encoder(broker, Arc::new(RawPayload), config);
    let r = room("nohist");
    let mut s = hub.connect("s");
    hub.join(&s.handle(), r.clone(), None, None).await?;
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
    hub.join(&s.handle(), r.clone(), None, None).await?;
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
