//! Test harness: a real server on 127.0.0.1:0 and a tokio-tungstenite client whose every
//! receive is bounded by a timeout.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chatbus_core::{Broker, MemoryBroker};
use chatbus_ws::prometheus_client::encoding::prometheus_text;
use chatbus_ws::prometheus_client::registry::Registry;
use chatbus_ws::{ChatHub, WsConfig, WsService};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(5);

pub struct Server {
    pub addr: SocketAddr,
    pub ws: WsService,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Server {
    pub async fn start(config: WsConfig) -> Self {
        Self::with_broker(Arc::new(MemoryBroker::new()), config).await
    }

    pub async fn with_broker(broker: Arc<dyn Broker>, config: WsConfig) -> Self {
        Self::with_chat(ChatHub::new(broker), config).await
    }

    pub async fn with_chat(chat: ChatHub, config: WsConfig) -> Self {
        let ws = WsService::new(chat, config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let ws = ws.clone();
            async move {
                ws.serve(listener, axum::Router::new(), async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        Self {
            addr,
            ws,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// What `/metrics` of an app that registered this service would serve.
    pub fn scrape(&self) -> String {
        let mut registry = Registry::default();
        self.ws.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).expect("encoding into a String");
        text
    }

    pub fn url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.addr)
    }

    pub async fn client(&self, name: &str) -> Client {
        Client::connect(&self.url(&format!("?name={name}"))).await
    }

    /// Stops the server and waits (bounded) until it has drained.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("server stops within 15 s")
                .expect("server task")
                .expect("serve returns Ok");
        }
    }
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Socket,
    pub welcome: Value,
}

/// What `recv` saw.
#[derive(Debug)]
pub enum Event {
    Frame(Value),
    Close(Option<CloseFrame>),
    Ended,
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        let mut c = Self {
            ws,
            welcome: Value::Null,
        };
        let welcome = c.next().await;
        assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
        assert_eq!(welcome["protocol"], 1);
        c.welcome = welcome;
        c
    }

    /// Connects with a prepared request (headers) and returns the HTTP status on refusal.
    pub async fn try_connect(
        request: impl IntoClientRequest + Unpin,
    ) -> Result<Self, (u16, String)> {
        let result = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("handshake in time");
        Self::handshake_result(result.map(|(ws, _)| ws)).await
    }

    /// [`try_connect`](Self::try_connect) over a TCP connection the caller opened (e.g. from
    /// another local address).
    pub async fn try_connect_on(
        request: impl IntoClientRequest + Unpin,
        tcp: TcpStream,
    ) -> Result<Self, (u16, String)> {
        let result = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp)),
        )
        .await
        .expect("handshake in time");
        Self::handshake_result(result.map(|(ws, _)| ws)).await
    }

    async fn handshake_result(
        result: Result<Socket, tungstenite::Error>,
    ) -> Result<Self, (u16, String)> {
        match result {
            Ok(ws) => {
                let mut c = Self {
                    ws,
                    welcome: Value::Null,
                };
                c.welcome = c.next().await;
                Ok(c)
            }
            Err(tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err((resp.status().as_u16(), body))
            }
            Err(e) => panic!("handshake failed unexpectedly: {e}"),
        }
    }

    pub fn user(&self) -> String {
        self.welcome["user"].as_str().unwrap_or_default().to_owned()
    }

    pub async fn send(&mut self, v: Value) {
        self.send_raw(Message::text(v.to_string())).await;
    }

    pub async fn send_raw(&mut self, m: Message) {
        tokio::time::timeout(WAIT, self.ws.send(m))
            .await
            .expect("send in time")
            .expect("send");
    }

    /// The next text frame or close, skipping pings/pongs.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let Ok(msg) = tokio::time::timeout_at(deadline, self.ws.next()).await else {
                return None;
            };
            return Some(match msg {
                Some(Ok(Message::Text(t))) => {
                    Event::Frame(serde_json::from_str(&t).expect("server frames are JSON"))
                }
                Some(Ok(Message::Close(c))) => Event::Close(c),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected message {other:?}"),
                Some(Err(_)) | None => Event::Ended,
            });
        }
    }

    /// The next frame (presence frames included).
    pub async fn next(&mut self) -> Value {
        match self.recv_within(WAIT).await {
            Some(Event::Frame(v)) => v,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next frame that is not a presence update (those arrive asynchronously).
    pub async fn next_non_presence(&mut self) -> Value {
        loop {
            let v = self.next().await;
            if v["type"] != "presence" {
                return v;
            }
        }
    }

    /// The next frame of type `ty`, skipping presence only; panics on anything else.
    pub async fn expect(&mut self, ty: &str) -> Value {
        let v = self.next_non_presence().await;
        assert_eq!(v["type"], ty, "expected {ty}, got {v}");
        v
    }

    /// The next error frame; checks its code.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let v = self.expect("error").await;
        assert_eq!(v["code"], code, "{v}");
        v
    }

    /// Frames (other than presence) received within `wait`.
    pub async fn quiet(&mut self, wait: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                None => return got,
                Some(Event::Frame(v)) if v["type"] == "presence" => {}
                Some(Event::Frame(v)) => got.push(v),
                Some(other) => panic!("connection ended while quiet: {other:?}"),
            }
        }
    }

    /// Waits for the server's close and returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            match self.recv_within(WAIT).await {
                Some(Event::Frame(_)) => continue,
                Some(Event::Close(Some(c))) => return u16::from(c.code),
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join", "room": room})).await;
        let v = self.expect("joined").await;
        assert_eq!(v["room"], room);
        v
    }

    /// Sends a chat message and returns (ack, own echo), in whichever order they arrive.
    pub async fn say(&mut self, room: &str, body: &str, client_id: &str) -> (Value, Value) {
        self.send(json!({"type": "send", "room": room, "body": body, "client_id": client_id}))
            .await;
        let (mut ack, mut echo) = (None, None);
        while ack.is_none() || echo.is_none() {
            let v = self.next_non_presence().await;
            match v["type"].as_str() {
                Some("ack") => ack = Some(v),
                Some("message") if v["body"] == body => echo = Some(v),
                _ => panic!("unexpected frame while sending {body:?}: {v}"),
            }
        }
        let (ack, echo) = (ack.expect("ack"), echo.expect("echo"));
        assert_eq!(ack["client_id"], client_id);
        assert_eq!(ack["id"], echo["id"]);
        assert_eq!(ack["cursor"], echo["cursor"]);
        (ack, echo)
    }

    /// Asserts the connection still answers.
    pub async fn assert_alive(&mut self) {
        self.send(json!({"type": "ping"})).await;
        loop {
            let v = self.next_non_presence().await;
            if v["type"] == "pong" {
                return;
            }
            assert_eq!(v["type"], "error", "unexpected frame before pong: {v}");
        }
    }
}
