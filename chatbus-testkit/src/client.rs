//! A WebSocket client for protocol tests: connect, send frames, and wait (always with a bound)
//! for a frame that matches a predicate.
//!
//! Every frame read is kept, so a failed expectation names what did arrive. Frames read while
//! waiting for something else stay queued: a later [`expect`](WsClient::expect) finds them, and
//! [`expect_none`](WsClient::expect_none) fails on them too. [`clear`](WsClient::clear) drops the
//! queue before a step that must only see what comes next.
//!
//! ```no_run
//! # async fn f(port: u16) {
//! use std::time::Duration;
//! use chatbus_testkit::client::WsClient;
//! use serde_json::json;
//!
//! let mut ann = WsClient::connect(port, "/ws?name=ann", "ann").await.expect("connect");
//! ann.send(json!({"type": "join", "room": "lobby"})).await;
//! ann.expect("joined lobby", Duration::from_secs(5), |f| f["type"] == "joined").await;
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long [`WsClient::connect`] waits for the upgrade and the `welcome` frame.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One protocol client on one connection.
#[derive(Debug)]
pub struct WsClient {
    label: String,
    ws: Option<Ws>,
    /// Read, not yet taken by an `expect`.
    queue: VecDeque<Value>,
    /// Everything read, in order (for failure messages).
    seen: Vec<Value>,
    /// The close code and reason, once the server closed (`None` code: closed without a frame
    /// or with an empty one).
    closed: Option<(Option<u16>, String)>,
    welcome: Value,
}

impl WsClient {
    /// Connects to `ws://127.0.0.1:<port><path_and_query>` (e.g. `/ws?token=...`) and waits for
    /// the `welcome` frame. `label` names the client in failure messages. A refused handshake is
    /// `Err` with the HTTP status and body.
    pub async fn connect(port: u16, path_and_query: &str, label: &str) -> Result<Self, String> {
        let url = format!("ws://127.0.0.1:{port}{path_and_query}");
        let ws = match tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
        {
            Err(_) => return Err(format!("{label}: no upgrade within {CONNECT_TIMEOUT:?}")),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(format!("{label}: HTTP {} {body}", resp.status().as_u16()));
            }
            Ok(Err(e)) => return Err(format!("{label}: {e}")),
            Ok(Ok((ws, _))) => ws,
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
            .expect("welcome", CONNECT_TIMEOUT, |f| f["type"] == "welcome")
            .await;
        Ok(client)
    }

    /// The `welcome` frame.
    pub fn welcome(&self) -> &Value {
        &self.welcome
    }

    /// The label given at connect.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Sends one text frame (panics if the connection is gone).
    pub async fn send(&mut self, frame: Value) {
        let label = self.label.clone();
        let ws = self
            .ws
            .as_mut()
            .unwrap_or_else(|| panic!("{label}: send on a closed connection: {frame}"));
        match tokio::time::timeout(CONNECT_TIMEOUT, ws.send(Message::text(frame.to_string()))).await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{label}: cannot send {frame}: {e}"),
            Err(_) => panic!("{label}: sending {frame} blocked for {CONNECT_TIMEOUT:?}"),
        }
    }

    /// Waits up to `within` for a frame matching `pred` (queued ones first) and takes it out of
    /// the queue; panics naming `what` and listing the frames seen.
    pub async fn expect(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        match self.wait_for(within, &pred).await {
            Some(frame) => frame,
            None => panic!(
                "{}: expected {what} within {within:?}; {}",
                self.label,
                self.describe()
            ),
        }
    }

    /// Like [`expect`](Self::expect) but returns `None` instead of panicking.
    pub async fn wait_for(
        &mut self,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        if let Some(i) = self.queue.iter().position(&pred) {
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
        pred: impl Fn(&Value) -> bool,
    ) {
        if let Some(frame) = self.wait_for(during, &pred).await {
            panic!(
                "{}: expected no {what} for {during:?}, got {frame}; {}",
                self.label,
                self.describe()
            );
        }
    }

    /// Waits up to `within` for the server to close the connection and returns the close code
    /// (`None`: the socket ended without a close code). Frames before the close stay queued.
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

    /// Whether the server has closed the connection (as far as read so far).
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Drops the queued frames (they stay in the failure listing) and returns them.
    pub fn clear(&mut self) -> Vec<Value> {
        self.queue.drain(..).collect()
    }

    /// Every frame read so far.
    pub fn seen(&self) -> &[Value] {
        &self.seen
    }

    /// Closes the connection with a normal close (1000) and waits (bounded) for the server's
    /// answer, so the server has seen the close when this returns.
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

    /// The frames seen (the last 40), for failure messages.
    fn describe(&self) -> String {
        let mut s = String::new();
        let skip = self.seen.len().saturating_sub(40);
        let _ = write!(s, "{} frames seen", self.seen.len());
        if skip > 0 {
            let _ = write!(s, " (the last 40)");
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
