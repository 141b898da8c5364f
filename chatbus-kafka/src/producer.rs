//! The idempotent producer, and when to replace it.
//!
//! An idempotent producer that gave up on a message (delivery timeout while the cluster was
//! unreachable) cannot know whether it was written, so librdkafka bumps the producer epoch and
//! restarts its sequence numbers. Kafka accepts that (KIP-360); Tansu 0.6 answers every later
//! produce of the bumped epoch with an unknown error, forever. A new producer gets a new
//! producer id from `InitProducerId` and works on both. So after such a failure the next
//! `publish` starts from a fresh producer. The same covers fatal errors, after which
//! librdkafka refuses to produce at all.

use std::sync::{Arc, Mutex};

use chatbus_core::{Error, Result};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer as _};

use crate::client::{self, lock, Context};
use crate::config::KafkaConfig;

pub(crate) type Producer = FutureProducer<Context>;

/// The current producer and whether it must be replaced before the next use.
pub(crate) struct ProducerSlot {
    config: KafkaConfig,
    ctx: Context,
    state: Mutex<State>,
}

struct State {
    current: Arc<Producer>,
    stale: bool,
    replaced: u64,
}

impl ProducerSlot {
    pub(crate) fn new(config: &KafkaConfig, ctx: &Context) -> Result<Self> {
        Ok(Self {
            config: config.clone(),
            ctx: ctx.clone(),
            state: Mutex::new(State {
                current: Arc::new(create(config, ctx)?),
                stale: false,
                replaced: 0,
            }),
        })
    }

    /// The producer to use now (a fresh one if the last one was marked stale).
    pub(crate) fn get(&self) -> Result<Arc<Producer>> {
        let mut state = lock(&self.state);
        if state.stale {
            let fresh = Arc::new(create(&self.config, &self.ctx)?);
            let old = std::mem::replace(&mut state.current, fresh);
            state.stale = false;
            state.replaced += 1;
            tracing::info!("replaced the Kafka producer after a failed delivery");
            retire(old);
        }
        Ok(state.current.clone())
    }

    /// The producer without replacing it (for metadata requests).
    pub(crate) fn peek(&self) -> Arc<Producer> {
        lock(&self.state).current.clone()
    }

    /// Notes that `producer` failed to deliver with `error`; marks it for replacement when
    /// that failure leaves an idempotent producer unusable on some brokers (see the module
    /// docs).
    pub(crate) fn failed(&self, producer: &Arc<Producer>, error: Option<&KafkaError>) {
        use RDKafkaErrorCode as C;
        let replace = producer.client().fatal_error().is_some()
            || match error.and_then(KafkaError::rdkafka_error_code) {
                // None: our own timeout fired, the producer state is unknown.
                None => true,
                Some(code) => matches!(
                    code,
                    C::MessageTimedOut
                        | C::Unknown
                        | C::OutOfOrderSequenceNumber
                        | C::UnknownProducerId
                        | C::InvalidProducerEpoch
                        | C::InvalidProducerIdMapping
                        | C::Fatal
                ),
            };
        if replace {
            let mut state = lock(&self.state);
            if Arc::ptr_eq(&state.current, producer) {
                state.stale = true;
            }
        }
    }

    /// Hands back a producer after use: a replaced one is destroyed off the async threads.
    pub(crate) fn release(&self, producer: Arc<Producer>) {
        let current = Arc::ptr_eq(&lock(&self.state).current, &producer);
        if !current {
            retire(producer);
        }
    }

    /// How many times the producer was replaced (a metric).
    pub(crate) fn replaced(&self) -> u64 {
        lock(&self.state).replaced
    }
}

impl Drop for ProducerSlot {
    fn drop(&mut self) {
        // Destroying the producer flushes it (up to 500 ms) and joins its threads.
        retire(lock(&self.state).current.clone());
    }
}

impl std::fmt::Debug for ProducerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerSlot").finish_non_exhaustive()
    }
}

pub(crate) fn create(config: &KafkaConfig, ctx: &Context) -> Result<Producer> {
    client::producer_config(config)
        .create_with_context(ctx.clone())
        .map_err(|e| match e {
            KafkaError::ClientCreation(m) => Error::Config(m),
            e => Error::backend(client::BACKEND, e),
        })
}

/// Drops a client on a plain thread: destroying a librdkafka handle flushes and joins its
/// threads, which must not stall an async worker.
pub(crate) fn retire<T: Send + 'static>(client: T) {
    let spawned = std::thread::Builder::new()
        .name("chatbus-kafka-drop".into())
        .spawn(move || drop(client));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot spawn a thread to close a Kafka client");
    }
}
