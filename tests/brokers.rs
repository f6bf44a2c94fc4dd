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

    let (pids, ports, dir) = (rabbit.pids(), rabbit.ports(), rabbit.dir().to_owned());
    let node = rabbit.node().to_owned();
    drop(rabbit);
    assert!(!any_alive(&pids), "processes still running: {pids:?}");
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
