//! The chatbus chat server: the browser page at `/`, the WebSocket at `/ws`, health and metrics.
//!
//! Run with
//!
//! ```text
//! cargo run --release --example chat-server
//! # then open http://127.0.0.1:3000/ in two browser windows
//!
//! cargo run --release --example chat-server -- --help            # every option
//! CHATBUS_LISTEN=127.0.0.1:8080 cargo run --release --example chat-server
//! CHATBUS_JWT_SECRET=change-me cargo run --release --example chat-server   # require HS256 tokens
//! ```
//!
//! Routes: `/` the chat page, `/ws` the WebSocket (protocol v1, see docs/protocol.md),
//! `/socket.io/` the Socket.IO endpoint for `socket.io-client` 4.x (docs/protocol.md, "Socket.IO
//! endpoint"; `--no-socketio` turns it off, `--socketio-room` names the room the seed's
//! `event:message` goes to),
//! `/healthz` liveness, `/readyz` broker health (503 when the broker is down or the server is
//! draining), `/metrics` Prometheus text (one `prometheus-client` registry: chatbus-ws's
//! counters, the broker's, and `chatbus_broker_up`).
//!
//! Server API: with `--api-key` (or `CHATBUS_API_KEY`), `/api/publish`, `/api/send`,
//! `/api/disconnect` and `/api/presence` let the application's backend post messages, message
//! a user, disconnect a user and list who is online, with `Authorization: Bearer <key>` (see
//! docs/api.md); without a key every `/api/*` path is a 404.
//!
//! ```text
//! CHATBUS_API_KEY=$(openssl rand -hex 32) cargo run --release --example chat-server
//! curl -H "Authorization: Bearer $CHATBUS_API_KEY" -d '{"room":"lobby","from":"bot","body":"hi"}' \
//!     http://127.0.0.1:3000/api/publish
//! ```
//!
//! Chat state (edits, deletes, reactions, unread counts, conversations) is kept in memory by
//! default; `--store postgres --postgres-url postgres://…` keeps it in PostgreSQL, projected
//! from the durable log (`--broker kafka` or `dual`), shared by every instance:
//!
//! ```text
//! cargo run --release --example chat-server -- --broker dual --store postgres \
//!     --postgres-url postgres://chatbus@127.0.0.1/chatbus
//! ```
//!
//! TLS: `--tls-cert chain.pem --tls-key key.pem` serves `https://` and `wss://` on the same
//! port (rustls). The files are read once at start: a renewed certificate takes a restart
//! (drain one instance at a time; clients reconnect and resume).
//!
//! Ctrl-C or SIGTERM drains: no new connections, every open one gets its pending acks and
//! messages and then a 1001 close.

use std::error::Error;
use std::fmt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chatbus_core::store::Store;
use chatbus_core::{
    Broker, DualBus, DualConfig, DurableDownPolicy, Health, HubConfig, MemoryBroker, MemoryConfig,
    Room, SlowPolicy,
};
use chatbus_kafka::{KafkaBroker, KafkaConfig};
use chatbus_postgres::{PostgresConfig, PostgresStore};
use chatbus_redis::{RedisBroker, RedisConfig};
use chatbus_ws::socketio::SocketIoConfig;
use chatbus_ws::state::{Projector, ProjectorConfig};
use chatbus_ws::tokio_rustls::rustls;
use chatbus_ws::{
    AllowedOrigins, ChatHub, IpLimits, JwtVerifier, PresenceConfig, RateLimit, WsConfig, WsService,
};
use clap::{Parser, ValueEnum};
use prometheus_client::collector::Collector;
use tracing_subscriber::EnvFilter;

mod api;
mod bench_hook;
mod metrics;

use api::ApiKey;
use metrics::{DualMetrics, KafkaMetrics, ProjectorMetrics, RedisMetrics, Scrape};

/// The page, embedded at compile time: the binary is all there is to deploy.
const INDEX_HTML: &str = include_str!("index.html");

type BoxError = Box<dyn Error + Send + Sync>;

/// Which broker carries messages between instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BrokerKind {
    /// In-process, no infrastructure; one instance only; history kept in memory.
    Memory,
    /// Redis pub/sub (fast fan-out between instances).
    Redis,
    /// Kafka (durable, replayable).
    Kafka,
    /// Redis for speed plus Kafka for durability.
    Dual,
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Memory => "memory",
            Self::Redis => "redis",
            Self::Kafka => "kafka",
            Self::Dual => "dual",
        })
    }
}

/// Where chat state (edits, deletes, reactions, read positions, conversations) is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    /// In this process, fed from the broker's live stream: nothing to run, per instance.
    Memory,
    /// PostgreSQL (`--postgres-url`), shared by every instance, projected from the durable
    /// log (`--broker kafka` or `dual`).
    Postgres,
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Memory => "memory",
            Self::Postgres => "postgres",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SlowClients {
    /// Stop live delivery to a slow client and replay what it missed once it catches up.
    Resync,
    /// Close a slow client's connection (close code 4000).
    Close,
}

/// chatbus example chat server: a browser chat page, a WebSocket endpoint, health and metrics.
///
/// Every option can also be set with the environment variable shown.
#[derive(Debug, Parser)]
#[command(name = "chat-server", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "CHATBUS_LISTEN", default_value = "127.0.0.1:3000")]
    listen: String,

    /// Message broker.
    #[arg(long, env = "CHATBUS_BROKER", value_enum, default_value_t = BrokerKind::Memory)]
    broker: BrokerKind,

    /// Where chat state is kept (history in state, unread counts, conversations).
    #[arg(long, env = "CHATBUS_STORE", value_enum, default_value_t = StoreKind::Memory)]
    store: StoreKind,

    /// With `--store postgres`: the database, `postgres://user:password@host:port/db`.
    #[arg(long, env = "CHATBUS_POSTGRES_URL", hide_env_values = true)]
    postgres_url: Option<String>,

    /// With `--store postgres`: do not run the projector here (another process projects the
    /// log into PostgreSQL). With it, every instance runs one and each partition is projected
    /// by one of them at a time (PostgreSQL advisory locks); the others stand by.
    #[arg(long, env = "CHATBUS_NO_PROJECTOR")]
    no_projector: bool,

    /// Messages of history kept per room by the memory broker.
    #[arg(long, env = "CHATBUS_MEMORY_HISTORY", default_value_t = 1024)]
    memory_history: usize,

    /// Rooms whose history the memory broker keeps (the least recently published is evicted).
    #[arg(long, env = "CHATBUS_MEMORY_HISTORY_ROOMS", default_value_t = 4096)]
    memory_history_rooms: usize,

    /// Require HS256 JWTs signed with this secret (`?token=` or `Authorization: Bearer`).
    #[arg(long, env = "CHATBUS_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,

    /// Require RS256 JWTs verified with the RSA public key in this PEM file.
    #[arg(long, env = "CHATBUS_JWT_PUBLIC_KEY", conflicts_with = "jwt_secret")]
    jwt_public_key: Option<std::path::PathBuf>,

    /// Required JWT issuer (`iss`).
    #[arg(long, env = "CHATBUS_JWT_ISSUER")]
    jwt_issuer: Option<String>,

    /// Required JWT audience (`aud`).
    #[arg(long, env = "CHATBUS_JWT_AUDIENCE")]
    jwt_audience: Option<String>,

    /// Further browser origins allowed to connect, comma-separated (the server's own origin
    /// always is); `*` allows any.
    #[arg(long, env = "CHATBUS_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,

    /// Largest client frame in bytes; larger ones get a `too_large` error.
    #[arg(long, env = "CHATBUS_MAX_FRAME_BYTES", default_value_t = 16 * 1024)]
    max_frame_bytes: usize,

    /// Frames a connection may send in a burst.
    #[arg(long, env = "CHATBUS_RATE_BURST", default_value_t = 40)]
    rate_burst: u32,

    /// Frames per second a connection may send on average; 0 disables the rate limit.
    #[arg(long, env = "CHATBUS_RATE_PER_SEC", default_value_t = 20.0)]
    rate_per_sec: f64,

    /// Rooms one connection may be in at once.
    #[arg(long, env = "CHATBUS_MAX_ROOMS", default_value_t = 64)]
    max_rooms: usize,

    /// WebSocket connections this instance holds at once; past it a handshake gets HTTP 503.
    /// Keep it below the process's open-file limit (`ulimit -n`), with room for the broker
    /// connections.
    #[arg(long, env = "CHATBUS_MAX_CONNECTIONS", default_value_t = chatbus_ws::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,

    /// Seconds without any frame from a client (pongs included) before it is dropped.
    #[arg(long, env = "CHATBUS_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    idle_timeout_secs: u64,

    /// Seconds between WebSocket pings from the server.
    #[arg(long, env = "CHATBUS_PING_INTERVAL_SECS", default_value_t = 20)]
    ping_interval_secs: u64,

    /// Milliseconds the writer holds a connection's batch open for more frames before it
    /// flushes (fewer socket writes under load, up to this much added latency); 0 is off.
    #[arg(long, env = "CHATBUS_WRITE_DELAY_MS", default_value_t = 0)]
    write_delay_ms: u64,

    /// Seconds connections get on shutdown to flush and close.
    #[arg(long, env = "CHATBUS_DRAIN_TIMEOUT_SECS", default_value_t = 5)]
    drain_timeout_secs: u64,

    /// Frames queued per connection before it counts as slow.
    #[arg(long, env = "CHATBUS_SESSION_QUEUE", default_value_t = 1024)]
    session_queue: usize,

    /// What happens to a client that cannot keep up.
    #[arg(long, env = "CHATBUS_SLOW_CLIENTS", value_enum, default_value_t = SlowClients::Resync)]
    slow_clients: SlowClients,

    /// With `--broker dual`: what a send gets while Kafka is down (`reject`: an `unavailable`
    /// error, nothing silently lost; `degrade-to-fast`: delivered live through Redis but not
    /// stored, so not replayable).
    #[arg(long, env = "CHATBUS_DURABLE_DOWN", value_enum, default_value_t = DurableDown::Reject)]
    durable_down: DurableDown,

    /// With `--broker dual`: the interest-based DualBus, which receives from the brokers only
    /// the rooms with local members (per-room tickets and instance leases in Redis; while a
    /// lease is lapsed the rooms are read from Kafka). Every instance must use the same value
    /// (docs/ARCHITECTURE.md, "Interest-based DualBus").
    #[arg(long, env = "CHATBUS_DUAL_INTEREST")]
    dual_interest: bool,

    /// Serve TLS (https://, wss://) with this PEM certificate chain (leaf first). Read once at
    /// start: not reloaded, restart to change it.
    #[arg(long, env = "CHATBUS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,

    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of `--tls-cert`.
    #[arg(long, env = "CHATBUS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,

    /// Open WebSocket connections one client address may hold; 0 = no limit.
    #[arg(long, env = "CHATBUS_IP_MAX_CONNECTIONS", default_value_t = 0)]
    ip_max_connections: usize,

    /// Handshake attempts per client address per second on average; 0 = no limit.
    #[arg(long, env = "CHATBUS_IP_ATTEMPTS_PER_SEC", default_value_t = 0.0)]
    ip_attempts_per_sec: f64,

    /// Handshake attempts one client address may make in a burst (with
    /// `--ip-attempts-per-sec`).
    #[arg(long, env = "CHATBUS_IP_ATTEMPTS_BURST", default_value_t = 20)]
    ip_attempts_burst: u32,

    /// Reverse proxies whose `X-Forwarded-For` is believed for the per-address limits,
    /// comma-separated IP addresses.
    #[arg(long, env = "CHATBUS_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<std::net::IpAddr>,

    /// WebSocket pings/pongs a connection may send per second on average (burst 10x);
    /// past it the connection is closed with 4008. 0 disables the limit.
    #[arg(long, env = "CHATBUS_CONTROL_RATE_PER_SEC", default_value_t = 2.0)]
    control_rate_per_sec: f64,

    /// Seconds a new connection gets to complete its HTTP upgrade (TLS handshake included).
    #[arg(long, env = "CHATBUS_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    handshake_timeout_secs: u64,

    /// Milliseconds between presence heartbeats of this instance. Every instance must use the
    /// same value: the users of an instance that died go offline after 3 intervals.
    #[arg(
        long,
        env = "CHATBUS_PRESENCE_INTERVAL_MS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    presence_interval_ms: u64,

    /// Turn on the server API (`/api/*`) for callers presenting `Authorization: Bearer <this
    /// key>`; without it every `/api/*` path is a 404. Prefer the environment variable: a
    /// command-line flag is visible to every local user in `ps`.
    #[arg(long, env = "CHATBUS_API_KEY", hide_env_values = true, value_parser = ApiKey::parse)]
    api_key: Option<ApiKey>,

    /// Do not serve the Socket.IO endpoint (`/socket.io/`).
    #[arg(long, env = "CHATBUS_NO_SOCKETIO")]
    no_socketio: bool,

    /// The room Socket.IO clients join at connect and the seed's `event:message` events go to.
    #[arg(long, env = "CHATBUS_SOCKETIO_ROOM", default_value = "general", value_parser = parse_room)]
    socketio_room: Room,

    // Benchmarking only: `--bench-publish-hook-ms` (bench_hook.rs).
    #[command(flatten)]
    bench: bench_hook::BenchArgs,
}

fn parse_room(s: &str) -> Result<Room, String> {
    Room::new(s).map_err(|e| e.to_string())
}

/// `--durable-down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DurableDown {
    /// Refuse the send with `unavailable`.
    Reject,
    /// Deliver live only, without storing.
    DegradeToFast,
}

/// The broker, and a collector of its own counters for `/metrics`.
struct Backend {
    broker: Arc<dyn Broker>,
    metrics: Option<Box<dyn Collector>>,
}

/// The one place the backend is chosen. Redis and Kafka settings come from the environment
/// (`CHATBUS_REDIS_URL` or `CHATBUS_REDIS_CLUSTER`, `CHATBUS_KAFKA_BROKERS`,
/// `CHATBUS_KAFKA_TOPIC`, ...; see the README).
async fn build_broker(args: &Args) -> Result<Backend, BoxError> {
    Ok(match args.broker {
        BrokerKind::Memory => Backend {
            broker: Arc::new(MemoryBroker::with_config(
                MemoryConfig::default()
                    .with_history_len(args.memory_history)
                    .with_history_rooms(args.memory_history_rooms),
            )),
            metrics: None,
        },
        BrokerKind::Redis => {
            let redis = Arc::new(RedisBroker::connect(RedisConfig::from_env()?).await?);
            Backend {
                broker: redis.clone(),
                metrics: Some(Box::new(RedisMetrics(redis))),
            }
        }
        BrokerKind::Kafka => {
            let kafka = Arc::new(KafkaBroker::connect(KafkaConfig::from_env()?).await?);
            Backend {
                broker: kafka.clone(),
                metrics: Some(Box::new(KafkaMetrics(kafka))),
            }
        }
        BrokerKind::Dual => {
            let mut redis_config = RedisConfig::from_env()?;
            if redis_config.is_cluster() && !args.dual_interest {
                // The DualBus merger subscribes to every room (Interest::All), which a Redis
                // Cluster serves only through the broadcast channel; the interest-based one
                // subscribes room by room.
                redis_config = redis_config.with_cluster_broadcast(true);
            }
            if redis_config.history_len > 0 {
                // The DualBus carries Kafka cursors through Redis; a Redis history window would
                // replace them with its own.
                return Err(
                    "--broker dual needs CHATBUS_REDIS_HISTORY=0 (Kafka keeps the history)".into(),
                );
            }
            let fast = RedisBroker::connect(redis_config).await?;
            let durable = KafkaBroker::connect(KafkaConfig::from_env()?).await?;
            let policy = match args.durable_down {
                DurableDown::Reject => DurableDownPolicy::Reject,
                DurableDown::DegradeToFast => DurableDownPolicy::DegradeToFast,
            };
            let bus = Arc::new(DualBus::new(
                fast,
                durable,
                DualConfig::default()
                    .with_policy(policy)
                    .with_interest(args.dual_interest),
            ));
            Backend {
                broker: bus.clone(),
                metrics: Some(Box::new(DualMetrics(bus))),
            }
        }
    })
}

fn ws_config(args: &Args) -> Result<WsConfig, BoxError> {
    let mut config = WsConfig::default()
        .with_max_frame_size(args.max_frame_bytes)
        .with_rate_limit(
            (args.rate_per_sec > 0.0).then_some(RateLimit::new(args.rate_burst, args.rate_per_sec)),
        )
        .with_max_rooms(args.max_rooms)
        .with_max_connections(args.max_connections)
        .with_idle_timeout(Duration::from_secs(args.idle_timeout_secs.max(1)))
        .with_ping_interval(Duration::from_secs(args.ping_interval_secs.max(1)))
        .with_drain_timeout(Duration::from_secs(args.drain_timeout_secs))
        .with_write_delay(Duration::from_millis(args.write_delay_ms))
        .with_handshake_timeout(Duration::from_secs(args.handshake_timeout_secs.max(1)))
        .with_control_rate_limit((args.control_rate_per_sec > 0.0).then(|| {
            // The library default is burst 20 at 2/s; keep that ratio for other rates.
            let burst = (args.control_rate_per_sec * 10.0)
                .ceil()
                .clamp(1.0, 10_000.0) as u32;
            RateLimit::new(burst, args.control_rate_per_sec)
        }))
        .with_ip_limits(
            IpLimits::default()
                .with_max_connections(
                    (args.ip_max_connections > 0).then_some(args.ip_max_connections),
                )
                .with_attempts(
                    (args.ip_attempts_per_sec > 0.0)
                        .then(|| RateLimit::new(args.ip_attempts_burst, args.ip_attempts_per_sec)),
                )
                .with_trusted_proxies(args.trusted_proxies.clone()),
        );
    let origins: Vec<String> = args
        .allowed_origins
        .iter()
        .map(|o| o.trim().to_owned())
        .filter(|o| !o.is_empty())
        .collect();
    config = config.with_allowed_origins(if origins.iter().any(|o| o == "*") {
        AllowedOrigins::Any
    } else {
        AllowedOrigins::SameHost { also: origins }
    });
    let verifier = match (&args.jwt_secret, &args.jwt_public_key) {
        (Some(secret), _) => Some(JwtVerifier::hs256(secret.as_bytes())),
        (None, Some(path)) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read --jwt-public-key {}: {e}", path.display()))?;
            Some(JwtVerifier::rs256_pem(&pem)?)
        }
        (None, None) => None,
    };
    if let Some(mut v) = verifier {
        if let Some(iss) = &args.jwt_issuer {
            v = v.with_issuer(iss);
        }
        if let Some(aud) = &args.jwt_audience {
            v = v.with_audience(aud);
        }
        config = config.with_verifier(v);
    }
    Ok(args.bench.apply(config))
}

/// The rustls configuration of `--tls-cert` / `--tls-key`, or a message naming the file at
/// fault.
fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, BoxError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read --tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("--tls-cert {} holds no certificate", cert.display()).into());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read --tls-key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("--tls-cert and --tls-key do not make a usable pair: {e}"))?;
    // The server speaks HTTP/1.1 only (WebSocket upgrades are HTTP/1.1).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // A second line of defence behind rendering all text with textContent: no scripts
            // or resources from anywhere else, and the socket only to this server.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(INDEX_HTML),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ws): State<WsService>) -> Response {
    if ws.is_shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let broker = ws.chat().hub().broker();
    match broker.health().await {
        Health::Healthy => (
            StatusCode::OK,
            format!("ready: {} broker healthy\n", broker.name()),
        ),
        Health::Degraded(why) => (
            StatusCode::OK,
            format!("ready: {} broker degraded: {why}\n", broker.name()),
        ),
        Health::Down(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {} broker down: {why}\n", broker.name()),
        ),
    }
    .into_response()
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

/// The PostgreSQL store, and the projector that feeds it from the broker's log (unless
/// `--no-projector`).
async fn postgres_store(
    args: &Args,
    broker: Arc<dyn Broker>,
) -> Result<(Arc<dyn Store>, Option<Projector>), BoxError> {
    let url = args
        .postgres_url
        .clone()
        .ok_or("--store postgres needs --postgres-url (or CHATBUS_POSTGRES_URL)")?;
    let store: Arc<dyn Store> = Arc::new(
        PostgresStore::connect(PostgresConfig::new(url))
            .await
            .map_err(|e| format!("cannot open the PostgreSQL store: {e}"))?,
    );
    if args.no_projector {
        return Ok((store, None));
    }
    let projector =
        Projector::spawn(broker, store.clone(), ProjectorConfig::default()).map_err(|e| {
            format!(
                "--store postgres projects the durable log, which the {} broker does not have \
                 (use --broker kafka or dual, or --no-projector with a projector elsewhere): {e}",
                args.broker
            )
        })?;
    Ok((store, Some(projector)))
}

async fn run(args: Args) -> Result<(), BoxError> {
    let Backend {
        broker,
        metrics: broker_metrics,
    } = build_broker(&args).await?;
    let config = ws_config(&args)?;
    // Read before anything is started, so a bad file fails fast with its name.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_config(cert, key)?),
        _ => None,
    };
    let auth = if config.verifier.is_some() {
        "jwt"
    } else {
        "anonymous (?name=)"
    };
    let hub_config = HubConfig::default()
        .with_session_queue(args.session_queue.max(1))
        .with_slow_policy(match args.slow_clients {
            SlowClients::Resync => SlowPolicy::Resync,
            SlowClients::Close => SlowPolicy::Close,
        });
    let presence =
        PresenceConfig::default().with_interval(Duration::from_millis(args.presence_interval_ms));
    let chat = ChatHub::with_config(broker.clone(), hub_config, presence);
    let (chat, projector) = match args.store {
        StoreKind::Memory => (chat, None),
        StoreKind::Postgres => {
            let (store, projector) = postgres_store(&args, broker).await?;
            (chat.with_store(store), projector)
        }
    };
    let ws = WsService::new(chat, config);
    let mut collectors: Vec<Box<dyn Collector>> = broker_metrics.into_iter().collect();
    if let Some(projector) = projector {
        collectors.push(Box::new(ProjectorMetrics(Arc::new(projector))));
    }
    let scrape = Arc::new(Scrape::new(&ws, collectors));

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    let mut app = Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(move |State(ws): State<WsService>| metrics::serve(ws, scrape.clone())),
        )
        .with_state(ws.clone())
        .merge(api::router(ws.clone(), args.api_key.clone()));
    if !args.no_socketio {
        app = app.merge(ws.socketio_router(
            SocketIoConfig::default().with_default_room(args.socketio_room.clone()),
        ));
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(
        %addr,
        broker = %args.broker,
        store = %args.store,
        auth,
        scheme,
        api = args.api_key.is_some(),
        socketio = !args.no_socketio,
        "chat-server started"
    );
    println!("chat-server listening on {scheme}://{addr}/");
    match tls {
        Some(tls) => ws.serve_tls(listener, app, tls, shutdown_signal()).await?,
        None => ws.serve(listener, app, shutdown_signal()).await?,
    }
    tracing::info!("chat-server stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Logs go to stderr (colored only on a terminal); stdout carries the listening URL.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-server: {e}");
            ExitCode::FAILURE
        }
    }
}
