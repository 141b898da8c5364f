//! Transport counters and their Prometheus text form.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::chat::ChatHub;
use crate::protocol::ErrorCode;

/// Counters of the WebSocket transport. Totals since start, except the gauge `connections`.
#[derive(Debug, Default)]
pub struct WsMetrics {
    /// Open WebSocket connections (gauge).
    pub connections: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Frames received from clients (text and binary).
    pub frames_in: AtomicU64,
    /// Frames written to clients.
    pub frames_out: AtomicU64,
    /// Chat messages accepted from clients (`send` answered with `ack`).
    pub messages_in: AtomicU64,
    /// Connections closed because the client could not keep up (queue full or write timeout).
    pub slow_closed: AtomicU64,
    /// Connections closed because nothing was received within the idle timeout.
    pub idle_closed: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
}

impl WsMetrics {
    /// Counts one error (an `error` frame or a refused handshake) with `code`.
    pub fn count_error(&self, code: ErrorCode) {
        self.errors[code.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Errors counted with `code`.
    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.errors[code.index()].load(Ordering::Relaxed)
    }

    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    // Writing into a String cannot fail.
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Renders the transport and hub counters in the Prometheus text format (version 0.0.4).
pub(crate) fn render(m: &WsMetrics, chat: &ChatHub) -> String {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let hub = chat.hub().stats();
    let mut out = String::with_capacity(4096);
    for (name, kind, help, value) in [
        (
            "chatbus_connections",
            "gauge",
            "Open WebSocket connections.",
            get(&m.connections),
        ),
        (
            "chatbus_connections_total",
            "counter",
            "WebSocket connections accepted.",
            get(&m.connections_total),
        ),
        (
            "chatbus_frames_in_total",
            "counter",
            "Frames received from clients.",
            get(&m.frames_in),
        ),
        (
            "chatbus_frames_out_total",
            "counter",
            "Frames written to clients.",
            get(&m.frames_out),
        ),
        (
            "chatbus_messages_in_total",
            "counter",
            "Chat messages accepted from clients.",
            get(&m.messages_in),
        ),
        (
            "chatbus_messages_out_total",
            "counter",
            "Messages fanned out to local sessions (one per recipient).",
            hub.deliveries,
        ),
        (
            "chatbus_broker_messages_total",
            "counter",
            "Messages received from the broker.",
            hub.messages_in,
        ),
        (
            "chatbus_lagged_total",
            "counter",
            "Times a session fell behind and had to resync.",
            hub.lagged,
        ),
        (
            "chatbus_replayed_total",
            "counter",
            "Messages delivered from the log during catch-up.",
            hub.replayed,
        ),
        (
            "chatbus_duplicates_total",
            "counter",
            "Duplicate copies dropped by the hub.",
            hub.duplicates,
        ),
        (
            "chatbus_slow_closed_total",
            "counter",
            "Connections closed as slow consumers.",
            hub.slow_closed + get(&m.slow_closed),
        ),
        (
            "chatbus_idle_closed_total",
            "counter",
            "Connections closed after the idle timeout.",
            get(&m.idle_closed),
        ),
        (
            "chatbus_broker_errors_total",
            "counter",
            "Errors from broker subscriptions.",
            hub.broker_errors,
        ),
        (
            "chatbus_decode_errors_total",
            "counter",
            "Broker envelopes dropped as undecodable.",
            get(&chat.stats().decode_errors),
        ),
        ("chatbus_sessions", "gauge", "Hub sessions.", hub.sessions),
        (
            "chatbus_rooms",
            "gauge",
            "Rooms with local members.",
            hub.rooms,
        ),
    ] {
        metric(&mut out, name, kind, help, value);
    }
    out.push_str("# HELP chatbus_errors_total Errors answered to clients, by code.\n");
    out.push_str("# TYPE chatbus_errors_total counter\n");
    for code in ErrorCode::ALL {
        let _ = writeln!(
            out,
            "chatbus_errors_total{{code=\"{code}\"}} {}",
            m.errors(code)
        );
    }
    out
}
