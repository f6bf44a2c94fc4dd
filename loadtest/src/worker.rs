//! A worker process (`herald-loadtest worker`): holds a slice of the subscriber connections.
//!
//! One single-threaded runtime with a `LocalSet`: every connection is a local task, and they share one
//! `RefCell`ed [`State`] (histograms, per-stream counters) without locks or atomics, since nothing else runs on
//! the thread. Scale comes from several worker processes (the coordinator starts at least two for big runs), which
//! is also what the 20,000-files-per-process limit asks for.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Notify};

use crate::driver::herald::HeraldDriver;
use crate::driver::peers::{NatsDriver, SockudoDriver};
use crate::driver::{Driver, Incoming, SubscriberClient};
use crate::payload::{instant_at, now_ns, Header};
use crate::scenario::{Scenario, SubscriberPlan};
use crate::stats::{KilledSegment, Latency, Missing, Stream};
use crate::wire::{
    Command, ConnectReport, Event, FailoverFacts, FinalReport, Plan, Resubscribe, TargetKind, Tick,
};

/// Runs a worker on stdin/stdout until the coordinator says stop (or goes away).
pub(crate) fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald-loadtest worker: cannot start a runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    let (events, rx) = mpsc::unbounded_channel();
    let writer = local.spawn_local(write_events(rx));
    let result = local.block_on(&runtime, run(events.clone()));
    if let Err(e) = &result {
        let _ = events.send(Event::Fatal(format!("{e:#}")));
    }
    drop(events);
    let _ = local.block_on(&runtime, writer);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

async fn write_events(mut rx: mpsc::UnboundedReceiver<Event>) {
    let mut out = tokio::io::stdout();
    while let Some(event) = rx.recv().await {
        // Serializing our own types cannot fail.
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
            // The coordinator is gone; nothing left to report to.
            std::process::exit(1);
        }
    }
}

async fn run(events: mpsc::UnboundedSender<Event>) -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await?
        .context("the coordinator sent no plan")?;
    let plan: Plan = serde_json::from_str(&first).context("the plan line is not valid")?;
    match plan.target {
        TargetKind::Herald => {
            let query = plan.driver_options["query"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            Worker::new(HeraldDriver { query }, plan, events)
                .run(lines)
                .await
        }
        TargetKind::Nats => Worker::new(NatsDriver, plan, events).run(lines).await,
        TargetKind::Sockudo => {
            Worker::new(SockudoDriver::default(), plan, events)
                .run(lines)
                .await
        }
    }
}

// === impl Worker ===

type Lines = tokio::io::Lines<BufReader<tokio::io::Stdin>>;

struct Worker<D> {
    driver: Rc<D>,
    plan: Rc<Plan>,
    state: Rc<RefCell<State>>,
    events: mpsc::UnboundedSender<Event>,
    /// Wakes the connect phase's waiter as connections finish.
    progress: Rc<Notify>,
    /// Ends churn and releases slow consumers at the end of the run.
    stop: Rc<Notify>,
}

/// What every connection task updates.
#[derive(Default)]
struct State {
    subs: Vec<Sub>,
    connect_done: usize,
    connect: Latency,
    to_ack: Latency,
    last_ack_ns: u64,
    connect_failed: u64,
    errors: Vec<String>,
    /// Latencies are recorded for payloads intended at or after this (0: not publishing yet).
    record_from_ns: u64,
    /// When slow consumers stop reading (0: not yet known).
    slow_stop_ns: u64,
    delivered: u64,
    last_delivery_ns: u64,
    delivered_other: u64,
    interval_delivered: u64,
    unparsed: u64,
    misrouted: u64,
    same_node: Latency,
    cross_node: Latency,
    interval: Latency,
    close_codes: Vec<(u16, u64)>,
    churn_connected: u64,
    churn_failed: u64,
    churn_to_ack: Latency,
    /// The coordinator said stop: reconnecting subscribers give up.
    stopped: bool,
}

struct Sub {
    plan: SubscriberPlan,
    /// The node it is connected to now (the plan's until a failover run moves it).
    node: usize,
    subscribed: bool,
    disconnected: bool,
    /// (room << 32 | publisher) → stream; one entry in practice, since each room has one publisher.
    streams: Vec<(u64, Stream)>,
    /// Its connection's ends and what followed each (failover runs reconnect; others only record the end).
    reconnects: Vec<Reconnect>,
}

/// A stable subscriber's connection ended; in a failover run it then connects and subscribes again.
#[derive(Debug, Clone, Copy)]
struct Reconnect {
    from_node: usize,
    closed_ns: u64,
    acked_ns: Option<u64>,
    first_delivery_ns: Option<u64>,
}

impl State {
    fn note_error(&mut self, error: String) {
        if self.errors.len() < 5 && !self.errors.contains(&error) {
            self.errors.push(error);
        }
    }

    fn on_payload(&mut self, idx: usize, h: Header, now: u64) {
        let sub = &mut self.subs[idx];
        if sub.plan.slow {
            self.delivered_other += 1;
            return;
        }
        if h.room != sub.plan.room {
            self.misrouted += 1;
            return;
        }
        self.delivered += 1;
        self.last_delivery_ns = now;
        self.interval_delivered += 1;
        let key = (u64::from(h.room) << 32) | u64::from(h.publisher);
        match sub.streams.iter_mut().find(|(k, _)| *k == key) {
            Some((_, stream)) => stream.observe(h.seq),
            None => {
                let mut stream = Stream::default();
                stream.observe(h.seq);
                sub.streams.push((key, stream));
            }
        }
        if let Some(r) = sub.reconnects.last_mut() {
            if r.acked_ns.is_some() && r.first_delivery_ns.is_none() {
                r.first_delivery_ns = Some(now);
            }
        }
        if self.record_from_ns != 0 && h.intended_ns >= self.record_from_ns {
            let latency = now.saturating_sub(h.intended_ns);
            if usize::from(h.node) == sub.node {
                self.same_node.record_ns(latency);
            } else {
                self.cross_node.record_ns(latency);
            }
            self.interval.record_ns(latency);
        }
    }

    fn on_close(&mut self, code: Option<u16>) {
        let code = code.unwrap_or(1005);
        match self.close_codes.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => self.close_codes.push((code, 1)),
        }
    }

    /// Stable subscriber `idx`'s connection ended.
    fn on_disconnect(&mut self, idx: usize, now: u64) {
        let sub = &mut self.subs[idx];
        sub.disconnected = true;
        sub.reconnects.push(Reconnect {
            from_node: sub.node,
            closed_ns: now,
            acked_ns: None,
            first_delivery_ns: None,
        });
    }

    /// Stable subscriber `idx` subscribed again, on `node`: whatever its stream skips next is this reconnect's
    /// gap. `key` is its (room, publisher) stream, made now if nothing had arrived before.
    fn on_resubscribed(&mut self, idx: usize, node: usize, key: u64, now: u64) {
        let sub = &mut self.subs[idx];
        sub.node = node;
        let tag = sub.reconnects.len() as u32;
        if let Some(r) = sub.reconnects.last_mut() {
            r.acked_ns = Some(now);
        }
        if !sub.streams.iter().any(|(k, _)| *k == key) {
            sub.streams.push((key, Stream::default()));
        }
        for (_, stream) in &mut sub.streams {
            stream.reconnected(tag);
        }
    }
}

/// The nodes a subscriber of `from` tries, in order, when its connection ends in a failover run: the other
/// nodes, starting at one picked by its index (so a killed edge's clients spread over the others), then `from`
/// itself (restarted by then, or the only node).
fn reconnect_order(from: usize, idx: usize, nodes: usize) -> Vec<usize> {
    if nodes <= 1 {
        return vec![from];
    }
    let others = nodes - 1;
    (0..others)
        .map(|k| (from + 1 + (idx + k) % others) % nodes)
        .chain(std::iter::once(from))
        .collect()
}

/// How long one reconnect attempt (connect + subscribe) may take before the next node is tried.
const RECONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a connect + subscribe may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl<D: Driver> Worker<D> {
    fn new(driver: D, plan: Plan, events: mpsc::UnboundedSender<Event>) -> Self {
        let range = plan.scenario.worker_range(plan.worker);
        let subs = range
            .map(|i| {
                let plan = plan.scenario.subscriber(i);
                Sub {
                    plan,
                    node: plan.node,
                    subscribed: false,
                    disconnected: false,
                    streams: Vec::new(),
                    reconnects: Vec::new(),
                }
            })
            .collect();
        Worker {
            driver: Rc::new(driver),
            plan: Rc::new(plan),
            state: Rc::new(RefCell::new(State {
                subs,
                ..State::default()
            })),
            events,
            progress: Rc::new(Notify::new()),
            stop: Rc::new(Notify::new()),
        }
    }

    async fn run(self, mut lines: Lines) -> anyhow::Result<()> {
        self.connect_all().await;
        let report = {
            let s = self.state.borrow();
            ConnectReport {
                subscribed: s.subs.iter().filter(|s| s.subscribed).count() as u64,
                failed: s.connect_failed,
                errors: s.errors.clone(),
                connect: s.connect.to_wire(),
                to_ack: s.to_ack.to_wire(),
                last_ack_ns: s.last_ack_ns,
            }
        };
        let _ = self.events.send(Event::Connected(report));

        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Once publishing starts, ticks fall on whole seconds of it and say which second they close, so the
        // coordinator counts each in its own second whenever it arrives (a worker tick drifting past the
        // coordinator's showed up as a second with no deliveries next to one with twice as many).
        let mut origin: Option<tokio::time::Instant> = None;
        let aligned = |start_ns: u64| {
            let mut ticker = tokio::time::interval_at(
                instant_at(start_ns + 1_000_000_000),
                Duration::from_secs(1),
            );
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            ticker
        };
        loop {
            tokio::select! {
                line = lines.next_line() => {
                    let Some(line) = line? else {
                        bail!("the coordinator closed stdin before stop");
                    };
                    match serde_json::from_str::<Command>(&line).context("bad command line")? {
                        Command::Publishing { start_ns, record_from_ns } => {
                            ticker = aligned(start_ns);
                            origin = Some(instant_at(start_ns));
                            let mut s = self.state.borrow_mut();
                            s.record_from_ns = record_from_ns.max(1);
                            s.slow_stop_ns = start_ns
                                + (self.plan.scenario.slow_consumers.stop_after_secs * 1e9) as u64;
                            drop(s);
                            if self.plan.scenario.churn.per_second > 0.0 {
                                tokio::task::spawn_local(self.churn());
                            }
                        }
                        Command::Stop { sent, failover } => {
                            self.state.borrow_mut().stopped = true;
                            self.stop.notify_waiters();
                            let report = self.final_report(&sent, failover.as_ref());
                            let _ = self.events.send(Event::Final(report));
                            return Ok(());
                        }
                    }
                }
                at = ticker.tick() => {
                    let second = origin.map_or(0, |o| at.saturating_duration_since(o).as_secs_f64().round() as u64);
                    let mut s = self.state.borrow_mut();
                    let tick = Tick { second, delivered: s.interval_delivered, latency: s.interval.to_wire() };
                    s.interval_delivered = 0;
                    s.interval.reset();
                    drop(s);
                    let _ = self.events.send(Event::Tick(tick));
                }
            }
        }
    }

    /// Opens every connection on the ramp schedule and returns once each has subscribed or failed.
    async fn connect_all(&self) {
        let scenario = &self.plan.scenario;
        let range = scenario.worker_range(self.plan.worker);
        let total = scenario.connections() as u64;
        let ramp_ns = (scenario.clients.ramp_up_secs * 1e9) as u64;
        let count = range.len();
        for (idx, i) in range.enumerate() {
            let intended = self.plan.start_ns + ramp_ns * i as u64 / total;
            tokio::task::spawn_local(connection(
                self.driver.clone(),
                self.state.clone(),
                self.progress.clone(),
                self.stop.clone(),
                self.plan.clone(),
                idx,
                intended,
            ));
        }
        loop {
            let notified = self.progress.notified();
            if self.state.borrow().connect_done >= count {
                return;
            }
            notified.await;
        }
    }

    /// Short-lived connections at `churn.per_second / workers` per second until stop.
    fn churn(&self) -> impl std::future::Future<Output = ()> + 'static {
        let driver = self.driver.clone();
        let state = self.state.clone();
        let stop = self.stop.clone();
        let plan = self.plan.clone();
        async move {
            let scenario: &Scenario = &plan.scenario;
            let rate = scenario.churn.per_second / scenario.workers() as f64;
            let hold = Duration::from_millis(scenario.churn.hold_ms);
            let interval_ns = (1e9 / rate) as u64;
            let start = now_ns();
            let stopped = stop.notified();
            tokio::pin!(stopped);
            for k in 0u64.. {
                let intended = start + k * interval_ns;
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep_until(instant_at(intended)) => {}
                }
                let sub = scenario.subscriber((k as usize * 7919) % scenario.connections());
                let addr = plan.nodes[sub.node];
                tokio::task::spawn_local(churn_connection(
                    driver.clone(),
                    state.clone(),
                    addr,
                    plan.source,
                    sub.room,
                    intended,
                    hold,
                ));
            }
        }
    }

    fn final_report(&self, sent: &[u64], failover: Option<&FailoverFacts>) -> FinalReport {
        let s = self.state.borrow();
        let scenario = &self.plan.scenario;
        let mut report = FinalReport {
            delivered: s.delivered,
            delivered_other: s.delivered_other,
            last_delivery_ns: s.last_delivery_ns,
            unparsed: s.unparsed + s.misrouted,
            close_codes: s.close_codes.clone(),
            same_node: s.same_node.to_wire(),
            cross_node: s.cross_node.to_wire(),
            churn_connected: s.churn_connected,
            churn_failed: s.churn_failed,
            churn_to_ack: s.churn_to_ack.to_wire(),
            cpu_secs: crate::procstat::cpu_secs(std::process::id()).unwrap_or(0.0),
            ..FinalReport::default()
        };
        let empty = Stream::default();
        for sub in s.subs.iter().filter(|s| s.subscribed && !s.plan.slow) {
            let expected = sent.get(sub.plan.room as usize).copied().unwrap_or(0);
            let publisher = scenario.room_publisher(sub.plan.room) as u64;
            let key = (u64::from(sub.plan.room) << 32) | publisher;
            let stream = sub
                .streams
                .iter()
                .find(|(k, _)| *k == key)
                .map_or(&empty, |(_, st)| st);
            let missing = match failover {
                None => {
                    if sub.disconnected {
                        report.disconnected += 1;
                    }
                    Missing {
                        lost: expected.saturating_sub(stream.distinct),
                        ..Missing::default()
                    }
                }
                Some(facts) => failover_missing(sub, stream, expected, facts, &mut report),
            };
            report.lost += missing.lost;
            if missing.lost > 0 {
                report.streams_with_loss += 1;
            }
            report.failover_missing.add(Missing { lost: 0, ..missing });
            for (_, st) in &sub.streams {
                report.duplicates += st.duplicates;
                report.reordered += st.reordered;
            }
        }
        report
    }
}

/// A failover run's accounting for one subscriber: which of its reconnects an edge kill explains (recorded in
/// `report.resubscribes`, the others counted as unexplained and as a disconnect), and why each missing delivery
/// is missing.
///
/// A gap right after a kill-explained reconnect is that kill's cost. So is a gap running to the end of the run
/// when the subscriber never resubscribed (counted as such in `resubscribes`) or resubscribed less than a second
/// before publishing ended; after a resubscribe further back, deliveries were due, and their absence is loss.
fn failover_missing(
    sub: &Sub,
    stream: &Stream,
    expected: u64,
    facts: &FailoverFacts,
    report: &mut FinalReport,
) -> Missing {
    let kills: Vec<Option<usize>> = sub
        .reconnects
        .iter()
        .map(|r| facts.kill_for_close(r.from_node, r.closed_ns))
        .collect();
    let mut unexplained = false;
    for (r, kill) in sub.reconnects.iter().zip(&kills) {
        match kill {
            Some(k) => {
                let killed = facts.edge_kills[*k].killed_ns;
                let after = |t: Option<u64>| t.map(|t| t.saturating_sub(killed) / 1_000);
                report.resubscribes.push(Resubscribe {
                    kill: *k,
                    acked_after_us: after(r.acked_ns),
                    first_delivery_after_us: after(r.first_delivery_ns),
                });
            }
            None => {
                report.unexplained_reconnects += 1;
                unexplained = true;
            }
        }
    }
    if unexplained {
        report.disconnected += 1;
    }
    let segments: Vec<KilledSegment> = facts
        .segments
        .iter()
        .filter(|seg| seg.room == sub.plan.room)
        .copied()
        .collect();
    stream.missing(expected, &segments, |tag, tail| {
        let i = tag as usize - 1;
        match (sub.reconnects.get(i), kills.get(i)) {
            (Some(r), Some(Some(_))) => {
                !tail
                    || r.acked_ns
                        .is_none_or(|acked| acked + 1_000_000_000 >= facts.publish_end_ns)
            }
            _ => false,
        }
    })
}

/// One stable subscriber: connect at `intended`, subscribe, then read until the connection ends. In a failover
/// run it then connects to another node, subscribes again and goes on reading, until the run stops.
async fn connection<D: Driver>(
    driver: Rc<D>,
    state: Rc<RefCell<State>>,
    progress: Rc<Notify>,
    stop: Rc<Notify>,
    plan: Rc<Plan>,
    idx: usize,
    intended: u64,
) {
    tokio::time::sleep_until(instant_at(intended)).await;
    let sub = state.borrow().subs[idx].plan;
    let addr = plan.nodes[sub.node];
    let source = plan.source;
    let attempt = async {
        let mut client = driver.connect(addr, source).await?;
        let connected = now_ns();
        client.subscribe(sub.room, sub.wildcard).await?;
        anyhow::Ok((client, connected))
    };
    // A server that accepts but never answers must not hold the whole run in the connect phase.
    let client = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!(
            "no subscribe acknowledgement within {} s",
            CONNECT_TIMEOUT.as_secs()
        )),
    };
    let mut client = {
        let mut s = state.borrow_mut();
        s.connect_done += 1;
        progress.notify_one();
        match client {
            Ok((client, connected)) => {
                let acked = now_ns();
                s.connect.record_ns(connected.saturating_sub(intended));
                s.to_ack.record_ns(acked.saturating_sub(intended));
                s.last_ack_ns = s.last_ack_ns.max(acked);
                s.subs[idx].subscribed = true;
                client
            }
            Err(e) => {
                s.connect_failed += 1;
                s.note_error(format!("{addr}: {e:#}"));
                return;
            }
        }
    };
    let failover = plan.scenario.failover.is_some();
    loop {
        if !read_until_closed(&mut client, &state, idx, sub.slow).await {
            // A slow consumer: stop reading (the socket stays open) until the run ends.
            stop.notified().await;
            return;
        }
        if !failover {
            return;
        }
        match reconnect(&*driver, &state, &plan, idx).await {
            Some(c) => client = c,
            None => return,
        }
    }
}

/// Reads deliveries until the connection ends (true), or until a slow consumer is due to stop reading (false).
async fn read_until_closed<C: SubscriberClient>(
    client: &mut C,
    state: &Rc<RefCell<State>>,
    idx: usize,
    slow: bool,
) -> bool {
    loop {
        let incoming = client.recv().await;
        let mut s = state.borrow_mut();
        match incoming {
            Ok(Incoming::Payload(h)) => {
                let now = now_ns();
                s.on_payload(idx, h, now);
                if slow && s.slow_stop_ns != 0 && now >= s.slow_stop_ns {
                    return false;
                }
            }
            Ok(Incoming::Other) => {}
            Ok(Incoming::Closed(code)) => {
                s.on_close(code);
                s.on_disconnect(idx, now_ns());
                return true;
            }
            Err(_) => {
                s.on_close(None);
                s.on_disconnect(idx, now_ns());
                return true;
            }
        }
    }
}

/// After a stable subscriber's connection ended in a failover run: connects and subscribes again, trying the
/// nodes in [`reconnect_order`] round after round (short pauses between rounds) until one takes it or the run
/// stops (`None`).
async fn reconnect<D: Driver>(
    driver: &D,
    state: &Rc<RefCell<State>>,
    plan: &Plan,
    idx: usize,
) -> Option<D::Client> {
    let (from, sub) = {
        let s = state.borrow();
        (s.subs[idx].node, s.subs[idx].plan)
    };
    let key = (u64::from(sub.room) << 32) | plan.scenario.room_publisher(sub.room) as u64;
    let order = reconnect_order(from, idx, plan.nodes.len());
    let mut pause = Duration::from_millis(20);
    loop {
        for &node in &order {
            if state.borrow().stopped {
                return None;
            }
            let attempt = async {
                let mut client = driver.connect(plan.nodes[node], plan.source).await?;
                client.subscribe(sub.room, sub.wildcard).await?;
                anyhow::Ok(client)
            };
            if let Ok(Ok(client)) = tokio::time::timeout(RECONNECT_ATTEMPT_TIMEOUT, attempt).await {
                state.borrow_mut().on_resubscribed(idx, node, key, now_ns());
                return Some(client);
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// One churn connection: connect, subscribe, stay `hold`, leave. Its deliveries are not loss-accounted.
async fn churn_connection<D: Driver>(
    driver: Rc<D>,
    state: Rc<RefCell<State>>,
    addr: SocketAddr,
    source: IpAddr,
    room: u32,
    intended: u64,
    hold: Duration,
) {
    let attempt = async {
        let mut client = driver.connect(addr, source).await?;
        client.subscribe(room, false).await?;
        anyhow::Ok(client)
    };
    let result = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!("no subscribe acknowledgement in time")),
    };
    let mut client = match result {
        Ok(client) => {
            let mut s = state.borrow_mut();
            s.churn_connected += 1;
            s.churn_to_ack.record_ns(now_ns().saturating_sub(intended));
            client
        }
        Err(e) => {
            let mut s = state.borrow_mut();
            s.churn_failed += 1;
            s.note_error(format!("churn {addr}: {e:#}"));
            return;
        }
    };
    // Cancelling `recv` may leave the stream mid-frame, which is fine: the connection is dropped right after.
    let _ = tokio::time::timeout(hold, async {
        while let Ok(incoming) = client.recv().await {
            match incoming {
                Incoming::Payload(_) => state.borrow_mut().delivered_other += 1,
                Incoming::Closed(_) => return,
                Incoming::Other => {}
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_spread_over_the_other_nodes_then_try_their_own() {
        assert_eq!(reconnect_order(0, 0, 3), vec![1, 2, 0]);
        assert_eq!(reconnect_order(0, 1, 3), vec![2, 1, 0]);
        assert_eq!(reconnect_order(2, 0, 3), vec![0, 1, 2]);
        assert_eq!(reconnect_order(1, 7, 2), vec![0, 1]);
        assert_eq!(reconnect_order(0, 5, 1), vec![0]);
        // Every other node, once, whatever the index.
        for idx in 0..10 {
            let mut order = reconnect_order(3, idx, 5);
            assert_eq!(order.pop(), Some(3));
            order.sort_unstable();
            assert_eq!(order, vec![0, 1, 2, 4]);
        }
    }

    fn sub(reconnects: Vec<Reconnect>) -> Sub {
        Sub {
            plan: SubscriberPlan {
                node: 0,
                room: 4,
                wildcard: false,
                slow: false,
            },
            node: 1,
            subscribed: true,
            disconnected: true,
            streams: Vec::new(),
            reconnects,
        }
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_kill_explains_only_the_closes_while_its_edge_was_down() {
        let facts = FailoverFacts {
            edge_kills: vec![crate::wire::EdgeKillFact {
                node: 0,
                killed_ns: 10 * S,
                restarted_ns: 11 * S,
            }],
            segments: vec![KilledSegment {
                room: 4,
                start: 0,
                kill: 95,
                end: 100,
            }],
            publish_end_ns: 30 * S,
        };
        // Closed right after the kill, resubscribed 0.4 s later; deliveries 0..90 before, 120.. after.
        let mut stream = Stream::default();
        (0..90).for_each(|q| stream.observe(q));
        stream.reconnected(1);
        (120..200).for_each(|q| stream.observe(q));
        let killed = sub(vec![Reconnect {
            from_node: 0,
            closed_ns: 10 * S + 1_000,
            acked_ns: Some(10 * S + 400_000_000),
            first_delivery_ns: Some(10 * S + 450_000_000),
        }]);
        let mut report = FinalReport::default();
        let m = failover_missing(&killed, &stream, 200, &facts, &mut report);
        assert_eq!(
            m,
            Missing {
                reconnect_gap: 30,
                ..Missing::default()
            }
        );
        assert_eq!(report.resubscribes.len(), 1);
        assert_eq!(report.resubscribes[0].acked_after_us, Some(400_000));
        assert_eq!(
            report.resubscribes[0].first_delivery_after_us,
            Some(450_000)
        );
        assert_eq!((report.unexplained_reconnects, report.disconnected), (0, 0));

        // The same gap after a close on a node nobody killed, or long after the kill, is loss.
        for (from_node, closed_ns) in [(1, 10 * S + 1_000), (0, 20 * S)] {
            let odd = sub(vec![Reconnect {
                from_node,
                closed_ns,
                acked_ns: Some(closed_ns + 1_000),
                first_delivery_ns: None,
            }]);
            let mut report = FinalReport::default();
            let m = failover_missing(&odd, &stream, 200, &facts, &mut report);
            // Only 90..100, the killed publisher stream's messages after the last one this subscriber got through
            // it, are the kill's (in flight); the rest of the gap is loss.
            assert_eq!(
                m,
                Missing {
                    lost: 20,
                    reconnect_gap: 0,
                    in_flight: 10,
                    in_flight_before_kill: 5,
                },
                "{from_node} {closed_ns}"
            );
            assert_eq!((report.unexplained_reconnects, report.disconnected), (1, 1));
            assert!(report.resubscribes.is_empty());
        }
    }

    #[test]
    fn nothing_after_a_resubscribe_long_before_the_end_is_loss() {
        let facts = FailoverFacts {
            edge_kills: vec![crate::wire::EdgeKillFact {
                node: 0,
                killed_ns: 10 * S,
                restarted_ns: 11 * S,
            }],
            segments: Vec::new(),
            publish_end_ns: 30 * S,
        };
        let mut stream = Stream::default();
        (0..90).for_each(|q| stream.observe(q));
        stream.reconnected(1);
        let reconnect = |acked_ns| Reconnect {
            from_node: 0,
            closed_ns: 10 * S,
            acked_ns,
            first_delivery_ns: None,
        };
        let mut report = FinalReport::default();
        // Resubscribed at 10.5 s, nothing in the 19.5 s after: the edge it moved to is not delivering.
        let m = failover_missing(
            &sub(vec![reconnect(Some(10 * S + S / 2))]),
            &stream,
            200,
            &facts,
            &mut report,
        );
        assert_eq!(m.lost, 110);
        // Never resubscribed: the kill's cost (and a missing resubscribe in the figures).
        let m = failover_missing(
            &sub(vec![reconnect(None)]),
            &stream,
            200,
            &facts,
            &mut report,
        );
        assert_eq!(m.reconnect_gap, 110);
        assert_eq!(report.resubscribes[1].acked_after_us, None);
        // Resubscribed in the last second of publishing: nothing was due yet.
        let m = failover_missing(
            &sub(vec![reconnect(Some(29 * S + S / 2))]),
            &stream,
            200,
            &facts,
            &mut report,
        );
        assert_eq!(m.reconnect_gap, 110);
    }
}
