//! A real Tansu (Kafka-compatible broker) process for tests, with SQLite storage in a temp dir.
//!
//! ```no_run
//! # async fn f() {
//! let mut kafka = chatbus_testkit::tansu::Tansu::start().await;
//! let bootstrap = kafka.bootstrap(); // "127.0.0.1:<port>"
//! kafka.kill().await; // SIGKILL: a crash
//! kafka.restart().await; // same port, same database
//! # }
//! ```
//!
//! Readiness is checked at the Kafka protocol level (an `ApiVersions` and a `Metadata` request
//! answered with the right correlation id), not by the port being open: Tansu binds its
//! listener before its storage is usable.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, require_program};

/// The command that installs the `tansu` binary these tests need.
pub const INSTALL_HINT: &str =
    "Install it with: cargo install tansu --version 0.6.0 --locked --features libsql";

/// How long a start or restart may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variables Tansu reads as defaults for its flags; cleared for the child so the
/// developer's shell cannot redirect the test broker.
const TANSU_ENV: &[&str] = &[
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// A running (or stopped) Tansu broker on `127.0.0.1:<port>`. Killed on drop; the temp dir
/// with its database is deleted then.
#[derive(Debug)]
pub struct Tansu {
    program: PathBuf,
    port: u16,
    // The address given to clients in metadata, when it is not the listener's own.
    advertised: Option<SocketAddr>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Finds the `tansu` binary on `PATH` or in `~/.cargo/bin`, or panics with the install command.
pub fn tansu_program() -> PathBuf {
    let mut extra = Vec::new();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        extra.push(PathBuf::from(home).join("bin").join("tansu"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        extra.push(PathBuf::from(home).join(".cargo").join("bin").join("tansu"));
    }
    require_program("tansu", &extra, INSTALL_HINT)
}

impl Tansu {
    /// Starts Tansu on a free loopback port with a fresh SQLite database, and waits until it
    /// answers Kafka requests. Panics (failing the test) with the reason and Tansu's log.
    pub async fn start() -> Self {
        Self::start_on(free_port(), None).await
    }

    /// Starts Tansu on `port`, telling Kafka clients in its metadata to reach it at
    /// `advertised`: a [`FaultProxy`](crate::proxy::FaultProxy) in front of it (started first,
    /// with upstream `127.0.0.1:port`). A Kafka client uses the bootstrap address only for its
    /// first request and then connects to the advertised one, so without this only the
    /// bootstrap connection would go through the proxy.
    pub async fn start_advertising(port: u16, advertised: SocketAddr) -> Self {
        Self::start_on(port, Some(advertised)).await
    }

    async fn start_on(port: u16, advertised: Option<SocketAddr>) -> Self {
        let program = tansu_program();
        let dir = match tempfile::Builder::new().prefix("chatbus-tansu-").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("cannot create a temp dir for Tansu: {e}"),
        };
        let mut tansu = Self {
            program,
            port,
            advertised,
            dir,
            child: None,
        };
        tansu.spawn_and_wait().await;
        tansu
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The bootstrap address for Kafka clients, `127.0.0.1:<port>`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The SQLite database file.
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("tansu.db")
    }

    /// Tansu's combined stdout/stderr of every run so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Kills the process with SIGKILL (a crash) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            wait_exit(&mut child, Duration::from_secs(10)).await;
        }
    }

    /// Stops the process with SIGTERM (a graceful shutdown), waiting up to 10 s before
    /// falling back to SIGKILL.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // std has no SIGTERM and this crate forbids unsafe (libc::kill): use kill(1).
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        if !sent || !wait_exit(&mut child, Duration::from_secs(10)).await {
            let _ = child.kill();
            wait_exit(&mut child, Duration::from_secs(10)).await;
        }
    }

    /// Starts it again on the same port with the same database (after `kill` or `stop`; a
    /// running broker is killed first).
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn_and_wait().await;
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    async fn spawn_and_wait(&mut self) {
        let started = Instant::now();
        loop {
            let child = self.spawn();
            self.child = Some(child);
            match self.wait_ready(started).await {
                Ok(()) => return,
                // The port of a just-killed broker can take a moment to become free again.
                Err(reason) if started.elapsed() < START_TIMEOUT && !self.is_running() => {
                    note(&reason);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(reason) => {
                    self.kill().await;
                    panic!(
                        "Tansu did not become ready on {}: {reason}\n--- tansu log ---\n{}",
                        self.bootstrap(),
                        tail(&self.log(), 4000)
                    );
                }
            }
        }
    }

    fn spawn(&self) -> Child {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = self
            .advertised
            .map_or_else(|| url.clone(), |a| format!("tcp://{a}"));
        // Tansu resolves `sqlite:///a/b` relative to its working directory (it becomes
        // `<cwd>/a/b`); an absolute path needs four slashes. Run it in the temp dir too, so
        // that even a relative reading lands there.
        let storage = format!("sqlite:///{}", self.db_path().display());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path());
        let (out, err) = match log.and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
            Err(_) => (Stdio::null(), Stdio::null()),
        };
        let mut cmd = Command::new(&self.program);
        for var in TANSU_ENV {
            cmd.env_remove(var);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        cmd.current_dir(self.dir.path())
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", &storage])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("cannot run {}: {e}. {INSTALL_HINT}", self.program.display()),
        }
    }

    async fn wait_ready(&mut self, started: Instant) -> Result<(), String> {
        let mut last = String::from("not tried");
        while started.elapsed() < START_TIMEOUT {
            if !self.is_running() {
                return Err(format!("the process exited ({last})"));
            }
            let port = self.port;
            match tokio::task::spawn_blocking(move || probe(port)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = e,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "not ready within {START_TIMEOUT:?} (last probe: {last})"
        ))
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn note(reason: &str) {
    eprintln!("tansu start attempt failed, retrying: {reason}");
}

fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Waits up to `limit` for the child to exit; true if it did.
async fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if start.elapsed() >= limit => return false,
            Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// One Kafka request/response round trip: `ApiVersions` v0 then `Metadata` v0 (all topics),
/// each answered with our correlation id and, for `ApiVersions`, error code 0.
fn probe(port: u16) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(2))))
        .map_err(|e| e.to_string())?;
    // ApiVersions (key 18) v0: empty body.
    let body = request(18, 0, 7, &[]);
    let resp = round_trip(&mut s, &body, 7)?;
    let error = resp
        .get(..2)
        .map(|b| i16::from_be_bytes([b[0], b[1]]))
        .ok_or("short ApiVersions response")?;
    if error != 0 {
        return Err(format!("ApiVersions error code {error}"));
    }
    // Metadata (key 3) v0: topics = [] means every topic; exercises the storage.
    let body = request(3, 0, 8, &0i32.to_be_bytes());
    round_trip(&mut s, &body, 8).map(|_| ())
}

fn request(api_key: i16, version: i16, correlation: i32, payload: &[u8]) -> Vec<u8> {
    let client = b"chatbus-testkit";
    let mut msg = Vec::new();
    msg.extend_from_slice(&api_key.to_be_bytes());
    msg.extend_from_slice(&version.to_be_bytes());
    msg.extend_from_slice(&correlation.to_be_bytes());
    msg.extend_from_slice(&(client.len() as i16).to_be_bytes());
    msg.extend_from_slice(client);
    msg.extend_from_slice(payload);
    let mut framed = (msg.len() as i32).to_be_bytes().to_vec();
    framed.extend_from_slice(&msg);
    framed
}

/// Sends a framed request and returns the response body after the correlation id.
fn round_trip(s: &mut TcpStream, framed: &[u8], correlation: i32) -> Result<Vec<u8>, String> {
    s.write_all(framed).map_err(|e| format!("write: {e}"))?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| format!("read: {e}"))?;
    let len = usize::try_from(i32::from_be_bytes(len)).map_err(|_| "negative length")?;
    if !(4..=16 << 20).contains(&len) {
        return Err(format!("implausible response length {len}"));
    }
    let mut resp = vec![0u8; len];
    s.read_exact(&mut resp).map_err(|e| format!("read: {e}"))?;
    let got = i32::from_be_bytes([resp[0], resp[1], resp[2], resp[3]]);
    if got != correlation {
        return Err(format!("correlation id {got}, expected {correlation}"));
    }
    Ok(resp.split_off(4))
}
