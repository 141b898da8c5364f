//! `WsConfig::write_delay` (issue #16, item 5): frames that arrive within the delay after the
//! first of a batch go out in one flush; a lone frame still goes out, at most the delay late;
//! a full batch does not wait for the delay.
//!
//! Driven over the `Sink`/`Stream` seam with a sink that records what each flush carried, so
//! the test counts socket writes rather than guessing them from timing. Frames are handed to
//! the hub with `deliver_local` (what the pump does with a message from the broker).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatbus_core::{Envelope, MemoryBroker, Room};
use chatbus_ws::{ChatHub, Identity, TransportError, WsConfig, WsMessage, WsService};
use futures::channel::mpsc;
use futures::{Sink, SinkExt, StreamExt};
use serde_json::{json, Value};

/// A socket stand-in: frames written since the last flush are one "write"; each flush sends
/// them, as one batch, to the test.
struct FlushSink {
    pending: Vec<WsMessage>,
    flushes: mpsc::UnboundedSender<Vec<WsMessage>>,
}

impl Sink<WsMessage> for FlushSink {
    type Error = mpsc::SendError;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, item: WsMessage) -> Result<(), Self::Error> {
        self.pending.push(item);
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            if let Err(e) = self.flushes.unbounded_send(batch) {
                return Poll::Ready(Err(e.into_send_error()));
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.poll_flush(cx)
    }
}

type ToServer = mpsc::Sender<Result<WsMessage, TransportError>>;
type Flushes = mpsc::UnboundedReceiver<Vec<WsMessage>>;

struct Conn {
    svc: WsService,
    room: Room,
    tx: ToServer,
    flushes: Flushes,
    task: tokio::task::JoinHandle<()>,
}

/// A session over a [`FlushSink`], joined to room `r` (the `joined` reply read).
async fn joined(delay: Duration) -> Conn {
    let svc = WsService::new(
        ChatHub::new(Arc::new(MemoryBroker::new())),
        WsConfig::default()
            .with_rate_limit(None)
            .with_write_delay(delay),
    );
    let (mut tx, server_in) = mpsc::channel(16);
    let (flush_tx, mut flushes) = mpsc::unbounded();
    let sink = FlushSink {
        pending: Vec::new(),
        flushes: flush_tx,
    };
    let identity = Identity::new("ann").expect("identity");
    let task = {
        let svc = svc.clone();
        tokio::spawn(async move { svc.run_session(identity, sink, server_in).await })
    };
    tx.send(Ok(WsMessage::Text(Bytes::from(
        json!({"type": "join", "room": "r"}).to_string(),
    ))))
    .await
    .expect("session reads");
    let deadline = Instant::now() + Duration::from_secs(10);
    'outer: loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        let batch = tokio::time::timeout(wait, flushes.next())
            .await
            .expect("joined in time")
            .expect("session open");
        for m in &batch {
            if kind(m).as_deref() == Some("joined") {
                break 'outer;
            }
        }
    }
    let room = Room::new("r").expect("valid room");
    Conn {
        svc,
        room,
        tx,
        flushes,
        task,
    }
}

/// The `type` of a text frame.
fn kind(m: &WsMessage) -> Option<String> {
    let WsMessage::Text(b) = m else { return None };
    let v: Value = serde_json::from_slice(b).ok()?;
    v["type"].as_str().map(str::to_owned)
}

/// Queues one chat message of room `r` from `bob` for the session, as the hub's pump does
/// with one from the broker. The payload is what `ChatHub` publishes for a `send`: tag `M`, a
/// name of length 0, the body.
fn deliver(c: &Conn, i: usize) {
    let mut payload = vec![b'M', 0];
    payload.extend_from_slice(format!("m{i}").as_bytes());
    let mut env = Envelope::new(c.room.clone(), payload);
    env.from = Some("bob".into());
    assert_eq!(
        c.svc.chat().hub().deliver_local(&env),
        1,
        "one session in the room"
    );
}

/// Reads flushes until `want` message frames arrived; returns how many each flush carried
/// (flushes without any message frame, e.g. presence, are skipped) and when the last came.
async fn messages_per_flush(c: &mut Conn, want: usize) -> (Vec<usize>, Instant) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut per_flush = Vec::new();
    let mut seen = 0;
    while seen < want {
        let wait = deadline.saturating_duration_since(Instant::now());
        let batch = tokio::time::timeout(wait, c.flushes.next())
            .await
            .expect("messages in time")
            .expect("session open");
        let n = batch
            .iter()
            .filter(|m| kind(m).as_deref() == Some("message"))
            .count();
        if n > 0 {
            per_flush.push(n);
            seen += n;
        }
    }
    (per_flush, Instant::now())
}

async fn stop(c: Conn) {
    drop(c.tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), c.task).await;
}

/// Five frames 10 ms apart: without a delay each is its own flush (the writer is idle again
/// before the next arrives); with a 300 ms delay they share one.
async fn five_spaced(delay: Duration) -> Vec<usize> {
    let mut c = joined(delay).await;
    for i in 0..5 {
        deliver(&c, i);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (per_flush, _) = messages_per_flush(&mut c, 5).await;
    stop(c).await;
    per_flush
}

#[tokio::test]
async fn without_delay_each_spaced_frame_is_its_own_write() {
    assert_eq!(five_spaced(Duration::ZERO).await, vec![1; 5]);
}

#[tokio::test]
async fn write_delay_coalesces_spaced_frames_into_one_write() {
    assert_eq!(five_spaced(Duration::from_millis(300)).await, vec![5]);
}

#[tokio::test]
async fn a_lone_frame_goes_out_after_at_most_the_delay() {
    let delay = Duration::from_millis(100);
    let mut c = joined(delay).await;
    // Whatever joining queued (presence) has gone out by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    deliver(&c, 0);
    let (per_flush, at) = messages_per_flush(&mut c, 1).await;
    let took = at - start;
    assert_eq!(per_flush, vec![1]);
    // Held for the delay (timers fire no earlier than asked)...
    assert!(
        took >= delay - Duration::from_millis(5),
        "flushed after {took:?}"
    );
    // ...and not much longer (generous: a loaded test machine).
    assert!(took < Duration::from_secs(2), "flushed after {took:?}");
    stop(c).await;
}

#[tokio::test]
async fn a_full_batch_does_not_wait_for_the_delay() {
    // 64 frames is the writer's batch. The delay is long enough to tell apart from a full
    // batch's flush on a loaded machine (joining waits it out once: welcome is held too).
    let mut c = joined(Duration::from_secs(5)).await;
    let start = Instant::now();
    for i in 0..64 {
        deliver(&c, i);
    }
    let (per_flush, at) = messages_per_flush(&mut c, 64).await;
    assert_eq!(per_flush, vec![64]);
    assert!(
        at - start < Duration::from_millis(2500),
        "took {:?}",
        at - start
    );
    stop(c).await;
}
