//! The DualBus dedupe window: insert (a new id) and check (an id already in the window).
//!
//! Run with
//! ```sh
//! cargo bench --bench dedupe
//! ```
//! Every message that reaches an instance by both paths (Redis and the Kafka tail) goes
//! through one insert and one check, so their cost bounds DualBus's per-message overhead.

// criterion_group! generates an undocumented pub fn.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use chatbus::backend::DedupeWindow;
use chatbus::MessageId;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn ids(n: usize) -> Vec<MessageId> {
    (0..n).map(|_| MessageId::new()).collect()
}

fn dedupe_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("dedupe_window");
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for cap in [4_096usize, 65_536] {
        // Insert fresh ids into a full window: each insert also evicts the oldest.
        let fresh = ids(1 << 20);
        let mut window = DedupeWindow::new(cap);
        for id in ids(cap) {
            window.insert(id);
        }
        let mut i = 0;
        group.bench_function(BenchmarkId::new("insert_new", cap), |b| {
            b.iter(|| {
                let id = fresh[i & (fresh.len() - 1)];
                i += 1;
                black_box(window.insert(black_box(id)))
            });
        });
        // Check ids that are in the window (the second copy of a message): a duplicate.
        let present = ids(cap);
        let mut window = DedupeWindow::new(cap);
        for &id in &present {
            window.insert(id);
        }
        let mut j = 0;
        group.bench_function(BenchmarkId::new("check_duplicate", cap), |b| {
            b.iter(|| {
                let id = present[j % present.len()];
                j += 1;
                let fresh = window.insert(black_box(id));
                assert!(!fresh);
                fresh
            });
        });
    }
    group.finish();
}

criterion_group!(benches, dedupe_bench);
criterion_main!(benches);
