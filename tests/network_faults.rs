//! Network faults, not only kills: a TCP fault proxy ([`FaultProxy`]) between
//! `chat-server --broker dual` instances and Redis or Tansu cuts, blackholes or slows the link
//! while WebSocket clients send numbered messages. Every client is then scored like in
//! `tests/faults.rs` ([`Score`]): no acknowledged message missing, nothing twice, one order for
//! everybody, per-sender order kept.
//!
//! - `redis_cut_from_one_instance_only`: one instance loses Redis (connections closed, new ones
//!   refused) while the others keep it; that instance delivers from the Kafka tail and the
//!   others fill its messages from the log.
//! - `redis_blackholed`: Redis accepts connections and never answers, for every instance; each
//!   notices within `2 x ping_interval + command_timeout` and no send waits longer than
//!   `command_timeout` plus the Kafka ack.
//! - `kafka_answering_300ms_late`: every Kafka request is answered 300 ms late (150 ms each
//!   way); sends are slower, nothing is lost.
//!
//! The promises and figures are in the fault table of docs/ARCHITECTURE.md.
//!
//! Run with `cargo build --example chat-server && cargo test --test network_faults --
//! --test-threads=1 --nocapture` (needs `redis-server` and `tansu` on `PATH` or in
//! `~/.cargo/bin`; `cargo test --test network_faults` alone does not rebuild the example it
//! runs).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use chatbus_redis::RedisConfig;
use chatbus_testkit::chat::{
    metric, quantile, settle, ChatServer, Participant, Plan, Record, Score,
};
use chatbus_testkit::free_port;
use chatbus_testkit::proxy::{FaultProxy, Mode};
use chatbus_testkit::redis::RedisServer;
use chatbus_testkit::tansu::Tansu;

/// One cluster at a time even under the parallel test runner: two on 2 cores would measure the
/// machine, not the fault.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Time a Kafka acknowledgement may take on a loaded test machine, on top of the Redis
/// timeout in the blackhole bound. Measured: p99 well under 100 ms on a quiet machine.
const KAFKA_ACK_SLACK: Duration = Duration::from_millis(1500);

/// What each sender sends.
#[derive(Debug, Clone, Copy)]
struct Load {
    sends: u64,
    every: Duration,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn dual_env(redis_url: String, bootstrap: String, topic: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CHATBUS_REDIS_URL", redis_url),
        ("CHATBUS_KAFKA_BROKERS", bootstrap),
        ("CHATBUS_KAFKA_TOPIC", topic.to_owned()),
    ]
}

async fn start_server(env: &[(&'static str, String)]) -> ChatServer {
    ChatServer::start(&["--broker", "dual"], env).await
}

/// One sender and one pure receiver homed on each instance (trying the others in turn when
/// theirs fails).
async fn participants(servers: &[ChatServer], room: &str, load: Load) -> Vec<Participant> {
    let n = servers.len();
    let mut v = Vec::new();
    for home in 0..n {
        let plan = |send| Plan {
            ports: (0..n).map(|i| servers[(home + i) % n].port()).collect(),
            room: room.to_owned(),
            send,
            every: load.every,
            stall: false,
            pad: 0,
        };
        v.push(Participant::start(&format!("recv{home}"), plan(0)).await);
        v.push(Participant::start(&format!("send{home}"), plan(load.sends)).await);
    }
    v
}

fn go(participants: &[Participant]) {
    for p in participants {
        p.start_sending();
    }
}

/// The instance's current `chatbus_dual_mode` (a scrape runs the broker's health check).
async fn dual_mode(server: &ChatServer) -> &'static str {
    let text = server.metrics().await;
    ["dual", "durable-only", "fast-only", "down"]
        .into_iter()
        .find(|m| metric(&text, &format!("chatbus_dual_mode{{mode=\"{m}\"}}")) == 1)
        .unwrap_or("unknown")
}

async fn counter(server: &ChatServer, name: &str) -> u64 {
    metric(&server.metrics().await, name)
}

/// Polls `f` every 100 ms until it holds, or `limit` passes; how long it took, if it held.
async fn time_until<F, Fut>(limit: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn send_errors(records: &[(String, Record)]) -> u64 {
    records
        .iter()
        .flat_map(|(_, r)| r.send_errors.values())
        .sum()
}

fn acks_ms(records: &[(String, Record)]) -> impl Iterator<Item = u64> + '_ {
    records.iter().flat_map(|(_, r)| r.ack_ms.iter().copied())
}

fn report(scenario: &str, records: &[(String, Record)], score: &Score) {
    let received: usize = records.iter().map(|(_, r)| r.received.len()).sum();
    let unanswered: u64 = records.iter().map(|(_, r)| r.unanswered).sum();
    let latency = || {
        records
            .iter()
            .flat_map(|(_, r)| r.received.iter().map(|m| m.latency_ms))
    };
    println!(
        "{scenario}: acked {} | received {received} | missing {} | duplicated {} | reordered {} \
         | send errors {} | unanswered {unanswered} | ack p50 {} ms p99 {} ms max {} ms | \
         delivery p50 {} ms p99 {} ms",
        score.acked,
        score.total_missing(),
        score.total_duplicated(),
        score.reordered.len(),
        send_errors(records),
        quantile(acks_ms(records), 0.5),
        quantile(acks_ms(records), 0.99),
        acks_ms(records).max().unwrap_or(0),
        quantile(latency(), 0.5),
        quantile(latency(), 0.99),
    );
}

/// Every sender's every send was acknowledged: none refused, none left without an answer.
fn assert_all_acked(scenario: &str, records: &[(String, Record)], load: Load) {
    for (name, r) in records.iter().filter(|(n, _)| n.starts_with("send")) {
        assert!(
            r.acked.len() as u64 == load.sends && r.send_errors.is_empty() && r.unanswered == 0,
            "{scenario}: {name} had {} of {} sends acked, errors {:?}, unanswered {}",
            r.acked.len(),
            load.sends,
            r.send_errors,
            r.unanswered
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cut_from_one_instance_only() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let tansu = Tansu::start().await;
    let proxy = FaultProxy::start(loopback(redis.port())).await;
    let topic = unique("netfaults-cut");
    let through_proxy = format!("redis://:{}@{}/", redis.password(), proxy.addr());
    let mut servers = vec![start_server(&dual_env(through_proxy, tansu.bootstrap(), &topic)).await];
    for _ in 1..3 {
        servers.push(start_server(&dual_env(redis.url(), tansu.bootstrap(), &topic)).await);
    }
    let load = Load {
        sends: 150,
        every: Duration::from_millis(60),
    };
    let ps = participants(&servers, "netfaults-cut", load).await;
    go(&ps);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let via_durable_before = counter(&servers[0], "chatbus_dual_via_durable_total").await;
    let gaps_before: u64 = [
        counter(&servers[1], "chatbus_dual_gaps_filled_total").await,
        counter(&servers[2], "chatbus_dual_gaps_filled_total").await,
    ]
    .iter()
    .sum();

    // The cut: instance 0's Redis connections are closed and its reconnects refused.
    proxy.set(Mode::Drop);
    let cut = Instant::now();
    let detected = time_until(Duration::from_secs(10), || async {
        dual_mode(&servers[0]).await == "durable-only"
    })
    .await;
    let others = [dual_mode(&servers[1]).await, dual_mode(&servers[2]).await];
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(cut.elapsed())).await;
    let via_durable_during = counter(&servers[0], "chatbus_dual_via_durable_total").await;
    proxy.set(Mode::Pass);
    let back = time_until(Duration::from_secs(15), || async {
        dual_mode(&servers[0]).await == "dual"
    })
    .await;

    let records = settle(ps, 3 * load.sends as usize, Duration::from_secs(60)).await;
    let score = Score::of(&records);
    report("redis cut from instance 0", &records, &score);
    let gaps_after: u64 = [
        counter(&servers[1], "chatbus_dual_gaps_filled_total").await,
        counter(&servers[2], "chatbus_dual_gaps_filled_total").await,
    ]
    .iter()
    .sum();
    println!(
        "redis cut: instance 0 durable-only after {detected:?}, others {others:?}, back to dual \
         {back:?} after the link returned; instance 0 via the Kafka tail during the cut +{}; \
         gaps filled from the log on the others +{}; proxy {:?}",
        via_durable_during - via_durable_before,
        gaps_after - gaps_before,
        proxy.stats()
    );
    score.assert_perfect("redis cut from one instance");
    assert_all_acked("redis cut from one instance", &records, load);
    assert!(detected.is_some(), "instance 0 never reported durable-only");
    assert_eq!(
        others,
        ["dual", "dual"],
        "the instances that still reach Redis stay on both paths"
    );
    assert!(back.is_some(), "instance 0 never went back to dual");
    // The scenario did what it says: instance 0 delivered from the log during the cut, and its
    // own messages (not on Redis then) reached the others through the log as gap fills.
    assert!(via_durable_during > via_durable_before);
    assert!(gaps_after > gaps_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_blackholed() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // The bounds come from the Redis broker's configuration (the chat-server uses its defaults):
    // - a send: the fast copy's PUBLISH fails after `command_timeout` (2 s); from then on the
    //   DualBus sends fast copies in the background, so no send waits for Redis again. A send
    //   is answered within `command_timeout` plus its Kafka ack.
    // - the pub/sub connection: a PING goes out once nothing came for `ping_interval` (5 s)
    //   and is given up after `command_timeout` (chatbus-redis/src/subscriber.rs, `session`):
    //   lost within `ping_interval + command_timeout` (7 s) of the last message. (With the
    //   fixed 5 s tick it had before, the PING went out up to two intervals after the last
    //   message: measured 9.2 to 10.0 s, bound 12 s.) Meanwhile nothing is late: the merger
    //   delivers from the Kafka tail whatever the fast path does not bring.
    // - back: a reconnect attempt caught by the blackhole hangs for `connect_timeout` (5 s),
    //   then waits at most `backoff_max` (2 s) before the next.
    let cfg = RedisConfig::default();
    let detect_bound = cfg.ping_interval + cfg.command_timeout;
    let ack_bound = cfg.command_timeout + KAFKA_ACK_SLACK;
    let back_bound = cfg.connect_timeout + cfg.backoff_max + Duration::from_secs(3);
    // The blackhole lasts past the detection bound, so that every instance must notice it.
    let hold = detect_bound + Duration::from_secs(1);
    let redis = RedisServer::start().await;
    let tansu = Tansu::start().await;
    let proxy = FaultProxy::start(loopback(redis.port())).await;
    let topic = unique("netfaults-blackhole");
    let url = format!("redis://:{}@{}/", redis.password(), proxy.addr());
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(start_server(&dual_env(url.clone(), tansu.bootstrap(), &topic)).await);
    }
    // 20 s of traffic: 2 s before, 13 s during and 5 s after the blackhole.
    let load = Load {
        sends: 335,
        every: Duration::from_millis(60),
    };
    let ps = participants(&servers, "netfaults-blackhole", load).await;
    go(&ps);
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.set(Mode::Blackhole);
    let blackholed = Instant::now();
    // No scrapes until every instance has noticed: a scrape's health check (a PING on the
    // publishing connection) would switch the DualBus to background fast copies by itself, and
    // so hide how long a send waits without one.
    let lost_before: Vec<usize> = servers
        .iter()
        .map(|s| s.log().matches(LOST).count())
        .collect();
    let mut detected: Vec<Option<Duration>> = vec![None; servers.len()];
    let _ = time_until(hold, || {
        for (i, s) in servers.iter().enumerate() {
            if detected[i].is_none() && s.log().matches(LOST).count() > lost_before[i] {
                detected[i] = Some(blackholed.elapsed());
            }
        }
        let all = detected.iter().all(Option::is_some);
        async move { all }
    })
    .await;
    let mut modes = Vec::new();
    for s in &servers {
        modes.push(dual_mode(s).await);
    }
    let back_before: Vec<usize> = servers
        .iter()
        .map(|s| s.log().matches(BACK).count())
        .collect();
    tokio::time::sleep(hold.saturating_sub(blackholed.elapsed())).await;
    proxy.set(Mode::Pass);
    let back = time_until(back_bound, || {
        let all = servers
            .iter()
            .zip(&back_before)
            .all(|(s, &n)| s.log().matches(BACK).count() > n);
        async move { all }
    })
    .await;
    let records = settle(ps, 3 * load.sends as usize, Duration::from_secs(60)).await;
    let score = Score::of(&records);
    report("redis blackholed", &records, &score);
    let slowest = Duration::from_millis(acks_ms(&records).max().unwrap_or(0));
    println!(
        "redis blackholed: pub/sub loss detected after {detected:?} (design {detect_bound:?}, \
         asserted {hold:?} for the log poll and a loaded machine), \
         modes then {modes:?}; all reconnected {back:?} after the link returned (bound \
         {back_bound:?}); slowest ack {slowest:?} (bound {ack_bound:?}); proxy {:?}",
        proxy.stats()
    );
    score.assert_perfect("redis blackholed");
    assert_all_acked("redis blackholed", &records, load);
    for (i, d) in detected.iter().enumerate() {
        assert!(
            d.is_some_and(|d| d <= hold),
            "instance {i} noticed the hung Redis after {d:?}, bound {hold:?} (design \
             {detect_bound:?})"
        );
    }
    assert_eq!(
        modes, ["durable-only"; 3],
        "every instance reports durable-only while Redis hangs"
    );
    assert!(
        slowest <= ack_bound,
        "a send waited {slowest:?} for its ack, bound {ack_bound:?}"
    );
    assert!(
        back.is_some(),
        "not every instance reconnected to Redis within {back_bound:?}"
    );
}

/// What the Redis broker logs when it gives up on its pub/sub connection, and when it is back.
const LOST: &str = "redis pub/sub connection lost";
const BACK: &str = "redis pub/sub reconnected";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_answering_300ms_late() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // 150 ms each way: every Kafka request (produce, fetch, metadata) is answered 300 ms late.
    let one_way = Duration::from_millis(150);
    let redis = RedisServer::start().await;
    // Tansu advertises the proxy, so that every connection of the Kafka clients goes through
    // it, not only the bootstrap one.
    let tansu_port = free_port();
    let proxy = FaultProxy::start(loopback(tansu_port)).await;
    let _tansu = Tansu::start_advertising(tansu_port, proxy.addr()).await;
    let topic = unique("netfaults-kafka-slow");
    let env = dual_env(redis.url(), proxy.addr().to_string(), &topic);
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(start_server(&env).await);
    }
    // A session handles its frames one at a time, so a sender waits for each ack: 2.5 sends/s
    // stay under what a 300 ms round trip allows, and the acks measure the latency rather
    // than a queue of sends.
    let load = Load {
        sends: 50,
        every: Duration::from_millis(400),
    };
    let ps = participants(&servers, "netfaults-kafka-slow", load).await;
    let through = proxy.stats();
    go(&ps);
    // A baseline first: 10 acks per sender without the delay, then the delay for the rest.
    let senders: Vec<&Participant> = ps.iter().filter(|p| p.name.starts_with("send")).collect();
    let baseline = time_until(Duration::from_secs(30), || {
        let ready = senders.iter().all(|p| p.acked() >= 10);
        async move { ready }
    })
    .await;
    assert!(baseline.is_some(), "the senders did not get 10 acks each");
    proxy.set(Mode::Delay(one_way));
    let before: Vec<(String, usize)> = senders
        .iter()
        .map(|p| (p.name.clone(), p.acked()))
        .collect();
    let records = settle(ps, 2 * load.sends as usize, Duration::from_secs(90)).await;
    let score = Score::of(&records);
    report("kafka +300 ms", &records, &score);
    // Split each sender's acks at the switch (a session answers its sends in order).
    let (mut fast, mut slow) = (Vec::new(), Vec::new());
    for (name, k) in &before {
        if let Some((_, r)) = records.iter().find(|(n, _)| n == name) {
            fast.extend(r.ack_ms.iter().take(*k).copied());
            slow.extend(r.ack_ms.iter().skip(*k).copied());
        }
    }
    let q = |v: &[u64], q| quantile(v.iter().copied(), q);
    let (p50, p99) = (q(&slow, 0.5), q(&slow, 0.99));
    println!(
        "kafka +300 ms: ack p50 {} ms, p99 {} ms without the delay ({} acks); p50 {p50} ms, p99 \
         {p99} ms with it ({} acks); proxy {:?}",
        q(&fast, 0.5),
        q(&fast, 0.99),
        fast.len(),
        slow.len(),
        proxy.stats()
    );
    score.assert_perfect("kafka +300 ms");
    assert_all_acked("kafka +300 ms", &records, load);
    assert!(
        through.upstream_connections >= 2,
        "the instances' Kafka connections go through the proxy: {through:?}"
    );
    // The delay really applied to the produce path: an ack needs at least one round trip.
    assert!(
        p50 >= 2 * one_way.as_millis() as u64 && p50 > q(&fast, 0.5),
        "ack p50 {p50} ms, below the added 300 ms: the delay did not apply"
    );
}
