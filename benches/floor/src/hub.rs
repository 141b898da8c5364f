//! One event loop: a current-thread tokio runtime with its own listener, its connections, and
//! the fan-out task that writes every frame handed to this loop to each of them.
//!
//! A frame read on any thread arrives here through this loop's channel as a `Bytes` shared by
//! every loop (no copy). The fan-out task takes everything queued at once (`recv_many`) and
//! writes it to each connection with one `writev`: under load several frames go out in one
//! system call, and at low rates each frame goes out as soon as it is read. A connection
//! whose socket is full keeps the rest in its own backlog, written when the socket drains
//! ([`conn`]); the other connections are not held up by it.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::task::LocalSet;

use crate::conn::{self, Conn};
use crate::frame;

/// Frames written to a connection in one `writev` at most (well under `IOV_MAX`, 1024).
const BATCH: usize = 256;
/// The loop's read buffer, shared by its connections: an idle connection holds none.
const SCRATCH: usize = 64 * 1024;

/// What the connections of one loop share.
#[derive(Debug)]
pub(crate) struct Hub {
    conns: RefCell<Vec<Rc<Conn>>>,
    /// Every loop's channel, this one's included.
    peers: Vec<UnboundedSender<Bytes>>,
    pub(crate) welcome: Bytes,
    pub(crate) scratch: RefCell<Vec<u8>>,
}

impl Hub {
    /// From now on `c` gets every frame this loop delivers.
    pub(crate) fn add(&self, c: &Rc<Conn>) {
        let mut v = self.conns.borrow_mut();
        c.slot.set(v.len());
        v.push(Rc::clone(c));
    }

    pub(crate) fn remove(&self, c: &Conn) {
        let mut v = self.conns.borrow_mut();
        let i = c.slot.get();
        if v.get(i).is_some_and(|x| std::ptr::eq(&**x, c)) {
            v.swap_remove(i);
            if let Some(moved) = v.get(i) {
                moved.slot.set(i);
            }
        }
    }

    /// Hands a server frame to every loop (this one too) for delivery.
    pub(crate) fn publish(&self, frame: &Bytes) {
        for p in &self.peers {
            // A loop that ended has no connections left to deliver to.
            let _ = p.send(frame.clone());
        }
    }

    fn deliver(&self, batch: &[Bytes]) {
        let slices: Vec<IoSlice<'_>> = batch.iter().map(|b| IoSlice::new(b)).collect();
        let total = batch.iter().map(Bytes::len).sum();
        for c in self.conns.borrow().iter() {
            c.send(batch, &slices, total);
        }
    }
}

async fn fan_out(hub: Rc<Hub>, mut inbox: UnboundedReceiver<Bytes>) {
    let mut batch = Vec::with_capacity(BATCH);
    while inbox.recv_many(&mut batch, BATCH).await > 0 {
        hub.deliver(&batch);
        batch.clear();
    }
}

async fn accept_loop(
    l: std::net::TcpListener,
    inbox: UnboundedReceiver<Bytes>,
    peers: Vec<UnboundedSender<Bytes>>,
) -> io::Result<()> {
    let listener = TcpListener::from_std(l)?;
    let hub = Rc::new(Hub {
        conns: RefCell::new(Vec::new()),
        peers,
        welcome: frame::welcome(),
        scratch: RefCell::new(vec![0; SCRATCH]),
    });
    tokio::task::spawn_local(fan_out(Rc::clone(&hub), inbox));
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                // Frames are small and written in batches already: never wait for Nagle.
                let _ = s.set_nodelay(true);
                tokio::task::spawn_local(conn::serve(Rc::clone(&hub), s));
            }
            Err(e) => {
                // Out of file descriptors, usually: wait for some to close rather than spin.
                eprintln!("floor: accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The body of one loop thread; returns only if the runtime cannot start.
pub(crate) fn run_thread(
    l: std::net::TcpListener,
    inbox: UnboundedReceiver<Bytes>,
    peers: Vec<UnboundedSender<Bytes>>,
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    LocalSet::new().block_on(&rt, accept_loop(l, inbox, peers))
}
