//! Real brokers for the bridge tests: first the fixtures themselves (`tests/support/brokers.rs`: a private Redis
//! and a private RabbitMQ node round-trip a message with their ordinary clients and leave nothing behind), then
//! herald's AMQP endpoint (`herald_edge::bridge::amqp`) against a real RabbitMQ.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use support::brokers::{RabbitServer, RedisServer};
use support::STEP;

/// Whether any of `pids` is still a live process (a zombie counts as gone).
fn any_alive(pids: &[u32]) -> bool {
    pids.iter().any(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                // The state is the field after the parenthesized command name.
                let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
                !matches!(state, Some(Some('Z' | 'X')))
            })
            .unwrap_or(false)
    })
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Waits up to `STEP` for `condition`.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !condition() {
        assert!(start.elapsed() < STEP, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn redis_fixture_round_trips_publish_subscribe_and_stops() {
    let redis = RedisServer::start();
    eprintln!("redis-server answered PING after {:?}", redis.startup());
    let client = redis::Client::open(redis.url()).unwrap();

    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("herald-fixture").await.unwrap();
    let mut publisher = client.get_multiplexed_async_connection().await.unwrap();
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("herald-fixture")
        .arg("hello")
        .query_async(&mut publisher)
        .await
        .unwrap();
    assert_eq!(receivers, 1);
    let message = tokio::time::timeout(STEP, pubsub.on_message().next())
        .await
        .expect("message in time")
        .expect("a message");
    assert_eq!(message.get_channel_name(), "herald-fixture");
    assert_eq!(message.get_payload::<String>().unwrap(), "hello");

    let (pids, port, dir) = (redis.pids(), redis.port(), redis.dir().to_owned());
    drop((pubsub, publisher));
    drop(redis);
    assert!(!any_alive(&pids), "redis-server still running: {pids:?}");
    eventually("the port is closed", || !port_open(port)).await;
    assert!(!dir.exists(), "{dir:?} left behind");
}

#[tokio::test]
async fn rabbit_fixture_round_trips_publish_consume_and_stops() {
    let rabbit = RabbitServer::start();
    eprintln!(
        "RabbitMQ completed an AMQP handshake after {:?}",
        rabbit.startup()
    );

    let connection = Connection::connect(&rabbit.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            "fixture".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            "fixture".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_publish(
            "fixture".into(),
            "".into(),
            BasicPublishOptions::default(),
            b"hello",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(STEP, consumer.next())
        .await
        .expect("delivery in time")
        .expect("a delivery")
        .unwrap();
    assert_eq!(delivery.data, b"hello");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    connection.close(200, "OK".into()).await.unwrap();

    // This node is about to go, so herald's endpoint can show here that it fails promptly when its broker dies,
    // instead of waiting forever: the supervisor restarts it.
    let endpoint = AmqpEndpoint {
        url: rabbit.amqp_url(),
        exchange: "doomed".to_owned(),
        exchange_kind: Kind::Fanout,
        routing_key: String::new(),
        queue: None,
        durable: true,
        prefetch: 1,
    };
    let mut source = AmqpSource::connect(&endpoint, "herald.doomed")
        .await
        .unwrap();
    let sink = AmqpSink::connect(&endpoint).await.unwrap();
    sink.publish("", b"last").await.unwrap();
    let unacked = next_delivery(&mut source).await;

    let (pids, ports, dir) = (rabbit.pids(), rabbit.ports(), rabbit.dir().to_owned());
    let node = rabbit.node().to_owned();
    drop(rabbit);
    assert!(!any_alive(&pids), "processes still running: {pids:?}");
    let ended = tokio::time::timeout(STEP, source.next())
        .await
        .expect("the source notices the broker is gone");
    assert!(ended.is_err(), "{ended:?}");
    assert!(matches!(source.next().await, Ok(None)), "and stays ended");
    let error = tokio::time::timeout(STEP, sink.publish("", b"lost"))
        .await
        .expect("the publish fails in time")
        .unwrap_err();
    eprintln!("publishing to a dead broker: {error}");
    assert!(tokio::time::timeout(STEP, unacked.ack())
        .await
        .expect("the ack fails in time")
        .is_err());
    for port in ports {
        eventually(&format!("port {port} is closed"), || !port_open(port)).await;
    }
    // No process of that node is left, whichever PID it had (the Erlang VM is the start script's child).
    eventually("no process mentions the node", || !node_processes(&node)).await;
    assert!(!dir.exists(), "{dir:?} left behind");
}

/// Whether any live process has `needle` in its command line.
fn node_processes(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        let pid = entry.file_name().to_string_lossy().parse::<u32>().ok();
        pid.is_some_and(|pid| {
            pid != std::process::id()
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|cmd| String::from_utf8_lossy(&cmd).contains(needle))
                    .unwrap_or(false)
                && any_alive(&[pid])
        })
    })
}

// ---- herald's AMQP endpoint against a real broker (one node shared by these tests) ----

use herald_edge::bridge::amqp::{
    AmqpDelivery, AmqpEndpoint, AmqpError, AmqpSink, AmqpSource, ExchangeKind as Kind,
};

async fn plain_channel(rabbit: &RabbitServer) -> (Connection, lapin::Channel) {
    let connection = Connection::connect(&rabbit.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

async fn next_delivery(source: &mut AmqpSource) -> AmqpDelivery {
    tokio::time::timeout(STEP, source.next())
        .await
        .expect("a delivery in time")
        .expect("the source works")
        .expect("the consumer is running")
}

fn topic_endpoint(rabbit: &RabbitServer, exchange: &str) -> AmqpEndpoint {
    AmqpEndpoint {
        url: rabbit.amqp_url(),
        exchange: exchange.to_owned(),
        exchange_kind: Kind::Topic,
        routing_key: "#".to_owned(),
        queue: None,
        durable: true,
        prefetch: 16,
    }
}

#[tokio::test]
async fn the_hightemplar_preset_consumes_what_django_binder_publishes() {
    let rabbit = RabbitServer::shared();
    eprintln!("the shared RabbitMQ node started in {:?}", rabbit.startup());
    let (_connection, channel) = plain_channel(rabbit).await;
    // The exchange as High-templar 3.x left it on the broker: pika's `exchange_declare("hightemplar")` defaults.
    channel
        .exchange_declare(
            "hightemplar".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let preset = AmqpEndpoint::hightemplar(rabbit.amqp_url());
    let queue = preset.queue_name("django");
    assert_eq!(queue, "herald.django");
    let mut source = AmqpSource::connect(&preset, &queue)
        .await
        .expect("the preset declares the existing exchange with the same arguments");

    // Exactly django-binder's `channel.basic_publish('hightemplar', routing_key='*', body=jsondumps(...))`: no
    // properties, the default exchange type's literal key `*`.
    let body =
        br#"{"data": {"id": 7, "kind": "message"}, "rooms": [{"target": "message", "id": 7}]}"#;
    channel
        .basic_publish(
            "hightemplar".into(),
            "*".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    // Another key on the same direct exchange is not for us.
    channel
        .basic_publish(
            "hightemplar".into(),
            "other".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap();

    let delivery = next_delivery(&mut source).await;
    assert_eq!(delivery.payload(), body);
    assert_eq!(delivery.routing_key(), "*");
    assert_eq!(delivery.exchange(), "hightemplar");
    assert!(!delivery.redelivered());
    delivery.ack().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), source.next())
            .await
            .is_err(),
        "only the `*` message is delivered"
    );
}

#[tokio::test]
async fn declaring_an_existing_exchange_differently_fails_with_context() {
    let rabbit = RabbitServer::shared();
    let (_connection, channel) = plain_channel(rabbit).await;
    channel
        .exchange_declare(
            "legacy-durable".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut endpoint = AmqpEndpoint::hightemplar(rabbit.amqp_url());
    endpoint.exchange = "legacy-durable".to_owned();
    let error = AmqpSource::connect(&endpoint, "herald.legacy")
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, AmqpError::Broker { .. }), "{message}");
    assert!(message.contains("PRECONDITION_FAILED"), "{message}");
    assert!(message.contains("\"legacy-durable\""), "{message}");
    assert!(!message.contains("guest:guest"), "{message}");
}

#[tokio::test]
async fn a_delivery_not_acked_is_redelivered_to_the_next_source() {
    let rabbit = RabbitServer::shared();
    let endpoint = topic_endpoint(rabbit, "at-least-once");
    let queue = endpoint.queue_name("at-least-once");
    let sink = AmqpSink::connect(&endpoint).await.unwrap();

    let mut first = AmqpSource::connect(&endpoint, &queue).await.unwrap();
    sink.publish("orders.created", br#"{"n":1}"#).await.unwrap();
    let delivery = next_delivery(&mut first).await;
    assert_eq!(delivery.payload(), br#"{"n":1}"#);
    assert!(!delivery.redelivered());
    // Handled halfway, then the source goes away (a crash, a lost lease): no ack.
    drop(delivery);
    drop(first);

    let mut second = AmqpSource::connect(&endpoint, &queue).await.unwrap();
    let again = next_delivery(&mut second).await;
    assert_eq!(again.payload(), br#"{"n":1}"#);
    assert_eq!(again.routing_key(), "orders.created");
    assert!(again.redelivered());
    again.ack().await.unwrap();

    // A body that can never be handled is rejected, and does not come back.
    sink.publish("orders.created", b"not json").await.unwrap();
    let bad = next_delivery(&mut second).await;
    assert_eq!(bad.payload(), b"not json");
    bad.reject().await.unwrap();
    drop(second);

    // The queue kept nothing: the acked message and the rejected one are gone.
    let mut third = AmqpSource::connect(&endpoint, &queue).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(800), third.next())
            .await
            .is_err(),
        "nothing left to deliver"
    );
}

#[tokio::test]
async fn a_source_whose_queue_is_deleted_ends_cleanly() {
    let rabbit = RabbitServer::shared();
    let endpoint = topic_endpoint(rabbit, "cancelled");
    let mut source = AmqpSource::connect(&endpoint, "herald.cancelled")
        .await
        .unwrap();
    let (_connection, channel) = plain_channel(rabbit).await;
    channel
        .queue_delete(
            "herald.cancelled".into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    // The broker cancels the consumer (basic.cancel): the source ends without an error.
    let ended = tokio::time::timeout(STEP, source.next())
        .await
        .expect("the source ends in time");
    assert!(matches!(ended, Ok(None)), "{ended:?}");
}

#[tokio::test]
async fn the_sink_publishes_with_confirms_to_a_plain_consumer() {
    let rabbit = RabbitServer::shared();
    let endpoint = topic_endpoint(rabbit, "sink-out");
    let sink = AmqpSink::connect(&endpoint).await.unwrap();

    let (_connection, channel) = plain_channel(rabbit).await;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            "sink-out".into(),
            "orders.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    // Unroutable (no binding matches) is still confirmed: nobody listening is not an error.
    sink.publish("invoices.paid", b"{}").await.unwrap();
    sink.publish("orders.created", br#"{"id":1}"#)
        .await
        .unwrap();

    let delivery = tokio::time::timeout(STEP, consumer.next())
        .await
        .expect("delivery in time")
        .expect("a delivery")
        .unwrap();
    assert_eq!(delivery.data, br#"{"id":1}"#);
    assert_eq!(delivery.routing_key.as_str(), "orders.created");
    assert_eq!(delivery.exchange.as_str(), "sink-out");
    assert_eq!(
        delivery.properties.delivery_mode(),
        &Some(2),
        "a durable endpoint publishes persistent messages"
    );
    delivery.ack(BasicAckOptions::default()).await.unwrap();
}
