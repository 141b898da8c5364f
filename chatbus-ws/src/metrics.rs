//! Transport counters ([`WsMetrics`] snapshots) and their export through `prometheus-client`.
//!
//! The hot path only bumps relaxed atomics ([`WsCounters`]); nothing is counted twice. At scrape
//! time a [`Collector`] registered in the application's [`Registry`] reads the snapshots
//! ([`WsMetrics`], the hub's [`HubStats`](chatbus_core::HubStats), [`ChatStats`]) and encodes
//! them under the names documented in `docs/protocol.md` ("Metrics").

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::chat::ChatStats;
use crate::hooks::{HookCounters, HookKind, HookStats};
use crate::protocol::ErrorCode;
use crate::service::WeakService;

/// A snapshot of the WebSocket transport's counters, from
/// [`WsService::metrics`](crate::WsService::metrics). Totals since start, except the gauge
/// `connections`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WsMetrics {
    /// Open WebSocket connections (gauge).
    pub connections: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Handshakes refused (HTTP 503) because the instance held
    /// [`WsConfig::max_connections`](crate::WsConfig::max_connections) already.
    pub connections_refused: u64,
    /// Frames received from clients (text and binary).
    pub frames_in: u64,
    /// Frames written to clients.
    pub frames_out: u64,
    /// Chat messages accepted from clients (`send` answered with `ack`), duplicates not counted.
    pub messages_in: u64,
    /// Sends whose idempotency `key` was sent before: answered with the original's `ack`,
    /// nothing published.
    pub send_key_duplicates: u64,
    /// Log searches for the original of a `retry` send that this instance's window did not
    /// know.
    pub send_key_searches: u64,
    /// Connections closed because the client could not keep up (write timeout; the hub's own
    /// slow-consumer closes are in [`HubStats::slow_closed`](chatbus_core::HubStats)).
    pub slow_closed: u64,
    /// Connections closed because nothing was received within the idle timeout.
    pub idle_closed: u64,
    /// TCP connections closed because they had not sent a complete HTTP request (the
    /// upgrade) within [`WsConfig::handshake_timeout`](crate::WsConfig::handshake_timeout).
    pub handshake_timeouts: u64,
    /// Connections closed (4008) for sending control frames past
    /// [`WsConfig::control_rate_limit`](crate::WsConfig::control_rate_limit).
    pub flood_closed: u64,
    /// TLS handshakes that failed (plain HTTP to a TLS port, an unacceptable client hello);
    /// with [`WsService::serve_tls`](crate::WsService) only.
    pub tls_errors: u64,
    errors: [u64; ErrorCode::ALL.len()],
    hooks: [HookStats; HookKind::ALL.len()],
}

impl WsMetrics {
    /// The counters of one application hook.
    pub fn hook(&self, kind: HookKind) -> HookStats {
        self.hooks[kind.index()]
    }

    /// Errors counted with `code` (`error` frames and refused handshakes).
    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.errors[code.index()]
    }
}

/// The live counters behind [`WsMetrics`], bumped by the sessions and the handshake.
#[derive(Debug, Default)]
pub(crate) struct WsCounters {
    pub(crate) connections: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) frames_out: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) send_key_duplicates: AtomicU64,
    pub(crate) send_key_searches: AtomicU64,
    pub(crate) slow_closed: AtomicU64,
    pub(crate) idle_closed: AtomicU64,
    pub(crate) handshake_timeouts: AtomicU64,
    pub(crate) flood_closed: AtomicU64,
    pub(crate) tls_errors: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
    pub(crate) hooks: HookCounters,
}

impl WsCounters {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts one error (an `error` frame or a refused handshake) with `code`.
    pub(crate) fn count_error(&self, code: ErrorCode) {
        Self::inc(&self.errors[code.index()]);
    }

    pub(crate) fn snapshot(&self) -> WsMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WsMetrics {
            connections: get(&self.connections),
            connections_total: get(&self.connections_total),
            connections_refused: get(&self.connections_refused),
            frames_in: get(&self.frames_in),
            frames_out: get(&self.frames_out),
            messages_in: get(&self.messages_in),
            send_key_duplicates: get(&self.send_key_duplicates),
            send_key_searches: get(&self.send_key_searches),
            slow_closed: get(&self.slow_closed),
            idle_closed: get(&self.idle_closed),
            handshake_timeouts: get(&self.handshake_timeouts),
            flood_closed: get(&self.flood_closed),
            tls_errors: get(&self.tls_errors),
            errors: self.errors.each_ref().map(get),
            hooks: self.hooks.snapshot(),
        }
    }
}

/// Registers the collector of `svc`'s transport and hub counters in `registry`.
pub(crate) fn register(svc: WeakService, registry: &mut Registry) {
    registry.register_collector(Box::new(WsCollector(svc)));
}

/// Reads the snapshots at scrape time. Holds the service weakly: a registry that outlives the
/// transport does not keep its hub (and the hub's broker subscriptions) alive, it just stops
/// reporting it.
#[derive(Debug)]
struct WsCollector(WeakService);

/// One metric without labels. `name` is the family name: prometheus-client appends `_total` to
/// counters (so `chatbus_frames_in` is exposed as `chatbus_frames_in_total`).
fn encode_one(
    encoder: &mut DescriptorEncoder<'_>,
    (name, help, kind, value): (&str, &str, MetricType, u64),
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => metric.encode_counter::<NoLabelSet, _, u64>(&value, None),
        _ => metric.encode_gauge(&value),
    }
}

impl Collector for WsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(svc) = self.0.upgrade() else {
            return Ok(());
        };
        let ws = svc.metrics();
        let hub = svc.chat().hub().stats();
        let ChatStats { decode_errors, .. } = svc.chat().stats();
        use MetricType::{Counter, Gauge};
        for metric in [
            (
                "chatbus_connections",
                "Open WebSocket connections.",
                Gauge,
                ws.connections,
            ),
            (
                "chatbus_connections",
                "WebSocket connections accepted.",
                Counter,
                ws.connections_total,
            ),
            (
                "chatbus_connections_refused",
                "WebSocket handshakes refused because the instance was at its connection limit.",
                Counter,
                ws.connections_refused,
            ),
            (
                "chatbus_frames_in",
                "Frames received from clients.",
                Counter,
                ws.frames_in,
            ),
            (
                "chatbus_frames_out",
                "Frames written to clients.",
                Counter,
                ws.frames_out,
            ),
            (
                "chatbus_messages_in",
                "Chat messages accepted from clients.",
                Counter,
                ws.messages_in,
            ),
            (
                "chatbus_send_key_duplicates",
                "Sends answered with the original's ack because their key was sent before.",
                Counter,
                ws.send_key_duplicates,
            ),
            (
                "chatbus_send_key_searches",
                "Log searches for the original of a retried send.",
                Counter,
                ws.send_key_searches,
            ),
            (
                "chatbus_send_keys",
                "Idempotency keys this instance remembers.",
                Gauge,
                svc.chat().send_keys().len() as u64,
            ),
            (
                "chatbus_messages_out",
                "Messages fanned out to local sessions (one per recipient).",
                Counter,
                hub.deliveries,
            ),
            (
                "chatbus_broker_messages",
                "Messages received from the broker.",
                Counter,
                hub.messages_in,
            ),
            (
                "chatbus_lagged",
                "Times a session fell behind and had to resync.",
                Counter,
                hub.lagged,
            ),
            (
                "chatbus_replayed",
                "Messages delivered from the log during catch-up.",
                Counter,
                hub.replayed,
            ),
            (
                "chatbus_duplicates",
                "Duplicate copies dropped by the hub.",
                Counter,
                hub.duplicates,
            ),
            (
                "chatbus_resets",
                "Times a session was told its history reset (its cursor did not fit the room's log).",
                Counter,
                hub.resets,
            ),
            (
                "chatbus_replay_reads",
                "Log reads made for catch-ups (one serves every member resuming a room from about the same place).",
                Counter,
                hub.replay_reads,
            ),
            (
                "chatbus_replays_shared",
                "Catch-up pages served by a log read made for another member.",
                Counter,
                hub.replays_shared,
            ),
            (
                "chatbus_slow_closed",
                "Connections closed as slow consumers.",
                Counter,
                hub.slow_closed + ws.slow_closed,
            ),
            (
                "chatbus_idle_closed",
                "Connections closed after the idle timeout.",
                Counter,
                ws.idle_closed,
            ),
            (
                "chatbus_handshake_timeouts",
                "TCP connections closed for not completing the HTTP upgrade in time.",
                Counter,
                ws.handshake_timeouts,
            ),
            (
                "chatbus_flood_closed",
                "Connections closed for flooding control frames (4008).",
                Counter,
                ws.flood_closed,
            ),
            (
                "chatbus_tls_errors",
                "TLS handshakes that failed.",
                Counter,
                ws.tls_errors,
            ),
            (
                "chatbus_broker_errors",
                "Errors from broker subscriptions.",
                Counter,
                hub.broker_errors,
            ),
            (
                "chatbus_decode_errors",
                "Broker envelopes dropped as undecodable.",
                Counter,
                decode_errors,
            ),
            ("chatbus_sessions", "Hub sessions.", Gauge, hub.sessions),
            (
                "chatbus_rooms",
                "Rooms with local members.",
                Gauge,
                hub.rooms,
            ),
        ] {
            encode_one(&mut encoder, metric)?;
        }
        let mut errors = encoder.encode_descriptor(
            "chatbus_errors",
            "Errors answered to clients, by code.",
            None,
            Counter,
        )?;
        for code in ErrorCode::ALL {
            errors
                .encode_family(&[("code", code.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&ws.errors(code), None)?;
        }
        for (name, help, value) in [
            (
                "chatbus_hook_calls",
                "Application hook calls, by hook.",
                (|h: HookStats| h.calls) as fn(HookStats) -> u64,
            ),
            (
                "chatbus_hook_denials",
                "Application hook calls that denied the action, by hook.",
                |h| h.denials,
            ),
            (
                "chatbus_hook_failures",
                "Application hook calls that timed out or panicked (the action was denied), by hook.",
                |h| h.failures,
            ),
            (
                "chatbus_hook_micros",
                "Microseconds spent in application hooks, by hook.",
                |h| h.micros,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, Counter)?;
            for kind in HookKind::ALL {
                family
                    .encode_family(&[("hook", kind.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&value(ws.hook(kind)), None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chatbus_core::MemoryBroker;
    use prometheus_client::encoding::prometheus_text;

    use super::*;
    use crate::{ChatHub, WsConfig, WsService};

    fn scrape(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_text::encode(&mut text, registry).expect("encoding into a String");
        text
    }

    /// The exposed names are the documented ones (`docs/protocol.md`, "Metrics"): counters get
    /// `_total` from prometheus-client exactly once, gauges none.
    #[test]
    fn names_types_and_labels_are_the_documented_ones() {
        let ws = WsService::new(
            ChatHub::new(Arc::new(MemoryBroker::new())),
            WsConfig::default(),
        );
        ws.counters().count_error(ErrorCode::TooLarge);
        let mut registry = Registry::default();
        ws.register_metrics(&mut registry);
        let text = scrape(&registry);
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            types,
            [
                "chatbus_connections gauge",
                "chatbus_connections_total counter",
                "chatbus_connections_refused_total counter",
                "chatbus_frames_in_total counter",
                "chatbus_frames_out_total counter",
                "chatbus_messages_in_total counter",
                "chatbus_send_key_duplicates_total counter",
                "chatbus_send_key_searches_total counter",
                "chatbus_send_keys gauge",
                "chatbus_messages_out_total counter",
                "chatbus_broker_messages_total counter",
                "chatbus_lagged_total counter",
                "chatbus_replayed_total counter",
                "chatbus_duplicates_total counter",
                "chatbus_resets_total counter",
                "chatbus_replay_reads_total counter",
                "chatbus_replays_shared_total counter",
                "chatbus_slow_closed_total counter",
                "chatbus_idle_closed_total counter",
                "chatbus_handshake_timeouts_total counter",
                "chatbus_flood_closed_total counter",
                "chatbus_tls_errors_total counter",
                "chatbus_broker_errors_total counter",
                "chatbus_decode_errors_total counter",
                "chatbus_sessions gauge",
                "chatbus_rooms gauge",
                "chatbus_errors_total counter",
                "chatbus_hook_calls_total counter",
                "chatbus_hook_denials_total counter",
                "chatbus_hook_failures_total counter",
                "chatbus_hook_micros_total counter",
            ]
        );
        assert!(text.contains("\nchatbus_hook_denials_total{hook=\"join\"} 0\n"));
        assert!(text.contains("# HELP chatbus_connections Open WebSocket connections.\n"));
        assert!(text.contains("\nchatbus_errors_total{code=\"too_large\"} 1\n"));
        assert!(text.contains("\nchatbus_errors_total{code=\"internal\"} 0\n"));
        assert!(!text.contains("# EOF"), "Prometheus text, not OpenMetrics");

        // The registry does not keep the service alive; then it reports nothing.
        drop(ws);
        assert_eq!(scrape(&registry), "");
    }
}
