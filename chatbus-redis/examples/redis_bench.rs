//! Benchmark of the Redis broker: publish→receive latency between two broker instances, and
//! how many messages per second one instance publishes, next to raw `redis-benchmark`
//! `PUBLISH` throughput on the same server.
//!
//! Run with:
//!
//! ```sh
//! cargo run --release -p chatbus-redis --example redis_bench
//! ```
//!
//! It starts a private `redis-server` (password-protected, no persistence, on a free loopback
//! port) through `chatbus-testkit`; set `CHATBUS_REDIS_URL` to measure an existing server
//! instead (then `redis-benchmark` is skipped). Sizes can be changed with `BENCH_LATENCY_N`
//! (default 20,000 sequential round trips), `BENCH_THROUGHPUT_N` (default 200,000 messages) and
//! `BENCH_CONCURRENCY` (default 256 publishes in flight). Payloads are 64 bytes (about 100
//! bytes encoded).

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatbus_core::{Broker, Envelope, Interest, Room, Subscription};
use chatbus_redis::{RedisBroker, RedisConfig};
use chatbus_testkit::redis::RedisServer;
use futures::StreamExt;
use hdrhistogram::Histogram;

const PAYLOAD: usize = 64;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A payload whose first 8 bytes are the send time in ns since `origin`.
fn payload(origin: Instant) -> Bytes {
    let mut v = vec![b'x'; PAYLOAD];
    let ns = u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
    v[..8].copy_from_slice(&ns.to_be_bytes());
    Bytes::from(v)
}

fn sent_ns(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

fn histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, 60_000_000_000, 3) {
        Ok(h) => h,
        Err(e) => panic!("histogram: {e}"),
    }
}

fn report(label: &str, h: &Histogram<u64>) {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{label}: n={} p50={:.1}µs p90={:.1}µs p99={:.1}µs p99.9={:.1}µs max={:.1}µs",
        h.len(),
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0
    );
}

/// Receives `n` messages (or gives up after 30 s of silence) and records their latency.
async fn receive(mut sub: Subscription, n: usize, origin: Instant) -> (Histogram<u64>, usize) {
    let mut h = histogram();
    let mut errors = 0;
    let mut got = 0;
    let mut batch = Vec::with_capacity(256);
    while got < n {
        batch.clear();
        match tokio::time::timeout(Duration::from_secs(30), sub.recv_many(&mut batch, 256)).await {
            Err(_) | Ok(0) => break,
            Ok(_) => {}
        }
        let now = u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        for item in batch.drain(..) {
            match item {
                Ok(env) => {
                    got += 1;
                    if let Some(sent) = sent_ns(&env.payload) {
                        let _ = h.record(now.saturating_sub(sent).max(1));
                    }
                }
                Err(_) => errors += 1,
            }
        }
    }
    (h, errors)
}

async fn connect(config: RedisConfig) -> RedisBroker {
    match RedisBroker::connect(config).await {
        Ok(b) => b,
        Err(e) => panic!("cannot connect: {e}"),
    }
}

async fn subscribe(b: &RedisBroker, room: &Room) -> Subscription {
    match b.subscribe(Interest::room(room.clone())).await {
        Ok(s) => s,
        Err(e) => panic!("subscribe: {e}"),
    }
}

async fn latency(a: &RedisBroker, b: &RedisBroker, n: usize, label: &str) {
    let room = Room::new(format!("lat.{label}")).expect("valid room name");
    let origin = Instant::now();
    let rx = tokio::spawn(receive(subscribe(b, &room).await, n, origin));
    for _ in 0..n {
        if let Err(e) = a
            .publish(&Envelope::new(room.clone(), payload(origin)))
            .await
        {
            panic!("publish: {e}");
        }
    }
    let (h, errors) = match rx.await {
        Ok(r) => r,
        Err(e) => panic!("receiver: {e}"),
    };
    report(
        &format!("latency, one publish at a time ({label}), publish→receive between two instances"),
        &h,
    );
    if errors > 0 || (h.len() as usize) < n {
        println!("  !! received {} of {n}, {errors} errors", h.len());
    }
}

async fn throughput(a: &RedisBroker, b: &RedisBroker, n: usize, concurrency: usize, label: &str) {
    let room = Room::new(format!("tput.{label}")).expect("valid room name");
    let origin = Instant::now();
    let rx = tokio::spawn(receive(subscribe(b, &room).await, n, origin));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|_| {
            let env = Envelope::new(room.clone(), payload(origin));
            let failed = failed.clone();
            async move {
                if a.publish(&env).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect::<()>()
        .await;
    let took = start.elapsed();
    let (h, errors) = match rx.await {
        Ok(r) => r,
        Err(e) => panic!("receiver: {e}"),
    };
    let received_in = start.elapsed();
    println!(
        "throughput ({label}): {n} publishes, {concurrency} in flight, from one instance: {:.0} msg/s \
         ({took:.2?}); the other instance received {} in {received_in:.2?} ({:.0} msg/s), \
         {} publish errors, {errors} subscription errors",
        n as f64 / took.as_secs_f64(),
        h.len(),
        h.len() as f64 / received_in.as_secs_f64(),
        failed.load(Ordering::Relaxed),
    );
    report(&format!("  latency under that load ({label})"), &h);
}

fn redis_benchmark(server: &RedisServer, channel: &str, n: usize) {
    let program = chatbus_testkit::require_program(
        "redis-benchmark",
        &[],
        "Install it with `apt-get install redis-tools` (it comes with redis-server).",
    );
    let payload = "x".repeat(100);
    for (pipeline, clients) in [("16", "50"), ("1", "50")] {
        let args = [
            "-h",
            "127.0.0.1",
            "-p",
            &server.port().to_string(),
            "-a",
            server.password(),
            "-n",
            &n.to_string(),
            "-P",
            pipeline,
            "-c",
            clients,
            "-q",
            "PUBLISH",
            channel,
            &payload,
        ];
        let shown: Vec<&str> = args
            .iter()
            .map(|a| {
                if *a == server.password() {
                    "<password>"
                } else {
                    a
                }
            })
            .map(|a| {
                if a.len() > 20 {
                    "<100-byte payload>"
                } else {
                    a
                }
            })
            .collect();
        match Command::new(&program).args(args).output() {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                let last = text
                    .split('\r')
                    .rfind(|l| !l.trim().is_empty())
                    .unwrap_or("");
                println!(
                    "redis-benchmark {}:\n  {}",
                    shown.join(" "),
                    last.trim().replace(&payload, "<payload>")
                );
            }
            Err(e) => println!("redis-benchmark failed to run: {e}"),
        }
    }
}

#[tokio::main]
async fn main() {
    let latency_n = env_usize("BENCH_LATENCY_N", 20_000);
    let throughput_n = env_usize("BENCH_THROUGHPUT_N", 200_000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 256);
    let server = match std::env::var("CHATBUS_REDIS_URL") {
        Ok(_) => None,
        Err(_) => Some(RedisServer::start().await),
    };
    let base = match &server {
        Some(s) => RedisConfig::default().with_url(s.url()),
        None => RedisConfig::from_env().expect("CHATBUS_REDIS_* environment"),
    }
    .with_prefix("bench")
    .with_subscriber_capacity(1 << 20)
    .with_command_timeout(Duration::from_secs(10));
    println!(
        "machine: {} cores; redis: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        match &server {
            Some(s) => format!("private redis-server on 127.0.0.1:{}", s.port()),
            None => "CHATBUS_REDIS_URL".to_owned(),
        }
    );
    for history in [0, 1000] {
        let label = if history == 0 {
            "pubsub"
        } else {
            "history-1000"
        };
        let a = connect(base.clone().with_history_len(history)).await;
        let b = connect(base.clone().with_history_len(history)).await;
        // Warm up connections and the script cache.
        latency(&a, &b, 1000.min(latency_n), &format!("warmup-{history}")).await;
        latency(
            &a,
            &b,
            latency_n,
            if history == 0 { "pubsub" } else { "history" },
        )
        .await;
        throughput(&a, &b, throughput_n, concurrency, label).await;
    }
    if let Some(server) = &server {
        // Raw Redis for comparison, publishing to a channel that one broker instance subscribes
        // to (so Redis does the same one-subscriber fan-out; that instance drops the frames as
        // undecodable).
        let b = connect(base.clone()).await;
        let room = Room::new("raw").expect("valid room name");
        let _sub = subscribe(&b, &room).await;
        redis_benchmark(server, "bench:{raw}", throughput_n);
        println!(
            "  (the subscribed broker instance read {} raw frames)",
            b.stats().received
        );
    }
}
