//! `/metrics`: one `prometheus-client` registry holding chatbus-ws's counters, the broker's and
//! `chatbus_broker_up`, encoded in the Prometheus text format (version 0.0.4).
//!
//! The brokers' counters are snapshots (`RedisStats`, `KafkaStats`, `DualStats`): collectors
//! read them when `/metrics` is scraped, so serving metrics adds nothing to the hot path.

use std::fmt;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use chatbus_core::{DualBus, DualMode, DualStats};
use chatbus_kafka::KafkaBroker;
use chatbus_redis::RedisBroker;
use chatbus_ws::state::Projector;
use chatbus_ws::WsService;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// What `/metrics` serves: one registry with chatbus-ws's counters, the broker's, and
/// `chatbus_broker_up`, which needs an async health check and so is set at each scrape.
pub(crate) struct Scrape {
    registry: Registry,
    broker_up: Gauge,
}

impl Scrape {
    pub(crate) fn new(ws: &WsService, collectors: Vec<Box<dyn Collector>>) -> Self {
        let mut registry = Registry::default();
        ws.register_metrics(&mut registry);
        for collector in collectors {
            registry.register_collector(collector);
        }
        let broker_up = Gauge::default();
        let broker = ws.chat().hub().broker().name();
        registry
            .sub_registry_with_label(("broker".into(), broker.into()))
            // prometheus-client ends the help with a full stop.
            .register(
                "chatbus_broker_up",
                "Whether the broker accepts publishes",
                broker_up.clone(),
            );
        Self {
            registry,
            broker_up,
        }
    }
}

/// The `/metrics` handler.
pub(crate) async fn serve(ws: WsService, scrape: Arc<Scrape>) -> Response {
    let up = ws.chat().hub().broker().health().await.is_up();
    scrape.broker_up.set(i64::from(up));
    let mut body = String::with_capacity(8192);
    if let Err(e) = prometheus_text::encode(&mut body, &scrape.registry) {
        tracing::error!(error = %e, "cannot encode metrics");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        body,
    )
        .into_response()
}

/// [`RedisBroker::stats`] at scrape time.
#[derive(Debug)]
pub(crate) struct RedisMetrics(pub(crate) Arc<RedisBroker>);

/// [`KafkaBroker::stats`] at scrape time.
#[derive(Debug)]
pub(crate) struct KafkaMetrics(pub(crate) Arc<KafkaBroker>);

/// [`DualBus::stats`] and its two brokers' at scrape time.
#[derive(Debug)]
pub(crate) struct DualMetrics(pub(crate) Arc<DualBus<RedisBroker, KafkaBroker>>);

impl Collector for RedisMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        redis_metrics(&mut encoder, &self.0.stats())
    }
}

impl Collector for KafkaMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        kafka_metrics(&mut encoder, &self.0.stats())
    }
}

impl Collector for DualMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        dual_metrics(&mut encoder, &self.0.stats())?;
        redis_metrics(&mut encoder, &self.0.fast().stats())?;
        kafka_metrics(&mut encoder, &self.0.durable().stats())
    }
}

/// [`Projector::stats`] at scrape time (with `--store postgres`).
#[derive(Debug)]
pub(crate) struct ProjectorMetrics(pub(crate) Arc<Projector>);

impl Collector for ProjectorMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let s = self.0.stats();
        counters(
            &mut encoder,
            &[
                (
                    "chatbus_projector_records",
                    "Log records the chat-state projector read and applied.",
                    s.records,
                ),
                (
                    "chatbus_projector_events",
                    "Chat-state events applied to the store.",
                    s.events,
                ),
                (
                    "chatbus_projector_batches",
                    "Batches applied (one store transaction each).",
                    s.batches,
                ),
                (
                    "chatbus_projector_errors",
                    "Failed reads of the log or applies to the store (retried).",
                    s.errors,
                ),
                (
                    "chatbus_projector_skipped",
                    "Events the store refused for good, skipped (each logged as an error).",
                    s.skipped,
                ),
                (
                    "chatbus_projector_resets",
                    "Times a partition's stored position did not fit the log and it was projected again.",
                    s.resets,
                ),
            ],
        )?;
        for (name, help, value) in [
            (
                "chatbus_projector_partitions_held",
                "Log partitions this instance projects (the others stand by).",
                i64::from(s.partitions_held),
            ),
            (
                "chatbus_projector_lag_ms",
                "How far behind the log the last applied batch was, in milliseconds.",
                i64::try_from(s.last_lag_ms).unwrap_or(i64::MAX),
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// Counters without labels, as `(family name, help, value)`: prometheus-client appends `_total`
/// to a counter's name, so `chatbus_redis_published` is exposed as
/// `chatbus_redis_published_total`.
fn counters(encoder: &mut DescriptorEncoder<'_>, list: &[(&str, &str, u64)]) -> fmt::Result {
    for &(name, help, value) in list {
        let counter = ConstCounter::new(value);
        counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
    }
    Ok(())
}

fn redis_metrics(
    encoder: &mut DescriptorEncoder<'_>,
    s: &chatbus_redis::RedisStats,
) -> fmt::Result {
    counters(
        encoder,
        &[
            (
                "chatbus_redis_published",
                "Messages published to Redis.",
                s.published,
            ),
            (
                "chatbus_redis_publish_errors",
                "Failed Redis publishes.",
                s.publish_errors,
            ),
            (
                "chatbus_redis_received",
                "Messages received from Redis.",
                s.received,
            ),
            (
                "chatbus_redis_decode_errors",
                "Undecodable Redis messages, dropped.",
                s.decode_errors,
            ),
            (
                "chatbus_redis_reconnects",
                "Redis subscriber reconnects.",
                s.reconnects,
            ),
        ],
    )
}

fn kafka_metrics(
    encoder: &mut DescriptorEncoder<'_>,
    s: &chatbus_kafka::KafkaStats,
) -> fmt::Result {
    counters(
        encoder,
        &[
            (
                "chatbus_kafka_published",
                "Messages acknowledged by Kafka.",
                s.published,
            ),
            (
                "chatbus_kafka_publish_errors",
                "Failed Kafka publishes.",
                s.publish_errors,
            ),
            (
                "chatbus_kafka_tail_records",
                "Records read by the Kafka tail.",
                s.tail_records,
            ),
            (
                "chatbus_kafka_malformed",
                "Undecodable Kafka records, skipped.",
                s.malformed,
            ),
            (
                "chatbus_kafka_partition_count_changes",
                "Times the Kafka topic's partition count changed under the server (publishes are then refused).",
                s.partition_count_changes,
            ),
        ],
    )
}

fn dual_metrics(encoder: &mut DescriptorEncoder<'_>, s: &DualStats) -> fmt::Result {
    counters(
        encoder,
        &[
            (
                "chatbus_dual_via_fast",
                "Messages delivered first by the fast path (Redis).",
                s.via_fast,
            ),
            (
                "chatbus_dual_via_durable",
                "Messages delivered first by the durable tail (Kafka).",
                s.via_durable,
            ),
            (
                "chatbus_dual_duplicates",
                "Second copies dropped.",
                s.duplicates,
            ),
            (
                "chatbus_dual_gaps_filled",
                "Fast-path gaps filled from the durable log.",
                s.gaps_filled,
            ),
            (
                "chatbus_dual_gap_timeouts",
                "Gaps given up after the gap timeout.",
                s.gap_timeouts,
            ),
            (
                "chatbus_dual_fast_publish_errors",
                "Failed fast publishes (delivered via the tail).",
                s.fast_publish_errors,
            ),
            (
                "chatbus_dual_durable_publish_errors",
                "Failed durable publishes.",
                s.durable_publish_errors,
            ),
            (
                "chatbus_dual_degraded_publishes",
                "Durable messages published fast-only.",
                s.degraded_publishes,
            ),
            (
                "chatbus_dual_ticketless_publishes",
                "Interest-based: durable messages written without a room ticket (lease lapsed).",
                s.ticketless_publishes,
            ),
            (
                "chatbus_dual_tail_periods",
                "Interest-based: times the rooms were followed through the durable log.",
                s.tail_periods,
            ),
        ],
    )?;
    let tailing = ConstGauge::new(i64::from(s.tailing));
    tailing.encode(encoder.encode_descriptor(
        "chatbus_dual_tailing",
        "Interest-based: 1 while the rooms are followed through the durable log.",
        None,
        tailing.metric_type(),
    )?)?;
    let current = match s.mode {
        DualMode::Dual => "dual",
        DualMode::DurableOnly => "durable-only",
        DualMode::FastOnly => "fast-only",
        DualMode::Down => "down",
    };
    let mut mode = encoder.encode_descriptor(
        "chatbus_dual_mode",
        "The paths in use (1 for the current mode).",
        None,
        MetricType::Gauge,
    )?;
    // Every mode is listed, the current one at 1, so a dashboard can graph each as a series.
    for m in ["dual", "durable-only", "fast-only", "down"] {
        ConstGauge::new(i64::from(m == current)).encode(mode.encode_family(&[("mode", m)])?)?;
    }
    let held = ConstGauge::new(s.held);
    held.encode(encoder.encode_descriptor(
        "chatbus_dual_held",
        "Fast-path messages waiting for a gap to fill.",
        None,
        held.metric_type(),
    )?)
}
