//! Real `redis-server` processes for tests.
//!
//! [`RedisServer::start`] runs a private `redis-server` on a free port of 127.0.0.1, protected
//! by a password and without persistence (`--save '' --appendonly no`), so tests never touch a
//! Redis the machine happens to run on 6379. The server can be killed (SIGKILL), stopped
//! gracefully (SIGTERM), paused (SIGSTOP) and restarted on the same port, which is what fault
//! tests need. It is killed when the handle is dropped, even if the test panics.
//!
//! ```no_run
//! # async fn f() {
//! let mut redis = chatbus_testkit::redis::RedisServer::start().await;
//! let url = redis.url(); // redis://:<password>@127.0.0.1:<port>/
//! redis.kill();
//! redis.restart().await;
//! # }
//! ```

use std::fmt;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use crate::{free_port, require_program};

/// How to install the server, for the failure message when it is missing.
pub const INSTALL_HINT: &str =
    "Install it with `apt-get install redis-server` (Debian/Ubuntu) or `brew install redis`.";

/// How long a start or restart may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How a [`RedisServer`] is started.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// The password (`--requirepass`). Default: a fresh random one per server.
    pub password: String,
    /// Append-only-file persistence (`--appendonly yes --appendfsync always`) in the server's
    /// private directory, so data survives a kill and restart. Default: off.
    pub appendonly: bool,
    /// Also listen with TLS on a second port, with a certificate for `127.0.0.1`/`localhost`
    /// signed by a throwaway CA (made with the `openssl` program; see
    /// [`RedisServer::tls_url`] and [`RedisServer::ca_cert`]). Default: off.
    pub tls: bool,
    /// Further `redis-server` arguments, e.g. `["--maxclients", "100"]`.
    pub extra_args: Vec<String>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            password: format!("pw-{}", random_suffix()),
            appendonly: false,
            tls: false,
            extra_args: Vec::new(),
        }
    }
}

impl RedisOptions {
    /// Sets [`password`](Self::password).
    #[must_use]
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = password.into();
        self
    }

    /// Sets [`appendonly`](Self::appendonly).
    #[must_use]
    pub fn with_appendonly(mut self, on: bool) -> Self {
        self.appendonly = on;
        self
    }

    /// Sets [`tls`](Self::tls).
    #[must_use]
    pub fn with_tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    /// Adds `redis-server` arguments.
    #[must_use]
    pub fn with_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
}

fn random_suffix() -> String {
    // Randomness from the std hasher's per-process keys plus the time: good enough to keep
    // concurrent test servers' passwords apart, and no extra dependency.
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", h.finish())
}

/// A private `redis-server` process on a loopback port; killed on drop.
pub struct RedisServer {
    program: PathBuf,
    port: u16,
    tls_port: Option<u16>,
    options: RedisOptions,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .field("running", &self.child.is_some())
            .finish_non_exhaustive()
    }
}

/// The `redis-server` program, or a panic saying how to install it.
pub fn redis_server_program() -> PathBuf {
    require_program("redis-server", &[], INSTALL_HINT)
}

impl RedisServer {
    /// Starts a server with the default [`RedisOptions`] (random password, no persistence).
    pub async fn start() -> Self {
        Self::start_with(RedisOptions::default()).await
    }

    /// Starts a server with `options` on a free loopback port.
    pub async fn start_with(options: RedisOptions) -> Self {
        let program = redis_server_program();
        let dir = match tempfile::Builder::new().prefix("chatbus-redis-").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("cannot create a directory for redis-server: {e}"),
        };
        let mut server = Self {
            program,
            port: 0,
            tls_port: None,
            options,
            dir,
            child: None,
        };
        if server.options.tls {
            if let Err(e) = make_certificates(server.dir.path()) {
                panic!("cannot make TLS certificates for redis-server: {e}");
            }
        }
        // Another process may grab the free port between `free_port` and the server's bind:
        // try a few ports before giving up.
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = free_port();
            if server.options.tls {
                server.tls_port = Some(free_port());
            }
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password it requires.
    pub fn password(&self) -> &str {
        &self.options.password
    }

    /// `redis://:<password>@127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        self.url_with_password(&self.options.password)
    }

    /// The URL with another password (for authentication failure tests).
    pub fn url_with_password(&self, password: &str) -> String {
        format!("redis://:{password}@127.0.0.1:{}/", self.port)
    }

    /// The URL without a password.
    pub fn url_without_password(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The TLS port, when started with [`RedisOptions::tls`].
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// `rediss://:<password>@127.0.0.1:<tls port>/` (verify it with [`ca_cert`](Self::ca_cert)),
    /// when started with [`RedisOptions::tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port
            .map(|p| format!("rediss://:{}@127.0.0.1:{p}/", self.options.password))
    }

    /// The PEM file of the CA that signed the server's TLS certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The server's private working directory (its log and, with `appendonly`, its data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Whether the process was started and not killed or stopped since (it may have exited
    /// by itself; [`is_running`](Self::is_running) checks).
    pub fn is_started(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process is running (it may be paused).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process at once (SIGKILL): connections drop without a goodbye and, without
    /// `appendonly`, all data is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Continue a paused process first so that it can be reaped promptly.
            let _ = self.signal_child(&child, Signal::CONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process gracefully (SIGTERM: Redis closes its clients and, with
    /// `appendonly`, flushes the AOF), waiting up to 10 s before killing it.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = self.signal_child(&child, Signal::CONT);
        if self.signal_child(&child, Signal::TERM).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again on the same port with the same options (stopping it first if
    /// it runs). With `appendonly`, the data written before a stop or kill is back.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop().await;
        }
        // The port may be held briefly by connections in shutdown; retry until the deadline.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "redis-server did not restart on port {}: {e}",
                        self.port
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Freezes the process (SIGSTOP): connections stay open but nothing is answered, like a
    /// hung server or a network partition.
    pub fn pause(&mut self) {
        if let Some(child) = &self.child {
            if let Err(e) = self.signal_child(child, Signal::STOP) {
                panic!("cannot pause redis-server: {e}");
            }
        }
    }

    /// Resumes a paused process (SIGCONT).
    pub fn resume(&mut self) {
        if let Some(child) = &self.child {
            if let Err(e) = self.signal_child(child, Signal::CONT) {
                panic!("cannot resume redis-server: {e}");
            }
        }
    }

    fn signal_child(&self, child: &Child, signal: Signal) -> std::io::Result<()> {
        let pid = i32::try_from(child.id())
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| std::io::Error::other("invalid pid"))?;
        kill_process(pid, signal).map_err(std::io::Error::from)
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--requirepass".into(),
            self.options.password.clone(),
            "--save".into(),
            String::new(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--logfile".into(),
            self.dir.path().join("redis.log").display().to_string(),
            "--daemonize".into(),
            "no".into(),
        ];
        if self.options.appendonly {
            args.extend(
                ["--appendonly", "yes", "--appendfsync", "always"]
                    .iter()
                    .map(|s| (*s).to_owned()),
            );
        } else {
            args.extend(["--appendonly".to_owned(), "no".to_owned()]);
        }
        if let Some(tls_port) = self.tls_port {
            let file = |name: &str| self.dir.path().join(name).display().to_string();
            args.extend([
                "--tls-port".to_owned(),
                tls_port.to_string(),
                "--tls-cert-file".to_owned(),
                file("server.crt"),
                "--tls-key-file".to_owned(),
                file("server.key"),
                "--tls-ca-cert-file".to_owned(),
                file("ca.crt"),
                "--tls-auth-clients".to_owned(),
                "no".to_owned(),
            ]);
        }
        args.extend(self.options.extra_args.iter().cloned());
        args
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let child = Command::new(&self.program)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.program.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !self.is_running() {
                self.child = None;
                return Err(format!(
                    "redis-server exited on port {}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            // Ready means it answers an authenticated PING (not merely accepts TCP): with
            // `appendonly` it may still be loading its data.
            if ping(self.port, &self.options.password).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "redis-server did not answer PING on port {} within {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Makes `ca.crt`/`ca.key` (a throwaway CA) and `server.crt`/`server.key` (for 127.0.0.1 and
/// localhost, signed by that CA) in `dir`, with the `openssl` program.
fn make_certificates(dir: &Path) -> Result<(), String> {
    let openssl = require_program(
        "openssl",
        &[],
        "Install it with `apt-get install openssl` (needed for TLS tests).",
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| e.to_string())?;
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=chatbus test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    ];
    for args in steps {
        let out = Command::new(&openssl)
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("cannot run openssl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "openssl {} failed: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// One authenticated `PING` over a fresh connection, answered `+PONG`.
fn ping(port: u16, password: &str) -> std::io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let req = format!(
        "*2\r\n$4\r\nAUTH\r\n${}\r\n{password}\r\n*1\r\n$4\r\nPING\r\n",
        password.len()
    );
    s.write_all(req.as_bytes())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(7).any(|w| w == b"+PONG\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 || got.len() > 4096 || got.starts_with(b"-") {
            return Err(std::io::Error::other(
                String::from_utf8_lossy(&got).into_owned(),
            ));
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
