//! [`WsClient`]: a protocol v1 client for tests that check single frames (a refusal, an error
//! code, a close code, a status change) rather than keeping score like
//! [`Participant`](crate::chat::Participant).
//!
//! Every wait is bounded, and a failed expectation names what did arrive (the frames seen, and
//! the close). Two ways to wait:
//!
//! - [`next_where`](WsClient::next_where) / [`next_of`](WsClient::next_of): the next frame that
//!   matches, skipping (dropping) the others, within [`FRAME_WAIT`].
//! - [`expect`](WsClient::expect) / [`expect_none`](WsClient::expect_none): with an explicit
//!   bound; frames read while waiting for something else stay queued, so a later `expect` finds
//!   them and `expect_none` fails on them too (answers and messages may arrive in either order).
//!   [`clear`](WsClient::clear) drops the queue before a step that must see only what comes next.
//!
//! ```no_run
//! # async fn f(port: u16) {
//! use std::time::Duration;
//! use chatbus_testkit::client::WsClient;
//! use serde_json::json;
//!
//! let mut ann = WsClient::connect_as(port, "/ws?name=ann", "ann").await.expect("connect");
//! ann.send(json!({"type": "join", "room": "lobby", "client_id": "j1"})).await;
//! ann.expect("joined lobby", Duration::from_secs(5), |f| f["client_id"] == "j1").await;
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::time::{Duration, Instant};

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
    label: String,
    ws: Option<Ws>,
    /// Read, not yet taken by an `expect`.
    queue: VecDeque<Value>,
    /// Everything read, in order (for failure messages).
    seen: Vec<Value>,
    /// The close code and reason once the connection ended (`None` code: no close frame, or
    /// one without a code).
    closed: Option<(Option<u16>, String)>,
    welcome: Value,
}

/// A refused handshake: its HTTP status and body.
#[derive(Debug)]
pub struct Refused {
    /// The HTTP status.
    pub status: u16,
    /// The body (a JSON `error` object for chatbus refusals).
    pub body: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {} {}", self.status, self.body)
    }
}

impl WsClient {
    /// Connects to `ws://127.0.0.1:{port}{path_and_query}` (e.g. `/ws?name=ann`) and waits for
    /// the `welcome` frame; panics if the server cannot be reached at all, returns the status
    /// and body of a refused upgrade.
    pub async fn connect(port: u16, path_and_query: &str) -> Result<Self, Refused> {
        Self::connect_as(port, path_and_query, &format!("client of :{port}")).await
    }

    /// [`connect`](Self::connect), naming the client `label` in failure messages.
    pub async fn connect_as(port: u16, path_and_query: &str, label: &str) -> Result<Self, Refused> {
        let url = format!("ws://127.0.0.1:{port}{path_and_query}");
        let connected = tokio::time::timeout(FRAME_WAIT, tokio_tungstenite::connect_async(&url))
            .await
            .unwrap_or_else(|_| panic!("{label}: connecting to {url} timed out"));
        let ws = match connected {
            Ok((ws, _)) => ws,
            Err(tungstenite::Error::Http(response)) => {
                return Err(Refused {
                    status: response.status().as_u16(),
                    body: response
                        .body()
                        .as_deref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default(),
                })
            }
            Err(e) => panic!("{label}: connecting to {url}: {e}"),
        };
        let mut client = Self {
            label: label.to_owned(),
            ws: Some(ws),
            queue: VecDeque::new(),
            seen: Vec::new(),
            closed: None,
            welcome: Value::Null,
        };
        client.welcome = client
            .expect("welcome", FRAME_WAIT, |f| f["type"] == "welcome")
            .await;
        Ok(client)
    }

    /// The `welcome` frame.
    pub fn welcome(&self) -> &Value {
        &self.welcome
    }

    /// The label failure messages name this client by.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Sends one frame (panics if the connection is gone).
    pub async fn send(&mut self, frame: Value) {
        let label = self.label.clone();
        let ws = self
            .ws
            .as_mut()
            .unwrap_or_else(|| panic!("{label}: send on a closed connection: {frame}"));
        match tokio::time::timeout(FRAME_WAIT, ws.send(Message::text(frame.to_string()))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{label}: sending {frame}: {e}"),
            Err(_) => panic!("{label}: sending {frame} blocked for {FRAME_WAIT:?}"),
        }
    }

    /// The next frame for which `wanted` holds, skipping (dropping) the others; panics (naming
    /// `what`) if the connection ends or none comes within [`FRAME_WAIT`].
    pub async fn next_where(
        &mut self,
        what: &str,
        mut wanted: impl FnMut(&Value) -> bool,
    ) -> Value {
        while let Some(frame) = self.queue.pop_front() {
            if wanted(&frame) {
                return frame;
            }
        }
        let frame = self.expect(what, FRAME_WAIT, wanted).await;
        // What came before it was skipped.
        self.queue.clear();
        frame
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
    /// a close without a code, or a connection dropped without one); panics after
    /// [`FRAME_WAIT`].
    pub async fn close_code(&mut self) -> Option<u16> {
        self.expect_close(FRAME_WAIT).await
    }

    /// Waits up to `within` for a frame matching `pred` (queued ones first) and takes it out of
    /// the queue; panics naming `what` and listing the frames seen.
    pub async fn expect(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        match self.wait_for(within, pred).await {
            Some(frame) => frame,
            None => panic!(
                "{}: expected {what} within {within:?}; {}",
                self.label,
                self.describe()
            ),
        }
    }

    /// Like [`expect`](Self::expect), but `None` instead of a panic.
    pub async fn wait_for(
        &mut self,
        within: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        if let Some(i) = self.queue.iter().position(&mut pred) {
            return self.queue.remove(i);
        }
        let deadline = Instant::now() + within;
        while let Some(frame) = self.read_until(deadline).await {
            if pred(&frame) {
                return Some(frame);
            }
            self.queue.push_back(frame);
        }
        None
    }

    /// Reads for `during` and panics (naming `what`) if a frame matching `pred` is queued or
    /// arrives. Frames that do not match stay queued.
    pub async fn expect_none(
        &mut self,
        what: &str,
        during: Duration,
        pred: impl FnMut(&Value) -> bool,
    ) {
        if let Some(frame) = self.wait_for(during, pred).await {
            panic!(
                "{}: expected no {what} for {during:?}, got {frame}; {}",
                self.label,
                self.describe()
            );
        }
    }

    /// Waits up to `within` for the server to close the connection and returns the close code
    /// (`None`: the socket ended without one). Frames before the close stay queued.
    pub async fn expect_close(&mut self, within: Duration) -> Option<u16> {
        let deadline = Instant::now() + within;
        while self.closed.is_none() {
            match self.read_until(deadline).await {
                Some(frame) => self.queue.push_back(frame),
                None if self.closed.is_some() => break,
                None => panic!(
                    "{}: expected the server to close within {within:?}; {}",
                    self.label,
                    self.describe()
                ),
            }
        }
        self.closed.as_ref().and_then(|(code, _)| *code)
    }

    /// Drops the queued frames (they stay in the failure listing) and returns them.
    pub fn clear(&mut self) -> Vec<Value> {
        self.queue.drain(..).collect()
    }

    /// Every frame read so far.
    pub fn seen(&self) -> &[Value] {
        &self.seen
    }

    /// Closes the connection (1000) and waits, at most 5 s, for the server's answer, so the
    /// server has seen the close when this returns.
    pub async fn close(mut self) {
        if let Some(mut ws) = self.ws.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let _ = ws.close(None).await;
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        }
    }

    /// The next text frame as JSON, or `None` at `deadline` or when the connection ended.
    async fn read_until(&mut self, deadline: Instant) -> Option<Value> {
        loop {
            let ws = self.ws.as_mut()?;
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(msg) = tokio::time::timeout(left, ws.next()).await else {
                return None;
            };
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let frame: Value = serde_json::from_str(&t).unwrap_or_else(|e| {
                        panic!("{}: a frame that is not JSON ({e}): {t}", self.label)
                    });
                    self.seen.push(frame.clone());
                    return Some(frame);
                }
                Some(Ok(Message::Close(c))) => {
                    self.closed = Some(match c {
                        Some(c) => (Some(u16::from(c.code)), c.reason.to_string()),
                        None => (None, String::new()),
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    self.closed
                        .get_or_insert((None, format!("socket error: {e}")));
                    self.ws = None;
                    return None;
                }
                None => {
                    self.closed.get_or_insert((None, "socket ended".into()));
                    self.ws = None;
                    return None;
                }
            }
        }
    }

    /// The frames seen (the last 40) and the close, for failure messages.
    fn describe(&self) -> String {
        let mut s = String::new();
        let skip = self.seen.len().saturating_sub(40);
        let _ = write!(s, "{} frames seen", self.seen.len());
        if skip > 0 {
            s.push_str(" (the last 40)");
        }
        s.push(':');
        for f in &self.seen[skip..] {
            let _ = write!(s, "\n    {f}");
        }
        if let Some((code, reason)) = &self.closed {
            let _ = write!(s, "\n    [closed: code {code:?}, {reason}]");
        }
        s
    }
}
