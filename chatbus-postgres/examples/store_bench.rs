//! Throughput of `apply` and latency of the read calls of `PostgresStore`, on a private
//! PostgreSQL from the testkit.
//!
//! Run with:
//!
//! ```text
//! cargo run --release -p chatbus-postgres --example store_bench
//! cargo run --release -p chatbus-postgres --example store_bench -- --batch 1000 --rooms 200
//! ```
//!
//! `STORE_BENCH_URL=postgres://...` runs it against a database of your own instead.
//!
//! (a) applies `--rooms` (1,000) rooms × `--messages` (1,000) messages, plus about 10% edits,
//! reactions and reads, through `apply` in batches of `--batch` (or `STORE_BENCH_BATCH`, 500)
//! events, as a projector would, and prints events/s; (b) times 10,000 `page(room, viewer,
//! None, 50)`, 1,000 pages `before` a random message and 1,000 `conversations` of a user in
//! 100 rooms, one call at a time, and prints p50/p99/max.

use chatbus_testkit::rng::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatbus_core::store::{ChatEvent, EventKind, Store};
use chatbus_core::{Cursor, MessageId, Room};
use chatbus_postgres::{PostgresConfig, PostgresStore};
use chatbus_testkit::postgres::Postgres;
use hdrhistogram::Histogram;

struct Args {
    rooms: usize,
    messages: usize,
    batch: usize,
}

fn args() -> Args {
    let mut a = Args {
        rooms: 1_000,
        messages: 1_000,
        batch: std::env::var("STORE_BENCH_BATCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(500),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().and_then(|v| v.parse::<usize>().ok());
        let Some(value) = value.filter(|v| *v > 0) else {
            eprintln!("usage: store_bench [--rooms N] [--messages N] [--batch N]");
            std::process::exit(2);
        };
        match flag.as_str() {
            "--rooms" => a.rooms = value,
            "--messages" => a.messages = value,
            "--batch" => a.batch = value,
            _ => {
                eprintln!("unknown flag {flag}");
                std::process::exit(2);
            }
        }
    }
    a
}

const USERS: usize = 5_000;
const EPOCH: u32 = 42;
/// The user who writes in the first 100 rooms, for the conversation list.
const HUB_USER: &str = "hub";

/// The log: messages round-robin over the rooms (a partition carries many rooms), each
/// followed one time in ten by an edit, a reaction or a read of that room.
struct Log {
    rng: Rng,
    rooms: Vec<Room>,
    users: Vec<Arc<str>>,
    /// Per room: (id, author) of its newest message.
    last: Vec<Option<(MessageId, Arc<str>)>>,
    /// Per room: the cursors of its messages (for pages `before`).
    cursors: Vec<Vec<Cursor>>,
    offset: u64,
    sent: usize,
    total: usize,
}

impl Log {
    fn new(a: &Args) -> Self {
        Self {
            rng: Rng::new(0x1234_5678_9abc_def1),
            rooms: (0..a.rooms)
                .map(|i| Room::new(format!("bench.{i}")).expect("room"))
                .collect(),
            users: (0..USERS).map(|i| Arc::from(format!("user{i}"))).collect(),
            last: vec![None; a.rooms],
            cursors: vec![Vec::with_capacity(a.messages); a.rooms],
            offset: 0,
            sent: 0,
            total: a.rooms * a.messages,
        }
    }

    fn event(&mut self, room: usize, from: Arc<str>, kind: EventKind) -> ChatEvent {
        self.offset += 1;
        ChatEvent {
            id: MessageId::new(),
            room: self.rooms[room].clone(),
            from,
            ts: 1_700_000_000_000 + self.offset,
            cursor: Cursor::with_epoch(0, self.offset, EPOCH),
            kind,
        }
    }

    /// The next batch of at least `n` events (a message's extra event stays with it).
    fn batch(&mut self, n: usize) -> Vec<ChatEvent> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n && self.sent < self.total {
            let room = self.sent % self.rooms.len();
            self.sent += 1;
            let from = if room < 100 && self.sent <= self.rooms.len() {
                Arc::from(HUB_USER)
            } else {
                // About 50 regular authors per room.
                self.users[(room * 7 + self.rng.below(50)) % USERS].clone()
            };
            let kind = EventKind::Message {
                name: None,
                body: format!("message {} of room {room}: some words of chat", self.sent).into(),
                to: None,
            };
            let e = self.event(room, from.clone(), kind);
            self.last[room] = Some((e.id, from));
            self.cursors[room].push(e.cursor);
            out.push(e);
            if self.rng.below(10) == 0 {
                let Some((target, author)) = self.last[room].clone() else {
                    continue;
                };
                let reader = self.users[self.rng.below(USERS)].clone();
                let extra = match self.rng.below(3) {
                    0 => self.event(
                        room,
                        author,
                        EventKind::Edit {
                            target,
                            body: "edited".into(),
                        },
                    ),
                    1 => self.event(
                        room,
                        reader,
                        EventKind::React {
                            target,
                            emoji: "👍".into(),
                            on: true,
                        },
                    ),
                    _ => {
                        let cursor = Cursor::with_epoch(0, self.offset, EPOCH);
                        self.event(room, reader, EventKind::Read { cursor })
                    }
                };
                out.push(extra);
            }
        }
        out
    }
}

struct Latency {
    name: &'static str,
    h: Histogram<u64>,
    took: Duration,
}

impl Latency {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            h: Histogram::new(3).expect("histogram"),
            took: Duration::ZERO,
        }
    }

    fn record(&mut self, d: Duration) {
        self.took += d;
        let _ = self.h.record(d.as_micros().max(1) as u64);
    }

    fn row(&self) -> String {
        let ms = |v: u64| v as f64 / 1000.0;
        format!(
            "| {:<28} | {:>6} | {:>8.2} | {:>8.2} | {:>8.2} | {:>8.0} |",
            self.name,
            self.h.len(),
            ms(self.h.value_at_quantile(0.5)),
            ms(self.h.value_at_quantile(0.99)),
            ms(self.h.max()),
            self.h.len() as f64 / self.took.as_secs_f64().max(1e-9),
        )
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    // STORE_BENCH_URL: a database of your own (tuned, on other hardware) instead of a
    // testkit one. It should be empty: the rooms are named `bench.<n>`.
    let (_pg, url) = match std::env::var("STORE_BENCH_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let pg = Postgres::start().await;
            let url = pg.url();
            (Some(pg), url)
        }
    };
    let store = PostgresStore::connect(PostgresConfig::new(url))
        .await
        .expect("connect");
    println!(
        "store_bench: {} rooms x {} messages (+~10% edits/reactions/reads), batches of {}",
        a.rooms, a.messages, a.batch
    );

    // (a) apply throughput.
    let mut log = Log::new(&a);
    let mut events = 0usize;
    let mut batch_latency = Latency::new("apply (one batch)");
    let start = Instant::now();
    loop {
        let batch = log.batch(a.batch);
        let Some(last) = batch.last().map(|e| e.cursor) else {
            break;
        };
        let t = Instant::now();
        store.apply(&batch, Some(last)).await.expect("apply");
        batch_latency.record(t.elapsed());
        events += batch.len();
        if events % 100_000 < batch.len() {
            eprintln!(
                "  {events} events, {:.0}/s",
                events as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    let took = start.elapsed();
    let rate = events as f64 / took.as_secs_f64();

    // (b) read latencies, one call at a time.
    let mut rng = Rng::new(0xfeed_beef_dead_cafe);
    let mut page = Latency::new("page(room, None, 50)");
    for _ in 0..10_000 {
        let room = &log.rooms[rng.below(a.rooms)];
        let viewer = &log.users[rng.below(USERS)];
        let t = Instant::now();
        let p = store.page(room, viewer, None, 50).await.expect("page");
        page.record(t.elapsed());
        assert!(p.is_some_and(|p| !p.messages.is_empty()));
    }
    let mut before = Latency::new("page(room, before, 50)");
    for _ in 0..1_000 {
        let r = rng.below(a.rooms);
        let cursor = log.cursors[r][rng.below(log.cursors[r].len())];
        let viewer = &log.users[rng.below(USERS)];
        let t = Instant::now();
        let p = store
            .page(&log.rooms[r], viewer, Some(cursor), 50)
            .await
            .expect("page");
        before.record(t.elapsed());
        assert!(p.is_some(), "a page before a stored message");
    }
    let mut convs = Latency::new("conversations(100 rooms, 20)");
    for _ in 0..1_000 {
        let t = Instant::now();
        let c = store
            .conversations(HUB_USER, None, 20)
            .await
            .expect("conversations");
        convs.record(t.elapsed());
        assert_eq!(c.items.len(), 20.min(a.rooms));
    }
    let mut unread = Latency::new("read_state(room, user)");
    for _ in 0..1_000 {
        let room = &log.rooms[rng.below(a.rooms)];
        let user = &log.users[rng.below(USERS)];
        let t = Instant::now();
        store.read_state(room, user).await.expect("read_state");
        unread.record(t.elapsed());
    }

    println!();
    println!(
        "apply: {events} events in {:.1} s = {rate:.0} events/s",
        took.as_secs_f64()
    );
    println!();
    println!(
        "| {:<28} | {:>6} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "call", "n", "p50 ms", "p99 ms", "max ms", "calls/s"
    );
    println!(
        "|{:-<30}|{:-<8}|{:-<10}|{:-<10}|{:-<10}|{:-<10}|",
        "", "", "", "", "", ""
    );
    for l in [&batch_latency, &page, &before, &convs, &unread] {
        println!("{}", l.row());
    }
}
