//! Fault injection over real processes: redis-server, Tansu (SQLite storage) and several
//! `chat-server --broker dual` instances, with WebSocket clients spread over them.
//!
//! Every scenario sends numbered messages (`sender:seq:ts` bodies) while a fault happens, then
//! scores every client: no acknowledged message missing, nothing duplicated, the same order for
//! every client, per-sender order kept. The promises are stated by the fault table in
//! docs/ARCHITECTURE.md ("Failure semantics"), which maps each fault to the test here that
//! proves it.
//!
//! Run with `cargo build --example chat-server && cargo test --test faults -- --test-threads=1`
//! (`cargo test --test faults` alone does not rebuild the example it runs; `cargo test
//! --workspace`, as in `scripts/test`, does).

use std::time::{Duration, Instant};

use chatbus_testkit::chat::{
    metric, quantile, settle, ChatServer, Participant, Plan, Record, Score,
};
use chatbus_testkit::redis::RedisServer;
use chatbus_testkit::tansu::Tansu;

/// What each sender sends.
#[derive(Debug, Clone, Copy)]
struct Load {
    sends: u64,
    every: Duration,
    pad: usize,
}

/// 150 messages per sender at 16/s: under the server's default rate limit of 20/s.
const NORMAL: Load = Load {
    sends: 150,
    every: Duration::from_millis(60),
    pad: 0,
};

/// The scenarios run one at a time even under the default parallel test runner: each starts a
/// whole cluster, and two at once on 2 cores would measure the machine, not the fault.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    redis: RedisServer,
    tansu: Tansu,
    servers: Vec<ChatServer>,
    // Last, so that it is released after the processes above are stopped.
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    async fn start(instances: usize, extra_args: &[&str]) -> Self {
        let turn = ONE_AT_A_TIME.lock().await;
        let redis = RedisServer::start().await;
        let tansu = Tansu::start().await;
        let topic = format!("faults-{}", std::process::id()) + &format!("-{}", rand_suffix());
        let env = [
            ("CHATBUS_REDIS_URL", redis.url()),
            ("CHATBUS_KAFKA_BROKERS", tansu.bootstrap()),
            ("CHATBUS_KAFKA_TOPIC", topic),
        ];
        let mut args = vec!["--broker", "dual"];
        args.extend_from_slice(extra_args);
        let mut servers = Vec::new();
        for _ in 0..instances {
            servers.push(ChatServer::start(&args, &env).await);
        }
        Self {
            redis,
            tansu,
            servers,
            _turn: turn,
        }
    }

    /// Ports in the order a client homed on `home` tries them.
    fn ports_from(&self, home: usize) -> Vec<u16> {
        let n = self.servers.len();
        (0..n)
            .map(|i| self.servers[(home + i) % n].port())
            .collect()
    }

    /// One sender and one pure receiver per instance.
    async fn participants(&self, room: &str, load: Load) -> Vec<Participant> {
        let mut v = Vec::new();
        for home in 0..self.servers.len() {
            let plan = |send| Plan {
                ports: self.ports_from(home),
                room: room.to_owned(),
                send,
                every: load.every,
                stall: false,
                pad: load.pad,
            };
            v.push(Participant::start(&format!("recv{home}"), plan(0)).await);
            v.push(Participant::start(&format!("send{home}"), plan(load.sends)).await);
        }
        v
    }
}

/// Everybody has joined: senders go.
fn go(participants: &[Participant]) {
    for p in participants {
        p.start_sending();
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn report(scenario: &str, records: &[(String, Record)], score: &Score) {
    let received: usize = records.iter().map(|(_, r)| r.received.len()).sum();
    let errors: u64 = records
        .iter()
        .flat_map(|(_, r)| r.send_errors.values())
        .sum();
    let unanswered: u64 = records.iter().map(|(_, r)| r.unanswered).sum();
    let reconnects: u64 = records
        .iter()
        .map(|(_, r)| r.connections.saturating_sub(1))
        .sum();
    let p99 = quantile(
        records
            .iter()
            .flat_map(|(_, r)| r.received.iter().map(|m| m.latency_ms)),
        0.99,
    );
    let max_ack = records
        .iter()
        .flat_map(|(_, r)| r.ack_ms.iter().copied())
        .max()
        .unwrap_or(0);
    println!(
        "{scenario}: acked {} | received {received} | missing {} | duplicated {} | reordered {} | \
         send errors {errors} | unanswered {unanswered} | reconnects {reconnects} | p99 {p99} ms | \
         slowest ack {max_ack} ms",
        score.acked,
        score.total_missing(),
        score.total_duplicated(),
        score.reordered.len(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_traffic_and_restarted() {
    let mut c = Cluster::start(3, &[]).await;
    let ps = c.participants("faults-redis", NORMAL).await;
    go(&ps);
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.redis.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.redis.restart().await;
    let records = settle(ps, 3 * NORMAL.sends as usize, Duration::from_secs(60)).await;
    let score = Score::of(&records);
    report("redis killed", &records, &score);
    score.assert_perfect("redis killed");
    // Sends went on through Kafka during the outage: nothing was refused.
    let refused: u64 = records
        .iter()
        .flat_map(|(_, r)| r.send_errors.values())
        .sum();
    if refused > 0 {
        eprintln!("server 0 log:\n{}", c.servers[0].log());
    }
    assert_eq!(
        refused,
        0,
        "sends refused while only Redis was down: {:?}",
        records
            .iter()
            .map(|(_, r)| &r.send_errors)
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_stopped_mid_traffic_and_restarted() {
    let mut c = Cluster::start(2, &[]).await;
    let ps = c.participants("faults-kafka", NORMAL).await;
    go(&ps);
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.tansu.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.tansu.restart().await;
    let records = settle(ps, 2 * NORMAL.sends as usize, Duration::from_secs(90)).await;
    let score = Score::of(&records);
    report("tansu stopped", &records, &score);
    score.assert_perfect("tansu stopped");
    let unavailable: u64 = records
        .iter()
        .filter_map(|(_, r)| r.send_errors.get("unavailable"))
        .sum();
    assert!(
        unavailable > 0,
        "sends during the Kafka outage must get `unavailable`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_instance_killed() {
    let mut c = Cluster::start(3, &[]).await;
    let ps = c.participants("faults-instance", NORMAL).await;
    go(&ps);
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.servers[0].kill().await;
    let records = settle(ps, 3 * NORMAL.sends as usize, Duration::from_secs(60)).await;
    let score = Score::of(&records);
    report("instance killed", &records, &score);
    score.assert_perfect("instance killed");
    let moved = records
        .iter()
        .filter(|(n, r)| n.ends_with('0') && r.connections > 1)
        .count();
    assert_eq!(
        moved, 2,
        "both clients of the killed instance reconnected elsewhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnects_for_5s_and_resumes() {
    let c = Cluster::start(2, &[]).await;
    let ps = c.participants("faults-client", NORMAL).await;
    go(&ps);
    tokio::time::sleep(Duration::from_secs(2)).await;
    ps[0].disconnect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    ps[0].resume();
    let records = settle(ps, 2 * NORMAL.sends as usize, Duration::from_secs(60)).await;
    let score = Score::of(&records);
    report("client away 5 s", &records, &score);
    score.assert_perfect("client away 5 s");
    assert!(records[0].1.connections >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_that_reads_nothing() {
    // A small session queue and no rate limit, and 3 senders x 600 x 8 KB (about 14 MB): more
    // than the kernel's socket buffers absorb, so the stalled client's queue overflows.
    let c = Cluster::start(3, &["--session-queue", "64", "--rate-per-sec", "0"]).await;
    let heavy = Load {
        sends: 600,
        every: Duration::from_millis(16),
        pad: 8_000,
    };
    let mut ps = c.participants("faults-slow", heavy).await;
    let slow = Participant::start(
        "slow",
        Plan {
            ports: c.ports_from(0),
            room: "faults-slow".into(),
            send: 0,
            every: heavy.every,
            stall: true,
            pad: 0,
        },
    )
    .await;
    go(&ps);
    let rss_before = rss_kib(c.servers[0].pid());
    // It stays stalled until its server has seen it fall behind (its queue overflowed: resync
    // or close), not for a fixed time: on a loaded machine the senders slow down too, and 11 s
    // of their traffic may not fill the socket buffers. The bound is for a broken system; the
    // senders' whole run takes about 10 s on a quiet machine.
    let behind = |text: String| {
        (
            metric(&text, "chatbus_lagged_total"),
            metric(&text, "chatbus_slow_closed_total"),
        )
    };
    let _ = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let (lagged, closed) = behind(c.servers[0].metrics().await);
            if lagged + closed > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    // A little longer, so the others get traffic while it is behind.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_during = rss_kib(c.servers[0].pid());
    let (lagged, slow_closed) = behind(c.servers[0].metrics().await);
    // Then it reads again: it must get everything exactly once, through resync.
    slow.set_stalled(false);
    ps.push(slow);
    let records = settle(ps, 3 * heavy.sends as usize, Duration::from_secs(60)).await;
    let score = Score::of(&records);
    report("slow client", &records, &score);
    score.assert_perfect("slow client");
    // The others' latency stayed low while it stalled. Measured against the senders' own ack
    // latency in the same run: on a loaded machine (CPU taken by other processes) both grow
    // alike, while a fan-out held up by the stalled client would delay the others' copies, not
    // the acks (replies bypass the fan-out), for as long as the stall lasts. On a quiet machine
    // the bound is the plain 1 s.
    let others = quantile(
        records
            .iter()
            .filter(|(n, _)| n != "slow")
            .flat_map(|(_, r)| r.received.iter().map(|m| m.latency_ms)),
        0.99,
    );
    let acks = quantile(
        records.iter().flat_map(|(_, r)| r.ack_ms.iter().copied()),
        0.99,
    );
    let bound = 1000.max(3 * acks);
    println!("slow client: others' p99 {others} ms (ack p99 {acks} ms, bound {bound} ms); server RSS {rss_before} KiB → {rss_during} KiB while stalled");
    assert!(
        others < bound,
        "others' p99 {others} ms while one client stalled (ack p99 {acks} ms)"
    );
    // The scenario really made it fall behind: its queue overflowed (resync) or it was closed.
    println!("slow client: lagged {lagged}, closed as slow {slow_closed}");
    assert!(
        lagged + slow_closed > 0,
        "the stalled client never fell behind: make the traffic heavier"
    );
    assert!(
        rss_during < rss_before + 64 * 1024,
        "server memory grew by more than 64 MiB"
    );
}

fn rss_kib(pid: Option<u32>) -> u64 {
    pid.and_then(chatbus_testkit::rss_kib).unwrap_or(0)
}

/// Issue #11 item 4, a mass resume: `MASS_CLIENTS` receivers (default 200; the documented
/// measurement uses 2,000) in 20 rooms, all on instance 0, one sender per room on instances 1
/// and 2. Instance 0 is SIGKILLed mid-traffic; every receiver resumes on instance 1 or 2 with
/// `since` and must get every acknowledged message of its room exactly once, in the one order.
/// Prints the time from the kill until the last receiver is live again, and the log reads the
/// two survivors made for the catch-ups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_resume_after_an_instance_is_killed() {
    const ROOMS: usize = 20;
    let clients: usize = std::env::var("MASS_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let load = Load {
        sends: 40,
        every: Duration::from_millis(250),
        pad: 0,
    };
    let mut c = Cluster::start(3, &[]).await;
    let plan = |ports: Vec<u16>, room: usize, send: u64| Plan {
        ports,
        room: format!("mass-{room}"),
        send,
        every: load.every,
        stall: false,
        pad: load.pad,
    };
    let mut senders = Vec::new();
    for room in 0..ROOMS {
        let home = 1 + room % 2;
        senders.push(
            Participant::start(
                &format!("send-{room}"),
                plan(c.ports_from(home), room, load.sends),
            )
            .await,
        );
    }
    let mut receivers = Vec::new();
    for i in 0..clients {
        // Homed on instance 0; half fail over to 1, half to 2.
        let (s, a, b) = (
            c.servers[0].port(),
            c.servers[1].port(),
            c.servers[2].port(),
        );
        let ports = if i % 2 == 0 {
            vec![s, a, b]
        } else {
            vec![s, b, a]
        };
        receivers.push((
            i % ROOMS,
            Participant::start(&format!("recv-{i}"), plan(ports, i % ROOMS, 0)).await,
        ));
    }
    let reads_before: u64 = {
        let mut n = 0;
        for s in &c.servers[1..] {
            n += metric(&s.metrics().await, "chatbus_replay_reads_total");
        }
        n
    };
    go(&senders);
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A receiver is live again once it got a message its room's sender had not had
    // acknowledged at the kill: it has reconnected, caught up what it missed (messages of a room
    // arrive in order) and receives new ones. (Senders send every 250 ms: the granularity.)
    let acked_at_kill: Vec<usize> = senders.iter().map(Participant::acked).collect();
    c.servers[0].kill().await;
    let killed = Instant::now();
    let mut live_after = None;
    while killed.elapsed() < Duration::from_secs(120) {
        if receivers
            .iter()
            .all(|(room, r)| r.received() > acked_at_kill[*room])
        {
            live_after = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut reads_after = 0;
    for s in &c.servers[1..] {
        reads_after += metric(&s.metrics().await, "chatbus_replay_reads_total");
    }
    // Settle per room: its sender and its receivers.
    let mut by_room: Vec<Vec<Participant>> = (0..ROOMS).map(|_| Vec::new()).collect();
    for (room, s) in senders.into_iter().enumerate() {
        by_room[room].push(s);
    }
    for (room, r) in receivers {
        by_room[room].push(r);
    }
    let mut worst = Score::default();
    let mut all = Vec::new();
    for (room, ps) in by_room.into_iter().enumerate() {
        let records = settle(ps, load.sends as usize, Duration::from_secs(60)).await;
        let score = Score::of(&records);
        score.assert_perfect(&format!("mass resume, room {room}"));
        worst.acked += score.acked;
        all.extend(records);
    }
    let moved = all
        .iter()
        .filter(|(n, r)| n.starts_with("recv-") && r.connections > 1)
        .count();
    println!(
        "mass resume: {clients} clients in {ROOMS} rooms | last one live {:?} after the kill | \
         catch-up log reads {} | acked {} | reconnected {moved}",
        live_after,
        reads_after - reads_before,
        worst.acked,
    );
    assert!(
        live_after.is_some(),
        "every receiver caught up within 120 s of the kill"
    );
    assert_eq!(moved, clients, "every receiver reconnected elsewhere");
    // One read serves the members resuming a room together: far fewer reads than catch-ups
    // (each catch-up made at least one of its own before reads were shared).
    let reads = reads_after - reads_before;
    assert!(
        reads > 0 && reads as usize <= clients / 2,
        "{reads} log reads for {clients} catch-ups"
    );
}
