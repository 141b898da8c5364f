//! A TCP fault proxy on loopback: network faults between a chat-server and Redis or Kafka.
//!
//! Killing a process is only one way a service goes away. A network can also refuse
//! connections, reset them, swallow packets without an answer (a partition, a dead NAT entry, a
//! hung host) or slow them down, and a client library has to notice each by itself. A
//! [`FaultProxy`] sits between one client (say, one chat-server instance) and one upstream
//! (redis-server, Tansu): point the client at [`FaultProxy::addr`] instead of the service, then
//! switch its [`Mode`] while traffic runs. A mode applies to the connections already open as
//! well as to new ones, at once.
//!
//! ```no_run
//! # async fn f() {
//! use chatbus_testkit::proxy::{FaultProxy, Mode};
//! let redis = chatbus_testkit::redis::RedisServer::start().await;
//! let proxy = FaultProxy::start(([127, 0, 0, 1], redis.port()).into()).await;
//! let url = format!("redis://:{}@{}/", redis.password(), proxy.addr());
//! // ... start a chat-server with CHATBUS_REDIS_URL=url ...
//! proxy.set(Mode::Blackhole); // its Redis hangs
//! proxy.set(Mode::Pass); // and is back
//! # }
//! ```
//!
//! Bounded: every task of the proxy ends when the [`FaultProxy`] is dropped (the connections it
//! still holds are closed then), and each direction of a connection buffers at most
//! [`MAX_QUEUED`] bytes before it stops reading (so a stalled peer back-pressures the sender
//! instead of growing the proxy's memory).

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bytes one direction of a connection holds (read but not yet written) before it stops
/// reading. 4 MiB: more than a Kafka fetch response under test traffic, small enough that a
/// stalled connection cannot eat memory.
pub const MAX_QUEUED: usize = 4 << 20;

/// Limit for connecting to the upstream for a new connection; past it the client's connection is
/// closed (the upstream is down, which is the upstream's fault, not one the proxy injects).
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways, as if the proxy were not there.
    Pass,
    /// A cut link: open connections are closed (FIN to both ends) and new ones refused (nothing
    /// listens on the port, so `connect` fails with `ECONNREFUSED`).
    Drop,
    /// Open connections are reset (RST to both ends, `SO_LINGER` 0) and so is every new one
    /// right after it is accepted.
    Reset,
    /// A hung peer: new connections are accepted and what they send is read and discarded, but
    /// nothing is ever answered, and they are closed only by a later `Drop` or `Reset` (they
    /// never reach the upstream, even after the mode changes back). Open connections stop forwarding at once in both directions and stay
    /// open; what they sent meanwhile is held (as TCP would retransmit it) and delivered if the
    /// mode returns to [`Pass`](Mode::Pass) or [`Delay`](Mode::Delay) before either end gives
    /// up on the connection.
    Blackhole,
    /// Forward, each chunk this much later than it was read, in each direction (so a request
    /// is answered twice this much later). Order and throughput are kept: chunks are
    /// pipelined, not sent one delay after the other.
    Delay(Duration),
}

/// A snapshot of a proxy's counters ([`FaultProxy::stats`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Connections accepted (in every mode).
    pub accepted: u64,
    /// Connections open now (forwarded or blackholed).
    pub active: u64,
    /// Connections made to the upstream.
    pub upstream_connections: u64,
    /// Connections the upstream did not take (refused or not answered in time).
    pub upstream_failures: u64,
    /// Connections closed by [`Mode::Drop`].
    pub dropped: u64,
    /// Connections reset: by [`Mode::Reset`] (new or open), or because one end reset its side
    /// (passed on to the other end).
    pub reset: u64,
    /// Bytes forwarded from clients to the upstream.
    pub bytes_up: u64,
    /// Bytes forwarded from the upstream to clients.
    pub bytes_down: u64,
    /// Bytes read from blackholed new connections and thrown away.
    pub discarded: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    upstream_connections: AtomicU64,
    upstream_failures: AtomicU64,
    dropped: AtomicU64,
    reset: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    discarded: AtomicU64,
}

fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

/// Counts a connection as active for as long as it lives.
struct Active(Arc<Counters>);

impl Active {
    fn new(stats: &Arc<Counters>) -> Self {
        add(&stats.active, 1);
        Self(stats.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP proxy on a free port of 127.0.0.1 in front of one upstream; see the module docs.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    // Dropping the sender is what ends every task: each waits on its receiver's `changed()`.
    mode: watch::Sender<Mode>,
    stats: Arc<Counters>,
    accept: JoinHandle<()>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("mode", &*self.mode.borrow())
            .field("stats", &self.stats())
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy in [`Mode::Pass`] to `upstream`, listening on a free port of 127.0.0.1.
    /// The upstream need not be up yet: each accepted connection connects to it afresh.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = match TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await {
            Ok(l) => l,
            Err(e) => panic!("the fault proxy cannot bind a loopback port: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("the fault proxy has no local address: {e}"),
        };
        let (mode, rx) = watch::channel(Mode::Pass);
        let stats = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(addr, listener, upstream, rx, stats.clone()));
        Self {
            addr,
            upstream,
            mode,
            stats,
            accept,
        }
    }

    /// Where clients connect: `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The upstream it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Switches the mode, for new and open connections alike, at once.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        ProxyStats {
            accepted: get(&s.accepted),
            active: get(&s.active),
            upstream_connections: get(&s.upstream_connections),
            upstream_failures: get(&s.upstream_failures),
            dropped: get(&s.dropped),
            reset: get(&s.reset),
            bytes_up: get(&s.bytes_up),
            bytes_down: get(&s.bytes_down),
            discarded: get(&s.discarded),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The connection tasks end by themselves when `mode` (the sender) is dropped.
        self.accept.abort();
    }
}

/// Accepts connections and hands each to the current mode. Under [`Mode::Drop`] the listener
/// is closed, so that connects are refused rather than accepted and closed.
async fn accept_loop(
    addr: SocketAddr,
    listener: TcpListener,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    stats: Arc<Counters>,
) {
    let mut listener = Some(listener);
    loop {
        if *mode.borrow_and_update() == Mode::Drop {
            listener = None;
            if mode.changed().await.is_err() {
                return;
            }
            continue;
        }
        let l = match listener.as_ref() {
            Some(l) => l,
            // Tokio sets SO_REUSEADDR, so the port can be bound again at once; should another
            // socket have taken it meanwhile, keep trying (the test will see refused connects).
            None => match TcpListener::bind(addr).await {
                Ok(l) => listener.insert(l),
                Err(_) => {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                        changed = mode.changed() => if changed.is_err() { return },
                    }
                    continue;
                }
            },
        };
        tokio::select! {
            changed = mode.changed() => if changed.is_err() { return },
            accepted = l.accept() => {
                let Ok((client, _)) = accepted else {
                    // Out of file descriptors or the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                add(&stats.accepted, 1);
                let _ = client.set_nodelay(true);
                let current = *mode.borrow();
                match current {
                    Mode::Pass | Mode::Delay(_) => {
                        tokio::spawn(forward(client, upstream, mode.clone(), stats.clone()));
                    }
                    Mode::Blackhole => {
                        tokio::spawn(swallow(client, mode.clone(), stats.clone()));
                    }
                    Mode::Reset => reset(client, &stats),
                    // Switched to Drop just now: this one is closed like the open ones.
                    Mode::Drop => add(&stats.dropped, 1),
                }
            }
        }
    }
}

/// Closes `stream` with an RST instead of a FIN.
fn reset(stream: TcpStream, stats: &Counters) {
    let _ = stream.set_zero_linger();
    add(&stats.reset, 1);
    drop(stream);
}

/// A blackholed new connection: read and discard until the client gives up, the mode closes it
/// or the proxy goes away.
async fn swallow(mut client: TcpStream, mut mode: watch::Receiver<Mode>, stats: Arc<Counters>) {
    let _active = Active::new(&stats);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = *mode.borrow_and_update();
                match current {
                    Mode::Drop => {
                        add(&stats.dropped, 1);
                        return;
                    }
                    Mode::Reset => return reset(client, &stats),
                    Mode::Pass | Mode::Blackhole | Mode::Delay(_) => {}
                }
            }
            read = client.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => add(&stats.discarded, n),
            }
        }
    }
}

/// Bytes of one direction, read and waiting to be written: each chunk with the time it may go.
#[derive(Default)]
struct Pipe {
    chunks: VecDeque<(Instant, Vec<u8>)>,
    // Bytes of the front chunk already written.
    written: usize,
    queued: usize,
    // The reading side ended (EOF): once `chunks` is empty, the writing side is shut down.
    eof: bool,
    shut: bool,
}

impl Pipe {
    fn push(&mut self, at: Instant, bytes: &[u8]) {
        self.queued += bytes.len();
        self.chunks.push_back((at, bytes.to_vec()));
    }

    fn can_read(&self) -> bool {
        !self.eof && self.queued < MAX_QUEUED
    }

    /// Writes (part of) the front chunk once its time has come; cancel safe, as `select!`
    /// needs (a cancelled `write` wrote nothing).
    async fn write_front(&self, to: &mut (impl AsyncWriteExt + Unpin)) -> io::Result<usize> {
        let Some((at, bytes)) = self.chunks.front() else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(*at).await;
        to.write(&bytes[self.written..]).await
    }

    fn advance(&mut self, n: usize) {
        self.written += n;
        self.queued -= n;
        if self
            .chunks
            .front()
            .is_some_and(|(_, b)| self.written >= b.len())
        {
            self.chunks.pop_front();
            self.written = 0;
        }
    }

    /// The reading side ended, everything read is written and the EOF not yet passed on.
    fn finished_reading(&self) -> bool {
        self.eof && !self.shut && self.chunks.is_empty()
    }
}

/// How a forwarded connection ends.
enum End {
    /// Both directions finished, or the proxy went away: close normally.
    Close,
    /// [`Mode::Drop`]: close both ends (FIN).
    Drop,
    /// [`Mode::Reset`], or one end reset: reset both ends.
    Reset,
}

/// A forwarded connection: connects to the upstream, then moves bytes both ways as the mode
/// says until both directions are done or the mode ends it.
async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    stats: Arc<Counters>,
) {
    let _active = Active::new(&stats);
    let connect = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream));
    tokio::pin!(connect);
    let mut server = loop {
        tokio::select! {
            connected = &mut connect => match connected {
                Ok(Ok(s)) => break s,
                _ => {
                    add(&stats.upstream_failures, 1);
                    return;
                }
            },
            // Only the end of the proxy matters here; the loop below applies the mode.
            changed = mode.changed() => if changed.is_err() { return },
        }
    };
    add(&stats.upstream_connections, 1);
    let _ = server.set_nodelay(true);
    let end = pump(&mut client, &mut server, &mut mode, &stats).await;
    match end {
        End::Close => {}
        End::Drop => add(&stats.dropped, 1),
        End::Reset => {
            let _ = server.set_zero_linger();
            reset(client, &stats);
        }
    }
}

async fn pump(
    client: &mut TcpStream,
    server: &mut TcpStream,
    mode: &mut watch::Receiver<Mode>,
    stats: &Counters,
) -> End {
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut up = Pipe::default();
    let mut down = Pipe::default();
    let mut up_buf = vec![0u8; 16 * 1024];
    let mut down_buf = vec![0u8; 16 * 1024];
    loop {
        let current = *mode.borrow_and_update();
        let delay = match current {
            Mode::Drop => return End::Drop,
            Mode::Reset => return End::Reset,
            Mode::Blackhole => None,
            Mode::Pass => Some(Duration::ZERO),
            Mode::Delay(d) => Some(d),
        };
        let flowing = delay.is_some();
        let delay = delay.unwrap_or_default();
        // A direction whose reading side ended and whose bytes are all written: pass the EOF on.
        if flowing && up.finished_reading() {
            let _ = server_write.shutdown().await;
            up.shut = true;
        }
        if flowing && down.finished_reading() {
            let _ = client_write.shutdown().await;
            down.shut = true;
        }
        if up.shut && down.shut {
            return End::Close;
        }
        tokio::select! {
            changed = mode.changed() => if changed.is_err() { return End::Close },
            read = client_read.read(&mut up_buf), if flowing && up.can_read() => match read {
                Ok(0) => up.eof = true,
                Ok(n) => up.push(Instant::now() + delay, &up_buf[..n]),
                Err(_) => return End::Reset,
            },
            read = server_read.read(&mut down_buf), if flowing && down.can_read() => match read {
                Ok(0) => down.eof = true,
                Ok(n) => down.push(Instant::now() + delay, &down_buf[..n]),
                Err(_) => return End::Reset,
            },
            written = up.write_front(&mut server_write), if flowing => match written {
                Ok(n) if n > 0 => {
                    up.advance(n);
                    add(&stats.bytes_up, n);
                }
                _ => return End::Reset,
            },
            written = down.write_front(&mut client_write), if flowing => match written {
                Ok(n) if n > 0 => {
                    down.advance(n);
                    add(&stats.bytes_down, n);
                }
                _ => return End::Reset,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// An echo server on a free loopback port, counting the connections it accepted and those
    /// that ended.
    struct Echo {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        ended: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl Echo {
        async fn start() -> Self {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let ended = Arc::new(AtomicUsize::new(0));
            let (a, e) = (accepted.clone(), ended.clone());
            let task = tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    a.fetch_add(1, Ordering::SeqCst);
                    let e = e.clone();
                    tokio::spawn(async move {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        e.fetch_add(1, Ordering::SeqCst);
                    });
                }
            });
            Self {
                addr,
                accepted,
                ended,
                task,
            }
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        fn ended(&self) -> usize {
            self.ended.load(Ordering::SeqCst)
        }
    }

    impl Drop for Echo {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    const SHORT: Duration = Duration::from_millis(300);

    async fn connect(proxy: &FaultProxy) -> TcpStream {
        let s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// Writes `msg` and reads the echo back within `within`.
    async fn echo(s: &mut TcpStream, msg: &[u8], within: Duration) -> io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        match tokio::time::timeout(within, s.read_exact(&mut got)).await {
            Ok(r) => r.map(|_| got),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no echo")),
        }
    }

    /// What a read sees within `within`: data, EOF, an error, or nothing at all.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Data,
        Eof,
        Error(io::ErrorKind),
        Nothing,
    }

    async fn read_outcome(s: &mut TcpStream, within: Duration) -> Seen {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Err(_) => Seen::Nothing,
            Ok(Ok(0)) => Seen::Eof,
            Ok(Ok(_)) => Seen::Data,
            Ok(Err(e)) => Seen::Error(e.kind()),
        }
    }

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(5), "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn pass_forwards_both_ways_and_counts_bytes() {
        let upstream = Echo::start().await;
        let proxy = FaultProxy::start(upstream.addr).await;
        let mut s = connect(&proxy).await;
        let msg = vec![7u8; 100_000];
        assert_eq!(
            echo(&mut s, &msg, Duration::from_secs(5)).await.unwrap(),
            msg
        );
        let stats = proxy.stats();
        assert_eq!((stats.accepted, stats.upstream_connections), (1, 1));
        assert_eq!((stats.bytes_up, stats.bytes_down), (100_000, 100_000));
        assert_eq!(stats.active, 1);
        // A client's EOF is passed on, and the upstream's answer to it comes back.
        s.shutdown().await.unwrap();
        assert_eq!(
            read_outcome(&mut s, Duration::from_secs(2)).await,
            Seen::Eof
        );
        eventually("the connection ends after both EOFs", || {
            proxy.stats().active == 0 && upstream.ended() == 1
        })
        .await;
    }

    #[tokio::test]
    async fn delay_holds_each_direction_and_keeps_pipelining() {
        let upstream = Echo::start().await;
        let proxy = FaultProxy::start(upstream.addr).await;
        let mut s = connect(&proxy).await;
        echo(&mut s, b"warm", Duration::from_secs(2)).await.unwrap();
        let d = Duration::from_millis(150);
        proxy.set(Mode::Delay(d));
        let start = Instant::now();
        assert_eq!(
            echo(&mut s, b"ping", Duration::from_secs(2)).await.unwrap(),
            b"ping"
        );
        let rtt = start.elapsed();
        assert!(rtt >= 2 * d, "round trip {rtt:?} < 2 x {d:?}");
        assert!(
            rtt < 2 * d + SHORT,
            "round trip {rtt:?} far above 2 x {d:?}"
        );
        // Ten writes 20 ms apart: each comes back 2d after it was sent, not 2d after the
        // previous one (pipelined), and in order.
        let start = Instant::now();
        for i in 0..10u8 {
            s.write_all(&[i]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut got = [0u8; 10];
        s.read_exact(&mut got).await.unwrap();
        let all = start.elapsed();
        assert_eq!(got, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert!(all < 2 * d + Duration::from_millis(200) + SHORT, "{all:?}");
        // Back to pass: no delay.
        proxy.set(Mode::Pass);
        let start = Instant::now();
        echo(&mut s, b"fast", Duration::from_secs(2)).await.unwrap();
        assert!(start.elapsed() < d, "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn blackhole_accepts_and_swallows_new_connections_without_closing() {
        let upstream = Echo::start().await;
        let proxy = FaultProxy::start(upstream.addr).await;
        proxy.set(Mode::Blackhole);
        let mut s = connect(&proxy).await;
        s.write_all(b"anyone there?").await.unwrap();
        assert_eq!(read_outcome(&mut s, SHORT).await, Seen::Nothing);
        eventually("the bytes are read and discarded", || {
            proxy.stats().discarded == 13
        })
        .await;
        assert_eq!(upstream.accepted(), 0, "never reaches the upstream");
        // Even back in Pass, a blackholed connection stays a dead end (it never had an
        // upstream), while new connections work.
        proxy.set(Mode::Pass);
        s.write_all(b"hello?").await.unwrap();
        assert_eq!(read_outcome(&mut s, SHORT).await, Seen::Nothing);
        let mut fresh = connect(&proxy).await;
        echo(&mut fresh, b"hi", Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(proxy.stats().active, 2);
    }

    #[tokio::test]
    async fn blackhole_freezes_open_connections_at_once_and_keeps_their_bytes() {
        let upstream = Echo::start().await;
        let proxy = FaultProxy::start(upstream.addr).await;
        let mut s = connect(&proxy).await;
        echo(&mut s, b"before", Duration::from_secs(2))
            .await
            .unwrap();
        proxy.set(Mode::Blackhole);
        let before = proxy.stats();
        s.write_all(b"during").await.unwrap();
        assert_eq!(read_outcome(&mut s, SHORT).await, Seen::Nothing);
        let during = proxy.stats();
        assert_eq!(
            (during.bytes_up, during.bytes_down),
            (before.bytes_up, before.bytes_down),
            "nothing forwarded while blackholed"
        );
        assert_eq!((during.active, upstream.ended()), (1, 0), "nothing closed");
        // The partition heals: what was sent meanwhile arrives, in order.
        proxy.set(Mode::Pass);
        let mut got = [0u8; 6];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"during");
    }

    #[tokio::test]
    async fn drop_closes_open_connections_and_refuses_new_ones_until_pass() {
        let upstream = Echo::start().await;
        let proxy = FaultProxy::start(upstream.addr).await;
        let mut s = connect(&proxy).await;
        echo(&mut s, b"x", Duration::from_secs(2)).await.unwrap();
        proxy.set(Mode::Drop);
        assert_eq!(
            read_outcome(&mut s, Duration::from_secs(2)).await,
            Seen::Eof
        );
        eventually("the upstream side is closed too", || upstream.ended() == 1).await;
        // Refused, not accepted and closed (retry: the listener closes asynchronously).
        let start = Instant::now();
        loop {
            match TcpStream::connect(proxy.addr()).await {
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
                    break;
                }
                Ok(_) => assert!(start.elapsed() < Duration::from_secs(2), "still accepting"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(proxy.stats().dropped >= 1);
        proxy.set(Mode::Pass);
        let start = Instant::now();
        let mut s = loop {
            if let Ok(s) = TcpStream::connect(proxy.addr()).await {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "not listening again"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        echo(&mut s, b"back", Duration::from_secs(2)).await.unwrap();
    }

    #[tokio::test]
    async fn reset_sends_rst_to_open_and_new_connections() {
        let upstream = Echo::start().await;
        let proxy = FaultProxy::start(upstream.addr).await;
        let mut s = connect(&proxy).await;
        echo(&mut s, b"x", Duration::from_secs(2)).await.unwrap();
        proxy.set(Mode::Reset);
        assert_eq!(
            read_outcome(&mut s, Duration::from_secs(2)).await,
            Seen::Error(io::ErrorKind::ConnectionReset)
        );
        // The upstream's end is reset as well (its copy loop ends with an error).
        eventually("the upstream side is reset too", || upstream.ended() == 1).await;
        let mut s = connect(&proxy).await;
        assert_eq!(
            read_outcome(&mut s, Duration::from_secs(2)).await,
            Seen::Error(io::ErrorKind::ConnectionReset)
        );
        assert_eq!(proxy.stats().reset, 2);
        assert_eq!(
            upstream.accepted(),
            1,
            "a reset connection never reaches it"
        );
    }

    #[tokio::test]
    async fn dropping_the_proxy_ends_all_its_connections_and_tasks() {
        let upstream = Echo::start().await;
        let proxy = FaultProxy::start(upstream.addr).await;
        let addr = proxy.addr();
        let mut forwarded = connect(&proxy).await;
        echo(&mut forwarded, b"x", Duration::from_secs(2))
            .await
            .unwrap();
        proxy.set(Mode::Blackhole);
        let mut swallowed = connect(&proxy).await;
        swallowed.write_all(b"y").await.unwrap();
        // Read by the proxy first: a socket closed with unread bytes sends an RST, not a FIN.
        eventually("the byte is swallowed", || proxy.stats().discarded == 1).await;
        drop(proxy);
        assert_eq!(
            read_outcome(&mut forwarded, Duration::from_secs(2)).await,
            Seen::Eof
        );
        assert_eq!(
            read_outcome(&mut swallowed, Duration::from_secs(2)).await,
            Seen::Eof
        );
        eventually("the upstream connection is closed", || {
            upstream.ended() == 1
        })
        .await;
        // Nothing listens any more (the accept task ends asynchronously).
        let start = Instant::now();
        while TcpStream::connect(addr).await.is_ok() {
            assert!(start.elapsed() < Duration::from_secs(2), "still listening");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
