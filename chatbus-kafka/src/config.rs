//! [`KafkaConfig`]: where the cluster is, which topic, and how the clients behave.

use std::time::Duration;

use chatbus_core::{Error, Result};

/// Prefix of environment variables that pass a librdkafka property through
/// (see [`KafkaConfig::from_env`]).
pub const ENV_PROP_PREFIX: &str = "CHATBUS_KAFKA_PROP_";

/// Configuration of a [`KafkaBroker`](crate::KafkaBroker).
///
/// Build it from [`Default`] with the `with_*` setters, or from the environment with
/// [`from_env`](Self::from_env). Anything librdkafka understands (TLS, SASL, client tuning) can
/// be passed with [`with_property`](Self::with_property); those properties are applied last, to
/// every client the broker creates (producer, tail consumer, replay readers, admin), so they
/// override the defaults listed here.
///
/// ```
/// use std::time::Duration;
/// use chatbus_kafka::KafkaConfig;
///
/// let config = KafkaConfig::default()
///     .with_brokers("kafka-1:9092,kafka-2:9092")
///     .with_topic("chat")
///     .with_partitions(12)
///     .with_replication(3)
///     .with_linger(Duration::from_millis(2))
///     .with_property("security.protocol", "SASL_SSL")
///     .with_property("sasl.mechanism", "SCRAM-SHA-512");
/// assert_eq!(config.topic, "chat");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated (`bootstrap.servers`). Default `127.0.0.1:9092`;
    /// env `CHATBUS_KAFKA_BROKERS`.
    pub brokers: String,
    /// The one topic that carries every room. Default `chatbus`; env `CHATBUS_KAFKA_TOPIC`.
    pub topic: String,
    /// Partitions of the topic: the count it is created with, and the count an existing topic
    /// must have. Rooms are hashed to partitions by this count and cursors name a partition,
    /// so a different count would split rooms across partitions: `connect` fails with
    /// `Error::Config` when an existing topic has another count (unless
    /// [`adopt_existing_partitions`](Self::adopt_existing_partitions)), and a running broker
    /// refuses publishes once it sees the count change (see
    /// [`partition_check_interval`](Self::partition_check_interval)). Default 8; env
    /// `CHATBUS_KAFKA_PARTITIONS`.
    pub partitions: u32,
    /// Accept an existing topic whose partition count differs from
    /// [`partitions`](Self::partitions) and use its count. Only right when the topic has had
    /// that count since it was created (for example a topic made by an operator tool); never
    /// after the topic was grown, since rooms already in the log were hashed by the old
    /// count. Default false; env `CHATBUS_KAFKA_ADOPT_PARTITIONS` (`true`/`false`).
    pub adopt_existing_partitions: bool,
    /// How often a running broker re-reads the topic's metadata to notice a partition count
    /// that changed under it (`health` checks it too). Default 30 s; env
    /// `CHATBUS_KAFKA_PARTITION_CHECK_MS`.
    pub partition_check_interval: Duration,
    /// Learn the epoch of every partition at connect (one short background read of each
    /// partition's offset 0 with a replay reader), so that cursors carry it from the start;
    /// without it an epoch is learned at the first replay or publish that meets offset 0, and
    /// cursors handed out before are of an unknown epoch. Default true. (Off only where the
    /// topic is deleted under the running broker: librdkafka 2.12 was seen to crash, SIGSEGV
    /// in its metadata cache, when a topic that one of its consumers had read was deleted.)
    pub probe_epochs_at_connect: bool,
    /// Replication factor of the topic when the broker creates it. Default 1 (a single-node
    /// development cluster); use 3 in production. Env `CHATBUS_KAFKA_REPLICATION`.
    pub replication: u32,
    /// Create the topic with the admin API when it does not exist. Default true. Turn it off
    /// where the application's credentials may not create topics.
    pub create_topic: bool,
    /// How long the producer waits to fill a batch (`linger.ms`). Default 0; env
    /// `CHATBUS_KAFKA_LINGER_MS`.
    ///
    /// The trade-off: every publish waits up to this long before its batch is sent, so it adds
    /// directly to publish→ack latency (and, under `DualBus`, to the fast path, which publishes
    /// after the durable ack); in exchange, concurrent publishes share one produce request and
    /// one broker write, which raises throughput and lowers broker load. Even at 0 librdkafka
    /// batches whatever queues up while earlier requests are in flight. Measured on Tansu
    /// (`examples/kafka_bench.rs`, 200-byte messages): linger 0 gives 0.4 ms per publish one at
    /// a time and about 23,000 msg/s with 256 concurrent publishers; 5 ms gives 6 ms and about
    /// 28,000 msg/s. Raise it for bulk traffic, keep it at 0–1 ms for chat.
    pub linger: Duration,
    /// Most messages per produce batch (`batch.num.messages`). Default 10,000.
    pub batch_size: usize,
    /// How long `publish` may take, from the call to the broker's acknowledgement
    /// (`message.timeout.ms`). When the cluster is unreachable, `publish` fails with
    /// `Error::Timeout` or `Error::Unavailable` within this time. Default 5 s; env
    /// `CHATBUS_KAFKA_PUBLISH_TIMEOUT_MS`.
    pub publish_timeout: Duration,
    /// Limit of one metadata, admin, offset lookup or replay step. Default 10 s.
    pub request_timeout: Duration,
    /// Longest time the broker holds a fetch of the tail consumer open when there is no new
    /// data (`fetch.wait.max.ms`). Default 100 ms; env `CHATBUS_KAFKA_FETCH_WAIT_MS`.
    ///
    /// Kafka answers a fetch as soon as data arrives, so there this only sets the idle polling
    /// rate. Tansu 0.6 holds every fetch for the full wait, so there it *is* the live delivery
    /// latency: use 10–20 ms (each fetch costs the broker a storage read, so shorter waits
    /// cost broker CPU while idle).
    pub fetch_wait: Duration,
    /// Buffer of each subscription, in messages (see `Broker::subscribe` for what happens when
    /// it is full). Default 4,096.
    pub subscriber_capacity: usize,
    /// Most records `history` reads backwards in one call looking for a room's messages, so
    /// that a page of a quiet room in a busy partition stays bounded. A page this stops short
    /// says so (`HistoryPage::more_before`, where to continue). Default 100,000.
    pub history_scan_limit: usize,
    /// Most `replay`/`history` reads running at once. Each holds a replay reader (a
    /// librdkafka consumer: a few threads and a connection to the partition's leader) and a
    /// blocking thread while it reads; up to this many readers are kept open for reuse.
    /// Further calls queue in arrival order and fail with `Error::Timeout` after
    /// [`request_timeout`](Self::request_timeout) without a free reader. A replay stream
    /// holds a reader only while it reads a chunk (up to 512 messages), not while its caller
    /// drains it. Bounds what a crowd of clients resuming at once (all those of an instance
    /// that died) costs. Default 8; env `CHATBUS_KAFKA_MAX_CONCURRENT_REPLAYS`.
    pub max_concurrent_replays: usize,
    /// Largest encoded message accepted by `publish`, in bytes. Default 1,000,000 (Kafka's
    /// default `max.message.bytes` is a little larger).
    pub max_message_bytes: usize,
    /// `client.id` of every client. Default `chatbus`.
    pub client_id: String,
    /// librdkafka properties applied last to every client (see the type docs).
    pub properties: Vec<(String, String)>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "chatbus".into(),
            partitions: 8,
            adopt_existing_partitions: false,
            partition_check_interval: Duration::from_secs(30),
            probe_epochs_at_connect: true,
            replication: 1,
            create_topic: true,
            linger: Duration::ZERO,
            batch_size: 10_000,
            publish_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            fetch_wait: Duration::from_millis(100),
            subscriber_capacity: 4096,
            history_scan_limit: 100_000,
            max_concurrent_replays: 8,
            max_message_bytes: 1_000_000,
            client_id: "chatbus".into(),
            properties: Vec::new(),
        }
    }
}

impl KafkaConfig {
    /// The librdkafka settings of [`KafkaBroker`](crate::KafkaBroker)'s producer for this
    /// configuration (idempotent, `acks=all`, the timeouts and the pass-through properties):
    /// for a raw rdkafka client that must behave as the broker's does, such as a benchmark's
    /// baseline.
    pub fn producer_client_config(&self) -> rdkafka::ClientConfig {
        crate::client::producer_config(self)
    }

    /// The default configuration with these bootstrap servers.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self::default().with_brokers(brokers)
    }

    /// Reads the configuration from environment variables; unset ones keep their defaults.
    ///
    /// | variable | field |
    /// |---|---|
    /// | `CHATBUS_KAFKA_BROKERS` | [`brokers`](Self::brokers) |
    /// | `CHATBUS_KAFKA_TOPIC` | [`topic`](Self::topic) |
    /// | `CHATBUS_KAFKA_PARTITIONS` | [`partitions`](Self::partitions) |
    /// | `CHATBUS_KAFKA_ADOPT_PARTITIONS` | [`adopt_existing_partitions`](Self::adopt_existing_partitions) |
    /// | `CHATBUS_KAFKA_PARTITION_CHECK_MS` | [`partition_check_interval`](Self::partition_check_interval) |
    /// | `CHATBUS_KAFKA_REPLICATION` | [`replication`](Self::replication) |
    /// | `CHATBUS_KAFKA_LINGER_MS` | [`linger`](Self::linger) |
    /// | `CHATBUS_KAFKA_PUBLISH_TIMEOUT_MS` | [`publish_timeout`](Self::publish_timeout) |
    /// | `CHATBUS_KAFKA_FETCH_WAIT_MS` | [`fetch_wait`](Self::fetch_wait) |
    /// | `CHATBUS_KAFKA_MAX_CONCURRENT_REPLAYS` | [`max_concurrent_replays`](Self::max_concurrent_replays) |
    /// | `CHATBUS_KAFKA_PROP_<NAME>` | a librdkafka property: `<NAME>` lowercased, `_` → `.` |
    ///
    /// For example `CHATBUS_KAFKA_PROP_SECURITY_PROTOCOL=SASL_SSL` sets `security.protocol`.
    /// (Properties whose name contains `_`, which few do, need
    /// [`with_property`](Self::with_property).)
    ///
    /// Errors: `Error::Config` naming the variable when a value does not parse.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(std::env::vars_os().filter_map(|(k, v)| {
            // Variables that are not UTF-8 cannot be ours; skip them rather than fail.
            Some((k.into_string().ok()?, v.into_string().ok()?))
        }))
    }

    /// [`from_env`](Self::from_env) over an explicit list of variables, for tests and for
    /// callers that keep configuration elsewhere.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut config = Self::default();
        let mut props = Vec::new();
        for (key, value) in vars {
            let key = key.as_ref();
            let value: String = value.into();
            match key {
                "CHATBUS_KAFKA_BROKERS" => config.brokers = value,
                "CHATBUS_KAFKA_TOPIC" => config.topic = value,
                "CHATBUS_KAFKA_PARTITIONS" => config.partitions = parse(key, &value)?,
                "CHATBUS_KAFKA_ADOPT_PARTITIONS" => {
                    config.adopt_existing_partitions = parse(key, &value)?;
                }
                "CHATBUS_KAFKA_PARTITION_CHECK_MS" => {
                    config.partition_check_interval = Duration::from_millis(parse(key, &value)?);
                }
                "CHATBUS_KAFKA_REPLICATION" => config.replication = parse(key, &value)?,
                "CHATBUS_KAFKA_LINGER_MS" => {
                    config.linger = Duration::from_millis(parse(key, &value)?);
                }
                "CHATBUS_KAFKA_PUBLISH_TIMEOUT_MS" => {
                    config.publish_timeout = Duration::from_millis(parse(key, &value)?);
                }
                "CHATBUS_KAFKA_FETCH_WAIT_MS" => {
                    config.fetch_wait = Duration::from_millis(parse(key, &value)?);
                }
                "CHATBUS_KAFKA_MAX_CONCURRENT_REPLAYS" => {
                    config.max_concurrent_replays = parse(key, &value)?;
                }
                _ => {
                    if let Some(name) = key.strip_prefix(ENV_PROP_PREFIX) {
                        if name.is_empty() {
                            return Err(Error::Config(format!("{key} names no property")));
                        }
                        props.push((name.to_ascii_lowercase().replace('_', "."), value));
                    }
                }
            }
        }
        // The environment has no order; sort so that the resulting config is deterministic.
        props.sort();
        config.properties.extend(props);
        config.validate()?;
        Ok(config)
    }

    /// Sets [`brokers`](Self::brokers).
    #[must_use]
    pub fn with_brokers(mut self, brokers: impl Into<String>) -> Self {
        self.brokers = brokers.into();
        self
    }

    /// Sets [`topic`](Self::topic).
    #[must_use]
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// Sets [`partitions`](Self::partitions).
    #[must_use]
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Sets [`adopt_existing_partitions`](Self::adopt_existing_partitions).
    #[must_use]
    pub fn with_adopt_existing_partitions(mut self, adopt: bool) -> Self {
        self.adopt_existing_partitions = adopt;
        self
    }

    /// Sets [`probe_epochs_at_connect`](Self::probe_epochs_at_connect).
    #[must_use]
    pub fn with_probe_epochs_at_connect(mut self, on: bool) -> Self {
        self.probe_epochs_at_connect = on;
        self
    }

    /// Sets [`partition_check_interval`](Self::partition_check_interval).
    #[must_use]
    pub fn with_partition_check_interval(mut self, interval: Duration) -> Self {
        self.partition_check_interval = interval;
        self
    }

    /// Sets [`replication`](Self::replication).
    #[must_use]
    pub fn with_replication(mut self, replication: u32) -> Self {
        self.replication = replication;
        self
    }

    /// Sets [`create_topic`](Self::create_topic).
    #[must_use]
    pub fn with_create_topic(mut self, create: bool) -> Self {
        self.create_topic = create;
        self
    }

    /// Sets [`linger`](Self::linger).
    #[must_use]
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Sets [`batch_size`](Self::batch_size).
    #[must_use]
    pub fn with_batch_size(mut self, messages: usize) -> Self {
        self.batch_size = messages;
        self
    }

    /// Sets [`publish_timeout`](Self::publish_timeout).
    #[must_use]
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`fetch_wait`](Self::fetch_wait).
    #[must_use]
    pub fn with_fetch_wait(mut self, wait: Duration) -> Self {
        self.fetch_wait = wait;
        self
    }

    /// Sets [`subscriber_capacity`](Self::subscriber_capacity).
    #[must_use]
    pub fn with_subscriber_capacity(mut self, capacity: usize) -> Self {
        self.subscriber_capacity = capacity;
        self
    }

    /// Sets [`history_scan_limit`](Self::history_scan_limit).
    #[must_use]
    pub fn with_history_scan_limit(mut self, records: usize) -> Self {
        self.history_scan_limit = records;
        self
    }

    /// Sets [`max_concurrent_replays`](Self::max_concurrent_replays).
    #[must_use]
    pub fn with_max_concurrent_replays(mut self, readers: usize) -> Self {
        self.max_concurrent_replays = readers;
        self
    }

    /// Sets [`max_message_bytes`](Self::max_message_bytes).
    #[must_use]
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Sets [`client_id`](Self::client_id).
    #[must_use]
    pub fn with_client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// Adds a librdkafka property (for example `security.protocol`, `sasl.username`,
    /// `ssl.ca.location`), applied last to every client. TLS and SASL SCRAM need this crate's
    /// `ssl` feature; SASL PLAIN works without it.
    #[must_use]
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }

    /// Checks values that librdkafka would reject later with a less clear message.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.brokers.trim().is_empty() {
            return bad("no Kafka brokers configured".into());
        }
        // Kafka topic names: 1..=249 of [a-zA-Z0-9._-].
        if self.topic.is_empty()
            || self.topic.len() > 249
            || !self
                .topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return bad(format!(
                "invalid Kafka topic name {:?} (1 to 249 of A-Z a-z 0-9 . _ -)",
                self.topic
            ));
        }
        if self.partitions == 0 || i32::try_from(self.partitions).is_err() {
            return bad(format!("invalid partition count {}", self.partitions));
        }
        if self.replication == 0 || i32::try_from(self.replication).is_err() {
            return bad(format!("invalid replication factor {}", self.replication));
        }
        if self.publish_timeout < Duration::from_millis(1) || self.publish_timeout <= self.linger {
            return bad("publish_timeout must be at least 1 ms and longer than linger".into());
        }
        if self.partition_check_interval < Duration::from_millis(10) {
            return bad("partition_check_interval must be at least 10 ms".into());
        }
        if self.request_timeout < Duration::from_millis(1) {
            return bad("request_timeout must be at least 1 ms".into());
        }
        if self.max_concurrent_replays == 0
            || self.max_concurrent_replays > tokio::sync::Semaphore::MAX_PERMITS
        {
            return bad(format!(
                "max_concurrent_replays must be at least 1, got {}",
                self.max_concurrent_replays
            ));
        }
        Ok(())
    }
}

fn parse<T: std::str::FromStr>(key: &str, value: &str) -> Result<T> {
    value.trim().parse().map_err(|_| {
        Error::Config(format!(
            "{key}={value:?} is not a valid {}",
            std::any::type_name::<T>()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_vars_map_to_fields_and_properties() {
        let config = KafkaConfig::from_vars([
            ("CHATBUS_KAFKA_BROKERS", "k1:9092,k2:9092"),
            ("CHATBUS_KAFKA_TOPIC", "chat"),
            ("CHATBUS_KAFKA_PARTITIONS", "3"),
            ("CHATBUS_KAFKA_LINGER_MS", "7"),
            ("CHATBUS_KAFKA_MAX_CONCURRENT_REPLAYS", "3"),
            ("CHATBUS_KAFKA_PROP_SECURITY_PROTOCOL", "SASL_SSL"),
            ("CHATBUS_KAFKA_PROP_SASL_MECHANISM", "PLAIN"),
            ("UNRELATED", "x"),
        ])
        .expect("valid");
        assert_eq!(config.brokers, "k1:9092,k2:9092");
        assert_eq!(config.topic, "chat");
        assert_eq!(config.partitions, 3);
        assert_eq!(config.linger, Duration::from_millis(7));
        assert_eq!(config.max_concurrent_replays, 3);
        assert_eq!(
            config.properties,
            [
                ("sasl.mechanism".to_string(), "PLAIN".to_string()),
                ("security.protocol".to_string(), "SASL_SSL".to_string()),
            ]
        );
    }

    #[test]
    fn bad_values_are_config_errors() {
        for vars in [
            [("CHATBUS_KAFKA_PARTITIONS", "many")],
            [("CHATBUS_KAFKA_PARTITIONS", "0")],
            [("CHATBUS_KAFKA_TOPIC", "a topic")],
            [("CHATBUS_KAFKA_BROKERS", " ")],
            [("CHATBUS_KAFKA_PROP_", "x")],
            [("CHATBUS_KAFKA_MAX_CONCURRENT_REPLAYS", "0")],
        ] {
            match KafkaConfig::from_vars(vars) {
                Err(Error::Config(_)) => {}
                other => panic!("{vars:?}: expected a config error, got {other:?}"),
            }
        }
    }
}
