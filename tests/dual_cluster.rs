//! `DualBus<RedisBroker, KafkaBroker>` over a real Redis Cluster (three masters, three
//! replicas) and Tansu: a cluster master is SIGKILLed in the middle of steady traffic to rooms
//! on every shard, and two DualBus instances still deliver every acknowledged message exactly
//! once, in order per room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatbus_core::{Broker, DualBus, DualConfig, Envelope, Interest, Room, Subscription};
use chatbus_kafka::{KafkaBroker, KafkaConfig};
use chatbus_redis::{RedisBroker, RedisConfig};
use chatbus_testkit::redis_cluster::RedisCluster;
use chatbus_testkit::tansu::Tansu;

type Bus = DualBus<RedisBroker, KafkaBroker>;

async fn bus(cluster: &RedisCluster, tansu: &Tansu) -> Bus {
    let fast = RedisBroker::connect(
        RedisConfig::default()
            .with_cluster(cluster.seeds())
            .with_password(cluster.password())
            .with_prefix("dual")
            // The merger subscribes Interest::All on the fast broker.
            .with_cluster_broadcast(true)
            .with_connect_timeout(Duration::from_secs(2))
            .with_command_timeout(Duration::from_millis(1500))
            .with_backoff(Duration::from_millis(50), Duration::from_millis(500))
            .with_ping_interval(Duration::from_secs(1)),
    )
    .await
    .expect("redis cluster");
    let durable = KafkaBroker::connect(
        KafkaConfig::new(tansu.bootstrap())
            .with_topic("dual-cluster")
            .with_partitions(3),
    )
    .await
    .expect("kafka");
    DualBus::new(fast, durable, DualConfig::default())
}

/// Per instance and room: what arrived, counted against the acknowledged publishes.
#[derive(Debug, Default, Clone)]
struct Tally {
    received: usize,
    duplicated: usize,
    reordered: usize,
    errors: usize,
    last: HashMap<usize, u64>,
    seen: HashMap<usize, Vec<u64>>,
}

async fn read(
    mut subs: Vec<(usize, Subscription)>,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
) {
    let mut streams = futures::stream::select_all(
        subs.drain(..)
            .map(|(room, sub)| futures::StreamExt::map(sub, move |item| (room, item))),
    );
    while !stop.load(Ordering::Relaxed) {
        let next = tokio::time::timeout(
            Duration::from_millis(200),
            futures::StreamExt::next(&mut streams),
        )
        .await;
        let Ok(Some((room, item))) = next else {
            continue;
        };
        let mut guard = tally.lock().expect("tally lock");
        let t = &mut *guard;
        let Ok(env) = item else {
            t.errors += 1;
            continue;
        };
        let n: u64 = std::str::from_utf8(&env.payload)
            .expect("utf8 payload")
            .parse()
            .expect("numeric payload");
        let seen = t.seen.entry(room).or_default();
        if seen.contains(&n) {
            t.duplicated += 1;
            continue;
        }
        seen.push(n);
        t.received += 1;
        let last = t.last.entry(room).or_insert(0);
        if n < *last {
            t.reordered += 1;
        }
        *last = (*last).max(n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_bus_loses_nothing_acked_when_a_cluster_master_dies() {
    let mut cluster = RedisCluster::start().await;
    let tansu = Tansu::start().await;
    let instances = Arc::new([bus(&cluster, &tansu).await, bus(&cluster, &tansu).await]);
    // Three rooms served by three different masters.
    let mut rooms: Vec<(Room, usize)> = Vec::new();
    for i in 0..200 {
        let room = Room::new(format!("dc{i}")).expect("room name");
        let master = cluster.master_of(&format!("dual:{{{}}}", room.as_str()));
        if rooms.iter().all(|(_, m)| *m != master) {
            rooms.push((room, master));
        }
        if rooms.len() == 3 {
            break;
        }
    }
    assert_eq!(rooms.len(), 3, "no three rooms on three shards");
    let stop = Arc::new(AtomicBool::new(false));
    let mut tallies = Vec::new();
    let mut readers = Vec::new();
    for bus in instances.iter() {
        let mut subs = Vec::new();
        for (i, (room, _)) in rooms.iter().enumerate() {
            subs.push((
                i,
                bus.subscribe(Interest::room(room.clone())).await.unwrap(),
            ));
        }
        let tally = Arc::new(Mutex::new(Tally::default()));
        readers.push(tokio::spawn(read(subs, tally.clone(), stop.clone())));
        tallies.push(tally);
    }
    let acked: Arc<Mutex<Vec<(usize, u64)>>> = Arc::default();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publishing = Arc::new(AtomicBool::new(true));
    let traffic = {
        let (acked, publishing, sent) = (acked.clone(), publishing.clone(), sent.clone());
        let rooms = rooms.clone();
        let instances = instances.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while publishing.load(Ordering::Relaxed) {
                n += 1;
                // Both instances publish: each round from the other one.
                let bus = &instances[usize::from(n.is_multiple_of(2))];
                let sends = rooms.iter().enumerate().map(|(i, (room, _))| {
                    let env = Envelope::new(room.clone(), n.to_string());
                    async move { bus.publish(&env).await.ok().map(|_| (i, n)) }
                });
                sent.fetch_add(3, Ordering::Relaxed);
                for ok in futures::future::join_all(sends).await.into_iter().flatten() {
                    acked.lock().expect("acked lock").push(ok);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let victim = rooms[0].1;
    cluster.kill(victim);
    let failover = cluster.wait_failover(victim, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    publishing.store(false, Ordering::Relaxed);
    traffic.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    // Everything acknowledged arrives on both instances (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = tallies.iter().all(|t| {
            let t = t.lock().unwrap();
            acked
                .iter()
                .all(|(r, n)| t.seen.get(r).is_some_and(|s| s.contains(n)))
        });
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A little longer, to catch late duplicates.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    for (k, t) in tallies.iter().enumerate() {
        let t = t.lock().unwrap().clone();
        let missing: Vec<(usize, u64)> = acked
            .iter()
            .copied()
            .filter(|(r, n)| !t.seen.get(r).is_some_and(|s| s.contains(n)))
            .collect();
        eprintln!(
            "instance {k}: sent {} acked {} received {} duplicated {} reordered {} missing {} \
             errors {} (failover took {failover:?})",
            sent.load(Ordering::Relaxed),
            acked.len(),
            t.received,
            t.duplicated,
            t.reordered,
            missing.len(),
            t.errors,
        );
        assert!(
            missing.is_empty(),
            "instance {k} lost acked messages: {missing:?}"
        );
        assert_eq!(t.duplicated, 0, "instance {k} delivered duplicates");
        assert_eq!(t.reordered, 0, "instance {k} reordered a room");
    }
    let stats = instances[0].stats();
    eprintln!("instance 0 DualBus stats: {stats:?}");
}
