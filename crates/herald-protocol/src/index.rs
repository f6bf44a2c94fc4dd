//! The matching index: which subscribed rooms does a published room reach?
//!
//! Rooms only ever match rooms with the same key set, so the index is first split by *shape* (the sorted keys).
//! Within a shape, a publish without wildcards is answered by exact hash lookups: one per wildcard pattern
//! (`mask`) that some subscribed room of that shape actually uses. A subscription to `{"customer":"*","kind":"x"}`
//! has mask `0b01`; a publish to `{"customer":"7","kind":"x"}` looks up `["7","x"]` (mask 0) and `["*","x"]`
//! (mask 1) and nothing else. The cost of a publish therefore depends on the publish room's shape and the handful
//! of masks in use, never on how many unrelated rooms exist.
//!
//! A publish *with* wildcards (`{"customer":"*"}` reaching every customer) uses per-position postings: the rooms
//! whose value at a fixed position equals the publish value or is `"*"`. It walks the smallest such posting list
//! and checks each candidate, so its cost is proportional to the rooms that share at least one fixed value.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::room::{Room, Scalar};

type Values = Arc<[Scalar]>;

/// Maps subscribed rooms to a value `V` (the edge keeps its subscriber lists there) and finds every room that a
/// published room reaches.
#[derive(Debug)]
pub struct RoomIndex<V> {
    shapes: HashMap<Arc<[Arc<str>]>, Shape<V>>,
    len: usize,
    /// `"*"`, made once so lookups do not allocate it per probe.
    wildcard: Scalar,
}

#[derive(Debug)]
struct Shape<V> {
    rooms: HashMap<Values, Entry<V>>,
    /// How many rooms of this shape use each wildcard mask.
    masks: HashMap<u64, usize>,
    /// `postings[i][value]`: the rooms whose value at position `i` is `value`.
    postings: Vec<HashMap<Scalar, HashSet<Values>>>,
}

#[derive(Debug)]
struct Entry<V> {
    room: Room,
    value: V,
}

impl<V> Default for RoomIndex<V> {
    fn default() -> Self {
        RoomIndex {
            shapes: HashMap::new(),
            len: 0,
            wildcard: Scalar::Str(Arc::from(crate::room::WILDCARD)),
        }
    }
}

impl<V> RoomIndex<V> {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of distinct rooms held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no room is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value for exactly this room, if held.
    pub fn get(&self, room: &Room) -> Option<&V> {
        self.shapes
            .get(room.keys())
            .and_then(|shape| shape.rooms.get(room.values()))
            .map(|e| &e.value)
    }

    /// The value for exactly this room, if held.
    pub fn get_mut(&mut self, room: &Room) -> Option<&mut V> {
        self.shapes
            .get_mut(room.keys())
            .and_then(|shape| shape.rooms.get_mut(room.values()))
            .map(|e| &mut e.value)
    }

    /// The value for exactly this room, inserting `make()` first when the room is new.
    pub fn get_or_insert_with(&mut self, room: &Room, make: impl FnOnce() -> V) -> &mut V {
        let width = room.keys().len();
        let shape = self
            .shapes
            .entry(room.keys_arc().clone())
            .or_insert_with(|| Shape {
                rooms: HashMap::new(),
                masks: HashMap::new(),
                postings: (0..width).map(|_| HashMap::new()).collect(),
            });
        let values: Values = room.values().into();
        if !shape.rooms.contains_key(&values) {
            *shape.masks.entry(room.wildcard_mask()).or_default() += 1;
            for (i, v) in values.iter().enumerate() {
                shape.postings[i]
                    .entry(v.clone())
                    .or_default()
                    .insert(values.clone());
            }
            self.len += 1;
        }
        &mut shape
            .rooms
            .entry(values)
            .or_insert_with(|| Entry {
                room: room.clone(),
                value: make(),
            })
            .value
    }

    /// Removes exactly this room, returning its value.
    pub fn remove(&mut self, room: &Room) -> Option<V> {
        let shape = self.shapes.get_mut(room.keys())?;
        let entry = shape.rooms.remove(room.values())?;
        self.len -= 1;
        let mask = room.wildcard_mask();
        if let Some(n) = shape.masks.get_mut(&mask) {
            *n -= 1;
            if *n == 0 {
                shape.masks.remove(&mask);
            }
        }
        for (i, v) in room.values().iter().enumerate() {
            if let Some(set) = shape.postings[i].get_mut(v) {
                set.remove(room.values());
                if set.is_empty() {
                    shape.postings[i].remove(v);
                }
            }
        }
        if shape.rooms.is_empty() {
            self.shapes.remove(room.keys());
        }
        Some(entry.value)
    }

    /// Calls `f` once for every held room that `published` reaches under the delivery rule
    /// (see [`Room::matches`]).
    pub fn for_each_match(&self, published: &Room, mut f: impl FnMut(&Room, &V)) {
        let Some(shape) = self.shapes.get(published.keys()) else {
            return;
        };
        let publish_mask = published.wildcard_mask();
        if publish_mask == 0 {
            // Exact publish: one lookup per wildcard pattern in use.
            let mut probe: Vec<Scalar> = published.values().to_vec();
            for &mask in shape.masks.keys() {
                for (i, slot) in probe.iter_mut().enumerate() {
                    *slot = if mask & (1 << i) != 0 {
                        self.wildcard.clone()
                    } else {
                        published.values()[i].clone()
                    };
                }
                if let Some(entry) = shape.rooms.get(probe.as_slice()) {
                    f(&entry.room, &entry.value);
                }
            }
            return;
        }

        // Wildcard publish: walk the smallest candidate set among the fixed positions.
        let wildcard = &self.wildcard;
        let mut best: Option<(usize, [Option<&HashSet<Values>>; 2])> = None;
        for (i, value) in published.values().iter().enumerate() {
            if publish_mask & (1 << i) != 0 {
                continue;
            }
            let exact = shape.postings[i].get(value);
            let star = shape.postings[i].get(wildcard);
            let size = exact.map_or(0, HashSet::len) + star.map_or(0, HashSet::len);
            if best.as_ref().is_none_or(|(s, _)| size < *s) {
                best = Some((size, [exact, star]));
            }
        }
        match best {
            Some((_, lists)) => {
                for values in lists.into_iter().flatten().flatten() {
                    let entry = &shape.rooms[values];
                    if entry.room.matches(published) {
                        f(&entry.room, &entry.value);
                    }
                }
            }
            // Every position is a wildcard: every room of this shape matches.
            None => {
                for entry in shape.rooms.values() {
                    f(&entry.room, &entry.value);
                }
            }
        }
    }

    /// Iterates over every held room and its value.
    pub fn iter(&self) -> impl Iterator<Item = (&Room, &V)> {
        self.shapes
            .values()
            .flat_map(|s| s.rooms.values().map(|e| (&e.room, &e.value)))
    }

    /// Builds the room with the same shape as `like` and these values (used by tests and benches).
    pub fn sibling(like: &Room, values: Vec<Scalar>) -> Room {
        like.with_values(values.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn room(v: Value) -> Room {
        Room::from_json(&v).unwrap()
    }

    fn matches_of(index: &RoomIndex<u32>, published: Value) -> Vec<u32> {
        let mut out = vec![];
        index.for_each_match(&room(published), |_, v| out.push(*v));
        out.sort();
        out
    }

    /// The index must agree with the plain rule on every pair; this compares them over a small universe that has
    /// every combination of specific and wildcard values.
    #[test]
    fn index_agrees_with_the_matching_rule() {
        let values = [json!("*"), json!("1"), json!(1), json!("2")];
        let mut rooms = vec![];
        for a in &values {
            for b in &values {
                rooms.push(json!({"a": a, "b": b}));
            }
            rooms.push(json!({"a": a}));
        }
        let mut index = RoomIndex::new();
        for (i, r) in rooms.iter().enumerate() {
            *index.get_or_insert_with(&room(r.clone()), || 0) = i as u32;
        }
        assert_eq!(index.len(), rooms.len());
        for published in &rooms {
            let expected: Vec<u32> = rooms
                .iter()
                .enumerate()
                .filter(|(_, r)| room((*r).clone()).matches(&room(published.clone())))
                .map(|(i, _)| i as u32)
                .collect();
            assert_eq!(
                matches_of(&index, published.clone()),
                expected,
                "{published}"
            );
        }
    }

    #[test]
    fn removal_forgets_masks_and_postings() {
        let mut index = RoomIndex::new();
        *index.get_or_insert_with(&room(json!({"c": "*"})), || 0) = 1;
        *index.get_or_insert_with(&room(json!({"c": "5"})), || 0) = 2;
        assert_eq!(matches_of(&index, json!({"c": "5"})), vec![1, 2]);
        assert_eq!(index.remove(&room(json!({"c": "*"}))), Some(1));
        assert_eq!(matches_of(&index, json!({"c": "5"})), vec![2]);
        assert_eq!(matches_of(&index, json!({"c": "*"})), vec![2]);
        assert_eq!(index.remove(&room(json!({"c": "5"}))), Some(2));
        assert!(index.is_empty());
        assert!(index.shapes.is_empty());
        assert_eq!(matches_of(&index, json!({"c": "*"})), Vec::<u32>::new());
    }

    #[test]
    fn other_shapes_are_never_visited() {
        let mut index = RoomIndex::new();
        for i in 0..1000 {
            index.get_or_insert_with(&room(json!({"user": i})), || i);
        }
        index.get_or_insert_with(&room(json!({"customer": "1"})), || 5000);
        assert_eq!(matches_of(&index, json!({"customer": "1"})), vec![5000]);
        assert_eq!(matches_of(&index, json!({"customer": "*"})), vec![5000]);
        assert_eq!(matches_of(&index, json!({"user": 7})), vec![7]);
        assert_eq!(matches_of(&index, json!({"user": "*"})).len(), 1000);
    }
}
