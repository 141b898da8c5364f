//! The example `chat-server` as a real process, and WebSocket clients that keep score.
//!
//! Fault tests run several server processes over real Redis and Tansu, kill and restart them,
//! and let [`Participant`]s (clients that reconnect and resume from their last cursor by
//! themselves) record every message they receive. [`Score`] then checks the guarantees: every
//! acknowledged message delivered, nothing twice, and one order for everybody.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::{free_port, wait_for_port};

/// Where cargo put the `chat-server` example for this build (`cargo test` builds examples):
/// `target/<profile>/examples/chat-server`, found from the running test binary's path
/// (`target/<profile>/deps/<test>`), so any `CARGO_TARGET_DIR` works.
pub fn chat_server_program() -> PathBuf {
    example_program("chat-server")
}

/// Where cargo put the example `name` for this build, found like [`chat_server_program`].
pub fn example_program(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| panic!("unexpected test binary path {}", exe.display()));
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "{} not found: build it with `cargo build --example {name}` (cargo test builds it)",
        path.display()
    );
    path
}

/// One `chat-server` process on a fixed loopback port; killed on drop.
#[derive(Debug)]
pub struct ChatServer {
    port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChatServer {
    /// Starts the server with extra `args` (e.g. `["--broker", "dual"]`) and environment, on a
    /// free port, and waits until `/healthz` answers.
    pub async fn start(args: &[&str], env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Self {
            port: free_port(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            child: None,
            log: dir.path().join("server.log"),
            _dir: dir,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let err = log.try_clone().expect("log file");
        let listen = format!("127.0.0.1:{}", self.port);
        let child = Command::new(chat_server_program())
            .arg("--listen")
            .arg(&listen)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start chat-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        wait_for_port(self.port, Duration::from_secs(30), "chat-server").await;
        // The port opens before the broker is connected: wait for readiness too.
        while Instant::now() < deadline {
            if http_get(self.port, "/readyz")
                .await
                .is_some_and(|(code, _)| code == 200)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "chat-server on {listen} not ready in 30 s; log:\n{}",
            self.log()
        );
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no drain, no goodbye.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        http_get(self.port, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A minimal HTTP/1.1 GET on loopback: (status, body), or None if the connection failed.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request(port, "GET", path, &[], "").await
}

/// A minimal HTTP/1.1 request on loopback with extra `headers` and a `body` (sent with its
/// `Content-Length`): (status, body), or None if the connection failed or nothing came back
/// within 5 s. A chunked response body is decoded.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    use std::fmt::Write as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
             Content-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            let _ = write!(req, "{name}: {value}\r\n");
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let chunked = head.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("transfer-encoding:") && l.contains("chunked")
        });
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        };
        Some((code, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

/// Decodes a chunked HTTP body (as far as it is well formed).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = size.split(';').next().unwrap_or("").trim();
        let Ok(n) = usize::from_str_radix(size, 16) else {
            break;
        };
        let (Some(chunk), Some(tail)) = (after.get(..n), after.get(n..)) else {
            break;
        };
        if n == 0 {
            break;
        }
        out.push_str(chunk);
        rest = tail.strip_prefix("\r\n").unwrap_or(tail);
    }
    out
}

/// One received chat message, as a participant recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Message id.
    pub id: String,
    /// Its cursor.
    pub cursor: String,
    /// Its body.
    pub body: String,
    /// Milliseconds from the sender's send to this receipt (from the body's timestamp).
    pub latency_ms: u64,
}

/// Everything one participant saw.
#[derive(Debug, Default)]
pub struct Record {
    /// Messages in the order received.
    pub received: Vec<Received>,
    /// Ids the server acknowledged to this participant as sender.
    pub acked: Vec<String>,
    /// Milliseconds from each acknowledged send to its ack.
    pub ack_ms: Vec<u64>,
    /// Sends answered with an error frame, by error code.
    pub send_errors: HashMap<String, u64>,
    /// Sends that got neither an ack nor an error (connection lost).
    pub unanswered: u64,
    /// Connections made (1 + reconnects).
    pub connections: u64,
    /// Lagged notices and close reasons seen.
    pub notices: Vec<String>,
}

/// Commands to a participant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParticipantCommand {
    /// Keep going.
    Run,
    /// Drop the connection and stay away until `Run` again.
    Disconnect,
    /// Close and stop for good.
    Stop,
}

/// A client that joins one room, reconnects by itself (trying the servers in turn) with `since`
/// = the last cursor it received, optionally sends numbered messages, and records everything.
#[derive(Debug)]
pub struct Participant {
    /// Display name.
    pub name: String,
    record: Arc<Mutex<Record>>,
    control: watch::Sender<ParticipantCommand>,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    sending: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// What a participant does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Servers' ports; it starts at the first and moves to the next when one fails.
    pub ports: Vec<u16>,
    /// The room.
    pub room: String,
    /// Messages to send (0 for a pure receiver).
    pub send: u64,
    /// Pause between sends.
    pub every: Duration,
    /// Read nothing at all after joining (a slow client).
    pub stall: bool,
    /// Bytes of padding in each sent body (to make traffic heavy).
    pub pad: usize,
}

impl Participant {
    /// Starts the participant's task; it is connected and joined when this returns.
    pub async fn start(name: &str, plan: Plan) -> Self {
        let record = Arc::new(Mutex::new(Record::default()));
        let (control, rx) = watch::channel(ParticipantCommand::Run);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(plan.stall));
        let sending = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn(run(
            name.to_owned(),
            plan,
            record.clone(),
            rx,
            Flags {
                stalled: stalled.clone(),
                sending: sending.clone(),
            },
            ready_tx,
        ));
        match tokio::time::timeout(Duration::from_secs(20), ready_rx).await {
            Ok(Ok(())) => {}
            _ => panic!("participant {name} could not connect and join"),
        }
        Self {
            name: name.to_owned(),
            record,
            control,
            stalled,
            sending,
            task,
        }
    }

    /// Drops the connection until [`resume`](Self::resume).
    pub fn disconnect(&self) {
        let _ = self.control.send(ParticipantCommand::Disconnect);
    }

    /// Starts sending (once every participant has joined, so that all of them can be expected
    /// to receive every message).
    pub fn start_sending(&self) {
        self.sending
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops (true) or restarts (false) reading from the socket, keeping the connection.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled
            .store(stalled, std::sync::atomic::Ordering::Relaxed);
    }

    /// Reconnects (with `since`).
    pub fn resume(&self) {
        let _ = self.control.send(ParticipantCommand::Run);
    }

    /// Stops and returns what it recorded.
    pub async fn finish(self) -> Record {
        let _ = self.control.send(ParticipantCommand::Stop);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        std::mem::take(&mut *self.record.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// How many messages it has received so far.
    pub fn received(&self) -> usize {
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .received
            .len()
    }

    /// How many of its sends were acknowledged so far.
    pub fn acked(&self) -> usize {
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .acked
            .len()
    }
}

/// Switches shared between a participant's handle and its task.
struct Flags {
    stalled: Arc<std::sync::atomic::AtomicBool>,
    sending: Arc<std::sync::atomic::AtomicBool>,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect_and_join(port: u16, name: &str, room: &str, since: Option<&str>) -> Option<Ws> {
    let url = format!("ws://127.0.0.1:{port}/ws?name={name}");
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .ok()?
    .ok()?;
    let mut join = json!({"type": "join", "room": room});
    if let Some(c) = since {
        join["since"] = json!(c);
    }
    ws.send(Message::text(join.to_string())).await.ok()?;
    Some(ws)
}

async fn run(
    name: String,
    plan: Plan,
    record: Arc<Mutex<Record>>,
    mut control: watch::Receiver<ParticipantCommand>,
    flags: Flags,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let Flags { stalled, sending } = flags;
    let rec =
        |f: &mut dyn FnMut(&mut Record)| f(&mut record.lock().unwrap_or_else(|e| e.into_inner()));
    let mut ready = Some(ready);
    let mut last_cursor: Option<String> = None;
    let mut seen: HashSet<String> = HashSet::new();
    let mut next_seq = 0u64;
    let mut server = 0usize;
    // Sends awaiting an answer on the current connection: client_id → seq.
    let mut in_flight: HashMap<String, Instant> = HashMap::new();
    'outer: loop {
        let command = control.borrow().clone();
        match command {
            ParticipantCommand::Stop => break,
            ParticipantCommand::Disconnect => {
                if control.changed().await.is_err() {
                    break;
                }
                continue;
            }
            ParticipantCommand::Run => {}
        }
        let port = plan.ports[server % plan.ports.len()];
        let Some(mut ws) = connect_and_join(port, &name, &plan.room, last_cursor.as_deref()).await
        else {
            server += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        rec(&mut |r| r.connections += 1);
        let mut joined = false;
        let mut recheck = tokio::time::interval(Duration::from_millis(50));
        let mut send_tick = tokio::time::interval(plan.every);
        send_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = control.changed() => {
                    let command = control.borrow().clone();
                    if changed.is_err() || command != ParticipantCommand::Run {
                        let _ = ws.close(None).await;
                        rec(&mut |r| r.unanswered += in_flight.len() as u64);
                        in_flight.clear();
                        if changed.is_err() || command == ParticipantCommand::Stop { break 'outer; }
                        continue 'outer;
                    }
                }
                // Wakes the loop so a change of `stalled` takes effect.
                _ = recheck.tick() => {}
                _ = send_tick.tick(), if joined && sending.load(std::sync::atomic::Ordering::Relaxed) && next_seq < plan.send && in_flight.len() < 64 => {
                    let cid = format!("{name}-{next_seq}");
                    let body = format!("{name}:{next_seq}:{}:{}", "x".repeat(plan.pad), now_ms());
                    let frame = json!({"type":"send","room":plan.room,"body":body,"client_id":cid});
                    if ws.send(Message::text(frame.to_string())).await.is_err() {
                        break;
                    }
                    in_flight.insert(cid, Instant::now());
                    next_seq += 1;
                }
                msg = ws.next(), if !(joined && stalled.load(std::sync::atomic::Ordering::Relaxed)) => {
                    let Some(Ok(msg)) = msg else { break };
                    let Message::Text(text) = msg else {
                        if let Message::Close(c) = msg {
                            rec(&mut |r| r.notices.push(format!("close {c:?}")));
                        }
                        continue;
                    };
                    let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                    match v["type"].as_str().unwrap_or("") {
                        "joined" => {
                            joined = true;
                            if let Some(tx) = ready.take() { let _ = tx.send(()); }
                        }
                        "message" => {
                            let body = v["body"].as_str().unwrap_or("").to_owned();
                            let sent_at = body.rsplit(':').next().and_then(|t| t.parse::<u64>().ok());
                            let r = Received {
                                id: v["id"].as_str().unwrap_or("").to_owned(),
                                cursor: v["cursor"].as_str().unwrap_or("").to_owned(),
                                latency_ms: sent_at.map_or(0, |t| now_ms().saturating_sub(t)),
                                body,
                            };
                            if !r.cursor.is_empty() {
                                last_cursor = Some(r.cursor.clone());
                            }
                            seen.insert(r.id.clone());
                            rec(&mut |rc| rc.received.push(r.clone()));
                        }
                        "ack" => {
                            let cid = v["client_id"].as_str().unwrap_or("");
                            if let Some(sent) = in_flight.remove(cid) {
                                let id = v["id"].as_str().unwrap_or("").to_owned();
                                let ms = sent.elapsed().as_millis() as u64;
                                rec(&mut |r| {
                                    r.acked.push(id.clone());
                                    r.ack_ms.push(ms);
                                });
                            }
                        }
                        "error" => {
                            let code = v["code"].as_str().unwrap_or("?").to_owned();
                            if let Some(cid) = v["client_id"].as_str() {
                                in_flight.remove(cid);
                            }
                            rec(&mut |r| *r.send_errors.entry(code.clone()).or_default() += 1);
                        }
                        "lagged" => rec(&mut |r| r.notices.push(format!("lagged {text}"))),
                        _ => {}
                    }
                }
            }
        }
        // Connection lost: what was in flight may or may not have been taken.
        rec(&mut |r| r.unanswered += in_flight.len() as u64);
        in_flight.clear();
        server += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = seen;
}

/// The verdict over all participants of one room.
#[derive(Debug, Default)]
pub struct Score {
    /// Acknowledged messages (any sender).
    pub acked: usize,
    /// Per receiver: acknowledged messages it never received.
    pub missing: Vec<(String, usize)>,
    /// Per receiver: messages received more than once.
    pub duplicated: Vec<(String, usize)>,
    /// Receivers whose order differs from the first receiver's.
    pub reordered: Vec<String>,
    /// Receivers whose per-sender sequence numbers go backwards.
    pub sender_order_broken: Vec<String>,
    /// Up to 5 missing messages per receiver (body and cursor, as another receiver got them).
    pub missing_examples: Vec<(String, Vec<String>)>,
}

impl Score {
    /// Scores `records` (name → record); every participant is a receiver.
    pub fn of(records: &[(String, Record)]) -> Self {
        let acked: HashSet<&str> = records
            .iter()
            .flat_map(|(_, r)| r.acked.iter().map(String::as_str))
            .collect();
        let mut score = Score {
            acked: acked.len(),
            ..Score::default()
        };
        let mut reference: Option<Vec<&str>> = None;
        for (name, r) in records {
            let mut count: HashMap<&str, usize> = HashMap::new();
            for m in &r.received {
                *count.entry(m.id.as_str()).or_default() += 1;
            }
            let missing = acked.iter().filter(|id| !count.contains_key(*id)).count();
            let examples: Vec<String> = acked
                .iter()
                .filter(|id| !count.contains_key(*id))
                .take(5)
                .map(|id| {
                    records
                        .iter()
                        .flat_map(|(_, r)| r.received.iter())
                        .find(|m| m.id == *id)
                        .map_or_else(
                            || format!("{id} (nobody got it)"),
                            |m| {
                                format!(
                                    "{} at {}",
                                    m.body.chars().take(24).collect::<String>(),
                                    m.cursor
                                )
                            },
                        )
                })
                .collect();
            if !examples.is_empty() {
                score.missing_examples.push((name.clone(), examples));
            }
            let dups = count.values().filter(|&&c| c > 1).count();
            score.missing.push((name.clone(), missing));
            score.duplicated.push((name.clone(), dups));
            let order: Vec<&str> = r.received.iter().map(|m| m.id.as_str()).collect();
            match &reference {
                None => reference = Some(order),
                Some(reference) if *reference != order => score.reordered.push(name.clone()),
                Some(_) => {}
            }
            let mut last: HashMap<&str, u64> = HashMap::new();
            for m in &r.received {
                let mut parts = m.body.splitn(3, ':');
                let (Some(sender), Some(seq)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let Ok(seq) = seq.parse::<u64>() else {
                    continue;
                };
                if last.get(sender).is_some_and(|&l| seq <= l) {
                    score.sender_order_broken.push(name.clone());
                    break;
                }
                last.insert(sender, seq);
            }
        }
        score
    }

    /// Total acknowledged messages missing, over all receivers.
    pub fn total_missing(&self) -> usize {
        self.missing.iter().map(|(_, n)| n).sum()
    }

    /// Total duplicated messages, over all receivers.
    pub fn total_duplicated(&self) -> usize {
        self.duplicated.iter().map(|(_, n)| n).sum()
    }

    /// Panics with the full score unless nothing acknowledged is missing, nothing is
    /// duplicated, and everybody saw one order.
    pub fn assert_perfect(&self, scenario: &str) {
        assert!(
            self.acked > 0
                && self.total_missing() == 0
                && self.total_duplicated() == 0
                && self.reordered.is_empty()
                && self.sender_order_broken.is_empty(),
            "{scenario}: {self:#?}"
        );
    }
}

/// Waits until every sender has finished sending (or nobody has received anything new for 4 s,
/// when sends were refused) and every participant has received at least as many messages as
/// were acknowledged, with nothing moving for a moment more (late duplicates would show up
/// then), or until `limit` passes; then stops them all and returns their records.
pub async fn settle(
    participants: Vec<Participant>,
    total_sends: usize,
    limit: Duration,
) -> Vec<(String, Record)> {
    let deadline = Instant::now() + limit;
    let mut last_progress = (0, Instant::now());
    while Instant::now() < deadline {
        let acked: usize = participants.iter().map(Participant::acked).sum();
        let min_received = participants
            .iter()
            .map(Participant::received)
            .min()
            .unwrap_or(0);
        let sum: usize = participants.iter().map(Participant::received).sum();
        if sum != last_progress.0 {
            last_progress = (sum, Instant::now());
        }
        let sent_out = acked >= total_sends || last_progress.1.elapsed() > Duration::from_secs(4);
        if sent_out
            && min_received >= acked
            && last_progress.1.elapsed() > Duration::from_millis(700)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut out = Vec::new();
    for p in participants {
        let name = p.name.clone();
        out.push((name, p.finish().await));
    }
    out
}

/// The value of one sample in Prometheus text: `sample` is the name with its labels as the
/// server writes them (`chatbus_dual_mode{mode="dual"}`); 0 when it is absent.
pub fn metric(text: &str, sample: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The `q`-quantile (0.0 to 1.0) of `values`, 0 when there are none.
pub fn quantile(values: impl Iterator<Item = u64>, q: f64) -> u64 {
    let mut v: Vec<u64> = values.collect();
    v.sort_unstable();
    let last = v.len().saturating_sub(1);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let i = ((last as f64) * q.clamp(0.0, 1.0)).round() as usize;
    v.get(i).copied().unwrap_or(0)
}
