//! The Socket.IO endpoint (issue #15) with the official `socket.io-client` 4.x from npm, over
//! real processes: two `chat-server` instances requiring HS256 tokens, on Redis (with a
//! history window, so messages have cursors to resume from) and on the DualBus (Redis +
//! Tansu). The services are started here (chatbus-testkit); each scenario of
//! `tests/socketio/scenarios.mjs` runs in Node.js against them. The contract is
//! docs/protocol.md, "Socket.IO endpoint".
//!
//! Run with
//!
//! ```text
//! (cd tests/socketio && npm ci)        # or: bash tests/socketio/run.sh
//! cargo build --all-features --example chat-server && cargo test --all-features --test socketio
//! ```
//!
//! Needs `node`, `redis-server` and `tansu` (see chatbus-testkit).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chatbus_testkit::chat::{metric, ChatServer};
use chatbus_testkit::client::WsClient;
use chatbus_testkit::redis::RedisServer;
use chatbus_testkit::tansu::Tansu;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// The servers' `--jwt-secret`.
const SECRET: &str = "socketio-test-secret";
/// A whole scenario, Node.js start included; the script bounds itself at 60 s.
const SCENARIO_LIMIT: Duration = Duration::from_secs(90);
/// Users the scenarios connect as (each gets a token).
const USERS: &[&str] = &[
    "u0", "u1", "u2", "u3", "u4", "u5", "poller", "upgrader", "acker", "sender", "reader",
    "sio-user",
];

#[derive(Debug, Clone, Copy)]
enum Backend {
    /// Redis pub/sub with a history window of 1,000 messages per room.
    Redis,
    /// Redis + Kafka (Tansu).
    Dual,
}

/// Each scenario starts a whole cluster; two at once on 2 cores would measure the machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    servers: Vec<ChatServer>,
    _redis: RedisServer,
    _tansu: Option<Tansu>,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    async fn start(backend: Backend) -> Self {
        let turn = ONE_AT_A_TIME.lock().await;
        let redis = RedisServer::start().await;
        let mut env = vec![("CHATBUS_REDIS_URL", redis.url())];
        let tansu = match backend {
            Backend::Redis => {
                env.push(("CHATBUS_REDIS_HISTORY", "1000".into()));
                None
            }
            Backend::Dual => {
                let tansu = Tansu::start().await;
                env.push(("CHATBUS_KAFKA_BROKERS", tansu.bootstrap()));
                env.push(("CHATBUS_KAFKA_TOPIC", format!("socketio-{}", unique())));
                Some(tansu)
            }
        };
        let broker = match backend {
            Backend::Redis => "redis",
            Backend::Dual => "dual",
        };
        let args = ["--broker", broker, "--jwt-secret", SECRET];
        let mut servers = Vec::new();
        for _ in 0..2 {
            servers.push(ChatServer::start(&args, &env).await);
        }
        Self {
            servers,
            _redis: redis,
            _tansu: tansu,
            _turn: turn,
        }
    }

    fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("http://127.0.0.1:{}", s.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `node scenarios.mjs <scenario>` command against this cluster.
    fn node(&self, scenario: &str) -> Command {
        let dir = scripts_dir();
        assert!(
            dir.join("node_modules/socket.io-client/package.json")
                .is_file(),
            "socket.io-client is not installed: run `npm ci` in {} (scripts/test and \
             tests/socketio/run.sh do)",
            dir.display()
        );
        let mut tokens: serde_json::Map<String, Value> = USERS
            .iter()
            .map(|u| ((*u).to_owned(), Value::String(token(u))))
            .collect();
        // `short`: user `shorty`, expired 22 s ago, so still valid for the verifier's 30 s
        // leeway: the connection lives 8 s. `shorty`: the same user for an hour.
        tokens.insert("short".into(), Value::String(token_exp("shorty", -22)));
        tokens.insert("shorty".into(), Value::String(token("shorty")));
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("scenarios.mjs"))
            .arg(scenario)
            .current_dir(&dir)
            .env("URLS", self.urls())
            .env("TOKENS", Value::Object(tokens).to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `scenario` to its end; panics with its output (and the servers' logs) unless it
    /// printed `PASS <scenario>` and exited 0.
    async fn run(&self, scenario: &str) -> String {
        let out = tokio::time::timeout(SCENARIO_LIMIT, self.node(scenario).output())
            .await
            .unwrap_or_else(|_| panic!("{scenario}: node did not finish in {SCENARIO_LIMIT:?}"))
            .unwrap_or_else(|e| panic!("cannot run node (install nodejs): {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{stdout}");
        assert!(
            out.status.success() && stdout.contains(&format!("PASS {scenario}")),
            "{scenario} failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        stdout
    }
}

impl Drop for Cluster {
    /// A failed scenario shows what the servers logged.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, s) in self.servers.iter().enumerate() {
                let log = s.log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- instance{} log (last 30 lines) ---", i + 1);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/socketio")
}

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// An HS256 token for `sub`, valid for an hour.
fn token(sub: &str) -> String {
    token_exp(sub, 3600)
}

/// An HS256 token for `sub` whose `exp` is `secs` from now (negative: in the past).
fn token_exp(sub: &str, secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let exp = now.saturating_add_signed(secs);
    jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign a token")
}

/// The seed's exact client calls (`emit("event:message", {message})`, the bare string,
/// `on("message")` reading `message`) with clients on both instances over Redis: each gets
/// every message once, in one order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_client_calls_across_two_instances_on_redis() {
    Cluster::start(Backend::Redis).await.run("seed").await;
}

/// The same over the DualBus (Redis for speed, Kafka on Tansu for durability).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_client_calls_across_two_instances_on_dualbus() {
    Cluster::start(Backend::Dual).await.run("seed").await;
}

/// HTTP long-polling only (`transports: ["polling"]`) and the default upgrade to WebSocket
/// chat with each other across instances; the polling client stays on polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_only_and_upgraded_clients_chat() {
    Cluster::start(Backend::Redis).await.run("transports").await;
}

/// Ack callbacks: `send` answers `{id, cursor}` of the resulting message, a retried key the
/// original's ack marked duplicate; join/leave/history acks; errors as `{code, message}` with
/// protocol v1 codes, or the `error` event without a callback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_carry_id_and_cursor_and_errors_carry_codes() {
    let cluster = Cluster::start(Backend::Redis).await;
    cluster.run("acks").await;
    // Every refused event was counted by code, like a native error frame.
    let metrics = cluster.servers[0].metrics().await;
    assert!(
        metric(&metrics, r#"chatbus_errors_total{code="bad_request"}"#) >= 3,
        "bad requests counted:\n{metrics}"
    );
    assert!(metric(&metrics, r#"chatbus_errors_total{code="not_joined"}"#) >= 1);
}

/// Chat state (issue #13) over Socket.IO on two instances: only the author edits, the edit
/// and a reaction reach both sockets once, history shows the state, read and conversations
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_state_events_over_socketio() {
    Cluster::start(Backend::Redis).await.run("state").await;
}

/// Direct messages between Socket.IO users on two instances: acked with the conversation,
/// delivered to both users' sockets without a join, not to anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_between_socketio_users() {
    Cluster::start(Backend::Redis).await.run("direct").await;
}

/// A connection lives until its token expires (an `unauthorized` error event, then a server
/// disconnect) unless it sends `refresh` with a new token for the same user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_disconnects_unless_refreshed() {
    Cluster::start(Backend::Redis).await.run("expiry").await;
}

/// A client disconnected for 5 s reconnects to the other instance with its last cursor in
/// the `auth` payload: every message it missed arrives once, in order, then live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_cursor_after_5s_gets_every_missed_message_once() {
    Cluster::start(Backend::Redis).await.run("resume").await;
}

/// A bad token, no token, a malformed `auth` and a foreign `Origin` are refused at connect
/// (`connect_error` with the protocol v1 code) and counted; a valid token connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_is_refused_at_connect() {
    let cluster = Cluster::start(Backend::Redis).await;
    cluster.run("badtoken").await;
    let metrics = cluster.servers[0].metrics().await;
    assert!(
        metric(&metrics, r#"chatbus_errors_total{code="unauthorized"}"#) >= 2,
        "refusals counted:\n{metrics}"
    );
    assert!(
        metric(&metrics, r#"chatbus_errors_total{code="forbidden"}"#) >= 1,
        "the foreign Origin counted:\n{metrics}"
    );
}

/// Starts `scenario`, waits for its `READY` line; returns the process and its remaining
/// stdout lines.
async fn start_until_ready(
    cluster: &Cluster,
    scenario: &str,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let mut node = cluster
        .node(scenario)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot run node (install nodejs)");
    let stdout = node.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(SCENARIO_LIMIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            println!("{line}");
            if line == "READY" {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        ready,
        Ok(true),
        "{scenario}: the Socket.IO client did not get ready"
    );
    (node, lines)
}

/// Reads the rest of a scenario started with [`start_until_ready`] and checks that it passed.
async fn finish(
    scenario: &str,
    mut node: tokio::process::Child,
    mut lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let rest = tokio::time::timeout(SCENARIO_LIMIT, async {
        let mut out = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            out.push(line);
        }
        out
    })
    .await
    .expect("node finished");
    let status = node.wait().await.expect("node exit status");
    println!("{}", rest.join("\n"));
    assert!(
        status.success() && rest.iter().any(|l| *l == format!("PASS {scenario}")),
        "{scenario} failed: {rest:?}"
    );
}

/// A graceful stop (SIGTERM) of an instance closes its Socket.IO transports rather than
/// disconnecting the sockets, so stock clients reconnect by themselves; a client that resumes
/// on the other instance with its cursor misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_closes_transports_and_clients_resume_elsewhere() {
    let cluster = Cluster::start(Backend::Redis).await;
    let (node, lines) = start_until_ready(&cluster, "drain").await;
    let pid = cluster.servers[0].pid().expect("instance 1 runs");
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
    finish("drain", node, lines).await;
}

/// A native `/ws` client on one instance and a Socket.IO client on the other, in the default
/// room, see each other's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_and_socketio_clients_see_each_other() {
    let cluster = Cluster::start(Backend::Redis).await;
    let mut native = WsClient::connect_as(
        cluster.servers[0].port(),
        &format!("/ws?token={}", token("native-user")),
        "native",
    )
    .await
    .unwrap_or_else(|e| panic!("native connect: {e}"));
    native.join("general").await.expect("join general");
    let (node, lines) = start_until_ready(&cluster, "interop").await;
    native
        .send(json!({"type":"send","room":"general","body":"from-native","client_id":"n1"}))
        .await;
    let from_sio = native
        .expect("the Socket.IO message", Duration::from_secs(10), |f| {
            f["type"] == "message" && f["body"] == "from-sio"
        })
        .await;
    assert_eq!(from_sio["from"], "sio-user");
    assert_eq!(from_sio["room"], "general");
    native
        .send(json!({"type":"send","room":"general","body":"native-got-it"}))
        .await;
    finish("interop", node, lines).await;
}
