//! Durability across broker restarts on a real Tansu with SQLite storage: whatever `publish`
//! acknowledged before a stop (SIGTERM) or a crash (SIGKILL) is replayed after the restart.

mod common;

use std::time::{Duration, Instant};

use chatbus_core::{Broker, BrokerExt, Envelope, MessageId, ReplayFrom, Room};
use chatbus_testkit::tansu::Tansu;
use futures::StreamExt;

async fn publish_batch(
    broker: &chatbus_kafka::KafkaBroker,
    room: &Room,
    tag: &str,
    n: usize,
) -> Vec<MessageId> {
    futures::stream::iter(0..n)
        .map(|i| {
            let env = Envelope::new(room.clone(), format!("{tag} {i}"));
            async move {
                broker.publish(&env).await.expect("publish acknowledged");
                env.id
            }
        })
        // Sequential per room keeps the expected order simple; a few rooms run side by side.
        .buffered(1)
        .collect()
        .await
}

/// Publishes until one succeeds: after a restart the client needs a moment to reconnect.
async fn wait_until_publishes(broker: &chatbus_kafka::KafkaBroker, room: &Room) -> MessageId {
    let start = Instant::now();
    loop {
        let env = Envelope::new(room.clone(), "probe");
        match broker.publish(&env).await {
            Ok(_) => return env.id,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "publish still failing: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_stop_and_crash() {
    let mut tansu = Tansu::start().await;
    let broker = common::connect(&tansu, "restart", 2).await;
    let room = Room::new("restart-room").expect("room");
    let mut expected = publish_batch(&broker, &room, "before-stop", 200).await;

    // Graceful stop, restart on the same port and database.
    tansu.stop().await;
    assert!(!tansu.is_running());
    tansu.restart().await;
    expected.push(wait_until_publishes(&broker, &room).await);
    expected.extend(publish_batch(&broker, &room, "before-crash", 200).await);

    // Crash: SIGKILL right after the acks.
    tansu.kill().await;
    tansu.restart().await;
    expected.push(wait_until_publishes(&broker, &room).await);

    // The same broker object (which reconnected) and a fresh one both see everything.
    let replayed = broker
        .replay_vec(&room, ReplayFrom::Beginning, usize::MAX)
        .await
        .expect("replay after restarts");
    let ids: Vec<MessageId> = replayed.iter().map(|e| e.id).collect();
    assert_eq!(
        ids, expected,
        "replay after restarts differs from what was acknowledged"
    );

    let fresh = common::connect(&tansu, "restart", 2).await;
    let again = fresh
        .replay_vec(&room, ReplayFrom::Beginning, usize::MAX)
        .await
        .expect("replay from a new client");
    assert_eq!(again.len(), expected.len());
    // Offsets continue after a restart: the log has no hole and no reuse.
    let cursors: Vec<u64> = again
        .iter()
        .filter_map(|e| e.cursor.map(|c| c.offset))
        .collect();
    assert!(
        cursors.windows(2).all(|w| w[1] == w[0] + 1),
        "offsets not contiguous: {cursors:?}"
    );
}
