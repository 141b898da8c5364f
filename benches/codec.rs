//! Envelope encode / decode with the binary codec between instances.
//!
//! Run with
//! ```sh
//! cargo bench --bench codec
//! ```
//! A typical chat message (100-byte payload, sender, cursor) and a large one (4 KiB), so the
//! fixed cost per envelope and the per-byte cost are both visible.

// criterion_group! generates an undocumented pub fn.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use chatbus::backend::codec;
use chatbus::{Cursor, Envelope, Room};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn envelope(payload: usize) -> Envelope {
    let room = Room::new("general").expect("valid room name");
    let mut env = Envelope::new(room, vec![b'x'; payload]).with_from("user-12345");
    env.cursor = Some(Cursor::new(3, 1_234_567));
    env
}

fn codec_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.measurement_time(Duration::from_secs(3));
    for size in [100usize, 4096] {
        let env = envelope(size);
        let encoded = codec::encode(&env).expect("encodes");
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("encode", size), &env, |b, env| {
            b.iter(|| codec::encode(black_box(env)).expect("encodes"));
        });
        // Into a reused buffer: what a batching publisher does.
        group.bench_with_input(BenchmarkId::new("encode_into", size), &env, |b, env| {
            let mut buf = BytesMut::with_capacity(8192);
            b.iter(|| {
                buf.clear();
                codec::encode_into(black_box(env), &mut buf).expect("encodes");
            });
        });
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, bytes| {
            b.iter(|| codec::decode(black_box(bytes)).expect("decodes"));
        });
    }
    group.finish();
}

criterion_group!(benches, codec_bench);
criterion_main!(benches);
