//! `DualBus<RedisBroker, KafkaBroker>` over a real Redis Cluster (three masters, three
//! replicas) and Tansu: a cluster master is SIGKILLed in the middle of steady traffic to rooms
//! on every shard, and two DualBus instances still deliver every acknowledged message exactly
//! once, in order per room. The same with the interest-based DualBus, whose readers resync
//! from their cursors on `Lagged` as the Hub does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatbus_core::{
    Broker, BrokerExt, Cursor, DualBus, DualConfig, Envelope, Error, Interest, ReplayFrom, Room,
    Subscription,
};
use chatbus_kafka::{KafkaBroker, KafkaConfig};
use chatbus_redis::{RedisBroker, RedisConfig};
use chatbus_testkit::redis_cluster::RedisCluster;
use chatbus_testkit::tansu::Tansu;

type Bus = DualBus<RedisBroker, KafkaBroker>;

async fn bus(cluster: &RedisCluster, tansu: &Tansu, config: &DualConfig, topic: &str) -> Bus {
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
            .with_topic(topic)
            .with_partitions(3),
    )
    .await
    .expect("kafka");
    DualBus::new(fast, durable, config.clone())
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
    // With resync: the last cursor per room, copies at or below it dropped (as the Hub does).
    cursors: HashMap<usize, Cursor>,
    resyncs: usize,
    overlaps: usize,
}

impl Tally {
    fn take(&mut self, room: usize, env: &Envelope, by_cursor: bool) {
        if by_cursor {
            if let (Some(c), Some(last)) = (env.cursor, self.cursors.get(&room)) {
                if c.offset <= last.offset {
                    self.overlaps += 1;
                    return;
                }
            }
            if let Some(c) = env.cursor {
                self.cursors.insert(room, c);
            }
        }
        let n: u64 = std::str::from_utf8(&env.payload)
            .expect("utf8 payload")
            .parse()
            .expect("numeric payload");
        let seen = self.seen.entry(room).or_default();
        if seen.contains(&n) {
            self.duplicated += 1;
            return;
        }
        seen.push(n);
        self.received += 1;
        let last = self.last.entry(room).or_insert(0);
        if n < *last {
            self.reordered += 1;
        }
        *last = (*last).max(n);
    }
}

/// Reads every room's subscription into `tally`. With `resync` (the bus the subscriptions are
/// of), a `Lagged` is answered as the Hub does: the room's log after its last cursor.
async fn read(
    mut subs: Vec<(usize, Subscription)>,
    rooms: Vec<Room>,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    resync: Option<Arc<[Bus; 2]>>,
    which: usize,
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
        match (item, &resync) {
            (Ok(env), _) => tally
                .lock()
                .expect("tally lock")
                .take(room, &env, resync.is_some()),
            (Err(Error::Lagged { .. }), Some(buses)) => {
                let from = tally
                    .lock()
                    .expect("tally lock")
                    .cursors
                    .get(&room)
                    .map_or(ReplayFrom::Beginning, |&c| ReplayFrom::Cursor(c));
                let missed = buses[which]
                    .replay_vec(&rooms[room], from, 100_000)
                    .await
                    .expect("replay after Lagged");
                let mut t = tally.lock().expect("tally lock");
                t.resyncs += 1;
                for env in &missed {
                    t.take(room, env, true);
                }
            }
            (Err(_), _) => tally.lock().expect("tally lock").errors += 1,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_bus_loses_nothing_acked_when_a_cluster_master_dies() {
    master_dies_under(DualConfig::default(), "dual-cluster").await;
}

/// The interest-based DualBus (room tickets and leases on the cluster), the same failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interest_based_dual_bus_loses_nothing_acked_when_a_cluster_master_dies() {
    master_dies_under(
        DualConfig::default().with_interest(true),
        "dual-cluster-interest",
    )
    .await;
}

async fn master_dies_under(config: DualConfig, topic: &str) {
    let interest = config.interest;
    let mut cluster = RedisCluster::start().await;
    let tansu = Tansu::start().await;
    let instances = Arc::new([
        bus(&cluster, &tansu, &config, topic).await,
        bus(&cluster, &tansu, &config, topic).await,
    ]);
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
    for (which, bus) in instances.iter().enumerate() {
        let mut subs = Vec::new();
        for (i, (room, _)) in rooms.iter().enumerate() {
            subs.push((
                i,
                bus.subscribe(Interest::room(room.clone()))
                    .await
                    .expect("subscribe"),
            ));
        }
        let tally = Arc::new(Mutex::new(Tally::default()));
        readers.push(tokio::spawn(read(
            subs,
            rooms.iter().map(|(r, _)| r.clone()).collect(),
            tally.clone(),
            stop.clone(),
            interest.then(|| instances.clone()),
            which,
        )));
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
    // A master that does not hold the instances' leases: those keep renewing while the rooms
    // of the victim get no tickets (the interest-based bus must then let its lease lapse).
    let leases_master = cluster.master_of("dual:leases");
    let victim = rooms
        .iter()
        .map(|&(_, m)| m)
        .find(|&m| m != leases_master)
        .expect("a room on a shard without the leases");
    cluster.kill(victim);
    let failover = cluster.wait_failover(victim, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    publishing.store(false, Ordering::Relaxed);
    traffic.await.expect("traffic task");
    let acked = acked.lock().expect("acked lock").clone();
    // Everything acknowledged arrives on both instances (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = tallies.iter().all(|t| {
            let t = t.lock().expect("tally lock");
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
        r.await.expect("reader task");
    }
    for (k, t) in tallies.iter().enumerate() {
        let t = t.lock().expect("tally lock").clone();
        let missing: Vec<(usize, u64)> = acked
            .iter()
            .copied()
            .filter(|(r, n)| !t.seen.get(r).is_some_and(|s| s.contains(n)))
            .collect();
        eprintln!(
            "instance {k}: sent {} acked {} received {} duplicated {} reordered {} missing {} \
             errors {} resyncs {} overlaps {} (failover took {failover:?})",
            sent.load(Ordering::Relaxed),
            acked.len(),
            t.received,
            t.duplicated,
            t.reordered,
            missing.len(),
            t.errors,
            t.resyncs,
            t.overlaps,
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
