//! Writing: masks and queues frames, flushes a socket's pending bytes, sends each sender's
//! messages on its open-loop schedule (late sends are measured, never skipped), and closes
//! every connection politely at the end.

use std::io::{self, Write};

use super::{reason, splitmix, Engine, State};
use crate::proto::{self, Body, Protocol};
use crate::ws;

impl Engine {
    pub(super) fn mask(&mut self) -> [u8; 4] {
        (splitmix(&mut self.rng) as u32).to_le_bytes()
    }

    pub(super) fn queue_frame(&mut self, idx: usize, opcode: u8, payload: &[u8]) {
        let mask = self.mask();
        ws::write_frame(&mut self.clients[idx].wbuf, opcode, payload, mask);
    }

    pub(super) fn flush(&mut self, idx: usize) {
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

    pub(super) fn tick_send(&mut self, now_us: u64, start_us: u64, rate: f64, total: u64) {
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
                    Protocol::Floor => proto::floor_send(&mut self.text, body, self.plan.size),
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

    pub(super) fn stop(&mut self) {
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
