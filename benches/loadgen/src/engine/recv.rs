//! Reading: drains a readable socket into the engine's shared buffer, parses the frames in
//! place, answers the protocol (welcome/join, Engine.IO open and ping), and records every
//! delivered message (latency histogram, time series, sequence checks).

use std::io::{self, Read};

use super::track::Seen;
use super::{reason, unix_us, Engine, State};
use crate::plan::new_hist;
use crate::proto::{self, Incoming, Protocol};
use crate::ws::{self, Handshake, Parsed};

/// Time buckets kept for the series (e.g. 250 ms × 4,000 = 16 minutes, far above any run).
const MAX_BUCKETS: u64 = 4_000;

impl Engine {
    pub(super) fn is_open(&self, idx: usize) -> bool {
        self.clients[idx].sock.is_some()
    }

    /// Reads what the socket has. `to_the_end`: keep reading until `WouldBlock` even after a
    /// short read (needed to see an EOF that came with the last data).
    pub(super) fn on_readable(&mut self, idx: usize, to_the_end: bool) {
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

    pub(super) fn ingest(&mut self, idx: usize, data: &[u8], now_us: u64) {
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
    pub(super) fn consume(&mut self, idx: usize, buf: &[u8], now_us: u64) -> usize {
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

    pub(super) fn on_frame(&mut self, idx: usize, f: ws::Frame<'_>, now_us: u64) {
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

    pub(super) fn on_text(&mut self, idx: usize, text: &[u8], now_us: u64) {
        let incoming = match self.plan.protocol {
            Protocol::Chatbus => proto::classify_chatbus(text),
            Protocol::Socketio => proto::classify_socketio(text),
            Protocol::Floor => proto::classify_floor(text),
        };
        let state = self.clients[idx].state;
        match incoming {
            Incoming::Message(body) => self.on_message(idx, body, now_us),
            // The floor has no rooms: its greeting means the fan-out reaches this client.
            Incoming::Welcome
                if state == State::Opening && self.plan.protocol == Protocol::Floor =>
            {
                self.became_ready(idx);
            }
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

    pub(super) fn on_message(&mut self, idx: usize, body: &[u8], now_us: u64) {
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
}
