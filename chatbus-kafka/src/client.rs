//! librdkafka clients: their configuration, a context that tracks connectivity, and the mapping
//! of rdkafka errors to `chatbus_core::Error`.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatbus_core::{Error, MessageId};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::KafkaConfig;

pub(crate) const BACKEND: &str = "kafka";

/// What every client of one broker has seen of the cluster, for `health()` and error messages.
#[derive(Debug, Default)]
pub(crate) struct ConnState {
    /// librdkafka reported that no broker is reachable, and nothing succeeded since.
    all_down: AtomicBool,
    /// The last client error librdkafka reported, for messages.
    last_error: Mutex<Option<String>>,
    /// Client errors reported so far (a metric).
    pub(crate) errors: AtomicU64,
}

impl ConnState {
    /// Records that a request succeeded, so the cluster is reachable again.
    pub(crate) fn mark_up(&self) {
        self.all_down.store(false, Ordering::Relaxed);
    }

    pub(crate) fn mark_down(&self, reason: String) {
        self.all_down.store(true, Ordering::Relaxed);
        *lock(&self.last_error) = Some(reason);
    }

    pub(crate) fn is_down(&self) -> bool {
        self.all_down.load(Ordering::Relaxed)
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the data consistent, so a panic elsewhere while holding the
    // lock must not take the broker down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The context of every client: routes librdkafka's logs to `tracing` and records
/// connectivity in [`ConnState`].
#[derive(Clone, Default)]
pub(crate) struct Context {
    pub(crate) conn: Arc<ConnState>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", fac, "{message}");
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.conn.errors.fetch_add(1, Ordering::Relaxed);
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.conn.mark_down(reason.to_owned());
        } else {
            *lock(&self.conn.last_error) = Some(reason.to_owned());
        }
        // Transport errors repeat every reconnect attempt while a broker is down: keep them
        // out of the warn level.
        if matches!(
            code,
            Some(RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown)
        ) {
            tracing::debug!(target: "librdkafka", %error, "{reason}");
        } else {
            tracing::warn!(target: "librdkafka", %error, "{reason}");
        }
    }
}

impl ConsumerContext for Context {}

/// Settings shared by every client of the broker.
fn base(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("client.id", &config.client_id)
        // librdkafka backs off reconnects up to 10 s by default; a chat server wants to be
        // back within a second of the broker.
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "1000")
        .set("socket.keepalive.enable", "true")
        .set("log.connection.close", "false");
    c
}

fn finish(mut c: ClientConfig, config: &KafkaConfig) -> ClientConfig {
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    c
}

fn millis(d: Duration) -> String {
    d.as_millis().clamp(0, i32::MAX as u128).to_string()
}

/// The idempotent producer.
pub(crate) fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = base(config);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", millis(config.linger))
        .set("batch.num.messages", config.batch_size.max(1).to_string())
        // Bounds a publish from enqueue to ack, so a down cluster fails it in time.
        .set("message.timeout.ms", millis(config.publish_timeout))
        .set(
            "request.timeout.ms",
            millis(config.publish_timeout.min(Duration::from_secs(30))),
        )
        .set(
            "message.max.bytes",
            (config.max_message_bytes.saturating_add(1024)).to_string(),
        );
    finish(c, config)
}

/// A consumer that only ever uses `assign` (no group subscription, no commits).
///
/// librdkafka requires a `group.id` for `assign`; a fresh unique one per client guarantees it
/// never joins, or shares partitions with, another consumer.
pub(crate) fn consumer_config(
    config: &KafkaConfig,
    role: &str,
    fetch_wait: Duration,
) -> ClientConfig {
    let mut c = base(config);
    c.set(
        "group.id",
        format!("{}-{role}-{}", config.client_id, MessageId::new()),
    )
    .set("enable.auto.commit", "false")
    .set("enable.auto.offset.store", "false")
    .set("enable.partition.eof", "false")
    // Offsets come from our own positions; if one is out of range (retention deleted it),
    // start from what the log still has rather than skip to the end.
    .set("auto.offset.reset", "earliest")
    .set("fetch.wait.max.ms", millis(fetch_wait))
    .set("fetch.error.backoff.ms", "50")
    // Replay readers are pooled and reassigned; a small prefetch wastes less on reassign.
    .set("queued.max.messages.kbytes", "16384")
    .set("isolation.level", "read_uncommitted");
    finish(c, config)
}

/// The admin client.
pub(crate) fn admin_config(config: &KafkaConfig) -> ClientConfig {
    finish(base(config), config)
}

/// An rdkafka error kept opaque in `Error::Backend` (the source chain still holds the
/// `rdkafka::error::KafkaError` for callers that downcast, via the re-exported `rdkafka`).
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub(crate) struct KafkaOpError {
    op: &'static str,
    #[source]
    source: KafkaError,
}

/// Maps an rdkafka error of operation `op` (which had `after` to complete).
pub(crate) fn map_error(
    op: &'static str,
    error: KafkaError,
    after: Duration,
    conn: &ConnState,
) -> Error {
    use RDKafkaErrorCode as C;
    let code = error.rdkafka_error_code();
    let unreachable = || {
        let last = conn.last_error().unwrap_or_else(|| error.to_string());
        Error::Unavailable {
            backend: BACKEND,
            reason: format!("{op}: no Kafka broker reachable ({last})"),
        }
    };
    match code {
        Some(C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut) => {
            if conn.is_down() {
                unreachable()
            } else {
                Error::Timeout {
                    backend: BACKEND,
                    op,
                    after,
                }
            }
        }
        Some(
            C::AllBrokersDown
            | C::BrokerTransportFailure
            | C::NetworkException
            | C::BrokerNotAvailable
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::Resolve,
        ) => unreachable(),
        // The broker refused the idempotent producer's state (see producer.rs): the next
        // publish uses a fresh producer, so a retry can succeed.
        Some(
            C::Unknown
            | C::OutOfOrderSequenceNumber
            | C::UnknownProducerId
            | C::InvalidProducerEpoch
            | C::InvalidProducerIdMapping,
        ) => Error::Unavailable {
            backend: BACKEND,
            reason: format!("{op}: the broker refused the producer state ({error}); retry"),
        },
        Some(C::QueueFull) => Error::Unavailable {
            backend: BACKEND,
            reason: format!("{op}: the producer queue is full (the cluster is too slow or down)"),
        },
        Some(C::MessageSizeTooLarge) => Error::Unavailable {
            backend: BACKEND,
            reason: format!("{op}: the cluster refused the message as too large ({error})"),
        },
        _ => Error::backend(BACKEND, KafkaOpError { op, source: error }),
    }
}

/// Runs blocking librdkafka calls off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> chatbus_core::Result<T> + Send + 'static,
) -> chatbus_core::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::backend(BACKEND, e))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_become_unavailable_when_all_brokers_are_down() {
        let conn = ConnState::default();
        let err = || KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        let after = Duration::from_secs(1);
        assert!(matches!(
            map_error("publish", err(), after, &conn),
            Error::Timeout { op: "publish", .. }
        ));
        conn.mark_down("127.0.0.1:1/bootstrap: Connect refused".into());
        match map_error("publish", err(), after, &conn) {
            Error::Unavailable { reason, .. } => {
                assert!(reason.contains("Connect refused"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        conn.mark_up();
        assert!(map_error("publish", err(), after, &conn).is_transient());
        let other = map_error(
            "publish",
            KafkaError::MessageProduction(RDKafkaErrorCode::InvalidRecord),
            after,
            &conn,
        );
        assert!(matches!(other, Error::Backend { .. }) && !other.is_transient());
    }
}
