//! One engine: a thread with a mio event loop that owns a share of the clients.
//!
//! Why not one tokio task per connection: at 100,000+ deliveries per second the generator
//! shares two cores with the server it measures, so it must cost far less than the server per
//! delivery. Here all sockets of an engine are edge-triggered in one epoll set; each readable
//! socket is drained into one shared 256 KiB buffer and every complete frame is handled in
//! place (no per-frame allocation, no JSON parsing of messages). Only a partial frame at the
//! end of a read is copied into the connection's own buffer, so an idle connection holds no
//! buffer at all.

//!
//! The loop and its commands are here; the rest of the engine is split by what it does to a
//! socket: [`connect`] (opening and handshakes), [`recv`] (reading and recording deliveries),
//! [`send`] (writing and the senders' schedule), and [`track`] (sequence checks per sender).

mod connect;
mod recv;
mod send;
mod track;

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Poll, Token, Waker};

use crate::plan::{new_hist, Bucket, Cmd, HistData, Plan, Reply, StepStats};
use crate::proto::Protocol;

use self::track::Track;

const WAKER: Token = Token(usize::MAX);
/// One read syscall takes up to this much: large enough to drain a busy socket in few reads.
const SCRATCH: usize = 256 * 1024;

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
}
