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
use tokio::time::Instant;

use crate::driver::herald::HeraldDriver;
use crate::driver::peers::{NatsDriver, SockudoDriver};
use crate::driver::{Driver, Incoming, SubscriberClient};
use crate::payload::{now_ns, Header};
use crate::scenario::{Scenario, SubscriberPlan};
use crate::stats::{Latency, Stream};
use crate::wire::{Command, ConnectReport, Event, FinalReport, Plan, TargetKind, Tick};

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
}

struct Sub {
    plan: SubscriberPlan,
    subscribed: bool,
    disconnected: bool,
    /// (room << 32 | publisher) → stream; one entry in practice, since each room has one publisher.
    streams: Vec<(u64, Stream)>,
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
        if self.record_from_ns != 0 && h.intended_ns >= self.record_from_ns {
            let latency = now.saturating_sub(h.intended_ns);
            if usize::from(h.node) == sub.plan.node {
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
}

/// The longest a connect + subscribe may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A tokio `Instant` for a CLOCK_MONOTONIC timestamp (tokio's clock is CLOCK_MONOTONIC too).
fn instant_at(ns: u64) -> Instant {
    let now = now_ns();
    Instant::now() + Duration::from_nanos(ns.saturating_sub(now))
}

impl<D: Driver> Worker<D> {
    fn new(driver: D, plan: Plan, events: mpsc::UnboundedSender<Event>) -> Self {
        let range = plan.scenario.worker_range(plan.worker);
        let subs = range
            .map(|i| Sub {
                plan: plan.scenario.subscriber(i),
                subscribed: false,
                disconnected: false,
                streams: Vec::new(),
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
        loop {
            tokio::select! {
                line = lines.next_line() => {
                    let Some(line) = line? else {
                        bail!("the coordinator closed stdin before stop");
                    };
                    match serde_json::from_str::<Command>(&line).context("bad command line")? {
                        Command::Publishing { start_ns, record_from_ns } => {
                            let mut s = self.state.borrow_mut();
                            s.record_from_ns = record_from_ns.max(1);
                            s.slow_stop_ns = start_ns
                                + (self.plan.scenario.slow_consumers.stop_after_secs * 1e9) as u64;
                            drop(s);
                            if self.plan.scenario.churn.per_second > 0.0 {
                                tokio::task::spawn_local(self.churn());
                            }
                        }
                        Command::Stop { sent } => {
                            self.stop.notify_waiters();
                            let report = self.final_report(&sent);
                            let _ = self.events.send(Event::Final(report));
                            return Ok(());
                        }
                    }
                }
                _ = ticker.tick() => {
                    let mut s = self.state.borrow_mut();
                    let tick = Tick { delivered: s.interval_delivered, latency: s.interval.to_wire() };
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
            let sub_plan = self.state.borrow().subs[idx].plan;
            let addr = self.plan.nodes[sub_plan.node];
            tokio::task::spawn_local(connection(
                self.driver.clone(),
                self.state.clone(),
                self.progress.clone(),
                self.stop.clone(),
                idx,
                addr,
                self.plan.source,
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

    fn final_report(&self, sent: &[u64]) -> FinalReport {
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
        for sub in s.subs.iter().filter(|s| s.subscribed && !s.plan.slow) {
            if sub.disconnected {
                report.disconnected += 1;
            }
            let expected = sent.get(sub.plan.room as usize).copied().unwrap_or(0);
            let publisher = scenario.room_publisher(sub.plan.room) as u64;
            let key = (u64::from(sub.plan.room) << 32) | publisher;
            let distinct = sub
                .streams
                .iter()
                .find(|(k, _)| *k == key)
                .map_or(0, |(_, st)| st.distinct);
            let lost = expected.saturating_sub(distinct);
            report.lost += lost;
            if lost > 0 {
                report.streams_with_loss += 1;
            }
            for (_, st) in &sub.streams {
                report.duplicates += st.duplicates;
                report.reordered += st.reordered;
            }
        }
        report
    }
}

/// One stable subscriber: connect at `intended`, subscribe, then read until the connection ends.
#[allow(clippy::too_many_arguments)]
async fn connection<D: Driver>(
    driver: Rc<D>,
    state: Rc<RefCell<State>>,
    progress: Rc<Notify>,
    stop: Rc<Notify>,
    idx: usize,
    addr: SocketAddr,
    source: IpAddr,
    intended: u64,
) {
    tokio::time::sleep_until(instant_at(intended)).await;
    let plan = state.borrow().subs[idx].plan;
    let attempt = async {
        let mut client = driver.connect(addr, source).await?;
        let connected = now_ns();
        client.subscribe(plan.room, plan.wildcard).await?;
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
    loop {
        let incoming = client.recv().await;
        let stop_reading = {
            let mut s = state.borrow_mut();
            match incoming {
                Ok(Incoming::Payload(h)) => {
                    let now = now_ns();
                    s.on_payload(idx, h, now);
                    plan.slow && s.slow_stop_ns != 0 && now >= s.slow_stop_ns
                }
                Ok(Incoming::Other) => false,
                Ok(Incoming::Closed(code)) => {
                    s.on_close(code);
                    s.subs[idx].disconnected = true;
                    return;
                }
                Err(_) => {
                    s.on_close(None);
                    s.subs[idx].disconnected = true;
                    return;
                }
            }
        };
        if stop_reading {
            // A slow consumer: stop reading (the socket stays open) until the run ends.
            stop.notified().await;
            return;
        }
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
