//! Room matching benchmarks: what one publish costs in the [`RoomIndex`], the permission check, and room parsing.
//!
//! The claim under test is the one `index.rs` makes: an exact publish costs one hash lookup per wildcard pattern
//! in use, and a wildcard publish costs the rooms sharing a fixed value, so neither grows with the number of
//! unrelated rooms held.
//!
//! Run with `cargo bench -p herald-protocol --bench rooms`.

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use herald_protocol::room::is_allowed;
use herald_protocol::{Room, RoomIndex};
use serde_json::{json, Value};

/// Numbers of unrelated rooms held in the index.
const SIZES: [usize; 3] = [100, 10_000, 100_000];

fn room(v: Value) -> Room {
    Room::from_json(&v).expect("bench rooms are valid")
}

fn insert(index: &mut RoomIndex<u32>, r: Value) {
    let n = index.len() as u32;
    index.get_or_insert_with(&room(r), || n);
}

/// `n` rooms the benchmarked publish never reaches: half of the publish's shape (`{"customer":i,"kind":kind}`,
/// other customers), half of another shape (`{"user":i}`).
fn unrelated(index: &mut RoomIndex<u32>, n: usize, kind: &str) {
    for i in 0..n {
        if i % 2 == 0 {
            insert(index, json!({"customer": i, "kind": kind}));
        } else {
            insert(index, json!({"user": i}));
        }
    }
}

fn count_matches(index: &RoomIndex<u32>, published: &Room) -> usize {
    let mut n = 0;
    index.for_each_match(published, |_, _| n += 1);
    n
}

/// An exact publish: N unrelated rooms, plus the four rooms it reaches (itself and one per wildcard pattern).
fn publish_exact(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish_exact");
    let published = room(json!({"customer": -1, "kind": "order"}));
    for n in SIZES {
        let mut index = RoomIndex::new();
        // The same-shape rooms have kind "order" too: they differ from the publish only in the customer.
        unrelated(&mut index, n, "order");
        insert(&mut index, json!({"customer": -1, "kind": "order"}));
        insert(&mut index, json!({"customer": "*", "kind": "order"}));
        insert(&mut index, json!({"customer": -1, "kind": "*"}));
        insert(&mut index, json!({"customer": "*", "kind": "*"}));
        assert_eq!(count_matches(&index, &published), 4);

        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(n), &index, |b, index| {
            b.iter(|| {
                let mut reached = 0u32;
                index.for_each_match(black_box(&published), |_, v| reached ^= *v);
                black_box(reached)
            })
        });
    }
    group.finish();
}

/// Matching rooms for the wildcard publish: `{"customer":1000000+j,"kind":"order"}`.
fn matching_orders(index: &mut RoomIndex<u32>, m: usize) {
    for j in 0..m {
        insert(index, json!({"customer": 1_000_000 + j, "kind": "order"}));
    }
}

/// `{"customer":"*","kind":"order"}` with N unrelated rooms and a fixed 100 rooms with `kind = "order"`.
fn publish_wildcard(c: &mut Criterion) {
    const MATCHES: usize = 100;
    let mut group = c.benchmark_group("publish_wildcard");
    let published = room(json!({"customer": "*", "kind": "order"}));
    for n in SIZES {
        let mut index = RoomIndex::new();
        unrelated(&mut index, n, "invoice");
        matching_orders(&mut index, MATCHES);
        assert_eq!(count_matches(&index, &published), MATCHES);

        group.throughput(Throughput::Elements(MATCHES as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &index, |b, index| {
            b.iter(|| {
                let mut reached = 0u32;
                index.for_each_match(black_box(&published), |_, v| reached ^= *v);
                black_box(reached)
            })
        });
    }
    group.finish();
}

/// The same wildcard publish with 100,000 unrelated rooms and a varying number of matches: the cost should follow
/// the matches.
fn publish_wildcard_by_matches(c: &mut Criterion) {
    const UNRELATED: usize = 100_000;
    let mut group = c.benchmark_group("publish_wildcard_by_matches");
    let published = room(json!({"customer": "*", "kind": "order"}));
    for m in [10, 100, 1_000] {
        let mut index = RoomIndex::new();
        unrelated(&mut index, UNRELATED, "invoice");
        matching_orders(&mut index, m);
        assert_eq!(count_matches(&index, &published), m);

        group.throughput(Throughput::Elements(m as u64));
        group.bench_with_input(BenchmarkId::from_parameter(m), &index, |b, index| {
            b.iter(|| {
                let mut reached = 0u32;
                index.for_each_match(black_box(&published), |_, v| reached ^= *v);
                black_box(reached)
            })
        });
    }
    group.finish();
}

/// High-templar's permission rule against ten allowed rooms of mixed shapes.
fn permission_check(c: &mut Criterion) {
    let allowed: Vec<Room> = (0..9)
        .map(|i| room(json!({"customer": "*", "kind": format!("kind-{i}")})))
        .chain([room(
            json!({"customer": "*", "kind": "order", "region": "eu"}),
        )])
        .collect();
    assert_eq!(allowed.len(), 10);
    let last = room(json!({"customer": "c-42", "kind": "order", "region": "eu"}));
    let denied = room(json!({"customer": "c-42", "kind": "order", "region": "us"}));
    assert!(is_allowed(&last, &allowed));
    assert!(!is_allowed(&denied, &allowed));

    let mut group = c.benchmark_group("permission_check");
    // Allowed by the tenth room only: the whole list is scanned.
    group.bench_function("allowed_by_last_of_10", |b| {
        b.iter(|| is_allowed(black_box(&last), black_box(&allowed)))
    });
    // Refused: the whole list is scanned and the same-shape room compared value by value.
    group.bench_function("denied_by_10", |b| {
        b.iter(|| is_allowed(black_box(&denied), black_box(&allowed)))
    });
    // One comparison on its own.
    group.bench_function("is_allowed_by_one", |b| {
        b.iter(|| black_box(&last).is_allowed_by(black_box(&allowed[9])))
    });
    group.finish();
}

/// `Room::from_json` of a three-key room, from a parsed value and from text.
fn parse_room(c: &mut Criterion) {
    let text = r#"{"customer":"c-42","kind":"order","region":"eu"}"#;
    let value: Value = serde_json::from_str(text).expect("valid JSON");
    let mut group = c.benchmark_group("parse_room");
    group.bench_function("from_value_3_keys", |b| {
        b.iter(|| Room::from_json(black_box(&value)))
    });
    group.bench_function("from_text_3_keys", |b| {
        b.iter(|| {
            let value: Value = serde_json::from_str(black_box(text)).expect("valid JSON");
            Room::from_json(&value)
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    publish_exact,
    publish_wildcard,
    publish_wildcard_by_matches,
    permission_check,
    parse_room
);
criterion_main!(benches);
