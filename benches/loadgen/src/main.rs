//! `loadgen`: the load generator for chatbus, for the Node.js Socket.IO peer
//! (`benches/peer/`) and for the floor (`benches/floor/`, a minimal fan-out server), side by
//! side, with the same clients, payloads and measurements.
//!
//! Run with
//! ```sh
//! # build both (release): the server to measure and this generator
//! cargo build --release --example chat-server
//! cargo build --release -p chatbus-loadgen
//! # a chat server (memory broker, no rate limit), then 1,000 clients in one room, 10 senders:
//! target/release/examples/chat-server --listen 127.0.0.1:8080 --rate-per-sec 0 &
//! target/release/loadgen run --url ws://127.0.0.1:8080/ws \
//!     --clients 1000 --rooms 1 --senders 10 --rate 50 --duration 10 --server-pid $!
//! # open-loop ramp until p99 > 50 ms or any loss:
//! target/release/loadgen run --url ws://127.0.0.1:8080/ws \
//!     --clients 1000 --ramp --ramp-from 20 --p99-limit-ms 50 --server-pid $!
//! # the peer (Socket.IO, benches/peer/server.js): --protocol socketio --url ws://127.0.0.1:8001
//! # the floor (target/release/floor --port 8090): --protocol floor --url ws://127.0.0.1:8090
//! # ratios of the runs, and their chart:
//! target/release/loadgen compare --chatbus-fanout A.json --peer-fanout B.json \
//!     --floor-fanout C.json --svg compare.svg
//! # or, without building first:
//! cargo run --release -p chatbus-loadgen -- run --help
//! ```
//! The scenarios of `docs/BENCHMARKS.md` are scripts in `scripts/bench/`; the smoke test is
//! `bash tests/loadgen-smoke.sh`.
//!
//! Every message body is `inst:sender:seq:send_time_us:xxxx…`, so each receiver measures the
//! end-to-end latency and checks per-sender sequence numbers (loss, duplicates, reordering).
//! Results go to `target/loadgen/NAME.{json,svg}` and a table on stdout; progress bars go to
//! stderr, and only when it is a terminal. Server CPU (user and system apart), RSS and write
//! system calls are read from `/proc` for the PIDs given (`--server-pid`, `--broker-pid`).
//! Loopback only.
//!
//! Layout: [`cli`] (arguments) → [`run`] (one run: connect, steps, report) → [`controller`]
//! (talks to the engines through [`link`]) → [`engine`] (the event loops doing the I/O);
//! [`summary`] turns a step's counts into its results, [`report`] writes them, [`compare`]
//! reads the stacks' reports back and [`compare_chart`] draws them together.

// A binary, not a library: the crate-level lints for public APIs do not apply here.
#![allow(unreachable_pub, missing_docs)]

mod cli;
mod compare;
mod compare_chart;
mod controller;
mod engine;
mod link;
mod net;
mod plan;
mod procstat;
mod progress;
mod proto;
mod report;
mod run;
mod segments;
mod summary;
mod ws;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Sub};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Sub::Run(args) => run::run(args),
        Sub::Compare(args) => compare::compare(&args),
        Sub::Worker => link::worker(),
        Sub::FreePort => net::free_port(),
        Sub::WaitHttp { url, timeout } => net::wait_http(&url, timeout),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: error: {e}");
            ExitCode::from(2)
        }
    }
}
