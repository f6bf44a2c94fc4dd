//! Delivery benchmarks: encoding one publish for N subscribers, the hub's whole queue path, and the writer's
//! frame coalescing.
//!
//! Run with `cargo bench -p herald-edge --bench delivery`.

#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use herald_edge::auth::Permissions;
use herald_edge::hub::{Hub, Target};
use herald_edge::metrics::Metrics;
use herald_edge::outbound::{encode_frame, Outbound};
use herald_protocol::{DeliveryTemplate, RequestId, Room};
use serde_json::json;

/// Subscribers reached by one publish.
const SUBSCRIBERS: [usize; 3] = [1, 100, 10_000];

/// WebSocket text opcode (`outbound::OP_TEXT` is private).
const OP_TEXT: u8 = 0x1;

/// A 64-byte JSON payload.
fn payload() -> Bytes {
    let data = br#"{"event":"order.updated","id":123456,"status":"shipped","v":123}"#;
    assert_eq!(data.len(), 64);
    serde_json::from_slice::<serde_json::Value>(data).expect("payload is JSON");
    Bytes::from_static(data)
}

fn request_ids(n: usize) -> Vec<RequestId> {
    (0..n)
        .map(|i| RequestId::from_json(json!(format!("sub-{i}"))).expect("valid request id"))
        .collect()
}

/// `DeliveryTemplate::write_publish` for N distinct request ids.
fn write_publish(c: &mut Criterion) {
    let template = DeliveryTemplate::new(payload());
    let mut group = c.benchmark_group("write_publish");
    for n in SUBSCRIBERS {
        let ids = request_ids(n);
        group.throughput(Throughput::Elements(n as u64));
        // Encoding only: every frame appended to one reused buffer.
        group.bench_with_input(BenchmarkId::new("one_buffer", n), &ids, |b, ids| {
            let mut buf = BytesMut::new();
            b.iter(|| {
                buf.clear();
                for id in ids {
                    template.write_publish(id, &mut buf);
                }
                black_box(buf.len())
            })
        });
        // As the hub does it: one `Bytes` per subscriber, split off a shared buffer and kept (the frames are
        // dropped outside the measurement).
        group.bench_with_input(BenchmarkId::new("frame_each", n), &ids, |b, ids| {
            b.iter_with_large_drop(|| {
                let mut buf = BytesMut::new();
                let mut frames = Vec::with_capacity(ids.len());
                for id in ids {
                    template.write_publish(id, &mut buf);
                    frames.push(buf.split().freeze());
                }
                frames
            })
        });
    }
    group.finish();
}

/// Frames a hub may queue in all before it is thrown away and rebuilt (bounds memory; nothing drains the queues).
const QUEUED_FRAMES_PER_HUB: usize = 100_000;
/// Frames one connection's queue may reach before the hub is rebuilt: a consumer that keeps up has a shallow
/// queue, and deep queues cost more per push (the queued frames stop fitting in cache).
const MAX_QUEUE_DEPTH: usize = 64;

/// A hub with `n` connections, each subscribed once to `room`, with queues that never overflow.
fn hub_with_subscribers(n: usize, room: &Room) -> (Hub, Vec<Arc<Outbound>>) {
    let hub = Hub::new(Arc::new(Metrics::default()), 16);
    let mut queues = Vec::with_capacity(n);
    for i in 0..n {
        let outbound = Arc::new(Outbound::new(usize::MAX / 2, usize::MAX / 2));
        let conn = hub.connect(None, Permissions::All, outbound.clone());
        hub.subscribe(
            &conn,
            RequestId::from_json(json!(format!("sub-{i}"))).expect("valid request id"),
            room.clone(),
        )
        .expect("subscribe");
        queues.push(outbound);
    }
    (hub, queues)
}

/// `Hub::publish` to one room with N subscribers: match, encode, and push onto N outbound queues.
///
/// Nothing public drains an `Outbound` outside the writer task, so each hub takes a bounded number of publishes
/// (at most [`MAX_QUEUE_DEPTH`] frames per queue, 10 for N = 10,000) and is then rebuilt; building and dropping it
/// are not measured.
fn hub_publish(c: &mut Criterion) {
    let room = Room::from_json(&json!({"customer": "c-42", "kind": "order"})).expect("room");
    let targets = [Target::Room(room.clone())];
    let data = payload();
    let mut group = c.benchmark_group("hub_publish");
    for n in SUBSCRIBERS {
        {
            let (hub, queues) = hub_with_subscribers(n, &room);
            let outcome = hub.publish(&targets, data.clone());
            assert_eq!(outcome.subscriptions_reached, n as u64);
            assert!(queues.iter().all(|q| q.queued_frames() == 1));
        }
        let per_hub = (QUEUED_FRAMES_PER_HUB / n).clamp(1, MAX_QUEUE_DEPTH) as u64;
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let batch = left.min(per_hub);
                    let (hub, queues) = hub_with_subscribers(n, &room);
                    let start = Instant::now();
                    for _ in 0..batch {
                        black_box(hub.publish(black_box(&targets), data.clone()));
                    }
                    total += start.elapsed();
                    left -= batch;
                    drop((hub, queues));
                }
                total
            })
        });
    }
    group.finish();
}

/// The writer's coalescing: 64 queued 100-byte text frames encoded into one buffer for one `write_all`.
fn encode_frames(c: &mut Criterion) {
    const FRAMES: usize = 64;
    let frames: Vec<Bytes> = (0..FRAMES)
        .map(|i| Bytes::from(vec![b'a' + (i % 26) as u8; 100]))
        .collect();
    let mut group = c.benchmark_group("encode_frame");
    group.throughput(Throughput::Elements(FRAMES as u64));
    group.bench_function("coalesce_64x100B", |b| {
        // Like the writer: one buffer, cleared before each batch, keeping its capacity.
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            buf.clear();
            for frame in &frames {
                encode_frame(OP_TEXT, black_box(frame), &mut buf);
            }
            black_box(buf.len())
        })
    });
    group.finish();
}

criterion_group!(benches, write_publish, hub_publish, encode_frames);
criterion_main!(benches);
