//! Routes and bridges: messages carried between herald rooms, Redis, RabbitMQ and webhooks (araldo's relay,
//! High-templar's RabbitMQ triggers), cluster-wide.
//!
//! # How a message moves
//! - **Out of herald** (a route whose source is a room pattern): every publish that enters the cluster through
//!   this edge ([`crate::server::State::publish`]) is matched against the routes' patterns here, at its ingress
//!   edge, so it leaves the cluster once however many edges deliver it. Each destination has a bounded queue and
//!   one worker (a Redis connection, an AMQP channel, an HTTP client), so a slow broker or backend delays only
//!   its own messages; a full queue drops and counts (`herald_bridge_messages_failed_total{reason="queue_full"}`).
//! - **Into herald** (a Redis or AMQP source): exactly one edge consumes each source. The registry grants it
//!   (`ClaimSource`) to a live edge until that edge's lease ends; the others wait, and claim it when the registry
//!   reports it released. An edge that cannot renew its lease stops its sources before the lease can expire, so
//!   the next owner never overlaps with it. A decoded message is published like any other publish.
//! - A message that cannot be decoded is counted, logged with its first bytes and endpoint, and skipped (an AMQP
//!   delivery is rejected without requeue); the messages behind it go on.
//!
//! # Where the table comes from
//! In a cluster the registry holds the table: each edge writes the `endpoints:` and `routes:` of its
//! `herald.yaml` at start, `herald ctl routes` changes it at run time, and every edge follows it through its
//! watch. A node without a registry runs the table of its own configuration.
//!
//! Every source consumer and destination worker runs under the [`supervisor`]: a failure restarts it with
//! backoff and never takes the node down.

pub mod amqp;
pub(crate) mod redis;
pub(crate) mod supervisor;
pub(crate) mod webhook;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde_json::Value;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use herald_protocol::Room;
use herald_registry::client::{ClaimOutcome, RegistryClient};
use herald_registry::Change;
use herald_routes::template::{self, Vars};
use herald_routes::{Endpoint, Route, RouteTable};

use crate::hub::Target;
use crate::metrics::Counter;
use crate::server::State;
use crate::trace::PublishTrace;

use self::supervisor::{Supervisor, TaskFuture};

/// Messages one destination may have waiting for its worker.
pub(crate) const DESTINATION_QUEUE: usize = 4096;
/// How often the runner re-checks ownership and leases without being told to.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// How many bytes of an undecodable message the log shows.
const LOGGED_PREFIX: usize = 64;

/// Why a message did not make it, as the `reason` label of `herald_bridge_messages_failed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The source payload could not be decoded with its marshal.
    Decode,
    /// Larger than `limits.max-publish-body-bytes`, or more rooms than `limits.max-rooms-per-publish`.
    TooLarge,
    /// A placeholder had no value, or the filled room is not a room.
    NoTarget,
    /// The destination's queue was full.
    QueueFull,
    /// The destination refused or failed the send (the worker reconnects).
    Send,
    /// A webhook that exhausted its retries or was refused.
    DeadLetter,
}

impl Failure {
    const ALL: [Failure; 6] = [
        Failure::Decode,
        Failure::TooLarge,
        Failure::NoTarget,
        Failure::QueueFull,
        Failure::Send,
        Failure::DeadLetter,
    ];

    fn label(self) -> &'static str {
        match self {
            Failure::Decode => "decode",
            Failure::TooLarge => "too_large",
            Failure::NoTarget => "no_target",
            Failure::QueueFull => "queue_full",
            Failure::Send => "send",
            Failure::DeadLetter => "dead_letter",
        }
    }
}

/// One route's counters. They outlive changes to the route, so `/metrics` stays monotonic.
#[derive(Debug, Default)]
pub(crate) struct RouteCounters {
    messages_in: Counter,
    failed: [Counter; 6],
    out: Mutex<BTreeMap<String, Arc<Counter>>>,
}

impl RouteCounters {
    fn fail(&self, failure: Failure) {
        self.failed[failure as usize].inc();
    }

    fn out(&self, destination: &str) -> Arc<Counter> {
        self.out
            .lock()
            .entry(destination.to_owned())
            .or_default()
            .clone()
    }

    /// Failures counted for `failure`.
    pub(crate) fn failed(&self, failure: Failure) -> u64 {
        self.failed[failure as usize].get()
    }
}

/// A message on its way through a route.
#[derive(Debug, Clone)]
struct BridgeMessage {
    /// The rooms it was published to, or that its envelope named.
    rooms: Vec<Room>,
    /// JSON text.
    data: Bytes,
    /// The channel or routing key it arrived on.
    channel: Option<String>,
    traceparent: Option<String>,
}

impl BridgeMessage {
    fn vars(&self) -> (Vars<'_>, Value) {
        let first = self.rooms.first().map(Room::to_json).unwrap_or(Value::Null);
        let mut vars = Vars::room(&first);
        vars.channel = self.channel.as_deref();
        (vars, first)
    }
}

/// What a destination worker sends: the filled channel or routing key, and the encoded payload.
#[derive(Debug)]
struct Outgoing {
    key: String,
    payload: Bytes,
}

#[derive(Debug)]
struct Destination {
    name: String,
    endpoint: Endpoint,
    /// The worker's queue (`None` for rooms, which are published inline).
    queue: Option<mpsc::Sender<Outgoing>>,
    delivered: Arc<Counter>,
}

/// A route as it runs.
#[derive(Debug)]
struct ActiveRoute {
    name: String,
    /// The route and its endpoints' definitions: a change to any of them restarts the route's tasks.
    fingerprint: String,
    source: Endpoint,
    /// For a room source, its pattern.
    pattern: Option<Room>,
    destinations: Vec<Destination>,
    counters: Arc<RouteCounters>,
}

#[derive(Debug, Default)]
struct Active {
    routes: BTreeMap<String, Arc<ActiveRoute>>,
    /// The routes whose source is a room pattern, checked on every publish.
    room_routes: Vec<Arc<ActiveRoute>>,
}

/// The registry's endpoints, routes and source owners, as the watch reported them.
#[derive(Debug, Default)]
struct Replica {
    endpoints: BTreeMap<String, String>,
    routes: BTreeMap<String, String>,
    owners: BTreeMap<String, String>,
}

/// An edge's bridges: the running route table, the destination workers and the source ownership.
#[derive(Debug)]
pub(crate) struct Bridges {
    active: RwLock<Arc<Active>>,
    /// Whether any route takes room publishes: every publish asks, and most nodes have none, so the answer is a
    /// relaxed load rather than the lock and the reference count above.
    has_room_routes: std::sync::atomic::AtomicBool,
    /// The table being run (from the configuration, or the registry's).
    table: Mutex<RouteTable>,
    /// Where table changes go in a cluster; unset on a node without a registry, which changes its own table.
    registry: std::sync::OnceLock<RegistryClient>,
    replica: Mutex<Replica>,
    counters: Mutex<BTreeMap<String, Arc<RouteCounters>>>,
    supervisor: Supervisor,
    /// Woken when the table or the owners change.
    changed: Notify,
    /// When this edge last renewed its registry lease (ms since `epoch`); 0 before the first registration.
    lease_renewed_ms: AtomicU64,
    epoch: Instant,
    max_body_bytes: usize,
    max_rooms: usize,
}

impl Bridges {
    /// Bridges for a node with these publish limits, running nothing yet.
    pub(crate) fn new(max_body_bytes: usize, max_rooms: usize) -> Bridges {
        Bridges {
            active: RwLock::default(),
            has_room_routes: std::sync::atomic::AtomicBool::new(false),
            table: Mutex::default(),
            registry: std::sync::OnceLock::new(),
            replica: Mutex::default(),
            counters: Mutex::default(),
            supervisor: Supervisor::default(),
            changed: Notify::new(),
            lease_renewed_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            max_body_bytes,
            max_rooms,
        }
    }

    /// Records a successful registration or keep-alive.
    pub(crate) fn lease_renewed(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.lease_renewed_ms.store(now.max(1), Ordering::Relaxed);
    }

    /// Whether the lease was renewed within `window`.
    fn lease_fresh(&self, window: Duration) -> bool {
        let renewed = self.lease_renewed_ms.load(Ordering::Relaxed);
        renewed != 0
            && self.epoch.elapsed().as_millis() as u64 <= renewed + window.as_millis() as u64
    }

    fn counters(&self, route: &str) -> Arc<RouteCounters> {
        self.counters
            .lock()
            .entry(route.to_owned())
            .or_default()
            .clone()
    }

    /// Runs `table`: routes whose definition changed get new destination workers (their sources restart on the
    /// runner's next pass); removed routes stop.
    pub(crate) fn install(&self, table: &RouteTable) {
        *self.table.lock() = table.clone();
        let old = self.active.read().clone();
        let mut next = Active::default();
        for (name, route) in &table.routes {
            let Some(source) = table.endpoints.get(&route.from) else {
                continue;
            };
            let fingerprint = fingerprint(table, route);
            let active = match old.routes.get(name) {
                Some(existing) if existing.fingerprint == fingerprint => existing.clone(),
                _ => {
                    self.stop_route(name);
                    Arc::new(self.start_route(name, route, source, table, fingerprint))
                }
            };
            if active.pattern.is_some() {
                next.room_routes.push(active.clone());
            }
            next.routes.insert(name.clone(), active);
        }
        for name in old.routes.keys() {
            if !next.routes.contains_key(name) {
                self.stop_route(name);
            }
        }
        self.has_room_routes.store(
            !next.room_routes.is_empty(),
            std::sync::atomic::Ordering::Relaxed,
        );
        *self.active.write() = Arc::new(next);
        self.changed.notify_one();
    }

    fn start_route(
        &self,
        name: &str,
        route: &Route,
        source: &Endpoint,
        table: &RouteTable,
        fingerprint: String,
    ) -> ActiveRoute {
        let counters = self.counters(name);
        let destinations = route
            .to
            .iter()
            .filter_map(|to| {
                let endpoint = table.endpoints.get(to)?.clone();
                let delivered = counters.out(to);
                let queue = match &endpoint {
                    Endpoint::Room(_) => None,
                    _ => Some(self.start_worker(name, to, &endpoint, &counters, &delivered)),
                };
                Some(Destination {
                    name: to.clone(),
                    endpoint,
                    queue,
                    delivered,
                })
            })
            .collect();
        let pattern = match source {
            Endpoint::Room(spec) => spec.room.as_ref().and_then(|r| Room::from_json(r).ok()),
            _ => None,
        };
        ActiveRoute {
            name: name.to_owned(),
            fingerprint,
            source: source.clone(),
            pattern,
            destinations,
            counters,
        }
    }

    /// Starts the supervised worker that sends a destination's queue.
    fn start_worker(
        &self,
        route: &str,
        destination: &str,
        endpoint: &Endpoint,
        counters: &Arc<RouteCounters>,
        delivered: &Arc<Counter>,
    ) -> mpsc::Sender<Outgoing> {
        let (tx, rx) = mpsc::channel(DESTINATION_QUEUE);
        // Shared by the worker's successive runs: a restart picks up where the failed run stopped.
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let endpoint = endpoint.clone();
        let counters = counters.clone();
        let delivered = delivered.clone();
        let destination_name = destination.to_owned();
        self.supervisor
            .start(&format!("{route}->{destination}"), move |stop| {
                let rx = rx.clone();
                let endpoint = endpoint.clone();
                let counters = counters.clone();
                let delivered = delivered.clone();
                let name = destination_name.clone();
                Box::pin(async move {
                    let mut rx = rx.lock().await;
                    send_loop(&endpoint, &name, &mut rx, &counters, &delivered, stop).await
                }) as TaskFuture
            });
        tx
    }

    fn stop_route(&self, route: &str) {
        let prefix = format!("{route}->");
        for name in self.supervisor.names() {
            if name.starts_with(&prefix) || name == source_task(route) {
                self.supervisor.stop(&name);
            }
        }
    }

    /// Stops every worker and source.
    pub(crate) fn stop(&self) {
        self.supervisor.stop_all();
    }

    /// Sends a publish that entered the cluster here through every route whose room pattern it matches.
    pub(crate) fn on_publish(
        &self,
        state: &State,
        targets: &[Target],
        data: &Bytes,
        traceparent: impl FnOnce() -> Option<String>,
    ) {
        if !self
            .has_room_routes
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let active = self.active.read().clone();
        if active.room_routes.is_empty() {
            return;
        }
        let mut traceparent = Some(traceparent);
        let mut context = None;
        for route in &active.room_routes {
            let Some(pattern) = &route.pattern else {
                continue;
            };
            for target in targets {
                if let Target::Room(room) = target {
                    if room.matches(pattern) {
                        route.counters.messages_in.inc();
                        if let Some(traceparent) = traceparent.take() {
                            context = traceparent();
                        }
                        let message = BridgeMessage {
                            rooms: vec![room.clone()],
                            data: data.clone(),
                            channel: None,
                            traceparent: context.clone(),
                        };
                        self.dispatch(state, route, &message);
                    }
                }
            }
        }
    }

    /// Hands a payload that arrived on `channel` from route `route`'s external source to its destinations.
    /// Returns false when the payload was refused (too large, undecodable): an AMQP source rejects it rather than
    /// acknowledging it.
    fn on_source_message(
        &self,
        state: &State,
        route: &ActiveRoute,
        channel: &str,
        payload: &[u8],
    ) -> bool {
        if payload.len() > self.max_body_bytes {
            route.counters.fail(Failure::TooLarge);
            tracing::warn!(route = %route.name, bytes = payload.len(), "bridge message larger than limits.max-publish-body-bytes; skipped");
            return false;
        }
        let decoded = match route.source.marshal().decode(payload) {
            Ok(decoded) => decoded,
            Err(e) => {
                route.counters.fail(Failure::Decode);
                tracing::warn!(
                    route = %route.name,
                    endpoint = %route.source.kind(),
                    channel,
                    cause = %e,
                    first_bytes = %String::from_utf8_lossy(&payload[..payload.len().min(LOGGED_PREFIX)]).escape_debug(),
                    "undecodable bridge message; skipped"
                );
                return false;
            }
        };
        route.counters.messages_in.inc();
        let message = BridgeMessage {
            rooms: decoded.rooms.unwrap_or_default(),
            data: decoded.data,
            channel: Some(channel.to_owned()),
            traceparent: decoded.traceparent,
        };
        self.dispatch(state, route, &message);
        true
    }

    fn dispatch(&self, state: &State, route: &ActiveRoute, message: &BridgeMessage) {
        let (vars, first_room) = message.vars();
        for destination in &route.destinations {
            match (&destination.endpoint, &destination.queue) {
                (Endpoint::Room(spec), _) => {
                    let rooms = match &spec.room {
                        None => message.rooms.clone(),
                        Some(template) => {
                            match template::fill_room(template, &vars, &first_room)
                                .and_then(|room| Room::from_json(&room).ok())
                            {
                                Some(room) => vec![room],
                                None => {
                                    route.counters.fail(Failure::NoTarget);
                                    continue;
                                }
                            }
                        }
                    };
                    if rooms.is_empty() {
                        route.counters.fail(Failure::NoTarget);
                        continue;
                    }
                    if rooms.len() > self.max_rooms {
                        route.counters.fail(Failure::TooLarge);
                        continue;
                    }
                    let targets: Vec<Target> = rooms.into_iter().map(Target::Room).collect();
                    // A message from a source is a publish of its own, continuing the envelope's trace.
                    let trace = PublishTrace::start(
                        "bridge",
                        message
                            .traceparent
                            .as_deref()
                            .and_then(herald_telemetry::parse_traceparent),
                    );
                    let _entered = trace.span().enter();
                    state.publish_traced(&targets, message.data.clone(), &trace);
                    destination.delivered.inc();
                }
                (endpoint, Some(queue)) => {
                    let key_template = match endpoint {
                        Endpoint::Redis(spec) => spec.channel.clone(),
                        Endpoint::Amqp(spec) => spec.resolved().routing_key,
                        _ => String::new(),
                    };
                    let Some(key) = template::fill(&key_template, &vars) else {
                        route.counters.fail(Failure::NoTarget);
                        continue;
                    };
                    let rooms: Vec<Value> = message.rooms.iter().map(Room::to_json).collect();
                    let payload = endpoint.marshal().encode(
                        &rooms,
                        &message.data,
                        message.traceparent.as_deref(),
                    );
                    let outgoing = Outgoing {
                        key,
                        payload: Bytes::from(payload),
                    };
                    if queue.try_send(outgoing).is_err() {
                        route.counters.fail(Failure::QueueFull);
                        tracing::debug!(route = %route.name, destination = %destination.name, "bridge destination queue full; message dropped");
                    }
                }
                (_, None) => {}
            }
        }
    }

    /// Follows the registry's watch: endpoints, routes and source owners.
    pub(crate) fn apply_registry(&self, snapshot: bool, changes: &[Change]) {
        let table = {
            let mut replica = self.replica.lock();
            if snapshot {
                *replica = Replica::default();
            }
            let mut table_changed = snapshot;
            for change in changes {
                match change {
                    Change::EndpointPut { name, endpoint } => {
                        replica.endpoints.insert(name.clone(), endpoint.clone());
                        table_changed = true;
                    }
                    Change::EndpointDeleted { name } => {
                        replica.endpoints.remove(name);
                        table_changed = true;
                    }
                    Change::RoutePut { name, route } => {
                        replica.routes.insert(name.clone(), route.clone());
                        table_changed = true;
                    }
                    Change::RouteDeleted { name } => {
                        replica.routes.remove(name);
                        table_changed = true;
                    }
                    Change::SourceOwned { route, edge } => {
                        replica.owners.insert(route.clone(), edge.clone());
                    }
                    Change::SourceReleased { route } => {
                        replica.owners.remove(route);
                    }
                    _ => {}
                }
            }
            table_changed.then(|| replica_table(&replica))
        };
        if let Some(table) = table {
            self.install(&table);
        }
        self.changed.notify_one();
    }

    fn owner(&self, route: &str) -> Option<String> {
        self.replica.lock().owners.get(route).cloned()
    }

    /// The table being run, with the source owners, for the admin API.
    pub(crate) fn table_json(&self) -> Value {
        let table = self.table.lock().clone();
        let owners = self.replica.lock().owners.clone();
        serde_json::json!({"endpoints": table.endpoints, "routes": table.routes, "sources": owners})
    }

    /// Applies a change to the table: through the registry in a cluster (which validates the whole table in its
    /// apply), else checked here and run at once. Returns whether anything changed.
    pub(crate) async fn change(&self, change: TableChange) -> Result<bool, TableError> {
        if let Some(client) = self.registry.get() {
            let outcome = match &change {
                TableChange::PutEndpoint(name, endpoint) => {
                    let json = serde_json::to_string(endpoint).expect("endpoints serialize");
                    client.put_endpoint(name, &json).await.map(|_| true)
                }
                TableChange::DeleteEndpoint(name) => client.delete_endpoint(name).await,
                TableChange::PutRoute(name, route) => {
                    let json = serde_json::to_string(route).expect("routes serialize");
                    client.put_route(name, &json).await.map(|_| true)
                }
                TableChange::DeleteRoute(name) => client.delete_route(name).await,
            };
            return outcome.map_err(|e| match e.code() {
                tonic::Code::InvalidArgument => TableError::Invalid(registry_reason(&e)),
                tonic::Code::FailedPrecondition => TableError::InUse(registry_reason(&e)),
                _ => TableError::Unavailable(e.to_string()),
            });
        }
        let current = self.table.lock().clone();
        let (next, changed) = match change {
            TableChange::PutEndpoint(name, endpoint) => {
                let changed = current.endpoints.get(&name) != Some(&endpoint);
                (current.with_endpoint(&name, endpoint), changed)
            }
            TableChange::DeleteEndpoint(name) => {
                let changed = current.endpoints.contains_key(&name);
                (current.without_endpoint(&name), changed)
            }
            TableChange::PutRoute(name, route) => {
                let changed = current.routes.get(&name) != Some(&route);
                (current.with_route(&name, route), changed)
            }
            TableChange::DeleteRoute(name) => {
                let mut next = current.clone();
                let changed = next.routes.remove(&name).is_some();
                (Ok(next), changed)
            }
        };
        let next = next.map_err(|e| match e {
            herald_routes::RouteError::InUse { .. } => TableError::InUse(e.to_string()),
            other => TableError::Invalid(other.to_string()),
        })?;
        if changed {
            self.install(&next);
        }
        Ok(changed)
    }

    /// The supervised tasks and the source owners, for the admin API.
    pub(crate) fn status(&self) -> Value {
        let tasks: Vec<Value> = self
            .supervisor
            .statuses()
            .into_iter()
            .map(|(task, s)| {
                serde_json::json!({"task": task, "up": s.up, "restarts": s.restarts, "last_error": s.last_error})
            })
            .collect();
        let owners = self.replica.lock().owners.clone();
        serde_json::json!({"tasks": tasks, "source_owners": owners})
    }

    /// `herald_bridge_*` series for `/metrics`.
    pub(crate) fn render(&self, out: &mut String) {
        let counters = self.counters.lock();
        if counters.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP herald_bridge_messages_in_total Messages a route took from its source.\n# TYPE herald_bridge_messages_in_total counter");
        for (route, c) in counters.iter() {
            let _ = writeln!(
                out,
                "herald_bridge_messages_in_total{{route=\"{route}\"}} {}",
                c.messages_in.get()
            );
        }
        let _ = writeln!(out, "# HELP herald_bridge_messages_out_total Messages a route delivered to a destination.\n# TYPE herald_bridge_messages_out_total counter");
        for (route, c) in counters.iter() {
            for (destination, n) in c.out.lock().iter() {
                let _ = writeln!(out, "herald_bridge_messages_out_total{{route=\"{route}\",destination=\"{destination}\"}} {}", n.get());
            }
        }
        let _ = writeln!(out, "# HELP herald_bridge_messages_failed_total Messages a route could not carry, by reason.\n# TYPE herald_bridge_messages_failed_total counter");
        for (route, c) in counters.iter() {
            for failure in Failure::ALL {
                let _ = writeln!(
                    out,
                    "herald_bridge_messages_failed_total{{route=\"{route}\",reason=\"{}\"}} {}",
                    failure.label(),
                    c.failed(failure)
                );
            }
        }
        drop(counters);
        let statuses = self.supervisor.statuses();
        let _ = writeln!(out, "# HELP herald_bridge_task_up Whether a supervised bridge task (a source consumer, or a route's destination worker) runs on this node.\n# TYPE herald_bridge_task_up gauge");
        for (task, status) in &statuses {
            let _ = writeln!(
                out,
                "herald_bridge_task_up{{task=\"{task}\"}} {}",
                u8::from(status.up)
            );
        }
        let _ = writeln!(out, "# HELP herald_bridge_task_restarts_total Restarts of a supervised bridge task after a failure.\n# TYPE herald_bridge_task_restarts_total counter");
        for (task, status) in &statuses {
            let _ = writeln!(
                out,
                "herald_bridge_task_restarts_total{{task=\"{task}\"}} {}",
                status.restarts
            );
        }
    }
}

/// The supervisor's name for route `route`'s source consumer.
fn source_task(route: &str) -> String {
    format!("{route}<-source")
}

fn fingerprint(table: &RouteTable, route: &Route) -> String {
    let endpoints: BTreeMap<&String, Option<&Endpoint>> = std::iter::once(&route.from)
        .chain(route.to.iter())
        .map(|name| (name, table.endpoints.get(name)))
        .collect();
    serde_json::json!({"route": route, "endpoints": endpoints}).to_string()
}

fn replica_table(replica: &Replica) -> RouteTable {
    RouteTable {
        endpoints: replica
            .endpoints
            .iter()
            .filter_map(|(n, e)| Some((n.clone(), serde_json::from_str(e).ok()?)))
            .collect(),
        routes: replica
            .routes
            .iter()
            .filter_map(|(n, r)| Some((n.clone(), serde_json::from_str(r).ok()?)))
            .collect(),
    }
}

/// One run of a destination worker: connect, then send the queue in order until `stop` or a failure.
async fn send_loop(
    endpoint: &Endpoint,
    destination: &str,
    rx: &mut mpsc::Receiver<Outgoing>,
    counters: &RouteCounters,
    delivered: &Counter,
    stop: CancellationToken,
) -> Result<(), String> {
    match endpoint {
        Endpoint::Redis(spec) => {
            let mut sink = redis::RedisSink::connect(spec).await?;
            loop {
                let Some(message) = next(rx, &stop).await else {
                    return Ok(());
                };
                if let Err(e) = sink.publish(&message.key, &message.payload).await {
                    counters.fail(Failure::Send);
                    return Err(e);
                }
                delivered.inc();
            }
        }
        Endpoint::Webhook(spec) => {
            let sink = webhook::WebhookSink::new(spec)?;
            loop {
                let Some(message) = next(rx, &stop).await else {
                    return Ok(());
                };
                match sink.deliver(message.payload).await {
                    webhook::WebhookOutcome::Delivered { .. } => delivered.inc(),
                    webhook::WebhookOutcome::DeadLetter(reason) => {
                        counters.fail(Failure::DeadLetter);
                        tracing::warn!(destination, url = %spec.url, cause = %reason, "webhook dead letter");
                    }
                }
            }
        }
        Endpoint::Amqp(spec) => {
            let sink = amqp::AmqpSink::connect(&amqp_endpoint(spec))
                .await
                .map_err(|e| e.to_string())?;
            loop {
                let Some(message) = next(rx, &stop).await else {
                    return Ok(());
                };
                // Publisher confirms: Ok means the broker has the message.
                if let Err(e) = sink.publish(&message.key, &message.payload).await {
                    counters.fail(Failure::Send);
                    return Err(e.to_string());
                }
                delivered.inc();
            }
        }
        Endpoint::Room(_) => Ok(()),
    }
}

async fn next(rx: &mut mpsc::Receiver<Outgoing>, stop: &CancellationToken) -> Option<Outgoing> {
    tokio::select! {
        message = rx.recv() => message,
        _ = stop.cancelled() => None,
    }
}

/// A change to the route table, from the admin API.
#[derive(Debug, Clone)]
pub(crate) enum TableChange {
    PutEndpoint(String, Endpoint),
    DeleteEndpoint(String),
    PutRoute(String, Route),
    DeleteRoute(String),
}

/// Why a table change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TableError {
    /// The table it would make is invalid (unknown endpoint, wrong role, cycle, bad definition).
    #[error("{0}")]
    Invalid(String),
    /// An endpoint still used by a route.
    #[error("{0}")]
    InUse(String),
    /// The registry could not be reached.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

fn registry_reason(e: &herald_registry::client::ClientError) -> String {
    match e {
        herald_registry::client::ClientError::Status(status) => status.message().to_owned(),
        other => other.to_string(),
    }
}

/// How the runner reaches the registry (cluster nodes only).
#[derive(Debug, Clone)]
pub(crate) struct RegistryHandle {
    pub(crate) client: RegistryClient,
    pub(crate) edge_id: String,
    pub(crate) lease_ttl: Duration,
}

/// Runs the node's bridges until `shutdown`: installs the configured table (or writes it to the registry), then
/// keeps the sources this node owns running.
pub(crate) async fn run(
    state: Arc<State>,
    registry: Option<RegistryHandle>,
    shutdown: CancellationToken,
) {
    let configured = state.config.route_table();
    match &registry {
        None => state.bridges.install(&configured),
        Some(handle) => {
            let _ = state.bridges.registry.set(handle.client.clone());
            let handle = handle.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = seed_registry(&handle.client, &configured) => {}
                    _ = shutdown.cancelled() => {}
                }
            });
        }
    }
    let bridges = state.bridges.clone();
    let mut running: BTreeMap<String, String> = BTreeMap::new();
    let mut last_claim: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let active = bridges.active.read().clone();
        let mut wanted = BTreeSet::new();
        for (name, route) in &active.routes {
            if !route.source.is_external_source() {
                continue;
            }
            let mine = match &registry {
                None => true,
                Some(handle) => {
                    let fresh = bridges.lease_fresh(handle.lease_ttl * 3 / 4);
                    match bridges.owner(name) {
                        Some(owner) => owner == handle.edge_id && fresh,
                        None => {
                            let due = last_claim
                                .get(name)
                                .is_none_or(|at| at.elapsed() >= Duration::from_millis(500));
                            if fresh && due {
                                last_claim.insert(name.clone(), Instant::now());
                                tokio::spawn(claim(handle.clone(), name.clone()));
                            }
                            false
                        }
                    }
                }
            };
            if mine {
                wanted.insert(name.clone());
            }
        }
        // Stop what is no longer ours (or changed), then start what is.
        running.retain(|name, fingerprint| {
            let keep = wanted.contains(name)
                && active.routes.get(name).map(|r| &r.fingerprint) == Some(fingerprint);
            if !keep {
                tracing::info!(route = %name, "stopping bridge source");
                bridges.supervisor.stop(&source_task(name));
            }
            keep
        });
        for name in &wanted {
            if running.contains_key(name) {
                continue;
            }
            let route = active.routes[name].clone();
            tracing::info!(route = %name, "starting bridge source");
            running.insert(name.clone(), route.fingerprint.clone());
            start_source(&state, route);
        }
        tokio::select! {
            _ = bridges.changed.notified() => {}
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    bridges.stop();
}

fn start_source(state: &Arc<State>, route: Arc<ActiveRoute>) {
    let name = source_task(&route.name);
    let state = state.clone();
    state.bridges.clone().supervisor.start(&name, move |stop| {
        let state = state.clone();
        let route = route.clone();
        Box::pin(async move {
            match &route.source {
                Endpoint::Redis(spec) => {
                    redis::consume(spec, stop, |channel, payload| {
                        state
                            .bridges
                            .on_source_message(&state, &route, channel, payload);
                    })
                    .await
                }
                Endpoint::Amqp(spec) => consume_amqp(&state, &route, spec, stop).await,
                _ => Ok(()),
            }
        }) as TaskFuture
    });
}

/// The AMQP module's endpoint for a route table's `amqp` spec (preset and defaults applied).
fn amqp_endpoint(spec: &herald_routes::AmqpSpec) -> amqp::AmqpEndpoint {
    let resolved = spec.resolved();
    amqp::AmqpEndpoint {
        url: resolved.url,
        exchange: resolved.exchange,
        exchange_kind: resolved.exchange_kind,
        routing_key: resolved.routing_key,
        queue: resolved.queue,
        durable: resolved.durable,
        prefetch: resolved.prefetch,
    }
}

/// One run of an AMQP source: at-least-once, so a delivery is acknowledged only after it was published into
/// herald (and queued for the route's other destinations). One that cannot be decoded is rejected without
/// requeue: redelivering it would fail the same way forever.
async fn consume_amqp(
    state: &Arc<State>,
    route: &ActiveRoute,
    spec: &herald_routes::AmqpSpec,
    stop: CancellationToken,
) -> Result<(), String> {
    let endpoint = amqp_endpoint(spec);
    let queue = endpoint.queue_name(&route.name);
    let mut source = tokio::select! {
        source = amqp::AmqpSource::connect(&endpoint, &queue) => source.map_err(|e| e.to_string())?,
        _ = stop.cancelled() => return Ok(()),
    };
    tracing::info!(route = %route.name, queue = %queue, "amqp source consuming");
    loop {
        let delivery = tokio::select! {
            delivery = source.next() => delivery.map_err(|e| e.to_string())?,
            _ = stop.cancelled() => return Ok(()),
        };
        let Some(delivery) = delivery else {
            return Err("the broker cancelled the consumer".into());
        };
        let accepted = state.bridges.on_source_message(
            state,
            route,
            delivery.routing_key(),
            delivery.payload(),
        );
        let settled = if accepted {
            delivery.ack().await
        } else {
            delivery.reject().await
        };
        settled.map_err(|e| e.to_string())?;
    }
}

async fn claim(handle: RegistryHandle, route: String) {
    // Spread the edges' claims a little so one does not always win every source.
    let jitter = rand_jitter(&handle.edge_id, &route);
    tokio::time::sleep(jitter).await;
    match handle.client.claim_source(&route, &handle.edge_id).await {
        Ok(ClaimOutcome::Owner(owner)) => {
            tracing::debug!(route = %route, owner = %owner, "source claimed");
        }
        Ok(ClaimOutcome::UnknownEdge) => {
            tracing::debug!(route = %route, "claim refused: this edge is not registered (yet)");
        }
        Err(e) => tracing::debug!(route = %route, cause = %e, "source claim failed"),
    }
}

/// A delay of 0-200 ms that differs between edges and routes.
fn rand_jitter(edge: &str, route: &str) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write(edge.as_bytes());
    hasher.write(route.as_bytes());
    Duration::from_millis(hasher.finish() % 200)
}

/// Writes this node's configured endpoints, then its routes, to the registry, retrying until the registry
/// answers. A refusal (the configured table clashes with routes added at run time) is logged and left.
async fn seed_registry(client: &RegistryClient, table: &RouteTable) {
    for (name, endpoint) in &table.endpoints {
        let json = serde_json::to_string(endpoint).expect("endpoints serialize");
        put_until_answered("endpoint", name, || client.put_endpoint(name, &json)).await;
    }
    for (name, route) in &table.routes {
        let json = serde_json::to_string(route).expect("routes serialize");
        put_until_answered("route", name, || client.put_route(name, &json)).await;
    }
}

async fn put_until_answered<F, Fut>(what: &str, name: &str, mut put: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, herald_registry::client::ClientError>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match put().await {
            Ok(_) => return,
            Err(e)
                if e.code() == tonic::Code::InvalidArgument
                    || e.code() == tonic::Code::FailedPrecondition =>
            {
                tracing::error!(what, name, cause = %e, "the registry refused this node's configured {what}");
                return;
            }
            Err(e) => {
                tracing::debug!(what, name, cause = %e, "registry unavailable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
