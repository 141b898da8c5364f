//! Hub fan-out: one 100-byte message to N local sessions.
//!
//! Run with
//! ```sh
//! cargo bench --bench hub_fanout
//! ```
//! Times `Hub::deliver_local` (encode the frame once, queue the shared `Bytes` for every member);
//! draining the session queues happens outside the timed section.

// criterion_group! generates an undocumented pub fn.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatbus::{Envelope, Hub, Kind, MemoryBroker, Room, Session};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::FutureExt;

fn setup(rt: &tokio::runtime::Runtime, n: usize) -> (Hub, Vec<Session>, Room) {
    let hub = Hub::new(Arc::new(MemoryBroker::new()));
    let room = Room::new("bench").expect("valid room name");
    let sessions: Vec<Session> = (0..n).map(|i| hub.connect(format!("u{i}"))).collect();
    rt.block_on(async {
        for s in &sessions {
            s.handle().join(room.clone()).await.expect("join");
        }
    });
    (hub, sessions, room)
}

fn fan_out(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("hub_fanout_100B");
    group.measurement_time(Duration::from_secs(5));
    for n in [1_000usize, 10_000] {
        let (hub, mut sessions, room) = setup(&rt, n);
        let mut env = Envelope::new(room, vec![b'x'; 100]);
        env.kind = Kind::Ephemeral;
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let delivered = hub.deliver_local(&env);
                    total += start.elapsed();
                    assert_eq!(delivered, n as u64);
                    for s in &mut sessions {
                        // Each session has exactly one frame queued: take it without waiting.
                        let _ = s.recv().now_or_never();
                    }
                }
                total
            });
        });
    }
    group.finish();
}

criterion_group!(benches, fan_out);
criterion_main!(benches);
