//! Throughput and latency of `KafkaBroker` against a real broker, side by side with rdkafka's
//! own `FutureProducer` / `BaseConsumer` on the same broker in the same run.
//!
//! Run with:
//!
//! ```text
//! # starts its own Tansu (SQLite storage in a temp dir) on a free loopback port
//! cargo run --release -p chatbus-kafka --example kafka_bench
//! # or against a running cluster
//! CHATBUS_KAFKA_BROKERS=127.0.0.1:9092 cargo run --release -p chatbus-kafka --example kafka_bench
//! ```
//!
//! Knobs (environment): `BENCH_MESSAGES` (default 40000), `BENCH_CONCURRENCY` (concurrent
//! publishers, default 256), `BENCH_LINGER_MS` (default 5), `BENCH_PAYLOAD` (bytes, default
//! 200), `BENCH_ROOMS` (default 64), `BENCH_PARTITIONS` (default 4).
//!
//! Every message is a 200-byte payload in an envelope (about 240 bytes encoded, key = room);
//! the raw producer sends the very same bytes with the very same producer settings
//! (idempotent, acks=all, same linger), so the difference is what chatbus adds.

use std::time::{Duration, Instant};

use chatbus_core::backend::codec;
use chatbus_core::{Broker, Envelope, Interest, ReplayFrom, Room};
use chatbus_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use chatbus_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use chatbus_kafka::rdkafka::util::Timeout;
use chatbus_kafka::rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use chatbus_kafka::{KafkaBroker, KafkaConfig};
use futures::StreamExt;
use hdrhistogram::Histogram;

struct Knobs {
    messages: usize,
    concurrency: usize,
    linger: Duration,
    payload: usize,
    rooms: usize,
    partitions: u32,
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Waits for every task and merges their latency histograms.
async fn merge(
    tasks: impl IntoIterator<Item = tokio::task::JoinHandle<Histogram<u64>>>,
    what: &str,
) -> Histogram<u64> {
    let mut lat = hist();
    for h in futures::future::join_all(tasks).await {
        match h {
            Ok(h) => {
                let _ = lat.add(&h);
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
    lat
}

fn hist() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, 60_000_000, 3) {
        Ok(h) => h,
        Err(e) => panic!("histogram: {e}"),
    }
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

struct Run {
    label: String,
    count: usize,
    elapsed: Duration,
    lat: Histogram<u64>,
}

impl Run {
    fn print(&self) {
        println!(
            "{:<44} {:>9.0} msg/s   ack p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            self.label,
            self.count as f64 / self.elapsed.as_secs_f64(),
            ms(&self.lat, 0.50),
            ms(&self.lat, 0.99),
            self.lat.max() as f64 / 1000.0,
        );
    }
}

fn rooms(n: usize, tag: &str) -> Vec<Room> {
    (0..n)
        .map(|i| match Room::new(format!("{tag}-{i}")) {
            Ok(r) => r,
            Err(e) => panic!("room: {e}"),
        })
        .collect()
}

/// `concurrency` tasks, each publishing its share one after another (awaiting every ack).
async fn publish_load(broker: &KafkaBroker, k: &Knobs, rooms: &[Room], label: &str) -> Run {
    let payload = vec![b'x'; k.payload];
    let per_task = k.messages / k.concurrency;
    let start = Instant::now();
    let tasks = (0..k.concurrency).map(|t| {
        let (broker, payload, rooms) = (broker.clone(), payload.clone(), rooms.to_vec());
        tokio::spawn(async move {
            let mut h = hist();
            for i in 0..per_task {
                let env = Envelope::new(rooms[(t + i) % rooms.len()].clone(), payload.clone());
                let t0 = Instant::now();
                if let Err(e) = broker.publish(&env).await {
                    panic!("publish: {e}");
                }
                let _ = h.record(us(t0.elapsed()));
            }
            h
        })
    });
    let lat = merge(tasks, "publisher task").await;
    Run {
        label: label.to_owned(),
        count: per_task * k.concurrency,
        elapsed: start.elapsed(),
        lat,
    }
}

fn raw_producer(bootstrap: &str, k: &Knobs) -> FutureProducer {
    let created = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", k.linger.as_millis().to_string())
        .set("batch.num.messages", "10000")
        .set("message.timeout.ms", "10000")
        .create();
    match created {
        Ok(p) => p,
        Err(e) => panic!("raw producer: {e}"),
    }
}

/// The same load through rdkafka's FutureProducer: same bytes, key and partition.
async fn raw_load(producer: &FutureProducer, topic: &str, k: &Knobs, rooms: &[(Room, i32)]) -> Run {
    let payload = bytes::Bytes::from(vec![b'x'; k.payload]);
    let per_task = k.messages / k.concurrency;
    let start = Instant::now();
    let tasks = (0..k.concurrency).map(|t| {
        let (producer, payload, rooms, topic) = (
            producer.clone(),
            payload.clone(),
            rooms.to_vec(),
            topic.to_owned(),
        );
        tokio::spawn(async move {
            let mut h = hist();
            for i in 0..per_task {
                let (room, partition) = &rooms[(t + i) % rooms.len()];
                let env = Envelope::new(room.clone(), payload.clone());
                let value = match codec::encode(&env) {
                    Ok(v) => v,
                    Err(e) => panic!("encode: {e}"),
                };
                // The partition KafkaBroker picks for the room, so the load is spread alike.
                let record = FutureRecord::to(&topic)
                    .key(room.as_str())
                    .payload(&value[..])
                    .partition(*partition)
                    .timestamp(i64::try_from(env.ts).unwrap_or(0));
                let t0 = Instant::now();
                if let Err((e, _)) = producer
                    .send(record, Timeout::After(Duration::from_secs(10)))
                    .await
                {
                    panic!("raw send: {e}");
                }
                let _ = h.record(us(t0.elapsed()));
            }
            h
        })
    });
    let lat = merge(tasks, "raw task").await;
    Run {
        label: "rdkafka FutureProducer (raw)".to_owned(),
        count: per_task * k.concurrency,
        elapsed: start.elapsed(),
        lat,
    }
}

async fn connect(bootstrap: &str, topic: &str, k: &Knobs, partitions: u32) -> KafkaBroker {
    let config = KafkaConfig::new(bootstrap)
        .with_topic(topic)
        .with_partitions(partitions)
        .with_linger(k.linger)
        .with_fetch_wait(Duration::from_millis(10))
        .with_publish_timeout(Duration::from_secs(10));
    match KafkaBroker::connect(config).await {
        Ok(b) => b,
        Err(e) => panic!("connect to {bootstrap}: {e}"),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let k = Knobs {
        messages: env_num("BENCH_MESSAGES", 40_000) as usize,
        concurrency: (env_num("BENCH_CONCURRENCY", 256) as usize).max(1),
        linger: Duration::from_millis(env_num("BENCH_LINGER_MS", 5)),
        payload: env_num("BENCH_PAYLOAD", 200) as usize,
        rooms: (env_num("BENCH_ROOMS", 64) as usize).max(1),
        partitions: u32::try_from(env_num("BENCH_PARTITIONS", 4))
            .unwrap_or(4)
            .max(1),
    };
    // Keep Tansu alive for the whole run when we started it.
    let (_tansu, bootstrap, what) = match std::env::var("CHATBUS_KAFKA_BROKERS") {
        Ok(b) => (None, b.clone(), format!("Kafka at {b}")),
        Err(_) => {
            let t = chatbus_testkit::tansu::Tansu::start().await;
            let b = t.bootstrap();
            (Some(t), b, "Tansu 0.6 (SQLite) on loopback".to_string())
        }
    };
    let run_id = chatbus_core::MessageId::new().to_string()[..8].to_string();
    println!(
        "chatbus-kafka bench against {what}: {} messages of {} bytes, {} concurrent publishers, \
         linger {:?}, {} rooms over {} partitions",
        k.messages, k.payload, k.concurrency, k.linger, k.rooms, k.partitions
    );

    let broker = connect(&bootstrap, &format!("bench-{run_id}"), &k, k.partitions).await;
    let raw_topic = format!("bench-raw-{run_id}");
    // The raw producer's topic is created through KafkaBroker too (Tansu does not auto-create).
    let _raw_topic_owner = connect(&bootstrap, &raw_topic, &k, k.partitions).await;
    let raw = raw_producer(&bootstrap, &k);
    let load_rooms = rooms(k.rooms, "load");
    let raw_rooms: Vec<(Room, i32)> = load_rooms
        .iter()
        .map(|r| {
            (
                r.clone(),
                i32::try_from(broker.partition_of(r)).unwrap_or(0),
            )
        })
        .collect();

    // Warm both paths (connections, producer ids, SQLite pages).
    let warm = Knobs {
        messages: k.concurrency.min(1000),
        ..k
    };
    let _ = raw_load(&raw, &raw_topic, &warm, &raw_rooms).await;
    let _ = publish_load(&broker, &warm, &load_rooms, "warm-up").await;

    println!("\n-- produce: concurrent publishes, each awaiting its ack (acks=all, idempotent)");
    let r1 = raw_load(&raw, &raw_topic, &k, &raw_rooms).await;
    r1.print();
    let b1 = publish_load(&broker, &k, &load_rooms, "KafkaBroker::publish").await;
    b1.print();
    let r2 = raw_load(&raw, &raw_topic, &k, &raw_rooms).await;
    r2.print();
    let raw_rate = (r1.count as f64 / r1.elapsed.as_secs_f64()
        + r2.count as f64 / r2.elapsed.as_secs_f64())
        / 2.0;
    println!(
        "KafkaBroker / raw throughput: {:.0}%",
        100.0 * (b1.count as f64 / b1.elapsed.as_secs_f64()) / raw_rate
    );

    println!(
        "\n-- latency: one publisher, one message at a time (linger {:?})",
        k.linger
    );
    let seq = Knobs {
        messages: 500,
        concurrency: 1,
        ..k
    };
    raw_load(&raw, &raw_topic, &seq, &raw_rooms).await.print();
    publish_load(&broker, &seq, &load_rooms, "KafkaBroker::publish")
        .await
        .print();
    println!(
        "\n-- linger trade-off (KafkaBroker): {} concurrent publishers vs one at a time",
        k.concurrency
    );
    for linger in [0u64, 1, 5, 20] {
        let knobs = Knobs {
            linger: Duration::from_millis(linger),
            ..k
        };
        let b = connect(&bootstrap, &format!("bench-{run_id}"), &knobs, k.partitions).await;
        let one = Knobs {
            messages: 500,
            concurrency: 1,
            ..knobs
        };
        // Warm-up: the first publish of a new producer waits for its producer id.
        let _ = publish_load(
            &b,
            &Knobs {
                messages: 100,
                ..one
            },
            &load_rooms,
            "warm-up",
        )
        .await;
        let label = format!("linger {linger:>2} ms, {} concurrent", k.concurrency);
        publish_load(&b, &knobs, &load_rooms, &label).await.print();
        let label = format!("linger {linger:>2} ms, one at a time");
        publish_load(&b, &one, &load_rooms, &label).await.print();
    }
    println!("\n-- live delivery: publish -> tail subscriber (fetch_wait 10 ms)");
    let room = rooms(1, &format!("live-{run_id}")).remove(0);
    let mut sub = match broker.subscribe(Interest::room(room.clone())).await {
        Ok(s) => s,
        Err(e) => panic!("subscribe: {e}"),
    };
    let mut live = hist();
    for i in 0..200 {
        let env = Envelope::new(room.clone(), format!("{i}"));
        let t0 = Instant::now();
        if let Err(e) = broker.publish(&env).await {
            panic!("publish: {e}");
        }
        match tokio::time::timeout(Duration::from_secs(10), sub.recv()).await {
            Ok(Some(Ok(got))) if got.id == env.id => {
                let _ = live.record(us(t0.elapsed()));
            }
            other => panic!("live delivery: {other:?}"),
        }
        // Spread publishes over the fetch cycle.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    println!(
        "publish -> delivery                          p50 {:>7.2} ms  p99 {:>7.2} ms",
        ms(&live, 0.5),
        ms(&live, 0.99)
    );

    println!("\n-- replay: one room holding every message of a 1-partition topic");
    let replay_topic = format!("bench-replay-{run_id}");
    let replay_broker = connect(&bootstrap, &replay_topic, &k, 1).await;
    let replay_room = rooms(1, "replay").remove(0);
    let fill = Knobs {
        messages: k.messages.min(20_000),
        ..k
    };
    let _ = publish_load(
        &replay_broker,
        &fill,
        std::slice::from_ref(&replay_room),
        "fill",
    )
    .await;
    let t0 = Instant::now();
    let mut stream = match replay_broker
        .replay(&replay_room, ReplayFrom::Beginning, usize::MAX)
        .await
    {
        Ok(s) => s,
        Err(e) => panic!("replay: {e}"),
    };
    let mut n = 0usize;
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            panic!("replay item: {e}");
        }
        n += 1;
    }
    let took = t0.elapsed();
    println!(
        "KafkaBroker::replay                          {:>9.0} msg/s   ({n} messages in {took:.2?})",
        n as f64 / took.as_secs_f64()
    );
    let t0 = Instant::now();
    let raw_n = tokio::task::spawn_blocking({
        let (bootstrap, topic) = (bootstrap.clone(), replay_topic.clone());
        move || raw_consume(&bootstrap, &topic)
    })
    .await
    .unwrap_or(0);
    let took = t0.elapsed();
    println!("rdkafka BaseConsumer (raw)                   {:>9.0} msg/s   ({raw_n} records in {took:.2?})", raw_n as f64 / took.as_secs_f64());
    let h = match replay_broker.history(&replay_room, None, 50).await {
        Ok(h) => h.messages,
        Err(e) => panic!("history: {e}"),
    };
    let t0 = Instant::now();
    let mut pages = 0;
    let mut before = h.first().and_then(|e| e.cursor);
    while pages < 20 {
        match replay_broker.history(&replay_room, before, 50).await {
            Ok(page) if !page.messages.is_empty() => before = page.messages[0].cursor,
            Ok(_) => break,
            Err(e) => panic!("history: {e}"),
        }
        pages += 1;
    }
    println!(
        "KafkaBroker::history (50 per page)           {:>9.1} ms/page",
        t0.elapsed().as_secs_f64() * 1000.0 / f64::from(pages.max(1))
    );
    println!("\nstats: {:?}", broker.stats());
}

/// Reads partition 0 of `topic` from the beginning to its high watermark.
fn raw_consume(bootstrap: &str, topic: &str) -> usize {
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("bench-raw-{}", chatbus_core::MessageId::new()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
    {
        Ok(c) => c,
        Err(e) => panic!("raw consumer: {e}"),
    };
    let high = match consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)) {
        Ok((_, h)) => h,
        Err(e) => panic!("watermarks: {e}"),
    };
    let mut tpl = TopicPartitionList::new();
    if let Err(e) = tpl.add_partition_offset(topic, 0, Offset::Beginning) {
        panic!("tpl: {e}");
    }
    if let Err(e) = consumer.assign(&tpl) {
        panic!("assign: {e}");
    }
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                n += 1;
                if m.offset() + 1 >= high {
                    break;
                }
            }
            Some(Err(e)) => panic!("raw consume: {e}"),
            None => {}
        }
    }
    n
}
