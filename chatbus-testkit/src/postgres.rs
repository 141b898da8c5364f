//! Real PostgreSQL servers for tests.
//!
//! [`Postgres::start`] runs `initdb` into a private temp dir (trust authentication, superuser
//! `postgres`, no fsync) and a `postgres` on a free port of 127.0.0.1, so tests never touch a
//! PostgreSQL the machine happens to run on 5432. The server can be stopped (fast shutdown),
//! killed (SIGKILL), paused (SIGSTOP) and restarted on the same port with the same data, which is what fault
//! tests need. It is killed and its directory removed when the handle is dropped, even if the
//! test panics.
//!
//! ```no_run
//! # async fn f() {
//! let mut pg = chatbus_testkit::postgres::Postgres::start().await;
//! let url = pg.url(); // postgres://postgres@127.0.0.1:<port>/postgres
//! pg.restart().await; // same port, same data
//! pg.pause(); // SIGSTOP: a hung server
//! pg.resume();
//! pg.kill(); // SIGKILL: a crash
//! # }
//! ```
//!
//! PostgreSQL refuses to run as root: as root, `initdb` and `postgres` run as the `postgres`
//! user (Debian's package creates it) through `runuser`, with the directory chowned to it.
//! A kill signals the postmaster's group and each of its children (backends run in sessions
//! of their own), so no backend answers after it and a restart does not find old ones still
//! holding the data directory.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use rustix::process::{kill_process, kill_process_group, Pid, Signal};

use crate::{free_port, require_program};

/// How to install the server, for the failure message when it is missing.
pub const INSTALL_HINT: &str =
    "install Debian's `postgresql` package: apt-get install -y postgresql";

/// How long a start or restart may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The user PostgreSQL runs as when the tests run as root.
const RUN_AS: &str = "postgres";

/// A private PostgreSQL server on a loopback port; killed (and its data removed) on drop.
pub struct Postgres {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Postgres")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .field("running", &self.child.is_some())
            .finish_non_exhaustive()
    }
}

/// The directory holding `initdb`, `postgres` and `pg_isready`: the one of `initdb` on `PATH`,
/// else the newest `/usr/lib/postgresql/*/bin` (Debian keeps them off `PATH`). Panics with
/// the install hint when there is none.
pub fn postgres_bin_dir() -> PathBuf {
    let mut extra: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| d.ok())
                .map(|d| d.path().join("bin").join("initdb"))
                .collect()
        })
        .unwrap_or_default();
    // Newest major first; the names are the major versions ("15", "16").
    extra.sort_by_key(|p| {
        std::cmp::Reverse(
            p.iter()
                .rev()
                .nth(2)
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    let initdb = require_program("initdb", &extra, INSTALL_HINT);
    // A symlink on PATH (`/usr/local/bin/initdb`) stands for the real bin dir.
    let initdb = std::fs::canonicalize(&initdb).unwrap_or(initdb);
    let dir = initdb.parent().map(Path::to_path_buf).unwrap_or_default();
    for program in ["postgres", "pg_isready"] {
        assert!(
            dir.join(program).is_file(),
            "`{program}` is required by this test but was not found next to {}. {INSTALL_HINT}",
            initdb.display()
        );
    }
    dir
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

impl Postgres {
    /// Initialises a fresh cluster and starts it on a free loopback port, waiting until it
    /// accepts connections. Only the default database `postgres` exists. Panics (failing the
    /// test) with the reason and the server's log.
    pub async fn start() -> Self {
        let bin = postgres_bin_dir();
        let dir = match tempfile::Builder::new().prefix("chatbus-pg-").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("cannot create a directory for PostgreSQL: {e}"),
        };
        let mut pg = Self {
            bin,
            port: 0,
            dir,
            child: None,
        };
        pg.initdb();
        // Another process may grab the free port between `free_port` and the server's bind:
        // try a few ports before giving up.
        let mut last_error = String::new();
        for _ in 0..5 {
            pg.port = free_port();
            match pg.spawn_and_wait().await {
                Ok(()) => return pg,
                Err(e) => last_error = e,
            }
        }
        panic!("PostgreSQL did not start: {last_error}");
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres` (trust authentication: no password).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's private directory (`data/` and its log `postgres.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server and its backends at once (SIGKILL to each of them): connections
    /// drop without a goodbye, like a crash. The data stays for [`restart`](Self::restart)
    /// (with `fsync=off`, as of the last write the kernel has).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused server must wake to die promptly and be reaped.
            self.signal_all_quietly(Signal::CONT);
            // Backends call setsid(), so the group signal reaches only the postmaster (and
            // `runuser`); left alone, a backend notices its postmaster died a moment later
            // and may answer one more query meanwhile. Kill them by name too, first.
            if let Some(postmaster) = self.postmaster_pid() {
                for pid in children_of(postmaster) {
                    let _ = kill_process(pid, Signal::KILL);
                }
            }
            if let Some(group) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
                let _ = kill_process_group(group, Signal::KILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server with a fast shutdown (SIGINT to the postmaster: open transactions are
    /// rolled back, clients disconnected, data flushed), waiting up to 10 s before killing it.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // As root the child is `runuser`; the postmaster's own pid is in its lock file.
        let signalled = self
            .postmaster_pid()
            .is_some_and(|pid| kill_process(pid, Signal::INT).is_ok());
        if signalled {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.child = Some(child);
        self.kill();
    }

    /// Freezes the server and its backends (SIGSTOP): connections stay open and connects are
    /// accepted by the kernel, but nothing is answered, like a hung server or a partition.
    pub fn pause(&mut self) {
        self.signal_all(Signal::STOP);
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&mut self) {
        self.signal_all(Signal::CONT);
    }

    fn signal_all_quietly(&self, signal: Signal) {
        if let Some(postmaster) = self.postmaster_pid() {
            for pid in children_of(postmaster).into_iter().chain([postmaster]) {
                let _ = kill_process(pid, signal);
            }
        }
    }

    fn signal_all(&self, signal: Signal) {
        let Some(postmaster) = self.postmaster_pid() else {
            panic!("no postmaster.pid: is PostgreSQL running?");
        };
        for pid in children_of(postmaster).into_iter().chain([postmaster]) {
            let _ = kill_process(pid, signal);
        }
    }

    /// Starts the server again on the same port with the same data directory (stopping it
    /// first if it runs). What was committed before a stop is back.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop().await;
        }
        // After a kill, the old backends may still hold the data directory for a moment:
        // retry until the deadline.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "PostgreSQL did not restart on port {}: {e}",
                        self.port
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn postmaster_pid(&self) -> Option<Pid> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
            .and_then(Pid::from_raw)
    }

    /// A command for `program` of the PostgreSQL bin dir, run as the `postgres` user when
    /// this process is root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", RUN_AS, "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn initdb(&self) {
        if is_root() {
            let out = Command::new("chown")
                .args(["-R", &format!("{RUN_AS}:")])
                .arg(self.dir.path())
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => panic!(
                    "cannot chown {} to {RUN_AS} (does the user exist? {INSTALL_HINT}): {}",
                    self.dir.path().display(),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => panic!("cannot run chown: {e}"),
            }
        }
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("cannot run initdb: {e}"),
        }
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("cannot open the log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1"])
            .args(["-c", "fsync=off"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // A group of its own: `kill` reaches `runuser` and the postmaster together.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run postgres: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !self.is_running() {
                self.child = None;
                return Err(format!(
                    "postgres exited on port {}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            // Ready means it accepts a session, not merely TCP: during startup and recovery
            // it answers "the database system is starting up".
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", "postgres", "-d", "postgres", "-t", "1"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "postgres did not accept connections on port {} within {START_TIMEOUT:?}; \
                     log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The processes whose parent is `parent` (from `/proc`; empty where there is none).
fn children_of(parent: Pid) -> Vec<Pid> {
    let parent = parent.as_raw_nonzero().get();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|d| d.ok())
        .filter_map(|d| d.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid ...`; the name may hold spaces and parentheses.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = stat.rsplit_once(')')?.1.to_owned();
                    after.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(parent)
        })
        .filter_map(Pid::from_raw)
        .collect()
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}
