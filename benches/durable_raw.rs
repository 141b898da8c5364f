//! The durable publish path beside the raw clients (issue #16, item 8): publish→ack latency
//! and throughput of chatbus's brokers against raw rdkafka and raw Redis, on one Tansu and one
//! redis-server that the caller started (`scripts/bench/durable_raw.sh` starts both on free
//! loopback ports and runs this).
//!
//! Every case publishes the same 100-byte payloads to the same 16 rooms (message `i` to room
//! `i % 16`; on Kafka key = room name, partition = `murmur2(room) % 8`, the partition
//! `KafkaBroker` picks, used for the raw producer too), with the same number of publishes in
//! flight (each one a task that awaits its publish, then takes the next):
//!
//! | case | what is timed |
//! |---|---|
//! | `rdkafka` | raw `FutureProducer::send` (the librdkafka settings `KafkaBroker`'s producer uses, set key by key: its builder is crate-private) |
//! | `redis` | raw `PUBLISH` on a multiplexed connection |
//! | `kafka-broker` | `KafkaBroker::publish` |
//! | `redis-broker` | `RedisBroker::publish`, history window off |
//! | `dual` | `DualBus::publish` (RedisBroker with history off + KafkaBroker, `DualConfig::default()`, as `chat-server --broker dual` builds it) |
//! | `rdkafka+redis` | raw `send`, then raw `PUBLISH` of the same payload: the raw clients doing what the dual path does |
//! | `kb+rb` | `KafkaBroker::publish`, then `RedisBroker::publish` of the envelope with its cursor, by hand: DualBus's two stages without DualBus |
//!
//! For the two-stage cases the table also gives the second stage alone (the Redis publish
//! after the Kafka ack), to compare with a Redis publish on its own.
//!
//! The cases run one after the other, all of them once per round (every other round in the
//! reverse order), so that a shared machine's load spreads over every case; each Kafka case has its own topic (8 partitions), created by
//! `KafkaBroker::connect` before the first round. No subscriber is attached anywhere (publish
//! only: no DualBus merger, no Kafka tail consumer).
//!
//! A plain binary (`harness = false`): criterion's many short samples of one future do not
//! fit a fixed count of concurrent publishes against external servers, and the output is a
//! table for `docs/BENCHMARKS.md`. Run it with the script, or by hand:
//!
//! ```text
//! cargo bench --bench durable_raw -- --redis-url redis://127.0.0.1:PORT \
//!     --kafka-brokers 127.0.0.1:PORT [--tansu-pid PID --redis-pid PID]
//! ```

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatbus_core::{Broker, DualBus, DualConfig, Envelope, Room};
use chatbus_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use chatbus_kafka::rdkafka::util::Timeout;
use chatbus_kafka::{KafkaBroker, KafkaConfig};
use chatbus_redis::redis;
use chatbus_redis::{RedisBroker, RedisConfig};
use clap::Parser;
use hdrhistogram::Histogram;

/// Arguments (also from the environment, for the script).
#[derive(Debug, Parser)]
#[command(about = "chatbus's durable publish path beside raw rdkafka and raw Redis")]
struct Args {
    /// The redis-server to publish to.
    #[arg(long, env = "DURABLE_RAW_REDIS_URL")]
    redis_url: String,
    /// Tansu (or any Kafka) bootstrap servers.
    #[arg(long, env = "DURABLE_RAW_KAFKA_BROKERS")]
    kafka_brokers: String,
    /// Publishes per case and concurrency, per round.
    #[arg(long, env = "DURABLE_RAW_COUNT", default_value_t = 2000)]
    count: usize,
    /// Publishes in flight, comma separated.
    #[arg(
        long,
        env = "DURABLE_RAW_INFLIGHT",
        default_value = "1,16",
        value_delimiter = ','
    )]
    inflight: Vec<usize>,
    /// Rounds over every case (the figures are medians over rounds, latencies from every
    /// round's publishes together).
    #[arg(long, env = "DURABLE_RAW_ROUNDS", default_value_t = 8)]
    rounds: usize,
    /// Untimed publishes per case before its first round (connections, producer id, leaders).
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Rooms the messages are spread over.
    #[arg(long, default_value_t = 16)]
    rooms: usize,
    /// Prefix of the Kafka topics (one per Kafka case); default: a fresh one per run.
    #[arg(long)]
    topic_prefix: Option<String>,
    /// Tansu's pid, to report its CPU per case (from /proc/PID/stat).
    #[arg(long, env = "DURABLE_RAW_TANSU_PID")]
    tansu_pid: Option<u32>,
    /// redis-server's pid, likewise.
    #[arg(long, env = "DURABLE_RAW_REDIS_PID")]
    redis_pid: Option<u32>,
    /// Run only these cases (names as in the table, comma separated), e.g. to profile one.
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Write the tables (Markdown) to this file as well as stdout.
    #[arg(long, env = "DURABLE_RAW_OUT")]
    out: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    RawKafka,
    RawRedis,
    KafkaBroker,
    RedisBroker,
    Dual,
    RawBoth,
    BrokersByHand,
}

const CASES: [Case; 7] = [
    Case::RawKafka,
    Case::RawRedis,
    Case::KafkaBroker,
    Case::RedisBroker,
    Case::Dual,
    Case::RawBoth,
    Case::BrokersByHand,
];

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::RawKafka => "rdkafka",
            Case::RawRedis => "redis",
            Case::KafkaBroker => "kafka-broker",
            Case::RedisBroker => "redis-broker",
            Case::Dual => "dual",
            Case::RawBoth => "rdkafka+redis",
            Case::BrokersByHand => "kb+rb",
        }
    }
}

/// Everything the cases publish with, connected once.
struct Clients {
    raw_producer: FutureProducer,
    raw_topic: String,
    raw_redis: redis::aio::MultiplexedConnection,
    kafka: KafkaBroker,
    redis: RedisBroker,
    dual: DualBus<RedisBroker, KafkaBroker>,
    /// Owns the raw topic (created through it) and gives the room → partition map.
    raw_topic_owner: KafkaBroker,
    rooms: Vec<Room>,
    payload: Bytes,
}

fn kafka_config(args: &Args, topic: String) -> KafkaConfig {
    KafkaConfig::new(args.kafka_brokers.clone())
        .with_topic(topic)
        // Publish only: no reader is needed at connect.
        .with_probe_epochs_at_connect(false)
}

/// A raw rdkafka producer with exactly `KafkaBroker`'s settings
/// ([`KafkaConfig::producer_client_config`]).
fn raw_producer(config: &KafkaConfig) -> FutureProducer {
    config
        .producer_client_config()
        .set("client.id", "durable-raw")
        .create()
        .expect("raw rdkafka producer (the settings are fixed)")
}

impl Clients {
    async fn connect(args: &Args) -> Self {
        let prefix = args.topic_prefix.clone().unwrap_or_else(|| {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("durable-raw-{secs}")
        });
        let raw_topic = format!("{prefix}-raw");
        let raw_topic_owner = KafkaBroker::connect(kafka_config(args, raw_topic.clone()))
            .await
            .expect("create the raw topic through KafkaBroker (is Tansu up?)");
        let raw_producer = raw_producer(raw_topic_owner.config());
        let raw_redis = redis::Client::open(args.redis_url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("raw redis connection (is redis-server up?)");
        let kafka = KafkaBroker::connect(kafka_config(args, format!("{prefix}-kafka")))
            .await
            .expect("KafkaBroker::connect");
        let redis_config = || {
            RedisConfig::default()
                .with_url(args.redis_url.clone())
                .with_history_len(0)
        };
        let redis = RedisBroker::connect(redis_config())
            .await
            .expect("RedisBroker::connect");
        // As chat-server --broker dual: its own RedisBroker and KafkaBroker.
        let dual = DualBus::new(
            RedisBroker::connect(redis_config())
                .await
                .expect("RedisBroker::connect (dual)"),
            KafkaBroker::connect(kafka_config(args, format!("{prefix}-dual")))
                .await
                .expect("KafkaBroker::connect (dual)"),
            DualConfig::default(),
        );
        let rooms = (0..args.rooms)
            .map(|i| Room::new(format!("room-{i:02}")).expect("room name"))
            .collect();
        Self {
            raw_producer,
            raw_topic,
            raw_redis,
            kafka,
            redis,
            dual,
            raw_topic_owner,
            rooms,
            payload: Bytes::from(vec![b'x'; args.payload]),
        }
    }

    async fn raw_send(&self, room: &Room) -> Result<(), String> {
        let partition = i32::try_from(self.raw_topic_owner.partition_of(room)).unwrap_or(0);
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
        let record = FutureRecord::to(&self.raw_topic)
            .key(room.as_str())
            .payload(&self.payload[..])
            .partition(partition)
            .timestamp(ts);
        self.raw_producer
            .send(record, Timeout::After(Duration::from_secs(5)))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.to_string())
    }

    async fn raw_publish(&self, room: &Room) -> Result<(), String> {
        let mut conn = self.raw_redis.clone();
        redis::cmd("PUBLISH")
            .arg(format!("raw:{{{}}}", room.as_str()))
            .arg(&self.payload[..])
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// One publish of `case` to `room`, from the call to the ack. For the two-stage cases, the
    /// time of the second stage (the Redis publish after the Kafka ack).
    async fn publish(&self, case: Case, room: &Room) -> Result<Option<Duration>, String> {
        let env = || Envelope::new(room.clone(), self.payload.clone());
        let err = |e: chatbus_core::Error| e.to_string();
        let one = |r: chatbus_core::Result<chatbus_core::Receipt>| r.map(|_| None).map_err(err);
        match case {
            Case::RawKafka => self.raw_send(room).await.map(|()| None),
            Case::RawRedis => self.raw_publish(room).await.map(|()| None),
            Case::KafkaBroker => one(self.kafka.publish(&env()).await),
            Case::RedisBroker => one(self.redis.publish(&env()).await),
            Case::Dual => one(self.dual.publish(&env()).await),
            Case::RawBoth => {
                self.raw_send(room).await?;
                let t = Instant::now();
                self.raw_publish(room).await?;
                Ok(Some(t.elapsed()))
            }
            Case::BrokersByHand => {
                let mut env = env();
                let receipt = self.kafka.publish(&env).await.map_err(err)?;
                env.cursor = receipt.cursor;
                let t = Instant::now();
                self.redis.publish(&env).await.map_err(err)?;
                Ok(Some(t.elapsed()))
            }
        }
    }
}

/// Latencies in µs, 1 µs to 60 s.
fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// utime + stime of a process, in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Linux's USER_HZ on x86-64 (what /proc/PID/stat counts in).
const TICKS_PER_SEC: f64 = 100.0;

struct Sample {
    secs: f64,
    hist: Histogram<u64>,
    /// The second stage of the two-stage cases (empty for the others).
    stage2: Histogram<u64>,
    errors: usize,
    /// CPU seconds of Tansu, redis-server and this process during the sample.
    cpu: [Option<f64>; 3],
}

async fn run(
    clients: &Arc<Clients>,
    case: Case,
    count: usize,
    inflight: usize,
    pids: &[Option<String>; 3],
) -> Sample {
    let next = Arc::new(AtomicUsize::new(0));
    let before: Vec<Option<u64>> = pids
        .iter()
        .map(|p| p.as_deref().and_then(cpu_ticks))
        .collect();
    let start = Instant::now();
    let workers: Vec<_> = (0..inflight)
        .map(|_| {
            let (clients, next) = (clients.clone(), next.clone());
            tokio::spawn(async move {
                let mut hist = new_hist();
                let mut stage2 = new_hist();
                let mut errors = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let room = &clients.rooms[i % clients.rooms.len()];
                    let t = Instant::now();
                    match clients.publish(case, room).await {
                        Ok(second) => {
                            hist.saturating_record(micros(t.elapsed()));
                            if let Some(d) = second {
                                stage2.saturating_record(micros(d));
                            }
                        }
                        Err(e) => {
                            if errors == 0 {
                                eprintln!("{}: publish failed: {e}", case.name());
                            }
                            errors += 1;
                        }
                    }
                }
                (hist, stage2, errors)
            })
        })
        .collect();
    let (mut hist, mut stage2) = (new_hist(), new_hist());
    let mut errors = 0;
    for w in workers {
        let (h, h2, e) = w.await.expect("worker task");
        hist.add(&h).expect("same bounds");
        stage2.add(&h2).expect("same bounds");
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    let mut cpu = [None; 3];
    for (k, p) in pids.iter().enumerate() {
        if let (Some(b), Some(a)) = (before[k], p.as_deref().and_then(cpu_ticks)) {
            cpu[k] = Some(a.saturating_sub(b) as f64 / TICKS_PER_SEC);
        }
    }
    Sample {
        secs,
        hist,
        stage2,
        errors,
        cpu,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Per case and concurrency: every round's samples.
struct Results {
    samples: Vec<((Case, usize), Vec<Sample>)>,
}

impl Results {
    fn get(&self, case: Case, inflight: usize) -> &[Sample] {
        self.samples
            .iter()
            .find(|(k, _)| *k == (case, inflight))
            .map_or(&[], |(_, v)| v)
    }

    /// (median publishes/s over rounds, p50 µs, p99 µs over all rounds' publishes).
    fn figures(&self, case: Case, inflight: usize, count: usize) -> (f64, u64, u64) {
        let s = self.get(case, inflight);
        let rate = median(s.iter().map(|x| count as f64 / x.secs).collect());
        let mut all = new_hist();
        for x in s {
            all.add(&x.hist).expect("same bounds");
        }
        (
            rate,
            all.value_at_quantile(0.50),
            all.value_at_quantile(0.99),
        )
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn pct(cpu: Option<f64>, secs: f64) -> String {
    cpu.map_or("—".into(), |c| format!("{:.0}", 100.0 * c / secs))
}

fn report(args: &Args, results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} publishes per case and concurrency per round, {} rounds, {}-byte payloads, {} rooms \
         (8 partitions); publishes/s: median over rounds; p50/p99: all rounds' publishes; CPU: \
         % of one core over the case's rounds\n",
        args.count, args.rounds, args.payload, args.rooms
    );
    let _ = writeln!(
        out,
        "| case | in flight | publishes/s | p50 ms | p99 ms | max ms | 2nd stage p50 / p99 ms | tansu CPU % | redis CPU % | bench CPU % | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for &inflight in &args.inflight {
        for case in CASES.into_iter().filter(|c| selected(args, *c)) {
            let s = results.get(case, inflight);
            let (rate, p50, p99) = results.figures(case, inflight, args.count);
            let max = s.iter().map(|x| x.hist.max()).max().unwrap_or(0);
            let secs: f64 = s.iter().map(|x| x.secs).sum();
            let cpu = |k: usize| -> Option<f64> { s.iter().map(|x| x.cpu[k]).sum() };
            let errors: usize = s.iter().map(|x| x.errors).sum();
            let mut stage2 = new_hist();
            for x in s {
                stage2.add(&x.stage2).expect("same bounds");
            }
            let stage2 = if stage2.is_empty() {
                "—".to_string()
            } else {
                format!(
                    "{} / {}",
                    ms(stage2.value_at_quantile(0.5)),
                    ms(stage2.value_at_quantile(0.99))
                )
            };
            let _ = writeln!(
                out,
                "| {} | {inflight} | {rate:.0} | {} | {} | {} | {stage2} | {} | {} | {} | {errors} |",
                case.name(),
                ms(p50),
                ms(p99),
                ms(max),
                pct(cpu(0), secs),
                pct(cpu(1), secs),
                pct(cpu(2), secs),
            );
        }
    }
    let _ = writeln!(
        out,
        "\nRatios chatbus / raw (throughput: ≥ 0.91 is within 10 %; latency: ≤ 1.10 is)\n"
    );
    let _ = writeln!(
        out,
        "| ratio | in flight | publishes/s | p50 | p99 | publishes/s, per round: median [min–max] | p50, per round: median [min–max] |\n|---|---|---|---|---|---|---|"
    );
    let pairs = [
        (
            Case::KafkaBroker,
            Case::RawKafka,
            "(c)/(a) kafka-broker / rdkafka",
        ),
        (
            Case::RedisBroker,
            Case::RawRedis,
            "(d)/(b) redis-broker / redis",
        ),
        (Case::Dual, Case::RawKafka, "(e)/(a) dual / rdkafka"),
        (Case::Dual, Case::RawBoth, "dual / rdkafka+redis"),
        (Case::Dual, Case::BrokersByHand, "dual / kb+rb"),
    ];
    for &inflight in &args.inflight {
        for (num, den, label) in pairs {
            if !selected(args, num) || !selected(args, den) {
                continue;
            }
            let (r1, a1, b1) = results.figures(num, inflight, args.count);
            let (r0, a0, b0) = results.figures(den, inflight, args.count);
            // Each round's pair ran seconds apart, under the same load: their ratios spread
            // less than the ratio of two medians when the machine's load drifts.
            let (s1, s0) = (results.get(num, inflight), results.get(den, inflight));
            let rate_ratios: Vec<f64> = s1.iter().zip(s0).map(|(x, y)| y.secs / x.secs).collect();
            let p50_ratios: Vec<f64> = s1
                .iter()
                .zip(s0)
                .map(|(x, y)| {
                    x.hist.value_at_quantile(0.5) as f64
                        / y.hist.value_at_quantile(0.5).max(1) as f64
                })
                .collect();
            let spread = |v: &[f64]| {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                format!("{:.3} [{lo:.2}–{hi:.2}]", median(v.to_vec()))
            };
            let _ = writeln!(
                out,
                "| {label} | {inflight} | {:.3} | {:.3} | {:.3} | {} | {} |",
                r1 / r0,
                a1 as f64 / a0.max(1) as f64,
                b1 as f64 / b0.max(1) as f64,
                spread(&rate_ratios),
                spread(&p50_ratios),
            );
        }
    }
    out
}

fn selected(args: &Args, case: Case) -> bool {
    args.cases.is_empty() || args.cases.iter().any(|n| n == case.name())
}

fn main() {
    // `cargo bench` passes `--bench` to every bench binary; it is not ours.
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    assert!(
        args.count > 0 && args.rounds > 0 && args.rooms > 0,
        "count, rounds, rooms ≥ 1"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let clients = Arc::new(Clients::connect(&args).await);
        let pids = [
            args.tansu_pid.map(|p| p.to_string()),
            args.redis_pid.map(|p| p.to_string()),
            Some(std::process::id().to_string()),
        ];
        for case in CASES.into_iter().filter(|c| selected(&args, *c)) {
            let warm = run(&clients, case, args.warmup, 1, &pids).await;
            assert_eq!(warm.errors, 0, "{}: the warm-up failed", case.name());
        }
        let mut results = Results {
            samples: Vec::new(),
        };
        for round in 0..args.rounds {
            // Every other round in the reverse order, so that no case always follows the
            // same one (librdkafka's threads after a Kafka case, a warm Redis connection).
            let mut order: Vec<Case> = if round % 2 == 0 {
                CASES.to_vec()
            } else {
                CASES.iter().rev().copied().collect()
            };
            order.retain(|c| selected(&args, *c));
            for &inflight in &args.inflight {
                for &case in &order {
                    let s = run(&clients, case, args.count, inflight, &pids).await;
                    eprintln!(
                        "round {} {:>14} x{inflight:<3} {:>8.0}/s p50 {} ms p99 {} ms",
                        round + 1,
                        case.name(),
                        args.count as f64 / s.secs,
                        ms(s.hist.value_at_quantile(0.5)),
                        ms(s.hist.value_at_quantile(0.99)),
                    );
                    match results
                        .samples
                        .iter_mut()
                        .find(|(k, _)| *k == (case, inflight))
                    {
                        Some((_, v)) => v.push(s),
                        None => results.samples.push(((case, inflight), vec![s])),
                    }
                }
            }
        }
        let table = report(&args, &results);
        println!("{table}");
        if let Some(path) = &args.out {
            std::fs::write(path, &table).expect("write the report");
        }
        let failed: usize = results
            .samples
            .iter()
            .flat_map(|(_, v)| v)
            .map(|s| s.errors)
            .sum();
        assert_eq!(failed, 0, "publishes failed (see above)");
    });
}
