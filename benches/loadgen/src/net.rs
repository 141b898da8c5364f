//! Loopback-only addressing for the scripts and the run: parsing the target URLs (anything not
//! on 127.0.0.0/8 or ::1 is refused), `free-port` and `wait-http`.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::plan::Target;
use crate::proto::Protocol;

/// Parses `ws://host:port/path`, refusing anything that is not loopback.
pub(crate) fn target(url: &str, protocol: Protocol) -> Result<Target, String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url}: only ws:// (or http://) URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let addrs: Vec<SocketAddr> = authority
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e} (give host:port)"))?
        .collect();
    // localhost may resolve to ::1 and 127.0.0.1; every address must be loopback anyway.
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{url}: resolves to nothing"))?;
    if addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "{url}: not a loopback address; the load generator only targets 127.0.0.0/8 or ::1"
        ));
    }
    let path = match (protocol, path) {
        (Protocol::Socketio, "" | "/") => "/socket.io/?EIO=4&transport=websocket".to_owned(),
        (Protocol::Chatbus, "") => "/ws".to_owned(),
        (Protocol::Floor, "") => "/".to_owned(),
        (_, p) => p.to_owned(),
    };
    Ok(Target {
        addr,
        host: authority.to_owned(),
        path,
    })
}

pub(crate) fn free_port() -> Result<ExitCode, String> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    let port = l.local_addr().map_err(|e| e.to_string())?.port();
    println!("{port}");
    Ok(ExitCode::SUCCESS)
}

/// One `GET`; true on a 200 answer.
fn http_ok(addr: SocketAddr, host: &str, path: &str) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

pub(crate) fn wait_http(url: &str, timeout: f64) -> Result<ExitCode, String> {
    let t = target(url, Protocol::Chatbus)?;
    let path = if t.path == "/ws" && !url.ends_with("/ws") {
        "/".to_owned()
    } else {
        t.path
    };
    let end = Instant::now() + Duration::from_secs_f64(timeout);
    while Instant::now() < end {
        if http_ok(t.addr, &t.host, &path) {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("loadgen: {url} did not answer 200 within {timeout} s");
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_loopback() {
        assert!(target("ws://127.0.0.1:9/ws", Protocol::Chatbus).is_ok());
        assert!(target("ws://127.0.0.2:9", Protocol::Chatbus).is_ok());
        assert!(target("ws://10.0.0.1:9/ws", Protocol::Chatbus).is_err());
        assert!(target("ws://8.8.8.8:9/ws", Protocol::Chatbus).is_err());
        assert!(target("wss://127.0.0.1:9/ws", Protocol::Chatbus).is_err());
        let t = target("ws://127.0.0.1:8001", Protocol::Socketio).unwrap();
        assert_eq!(t.path, "/socket.io/?EIO=4&transport=websocket");
        let t = target("ws://127.0.0.1:8001", Protocol::Chatbus).unwrap();
        assert_eq!(t.path, "/ws");
    }
}
