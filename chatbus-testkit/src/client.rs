//! [`WsClient`]: a protocol v1 client for tests that check single frames (a refusal, an error
//! code, a close code) rather than keeping score like [`Participant`](crate::chat::Participant).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, Message};

/// How long any one expected frame may take: a bound for a broken server, not a measurement.
pub const FRAME_WAIT: Duration = Duration::from_secs(10);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One WebSocket connection to a server on loopback, frames as JSON values.
#[derive(Debug)]
pub struct WsClient {
    ws: Ws,
}

/// A refused handshake: its HTTP status and body.
#[derive(Debug)]
pub struct Refused {
    /// The HTTP status.
    pub status: u16,
    /// The body (a JSON `error` object for chatbus refusals).
    pub body: String,
}

impl WsClient {
    /// Connects to `ws://127.0.0.1:{port}{path_and_query}` (e.g. `/ws?name=ann`); panics if the
    /// server cannot be reached at all, returns the status and body of a refused upgrade.
    pub async fn connect(port: u16, path_and_query: &str) -> Result<Self, Refused> {
        let url = format!("ws://127.0.0.1:{port}{path_and_query}");
        let connected = tokio::time::timeout(FRAME_WAIT, tokio_tungstenite::connect_async(&url))
            .await
            .unwrap_or_else(|_| panic!("connecting to {url} timed out"));
        match connected {
            Ok((ws, _)) => Ok(Self { ws }),
            Err(tungstenite::Error::Http(response)) => Err(Refused {
                status: response.status().as_u16(),
                body: response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Err(e) => panic!("connecting to {url}: {e}"),
        }
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .unwrap_or_else(|e| panic!("sending {frame}: {e}"));
    }

    /// The next text frame for which `wanted` holds, skipping the others; panics (naming
    /// `what`) if the connection ends or none comes within [`FRAME_WAIT`].
    pub async fn next_where(
        &mut self,
        what: &str,
        mut wanted: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + FRAME_WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no {what} within {FRAME_WAIT:?}"));
            match next {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("a frame that is not JSON ({e}): {text}"));
                    if wanted(&frame) {
                        return frame;
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("waiting for {what}, the connection ended: {other:?}"),
            }
        }
    }

    /// The next frame of type `ty` (`"joined"`, `"ack"`, `"message"`, `"error"`, ...).
    pub async fn next_of(&mut self, ty: &str) -> Value {
        self.next_where(ty, |f| f["type"] == ty).await
    }

    /// Joins `room` and waits for `joined`, or returns the `error` frame that refused it.
    pub async fn join(&mut self, room: &str) -> Result<Value, Value> {
        self.send(serde_json::json!({"type": "join", "room": room}))
            .await;
        let answer = self
            .next_where("joined or error", |f| {
                f["room"] == room && (f["type"] == "joined" || f["type"] == "error")
            })
            .await;
        if answer["type"] == "joined" {
            Ok(answer)
        } else {
            Err(answer)
        }
    }

    /// Waits for the server to close the connection and returns the close code (`None` for
    /// a close without a frame, or a connection dropped without one), skipping text frames.
    pub async fn close_code(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + FRAME_WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("not closed within {FRAME_WAIT:?}"));
            match next {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }
}
