//! The hub: this node's connections, their subscriptions, and the publish fan-out.
//!
//! Locks are taken in one order only: a connection's subscription table, then the room index. Publishing holds
//! the index's read lock while it pushes onto subscriber queues (each push takes only that queue's own short
//! lock and never waits on a socket), so publishes run in parallel with each other and only subscription changes
//! serialize.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};

use herald_protocol::{DeliveryTemplate, RequestId, Room, RoomIndex};

use crate::auth::Permissions;
use crate::interest::InterestTracker;
use crate::metrics::Metrics;
use crate::outbound::{Outbound, PushError};

/// One WebSocket connection as the hub sees it.
#[derive(Debug)]
pub struct Conn {
    /// The id clients and backends use to address this connection.
    pub id: Arc<str>,
    /// The authorized user, if the auth method named one.
    pub user_id: Option<Arc<str>>,
    /// What this connection may subscribe to.
    pub permissions: Permissions,
    /// Frames waiting to be written.
    pub outbound: Arc<Outbound>,
    /// request id -> (room, subscription id).
    subscriptions: Mutex<HashMap<RequestId, (Room, u64)>>,
}

impl Conn {
    /// The number of subscriptions this connection holds.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.lock().len()
    }

    /// The rooms this connection is subscribed to.
    pub fn rooms(&self) -> Vec<Room> {
        self.subscriptions
            .lock()
            .values()
            .map(|(room, _)| room.clone())
            .collect()
    }
}

#[derive(Debug)]
struct Subscriber {
    conn: Arc<Conn>,
    request_id: RequestId,
}

/// Where a publish goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// Subscriptions whose room matches (wildcards on either side).
    Room(Room),
    /// Every connection of a user.
    User(String),
    /// One connection.
    Connection(String),
    /// Every connection.
    All,
}

/// What a publish reached.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Subscriptions reached through room targets, each counted once.
    pub subscriptions_reached: u64,
    /// Connections reached through user, connection and `all` targets, each counted once.
    pub connections_reached: u64,
}

/// Why a subscribe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeError {
    /// The room is not allowed for this connection.
    NotAllowed,
    /// The connection holds its maximum number of subscriptions.
    TooMany,
}

/// This node's connections and subscriptions.
#[derive(Debug)]
pub struct Hub {
    index: RwLock<RoomIndex<HashMap<u64, Subscriber>>>,
    conns: RwLock<HashMap<Arc<str>, Arc<Conn>>>,
    users: RwLock<HashMap<Arc<str>, Vec<Arc<Conn>>>>,
    next_subscription: AtomicU64,
    next_connection: AtomicU64,
    /// Random per process, so connection ids from two runs (or two nodes) do not collide.
    id_prefix: u64,
    max_subscriptions: usize,
    metrics: Arc<Metrics>,
    /// Set in a cluster: told when a room gains its first or loses its last local subscriber.
    interest: Option<Arc<InterestTracker>>,
}

impl Hub {
    /// An empty hub; each connection may hold `max_subscriptions`.
    pub fn new(metrics: Arc<Metrics>, max_subscriptions: usize) -> Self {
        let id_prefix = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Hub {
            index: RwLock::new(RoomIndex::new()),
            conns: RwLock::new(HashMap::new()),
            users: RwLock::new(HashMap::new()),
            next_subscription: AtomicU64::new(1),
            next_connection: AtomicU64::new(1),
            id_prefix,
            max_subscriptions,
            metrics,
            interest: None,
        }
    }

    /// Reports this hub's room interest transitions to `tracker` (cluster mode).
    pub fn with_interest_tracker(mut self, tracker: Arc<InterestTracker>) -> Self {
        self.interest = Some(tracker);
        self
    }

    /// Every room with at least one local subscriber, canonical: the full interest sent when (re)registering.
    pub fn local_interest(&self) -> Vec<String> {
        self.index
            .read()
            .iter()
            .map(|(room, _)| room.canonical_json())
            .collect()
    }

    fn remove_subscriber(
        &self,
        index: &mut RoomIndex<HashMap<u64, Subscriber>>,
        room: &Room,
        sub_id: u64,
    ) {
        if let Some(subscribers) = index.get_mut(room) {
            subscribers.remove(&sub_id);
            if subscribers.is_empty() {
                index.remove(room);
                if let Some(tracker) = &self.interest {
                    tracker.record(room.canonical_json(), false);
                }
            }
        }
    }

    /// Registers a new connection and returns it.
    pub fn connect(
        &self,
        user_id: Option<String>,
        permissions: Permissions,
        outbound: Arc<Outbound>,
    ) -> Arc<Conn> {
        let n = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let id: Arc<str> = Arc::from(format!("{:08x}-{n:x}", self.id_prefix as u32));
        let conn = Arc::new(Conn {
            id: id.clone(),
            user_id: user_id.map(Arc::from),
            permissions,
            outbound,
            subscriptions: Mutex::new(HashMap::new()),
        });
        self.conns.write().insert(id, conn.clone());
        if let Some(user) = &conn.user_id {
            self.users
                .write()
                .entry(user.clone())
                .or_default()
                .push(conn.clone());
        }
        self.metrics.connections.add(1);
        conn
    }

    /// Removes a connection and all its subscriptions.
    pub fn disconnect(&self, conn: &Arc<Conn>) {
        let subscriptions = std::mem::take(&mut *conn.subscriptions.lock());
        if !subscriptions.is_empty() {
            let mut index = self.index.write();
            for (room, sub_id) in subscriptions.into_values() {
                self.remove_subscriber(&mut index, &room, sub_id);
                self.metrics.subscriptions.add(-1);
            }
            self.metrics.rooms.set(index.len() as i64);
        }
        self.conns.write().remove(&conn.id);
        if let Some(user) = &conn.user_id {
            let mut users = self.users.write();
            if let Some(list) = users.get_mut(user) {
                list.retain(|c| !Arc::ptr_eq(c, conn));
                if list.is_empty() {
                    users.remove(user);
                }
            }
        }
        self.metrics.connections.add(-1);
    }

    /// Subscribes `conn` to `room` under `request_id`.
    ///
    /// Reusing a request id that already names a subscription *moves* that subscription to the new room (and is
    /// a no-op for the same room): a request id names one subscription, so deliveries for it can never come from
    /// two rooms at once. This is also what High-templar's per-request-id table did implicitly.
    pub fn subscribe(
        &self,
        conn: &Arc<Conn>,
        request_id: RequestId,
        room: Room,
    ) -> Result<(), SubscribeError> {
        if !conn.permissions.allows(&room) {
            return Err(SubscribeError::NotAllowed);
        }
        let mut subscriptions = conn.subscriptions.lock();
        let previous = subscriptions.get(&request_id).cloned();
        if let Some((old_room, _)) = &previous {
            if *old_room == room {
                return Ok(());
            }
        } else if subscriptions.len() >= self.max_subscriptions {
            return Err(SubscribeError::TooMany);
        }
        let sub_id = self.next_subscription.fetch_add(1, Ordering::Relaxed);
        let mut index = self.index.write();
        if let Some((old_room, old_id)) = previous {
            self.remove_subscriber(&mut index, &old_room, old_id);
        } else {
            self.metrics.subscriptions.add(1);
        }
        if index.get(&room).is_none() {
            if let Some(tracker) = &self.interest {
                tracker.record(room.canonical_json(), true);
            }
        }
        index.get_or_insert_with(&room, HashMap::new).insert(
            sub_id,
            Subscriber {
                conn: conn.clone(),
                request_id: request_id.clone(),
            },
        );
        self.metrics.rooms.set(index.len() as i64);
        subscriptions.insert(request_id, (room, sub_id));
        Ok(())
    }

    /// Ends the subscription named by `request_id`; `false` when there is none.
    pub fn unsubscribe(&self, conn: &Arc<Conn>, request_id: &RequestId) -> bool {
        let mut subscriptions = conn.subscriptions.lock();
        let Some((room, sub_id)) = subscriptions.remove(request_id) else {
            return false;
        };
        let mut index = self.index.write();
        self.remove_subscriber(&mut index, &room, sub_id);
        self.metrics.subscriptions.add(-1);
        self.metrics.rooms.set(index.len() as i64);
        true
    }

    /// Delivers `data` (JSON text) to every target. Each subscription is reached at most once, however many of
    /// the targets match it; each connection likewise for the non-room targets.
    pub fn publish(&self, targets: &[Target], data: Bytes) -> PublishOutcome {
        let published_at = Instant::now();
        let template = DeliveryTemplate::new(data);
        let mut outcome = PublishOutcome::default();

        let rooms: Vec<&Room> = targets
            .iter()
            .filter_map(|t| match t {
                Target::Room(room) => Some(room),
                _ => None,
            })
            .collect();
        if !rooms.is_empty() {
            let index = self.index.read();
            let mut seen = HashSet::new();
            let dedupe = rooms.len() > 1;
            let mut buf = BytesMut::new();
            for room in rooms {
                index.for_each_match(room, |_, subscribers| {
                    // One allocation for all of this room's frames; each frame is split off it.
                    let typical = template.publish_len(16);
                    buf.reserve(typical * subscribers.len());
                    for (sub_id, subscriber) in subscribers {
                        if dedupe && !seen.insert(*sub_id) {
                            continue;
                        }
                        template.write_publish(&subscriber.request_id, &mut buf);
                        let frame = buf.split().freeze();
                        if self.deliver(&subscriber.conn, frame, published_at) {
                            outcome.subscriptions_reached += 1;
                        }
                    }
                });
            }
        }

        let direct: Vec<&Target> = targets
            .iter()
            .filter(|t| !matches!(t, Target::Room(_)))
            .collect();
        if !direct.is_empty() {
            let frame = template.message();
            let mut reached: HashSet<Arc<str>> = HashSet::new();
            let mut send = |conn: &Arc<Conn>| {
                if reached.insert(conn.id.clone())
                    && self.deliver(conn, frame.clone(), published_at)
                {
                    outcome.connections_reached += 1;
                }
            };
            for target in direct {
                match target {
                    Target::All => self.conns.read().values().for_each(&mut send),
                    Target::Connection(id) => {
                        if let Some(conn) = self.conns.read().get(id.as_str()) {
                            send(conn);
                        }
                    }
                    Target::User(user) => {
                        if let Some(list) = self.users.read().get(user.as_str()) {
                            list.iter().for_each(&mut send);
                        }
                    }
                    Target::Room(_) => unreachable!("filtered above"),
                }
            }
        }
        outcome
    }

    fn deliver(&self, conn: &Arc<Conn>, frame: Bytes, published_at: Instant) -> bool {
        match conn.outbound.push_text(frame, Some(published_at)) {
            Ok(()) => {
                self.metrics.messages_delivered.inc();
                true
            }
            Err(PushError::Closed) => {
                self.metrics.messages_dropped.inc("closed");
                false
            }
            Err(PushError::SlowConsumer) => {
                self.metrics.messages_dropped.inc("slow_consumer");
                self.metrics.slow_consumer_disconnects.inc();
                tracing::warn!(connection = %conn.id, "slow consumer: outbound queue overflowed, closing");
                false
            }
        }
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.read().len()
    }

    /// Distinct subscribed rooms.
    pub fn room_count(&self) -> usize {
        self.index.read().len()
    }

    /// Every subscribed room (canonical JSON) with its number of local subscriptions.
    pub fn rooms(&self) -> Vec<(String, usize)> {
        self.index
            .read()
            .iter()
            .map(|(room, subscribers)| (room.canonical_json(), subscribers.len()))
            .collect()
    }

    /// Every open connection (for drain).
    pub fn connections(&self) -> Vec<Arc<Conn>> {
        self.conns.read().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn room(v: serde_json::Value) -> Room {
        Room::from_json(&v).unwrap()
    }

    fn rid(s: &str) -> RequestId {
        RequestId::from_json(json!(s)).unwrap()
    }

    fn hub() -> Hub {
        Hub::new(Arc::new(Metrics::default()), 3)
    }

    fn conn(hub: &Hub, user: Option<&str>) -> Arc<Conn> {
        hub.connect(
            user.map(String::from),
            Permissions::All,
            Arc::new(Outbound::new(100, 100_000)),
        )
    }

    #[test]
    fn one_publish_to_many_rooms_reaches_each_subscription_once() {
        let hub = hub();
        let c = conn(&hub, None);
        hub.subscribe(&c, rid("a"), room(json!({"customer": "*"})))
            .unwrap();
        hub.subscribe(&c, rid("b"), room(json!({"customer": "1"})))
            .unwrap();
        let out = hub.publish(
            &[
                Target::Room(room(json!({"customer": "1"}))),
                Target::Room(room(json!({"customer": "*"}))),
            ],
            Bytes::from_static(b"1"),
        );
        assert_eq!(out.subscriptions_reached, 2);
        assert_eq!(c.outbound.queued_frames(), 2);
    }

    #[test]
    fn reusing_a_request_id_moves_the_subscription() {
        let hub = hub();
        let c = conn(&hub, None);
        hub.subscribe(&c, rid("a"), room(json!({"r": 1}))).unwrap();
        hub.subscribe(&c, rid("a"), room(json!({"r": 2}))).unwrap();
        assert_eq!(c.subscription_count(), 1);
        assert_eq!(hub.room_count(), 1);
        let to = |r| {
            hub.publish(
                &[Target::Room(room(json!({"r": r})))],
                Bytes::from_static(b"0"),
            )
        };
        assert_eq!(to(1).subscriptions_reached, 0);
        assert_eq!(to(2).subscriptions_reached, 1);
    }

    #[test]
    fn subscription_limit_and_cleanup_on_disconnect() {
        let hub = hub();
        let c = conn(&hub, Some("u1"));
        for i in 0..3 {
            hub.subscribe(&c, rid(&i.to_string()), room(json!({"r": i})))
                .unwrap();
        }
        assert_eq!(
            hub.subscribe(&c, rid("x"), room(json!({"r": 9}))),
            Err(SubscribeError::TooMany)
        );
        // Moving an existing subscription is not a new one.
        hub.subscribe(&c, rid("0"), room(json!({"r": 9}))).unwrap();
        hub.disconnect(&c);
        assert_eq!(hub.room_count(), 0);
        assert_eq!(hub.connection_count(), 0);
        let out = hub.publish(
            &[Target::User("u1".into()), Target::All],
            Bytes::from_static(b"0"),
        );
        assert_eq!(out.connections_reached, 0);
    }

    #[test]
    fn only_first_and_last_subscribers_are_interest_changes() {
        let tracker = Arc::new(InterestTracker::new());
        let hub = hub().with_interest_tracker(tracker.clone());
        let a = conn(&hub, None);
        let b = conn(&hub, None);
        hub.subscribe(&a, rid("1"), room(json!({"r": 1}))).unwrap();
        hub.subscribe(&b, rid("1"), room(json!({"r": 1}))).unwrap();
        hub.subscribe(&b, rid("2"), room(json!({"r": 2}))).unwrap();
        let mut batch = tracker.take_batch(100);
        batch.add.sort();
        assert_eq!(
            batch.add,
            vec![r#"{"r":1}"#.to_string(), r#"{"r":2}"#.to_string()]
        );
        assert_eq!(hub.local_interest().len(), 2);
        // One of two subscribers leaving changes nothing; the last one leaving removes the room.
        hub.disconnect(&a);
        assert!(tracker.take_batch(100).is_empty());
        hub.disconnect(&b);
        let mut batch = tracker.take_batch(100);
        batch.remove.sort();
        assert_eq!(
            batch.remove,
            vec![r#"{"r":1}"#.to_string(), r#"{"r":2}"#.to_string()]
        );
    }

    #[test]
    fn user_connection_and_all_targets_count_connections_once() {
        let hub = hub();
        let a = conn(&hub, Some("u1"));
        let b = conn(&hub, Some("u1"));
        let _c = conn(&hub, None);
        let out = hub.publish(&[Target::User("u1".into())], Bytes::from_static(b"0"));
        assert_eq!(out.connections_reached, 2);
        let out = hub.publish(
            &[
                Target::Connection(a.id.to_string()),
                Target::User("u1".into()),
            ],
            Bytes::from_static(b"0"),
        );
        assert_eq!(out.connections_reached, 2);
        let out = hub.publish(
            &[Target::All, Target::Connection(b.id.to_string())],
            Bytes::from_static(b"0"),
        );
        assert_eq!(out.connections_reached, 3);
    }
}
