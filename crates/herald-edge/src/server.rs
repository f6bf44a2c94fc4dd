//! Running an edge: the shared [`State`], the listeners, and the drain.
//!
//! [`run`] takes bound listeners and a shutdown future (mini-redis's shape): `main` binds real ports, tests bind
//! `127.0.0.1:0`. When `shutdown` resolves, the edge drains:
//!
//! 1. `/readyz` answers 503 and new WebSocket upgrades are refused, while plain HTTP keeps being served so load
//!    balancers can see the node leave;
//! 2. after `shutdown.drain-delay-ms`, every socket is sent close 1001 (clients reconnect elsewhere);
//! 3. the edge waits for the sockets to finish, up to `shutdown.drain-timeout-ms`, and says so in the log when
//!    the deadline cut the drain short;
//! 4. the listeners stop and [`run`] returns.
//!
//! hyper's graceful shutdown does not see upgraded connections, so WebSocket tasks are tracked in a
//! [`TaskTracker`] of their own.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use herald_proto::v1::publisher_server::PublisherServer;

use crate::auth::{ApiKeys, AuthConfigError, Authorizer};
use crate::bridge::{self, Bridges, RegistryHandle};
use crate::config::Config;
use crate::grpc::PublisherService;
use crate::hub::{Hub, PublishOutcome, Target};
use crate::interest::InterestTracker;
use crate::metrics::Metrics;
use crate::peer::{Cluster, ClusterNode};
use crate::registry_link::RegistryLink;
use crate::trace::{destination_template, Operation, PublishTrace};

/// How long open gRPC streams get to finish after the listeners stop.
const GRPC_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a client may take to send an HTTP/1 request head (slowloris protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the request handlers share.
#[derive(Debug)]
pub struct State {
    pub(crate) config: Config,
    pub(crate) hub: Arc<Hub>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) authorizer: Authorizer,
    pub(crate) api_keys: ApiKeys,
    pub(crate) online_since: String,
    pub(crate) started: std::time::Instant,
    draining: AtomicBool,
    /// Cancelled when sockets should be sent 1001.
    pub(crate) going_away: CancellationToken,
    /// Cancelled by `herald ctl stop`: the node drains and exits as on SIGTERM.
    pub(crate) stop_requested: CancellationToken,
    /// Upgraded WebSocket connections, which hyper's graceful shutdown does not track.
    pub(crate) ws_tasks: TaskTracker,
    /// Set when this edge is a cluster member: publishes are also forwarded to the peer edges that want them.
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// Set when client RPC is configured.
    pub(crate) rpc: Option<Arc<crate::rpc::RpcClient>>,
    /// Routes and bridges.
    pub(crate) bridges: Arc<Bridges>,
}

impl State {
    fn new(
        config: Config,
        cluster: Option<Arc<Cluster>>,
        interest: Option<Arc<InterestTracker>>,
    ) -> Result<State, AuthConfigError> {
        // A cluster brings its metrics, which its peer links already count into.
        let metrics = cluster
            .as_ref()
            .map_or_else(|| Arc::new(Metrics::default()), |c| c.metrics().clone());
        let authorizer = Authorizer::from_config(&config.auth, config.dev)?;
        let api_keys = ApiKeys::new(&config.auth.api_keys, config.dev);
        let rpc = crate::rpc::RpcClient::from_config(&config)?.map(Arc::new);
        if matches!(authorizer, Authorizer::AllowAll) {
            tracing::warn!(
                "DEV MODE: no auth configured, every connection may subscribe to ANY room. \
                 Never expose this node to untrusted clients."
            );
        }
        if api_keys.is_open() {
            tracing::warn!(
                "DEV MODE: no API key configured, the publish APIs accept requests from ANYONE."
            );
        } else if config.auth.api_keys.is_empty() {
            tracing::warn!("no auth.api-keys configured: the publish APIs refuse every request");
        }
        let mut hub = Hub::new(
            metrics.clone(),
            config.limits.max_subscriptions_per_connection,
        );
        if let Some(tracker) = interest {
            hub = hub.with_interest_tracker(tracker);
        }
        Ok(State {
            hub: Arc::new(hub),
            metrics,
            authorizer,
            api_keys,
            online_since: rfc3339(SystemTime::now()),
            started: std::time::Instant::now(),
            draining: AtomicBool::new(false),
            going_away: CancellationToken::new(),
            stop_requested: CancellationToken::new(),
            ws_tasks: TaskTracker::new(),
            bridges: Arc::new(Bridges::new(
                config.limits.max_publish_body_bytes,
                config.limits.max_rooms_per_publish,
            )),
            config,
            cluster,
            rpc,
        })
    }

    /// Delivers a publish locally, then (in a cluster) queues it for the peer edges that want it, then hands it
    /// to the routes whose room pattern it matches. What every publish API and every bridge calls: this is
    /// where a message enters the cluster. None of the steps waits on a subscriber, a peer or a broker.
    ///
    /// It runs as part of `trace` (see [`crate::trace`]; [`PublishTrace::none`] for none): local delivery and
    /// the forward to peers are its child spans, and the forward and bridge envelopes carry its context on.
    pub(crate) fn publish_traced(
        &self,
        targets: &[Target],
        data: Bytes,
        trace: &PublishTrace,
    ) -> PublishOutcome {
        let template = if trace.span().is_none() {
            String::new()
        } else {
            let template = destination_template(targets);
            trace.destination(&template);
            template
        };
        let process = trace.child(Operation::Process, &template);
        let outcome = process.in_scope(|| self.hub.publish(targets, data.clone()));
        process.record(
            "herald.subscriptions_reached",
            outcome.subscriptions_reached,
        );
        drop(process);
        let forwarded_with = self.cluster.as_ref().and_then(|cluster| {
            let send = trace.child(Operation::Send, &template);
            let traceparent = trace.traceparent_from(&send);
            let peers = cluster.forward(targets, &data, traceparent.as_deref());
            send.record("herald.peers", peers);
            traceparent
        });
        // Bridges continue the forward's context, or the ingress span's on a single node; worked out only when a
        // room route matches.
        self.bridges.on_publish(self, targets, &data, || {
            forwarded_with.or_else(|| trace.traceparent_from(trace.span()))
        });
        outcome
    }

    /// Everything `/metrics` serves, in the Prometheus text format.
    pub(crate) fn render_metrics(&self) -> String {
        let mut text = self.metrics.render();
        self.bridges.render(&mut text);
        text
    }

    /// The drain without the exit (`herald ctl drain`): `/readyz` fails and upgrades are refused at once, and
    /// after `shutdown.drain-delay-ms` every socket is sent 1001. The process keeps serving the publish APIs,
    /// peers and the admin API; a later SIGTERM or `ctl stop` ends it. Returns false when already draining.
    pub(crate) fn drain_connections(&self) -> bool {
        if self.draining.swap(true, Ordering::Relaxed) {
            return false;
        }
        tracing::info!(
            connections = self.hub.connection_count(),
            "draining on an operator's request; the process stays up"
        );
        let delay = Duration::from_millis(self.config.shutdown.drain_delay_ms);
        let going_away = self.going_away.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            going_away.cancel();
        });
        true
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// The listeners an edge serves.
#[derive(Debug)]
pub struct Listeners {
    /// WebSocket + HTTP.
    pub http: TcpListener,
    /// gRPC publish API.
    pub grpc: TcpListener,
    /// The admin API, when enabled.
    pub admin: Option<TcpListener>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// WebSocket connections open when the drain began.
    pub connections_at_start: usize,
    /// Connections still open when the deadline ended the wait (0 when everyone left in time).
    pub cut_by_deadline: usize,
}

/// Serves a single-node edge on `listeners` until `shutdown` resolves, then drains (see the module docs).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<DrainReport, AuthConfigError> {
    run_with_cluster(config, listeners, None, shutdown).await
}

/// [`run`], optionally as a cluster member: with `cluster`, the edge also serves `PeerInternal` on its peer
/// listener and forwards publishes to the peer edges that want them. `None` is exactly [`run`].
pub async fn run_with_cluster(
    config: Config,
    listeners: Listeners,
    cluster: Option<ClusterNode>,
    shutdown: impl Future<Output = ()>,
) -> Result<DrainReport, AuthConfigError> {
    let drain_delay = Duration::from_millis(config.shutdown.drain_delay_ms);
    let drain_timeout = Duration::from_millis(config.shutdown.drain_timeout_ms);
    let max_grpc_message = config.limits.max_publish_body_bytes;
    let mut cluster = cluster;
    let registry = cluster.as_mut().and_then(|node| node.registry.take());
    let tracker = registry.as_ref().map(|_| Arc::new(InterestTracker::new()));
    let state = Arc::new(State::new(
        config,
        cluster.as_ref().map(|node| node.cluster.clone()),
        tracker.clone(),
    )?);
    // The same series as `/metrics`, pushed over OTLP when an endpoint is configured.
    let metrics_export = herald_telemetry::metrics::endpoint(&state.config.telemetry.otlp_endpoint)
        .map(|endpoint| {
            let rendered = state.clone();
            herald_telemetry::metrics::spawn_export(
                endpoint,
                herald_telemetry::metrics::interval(),
                state.config.telemetry.service_name.clone(),
                state.config.cluster.edge_id.clone(),
                move || rendered.render_metrics(),
            )
        });
    // Registration, keep-alives, interest updates and the watch that feeds the cluster view.
    let leave_registry = CancellationToken::new();
    let bridge_registry = registry.as_ref().map(|attachment| RegistryHandle {
        client: attachment.client.clone(),
        edge_id: attachment.identity.edge_id.clone(),
        lease_ttl: attachment.identity.lease_ttl,
    });
    let stop_bridges = CancellationToken::new();
    let bridges = tokio::spawn(bridge::run(
        state.clone(),
        bridge_registry,
        stop_bridges.clone(),
    ));
    if let (Some(attachment), Some(tracker), Some(node)) = (registry, tracker, cluster.as_ref()) {
        let link = RegistryLink {
            bridges: state.bridges.clone(),
            client: attachment.client,
            identity: attachment.identity,
            hub: state.hub.clone(),
            tracker,
            cluster: node.cluster.clone(),
        };
        tokio::spawn(link.run(leave_registry.clone()));
    }
    // Peers keep delivering to this edge's sockets until the end of the drain, like the publish APIs.
    let peer = cluster.map(|node| crate::peer::start(state.clone(), node));

    let stop_http = CancellationToken::new();
    let http = tokio::spawn(serve_http(state.clone(), listeners.http, stop_http.clone()));
    // The admin API answers until the very end, so an operator can watch the drain.
    let stop_admin = CancellationToken::new();
    if let Some(admin) = listeners.admin {
        tokio::spawn(crate::admin::serve(
            state.clone(),
            admin,
            stop_admin.clone(),
        ));
    }

    let stop_grpc = CancellationToken::new();
    let grpc_service = PublisherServer::new(PublisherService::new(state.clone()))
        .max_decoding_message_size(max_grpc_message);
    // `Server::tcp_nodelay` only applies to listeners tonic binds itself; an incoming stream carries its own.
    // Without it Nagle holds a response's trailers behind the client's delayed ACK (up to 40 ms).
    let grpc_incoming =
        tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
    let grpc_stop = stop_grpc.clone();
    let grpc = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(grpc_service)
            .serve_with_incoming_shutdown(grpc_incoming, grpc_stop.cancelled_owned())
            .await
    });

    tokio::select! {
        _ = shutdown => {}
        _ = state.stop_requested.cancelled() => {
            tracing::info!("stopping on an operator's request");
        }
    }
    let connections_at_start = state.hub.connection_count();
    tracing::info!(connections = connections_at_start, "draining");
    state.draining.store(true, Ordering::Relaxed);
    tokio::time::sleep(drain_delay).await;
    state.going_away.cancel();
    state.ws_tasks.close();
    let cut_by_deadline = match tokio::time::timeout(drain_timeout, state.ws_tasks.wait()).await {
        Ok(()) => 0,
        Err(_) => {
            let remaining = state.hub.connections();
            tracing::warn!(
                remaining = remaining.len(),
                deadline_ms = drain_timeout.as_millis() as u64,
                "drain deadline cut the drain short; closing the remaining connections"
            );
            for conn in &remaining {
                conn.outbound.killed().cancel();
            }
            remaining.len()
        }
    };

    // Sources stop before the lease lapses, so another edge can take them over without overlap.
    stop_bridges.cancel();
    let _ = bridges.await;
    // The lease lapses on its own; stopping the link just stops renewing it.
    leave_registry.cancel();
    stop_http.cancel();
    stop_grpc.cancel();
    let _ = http.await;
    // tonic's graceful shutdown waits for open streams; a backend holding a PublishStream open must not hold the
    // process hostage.
    let grpc_abort = grpc.abort_handle();
    match tokio::time::timeout(GRPC_SHUTDOWN_GRACE, grpc).await {
        Ok(Ok(Err(e))) => tracing::warn!(cause = %e, "grpc server ended with an error"),
        Ok(Err(e)) => tracing::warn!(cause = %e, "grpc server task failed"),
        Ok(Ok(Ok(()))) => {}
        Err(_) => {
            tracing::warn!("grpc streams still open after the grace period; closing them");
            grpc_abort.abort();
        }
    }
    if let Some(peer) = peer {
        peer.stop().await;
    }
    stop_admin.cancel();
    if let Some(export) = metrics_export {
        export.abort();
    }
    tracing::info!(connections_at_start, cut_by_deadline, "drained");
    Ok(DrainReport {
        connections_at_start,
        cut_by_deadline,
    })
}

async fn serve_http(state: Arc<State>, listener: TcpListener, stop: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Most often EMFILE: back off instead of spinning; existing clients are unaffected.
                    tracing::error!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |request| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(crate::http::route(state, request).await) }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(cause = %e, %peer, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP connections did not finish within 5 s of shutdown");
    }
}

/// Formats a time as RFC 3339 UTC with seconds (`2026-11-22T01:02:03Z`).
pub(crate) fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(1_795_309_323)), "2026-11-22T01:02:03Z");
    }
}
