//! `herald ctl`: operate a running cluster by talking to its registry members.
//!
//! - `herald ctl cluster status`: leader, term, revision, members with their replication lag, registered edges.
//! - `herald ctl cluster add-learner --node-id N --addr host:port`: a new member starts receiving the log.
//! - `herald ctl cluster promote --node-id N`: a caught-up learner becomes a voter.
//! - `herald ctl cluster remove --node-id N`: a voter or a learner leaves the cluster.
//! - `herald ctl round-trip --edge host:port`: subscribe, publish, and see the delivery arrive ([`round_trip`];
//!   the Helm chart's `helm test`).
//!
//! Membership changes are computed from the status the leader reports (the voter set is replaced as a whole, so
//! it has to start from the current one), and checked before anything is written: a change that would leave the
//! cluster without a voter is refused, and one that costs fault tolerance needs `--force`.
//!
//! Exit codes follow sysexits.h so scripts can tell failures apart: 64 bad arguments or a refused change,
//! 69 no registry member reachable, 77 the cluster secret was refused, 70 anything else the registry refused.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tonic::Code;

use herald_proto::v1 as pb;
use herald_registry::client::{ClientError, RegistryClient};
use herald_registry::grpc::ClusterSecret;

mod round_trip;

/// EX_USAGE: bad arguments, or a change refused by the safety checks.
const EXIT_USAGE: u8 = 64;
/// EX_SOFTWARE: the registry refused the call for another reason, or answered something unreadable.
const EXIT_SOFTWARE: u8 = 70;
/// EX_UNAVAILABLE: no registry member could be reached.
const EXIT_UNAVAILABLE: u8 = 69;
/// EX_NOPERM: the registry refused the cluster secret.
const EXIT_NOPERM: u8 = 77;
/// EX_NOINPUT: what the command names does not exist on the node (`disconnect` matched no connection).
const EXIT_NOINPUT: u8 = 66;

/// How long one ctl call keeps trying members. Shorter than the client's default (made for edges riding out
/// elections in the background): an operator waiting at a prompt wants "unreachable" quickly, and a few seconds
/// still covers an election.
const RETRY_BUDGET: Duration = Duration::from_secs(5);

/// A learner whose lag is above this many log entries is not promoted without `--force`.
const DEFAULT_MAX_LAG: u64 = 100;

#[derive(Debug, Args)]
pub(crate) struct CtlArgs {
    /// Registry members to talk to, `host:port,...`; any reachable one will do.
    // Optional for clap (global arguments cannot be required) and checked in `run`, so a missing value exits 64.
    #[arg(
        long,
        global = true,
        env = "HERALD_CTL_REGISTRY",
        value_delimiter = ',',
        value_name = "HOST:PORT,..."
    )]
    registry: Vec<String>,
    /// The cluster secret the registry members were started with.
    #[arg(
        long,
        global = true,
        env = "HERALD_CLUSTER_SECRET",
        hide_env_values = true
    )]
    cluster_secret: Option<String>,
    /// A node's admin API (`herald ctl status`).
    #[arg(
        long,
        global = true,
        env = "HERALD_CTL_ADMIN",
        default_value = "127.0.0.1:7073",
        value_name = "HOST:PORT"
    )]
    admin: String,
    /// The node's `admin.token`.
    #[arg(
        long,
        global = true,
        env = "HERALD_ADMIN_TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Tables for people.
    Text,
    /// One JSON document on stdout, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// One node, through its admin API (`--admin`): role, uptime, connections, rooms, and its bridges (each
    /// supervised task with its restarts and last error, and who consumes each source).
    Status,
    /// The node's WebSocket connections, a page at a time (`--after` the last id shown), in id order.
    Connections {
        /// Only this user's connections.
        #[arg(long)]
        user: Option<String>,
        /// Only connections subscribed to a room matching this pattern (JSON, e.g. '{"board":"*"}').
        #[arg(long)]
        room: Option<String>,
        /// Connections per page (the node caps it at 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this connection id (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Every page, not just one.
        #[arg(long)]
        all: bool,
    },
    /// The node's subscribed rooms with their local subscription counts, a page at a time.
    Rooms {
        /// Only rooms whose canonical JSON starts with this text (e.g. '{"board":').
        #[arg(long)]
        prefix: Option<String>,
        /// Rooms per page (the node caps it at 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this room (canonical JSON, the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Every page, not just one.
        #[arg(long)]
        all: bool,
    },
    /// Close one connection, or every connection of a user, with close code 4010.
    Disconnect {
        /// The connection id (as `ctl connections` shows it).
        #[arg(required_unless_present = "user", conflicts_with = "user")]
        connection: Option<String>,
        /// Every connection of this user instead.
        #[arg(long)]
        user: Option<String>,
    },
    /// The SIGTERM drain without exiting: /readyz fails and new upgrades are refused at once, and after
    /// `shutdown.drain-delay-ms` every socket is sent 1001 so clients move to another node.
    Drain,
    /// Drain, then exit 0 (as SIGTERM does).
    Stop,
    /// End-to-end check: subscribe over a WebSocket, publish to the room over HTTP (and gRPC with `--grpc`), and
    /// exit 0 only when each publish is delivered on the subscription.
    RoundTrip(round_trip::RoundTripArgs),
    /// The registry's raft group: status and membership changes.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The bridges' route table: the registry's with `--registry` (every edge follows it), else the table of the
    /// node at `--admin`.
    #[command(subcommand)]
    Routes(RoutesCommand),
}

#[derive(Debug, Subcommand)]
enum RoutesCommand {
    /// Endpoints, routes, and which edge consumes each external source.
    List,
    /// Add or replace an endpoint, given as JSON (`{"kind": "redis", "url": ..., "channel": ...}`; the same
    /// fields as under `endpoints:` in herald.yaml).
    PutEndpoint {
        /// The endpoint's name.
        name: String,
        /// Its definition, as JSON.
        definition: String,
    },
    /// Remove an endpoint no route uses.
    DeleteEndpoint {
        /// The endpoint's name.
        name: String,
    },
    /// Add or replace a route from one endpoint to others.
    Add {
        /// The route's name.
        name: String,
        /// The source endpoint.
        #[arg(long)]
        from: String,
        /// The destination endpoints.
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<String>,
    },
    /// Remove a route.
    Remove {
        /// The route's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Leader, term, revision, members (voter or learner, lag) and registered edges.
    Status,
    /// Add a started registry member as a learner: it receives the log but does not vote yet.
    AddLearner {
        /// The new member's node id (the `--node-id` it was started with).
        #[arg(long)]
        node_id: u64,
        /// The address the other members reach it at.
        #[arg(long)]
        addr: String,
    },
    /// Make a caught-up learner a voter.
    Promote {
        /// The learner's node id.
        #[arg(long)]
        node_id: u64,
        /// The largest replication lag (log entries) accepted without `--force`.
        #[arg(long, default_value_t = DEFAULT_MAX_LAG)]
        max_lag: u64,
        /// Promote even when the learner's lag is unknown or above `--max-lag`.
        #[arg(long)]
        force: bool,
    },
    /// Remove a voter or a learner from the cluster.
    Remove {
        /// The member's node id.
        #[arg(long)]
        node_id: u64,
        /// Remove even when the cluster loses fault tolerance (e.g. 3 voters to 2).
        #[arg(long)]
        force: bool,
    },
}

/// Why a ctl command failed: the message for stderr and the exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
}

/// The registry's reason for refusing a change, without the transport's wrapping.
fn refusal(e: &ClientError) -> String {
    match e {
        ClientError::Status(status) => status.message().to_owned(),
        other => other.to_string(),
    }
}

/// Runs `herald ctl ...` to completion.
pub(crate) fn run(args: CtlArgs) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(execute(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("herald ctl: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn execute(args: &CtlArgs) -> Result<(), Failure> {
    match &args.command {
        CtlCommand::Status => return node_status(args).await,
        CtlCommand::Connections {
            user,
            room,
            limit,
            after,
            all,
        } => {
            let filters = [("user", user.as_deref()), ("room", room.as_deref())];
            return listing(
                args,
                "connections",
                &filters,
                *limit,
                after.as_deref(),
                *all,
            )
            .await;
        }
        CtlCommand::Rooms {
            prefix,
            limit,
            after,
            all,
        } => {
            let filters = [("prefix", prefix.as_deref())];
            return listing(args, "rooms", &filters, *limit, after.as_deref(), *all).await;
        }
        CtlCommand::Disconnect { connection, user } => {
            let body = match (connection, user) {
                (Some(id), _) => json!({ "connection": id }),
                (None, Some(user)) => json!({ "user": user }),
                (None, None) => return Err(Failure::usage("name a connection or --user")),
            };
            let doc = admin_call(args, "POST", "/admin/disconnect", &body.to_string()).await?;
            return print_doc(args, &doc, |doc| {
                format!("closed {} connection(s)\n", doc["closed"])
            });
        }
        CtlCommand::Drain => {
            let doc = admin_call(args, "POST", "/admin/drain", "").await?;
            return print_doc(args, &doc, |doc| {
                if doc["already_draining"] == true {
                    "already draining\n".to_owned()
                } else {
                    format!(
                        "draining: /readyz fails now; {} connection(s) get 1001 in {} ms; the process stays up\n",
                        doc["connections"], doc["close_after_ms"]
                    )
                }
            });
        }
        CtlCommand::RoundTrip(round_trip) => return round_trip::run(round_trip, args.output).await,
        CtlCommand::Stop => {
            let doc = admin_call(args, "POST", "/admin/stop", "").await?;
            return print_doc(args, &doc, |doc| {
                format!(
                    "stopping: draining {} connection(s), then exiting\n",
                    doc["connections"]
                )
            });
        }
        _ => {}
    }
    // Routes without a registry: the node's own table, through its admin API.
    if let (CtlCommand::Routes(command), true) = (&args.command, args.registry.is_empty()) {
        return admin_routes(args, command).await;
    }
    let client = connect(args)?;
    let ctl = Ctl {
        client,
        output: args.output,
    };
    match &args.command {
        CtlCommand::Cluster(ClusterCommand::Status) => ctl.status().await,
        CtlCommand::Cluster(ClusterCommand::AddLearner { node_id, addr }) => {
            ctl.add_learner(*node_id, addr).await
        }
        CtlCommand::Cluster(ClusterCommand::Promote {
            node_id,
            max_lag,
            force,
        }) => ctl.promote(*node_id, *max_lag, *force).await,
        CtlCommand::Cluster(ClusterCommand::Remove { node_id, force }) => {
            ctl.remove(*node_id, *force).await
        }
        CtlCommand::Routes(command) => ctl.routes(command).await,
        CtlCommand::Status
        | CtlCommand::Connections { .. }
        | CtlCommand::Rooms { .. }
        | CtlCommand::Disconnect { .. }
        | CtlCommand::Drain
        | CtlCommand::Stop
        | CtlCommand::RoundTrip(_) => unreachable!("answered above"),
    }
}

/// `herald ctl status`: `GET /admin/status` on the node's admin API.
async fn node_status(args: &CtlArgs) -> Result<(), Failure> {
    let doc = admin_call(args, "GET", "/admin/status", "").await?;
    match args.output {
        Output::Json => println!("{doc:#}"),
        Output::Text => print!("{}", node_status_text(&doc)),
    }
    Ok(())
}

fn node_status_text(doc: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "role {}  edge {}  up {} s (since {}){}",
        doc["role"].as_str().unwrap_or("?"),
        doc["edge_id"].as_str().unwrap_or("-"),
        doc["uptime_secs"],
        doc["online_since"].as_str().unwrap_or("?"),
        if doc["draining"] == true {
            "  DRAINING"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "connections {}  subscriptions {}  rooms {}",
        doc["connections"], doc["subscriptions"], doc["rooms"]
    );
    if let Some(peers) = doc["peers"]["edges"].as_array() {
        let names: Vec<&str> = peers.iter().filter_map(|p| p["edge"].as_str()).collect();
        let _ = writeln!(
            out,
            "peers {} ({})  links {}  queued forwards {}  forward drops {}",
            names.len(),
            if names.is_empty() {
                "-".to_owned()
            } else {
                names.join(", ")
            },
            doc["peers"]["links"],
            doc["peers"]["queue_depth"],
            doc["peers"]["forward_drops"]
        );
    }
    if let Some(members) = doc["registry"]["members"].as_array() {
        let members: Vec<&str> = members.iter().filter_map(|m| m.as_str()).collect();
        let _ = writeln!(
            out,
            "registry {}  replica revision {}",
            members.join(","),
            doc["registry"]["replica_revision"]
        );
    }
    let tasks = doc["bridges"]["tasks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !tasks.is_empty() {
        let _ = writeln!(out, "\nBRIDGE TASK\tUP\tRESTARTS\tLAST ERROR");
        for task in &tasks {
            let _ = writeln!(
                out,
                "{}\t{}\t{}\t{}",
                task["task"].as_str().unwrap_or("?"),
                if task["up"] == true { "yes" } else { "no" },
                task["restarts"],
                task["last_error"].as_str().unwrap_or("-")
            );
        }
    }
    if let Some(owners) = doc["bridges"]["source_owners"].as_object() {
        if !owners.is_empty() {
            let _ = writeln!(out, "\nSOURCE (ROUTE)\tCONSUMED BY");
            for (route, owner) in owners {
                let _ = writeln!(out, "{route}\t{}", owner.as_str().unwrap_or("?"));
            }
        }
    }
    out
}

/// Prints an admin answer as JSON or as `text(doc)`.
fn print_doc(args: &CtlArgs, doc: &Value, text: impl Fn(&Value) -> String) -> Result<(), Failure> {
    match args.output {
        Output::Json => println!("{doc:#}"),
        Output::Text => print!("{}", text(doc)),
    }
    Ok(())
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// `herald ctl connections` and `ctl rooms`: one page of `GET /admin/<what>`, or every page with `all`.
async fn listing(
    args: &CtlArgs,
    what: &str,
    filters: &[(&str, Option<&str>)],
    limit: usize,
    after: Option<&str>,
    all: bool,
) -> Result<(), Failure> {
    if limit == 0 {
        return Err(Failure::usage("--limit must be at least 1"));
    }
    let mut after = after.map(str::to_owned);
    let mut items = Vec::new();
    let (matched, next) = loop {
        let mut path = format!("/admin/{what}?limit={limit}");
        for (key, value) in filters {
            if let Some(value) = value {
                path.push_str(&format!("&{key}={}", encode(value)));
            }
        }
        if let Some(after) = &after {
            path.push_str(&format!("&after={}", encode(after)));
        }
        let doc = admin_call(args, "GET", &path, "").await?;
        items.extend(doc[what].as_array().cloned().unwrap_or_default());
        let next = doc["next"].as_str().map(str::to_owned);
        if !all || next.is_none() {
            break (doc["matched"].clone(), next);
        }
        after = next;
    };
    if args.output == Output::Json {
        println!(
            "{:#}",
            json!({ what: items, "matched": matched, "next": next })
        );
        return Ok(());
    }
    let mut out = String::new();
    if what == "connections" {
        let _ = writeln!(out, "ID\tUSER\tSUBSCRIPTIONS\tQUEUED FRAMES");
        for c in &items {
            let _ = writeln!(
                out,
                "{}\t{}\t{}\t{}",
                c["id"].as_str().unwrap_or("?"),
                c["user"].as_str().unwrap_or("-"),
                c["subscriptions"],
                c["queued_frames"]
            );
        }
    } else {
        let _ = writeln!(out, "ROOM\tSUBSCRIPTIONS");
        for r in &items {
            let _ = writeln!(out, "{}\t{}", r["room"], r["subscriptions"]);
        }
    }
    let _ = writeln!(out, "{} shown of {matched} matching", items.len());
    if let Some(next) = next {
        let _ = writeln!(out, "more: --after '{next}'");
    }
    print!("{out}");
    Ok(())
}

/// Calls the admin API and turns its answer into the document or a failure with the right exit code.
async fn admin_call(
    args: &CtlArgs,
    method: &str,
    path: &str,
    body: &str,
) -> Result<Value, Failure> {
    let (code, text) =
        admin_request(&args.admin, args.admin_token.as_deref(), method, path, body).await?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| Failure {
        code: EXIT_SOFTWARE,
        message: format!("the admin API answered something unreadable ({e}): {text}"),
    })?;
    let reason = doc["error"].as_str().unwrap_or("").to_owned();
    match code {
        200 => Ok(doc),
        401 => Err(Failure {
            code: EXIT_NOPERM,
            message: format!(
                "the node refused the admin token ({reason}); pass --admin-token or set HERALD_ADMIN_TOKEN"
            ),
        }),
        400 | 409 => Err(Failure::usage(reason)),
        404 => Err(Failure {
            code: EXIT_NOINPUT,
            message: reason,
        }),
        503 => Err(Failure {
            code: EXIT_UNAVAILABLE,
            message: reason,
        }),
        other => Err(Failure {
            code: EXIT_SOFTWARE,
            message: format!("the admin API answered {other}: {text}"),
        }),
    }
}

/// `herald ctl routes ...` against one node's admin API (a node without a registry changes its own table; in a
/// cluster the node passes the change to the registry).
async fn admin_routes(args: &CtlArgs, command: &RoutesCommand) -> Result<(), Failure> {
    let (method, path, body) = match command {
        RoutesCommand::List => {
            let doc = admin_call(args, "GET", "/admin/routes", "").await?;
            println!("{doc:#}");
            return Ok(());
        }
        RoutesCommand::PutEndpoint { name, definition } => (
            "PUT",
            format!("/admin/endpoints/{name}"),
            definition.clone(),
        ),
        RoutesCommand::DeleteEndpoint { name } => {
            ("DELETE", format!("/admin/endpoints/{name}"), String::new())
        }
        RoutesCommand::Add { name, from, to } => {
            let route = herald_routes::Route {
                from: from.clone(),
                to: to.clone(),
            };
            let json = serde_json::to_string(&route).expect("routes serialize");
            ("PUT", format!("/admin/routes/{name}"), json)
        }
        RoutesCommand::Remove { name } => {
            ("DELETE", format!("/admin/routes/{name}"), String::new())
        }
    };
    for name in path.rsplit('/').take(1) {
        herald_routes::validate_name("route or endpoint", name)
            .map_err(|e| Failure::usage(e.to_string()))?;
    }
    let doc = admin_call(args, method, &path, &body).await?;
    match args.output {
        Output::Json => println!("{doc:#}"),
        Output::Text => println!(
            "{method} {path}: {}",
            if doc["changed"] == true {
                "changed"
            } else {
                "no change"
            }
        ),
    }
    Ok(())
}

/// One HTTP/1.1 request to the admin API: (status, body). Plain and small on purpose: the admin API is on loopback
/// or a private network, and ctl should not need an HTTP stack to read one JSON document.
async fn admin_request(
    addr: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), Failure> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let unreachable = |e: String| Failure {
        code: EXIT_UNAVAILABLE,
        message: format!("the node's admin API at {addr} is unreachable: {e}"),
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
        let request =
            format!(
                "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut response = Vec::new();
        stream
            .take(16 * 1024 * 1024)
            .read_to_end(&mut response)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok::<_, Failure>(response)
    };
    let response = tokio::time::timeout(RETRY_BUDGET, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {RETRY_BUDGET:?}")))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Failure {
            code: EXIT_SOFTWARE,
            message: format!("{addr} did not answer HTTP"),
        })?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((code, body))
}

/// Joins an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

fn connect(args: &CtlArgs) -> Result<RegistryClient, Failure> {
    let addrs: Vec<String> = args
        .registry
        .iter()
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect();
    if addrs.is_empty() {
        return Err(Failure::usage(
            "no registry member given: pass --registry host:port,... or set HERALD_CTL_REGISTRY",
        ));
    }
    let secret = args.cluster_secret.as_deref().ok_or_else(|| {
        Failure::usage(
            "no cluster secret given: pass --cluster-secret or set HERALD_CLUSTER_SECRET",
        )
    })?;
    let secret =
        ClusterSecret::new(secret).map_err(|e| Failure::usage(format!("--cluster-secret: {e}")))?;
    let client = RegistryClient::new(addrs, secret)
        .map_err(|e| Failure::usage(format!("--registry: {e}")))?;
    Ok(client.with_retry_budget(RETRY_BUDGET))
}

struct Ctl {
    client: RegistryClient,
    output: Output,
}

impl Ctl {
    /// Turns a client error into the message and exit code an operator can act on.
    fn failure(&self, e: ClientError) -> Failure {
        let tried = self.client.members().join(", ");
        match e.code() {
            Code::Unauthenticated => Failure {
                code: EXIT_NOPERM,
                message: format!(
                    "the registry refused the cluster secret (check --cluster-secret / HERALD_CLUSTER_SECRET; \
                     tried {tried})"
                ),
            },
            Code::Unavailable | Code::DeadlineExceeded => Failure {
                code: EXIT_UNAVAILABLE,
                message: format!("no registry member reachable (tried {tried}): {e}"),
            },
            Code::InvalidArgument | Code::FailedPrecondition => Failure::usage(refusal(&e)),
            _ => Failure {
                code: EXIT_SOFTWARE,
                message: e.to_string(),
            },
        }
    }

    /// `herald ctl routes ...`. Definitions are checked here first (the same checks the registry applies), so a
    /// typo is refused with the reason before anything is sent; the registry checks the whole table again.
    async fn routes(&self, command: &RoutesCommand) -> Result<(), Failure> {
        let failure = |e: ClientError| self.failure(e);
        match command {
            RoutesCommand::List => {
                let reply = self.client.list_routes().await.map_err(failure)?;
                let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
                let owners: serde_json::Map<String, Value> = reply
                    .sources
                    .iter()
                    .map(|s| (s.route.clone(), Value::from(s.edge.clone())))
                    .collect();
                let doc = json!({
                    "revision": reply.revision,
                    "endpoints": reply.endpoints.iter().map(|e| (e.name.clone(), parse(&e.endpoint_json))).collect::<serde_json::Map<_, _>>(),
                    "routes": reply.routes.iter().map(|r| (r.name.clone(), parse(&r.route_json))).collect::<serde_json::Map<_, _>>(),
                    "sources": owners,
                });
                match self.output {
                    Output::Json => println!("{doc:#}"),
                    Output::Text => {
                        let mut out = String::new();
                        let _ = writeln!(out, "ENDPOINT\tKIND\tDEFINITION");
                        for e in &reply.endpoints {
                            let def = parse(&e.endpoint_json);
                            let _ = writeln!(
                                out,
                                "{}\t{}\t{}",
                                e.name,
                                def["kind"].as_str().unwrap_or("?"),
                                def
                            );
                        }
                        let _ = writeln!(out, "\nROUTE\tFROM\tTO\tCONSUMED BY");
                        for r in &reply.routes {
                            let def = parse(&r.route_json);
                            let to: Vec<&str> = def["to"]
                                .as_array()
                                .map(|a| a.iter().filter_map(Value::as_str).collect())
                                .unwrap_or_default();
                            let owner = owners.get(&r.name).and_then(Value::as_str).unwrap_or("-");
                            let _ = writeln!(
                                out,
                                "{}\t{}\t{}\t{owner}",
                                r.name,
                                def["from"].as_str().unwrap_or("?"),
                                to.join(",")
                            );
                        }
                        print!("{out}");
                    }
                }
                Ok(())
            }
            RoutesCommand::PutEndpoint { name, definition } => {
                herald_routes::validate_name("endpoint", name)
                    .map_err(|e| Failure::usage(e.to_string()))?;
                let endpoint: herald_routes::Endpoint = serde_json::from_str(definition)
                    .map_err(|e| Failure::usage(format!("endpoint {name:?}: {e}")))?;
                endpoint
                    .validate()
                    .map_err(|e| Failure::usage(format!("endpoint {name:?}: {e}")))?;
                let json = serde_json::to_string(&endpoint).expect("endpoints serialize");
                let revision = self
                    .client
                    .put_endpoint(name, &json)
                    .await
                    .map_err(failure)?;
                self.report(
                    json!({"action": "put-endpoint", "name": name, "revision": revision}),
                    format!("endpoint {name} stored (revision {revision}).\n"),
                );
                Ok(())
            }
            RoutesCommand::DeleteEndpoint { name } => {
                let existed = self.client.delete_endpoint(name).await.map_err(failure)?;
                self.report(
                    json!({"action": "delete-endpoint", "name": name, "existed": existed}),
                    if existed {
                        format!("endpoint {name} removed.\n")
                    } else {
                        format!("no endpoint {name}.\n")
                    },
                );
                Ok(())
            }
            RoutesCommand::Add { name, from, to } => {
                herald_routes::validate_name("route", name)
                    .map_err(|e| Failure::usage(e.to_string()))?;
                let route = herald_routes::Route {
                    from: from.clone(),
                    to: to.clone(),
                };
                let json = serde_json::to_string(&route).expect("routes serialize");
                let revision = self.client.put_route(name, &json).await.map_err(failure)?;
                self.report(
                    json!({"action": "add-route", "name": name, "from": from, "to": to, "revision": revision}),
                    format!("route {name}: {from} -> {} stored (revision {revision}).\n", to.join(", ")),
                );
                Ok(())
            }
            RoutesCommand::Remove { name } => {
                let existed = self.client.delete_route(name).await.map_err(failure)?;
                self.report(
                    json!({"action": "remove-route", "name": name, "existed": existed}),
                    if existed {
                        format!("route {name} removed.\n")
                    } else {
                        format!("no route {name}.\n")
                    },
                );
                Ok(())
            }
        }
    }

    async fn fetch_status(&self) -> Result<pb::StatusReply, Failure> {
        self.client.status().await.map_err(|e| self.failure(e))
    }

    async fn status(&self) -> Result<(), Failure> {
        let reply = self.fetch_status().await?;
        match self.output {
            Output::Json => println!("{:#}", status_json(&reply)),
            Output::Text => print!("{}", status_text(&reply)),
        }
        Ok(())
    }

    async fn add_learner(&self, node_id: u64, addr: &str) -> Result<(), Failure> {
        let reply = self.fetch_status().await?;
        // Re-adding a learner is harmless, but "adding" a voter as a learner would be a confusing no-op at best.
        if let Some(member) = reply.members.iter().find(|m| m.node_id == node_id) {
            if member.voter {
                return Err(Failure::usage(format!(
                    "node {node_id} is already a voter (at {})",
                    member.addr
                )));
            }
        }
        let log_index = self
            .client
            .add_learner(node_id, addr)
            .await
            .map_err(|e| self.failure(e))?;
        self.report(
            json!({"action": "add-learner", "node_id": node_id, "addr": addr, "log_index": log_index}),
            format!(
                "node {node_id} ({addr}) added as a learner (log index {log_index}).\n\
                 Promote it once `herald ctl cluster status` shows its lag near 0: \
                 herald ctl cluster promote --node-id {node_id}"
            ),
        );
        Ok(())
    }

    async fn promote(&self, node_id: u64, max_lag: u64, force: bool) -> Result<(), Failure> {
        let reply = self.fetch_status().await?;
        let voters = voters(&reply);
        let Some(member) = reply.members.iter().find(|m| m.node_id == node_id) else {
            return Err(Failure::usage(format!(
                "node {node_id} is not a member: add it first with `herald ctl cluster add-learner --node-id \
                 {node_id} --addr host:port`"
            )));
        };
        if member.voter {
            return Err(Failure::usage(format!("node {node_id} is already a voter")));
        }
        // A voter that is far behind cannot help commit until it caught up, so promoting it early weakens the
        // quorum: with it counted, fewer of the others may fail before writes stop.
        match member.lag {
            None if !force => {
                return Err(Failure::usage(format!(
                    "the lag of node {node_id} is unknown (the status did not come from the leader); \
                     retry, or pass --force to promote it anyway"
                )))
            }
            Some(lag) if lag > max_lag && !force => {
                return Err(Failure::usage(format!(
                    "node {node_id} is {lag} log entries behind (more than --max-lag {max_lag}); wait for it to \
                     catch up, or pass --force"
                )))
            }
            None => eprintln!("herald ctl: warning: promoting node {node_id} with an unknown lag"),
            Some(lag) if lag > max_lag => {
                eprintln!("herald ctl: warning: promoting node {node_id} while {lag} log entries behind")
            }
            Some(_) => {}
        }
        let mut new_voters = voters.clone();
        new_voters.insert(node_id);
        self.change(voters, new_voters, "promote", node_id).await
    }

    async fn remove(&self, node_id: u64, force: bool) -> Result<(), Failure> {
        let reply = self.fetch_status().await?;
        let voters = voters(&reply);
        if !voters.contains(&node_id) {
            if !reply.members.iter().any(|m| m.node_id == node_id) {
                return Err(Failure::usage(format!("node {node_id} is not a member")));
            }
            // A learner does not vote: removing it never touches the quorum.
            let log_index = self
                .client
                .remove_learner(node_id)
                .await
                .map_err(|e| self.failure(e))?;
            self.report(
                json!({
                    "action": "remove",
                    "node_id": node_id,
                    "role": "learner",
                    "voters": voters,
                    "log_index": log_index,
                }),
                format!(
                    "remove learner {node_id}: voters unchanged {voters:?} (log index {log_index})"
                ),
            );
            return Ok(());
        }
        let mut new_voters = voters.clone();
        new_voters.remove(&node_id);
        let (now, after) = (voters.len(), new_voters.len());
        if after == 0 {
            return Err(Failure::usage(format!(
                "node {node_id} is the only voter: removing it would leave the cluster without one"
            )));
        }
        let mut risks = Vec::new();
        if after < quorum(now) {
            risks.push(format!(
                "{after} voter(s) is below the quorum of the current {now} ({}): unsafe if the removed member \
                 is needed to commit the change",
                quorum(now)
            ));
        }
        if tolerated_failures(after) < tolerated_failures(now) {
            risks.push(format!(
                "{now} voters tolerate {} failure(s), {after} tolerate {}",
                tolerated_failures(now),
                tolerated_failures(after)
            ));
        }
        if !risks.is_empty() {
            if !force {
                return Err(Failure::usage(format!(
                    "refusing to remove node {node_id}: {}; pass --force to do it anyway",
                    risks.join("; ")
                )));
            }
            for risk in &risks {
                eprintln!("herald ctl: warning: {risk}");
            }
        }
        self.change(voters, new_voters, "remove", node_id).await
    }

    async fn change(
        &self,
        before: BTreeSet<u64>,
        after: BTreeSet<u64>,
        action: &str,
        node_id: u64,
    ) -> Result<(), Failure> {
        let log_index = self
            .client
            .change_membership(after.clone())
            .await
            .map_err(|e| self.failure(e))?;
        self.report(
            json!({
                "action": action,
                "node_id": node_id,
                "voters_before": before,
                "voters": after,
                "log_index": log_index,
            }),
            format!(
                "{action} node {node_id}: voters {before:?} -> {after:?} (log index {log_index})"
            ),
        );
        Ok(())
    }

    fn report(&self, json: Value, text: String) {
        match self.output {
            Output::Json => println!("{json:#}"),
            Output::Text => println!("{text}"),
        }
    }
}

fn voters(reply: &pb::StatusReply) -> BTreeSet<u64> {
    reply
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.node_id)
        .collect()
}

fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

fn tolerated_failures(voters: usize) -> usize {
    voters.saturating_sub(1) / 2
}

fn status_json(reply: &pb::StatusReply) -> Value {
    json!({
        "answered_by": reply.node_id,
        "leader": reply.leader_id.map(|id| json!({"id": id, "addr": reply.leader_addr})),
        "term": reply.term,
        "revision": reply.revision,
        "last_log_index": reply.last_log_index,
        "last_applied": reply.last_applied,
        "members": reply.members.iter().map(|m| json!({
            "id": m.node_id,
            "addr": m.addr,
            "role": if m.voter { "voter" } else { "learner" },
            "lag": m.lag,
        })).collect::<Vec<_>>(),
        "edges": reply.edges.iter().map(|e| json!({
            "edge": e.edge,
            "peer_addr": e.peer_addr,
            "rooms": e.rooms,
            "lease_age_ms": e.lease_age_ms,
        })).collect::<Vec<_>>(),
    })
}

fn status_text(reply: &pb::StatusReply) -> String {
    let mut out = String::new();
    let leader = match reply.leader_id {
        Some(id) => format!("{id} ({})", or_dash(&reply.leader_addr)),
        None => "none (election in progress?)".to_owned(),
    };
    let _ = writeln!(
        out,
        "leader: {leader}  term: {}  revision: {}  (answered by node {})",
        reply.term, reply.revision, reply.node_id
    );
    out.push('\n');
    let members: Vec<Vec<String>> = reply
        .members
        .iter()
        .map(|m| {
            vec![
                m.node_id.to_string(),
                m.addr.clone(),
                if m.voter { "voter" } else { "learner" }.to_owned(),
                // Only the leader tracks replication, so a follower's answer has no lag.
                m.lag.map_or_else(|| "?".to_owned(), |lag| lag.to_string()),
            ]
        })
        .collect();
    table(&mut out, &["ID", "ADDR", "ROLE", "LAG"], &members);
    out.push('\n');
    if reply.edges.is_empty() {
        out.push_str("no edges registered\n");
    } else {
        let edges: Vec<Vec<String>> = reply
            .edges
            .iter()
            .map(|e| {
                vec![
                    e.edge.clone(),
                    e.peer_addr.clone(),
                    e.rooms.to_string(),
                    e.lease_age_ms
                        .map_or_else(|| "?".to_owned(), |ms| format!("{ms}ms")),
                ]
            })
            .collect();
        table(
            &mut out,
            &["EDGE", "PEER ADDR", "ROOMS", "LEASE AGE"],
            &edges,
        );
    }
    out
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Appends a left-aligned table with columns as wide as their widest cell.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_tolerance_and_quorum() {
        assert_eq!([1, 2, 3, 4, 5].map(tolerated_failures), [0, 0, 1, 1, 2]);
        assert_eq!([1, 2, 3, 4, 5].map(quorum), [1, 2, 2, 3, 3]);
    }

    #[test]
    fn tables_align() {
        let mut out = String::new();
        table(
            &mut out,
            &["ID", "ADDR"],
            &[
                vec!["10".into(), "a:1".into()],
                vec!["2".into(), "bb:2".into()],
            ],
        );
        assert_eq!(out, "ID  ADDR\n10  a:1\n2   bb:2\n");
    }
}
