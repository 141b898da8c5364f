//! One connection: the upgrade, then a task that reads client frames (parsed in the loop's
//! shared read buffer; only a partial frame is kept per connection) and writes whatever the
//! fan-out could not write at once.
//!
//! Writes are attempted directly from the fan-out ([`Conn::send`]): when nothing is queued
//! for the connection, the batch goes straight to the socket with one `writev`, without
//! waking this connection's task. Only what the socket would not take is kept, as `Bytes`
//! slices of the shared frames, and written when the socket is writable again, before
//! anything newer. A connection that falls more than [`MAX_BACKLOG`] behind is dropped
//! (the load generator counts what it then misses as lost).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::rc::Rc;

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tungstenite::protocol::frame::coding::{Control, OpCode};

use crate::frame::{self, Kind, Parsed};
use crate::handshake;
use crate::hub::Hub;

/// Bytes queued for one connection at most.
const MAX_BACKLOG: usize = 8 * 1024 * 1024;
/// Slices per `writev` when writing a backlog.
const IOV: usize = 64;

/// Why a connection ended (not reported: the load generator sees it).
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("closed by the client")]
    Eof,
    #[error("close frame")]
    Closed,
    #[error("protocol: {0}")]
    Protocol(&'static str),
    #[error("write failed or backlog full")]
    Dropped,
}

/// A connection after the upgrade.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: TcpStream,
    /// Index in the hub's list.
    pub(crate) slot: Cell<usize>,
    backlog: RefCell<VecDeque<Bytes>>,
    backlog_bytes: Cell<usize>,
    /// Wakes the task: something was queued, or the connection must end.
    wake: Notify,
    dead: Cell<bool>,
}

/// Serves one accepted socket until it closes.
pub(crate) async fn serve(hub: Rc<Hub>, mut stream: TcpStream) {
    let Ok(rbuf) = handshake::accept(&mut stream).await else {
        return;
    };
    let conn = Rc::new(Conn {
        stream,
        slot: Cell::new(0),
        backlog: RefCell::new(VecDeque::new()),
        backlog_bytes: Cell::new(0),
        wake: Notify::new(),
        dead: Cell::new(false),
    });
    // Registered and greeted with no await in between: every frame delivered from now on
    // reaches it, after the greeting.
    hub.add(&conn);
    conn.send_one(&hub.welcome);
    let _ = conn.run(&hub, rbuf).await;
    hub.remove(&conn);
}

impl Conn {
    /// Writes `batch` (whose slices are `slices`, `total` bytes) now if nothing is queued
    /// before it; queues what the socket does not take.
    pub(crate) fn send(&self, batch: &[Bytes], slices: &[IoSlice<'_>], total: usize) {
        if self.dead.get() {
            return;
        }
        if !self.backlog.borrow().is_empty() {
            self.queue(batch, 0);
            return;
        }
        match self.stream.try_write_vectored(slices) {
            Ok(n) if n >= total => {}
            Ok(n) => self.queue(batch, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.queue(batch, 0),
            Err(_) => self.kill(),
        }
    }

    fn send_one(&self, frame: &Bytes) {
        self.send(
            std::slice::from_ref(frame),
            &[IoSlice::new(frame)],
            frame.len(),
        );
    }

    /// Keeps `batch` minus its first `skip` bytes (already written) for later.
    fn queue(&self, batch: &[Bytes], mut skip: usize) {
        let mut q = self.backlog.borrow_mut();
        let mut bytes = self.backlog_bytes.get();
        for b in batch {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            let part = b.slice(skip..);
            skip = 0;
            bytes += part.len();
            q.push_back(part);
        }
        drop(q);
        self.backlog_bytes.set(bytes);
        if bytes > MAX_BACKLOG {
            self.kill();
        } else {
            self.wake.notify_one();
        }
    }

    fn kill(&self) {
        self.dead.set(true);
        self.wake.notify_one();
    }

    /// Writes the backlog until it is empty or the socket is full.
    fn flush(&self) -> Result<(), End> {
        let mut q = self.backlog.borrow_mut();
        while !q.is_empty() {
            let written = {
                let mut iov = [IoSlice::new(&[]); IOV];
                let n = q
                    .iter()
                    .zip(iov.iter_mut())
                    .map(|(b, s)| *s = IoSlice::new(b))
                    .count();
                self.stream.try_write_vectored(&iov[..n])
            };
            let mut w = match written {
                Ok(0) => return Err(End::Dropped),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.backlog_bytes
                .set(self.backlog_bytes.get().saturating_sub(w));
            while w > 0 {
                let Some(front) = q.front_mut() else { break };
                if w >= front.len() {
                    w -= front.len();
                    q.pop_front();
                } else {
                    front.advance(w);
                    w = 0;
                }
            }
        }
        Ok(())
    }

    async fn run(&self, hub: &Hub, mut rbuf: Vec<u8>) -> Result<(), End> {
        if !rbuf.is_empty() {
            let used = self.consume(hub, &rbuf)?;
            rbuf.drain(..used);
        }
        loop {
            if self.dead.get() {
                return Err(End::Dropped);
            }
            let backlogged = !self.backlog.borrow().is_empty();
            tokio::select! {
                r = self.stream.readable() => {
                    r?;
                    self.read(hub, &mut rbuf)?;
                }
                r = self.stream.writable(), if backlogged => {
                    r?;
                    self.flush()?;
                }
                () = self.wake.notified() => {}
            }
        }
    }

    /// Reads what the socket has into the loop's buffer and handles the complete frames.
    fn read(&self, hub: &Hub, rbuf: &mut Vec<u8>) -> Result<(), End> {
        let mut scratch = hub.scratch.borrow_mut();
        loop {
            match self.stream.try_read(&mut scratch) {
                Ok(0) => return Err(End::Eof),
                Ok(n) => {
                    self.ingest(hub, rbuf, &scratch[..n])?;
                    if n < scratch.len() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn ingest(&self, hub: &Hub, rbuf: &mut Vec<u8>, data: &[u8]) -> Result<(), End> {
        if rbuf.is_empty() {
            let used = self.consume(hub, data)?;
            rbuf.extend_from_slice(&data[used..]);
        } else {
            rbuf.extend_from_slice(data);
            let used = self.consume(hub, rbuf)?;
            rbuf.drain(..used);
            if rbuf.is_empty() {
                // An idle connection keeps no allocation.
                *rbuf = Vec::new();
            }
        }
        Ok(())
    }

    /// Handles the complete frames at the start of `buf`; returns the bytes used.
    fn consume(&self, hub: &Hub, buf: &[u8]) -> Result<usize, End> {
        let mut pos = 0;
        loop {
            let f = match frame::parse(&buf[pos..]) {
                Parsed::Partial => return Ok(pos),
                Parsed::Invalid(why) => return Err(End::Protocol(why)),
                Parsed::Frame(f) => f,
            };
            let payload = &buf[pos + f.at..pos + f.at + f.len];
            match f.kind {
                Kind::Message => hub.publish(&frame::server_frame(f.opcode, payload, f.mask)),
                Kind::Ping => self.send_one(&frame::server_frame(
                    OpCode::Control(Control::Pong),
                    payload,
                    f.mask,
                )),
                Kind::Pong => {}
                Kind::Close => {
                    self.send_one(&frame::server_frame(f.opcode, payload, f.mask));
                    return Err(End::Closed);
                }
            }
            pos += f.used;
        }
    }
}
