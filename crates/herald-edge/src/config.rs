//! Configuration: `herald.yaml`, `HERALD_*` environment variables and flags, merged in that order of precedence
//! (flags > env > file > defaults).
//!
//! Every setting has a dotted key (`limits.max-message-bytes`), and its environment variable is derived from the
//! key: `HERALD_` + the key upper-cased with `.` and `-` turned into `_` (`HERALD_LIMITS_MAX_MESSAGE_BYTES`). The
//! layers are merged as JSON trees and then deserialized once with `deny_unknown_fields`, so a misspelt key in any
//! layer is an error that names it. Loading takes the environment as a map, so tests never touch the process
//! environment.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    /// Development mode (`herald dev`): without auth configured, every connection may subscribe to any room and
    /// the publish APIs are open, with a loud warning.
    pub dev: bool,
    /// Address the WebSocket + HTTP listener binds.
    pub server_host: String,
    /// Port of the WebSocket + HTTP listener (`/ws/`, `/trigger/`, `/api/v1/publish`, `/metrics`, ...).
    pub server_port: u16,
    /// Port of the gRPC publish API, on `server-host`.
    pub grpc_port: u16,
    /// Default log filter (`RUST_LOG` overrides it).
    pub log_level: String,
    /// `text` or `json`.
    pub log_format: String,
    /// How connections and backends are authorized.
    pub auth: AuthConfig,
    /// Limits on what clients and backends may send.
    pub limits: Limits,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Cluster membership: the registry to register with and the peer listener. Empty `registry`: single node.
    pub cluster: ClusterConfig,
    /// Client RPC to the backend.
    pub rpc: RpcConfig,
    /// The admin API (`herald ctl status`): its own listener, loopback by default.
    pub admin: AdminConfig,
    /// OpenTelemetry trace export (off unless an endpoint is set here or in `OTEL_EXPORTER_OTLP_*`).
    pub telemetry: TelemetryConfig,
    /// Bridge endpoints by name: rooms, Redis channels, AMQP exchanges, webhooks (see the README's "Routes and
    /// bridges"). Not settable from the environment: they are structured.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoints: BTreeMap<String, herald_routes::Endpoint>,
    /// Routes by name: each carries every message of one endpoint to others.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, herald_routes::Route>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dev: false,
            server_host: "127.0.0.1".into(),
            server_port: 7070,
            grpc_port: 7071,
            log_level: "info".into(),
            log_format: "text".into(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            shutdown: ShutdownConfig::default(),
            cluster: ClusterConfig::default(),
            rpc: RpcConfig::default(),
            admin: AdminConfig::default(),
            telemetry: TelemetryConfig::default(),
            endpoints: BTreeMap::new(),
            routes: BTreeMap::new(),
        }
    }
}

/// How an edge joins a cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Registry members (`host:port`). Empty: this edge runs alone.
    pub registry: Vec<String>,
    /// The cluster secret every internal call carries (required with `registry`).
    pub secret: String,
    /// This edge's id in the cluster; empty means `edge-<advertise-host>-<peer-port>`.
    pub edge_id: String,
    /// Port of the edge-to-edge peer listener, on `server-host`.
    pub peer_port: u16,
    /// The host other edges use to reach this one; empty means `server-host`.
    pub advertise_host: String,
    /// The edge's lease TTL at the registry; it renews every third of it.
    pub lease_ttl_ms: u64,
    /// How long interest changes may wait to be batched before they are sent to the registry.
    pub interest_flush_ms: u64,
    /// Forwards queued per peer edge before further ones are dropped (and counted).
    pub peer_queue: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            registry: vec![],
            secret: String::new(),
            edge_id: String::new(),
            peer_port: 7072,
            advertise_host: String::new(),
            lease_ttl_ms: 3_000,
            interest_flush_ms: 5,
            peer_queue: 10_000,
        }
    }
}

impl ClusterConfig {
    /// Whether this edge is part of a cluster.
    pub fn enabled(&self) -> bool {
        !self.registry.is_empty()
    }
}

/// The admin API's listener and credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Whether the admin listener runs.
    pub enabled: bool,
    /// Address it binds: loopback by default, since it can see and change the node.
    pub host: String,
    /// Its port (0: any free port, printed on the `herald listening` line).
    pub port: u16,
    /// The token `herald ctl` presents (`Authorization: Bearer`). Empty: every request is refused, except in dev
    /// mode where the (loopback) API is open.
    pub token: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            host: "127.0.0.1".into(),
            port: 7073,
            token: String::new(),
        }
    }
}

/// Where traces go. The standard `OTEL_*` environment variables win over these (see `herald_telemetry`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector endpoint, e.g. `http://127.0.0.1:4317`. Empty: no spans are built or exported.
    pub otlp_endpoint: String,
    /// `service.name` of exported spans (`OTEL_SERVICE_NAME` wins).
    pub service_name: String,
    /// Share of new traces sampled, 0.0 to 1.0; a trace continued from a caller follows the caller's decision.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: String::new(),
            service_name: "herald".into(),
            sample_ratio: 1.0,
        }
    }
}

/// Client RPC: `{"type":"rpc"}` frames the edge turns into POSTs to the backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RpcConfig {
    /// Where calls go (`{url}<method>`); empty means `{auth.api-url}rpc/`, and RPC is off when both are empty.
    pub url: String,
    /// How long the backend may take to answer one call.
    pub timeout_ms: u64,
    /// Calls one connection may have in flight; more are answered `rpc-busy`.
    pub max_in_flight_per_connection: usize,
    /// Calls the whole node may have in flight; more are answered `rpc-busy`.
    pub max_in_flight: usize,
    /// The largest backend answer relayed; larger is `rpc-failed`.
    pub max_response_bytes: usize,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            url: String::new(),
            timeout_ms: 10_000,
            max_in_flight_per_connection: 8,
            max_in_flight: 1_024,
            max_response_bytes: 1024 * 1024,
        }
    }
}

impl Config {
    /// The RPC root calls go to, if RPC is on: `rpc.url`, else `{auth.api-url}rpc/`.
    pub fn rpc_url(&self) -> Option<String> {
        if !self.rpc.url.is_empty() {
            Some(self.rpc.url.clone())
        } else if !self.auth.api_url.is_empty() {
            Some(format!("{}rpc/", self.auth.api_url))
        } else {
            None
        }
    }
}

/// Which authorization method connections go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// Ask the backend: `GET {api-url}bootstrap/` (High-templar).
    Bootstrap,
    /// A signed JWT in `?token=` or `Authorization: Bearer`.
    Jwt,
    /// Everyone gets `static-rooms`, no questions asked.
    Static,
}

/// Authorization of WebSocket connections and of the publish APIs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The method; when empty it is inferred: `bootstrap` if `api-url` is set, else `jwt` if a JWT key is set,
    /// else `static` if `static-rooms` is non-empty.
    pub method: Option<AuthMethod>,
    /// The backend's API root, ending in `/` (bootstrap calls `{api-url}bootstrap/`).
    pub api_url: String,
    /// How long a bootstrap call may take before the connection is refused.
    pub bootstrap_timeout_ms: u64,
    /// Extra request headers forwarded to the bootstrap call, besides High-templar's fixed set.
    pub forward_headers: Vec<String>,
    /// JWT verification keys.
    pub jwt: JwtConfig,
    /// Rooms every connection may subscribe to under the `static` method.
    pub static_rooms: Vec<Value>,
    /// RPC methods every connection may call under the `static` method (`*` for any).
    pub static_methods: Vec<String>,
    /// Keys that backends present to the publish APIs. Empty means the APIs refuse everyone (outside dev).
    pub api_keys: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            method: None,
            api_url: String::new(),
            bootstrap_timeout_ms: 5_000,
            forward_headers: vec![],
            jwt: JwtConfig::default(),
            static_rooms: vec![],
            static_methods: vec![],
            api_keys: vec![],
        }
    }
}

impl AuthConfig {
    /// The method in force: the configured one, or the inferred one.
    pub fn effective_method(&self) -> Option<AuthMethod> {
        self.method.or_else(|| {
            if !self.api_url.is_empty() {
                Some(AuthMethod::Bootstrap)
            } else if self.jwt.has_key() {
                Some(AuthMethod::Jwt)
            } else if !self.static_rooms.is_empty() {
                Some(AuthMethod::Static)
            } else {
                None
            }
        })
    }
}

/// Keys that verify connection tokens. Any subset may be set; the token's `alg` header picks one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Shared secret for HS256.
    pub hs256_secret: String,
    /// PEM public key for RS256.
    pub rs256_public_key: String,
    /// PEM public key for ES256.
    pub es256_public_key: String,
    /// Clock skew tolerated on `exp`, in seconds.
    pub leeway_secs: u64,
}

impl JwtConfig {
    /// Whether any key is configured.
    pub fn has_key(&self) -> bool {
        !self.hs256_secret.is_empty()
            || !self.rs256_public_key.is_empty()
            || !self.es256_public_key.is_empty()
    }
}

/// Limits, each with a safe default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Limits {
    /// Largest client message (after reassembling fragments); larger closes the connection with 1009.
    pub max_message_bytes: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions_per_connection: usize,
    /// Rooms (and other targets) one publish may name.
    pub max_rooms_per_publish: usize,
    /// Largest publish request body; larger is answered 413.
    pub max_publish_body_bytes: usize,
    /// Sustained client messages per second per connection (token bucket refill rate).
    pub inbound_messages_per_second: u32,
    /// Burst of client messages per connection (token bucket size).
    pub inbound_burst: u32,
    /// Frames one connection may have queued for sending before it counts as a slow consumer.
    pub outbound_queue_frames: usize,
    /// Bytes one connection may have queued for sending before it counts as a slow consumer.
    pub outbound_queue_bytes: usize,
    /// Seconds a connection may stay silent before it is closed. Pongs answering the server's pings are not the
    /// client speaking and do not count.
    pub idle_timeout_secs: u64,
    /// After writing deliveries to a connection, the writer appends a WebSocket ping when none was sent for this
    /// many milliseconds (0: off). With `pong-timeout-ms` it bounds how long a client that stops reading keeps
    /// its connection: at most their sum after it stopped.
    pub busy_ping_interval_ms: u64,
    /// Milliseconds between pings to a connection nothing is written to, to find dead peers (0: off).
    pub ping_interval_ms: u64,
    /// How long a ping may stay unanswered before the connection is closed: 4008 when deliveries waited behind
    /// it (slow consumer), else 4012 (no pong). Must be above 0 when either ping is on.
    pub pong_timeout_ms: u64,
    /// Allowed `Origin` values for WebSocket upgrades; empty allows any. An entry may start with `*.` after the
    /// scheme (`https://*.example.com`) to allow subdomains.
    pub allowed_origins: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            max_subscriptions_per_connection: 256,
            max_rooms_per_publish: 100,
            max_publish_body_bytes: 1024 * 1024,
            inbound_messages_per_second: 50,
            inbound_burst: 100,
            outbound_queue_frames: 4096,
            outbound_queue_bytes: 4 * 1024 * 1024,
            idle_timeout_secs: 300,
            // The target is a stopped reader disconnected within 5 s; detection takes at most the busy
            // interval (until the next ping goes out) plus the pong timeout (plus one write, tens of ms at a
            // modest rate). 1 s + 3 s leaves a second of margin for a loaded node's scheduling: 1 s + 4 s would be
            // the target exactly, and miss it by the write and the scheduling. A pong timeout of 3 s still lets a
            // client fall 3 s behind (or a mobile link stall that long) before it is dropped. One ping a second
            // per busy connection rides along in a write that happens anyway; only the pong costs a read.
            busy_ping_interval_ms: 1_000,
            // Centrifugo's default; idle connections cost one timer firing per interval.
            ping_interval_ms: 25_000,
            pong_timeout_ms: 3_000,
            allowed_origins: vec![],
        }
    }
}

/// Graceful shutdown on SIGTERM / SIGINT.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long to keep serving (with `/readyz` failing and new upgrades refused) before closing sockets, so
    /// load balancers stop routing here first.
    pub drain_delay_ms: u64,
    /// How long to wait for connections to close after sending them 1001 before exiting anyway.
    pub drain_timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_delay_ms: 0,
            drain_timeout_ms: 10_000,
        }
    }
}

/// What is wrong with a configuration. The binary prints it and exits 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {cause}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        cause: std::io::Error,
    },
    /// The file is not YAML, or its top level is not a mapping.
    #[error("config file {path} is not valid YAML: {cause}")]
    Yaml {
        /// The file.
        path: String,
        /// Why.
        cause: String,
    },
    /// A `--set key=value` flag without `=`.
    #[error("--set expects key=value, got {0:?}")]
    BadOverride(String),
    /// A value has the wrong type, or a key is unknown.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// One layer of overrides: dotted key -> raw string value (flags and `--set`).
pub type Overrides = BTreeMap<String, String>;

impl Config {
    /// Merges defaults, the YAML file (if any), the `HERALD_*` variables in `env`, and `overrides`, then checks
    /// the result.
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut tree = serde_json::to_value(Config::default()).expect("defaults serialize");
        let defaults = tree.clone();

        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
                path: path.display().to_string(),
                cause,
            })?;
            let layer: Value = serde_norway::from_str(&text).map_err(|e| ConfigError::Yaml {
                path: path.display().to_string(),
                cause: e.to_string(),
            })?;
            match layer {
                Value::Object(_) => merge(&mut tree, layer),
                // An empty file is an empty config.
                Value::Null => {}
                _ => {
                    return Err(ConfigError::Yaml {
                        path: path.display().to_string(),
                        cause: "the top level must be a mapping".into(),
                    })
                }
            }
        }

        for (key, default) in leaves(&defaults) {
            if let Some(raw) = env.get(&env_var(&key)) {
                set_path(&mut tree, &key, parse_raw(raw, default));
            }
        }

        for (key, raw) in overrides {
            let default = lookup(&defaults, key).unwrap_or(&Value::Null);
            set_path(&mut tree, key, parse_raw(raw, default));
        }

        let config: Config =
            serde_json::from_value(tree).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The `endpoints:` and `routes:` sections as a route table.
    pub fn route_table(&self) -> herald_routes::RouteTable {
        herald_routes::RouteTable {
            endpoints: self.endpoints.clone(),
            routes: self.routes.clone(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return invalid(format!(
                "log-format must be text or json, not {:?}",
                self.log_format
            ));
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return invalid(format!(
                "telemetry.sample-ratio must be between 0.0 and 1.0, not {}",
                self.telemetry.sample_ratio
            ));
        }
        let endpoint = &self.telemetry.otlp_endpoint;
        // No TLS client is built in: a collector is reached in plain text, typically a local agent or sidecar.
        if !endpoint.is_empty() && !endpoint.starts_with("http://") {
            return invalid(format!(
                "telemetry.otlp-endpoint must be an http:// URL (no TLS client is built in), not {endpoint:?}"
            ));
        }
        if !self.auth.api_url.is_empty() && !self.auth.api_url.starts_with("http://") {
            return invalid(format!(
                "auth.api-url must be an http:// URL, not {:?}",
                self.auth.api_url
            ));
        }
        match self.auth.effective_method() {
            Some(AuthMethod::Bootstrap) if self.auth.api_url.is_empty() => {
                return invalid("auth.method is bootstrap but auth.api-url is empty".into())
            }
            Some(AuthMethod::Jwt) if !self.auth.jwt.has_key() => {
                return invalid("auth.method is jwt but no auth.jwt key is set".into())
            }
            None if !self.dev => {
                return invalid(
                    "no auth method configured: set auth.api-url (bootstrap), an auth.jwt key, or \
                     auth.static-rooms; only `herald dev` runs without auth"
                        .into(),
                )
            }
            _ => {}
        }
        for (i, room) in self.auth.static_rooms.iter().enumerate() {
            if let Err(e) = herald_protocol::Room::from_json(room) {
                return invalid(format!("auth.static-rooms[{i}]: {e}"));
            }
        }
        if self.cluster.enabled() {
            if self.cluster.secret.len() < 16 {
                return invalid(
                    "cluster.secret must be set (at least 16 characters) when cluster.registry is"
                        .into(),
                );
            }
            for (i, addr) in self.cluster.registry.iter().enumerate() {
                if addr
                    .rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                {
                    return invalid(format!(
                        "cluster.registry[{i}] must be host:port, not {addr:?}"
                    ));
                }
            }
            if self.cluster.lease_ttl_ms < 300 {
                return invalid("cluster.lease-ttl-ms must be at least 300".into());
            }
            if self.cluster.peer_queue == 0 {
                return invalid("cluster.peer-queue must be greater than 0".into());
            }
        }
        let rpc_url_ok = self.rpc.url.starts_with("http://") && self.rpc.url.ends_with('/');
        if !self.rpc.url.is_empty() && !rpc_url_ok {
            return invalid(format!(
                "rpc.url must be an http:// URL ending in /, not {:?}",
                self.rpc.url
            ));
        }
        if let Err(e) = self.route_table().validate() {
            return invalid(format!("routes: {e}"));
        }
        for (i, method) in self.auth.static_methods.iter().enumerate() {
            if method != "*" && !herald_protocol::cmd::is_valid_method(method) {
                return invalid(format!(
                    "auth.static-methods[{i}]: {method:?} is not a method name (letters, digits, _ - ., at most \
                     {} bytes) or *",
                    herald_protocol::cmd::MAX_METHOD_LEN
                ));
            }
        }
        for (name, value) in [
            ("rpc.timeout-ms", self.rpc.timeout_ms as usize),
            (
                "rpc.max-in-flight-per-connection",
                self.rpc.max_in_flight_per_connection,
            ),
            ("rpc.max-in-flight", self.rpc.max_in_flight),
            ("rpc.max-response-bytes", self.rpc.max_response_bytes),
        ] {
            if value == 0 {
                return invalid(format!("{name} must be greater than 0"));
            }
        }
        if self.auth.api_keys.iter().any(String::is_empty) {
            return invalid("auth.api-keys must not contain an empty key".into());
        }
        let l = &self.limits;
        for (name, value) in [
            ("limits.max-message-bytes", l.max_message_bytes),
            (
                "limits.max-subscriptions-per-connection",
                l.max_subscriptions_per_connection,
            ),
            ("limits.max-rooms-per-publish", l.max_rooms_per_publish),
            ("limits.max-publish-body-bytes", l.max_publish_body_bytes),
            ("limits.outbound-queue-frames", l.outbound_queue_frames),
            ("limits.outbound-queue-bytes", l.outbound_queue_bytes),
            ("limits.inbound-burst", l.inbound_burst as usize),
            (
                "limits.inbound-messages-per-second",
                l.inbound_messages_per_second as usize,
            ),
            ("limits.idle-timeout-secs", l.idle_timeout_secs as usize),
        ] {
            if value == 0 {
                return invalid(format!("{name} must be greater than 0"));
            }
        }
        if (l.busy_ping_interval_ms > 0 || l.ping_interval_ms > 0) && l.pong_timeout_ms == 0 {
            return invalid(
                "limits.pong-timeout-ms must be greater than 0 while limits.busy-ping-interval-ms or \
                 limits.ping-interval-ms is (set both intervals to 0 to turn pings off)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Every setting as a row of the README's table (printed by `herald config`).
    pub fn reference() -> Vec<Setting> {
        let defaults = serde_json::to_value(Config::default()).expect("defaults serialize");
        leaves(&defaults)
            .into_iter()
            .map(|(key, default)| Setting {
                env: env_var(&key),
                default: default.to_string(),
                description: DESCRIPTIONS
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map_or("", |(_, d)| d),
                key,
            })
            .collect()
    }
}

/// One row of the configuration reference.
#[derive(Debug, Clone)]
pub struct Setting {
    /// Dotted key, as in `herald.yaml` and `--set`.
    pub key: String,
    /// The environment variable.
    pub env: String,
    /// The default, as JSON.
    pub default: String,
    /// What it does.
    pub description: &'static str,
}

/// One line per setting for the reference table; a unit test keeps it complete.
const DESCRIPTIONS: &[(&str, &str)] = &[
    ("telemetry.otlp-endpoint", "OTLP/gRPC collector for traces, e.g. `http://127.0.0.1:4317`; empty: tracing off (`OTEL_EXPORTER_OTLP_ENDPOINT` wins)."),
    ("telemetry.service-name", "`service.name` of exported spans (`OTEL_SERVICE_NAME` wins)."),
    ("telemetry.sample-ratio", "Share of new traces sampled (0.0-1.0); continued traces follow the caller's sampling decision."),
    ("admin.enabled", "Whether the admin API (`herald ctl status`) listens."),
    ("admin.host", "Address the admin API binds; keep it on loopback or a private network."),
    ("admin.port", "Port of the admin API (0: any free port)."),
    ("admin.token", "Bearer token the admin API requires. Empty: it refuses everyone, except in dev mode where it is open."),
    ("auth.api-keys", "Keys backends present to the publish APIs (`Authorization: Bearer` or `X-API-Key`). Empty: the APIs refuse everyone, except in dev mode where they are open."),
    ("auth.api-url", "Backend API root for High-templar bootstrap (`GET {api-url}bootstrap/`); `http://` only."),
    ("auth.bootstrap-timeout-ms", "How long a bootstrap call may take before the connection is refused."),
    ("auth.forward-headers", "Extra request headers forwarded to bootstrap, besides Cookie, User-Agent, X-Real-IP, X-CSRFToken and the `?token=` Authorization."),
    ("auth.jwt.es256-public-key", "PEM public key verifying ES256 tokens."),
    ("auth.jwt.hs256-secret", "Shared secret verifying HS256 tokens."),
    ("auth.jwt.leeway-secs", "Clock skew tolerated on `exp`."),
    ("auth.jwt.rs256-public-key", "PEM public key verifying RS256 tokens."),
    ("auth.method", "`bootstrap`, `jwt` or `static`; inferred from what is configured when empty. Outside dev mode one is required."),
    ("auth.static-methods", "RPC methods every connection may call under the `static` method (`*` for any). Bootstrap answers and JWTs list them in `allowed_methods`."),
    ("auth.static-rooms", "Rooms every connection may subscribe to under the `static` method."),
    ("cluster.advertise-host", "The host other edges use to reach this edge's peer listener; empty means `server-host`."),
    ("cluster.edge-id", "This edge's id in the cluster; empty means `edge-<advertise-host>-<peer-port>`."),
    ("cluster.interest-flush-ms", "How long room interest changes may wait to be batched into one registry update."),
    ("cluster.lease-ttl-ms", "The edge's lease at the registry; when it lapses the cluster forgets the edge and its interest."),
    ("cluster.peer-port", "Port of the internal edge-to-edge listener (forwarded publishes)."),
    ("cluster.peer-queue", "Publishes queued per peer edge before further ones to it are dropped and counted."),
    ("cluster.registry", "Registry members (`host:port`) to register with; empty runs this edge alone."),
    ("cluster.secret", "Shared secret every internal call carries (required with `cluster.registry`, 16+ characters)."),
    ("dev", "Development mode (`herald dev` sets it): no auth configured means every room is allowed and the publish APIs are open, with a loud warning."),
    ("grpc-port", "Port of the gRPC publish API (`herald.v1.Publisher`)."),
    ("limits.allowed-origins", "Allowed `Origin` values for WebSocket upgrades (`https://*.example.com` allows subdomains); empty allows any. Others get 403."),
    ("limits.busy-ping-interval-ms", "After writing deliveries, ping the client if no ping went out for this long (0: off). A client that stops reading is closed with 4008 within this plus `limits.pong-timeout-ms` (and one write) of stopping."),
    ("limits.idle-timeout-secs", "A connection that sends nothing for this long is closed (1000). Pongs to the server's pings do not count."),
    ("limits.inbound-burst", "Per-connection burst of client messages before `rate-limited` errors."),
    ("limits.inbound-messages-per-second", "Per-connection sustained client message rate."),
    ("limits.max-message-bytes", "Largest client message after reassembly; larger closes the connection with 1009."),
    ("limits.max-publish-body-bytes", "Largest publish request body (HTTP 413) or gRPC message (OUT_OF_RANGE)."),
    ("limits.max-rooms-per-publish", "Targets (rooms, users, connections) one publish may name."),
    ("limits.max-subscriptions-per-connection", "Subscriptions one connection may hold (`too-many-subscriptions`)."),
    ("limits.outbound-queue-bytes", "Bytes queued for one connection before it is closed as a slow consumer (4008)."),
    ("limits.outbound-queue-frames", "Frames queued for one connection before it is closed as a slow consumer (4008)."),
    ("limits.ping-interval-ms", "Ping a connection nothing is written to this often, to find dead peers (0: off)."),
    ("limits.pong-timeout-ms", "How long a ping may go unanswered: then the connection is closed with 4008 if deliveries waited behind the ping, else 4012. Must be above 0 while pings are on."),
    ("log-format", "`text` or `json`."),
    ("log-level", "Log filter, e.g. `info` or `herald_edge=debug` (`RUST_LOG` overrides it)."),
    ("rpc.max-in-flight", "RPC calls the node may have in flight; more are answered `rpc-busy`."),
    ("rpc.max-in-flight-per-connection", "RPC calls one connection may have in flight; more are answered `rpc-busy`."),
    ("rpc.max-response-bytes", "Largest backend answer to an RPC; larger is `rpc-failed`."),
    ("rpc.timeout-ms", "How long the backend may take to answer an RPC before the client gets `rpc-timeout`."),
    ("rpc.url", "Where client RPCs are POSTed (`{url}<method>`); empty means `{auth.api-url}rpc/`, and RPC is off when both are empty. `http://` only."),
    ("server-host", "Address both listeners bind."),
    ("server-port", "Port of the WebSocket + HTTP listener (`/ws/`, publish APIs, health, metrics, demo page)."),
    ("shutdown.drain-delay-ms", "On SIGTERM/SIGINT, how long `/readyz` fails (and new upgrades are refused) before sockets are closed with 1001."),
    ("shutdown.drain-timeout-ms", "How long the drain waits for sockets to close before cutting them off and exiting."),
];

/// `limits.max-message-bytes` -> `HERALD_LIMITS_MAX_MESSAGE_BYTES`.
pub fn env_var(key: &str) -> String {
    format!("HERALD_{}", key.to_uppercase().replace(['.', '-'], "_"))
}

fn leaves(tree: &Value) -> Vec<(String, &Value)> {
    fn walk<'a>(prefix: &str, value: &'a Value, out: &mut Vec<(String, &'a Value)>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => out.push((prefix.to_owned(), value)),
        }
    }
    let mut out = vec![];
    walk("", tree, &mut out);
    out
}

fn lookup<'a>(tree: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(tree, |node, part| node.get(part))
}

/// Strings stay strings (a secret of `123` is not a number); everything else is read as YAML, so `7070`, `true`
/// and `[a, b]` get their types, and a plain `a,b` for a list splits on commas.
fn parse_raw(raw: &str, default: &Value) -> Value {
    match default {
        Value::String(_) => Value::String(raw.to_owned()),
        Value::Array(_) => match serde_norway::from_str::<Value>(raw) {
            Ok(Value::Array(items)) => Value::Array(items),
            _ => Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_owned()))
                    .collect(),
            ),
        },
        _ => serde_norway::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned())),
    }
}

fn set_path(tree: &mut Value, key: &str, value: Value) {
    let mut node = tree;
    let parts: Vec<&str> = key.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        if !node.get(*part).is_some_and(Value::is_object) {
            node[*part] = Value::Object(Map::new());
        }
        node = node.get_mut(*part).expect("just inserted");
    }
    node[parts[parts.len() - 1]] = value;
}

fn merge(base: &mut Value, layer: Value) {
    match (base, layer) {
        (Value::Object(base), Value::Object(layer)) => {
            for (k, v) in layer {
                match base.get_mut(&k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        base.insert(k, v);
                    }
                }
            }
        }
        (base, layer) => *base = layer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::with(text)
    }

    /// A tiny temp-file helper so config tests read real files without another dependency.
    mod tempfile_path {
        use super::*;
        pub(super) struct TempPath(pub(super) std::path::PathBuf);
        impl TempPath {
            pub(super) fn with(text: &str) -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = std::env::temp_dir()
                    .join(format!("herald-config-{}-{n}.yaml", std::process::id()));
                std::fs::File::create(&path)
                    .unwrap()
                    .write_all(text.as_bytes())
                    .unwrap();
                TempPath(path)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn dev() -> Overrides {
        [("dev".to_string(), "true".to_string())].into()
    }

    #[test]
    fn precedence_is_flags_then_env_then_file_then_defaults() {
        let f = file("server-port: 1000\ngrpc-port: 1001\nlog-level: debug\ndev: true\n");
        let e = env(&[("HERALD_SERVER_PORT", "2000"), ("HERALD_GRPC_PORT", "2001")]);
        let o: Overrides = [("server-port".to_string(), "3000".to_string())].into();
        let c = Config::load(Some(&f.0), &e, &o).unwrap();
        assert_eq!(c.server_port, 3000, "flag beats env");
        assert_eq!(c.grpc_port, 2001, "env beats file");
        assert_eq!(c.log_level, "debug", "file beats default");
        assert_eq!(c.limits.idle_timeout_secs, 300, "default");
    }

    #[test]
    fn nested_keys_and_lists_come_from_env() {
        let e = env(&[
            ("HERALD_DEV", "true"),
            ("HERALD_LIMITS_MAX_MESSAGE_BYTES", "1024"),
            (
                "HERALD_LIMITS_ALLOWED_ORIGINS",
                "https://a.example, https://b.example",
            ),
            ("HERALD_AUTH_API_KEYS", "123"),
        ]);
        let c = Config::load(None, &e, &Overrides::new()).unwrap();
        assert_eq!(c.limits.max_message_bytes, 1024);
        assert_eq!(
            c.limits.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        assert_eq!(
            c.auth.api_keys,
            vec!["123"],
            "a numeric-looking key stays a string"
        );
    }

    #[test]
    fn unknown_keys_and_bad_types_are_named() {
        let f = file("dev: true\nlimits:\n  max-mesage-bytes: 5\n");
        let err = Config::load(Some(&f.0), &BTreeMap::new(), &Overrides::new()).unwrap_err();
        assert!(err.to_string().contains("max-mesage-bytes"), "{err}");

        let e = env(&[("HERALD_SERVER_PORT", "seventy")]);
        let err = Config::load(None, &e, &dev()).unwrap_err();
        assert!(err.to_string().contains("seventy"), "{err}");

        let f = file("- just\n- a list\n");
        let err = Config::load(Some(&f.0), &BTreeMap::new(), &dev()).unwrap_err();
        assert!(matches!(err, ConfigError::Yaml { .. }), "{err}");
    }

    #[test]
    fn outside_dev_an_auth_method_is_required() {
        let err = Config::load(None, &BTreeMap::new(), &Overrides::new()).unwrap_err();
        assert!(err.to_string().contains("no auth method"), "{err}");
        let e = env(&[("HERALD_AUTH_API_URL", "http://127.0.0.1:9/api/")]);
        let c = Config::load(None, &e, &Overrides::new()).unwrap();
        assert_eq!(c.auth.effective_method(), Some(AuthMethod::Bootstrap));
        let e = env(&[("HERALD_AUTH_METHOD", "jwt")]);
        let err = Config::load(None, &e, &Overrides::new()).unwrap_err();
        assert!(err.to_string().contains("no auth.jwt key"), "{err}");
    }

    #[test]
    fn zero_limits_and_bad_static_rooms_are_refused() {
        let o: Overrides = [
            ("dev".to_string(), "true".to_string()),
            ("limits.outbound-queue-bytes".to_string(), "0".to_string()),
        ]
        .into();
        let err = Config::load(None, &BTreeMap::new(), &o).unwrap_err();
        assert!(err.to_string().contains("outbound-queue-bytes"), "{err}");
        let f = file("auth:\n  static-rooms:\n    - {a: [1]}\n");
        let err = Config::load(Some(&f.0), &BTreeMap::new(), &Overrides::new()).unwrap_err();
        assert!(err.to_string().contains("static-rooms[0]"), "{err}");
    }

    #[test]
    fn pings_need_a_pong_timeout() {
        let o = |pairs: &[(&str, &str)]| -> Overrides {
            std::iter::once(("dev", "true"))
                .chain(pairs.iter().copied())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let err = Config::load(
            None,
            &BTreeMap::new(),
            &o(&[("limits.pong-timeout-ms", "0")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("limits.pong-timeout-ms"), "{err}");
        let err = Config::load(
            None,
            &BTreeMap::new(),
            &o(&[
                ("limits.pong-timeout-ms", "0"),
                ("limits.busy-ping-interval-ms", "0"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("limits.pong-timeout-ms"), "{err}");
        // With both pings off the timeout is unused, and 0 is fine.
        let c = Config::load(
            None,
            &BTreeMap::new(),
            &o(&[
                ("limits.pong-timeout-ms", "0"),
                ("limits.busy-ping-interval-ms", "0"),
                ("limits.ping-interval-ms", "0"),
            ]),
        )
        .unwrap();
        assert_eq!(c.limits.pong_timeout_ms, 0);
        let c = Config::load(None, &BTreeMap::new(), &o(&[])).unwrap();
        assert_eq!(
            (
                c.limits.busy_ping_interval_ms,
                c.limits.ping_interval_ms,
                c.limits.pong_timeout_ms
            ),
            (1_000, 25_000, 3_000)
        );
    }

    #[test]
    fn every_setting_has_an_env_var_and_a_description() {
        let reference = Config::reference();
        assert!(reference
            .iter()
            .any(|s| s.key == "limits.max-message-bytes"
                && s.env == "HERALD_LIMITS_MAX_MESSAGE_BYTES"));
        for setting in &reference {
            assert!(
                !setting.description.is_empty(),
                "{} has no description",
                setting.key
            );
        }
        assert_eq!(
            reference.len(),
            DESCRIPTIONS.len(),
            "a description names no setting"
        );
    }

    #[test]
    fn cluster_settings_are_checked() {
        let o = |pairs: &[(&str, &str)]| -> Overrides {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let err = Config::load(
            None,
            &BTreeMap::new(),
            &o(&[("dev", "true"), ("cluster.registry", "127.0.0.1:7081")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("cluster.secret"), "{err}");
        let err = Config::load(
            None,
            &BTreeMap::new(),
            &o(&[
                ("dev", "true"),
                ("cluster.registry", "nonsense"),
                ("cluster.secret", "0123456789abcdef"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("cluster.registry[0]"), "{err}");
        let c = Config::load(
            None,
            &BTreeMap::new(),
            &o(&[
                ("dev", "true"),
                ("cluster.registry", "127.0.0.1:7081,127.0.0.1:7082"),
                ("cluster.secret", "0123456789abcdef"),
            ]),
        )
        .unwrap();
        assert!(c.cluster.enabled());
        assert_eq!(c.cluster.registry.len(), 2);
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../herald.example.yaml"
        ));
        let c = Config::load(Some(path), &BTreeMap::new(), &Overrides::new()).unwrap();
        assert_eq!(c.auth.effective_method(), Some(AuthMethod::Bootstrap));
        assert_eq!(c.shutdown.drain_delay_ms, 5000);
    }

    /// The README's configuration table is the one `herald config` prints; this keeps the two the same.
    #[test]
    fn the_readme_lists_every_setting() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
                .expect("README.md");
        for setting in Config::reference() {
            let row = format!(
                "| `{}` | `{}` | `{}` | {} |",
                setting.key, setting.env, setting.default, setting.description
            );
            assert!(
                readme.contains(&row),
                "README.md lacks the row:\n{row}\n(run `herald config`)"
            );
        }
    }
}
