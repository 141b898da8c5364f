//! The topic: created with the admin API when it is missing, and described (partition count,
//! leaders) for `connect` and `health`.

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
                return Ok(n);
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
