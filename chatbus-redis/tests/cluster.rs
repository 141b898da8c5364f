//! `RedisBroker` against a real Redis Cluster (three masters, three replicas on loopback):
//! the conformance suite, messages across instances and shards, and a master SIGKILLed in
//! the middle of traffic.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatbus_core::{Broker, Envelope, Error, Health, Interest, Room, Subscription};
use chatbus_redis::{RedisBroker, RedisConfig};
use chatbus_testkit::redis_cluster::RedisCluster;

fn config(cluster: &RedisCluster, prefix: &str) -> RedisConfig {
    RedisConfig::default()
        .with_cluster(cluster.seeds())
        .with_password(cluster.password())
        .with_prefix(prefix)
        .with_connect_timeout(Duration::from_secs(2))
        .with_command_timeout(Duration::from_millis(1500))
        .with_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .with_ping_interval(Duration::from_secs(1))
}

async fn connect(config: RedisConfig) -> RedisBroker {
    match RedisBroker::connect(config).await {
        Ok(b) => b,
        Err(e) => panic!("cannot connect to the test cluster: {e}"),
    }
}

/// Three rooms whose slots three different masters serve, with those masters' indexes.
fn rooms_on_every_shard(cluster: &RedisCluster, prefix: &str) -> Vec<(Room, usize)> {
    let mut out: Vec<(Room, usize)> = Vec::new();
    for i in 0..200 {
        let room = Room::new(format!("room{i}")).expect("room name");
        let master = cluster.master_of(&format!("{prefix}:{{{}}}", room.as_str()));
        if out.iter().all(|(_, m)| *m != master) {
            out.push((room, master));
        }
        if out.len() == 3 {
            return out;
        }
    }
    panic!("no three rooms on three shards among 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_and_without_history() {
    let cluster = RedisCluster::start().await;
    let broker = connect(config(&cluster, "conf0").with_cluster_broadcast(true)).await;
    assert!(!broker.capabilities().replay);
    chatbus_core::conformance::run_all(&broker).await;
    let broker = connect(
        config(&cluster, "conf1")
            .with_cluster_broadcast(true)
            .with_history_len(1000),
    )
    .await;
    assert!(broker.capabilities().replay);
    chatbus_core::conformance::run_all(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_instances_on_every_shard() {
    let cluster = RedisCluster::start().await;
    let rooms = rooms_on_every_shard(&cluster, "x");
    let masters: HashSet<usize> = rooms.iter().map(|(_, m)| *m).collect();
    assert_eq!(masters.len(), 3, "{rooms:?}");
    let a = connect(config(&cluster, "x").with_history_len(100)).await;
    let b = connect(config(&cluster, "x").with_history_len(100)).await;
    let mut subs = Vec::new();
    for (room, _) in &rooms {
        subs.push(b.subscribe(Interest::room(room.clone())).await.unwrap());
    }
    for (i, (room, _)) in rooms.iter().enumerate() {
        for n in 0..20 {
            let r = a
                .publish(&Envelope::new(room.clone(), format!("{i}:{n}")))
                .await
                .unwrap();
            assert_eq!(r.cursor.map(|c| c.offset), Some(n + 1));
        }
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        for n in 0..20 {
            let env = chatbus_core::conformance::recv(sub).await.unwrap();
            assert_eq!(env.payload.as_ref(), format!("{i}:{n}").as_bytes());
        }
    }
    // History works on every shard: the room's stream and meta share its slot.
    for (room, _) in &rooms {
        let page = b.history(room, None, 5).await.unwrap();
        assert_eq!(page.messages.len(), 5);
    }
    assert_eq!(b.health().await, Health::Healthy);
    // Interest::All needs the broadcast, and says so.
    match b.subscribe(Interest::All).await {
        Err(Error::Config(msg)) => assert!(msg.contains("with_cluster_broadcast"), "{msg}"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// What one room's subscription saw: payload numbers with arrival times, and `Lagged`s.
#[derive(Debug, Default)]
struct Seen {
    got: Vec<(u64, Instant)>,
    lagged: Vec<Instant>,
    other_errors: usize,
}

async fn watch(mut sub: Subscription, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(item) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await else {
            continue;
        };
        let mut s = seen.lock().expect("seen lock");
        match item {
            None => return,
            Some(Ok(env)) => {
                let n = std::str::from_utf8(&env.payload)
                    .expect("utf8 payload")
                    .parse()
                    .expect("numeric payload");
                s.got.push((n, Instant::now()));
            }
            Some(Err(Error::Lagged { .. })) => s.lagged.push(Instant::now()),
            Some(Err(_)) => s.other_errors += 1,
        }
    }
}

/// A master is SIGKILLed while three rooms (one per shard) get a message every 10 ms: its
/// replica takes over, publishes and deliveries of its room resume within the bound below,
/// its room's subscription gets `Lagged`, and the rooms of the other shards lose nothing
/// (and get neither `Unavailable` nor `Lagged`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_mid_traffic_fails_over() {
    const BOUND: Duration = Duration::from_secs(10);
    let mut cluster = RedisCluster::start().await;
    let rooms = rooms_on_every_shard(&cluster, "f");
    let publisher = connect(config(&cluster, "f")).await;
    let subscriber = connect(config(&cluster, "f")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut seen = Vec::new();
    let mut watchers = Vec::new();
    for (room, _) in &rooms {
        let sub = subscriber
            .subscribe(Interest::room(room.clone()))
            .await
            .unwrap();
        let s = Arc::new(Mutex::new(Seen::default()));
        watchers.push(tokio::spawn(watch(sub, s.clone(), stop.clone())));
        seen.push(s);
    }
    // (room index, number, when its publish started) of every acknowledged publish.
    let acked: Arc<Mutex<Vec<(usize, u64, Instant)>>> = Arc::default();
    // One publisher per room, so that the killed shard's stalled publishes hold up no other.
    let traffic: Vec<_> = rooms
        .iter()
        .enumerate()
        .map(|(i, (room, _))| {
            let (acked, stop, room) = (acked.clone(), stop.clone(), room.clone());
            let publisher = publisher.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let at = Instant::now();
                    let env = Envelope::new(room.clone(), n.to_string());
                    if publisher.publish(&env).await.is_ok() {
                        acked.lock().expect("acked lock").push((i, n, at));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = rooms[0].1;
    let killed_at = Instant::now();
    cluster.kill(victim);
    let failover = cluster.wait_failover(victim, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for w in watchers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let seen: Vec<Seen> = seen
        .into_iter()
        .map(|s| std::mem::take(&mut *s.lock().unwrap()))
        .collect();
    // The killed shard: publishes and deliveries resume, and its subscription was told.
    let resumed_publish = acked
        .iter()
        .filter(|(i, _, at)| *i == 0 && *at > killed_at + Duration::from_millis(50))
        .map(|(_, _, at)| *at - killed_at)
        .find(|d| *d > Duration::from_millis(50));
    let resumed_delivery = seen[0]
        .got
        .iter()
        .map(|(_, at)| *at)
        .filter(|at| *at > killed_at)
        .map(|at| at - killed_at)
        .find(|d| *d > failover.min(Duration::from_millis(500)));
    // The longest wait between two deliveries of a healthy shard's room.
    let stall = |s: &Seen| {
        s.got
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .max()
            .unwrap_or_default()
    };
    let publishes = |i: usize| acked.iter().filter(|(r, _, _)| *r == i).count();
    eprintln!(
        "failover: cluster healed after {failover:?}; room of the killed shard: publish ok again \
         {resumed_publish:?} and delivery {resumed_delivery:?} after the kill; lagged {:?}; \
         acked publishes per room {:?}; longest delivery gap of the healthy rooms {:?}",
        seen.iter().map(|s| s.lagged.len()).collect::<Vec<_>>(),
        (0..3).map(publishes).collect::<Vec<_>>(),
        seen[1..].iter().map(stall).collect::<Vec<_>>(),
    );
    assert!(
        !seen[0].lagged.is_empty(),
        "the killed shard's room got no Lagged"
    );
    // Nor do the healthy shards wait for the failover: their masters' connections are read
    // while the subscriber recovers (2.25 s gaps before; ~40 ms measured now).
    for (i, s) in seen.iter().enumerate().skip(1) {
        let gap = stall(s);
        assert!(
            gap < Duration::from_secs(1),
            "room {i} (a healthy shard) stalled {gap:?}"
        );
    }
    let resumed = resumed_delivery.expect("deliveries of the killed shard's room never resumed");
    assert!(resumed < BOUND, "deliveries resumed only after {resumed:?}");
    // After its Lagged notice, the killed shard's room gets every acknowledged message.
    let lagged_at = *seen[0].lagged.last().unwrap();
    let got0: HashSet<u64> = seen[0].got.iter().map(|(n, _)| *n).collect();
    let missing0: Vec<u64> = acked
        .iter()
        .filter(|(i, n, at)| *i == 0 && *at > lagged_at && !got0.contains(n))
        .map(|(_, n, _)| *n)
        .collect();
    assert!(
        missing0.is_empty(),
        "lost after the Lagged notice: {missing0:?}"
    );
    // The other shards lose nothing, keep their order, and are not told to resync: their
    // masters' connections were kept.
    for (i, s) in seen.iter().enumerate().skip(1) {
        assert!(
            s.lagged.is_empty() && s.other_errors == 0,
            "room {i} (a healthy shard) was told it may have lost messages: {} Lagged, {} other \
             errors",
            s.lagged.len(),
            s.other_errors
        );
        let got: Vec<u64> = s.got.iter().map(|(n, _)| *n).collect();
        let sent: Vec<u64> = acked
            .iter()
            .filter(|(r, _, _)| *r == i)
            .map(|(_, n, _)| *n)
            .collect();
        assert_eq!(
            got, sent,
            "room {i} (a healthy shard) lost or reordered messages"
        );
    }
}

/// A room whose last subscription goes away while a master fails over is unsubscribed on its
/// own (healthy, kept) master once the broker has recovered: the connections kept through a
/// failover are pruned of what nobody wants any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_left_during_a_failover_is_unsubscribed_on_the_kept_master() {
    let mut cluster = RedisCluster::start().await;
    let rooms = rooms_on_every_shard(&cluster, "p");
    let broker = connect(config(&cluster, "p")).await;
    let (kept_room, kept_master) = rooms[1].clone();
    let channel = format!("p:{{{}}}", kept_room.as_str());
    let numsub = |cluster: &RedisCluster| -> String {
        cluster.command(kept_master, &["PUBSUB", "SHARDNUMSUB", &channel])
    };
    let mut victim_sub = broker
        .subscribe(Interest::room(rooms[0].0.clone()))
        .await
        .unwrap();
    let kept_sub = broker.subscribe(Interest::room(kept_room)).await.unwrap();
    assert!(
        numsub(&cluster).trim_end().ends_with('1'),
        "{}",
        numsub(&cluster)
    );
    let victim = rooms[0].1;
    cluster.kill(victim);
    // Wait for the broker to notice the loss, then leave the healthy shard's room.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_millis(100), victim_sub.recv()).await {
            Ok(Some(Err(Error::Unavailable { .. }))) => break,
            _ if Instant::now() > deadline => panic!("no Unavailable after the kill"),
            _ => {}
        }
    }
    drop(kept_sub);
    cluster.wait_failover(victim, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !numsub(&cluster).trim_end().ends_with('0') {
        assert!(
            Instant::now() < deadline,
            "the left room is still subscribed on its master: {}",
            numsub(&cluster)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A room's slot is moved (with its keys) to another master under a live subscription: the
/// old master drops the shard channel (`sunsubscribe`), the broker follows the new topology,
/// resubscribes there and says `Lagged`; publishes (following `MOVED`) reach it again, and the
/// room's history window moved with the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resharded_room_is_followed_to_its_new_master() {
    let cluster = RedisCluster::start().await;
    let rooms = rooms_on_every_shard(&cluster, "m");
    let (room, _) = rooms[0].clone();
    let target = rooms[1].1;
    let publisher = connect(config(&cluster, "m").with_history_len(100)).await;
    let subscriber = connect(config(&cluster, "m").with_history_len(100)).await;
    let mut sub = subscriber
        .subscribe(Interest::room(room.clone()))
        .await
        .unwrap();
    publisher
        .publish(&Envelope::new(room.clone(), "before"))
        .await
        .unwrap();
    let env = chatbus_core::conformance::recv(&mut sub).await.unwrap();
    assert_eq!(env.payload.as_ref(), b"before");
    let channel = format!("m:{{{}}}", room.as_str());
    cluster.move_slot(cluster.slot_of(&channel), target).await;
    assert_eq!(cluster.master_of(&channel), target);
    // The subscription is told, then receives what is published from now on.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            Ok(Some(Err(Error::Lagged { .. }))) => break,
            Ok(Some(Err(Error::Unavailable { .. }))) | Err(_) => {}
            other => panic!("expected Lagged after the move, got {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "no Lagged within 10 s of the move"
        );
    }
    let receipt = publisher
        .publish(&Envelope::new(room.clone(), "after"))
        .await
        .unwrap();
    let env = chatbus_core::conformance::recv(&mut sub).await.unwrap();
    assert_eq!(env.payload.as_ref(), b"after");
    // The log moved with the slot: numbering goes on, and history has both.
    assert_eq!(receipt.cursor.map(|c| c.offset), Some(2));
    let page = subscriber.history(&room, None, 10).await.unwrap();
    let bodies: Vec<&[u8]> = page.messages.iter().map(|e| e.payload.as_ref()).collect();
    assert_eq!(bodies, [b"before".as_slice(), b"after".as_slice()]);
}
