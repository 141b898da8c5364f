//! The topic's partition count is fixed for the life of its rooms (rooms are hashed by it and
//! cursors name a partition): a topic found with another count fails `connect`, and a count
//! that changes under a running broker makes it refuse publishes, with errors that say so.
//! Against a real Tansu.

mod common;

use std::time::{Duration, Instant};

use chatbus_core::{Broker, Envelope, Error, Health, Room};
use chatbus_kafka::rdkafka::admin::{
    AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication,
};
use chatbus_kafka::rdkafka::client::DefaultClientContext;
use chatbus_kafka::rdkafka::ClientConfig;
use chatbus_kafka::KafkaBroker;
use chatbus_testkit::tansu::Tansu;

fn admin(tansu: &Tansu) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", tansu.bootstrap())
        .create()
        .expect("admin client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refuses_an_existing_topic_with_another_partition_count() {
    let tansu = Tansu::start().await;
    let first = common::connect(&tansu, "parts-start", 2).await;
    assert_eq!(first.partitions(), 2);

    let err = KafkaBroker::connect(common::config(&tansu, "parts-start", 4))
        .await
        .expect_err("a topic with 2 partitions must not be used as if it had 4");
    let msg = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(
        msg.contains("has 2 partitions") && msg.contains("KafkaConfig::partitions is 4"),
        "{msg}"
    );

    let adopted = KafkaBroker::connect(
        common::config(&tansu, "parts-start", 4).with_adopt_existing_partitions(true),
    )
    .await
    .expect("adopting the existing count");
    assert_eq!(adopted.partitions(), 2);
    let room = Room::new("parts-start-room").expect("room");
    assert_eq!(adopted.partition_of(&room), first.partition_of(&room));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_count_change_under_a_running_broker_refuses_publishes() {
    let tansu = Tansu::start().await;
    let topic = "parts-live";
    let broker = KafkaBroker::connect(
        common::config(&tansu, topic, 2)
            .with_partition_check_interval(Duration::from_millis(200))
            // This test deletes the topic under the running broker (Tansu 0.6 cannot grow
            // one): a consumer that read the topic, as the epoch probe's does, makes librdkafka
            // 2.12 crash (SIGSEGV) on that about one run in three. The probe is tested in
            // tests/epoch.rs; this test is about the partition count.
            .with_probe_epochs_at_connect(false),
    )
    .await
    .expect("connect");
    let room = Room::new("parts-live-room").expect("room");
    broker
        .publish(&Envelope::new(room.clone(), "before"))
        .await
        .expect("publish before the change");

    let admin = admin(&tansu);
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
    // Growing the topic is the real-world case. Tansu 0.6 does not offer CreatePartitions (see
    // docs/kafka-on-tansu.md), so the test changes the count the way Tansu allows: the topic is
    // deleted and created again with 4 partitions. The broker sees the same thing either way:
    // a metadata answer with another count.
    let grown = admin
        .create_partitions([&NewPartitions::new(topic, 4)], &opts)
        .await;
    eprintln!("CreatePartitions on Tansu: {grown:?}");
    let grew = matches!(grown.as_deref(), Ok([Ok(_)]));
    if !grew {
        let deleted = admin
            .delete_topics(&[topic], &opts)
            .await
            .expect("delete topic");
        eprintln!("DeleteTopics: {deleted:?}");
        let created = admin
            .create_topics(
                [&NewTopic::new(topic, 4, TopicReplication::Fixed(1))],
                &opts,
            )
            .await
            .expect("create topic");
        assert!(matches!(created.as_slice(), [Ok(_)]), "{created:?}");
    }

    let t = Instant::now();
    let err = loop {
        match broker.publish(&Envelope::new(room.clone(), "after")).await {
            Err(e @ Error::Unavailable { .. }) if e.to_string().contains("partition count") => {
                break e;
            }
            other => {
                assert!(
                    t.elapsed() < Duration::from_secs(15),
                    "publish still not refused after the partition count changed: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let msg = err.to_string();
    assert!(msg.contains("changed from 2 to 4"), "{msg}");
    assert_eq!(broker.stats().partition_count_changes, 1);
    match broker.health().await {
        Health::Down(reason) => assert!(reason.contains("changed from 2 to 4"), "{reason}"),
        other => panic!("health after the change: {other:?}"),
    }
}
