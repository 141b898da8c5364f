//! DualBus over in-process brokers with planted faults on either path. (The same guarantees
//! over real Redis and Kafka processes are proven by the fault suite in the root `tests/`.)

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

mod support;
use chatbus_core::{
    conformance, Broker, Cursor, DualBus, DualConfig, DurableDownPolicy, Envelope, Error, Health,
    Interest, MemoryBroker, Receipt, Result, Subscription,
};
use support::{collect, faulty, log, relay, room, Hooked, Hooks};

fn assert_exactly_once_in_order(got: &[Envelope], receipts: &[Receipt]) {
    let mut seen = HashMap::new();
    for e in got {
        *seen.entry(e.id).or_insert(0) += 1;
    }
    let dups = seen.values().filter(|&&c| c > 1).count();
    let missing = receipts
        .iter()
        .filter(|r| !seen.contains_key(&r.id))
        .count();
    assert_eq!((missing, dups), (0, 0), "missing, duplicated");
    let cursors: Vec<_> = got.iter().map(|e| e.cursor).collect();
    let mut sorted = cursors.clone();
    sorted.sort();
    assert_eq!(cursors, sorted, "delivered out of log order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_bus_passes_conformance() {
    conformance::run_all(&DualBus::new(relay(), log(), DualConfig::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_losses_are_filled_from_the_log_exactly_once_in_order() -> Result<()> {
    let fast = faulty(relay());
    fast.hooks.lose_every.store(7, Ordering::Relaxed);
    let bus = DualBus::new(fast, log(), DualConfig::default());
    let r = room("lossy");
    let mut sub = bus.subscribe(Interest::room(r.clone())).await?;
    let mut receipts = Vec::new();
    for i in 0..1000 {
        receipts.push(
            bus.publish(&Envelope::new(r.clone(), format!("{i}")))
                .await?,
        );
    }
    let got = collect(&mut sub, 1000).await;
    assert_exactly_once_in_order(&got, &receipts);
    let s = bus.stats();
    assert!(s.via_durable >= 1000 / 7, "losses came from the log");
    assert!(s.duplicates > 0, "second copies were dropped");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_reordered_on_the_fast_path_are_delivered_in_log_order() -> Result<()>
{
    let fast = faulty(relay());
    fast.hooks.delay_every.store(5, Ordering::Relaxed);
    let bus = Arc::new(DualBus::new(fast, log(), DualConfig::default()));
    let r = room("reorder");
    let mut sub = bus.subscribe(Interest::room(r.clone())).await?;
    let tasks: Vec<_> = (0..4)
        .map(|p| {
            let (bus, r) = (bus.clone(), r.clone());
            tokio::spawn(async move {
                let mut rs = Vec::new();
                for i in 0..100 {
                    rs.push(
                        bus.publish(&Envelope::new(r.clone(), format!("{p}:{i}")))
                            .await?,
                    );
                }
                Ok::<_, Error>(rs)
            })
        })
        .collect();
    let mut receipts = Vec::new();
    for t in tasks {
        receipts.extend(t.await.expect("task panicked")?);
    }
    let got = collect(&mut sub, 400).await;
    assert_exactly_once_in_order(&got, &receipts);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_down_delivers_through_the_log() -> Result<()> {
    let fast = faulty(relay());
    let faults = fast.hooks.clone();
    let bus = DualBus::new(fast, log(), DualConfig::default());
    let r = room("fastdown");
    let mut sub = bus.subscribe(Interest::room(r.clone())).await?;
    faults.down.store(true, Ordering::Relaxed);
    let mut receipts = Vec::new();
    for i in 0..200 {
        receipts.push(
            bus.publish(&Envelope::new(r.clone(), format!("{i}")))
                .await?,
        );
    }
    assert!(matches!(bus.health().await, Health::Degraded(_)));
    faults.down.store(false, Ordering::Relaxed);
    for i in 200..300 {
        receipts.push(
            bus.publish(&Envelope::new(r.clone(), format!("{i}")))
                .await?,
        );
    }
    let got = collect(&mut sub, 300).await;
    assert_exactly_once_in_order(&got, &receipts);
    assert!(bus.stats().fast_publish_errors > 0);
    assert_eq!(bus.health().await, Health::Healthy);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_down_rejects_by_default_and_degrades_when_asked() -> Result<()> {
    let durable = faulty(log());
    durable.hooks.down.store(true, Ordering::Relaxed);
    let strict = DualBus::new(relay(), durable.clone(), DualConfig::default());
    let r = room("durdown");
    let err = strict.publish(&Envelope::new(r.clone(), "x")).await;
    assert!(matches!(err, Err(Error::Unavailable { .. })), "{err:?}");
    assert!(matches!(strict.health().await, Health::Down(_)));
    // Ephemeral events still flow.
    strict
        .publish(&Envelope::ephemeral(r.clone(), "typing"))
        .await?;

    let durable = faulty(log());
    let degrading = DualBus::new(
        relay(),
        durable.clone(),
        DualConfig::default().with_policy(DurableDownPolicy::DegradeToFast),
    );
    let mut sub = degrading.subscribe(Interest::room(r.clone())).await?;
    durable.hooks.down.store(true, Ordering::Relaxed);
    let receipt = degrading
        .publish(&Envelope::new(r.clone(), "live only"))
        .await?;
    assert_eq!(receipt.cursor, None);
    let got = collect(&mut sub, 1).await;
    assert_eq!(got[0].payload, "live only");
    assert_eq!(degrading.stats().degraded_publishes, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_each_deliver_everything_exactly_once() -> Result<()> {
    // Two DualBus instances over shared brokers, as two servers over one Redis and one Kafka.
    let fast = faulty(relay());
    fast.hooks.lose_every.store(11, Ordering::Relaxed);
    let durable = log();
    let a = Arc::new(DualBus::new(
        fast.clone(),
        durable.clone(),
        DualConfig::default(),
    ));
    let b = Arc::new(DualBus::new(fast, durable, DualConfig::default()));
    let r = room("two");
    let mut sa = a.subscribe(Interest::room(r.clone())).await?;
    let mut sb = b.subscribe(Interest::room(r.clone())).await?;
    let mut receipts = Vec::new();
    for i in 0..500 {
        let bus = if i % 2 == 0 { &a } else { &b };
        receipts.push(
            bus.publish(&Envelope::new(r.clone(), format!("{i}")))
                .await?,
        );
    }
    let ga = collect(&mut sa, 500).await;
    let gb = collect(&mut sb, 500).await;
    assert_exactly_once_in_order(&ga, &receipts);
    assert_exactly_once_in_order(&gb, &receipts);
    let ids = |v: &[Envelope]| v.iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(ids(&ga), ids(&gb), "both instances see one order");
    Ok(())
}

/// A durable broker whose tail is slow (each record delayed), to let a gap time out.
#[derive(Debug)]
struct SlowTail(Duration);

#[async_trait]
impl Hooks for SlowTail {
    async fn subscribe(&self, inner: &MemoryBroker, i: Interest) -> Result<Subscription> {
        let mut tail = inner.subscribe(i).await?;
        let start = tail.start().map(<[Cursor]>::to_vec);
        let (tx, sub) = Subscription::channel(4096);
        let delay = self.0;
        tokio::spawn(async move {
            while let Some(item) = tail.recv().await {
                tokio::time::sleep(delay).await;
                let _ = match item {
                    Ok(e) => tx.send(e),
                    Err(e) => tx.send_error(e),
                };
            }
        });
        Ok(match start {
            Some(s) => sub.with_start(s),
            None => sub,
        })
    }
}

// Paused time: the 200 ms gap timeout, the 1.5 s tail delay and the receive bound follow the
// test's clock, not the machine's load, so their order is fixed.
#[tokio::test(start_paused = true)]
async fn a_gap_given_up_after_the_timeout_is_still_delivered_through_resync() -> Result<()> {
    use chatbus_core::{Hub, Outbound};
    let durable_log = log();
    let bus = Arc::new(DualBus::new(
        relay(),
        Hooked::new(durable_log.clone(), SlowTail(Duration::from_millis(1500))),
        DualConfig::default().with_gap_timeout(Duration::from_millis(200)),
    ));
    let hub = Hub::new(bus.clone());
    let r = room("gap");
    let mut s = hub.connect("u");
    s.handle().join(r.clone()).await?;
    hub.publish(&Envelope::new(r.clone(), "m0")).await?;
    // "A" is in the log but its fast copy is lost (a Redis blip): only the slow tail has it.
    durable_log.publish(&Envelope::new(r.clone(), "A")).await?;
    hub.publish(&Envelope::new(r.clone(), "B")).await?;
    let mut got = Vec::new();
    while let Ok(o) = tokio::time::timeout(Duration::from_millis(2500), s.recv()).await {
        if let Outbound::Frame(b) = o {
            got.push(String::from_utf8_lossy(&b).into_owned());
        }
        if got.len() == 3 {
            break;
        }
    }
    assert_eq!(got, ["m0", "A", "B"]);
    assert_eq!(bus.stats().gap_timeouts, 1);
    Ok(())
}

#[tokio::test]
async fn a_fast_broker_with_its_own_cursors_is_refused() {
    let bus = DualBus::new(log(), log(), DualConfig::default());
    let err = bus.publish(&Envelope::new(room("x"), "m")).await;
    assert!(matches!(err, Err(Error::Config(_))), "{err:?}");
    assert!(matches!(
        bus.subscribe(Interest::All).await,
        Err(Error::Config(_))
    ));
}

/// A durable log of two partitions, each a memory broker of its own (so offsets are contiguous
/// per partition, as in Kafka): rooms whose name starts with `b` live in partition 1, the rest
/// in partition 0. Its tail delivers each record after `tail_delay`.
#[derive(Debug, Clone)]
struct TwoPartitions {
    logs: [MemoryBroker; 2],
    tail_delay: Duration,
}

impl TwoPartitions {
    fn new(tail_delay: Duration) -> Self {
        Self {
            logs: [log(), log()],
            tail_delay,
        }
    }

    fn index(room: &chatbus_core::Room) -> usize {
        usize::from(room.as_str().starts_with('b'))
    }

    fn tag(mut env: Envelope, p: usize) -> Envelope {
        env.cursor = env.cursor.map(|c| Cursor {
            partition: p as u32,
            ..c
        });
        env
    }
}

#[async_trait]
impl Broker for TwoPartitions {
    fn name(&self) -> &'static str {
        "two-partitions"
    }
    async fn publish(&self, envelope: &Envelope) -> Result<Receipt> {
        let p = Self::index(&envelope.room);
        let r = self.logs[p].publish(envelope).await?;
        Ok(Receipt {
            id: r.id,
            cursor: r.cursor.map(|c| Cursor {
                partition: p as u32,
                ..c
            }),
        })
    }
    async fn subscribe(&self, interest: Interest) -> Result<Subscription> {
        let (tx, sub) = Subscription::channel(4096);
        let mut start = Vec::new();
        for (p, log) in self.logs.iter().enumerate() {
            let mut tail = log.subscribe(interest.clone()).await?;
            if let Some(s) = tail.start().and_then(|s| s.first().copied()) {
                start.push(Cursor {
                    partition: p as u32,
                    ..s
                });
            }
            let (tx, delay) = (tx.clone(), self.tail_delay);
            tokio::spawn(async move {
                while let Some(item) = tail.recv().await {
                    tokio::time::sleep(delay).await;
                    let _ = match item {
                        Ok(e) => tx.send(Self::tag(e, p)),
                        Err(e) => tx.send_error(e),
                    };
                }
            });
        }
        Ok(sub.with_start(start))
    }
    async fn replay(
        &self,
        room: &chatbus_core::Room,
        from: chatbus_core::ReplayFrom,
        limit: usize,
    ) -> Result<chatbus_core::HistoryStream> {
        use futures::StreamExt;
        let p = Self::index(room);
        let from = match from {
            chatbus_core::ReplayFrom::Cursor(c) => {
                chatbus_core::ReplayFrom::Cursor(Cursor { partition: 0, ..c })
            }
            other => other,
        };
        let s = self.logs[p].replay(room, from, limit).await?;
        Ok(s.map(move |r| r.map(|e| Self::tag(e, p))).boxed())
    }
    async fn history(
        &self,
        room: &chatbus_core::Room,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<chatbus_core::HistoryPage> {
        let p = Self::index(room);
        let before = before.map(|c| Cursor { partition: 0, ..c });
        let mut page = self.logs[p].history(room, before, limit).await?;
        page.messages = page.messages.into_iter().map(|e| Self::tag(e, p)).collect();
        Ok(page)
    }
    fn capabilities(&self) -> chatbus_core::Capabilities {
        self.logs[0].capabilities()
    }
    async fn health(&self) -> Health {
        Health::Healthy
    }
    fn log_partition(&self, room: &chatbus_core::Room) -> Option<u32> {
        Some(Self::index(room) as u32)
    }
}

/// Issue #11 item 4: a gap in one partition makes only that partition's rooms resync.
#[tokio::test(start_paused = true)]
async fn a_gap_in_one_partition_resyncs_only_the_rooms_of_that_partition() -> Result<()> {
    let durable = TwoPartitions::new(Duration::from_millis(1500));
    let bus = DualBus::new(
        relay(),
        durable.clone(),
        DualConfig::default().with_gap_timeout(Duration::from_millis(200)),
    );
    let (a, b) = (room("a-room"), room("b-room"));
    let mut sa = bus.subscribe(Interest::room(a.clone())).await?;
    let mut sb = bus.subscribe(Interest::room(b.clone())).await?;
    bus.publish(&Envelope::new(a.clone(), "a0")).await?;
    bus.publish(&Envelope::new(b.clone(), "b0")).await?;
    // In partition 0's log, but its fast copy is lost: partition 0 has a gap until the slow
    // tail brings it, and gives up waiting after 200 ms.
    durable.publish(&Envelope::new(a.clone(), "lost")).await?;
    bus.publish(&Envelope::new(a.clone(), "a1")).await?;
    bus.publish(&Envelope::new(b.clone(), "b1")).await?;
    let got = |sub: &mut Subscription| {
        let mut out = Vec::new();
        while let Some(Some(item)) = futures::FutureExt::now_or_never(sub.recv()) {
            out.push(match item {
                Ok(e) => String::from_utf8_lossy(&e.payload).into_owned(),
                Err(Error::Lagged { .. }) => "LAGGED".to_owned(),
                Err(e) => format!("ERROR {e}"),
            });
        }
        out
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let in_a = got(&mut sa);
    let in_b = got(&mut sb);
    assert_eq!(bus.stats().gap_timeouts, 1);
    assert!(
        in_a.contains(&"LAGGED".to_owned()),
        "room a must resync: {in_a:?}"
    );
    assert_eq!(
        in_b,
        ["b0", "b1"],
        "room b lost nothing and must not resync"
    );
    Ok(())
}
