//! Test support for chatbus: real services on free loopback ports.
//!
//! Tests never depend on a service the machine happens to run (such as a Redis on 6379): each
//! starts its own process on a free port of 127.0.0.1, which it can stop and restart for fault
//! tests. A missing program is a test failure whose message says what to install, never a
//! silent skip. Between a server and a service, a [`proxy::FaultProxy`] injects network faults
//! (cut, reset, blackholed or slow links).

pub mod chat;
pub mod client;
pub mod postgres;
pub mod proxy;
pub mod redis;
pub mod redis_cluster;
pub mod rng;
pub mod tansu;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound then released; the OS will not hand it out again soon).
pub fn free_port() -> u16 {
    match TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()) {
        Ok(addr) => addr.port(),
        Err(e) => panic!("cannot bind a loopback port: {e}"),
    }
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`, or panics after
/// `timeout` naming `what`.
pub async fn wait_for_port(port: u16, timeout: Duration, what: &str) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "{what} did not accept connections on {addr} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finds `program` on `PATH` (or at one of `extra` paths), or panics with `install_hint`.
pub fn require_program(program: &str, extra: &[PathBuf], install_hint: &str) -> PathBuf {
    let from_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(program))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain(extra.iter().cloned())
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{program}` is required by this test but was not found. {install_hint}")
        })
}

/// The resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`), or `None` where
/// it cannot be read (the process is gone, or this is not Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
