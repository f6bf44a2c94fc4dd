//! herald's edge: the node WebSocket clients connect to and backends publish through.
//!
//! # Layout
//! - [`server`]: [`server::run`] serves the listeners until shutdown, then drains.
//! - `admin`: the admin API (`herald ctl status`) on its own listener.
//! - [`bridge`]: routes and bridges (Redis, AMQP, webhooks), supervised.
//! - `http`: the HTTP routes (demo page, `/ws/`, `/trigger/`, `/api/v1/publish`, health, metrics).
//! - `ws`: the upgrade checks and each connection's reader.
//! - [`peer_queue`]: the bounded queue in front of each peer edge.
//! - [`peer`]: forwarding publishes edge to edge: the [`peer::Cluster`] handle, its links, the peer service.
//! - [`outbound`]: each connection's bounded send queue and its writer.
//! - [`liveness`]: the writer's pings and pong deadlines (slow consumers, dead peers).
//! - [`hub`]: connections, subscriptions and the publish fan-out.
//! - [`cluster_view`]: the local read replica of the registry that the publish path consults.
//! - [`interest`]: batching the hub's room interest transitions for the cluster registry.
//! - [`auth`]: bootstrap, JWT and static authorization; API keys.
//! - [`grpc`]: the `herald.v1.Publisher` service.
//! - [`registry_link`]: registration, lease, interest updates and the watch, against the registry.
//! - [`publish`]: what the publish APIs share.
//! - [`config`]: `herald.yaml`, `HERALD_*` and flags.
//! - [`metrics`]: Prometheus counters.

mod admin;
pub mod auth;
pub mod bridge;
pub mod cluster_view;
pub mod config;
pub mod grpc;
mod http;
pub mod hub;
pub mod interest;
pub mod liveness;
pub mod metrics;
pub mod outbound;
pub mod peer;
pub mod peer_queue;
pub mod publish;
pub mod registry_link;
mod rpc;
pub mod server;
mod trace;
mod ws;

pub use config::Config;
pub use peer::{Cluster, ClusterNode};
pub use server::{run, run_with_cluster, DrainReport, Listeners};
