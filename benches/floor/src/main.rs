//! `floor`: the benchmarks' physical floor. A WebSocket fan-out server with no chat logic at
//! all: it accepts connections, reads a frame from any client and writes that frame, encoded
//! once as a server frame, to every connection (the sender included, as chatbus and the
//! Socket.IO peer deliver a message to its sender too, so a message costs the same deliveries
//! in all three). What chatbus spends per delivery above this program is what chatbus adds;
//! what this program spends is, near enough, what the kernel and the wire format cost.
//!
//! Run with
//! ```sh
//! cargo build --release -p chatbus-floor
//! target/release/floor --port 8090 &
//! target/release/loadgen run --protocol floor --url ws://127.0.0.1:8090 \
//!     --clients 1000 --senders 10 --rate 100 --duration 5 --server-pid $!
//! ```
//!
//! Shape: one thread per core (`--threads`, default the available parallelism), each with its
//! own current-thread tokio runtime (one epoll loop) and its own `SO_REUSEPORT` listener on
//! the same port, so the kernel spreads the connections over the threads and no connection is
//! ever touched by two threads. A frame read on one thread is handed to every thread's loop
//! as a `Bytes` (a reference count, not a copy) through a channel; each loop writes whatever
//! its channel holds to each of its connections with one `writev` ([`hub`]).
//!
//! One process is the whole floor: there is no second instance and no hop between instances,
//! which is exactly what makes it a floor for the two-instance fanout scenario.
//!
//! The wire protocol (`loadgen --protocol floor`): the client sends text frames whose payload
//! is the load generator's message body; the server greets each connection with the text
//! frame `welcome` once it will receive the fan-out, and then sends every client's frames to
//! everyone. Pings are answered, a close ends the connection. Loopback only.

// A binary, not a library: the crate-level lints for public APIs do not apply here.
#![allow(unreachable_pub, missing_docs)]

mod conn;
mod frame;
mod handshake;
mod hub;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;
use socket2::{Domain, Socket, Type};
use tokio::sync::mpsc;

#[derive(Parser, Debug)]
#[command(
    name = "floor",
    about = "Minimal WebSocket fan-out server: the benchmarks' floor"
)]
struct Args {
    /// Port on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// Event loops (threads); default: one per available core.
    #[arg(long)]
    threads: Option<usize>,
}

/// Why the floor could not start.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("start thread: {0}")]
    Thread(std::io::Error),
    #[error("an event loop failed: {0}")]
    Loop(String),
}

/// A non-blocking listener with `SO_REUSEPORT`, so every thread can have its own.
fn listener(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let open = || -> std::io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.bind(&addr.into())?;
        s.listen(4096)?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    };
    open().map_err(|source| Error::Listen { addr, source })
}

fn run(args: Args) -> Result<(), Error> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .clamp(1, 256);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    // Every listener is bound before any thread starts: once the port accepts, all do.
    let listeners = (0..threads)
        .map(|_| listener(addr))
        .collect::<Result<Vec<_>, _>>()?;
    let (inboxes, outboxes): (Vec<_>, Vec<_>) = (0..threads)
        .map(|_| mpsc::unbounded_channel::<Bytes>())
        .unzip();
    let mut handles = Vec::with_capacity(threads);
    for (i, (l, inbox)) in listeners.into_iter().zip(outboxes).enumerate() {
        let peers = inboxes.clone();
        let h = std::thread::Builder::new()
            .name(format!("floor-{i}"))
            .spawn(move || hub::run_thread(l, inbox, peers))
            .map_err(Error::Thread)?;
        handles.push(h);
    }
    drop(inboxes);
    eprintln!(
        "floor: pid {} on {addr}, {threads} event loops",
        std::process::id()
    );
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Loop(e.to_string())),
            Err(_) => return Err(Error::Loop("panicked".into())),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor: error: {e}");
            ExitCode::from(2)
        }
    }
}
