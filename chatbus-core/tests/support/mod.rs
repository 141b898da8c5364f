//! A memory broker with hooks, for planting faults in the core tests: each test overrides only
//! the calls it interferes with; everything else goes to the memory broker unchanged.

// Each test file uses the part it needs.
#![allow(dead_code, unreachable_pub)]

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chatbus_core::{
    Broker, Capabilities, Cursor, Envelope, Error, Health, HistoryStream, Interest, MemoryBroker,
    MemoryConfig, Receipt, ReplayFrom, Result, Room, Subscription,
};

/// The room `name`. (The other crates' tests use `chatbus_core::conformance::room`; these
/// tests run without the `conformance` feature.)
pub fn room(name: &str) -> Room {
    Room::new(name).expect("valid room name")
}

/// What a test changes about the broker's behaviour. Every method defaults to the memory
/// broker's own.
#[async_trait]
pub trait Hooks: Send + Sync + fmt::Debug + 'static {
    async fn publish(&self, inner: &MemoryBroker, envelope: &Envelope) -> Result<Receipt> {
        inner.publish(envelope).await
    }
    async fn subscribe(&self, inner: &MemoryBroker, interest: Interest) -> Result<Subscription> {
        inner.subscribe(interest).await
    }
    async fn replay(
        &self,
        inner: &MemoryBroker,
        room: &Room,
        from: ReplayFrom,
        limit: usize,
    ) -> Result<HistoryStream> {
        inner.replay(room, from, limit).await
    }
    fn health(&self) -> Health {
        Health::Healthy
    }
}

/// A memory broker (clones share its state and the hooks) seen through `hooks`.
#[derive(Debug)]
pub struct Hooked<H> {
    pub inner: MemoryBroker,
    pub hooks: std::sync::Arc<H>,
}

impl<H> Clone for Hooked<H> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            hooks: self.hooks.clone(),
        }
    }
}

impl<H: Hooks> Hooked<H> {
    pub fn new(inner: MemoryBroker, hooks: H) -> Self {
        Self {
            inner,
            hooks: std::sync::Arc::new(hooks),
        }
    }
}

#[async_trait]
impl<H: Hooks> Broker for Hooked<H> {
    fn name(&self) -> &'static str {
        "hooked"
    }
    async fn publish(&self, envelope: &Envelope) -> Result<Receipt> {
        self.hooks.publish(&self.inner, envelope).await
    }
    async fn subscribe(&self, interest: Interest) -> Result<Subscription> {
        self.hooks.subscribe(&self.inner, interest).await
    }
    async fn replay(&self, room: &Room, from: ReplayFrom, limit: usize) -> Result<HistoryStream> {
        self.hooks.replay(&self.inner, room, from, limit).await
    }
    async fn history(
        &self,
        room: &Room,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<chatbus_core::HistoryPage> {
        self.inner.history(room, before, limit).await
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn health(&self) -> Health {
        self.hooks.health()
    }
    fn tickets(&self) -> Option<&dyn chatbus_core::Tickets> {
        self.inner.tickets()
    }
}

/// A memory broker with switchable faults (clones share them).
pub type Faulty = Hooked<Faults>;

#[derive(Debug, Default)]
pub struct Faults {
    /// Silently lose every Nth publish (acknowledged, never delivered); 0 = never.
    pub lose_every: AtomicU64,
    /// Publishes fail with Unavailable.
    pub down: AtomicBool,
    /// Delay every Nth publish by 5 ms (so concurrent publishers overtake it); 0 = never.
    pub delay_every: AtomicU64,
    pub count: AtomicU64,
}

pub fn faulty(inner: MemoryBroker) -> Faulty {
    Hooked::new(inner, Faults::default())
}

#[async_trait]
impl Hooks for Faults {
    async fn publish(&self, inner: &MemoryBroker, envelope: &Envelope) -> Result<Receipt> {
        if self.down.load(Ordering::Relaxed) {
            return Err(Error::Unavailable {
                backend: "faulty",
                reason: "switched off".into(),
            });
        }
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let lose = self.lose_every.load(Ordering::Relaxed);
        if lose > 0 && n.is_multiple_of(lose) {
            return Ok(Receipt {
                id: envelope.id,
                cursor: envelope.cursor,
            });
        }
        let delay = self.delay_every.load(Ordering::Relaxed);
        if delay > 0 && n.is_multiple_of(delay) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        inner.publish(envelope).await
    }
    fn health(&self) -> Health {
        if self.down.load(Ordering::Relaxed) {
            Health::Down("switched off".into())
        } else {
            Health::Healthy
        }
    }
}

/// A memory broker without history: a plain relay, as a DualBus fast path.
pub fn relay() -> MemoryBroker {
    MemoryBroker::with_config(MemoryConfig::default().with_history_len(0))
}

/// A memory broker that keeps 100,000 messages per room, as a DualBus durable log.
pub fn log() -> MemoryBroker {
    MemoryBroker::with_config(MemoryConfig::default().with_history_len(100_000))
}

/// Receives `n` messages and checks: every published id exactly once, in cursor order.
pub async fn collect(sub: &mut Subscription, n: usize) -> Vec<Envelope> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), sub.recv()).await {
            Ok(Some(Ok(env))) => out.push(env),
            Ok(Some(Err(e))) => panic!("subscription error after {} messages: {e}", out.len()),
            Ok(None) => panic!("subscription ended after {} messages", out.len()),
            Err(_) => panic!("timed out after {} of {n} messages", out.len()),
        }
    }
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await {
        panic!("more than {n} messages: {extra:?}");
    }
    out
}

/// A memory broker that one DualBus sees cut off (the others share the broker and still reach
/// it): while `cut` is set, its publishes, subscriptions and ticket calls fail. While
/// `rooms_down` is set, only the calls about rooms fail and the leases still renew, as when the
/// cluster shard of the rooms fails over and the one of the leases does not.
#[derive(Debug, Clone)]
pub struct Cut {
    pub inner: MemoryBroker,
    pub cut: std::sync::Arc<AtomicBool>,
    pub rooms_down: std::sync::Arc<AtomicBool>,
}

impl Cut {
    pub fn new(inner: MemoryBroker) -> Self {
        Self {
            inner,
            cut: std::sync::Arc::default(),
            rooms_down: std::sync::Arc::default(),
        }
    }

    fn check(&self) -> Result<()> {
        if self.cut.load(Ordering::Relaxed) {
            return Err(Error::Unavailable {
                backend: "cut",
                reason: "cut off".into(),
            });
        }
        Ok(())
    }

    fn check_room(&self) -> Result<()> {
        self.check()?;
        if self.rooms_down.load(Ordering::Relaxed) {
            return Err(Error::Unavailable {
                backend: "cut",
                reason: "the rooms' shard is down".into(),
            });
        }
        Ok(())
    }

    fn tickets_of_inner(&self) -> Result<&dyn chatbus_core::Tickets> {
        self.check()?;
        self.inner
            .tickets()
            .ok_or_else(|| Error::Config("no tickets".into()))
    }

    fn room_tickets_of_inner(&self) -> Result<&dyn chatbus_core::Tickets> {
        self.check_room()?;
        self.tickets_of_inner()
    }
}

#[async_trait]
impl Broker for Cut {
    fn name(&self) -> &'static str {
        "cut"
    }
    async fn publish(&self, envelope: &Envelope) -> Result<Receipt> {
        self.check_room()?;
        self.inner.publish(envelope).await
    }
    async fn subscribe(&self, interest: Interest) -> Result<Subscription> {
        self.check_room()?;
        self.inner.subscribe(interest).await
    }
    async fn replay(&self, room: &Room, from: ReplayFrom, limit: usize) -> Result<HistoryStream> {
        self.check_room()?;
        self.inner.replay(room, from, limit).await
    }
    async fn history(
        &self,
        room: &Room,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<chatbus_core::HistoryPage> {
        self.check_room()?;
        self.inner.history(room, before, limit).await
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn health(&self) -> Health {
        match self.check() {
            Ok(()) => Health::Healthy,
            Err(e) => Health::Down(e.to_string()),
        }
    }
    fn tickets(&self) -> Option<&dyn chatbus_core::Tickets> {
        Some(self)
    }
}

#[async_trait]
impl chatbus_core::Tickets for Cut {
    async fn take_ticket(&self, room: &Room) -> Result<chatbus_core::Ticket> {
        self.room_tickets_of_inner()?.take_ticket(room).await
    }
    async fn close_ticket(
        &self,
        room: &Room,
        ticket: chatbus_core::Ticket,
    ) -> Result<chatbus_core::Ticket> {
        self.room_tickets_of_inner()?
            .close_ticket(room, ticket)
            .await
    }
    async fn ticket_baseline(&self, room: &Room) -> Result<chatbus_core::Baseline> {
        self.room_tickets_of_inner()?.ticket_baseline(room).await
    }
    async fn renew_lease(
        &self,
        instance: &str,
        ttl: Duration,
        deadline_ms: u64,
        held_before: bool,
    ) -> Result<chatbus_core::Renewal> {
        self.tickets_of_inner()?
            .renew_lease(instance, ttl, deadline_ms, held_before)
            .await
    }
    async fn lease_clock(&self) -> Result<u64> {
        self.tickets_of_inner()?.lease_clock().await
    }
    async fn leases(&self, keep: Duration) -> Result<chatbus_core::Leases> {
        self.tickets_of_inner()?.leases(keep).await
    }
}
