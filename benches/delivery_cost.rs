//! A deterministic workload for counting instructions per delivery under
//! `valgrind --tool=callgrind` (issue #16): `scripts/bench/callgrind.sh` runs it.
//!
//! ```sh
//! cargo bench --bench delivery_cost -- hub K ROUNDS    # the hub fan-out
//! cargo bench --bench delivery_cost -- write K ROUNDS  # fan-out + session writer + socket
//! ```
//!
//! Each round publishes one message to a room of `K` sessions (memory broker), so a run makes
//! `K × ROUNDS` deliveries. It is not a timing benchmark: the count of instructions is what is
//! read, and it is the same on a busy machine. The script runs each mode at two round counts
//! and divides the difference of the totals by the difference of the deliveries, which cancels
//! the set-up (runtime, connections, joins) and the exit.
//!
//! - `hub`: [`Hub::publish`] through the memory broker, the room's pump, one encoded frame
//!   queued for every member, and each member's [`Session::recv`] taking it: what the hub does
//!   for one delivery, without a socket.
//! - `write`: the production path end to end on the server side: a `WsService` served over
//!   loopback TCP (axum, tungstenite), `K` WebSocket clients joined to the room, a chat message
//!   published through the `ChatHub`'s hub, encoded once (JSON) and written by every session's
//!   writer into its socket. Each round waits until every writer has written its frame, so each
//!   frame is its own flush (one `write` syscall): the low-rate case, where the per-write cost
//!   counts most. The clients run on a thread of their own; the script counts the server's
//!   threads only (`--separate-threads=yes`), so reading the frames is not counted.

// A bench target: its items need no docs.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use chatbus::{Envelope, Hub, Kind, MemoryBroker, Room, Session};
use chatbus_ws::{ChatHub, PresenceConfig, WsConfig, WsService};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const ROOM: &str = "bench";

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (mode, k, rounds) = match args.as_slice() {
        [mode, k, rounds] => (
            mode.as_str(),
            k.parse::<usize>().expect("K is a number"),
            rounds.parse::<usize>().expect("ROUNDS is a number"),
        ),
        _ => {
            eprintln!("usage: delivery_cost hub|write K ROUNDS");
            std::process::exit(2);
        }
    };
    let delivered = match mode {
        "hub" => hub(k, rounds),
        "write" => write(k, rounds),
        _ => {
            eprintln!("mode is hub or write");
            std::process::exit(2);
        }
    };
    println!("mode={mode} k={k} rounds={rounds} deliveries={delivered}");
}

fn runtime() -> tokio::runtime::Runtime {
    // One thread: the order of work, and so the count, is the same every run.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn hub(k: usize, rounds: usize) -> u64 {
    runtime().block_on(async {
        let hub = Hub::new(Arc::new(MemoryBroker::new()));
        let room = Room::new(ROOM).expect("valid room name");
        let mut sessions: Vec<Session> = (0..k).map(|i| hub.connect(format!("u{i}"))).collect();
        for s in &sessions {
            s.handle().join(room.clone()).await.expect("join");
        }
        let mut env = Envelope::new(room, vec![b'x'; 100]);
        env.kind = Kind::Ephemeral;
        let mut delivered = 0u64;
        for _ in 0..rounds {
            hub.publish(&env).await.expect("publish");
            for s in &mut sessions {
                // The first waits for the pump; the rest are queued already.
                let _ = s.recv().await;
                delivered += 1;
            }
        }
        delivered
    })
}

fn write(k: usize, rounds: usize) -> u64 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("local addr").port();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    // Started first, so that it is thread 2 in callgrind's per-thread files.
    let clients = std::thread::Builder::new()
        .name("clients".into())
        .spawn(move || clients(port, k, rounds, ready_tx))
        .expect("client thread");
    let rt = runtime();
    let delivered = rt.block_on(async {
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        // No heartbeat, and no announcement of the joins (each joiner still gets its reply):
        // how many joins one debounced announcement covers depends on how fast valgrind runs,
        // and made the set-up's count, which the method subtracts, vary by ±5 %.
        let presence = PresenceConfig::default()
            .with_interval(Duration::from_secs(3600))
            .with_debounce(Duration::from_secs(3600))
            .with_large_room_debounce(Duration::from_secs(3600));
        let chat = ChatHub::with_config(
            Arc::new(MemoryBroker::new()),
            chatbus::HubConfig::default(),
            presence,
        );
        let config = WsConfig::default()
            .with_rate_limit(None)
            .with_ping_interval(Duration::from_secs(3600))
            .with_idle_timeout(Duration::from_secs(3600));
        let svc = WsService::new(chat, config);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = {
            let svc = svc.clone();
            tokio::spawn(async move {
                // `serve` adds the service's own route to the app.
                let _ = svc
                    .serve(listener, axum::Router::new(), async {
                        let _ = stop_rx.await;
                    })
                    .await;
            })
        };
        // Until every client has joined.
        let ready = tokio::task::spawn_blocking(move || ready_rx.recv());
        ready.await.expect("join").expect("clients ready");
        // Then until the presence announcements of the joins (debounced) are written: no frame
        // out for two checks in a row.
        let mut last = svc.metrics().frames_out;
        let mut quiet = 0;
        while quiet < 2 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = svc.metrics().frames_out;
            quiet = if now == last { quiet + 1 } else { 0 };
            last = now;
        }
        let hub = svc.chat().hub();
        let room = Room::new(ROOM).expect("valid room name");
        assert_eq!(hub.local_sessions(&room), k, "every client in the room");
        // What the ChatHub publishes for a `send` of 100 bytes from `bob` (tag M, no name).
        let mut payload = vec![b'M', 0];
        payload.extend_from_slice(&[b'x'; 100]);
        let mut env = Envelope::new(room, payload);
        env.from = Some("bob".into());
        env.kind = Kind::Ephemeral;
        let mut delivered = 0u64;
        for _ in 0..rounds {
            let before = svc.metrics().frames_out;
            hub.publish(&env).await.expect("publish");
            // One thread: when the count is reached, every writer has written and flushed.
            while svc.metrics().frames_out < before + k as u64 {
                tokio::task::yield_now().await;
            }
            delivered += k as u64;
        }
        let _ = stop_tx.send(());
        svc.shutdown().await;
        let _ = server.await;
        delivered
    });
    clients.join().expect("client thread");
    delivered
}

/// `k` WebSocket clients on their own thread: join, report ready, read `rounds` messages each.
fn clients(port: u16, k: usize, rounds: usize, ready: std::sync::mpsc::Sender<()>) {
    runtime().block_on(async {
        let mut socks = Vec::with_capacity(k);
        for i in 0..k {
            let url = format!("ws://127.0.0.1:{port}/ws?name=u{i}");
            let (mut ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("connect");
            let join = serde_json::json!({"type": "join", "room": ROOM}).to_string();
            ws.send(Message::text(join)).await.expect("send join");
            until(&mut ws, "joined").await;
            socks.push(ws);
        }
        let mut readers = Vec::with_capacity(k);
        for mut ws in socks {
            readers.push(tokio::spawn(async move {
                let mut got = 0;
                while got < rounds {
                    match ws.next().await {
                        Some(Ok(Message::Text(t)))
                            if t.as_str().contains("\"type\":\"message\"") =>
                        {
                            got += 1;
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
                got
            }));
        }
        // Give the readers a turn to start before the server publishes.
        tokio::task::yield_now().await;
        ready.send(()).expect("server waits");
        for r in readers {
            assert_eq!(r.await.expect("reader"), rounds, "every message read");
        }
    });
}

/// Reads until a frame of type `ty`.
async fn until<S>(ws: &mut S, ty: &str)
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let want = format!("\"type\":\"{ty}\"");
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str().contains(&want) => return,
            Some(Ok(_)) => {}
            other => panic!("no {ty}: {other:?}"),
        }
    }
}
