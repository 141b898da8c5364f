//! The floor binary against real WebSocket clients (tokio-tungstenite): every client is
//! greeted once it receives the fan-out, a frame from any client reaches every client (the
//! sender too) as it was sent, on both event loops, and pings are answered.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The floor process, killed when the test ends.
struct Floor(Child);

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_floor() -> (Floor, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_floor"))
        .args(["--port", &port.to_string(), "--threads", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the floor");
    (Floor(child), port)
}

/// Connects (retrying while the floor starts) and waits for the greeting.
async fn client(port: u16) -> Ws {
    let url = format!("ws://127.0.0.1:{port}/");
    for _ in 0..100 {
        if let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await {
            let hello = next_text(&mut ws).await;
            assert_eq!(hello, "welcome");
            return ws;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the floor did not accept on port {port}");
}

/// The next text frame (pongs and other control frames skipped), within 5 s.
async fn next_text(ws: &mut Ws) -> String {
    let read = async {
        while let Some(m) = ws.next().await {
            if let Message::Text(t) = m.expect("a frame") {
                return t.to_string();
            }
        }
        panic!("connection closed");
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a text frame within 5 s")
}

#[tokio::test]
async fn every_frame_reaches_every_client() {
    let (_floor, port) = start_floor();
    // Enough clients that SO_REUSEPORT puts some on each of the two loops.
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(client(port).await);
    }
    for (i, body) in ["1:2:3:4:xxxx", "a longer one, ".repeat(20).as_str()]
        .iter()
        .enumerate()
    {
        let from = i * 7;
        clients[from]
            .send(Message::text(body.to_string()))
            .await
            .unwrap();
        for c in &mut clients {
            assert_eq!(next_text(c).await, *body);
        }
    }
    // A ping is answered with a pong carrying the same payload.
    clients[3]
        .send(Message::Ping(b"hi".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Ok(Message::Pong(p))) = clients[3].next().await {
                return p;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&pong[..], b"hi");
}
