//! One engine: a thread with a mio event loop that owns a share of the clients.
//!
//! Why not one tokio task per connection: at 100,000+ deliveries per second the generator
//! shares two cores with the server it measures, so it must cost far less than the server per
//! delivery. Here all sockets of an engine are edge-triggered in one epoll set; each readable
//! socket is drained into one shared 256 KiB buffer and every complete frame is handled in
//! place (no per-frame allocation, no JSON parsing of messages). Only a partial frame at the
//! end of a read is copied into the connection's own buffer, so an idle connection holds no
//! buffer at all.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::plan::{new_hist, Bucket, Cmd, HistData, Plan, Reply, StepStats};
use crate::proto::{self, Body, Incoming, Protocol};
use crate::ws::{self, Handshake, Parsed};

const WAKER: Token = Token(usize::MAX);
/// One read syscall takes up to this much: large enough to drain a busy socket in few reads.
const SCRATCH: usize = 256 * 1024;
/// Linux `EINPROGRESS`: a non-blocking connect has started.
const EINPROGRESS: i32 = 115;
/// Time buckets kept for the series (e.g. 250 ms × 4,000 = 16 minutes, far above any run).
const MAX_BUCKETS: u64 = 4_000;

/// Unix time in microseconds.
pub(crate) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not started yet.
    Waiting,
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent, waiting for `101`.
    Upgrading,
    /// WebSocket open; waiting for `welcome` (chatbus) or the Engine.IO open packet.
    Opening,
    /// `join` (chatbus) or `40` (Socket.IO) sent, waiting for the answer.
    Joining,
    /// Member of its room, receiving.
    Ready,
    /// Never became ready.
    Failed,
    /// Was ready, then the connection ended.
    Closed,
}

/// Per (receiver, sender): what arrived so far.
#[derive(Debug, Default)]
struct Track {
    /// The next sequence number expected.
    next: u32,
    /// Sequence numbers below `next` not received yet (usually empty).
    missing: Vec<u32>,
}

/// What one received sequence number was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// The next expected, or past a gap (the gap is remembered).
    InOrder,
    /// Fills an earlier gap: arrived out of order.
    Late,
    /// Already received.
    Duplicate,
}

/// Gaps remembered per (receiver, sender) at most; past it a gap still counts as loss (the
/// delivered count is what loss is computed from), it just cannot be filled late any more.
const MAX_MISSING: usize = 100_000;

impl Track {
    fn accept(&mut self, seq: u32) -> Seen {
        if seq == self.next {
            self.next = self.next.saturating_add(1);
            Seen::InOrder
        } else if seq > self.next {
            let room = MAX_MISSING.saturating_sub(self.missing.len());
            let gap_end = seq.min(self.next.saturating_add(room as u32));
            self.missing.extend(self.next..gap_end);
            self.next = seq.saturating_add(1);
            Seen::InOrder
        } else if let Some(p) = self.missing.iter().position(|&m| m == seq) {
            self.missing.swap_remove(p);
            Seen::Late
        } else {
            Seen::Duplicate
        }
    }
}

#[derive(Debug)]
struct Client {
    gid: u32,
    room: u32,
    state: State,
    started: Instant,
    sock: Option<TcpStream>,
    /// Bytes of an incomplete frame (or handshake answer) from the previous read.
    rbuf: Vec<u8>,
    /// Bytes the socket would not take yet.
    wbuf: Vec<u8>,
    /// A fragmented message being reassembled (never seen from our servers, but legal).
    frag: Vec<u8>,
    /// One per sender of the room, by slot.
    tracks: Vec<Track>,
    /// Index into `Engine::senders` when this client sends.
    sender: Option<usize>,
}

#[derive(Debug)]
struct SenderState {
    client: usize,
    /// Global sender number (in the body).
    id: u32,
    room: u32,
    /// Next sequence number (= messages sent so far, all steps).
    seq: u32,
    /// Acks and errors received for its sends, all steps.
    answered: u32,
    sent_step: u64,
    rejected_step: u64,
    /// Offset of this sender's schedule within a period, so senders do not fire together.
    offset_us: f64,
}

#[derive(Debug)]
enum Phase {
    Idle,
    Sending {
        start_us: u64,
        rate: f64,
        total: u64,
        end_us: u64,
        ack_wait_ms: u64,
    },
    AckWait {
        deadline_us: u64,
    },
    Draining {
        expected: u64,
        deadline_us: u64,
    },
}

struct StepAcc {
    unique: u64,
    dups: u64,
    reordered: u64,
    foreign: u64,
    lagged: u64,
    closed: u64,
    errors: BTreeMap<String, u64>,
    first_us: u64,
    last_us: u64,
    hist: Histogram<u64>,
    max_late_us: u64,
}

impl StepAcc {
    fn new() -> Self {
        Self {
            unique: 0,
            dups: 0,
            reordered: 0,
            foreign: 0,
            lagged: 0,
            closed: 0,
            errors: BTreeMap::new(),
            first_us: 0,
            last_us: 0,
            hist: new_hist(3),
            max_late_us: 0,
        }
    }
}

/// The engine of one thread.
pub(crate) struct Engine {
    plan: Plan,
    poll: Poll,
    cmds: Receiver<Cmd>,
    replies: Sender<(u32, Reply)>,
    clients: Vec<Client>,
    senders: Vec<SenderState>,
    scratch: Vec<u8>,
    text: String,
    rng: u64,
    // Connecting.
    queue: VecDeque<usize>,
    pending: Vec<usize>,
    connecting: bool,
    connect_since: Instant,
    connect_started: u64,
    connected_upto: u32,
    ready: u32,
    failed: u32,
    conn_errors: BTreeMap<String, u64>,
    last_progress: Instant,
    // Loading.
    phase: Phase,
    step: StepAcc,
    epoch_us: u64,
    series: Vec<Option<(u64, Histogram<u64>)>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("engine", &self.plan.engine)
            .field("clients", &self.clients.len())
            .finish_non_exhaustive()
    }
}

/// Starts an engine thread. Commands go through the returned sender; call `Waker::wake` after
/// each so the event loop notices.
pub(crate) fn spawn(
    plan: Plan,
    replies: Sender<(u32, Reply)>,
) -> io::Result<(Sender<Cmd>, Arc<Waker>, std::thread::JoinHandle<()>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = std::sync::mpsc::channel();
    let engine = Engine::new(plan, poll, rx, replies);
    let handle = std::thread::Builder::new()
        .name(format!("engine-{}", engine.plan.engine))
        .spawn(move || engine.run())?;
    Ok((tx, waker, handle))
}

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

fn reason(e: &io::Error) -> String {
    format!("{:?}", e.kind())
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Engine {
    fn new(plan: Plan, poll: Poll, cmds: Receiver<Cmd>, replies: Sender<(u32, Reply)>) -> Self {
        let mut clients = Vec::new();
        let mut senders = Vec::new();
        let now = Instant::now();
        for gid in (0..plan.clients).filter(|&i| plan.owns(i)) {
            let sender = plan.sender_of(gid).map(|id| {
                senders.push(SenderState {
                    client: clients.len(),
                    id,
                    room: plan.room_of_sender(id),
                    seq: 0,
                    answered: 0,
                    sent_step: 0,
                    rejected_step: 0,
                    offset_us: 0.0,
                });
                senders.len() - 1
            });
            clients.push(Client {
                gid,
                room: plan.room_of(gid),
                state: State::Waiting,
                started: now,
                sock: None,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                frag: Vec::new(),
                tracks: Vec::new(),
                sender,
            });
        }
        let rng = plan.inst ^ (u64::from(plan.engine) << 32) ^ 0x5eed;
        Self {
            plan,
            poll,
            cmds,
            replies,
            clients,
            senders,
            scratch: vec![0; SCRATCH],
            text: String::with_capacity(4096),
            rng,
            queue: VecDeque::new(),
            pending: Vec::new(),
            connecting: false,
            connect_since: now,
            connect_started: 0,
            connected_upto: 0,
            ready: 0,
            failed: 0,
            conn_errors: BTreeMap::new(),
            last_progress: now,
            phase: Phase::Idle,
            step: StepAcc::new(),
            epoch_us: 0,
            series: Vec::new(),
        }
    }

    fn reply(&self, r: Reply) {
        // The controller going away ends the run anyway (the command channel closes too).
        let _ = self.replies.send((self.plan.engine, r));
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(4096);
        loop {
            let timeout = match self.phase {
                Phase::Sending { .. } => Duration::from_millis(1),
                _ if self.connecting => Duration::from_millis(2),
                _ => Duration::from_millis(50),
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.reply(Reply::Fatal(format!("poll: {e}")));
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == WAKER {
                    continue;
                }
                let idx = ev.token().0;
                if idx >= self.clients.len() {
                    continue;
                }
                if self.clients[idx].state == State::Connecting {
                    self.finish_connect(idx);
                }
                if ev.is_writable() {
                    self.flush(idx);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.on_readable(idx, ev.is_read_closed() || ev.is_error());
                }
            }
            loop {
                match self.cmds.try_recv() {
                    Ok(Cmd::Stop) => {
                        self.stop();
                        self.reply(Reply::Stopped);
                        return;
                    }
                    Ok(cmd) => self.command(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.stop();
                        return;
                    }
                }
            }
            self.tick();
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Connect { upto } => {
                for (idx, c) in self.clients.iter().enumerate() {
                    if c.gid >= self.connected_upto && c.gid < upto {
                        self.queue.push_back(idx);
                    }
                }
                self.connected_upto = self.connected_upto.max(upto);
                self.connecting = true;
                self.connect_since = Instant::now();
                self.connect_started = 0;
            }
            Cmd::Send {
                start_us,
                epoch_us,
                rate,
                duration_ms,
                ack_wait_ms,
            } => {
                self.epoch_us = epoch_us;
                self.step = StepAcc::new();
                let total_senders = f64::from(self.plan.senders.max(1));
                for s in &mut self.senders {
                    s.sent_step = 0;
                    s.rejected_step = 0;
                    s.offset_us = if rate > 0.0 {
                        f64::from(s.id) / total_senders / rate * 1e6
                    } else {
                        0.0
                    };
                }
                let total = (rate * duration_ms as f64 / 1000.0).round().max(0.0) as u64;
                self.phase = Phase::Sending {
                    start_us,
                    rate,
                    total,
                    end_us: start_us + duration_ms * 1000,
                    ack_wait_ms,
                };
            }
            Cmd::Drain {
                expected,
                deadline_us,
            } => {
                self.phase = Phase::Draining {
                    expected,
                    deadline_us,
                };
            }
            Cmd::Series => {
                let buckets = self
                    .series
                    .iter()
                    .enumerate()
                    .filter_map(|(i, b)| {
                        b.as_ref().map(|(n, h)| Bucket {
                            index: i as u64,
                            deliveries: *n,
                            latency: HistData::from_hist(h),
                        })
                    })
                    .collect();
                self.reply(Reply::Series(buckets));
            }
            Cmd::Stop => {}
        }
    }

    fn tick(&mut self) {
        if self.connecting {
            self.tick_connect();
        }
        let now_us = unix_us();
        match self.phase {
            Phase::Idle => {}
            Phase::Sending {
                start_us,
                rate,
                total,
                end_us,
                ack_wait_ms,
            } => {
                self.tick_send(now_us, start_us, rate, total);
                let all_sent = self
                    .senders
                    .iter()
                    .all(|s| s.sent_step >= total || self.clients[s.client].state != State::Ready);
                if now_us >= end_us && all_sent {
                    self.phase = Phase::AckWait {
                        deadline_us: now_us + ack_wait_ms * 1000,
                    };
                }
            }
            Phase::AckWait { deadline_us } => {
                let waiting = self.plan.protocol == Protocol::Chatbus
                    && self.senders.iter().any(|s| {
                        s.answered < s.seq && self.clients[s.client].state == State::Ready
                    });
                if !waiting || now_us >= deadline_us {
                    self.send_done();
                    self.phase = Phase::Idle;
                }
            }
            Phase::Draining {
                expected,
                deadline_us,
            } => {
                if self.step.unique >= expected || now_us >= deadline_us {
                    self.drained();
                    self.phase = Phase::Idle;
                }
            }
        }
    }

    // ---- connecting ------------------------------------------------------------------------

    fn tick_connect(&mut self) {
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

    fn start_connect(&mut self, idx: usize) {
        let gid = self.clients[idx].gid;
        let target = &self.plan.targets[gid as usize % self.plan.targets.len()];
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

    fn ws_key(&self, gid: u32) -> String {
        let mut x = self.plan.inst ^ u64::from(gid).rotate_left(17);
        let a = splitmix(&mut x).to_le_bytes();
        let b = splitmix(&mut x).to_le_bytes();
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&a);
        nonce[8..].copy_from_slice(&b);
        ws::key(nonce)
    }

    fn finish_connect(&mut self, idx: usize) {
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
        let target = &self.plan.targets[gid as usize % self.plan.targets.len()];
        let path = match self.plan.protocol {
            Protocol::Chatbus => {
                let sep = if target.path.contains('?') { '&' } else { '?' };
                format!("{}{sep}name=lg{gid}", target.path)
            }
            Protocol::Socketio => target.path.clone(),
        };
        let req = ws::upgrade_request(&target.host, &path, &self.ws_key(gid));
        let c = &mut self.clients[idx];
        c.state = State::Upgrading;
        c.wbuf.extend_from_slice(&req);
        self.flush(idx);
    }

    /// A client that never became ready gives up (`closed` for one that was ready).
    fn fail(&mut self, idx: usize, why: &str) {
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

    fn became_ready(&mut self, idx: usize) {
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
    fn closed(&mut self, idx: usize, why: &str) {
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

    // ---- reading ---------------------------------------------------------------------------

    fn is_open(&self, idx: usize) -> bool {
        self.clients[idx].sock.is_some()
    }

    /// Reads what the socket has. `to_the_end`: keep reading until `WouldBlock` even after a
    /// short read (needed to see an EOF that came with the last data).
    fn on_readable(&mut self, idx: usize, to_the_end: bool) {
        let mut scratch = std::mem::take(&mut self.scratch);
        while let Some(sock) = self.clients[idx].sock.as_mut() {
            match sock.read(&mut scratch) {
                Ok(0) => {
                    self.closed(idx, "eof");
                    break;
                }
                Ok(n) => {
                    // One clock read per read syscall: frames of one read arrived together.
                    let now_us = unix_us();
                    self.ingest(idx, &scratch[..n], now_us);
                    if n < scratch.len() && !to_the_end {
                        // A short read emptied the receive queue. Linux's edge-triggered epoll
                        // reports every later arrival as a new edge, so the extra read that
                        // would only return WouldBlock is skipped: at 100k+ deliveries/s that
                        // is a syscall per wake-up saved.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.closed(idx, &reason(&e));
                    break;
                }
            }
        }
        self.scratch = scratch;
        if self.is_open(idx) && !self.clients[idx].wbuf.is_empty() {
            self.flush(idx);
        }
    }

    fn ingest(&mut self, idx: usize, data: &[u8], now_us: u64) {
        if self.clients[idx].rbuf.is_empty() {
            let used = self.consume(idx, data, now_us);
            if used < data.len() && self.is_open(idx) {
                self.clients[idx].rbuf.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.clients[idx].rbuf);
            buf.extend_from_slice(data);
            let used = self.consume(idx, &buf, now_us);
            if self.is_open(idx) && used < buf.len() {
                buf.drain(..used);
                self.clients[idx].rbuf = buf;
            }
            // Otherwise the buffer is dropped: an idle connection keeps no allocation.
        }
    }

    /// Handles the complete frames at the start of `buf`; returns the bytes used.
    fn consume(&mut self, idx: usize, buf: &[u8], now_us: u64) -> usize {
        let mut pos = 0;
        if self.clients[idx].state == State::Upgrading {
            let key = self.ws_key(self.clients[idx].gid);
            match ws::check_response(buf, &key) {
                Handshake::Partial => return 0,
                Handshake::Failed(why) => {
                    self.fail(idx, &format!("upgrade: {why}"));
                    return buf.len();
                }
                Handshake::Done(n) => {
                    pos = n;
                    self.clients[idx].state = State::Opening;
                }
            }
        }
        while pos < buf.len() && self.is_open(idx) {
            match ws::parse_frame(&buf[pos..]) {
                Parsed::Partial => break,
                Parsed::Invalid(why) => {
                    self.closed(idx, why);
                    return buf.len();
                }
                Parsed::Frame(f, used) => {
                    pos += used;
                    self.on_frame(idx, f, now_us);
                }
            }
        }
        pos
    }

    fn on_frame(&mut self, idx: usize, f: ws::Frame<'_>, now_us: u64) {
        match f.opcode {
            ws::OP_PING => self.queue_frame(idx, ws::OP_PONG, f.payload),
            ws::OP_PONG => {}
            ws::OP_CLOSE => {
                let code = f
                    .payload
                    .get(..2)
                    .map_or(1005, |b| u16::from_be_bytes([b[0], b[1]]));
                self.closed(idx, &format!("close {code}"));
            }
            ws::OP_TEXT | ws::OP_BINARY if f.fin => self.on_text(idx, f.payload, now_us),
            ws::OP_TEXT | ws::OP_BINARY => {
                self.clients[idx].frag = f.payload.to_vec();
            }
            ws::OP_CONT => {
                self.clients[idx].frag.extend_from_slice(f.payload);
                if f.fin {
                    let whole = std::mem::take(&mut self.clients[idx].frag);
                    self.on_text(idx, &whole, now_us);
                }
            }
            _ => self.closed(idx, "unknown opcode"),
        }
    }

    fn on_text(&mut self, idx: usize, text: &[u8], now_us: u64) {
        let incoming = match self.plan.protocol {
            Protocol::Chatbus => proto::classify_chatbus(text),
            Protocol::Socketio => proto::classify_socketio(text),
        };
        let state = self.clients[idx].state;
        match incoming {
            Incoming::Message(body) => self.on_message(idx, body, now_us),
            Incoming::Welcome if state == State::Opening => {
                let join = proto::chatbus_join(self.clients[idx].room);
                self.clients[idx].state = State::Joining;
                self.queue_frame(idx, ws::OP_TEXT, &join);
            }
            Incoming::Joined if state == State::Joining => self.became_ready(idx),
            Incoming::EioOpen if state == State::Opening => {
                self.clients[idx].state = State::Joining;
                self.queue_frame(idx, ws::OP_TEXT, b"40");
            }
            Incoming::SioConnected if state == State::Joining => self.became_ready(idx),
            Incoming::EioPing => self.queue_frame(idx, ws::OP_TEXT, b"3"),
            Incoming::Ack => {
                if let Some(s) = self.clients[idx].sender {
                    self.senders[s].answered += 1;
                }
            }
            Incoming::Error(code, cid) => {
                if state != State::Ready {
                    self.fail(idx, &format!("error {code}"));
                    return;
                }
                *self.step.errors.entry(code).or_default() += 1;
                if let (Some(s), Some(_)) = (self.clients[idx].sender, cid) {
                    self.senders[s].answered += 1;
                    self.senders[s].rejected_step += 1;
                }
            }
            Incoming::Lagged => self.step.lagged += 1,
            Incoming::SioClosed => self.closed(idx, "socket.io disconnect"),
            _ => {}
        }
    }

    fn on_message(&mut self, idx: usize, body: &[u8], now_us: u64) {
        let Some(b) = proto::parse_body(body) else {
            self.step.foreign += 1;
            return;
        };
        let plan = &self.plan;
        let c = &mut self.clients[idx];
        if b.inst != plan.inst
            || b.sender >= plan.senders
            || plan.room_of_sender(b.sender) != c.room
        {
            self.step.foreign += 1;
            return;
        }
        let Some(t) = c.tracks.get_mut(plan.slot_of_sender(b.sender) as usize) else {
            self.step.foreign += 1;
            return;
        };
        match t.accept(b.seq) {
            Seen::InOrder => {}
            Seen::Late => self.step.reordered += 1,
            Seen::Duplicate => {
                self.step.dups += 1;
                return;
            }
        }
        let lat = now_us.saturating_sub(b.ts_us).max(1);
        let step = &mut self.step;
        step.unique += 1;
        step.hist.saturating_record(lat);
        if step.first_us == 0 {
            step.first_us = now_us;
        }
        step.last_us = step.last_us.max(now_us);
        if self.epoch_us > 0 && now_us >= self.epoch_us {
            let i = (now_us - self.epoch_us) / (self.plan.bucket_ms * 1000).max(1);
            if i < MAX_BUCKETS {
                let i = i as usize;
                if self.series.len() <= i {
                    self.series.resize_with(i + 1, || None);
                }
                let slot = self.series[i].get_or_insert_with(|| (0, new_hist(2)));
                slot.0 += 1;
                slot.1.saturating_record(lat);
            }
        }
    }

    // ---- writing ---------------------------------------------------------------------------

    fn mask(&mut self) -> [u8; 4] {
        (splitmix(&mut self.rng) as u32).to_le_bytes()
    }

    fn queue_frame(&mut self, idx: usize, opcode: u8, payload: &[u8]) {
        let mask = self.mask();
        ws::write_frame(&mut self.clients[idx].wbuf, opcode, payload, mask);
    }

    fn flush(&mut self, idx: usize) {
        let c = &mut self.clients[idx];
        let Some(sock) = c.sock.as_mut() else { return };
        let mut done = 0;
        let mut err = None;
        while done < c.wbuf.len() {
            match sock.write(&c.wbuf[done..]) {
                Ok(0) => {
                    err = Some("write returned 0".to_owned());
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    err = Some(reason(&e));
                    break;
                }
            }
        }
        if done == c.wbuf.len() {
            // Drop the allocation: most connections write once (the handshake) and then only
            // receive.
            c.wbuf = Vec::new();
        } else {
            c.wbuf.drain(..done);
        }
        if let Some(e) = err {
            self.closed(idx, &format!("write: {e}"));
        }
    }

    // ---- sending ---------------------------------------------------------------------------

    fn tick_send(&mut self, now_us: u64, start_us: u64, rate: f64, total: u64) {
        if now_us < start_us || rate <= 0.0 {
            return;
        }
        let period_us = 1e6 / rate;
        for s in 0..self.senders.len() {
            let client = self.senders[s].client;
            if self.clients[client].state != State::Ready {
                continue;
            }
            let since = (now_us - start_us) as f64 - self.senders[s].offset_us;
            if since < 0.0 {
                continue;
            }
            let due = ((since / period_us) as u64 + 1).min(total);
            let mut wrote = false;
            while self.senders[s].sent_step < due {
                let k = self.senders[s].sent_step;
                let late = since - k as f64 * period_us;
                self.step.max_late_us = self.step.max_late_us.max(late as u64);
                let sender = &mut self.senders[s];
                let body = Body {
                    inst: self.plan.inst,
                    sender: sender.id,
                    seq: sender.seq,
                    ts_us: now_us,
                };
                sender.seq += 1;
                sender.sent_step += 1;
                self.text.clear();
                match self.plan.protocol {
                    Protocol::Chatbus => {
                        proto::chatbus_send(&mut self.text, sender.room, body, self.plan.size);
                    }
                    Protocol::Socketio => {
                        proto::socketio_send(&mut self.text, body, self.plan.size)
                    }
                }
                let mask = (splitmix(&mut self.rng) as u32).to_le_bytes();
                ws::write_frame(
                    &mut self.clients[client].wbuf,
                    ws::OP_TEXT,
                    self.text.as_bytes(),
                    mask,
                );
                wrote = true;
            }
            if wrote {
                self.flush(client);
            }
        }
    }

    fn send_done(&mut self) {
        let mut accepted = vec![0u64; self.plan.rooms as usize];
        let (mut sent, mut rejected, mut unacked) = (0, 0, 0);
        for s in &self.senders {
            accepted[s.room as usize] += s.sent_step.saturating_sub(s.rejected_step);
            sent += s.sent_step;
            rejected += s.rejected_step;
            if self.plan.protocol == Protocol::Chatbus {
                unacked += u64::from(s.seq.saturating_sub(s.answered));
            }
        }
        self.reply(Reply::SendDone {
            accepted,
            sent,
            rejected,
            unacked,
            max_late_us: self.step.max_late_us,
        });
    }

    fn drained(&mut self) {
        let step = std::mem::replace(&mut self.step, StepAcc::new());
        let missing_total = self
            .clients
            .iter()
            .flat_map(|c| c.tracks.iter())
            .map(|t| t.missing.len() as u64)
            .sum();
        self.reply(Reply::Drained(StepStats {
            unique: step.unique,
            dups: step.dups,
            reordered: step.reordered,
            foreign: step.foreign,
            lagged: step.lagged,
            closed: step.closed,
            errors: step.errors,
            first_us: step.first_us,
            last_us: step.last_us,
            latency: HistData::from_hist(&step.hist),
            missing_total,
        }));
    }

    fn stop(&mut self) {
        // A polite close (1000, normal closure); the socket is dropped right after, so the
        // server sees the close frame or an EOF, both of which end its session.
        for idx in 0..self.clients.len() {
            if self.is_open(idx) {
                self.queue_frame(idx, ws::OP_CLOSE, &1000u16.to_be_bytes());
                self.flush(idx);
                self.clients[idx].sock = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_tracking() {
        let mut t = Track::default();
        assert_eq!(t.accept(0), Seen::InOrder);
        assert_eq!(t.accept(1), Seen::InOrder);
        assert_eq!(t.accept(1), Seen::Duplicate);
        // 2 and 3 missing.
        assert_eq!(t.accept(4), Seen::InOrder);
        assert_eq!(t.missing.len(), 2);
        assert_eq!(t.accept(3), Seen::Late);
        assert_eq!(t.accept(3), Seen::Duplicate);
        assert_eq!(t.accept(0), Seen::Duplicate);
        assert_eq!(t.missing, vec![2]);
        assert_eq!(t.accept(5), Seen::InOrder);
        // A huge jump does not allocate without bound.
        assert_eq!(t.accept(u32::MAX - 1), Seen::InOrder);
        assert!(t.missing.len() <= MAX_MISSING);
    }
}
