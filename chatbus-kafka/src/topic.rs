//! The topic: created with the admin API when it is missing, and described (partition count,
//! leaders) for `connect` and `health`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatbus_core::{Error, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer as _;

use crate::client::{self, blocking, Context, BACKEND};
use crate::config::KafkaConfig;
use crate::producer::Producer;

/// Creates the topic if needed and waits for its partitions to have leaders; returns the
/// partition count.
pub(crate) async fn ensure_topic(
    config: &KafkaConfig,
    ctx: &Context,
    producer: &Arc<Producer>,
) -> Result<u32> {
    let deadline = Instant::now() + config.request_timeout;
    let topic = config.topic.clone();
    let mut created = false;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let probe = {
            let (producer, topic) = (producer.clone(), topic.clone());
            let wait = remaining
                .min(Duration::from_secs(2))
                .max(Duration::from_millis(100));
            blocking(move || Ok(describe(&producer, &topic, wait))).await?
        };
        match probe {
            TopicState::Ready(n) => {
                ctx.conn.mark_up();
                return check_existing(config, n);
            }
            TopicState::Missing if !config.create_topic => {
                return Err(Error::Config(format!(
                    "Kafka topic {topic:?} does not exist and create_topic is off"
                )));
            }
            TopicState::Missing if !created => {
                create_topic(config, ctx).await?;
                created = true;
            }
            TopicState::Missing | TopicState::NotReady => {}
            TopicState::Unreachable(reason) => {
                if Instant::now() >= deadline {
                    return Err(Error::Unavailable {
                        backend: BACKEND,
                        reason: format!(
                            "cannot reach Kafka at {} within {:?}: {reason}",
                            config.brokers, config.request_timeout
                        ),
                    });
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                backend: BACKEND,
                op: "waiting for the topic's partition leaders",
                after: config.request_timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The count to use for a topic found with `found` partitions: the configured one, the found
/// one when the configuration adopts it, or an error that says what the operator must do.
pub(crate) fn check_existing(config: &KafkaConfig, found: u32) -> Result<u32> {
    if found == config.partitions || config.adopt_existing_partitions {
        if found != config.partitions {
            tracing::warn!(
                topic = %config.topic, found, configured = config.partitions,
                "adopting the existing partition count of the Kafka topic"
            );
        }
        return Ok(found);
    }
    Err(Error::Config(format!(
        "Kafka topic {:?} has {found} partitions but KafkaConfig::partitions is {}: rooms are \
         hashed to partitions by this count, so a different one would split rooms and \
         invalidate cursors. If the topic has had {found} partitions since it was created, set \
         partitions to {found} (or adopt_existing_partitions); if it was grown, move the rooms \
         to a new topic with the intended count",
        config.topic, config.partitions
    )))
}

/// Watches the topic's partition count against the one rooms are hashed by. Once it sees
/// another count it stays tripped: cursors and room placement made with the old count stay
/// wrong even if the count were to change back, so only a restart with a matching
/// configuration clears it.
#[derive(Debug)]
pub(crate) struct PartitionWatch {
    expected: u32,
    /// The other count seen, 0 while none was.
    changed_to: AtomicU32,
}

impl PartitionWatch {
    pub(crate) fn new(expected: u32) -> Self {
        Self {
            expected,
            changed_to: AtomicU32::new(0),
        }
    }

    /// Records a count read from the cluster's metadata; true the first time it differs
    /// (the caller logs it and counts it).
    pub(crate) fn observe(&self, found: u32) -> bool {
        found != self.expected
            && found != 0
            && self
                .changed_to
                .compare_exchange(0, found, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// `Error::Unavailable` saying what changed once the count was seen to change.
    pub(crate) fn check(&self, topic: &str) -> Result<()> {
        match self.changed_to.load(Ordering::Relaxed) {
            0 => Ok(()),
            now => Err(Error::Unavailable {
                backend: BACKEND,
                reason: format!(
                    "the partition count of Kafka topic {topic:?} changed from {} to {now}; \
                     publishing is refused because rooms would split across partitions. \
                     Restore the topic or move the rooms to a new topic, then restart with \
                     KafkaConfig::partitions matching it",
                    self.expected
                ),
            }),
        }
    }
}

pub(crate) enum TopicState {
    Ready(u32),
    Missing,
    NotReady,
    Unreachable(String),
}

pub(crate) fn describe(producer: &Producer, topic: &str, wait: Duration) -> TopicState {
    let md = match producer.client().fetch_metadata(Some(topic), wait) {
        Ok(md) => md,
        Err(e) => return TopicState::Unreachable(e.to_string()),
    };
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return TopicState::Missing;
    };
    match t.error().map(RDKafkaErrorCode::from) {
        None => {}
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            return TopicState::Missing;
        }
        Some(_) => return TopicState::NotReady,
    }
    let parts = t.partitions();
    if parts.is_empty() || parts.iter().any(|p| p.leader() < 0 || p.error().is_some()) {
        return TopicState::NotReady;
    }
    match u32::try_from(parts.len()) {
        Ok(n) => TopicState::Ready(n),
        Err(_) => TopicState::NotReady,
    }
}

async fn create_topic(config: &KafkaConfig, ctx: &Context) -> Result<()> {
    let admin: AdminClient<Context> = client::admin_config(config)
        .create_with_context(ctx.clone())
        .map_err(|e| Error::backend(BACKEND, e))?;
    let partitions = i32::try_from(config.partitions).unwrap_or(i32::MAX);
    let replication = i32::try_from(config.replication).unwrap_or(1);
    let topic = NewTopic::new(
        &config.topic,
        partitions,
        TopicReplication::Fixed(replication),
    );
    let opts = AdminOptions::new().request_timeout(Some(config.request_timeout));
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .map_err(|e| client::map_error("create topic", e, config.request_timeout, &ctx.conn))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(Error::backend(
                    BACKEND,
                    format!("cannot create topic {name:?}: {code}"),
                ));
            }
        }
    }
    tracing::info!(topic = %config.topic, partitions, replication, "created Kafka topic");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_topic_must_have_the_configured_count_unless_adopted() {
        let config = KafkaConfig::default().with_topic("t").with_partitions(4);
        assert_eq!(check_existing(&config, 4).expect("same count"), 4);
        let err = check_existing(&config, 6).expect_err("another count");
        let msg = err.to_string();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        assert!(
            msg.contains("has 6 partitions") && msg.contains("is 4"),
            "{msg}"
        );
        let adopt = config.with_adopt_existing_partitions(true);
        assert_eq!(check_existing(&adopt, 6).expect("adopted"), 6);
    }

    #[test]
    fn the_watch_trips_once_on_another_count_and_stays_tripped() {
        let watch = PartitionWatch::new(2);
        assert!(!watch.observe(2));
        // An empty answer (a metadata hiccup) is not a count.
        assert!(!watch.observe(0));
        watch.check("t").expect("unchanged");
        assert!(watch.observe(4), "first sight of the change");
        assert!(!watch.observe(4), "reported once");
        assert!(!watch.observe(2), "stays tripped when the count comes back");
        let err = watch.check("t").expect_err("refused");
        assert!(err.is_transient() || matches!(err, Error::Unavailable { .. }));
        assert!(err.to_string().contains("changed from 2 to 4"), "{err}");
    }
}
