//! Connecting: starts the TCP connects at the planned rate with a bound on handshakes in
//! flight, sends the WebSocket upgrade, times out slow clients, and keeps each client's state
//! (ready, failed, closed) and the connect counts the controller is told about.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};
use socket2::{Domain, SockAddr, Socket, Type};

use super::track::Track;
use super::{reason, splitmix, Engine, State};
use crate::plan::Reply;
use crate::proto::Protocol;
use crate::ws;

/// Linux `EINPROGRESS`: a non-blocking connect has started.
const EINPROGRESS: i32 = 115;

fn open_socket(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    // Frames are small and latency is what we measure: never wait for Nagle.
    s.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        s.bind(&SockAddr::from(SocketAddr::new(ip.into(), 0)))?;
    }
    match s.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(e)
            if e.raw_os_error() == Some(EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(s.into()))
}

impl Engine {
    pub(super) fn tick_connect(&mut self) {
        let now = Instant::now();
        let timeout = Duration::from_millis(self.plan.connect_timeout_ms);
        let mut i = 0;
        while i < self.pending.len() {
            let idx = self.pending[i];
            if now.duration_since(self.clients[idx].started) > timeout {
                let what = format!("timeout ({:?})", self.clients[idx].state).to_lowercase();
                self.fail(idx, &what);
            } else {
                i += 1;
            }
        }
        let rate = f64::from(self.plan.connect_rate) / f64::from(self.plan.engines);
        let allowed = (now.duration_since(self.connect_since).as_secs_f64() * rate) as u64 + 1;
        while self.connect_started < allowed && self.pending.len() < self.plan.max_pending as usize
        {
            let Some(idx) = self.queue.pop_front() else {
                break;
            };
            self.connect_started += 1;
            self.start_connect(idx);
        }
        if now.duration_since(self.last_progress) >= Duration::from_millis(250) {
            self.last_progress = now;
            self.reply(Reply::Progress {
                ready: self.ready,
                failed: self.failed,
                pending: self.pending.len() as u32,
            });
        }
        if self.queue.is_empty() && self.pending.is_empty() {
            self.connecting = false;
            let mut members = vec![0u32; self.plan.rooms as usize];
            for c in &self.clients {
                if c.state == State::Ready {
                    members[c.room as usize] += 1;
                }
            }
            self.reply(Reply::Connected {
                ready: self.ready,
                failed: self.failed,
                errors: self.conn_errors.clone(),
                members,
            });
        }
    }

    pub(super) fn start_connect(&mut self, idx: usize) {
        let gid = self.clients[idx].gid;
        let target = &self.plan.targets[self.plan.target_of(gid)];
        let source = (!self.plan.sources.is_empty())
            .then(|| self.plan.sources[gid as usize % self.plan.sources.len()]);
        let c = &mut self.clients[idx];
        c.started = Instant::now();
        match open_socket(target.addr, source) {
            Ok(mut sock) => {
                if let Err(e) = self.poll.registry().register(
                    &mut sock,
                    Token(idx),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    self.fail(idx, &format!("register: {}", reason(&e)));
                    return;
                }
                c.sock = Some(sock);
                c.state = State::Connecting;
                self.pending.push(idx);
            }
            Err(e) => self.fail(idx, &format!("connect: {}", reason(&e))),
        }
    }

    pub(super) fn ws_key(&self, gid: u32) -> String {
        let mut x = self.plan.inst ^ u64::from(gid).rotate_left(17);
        let a = splitmix(&mut x).to_le_bytes();
        let b = splitmix(&mut x).to_le_bytes();
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&a);
        nonce[8..].copy_from_slice(&b);
        ws::key(nonce)
    }

    pub(super) fn finish_connect(&mut self, idx: usize) {
        let Some(sock) = self.clients[idx].sock.as_ref() else {
            return;
        };
        match sock.take_error() {
            Ok(Some(e)) | Err(e) => {
                self.fail(idx, &format!("connect: {}", reason(&e)));
                return;
            }
            Ok(None) => {}
        }
        match sock.peer_addr() {
            Ok(_) => {}
            // Spurious wake-up: still connecting.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
            Err(e) => {
                self.fail(idx, &format!("connect: {}", reason(&e)));
                return;
            }
        }
        let gid = self.clients[idx].gid;
        let target = &self.plan.targets[self.plan.target_of(gid)];
        let path = match self.plan.protocol {
            Protocol::Chatbus => {
                let sep = if target.path.contains('?') { '&' } else { '?' };
                format!("{}{sep}name=lg{gid}", target.path)
            }
            Protocol::Socketio | Protocol::Floor => target.path.clone(),
        };
        let req = ws::upgrade_request(&target.host, &path, &self.ws_key(gid));
        let c = &mut self.clients[idx];
        c.state = State::Upgrading;
        c.wbuf.extend_from_slice(&req);
        self.flush(idx);
    }

    /// A client that never became ready gives up (`closed` for one that was ready).
    pub(super) fn fail(&mut self, idx: usize, why: &str) {
        let c = &mut self.clients[idx];
        if matches!(c.state, State::Ready | State::Closed | State::Failed) {
            return;
        }
        c.sock = None;
        c.rbuf = Vec::new();
        c.wbuf = Vec::new();
        c.state = State::Failed;
        if let Some(p) = self.pending.iter().position(|&i| i == idx) {
            self.pending.swap_remove(p);
        }
        self.failed += 1;
        *self.conn_errors.entry(why.to_owned()).or_default() += 1;
    }

    pub(super) fn became_ready(&mut self, idx: usize) {
        let senders = self.plan.senders_in_room(self.clients[idx].room) as usize;
        let c = &mut self.clients[idx];
        c.state = State::Ready;
        c.tracks.resize_with(senders, Track::default);
        if let Some(p) = self.pending.iter().position(|&i| i == idx) {
            self.pending.swap_remove(p);
        }
        self.ready += 1;
    }

    /// The connection of a client ended (by the server, an error, or a protocol violation).
    pub(super) fn closed(&mut self, idx: usize, why: &str) {
        match self.clients[idx].state {
            State::Ready => {
                let c = &mut self.clients[idx];
                c.state = State::Closed;
                c.sock = None;
                c.rbuf = Vec::new();
                c.wbuf = Vec::new();
                self.ready -= 1;
                self.step.closed += 1;
                *self
                    .step
                    .errors
                    .entry(format!("closed: {why}"))
                    .or_default() += 1;
            }
            State::Closed | State::Failed => {}
            _ => self.fail(idx, why),
        }
    }
}
