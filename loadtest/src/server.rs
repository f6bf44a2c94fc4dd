//! The servers a run measures: started by the harness (`herald dev`, or registries + edges) or attached to.
//!
//! Every process the harness starts is a direct child, killed by its own PID when [`Servers`] is dropped, with
//! its stderr in the run's log directory and its stdout drained so it never blocks on a full pipe.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

/// One node clients and publishers use.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) name: String,
    /// The WebSocket (and, for herald, HTTP publish) address.
    pub(crate) ws: SocketAddr,
    /// herald's gRPC publish address.
    pub(crate) grpc: Option<SocketAddr>,
    /// Where non-gRPC publishers connect (herald: HTTP, NATS: its client port, Sockudo: its HTTP API).
    pub(crate) publish: SocketAddr,
    /// For RSS and CPU figures; unknown when attached without `--server-pid`.
    pub(crate) pid: Option<u32>,
}

/// The server side of a run.
#[derive(Default)]
pub(crate) struct Servers {
    pub(crate) nodes: Vec<Node>,
    /// Processes that serve no clients but whose resources count (registry members), as (name, pid).
    pub(crate) support: Vec<(String, u32)>,
    /// The key publishers present.
    pub(crate) api_key: Option<String>,
    /// The private redis-server publishers use when the run publishes through herald's Redis bridge.
    pub(crate) redis_url: Option<String>,
    children: Vec<Child>,
    temp_dirs: Vec<PathBuf>,
    /// Peer servers, which stop themselves when dropped.
    peer_guards: Vec<Box<dyn std::any::Any + Send>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.peer_guards.clear();
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in &self.temp_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Servers {
    /// Every server PID with its name (edges first).
    pub(crate) fn pids(&self) -> Vec<(String, u32)> {
        self.nodes
            .iter()
            .filter_map(|n| n.pid.map(|p| (n.name.clone(), p)))
            .chain(self.support.iter().cloned())
            .collect()
    }

    /// Keeps `guard` (a server that stops itself when dropped) until the servers stop.
    pub(crate) fn keep(&mut self, guard: Box<dyn std::any::Any + Send>) {
        self.peer_guards.push(guard);
    }

    /// Fails if any started process has exited (it would otherwise show up as refused connections).
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        for child in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "server process {} exited during the run ({status})",
                    child.id()
                );
            }
        }
        Ok(())
    }
}

/// The key self-started herald nodes accept.
pub(crate) const API_KEY: &str = "loadtest-api-key";
const SECRET: &str = "loadtest-cluster-secret-0123456789";

/// Where the `herald` binary is: `--herald-bin`, else next to this executable (same cargo profile), else the
/// one cargo's other profile built, else `herald` on PATH.
pub(crate) fn find_herald(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path.to_owned());
        }
        bail!("--herald-bin {} does not exist", path.display());
    }
    let exe = std::env::current_exe().context("cannot locate this executable")?;
    if let Some(dir) = exe.parent() {
        // Integration tests run from target/<profile>/deps.
        for candidate in [dir.join("herald"), dir.join("../herald")] {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("herald"))
        .find(|p| p.is_file())
    {
        return Ok(path);
    }
    bail!(
        "cannot find the herald binary next to {} or on PATH: build it (cargo build --release -p herald) \
         or pass --herald-bin",
        exe.display()
    )
}

/// Starts herald: `herald dev` for one node, else `registries` registry members and `nodes` edges with static
/// auth (every connection may subscribe to the load-test rooms) and an API key for the publish APIs.
pub(crate) fn start_herald(
    bin: &Path,
    nodes: usize,
    registries: usize,
    log_dir: &Path,
) -> anyhow::Result<Servers> {
    start_herald_with(bin, nodes, registries, log_dir, &[])
}

/// [`start_herald`], with `extra` arguments for every `herald dev` / `herald edge` (e.g. `--config FILE`).
pub(crate) fn start_herald_with(
    bin: &Path,
    nodes: usize,
    registries: usize,
    log_dir: &Path,
    extra: &[String],
) -> anyhow::Result<Servers> {
    std::fs::create_dir_all(log_dir)
        .with_context(|| format!("cannot create {}", log_dir.display()))?;
    let mut servers = Servers::default();
    servers.api_key = Some(API_KEY.to_owned());
    let api_key = format!("auth.api-keys={API_KEY}");
    if nodes == 1 {
        let args = [
            "dev",
            "--port",
            "0",
            "--grpc-port",
            "0",
            "--set",
            &api_key,
            "--set",
            "log-level=warn",
        ];
        let args: Vec<&str> = args
            .into_iter()
            .chain(extra.iter().map(String::as_str))
            .collect();
        let (child, line) = spawn(bin, &args, &log_dir.join("herald-dev.log"))?;
        servers
            .nodes
            .push(node_from_line("dev", &line, child.id())?);
        servers.children.push(child);
        return Ok(servers);
    }
    let data = std::env::temp_dir().join(format!("herald-loadtest-{}", std::process::id()));
    servers.temp_dirs.push(data.clone());
    let ports = (0..registries)
        .map(|_| free_port())
        .collect::<anyhow::Result<Vec<u16>>>()?;
    let peers: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect();
    for (i, port) in ports.iter().enumerate() {
        let dir = data.join(format!("r{}", i + 1));
        std::fs::create_dir_all(&dir)?;
        let args = [
            "registry".to_owned(),
            "--node-id".to_owned(),
            (i + 1).to_string(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--peers".to_owned(),
            peers.join(","),
            "--data-dir".to_owned(),
            dir.display().to_string(),
            "--cluster-secret".to_owned(),
            SECRET.to_owned(),
            "--log-level".to_owned(),
            "warn".to_owned(),
        ];
        let log = log_dir.join(format!("registry-{}.log", i + 1));
        let (child, _) = spawn(bin, &args, &log)?;
        servers
            .support
            .push((format!("registry-{}", i + 1), child.id()));
        servers.children.push(child);
    }
    let registry = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    for i in 0..nodes {
        let args = [
            "edge".to_owned(),
            "--port".to_owned(),
            "0".to_owned(),
            "--grpc-port".to_owned(),
            "0".to_owned(),
            "--set".to_owned(),
            format!("cluster.registry={registry}"),
            "--set".to_owned(),
            format!("cluster.secret={SECRET}"),
            "--set".to_owned(),
            "cluster.peer-port=0".to_owned(),
            "--set".to_owned(),
            format!("cluster.edge-id=edge-{i}"),
            "--set".to_owned(),
            api_key.clone(),
            "--set".to_owned(),
            "auth.method=static".to_owned(),
            "--set".to_owned(),
            r#"auth.static-rooms=[{"lt":"*","shard":"*"}]"#.to_owned(),
            "--set".to_owned(),
            "log-level=warn".to_owned(),
        ];
        let args: Vec<String> = args.into_iter().chain(extra.iter().cloned()).collect();
        let log = log_dir.join(format!("edge-{i}.log"));
        let (child, line) = spawn(bin, &args, &log)?;
        servers
            .nodes
            .push(node_from_line(&format!("edge-{i}"), &line, child.id())?);
        servers.children.push(child);
    }
    Ok(servers)
}

/// Nodes given on the command line: `HTTP_ADDR[/GRPC_ADDR]` each, PIDs matched by position.
pub(crate) fn attach(edges: &[String], pids: &[u32]) -> anyhow::Result<Servers> {
    let mut servers = Servers::default();
    for (i, edge) in edges.iter().enumerate() {
        let (ws, grpc) = match edge.split_once('/') {
            Some((ws, grpc)) => (ws, Some(grpc)),
            None => (edge.as_str(), None),
        };
        let parse = |a: &str| {
            a.parse::<SocketAddr>().map_err(|_| {
                anyhow!("--edge {edge:?}: {a:?} is not host:port (an IP address and a port)")
            })
        };
        let ws = parse(ws)?;
        servers.nodes.push(Node {
            name: format!("node-{i}"),
            ws,
            publish: ws,
            grpc: grpc.map(parse).transpose()?,
            pid: pids.get(i).copied(),
        });
    }
    Ok(servers)
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `bin args`, stderr to `log`, and returns it with its first stdout line (its listening line).
pub(crate) fn spawn<S: AsRef<std::ffi::OsStr>>(
    bin: &Path,
    args: &[S],
    log: &Path,
) -> anyhow::Result<(Child, String)> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut child = Command::new(bin)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let Some(stdout) = child.stdout.take() else {
        bail!("no stdout pipe");
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the child never blocks writing.
        let mut sink = String::new();
        while stdout.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) if !line.is_empty() => Ok((child, line)),
        _ => {
            let _ = child.kill();
            let status = child.wait().ok();
            let log_text = std::fs::read_to_string(log).unwrap_or_default();
            bail!(
                "{} {:?} did not start ({status:?}); its log says: {}",
                bin.display(),
                args.iter()
                    .map(|a| a.as_ref().to_string_lossy())
                    .collect::<Vec<_>>(),
                log_text.trim()
            )
        }
    }
}

fn node_from_line(name: &str, line: &str, pid: u32) -> anyhow::Result<Node> {
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse::<SocketAddr>().ok())
            .ok_or_else(|| anyhow!("no {key}= address in herald's first line {line:?}"))
    };
    Ok(Node {
        name: name.to_owned(),
        ws: field("http")?,
        publish: field("http")?,
        grpc: Some(field("grpc")?),
        pid: Some(pid),
    })
}

/// `GET http://{addr}{path}` over a fresh connection, returning the body (for /metrics).
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .context("timed out")??;
    let text = String::from_utf8_lossy(&buf);
    let (_, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP answer"))?;
    Ok(body.to_owned())
}

/// Sum of a Prometheus counter's samples (all label sets) in a /metrics body.
pub(crate) fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Starts `nats-server` with its WebSocket listener on free loopback ports (one node: the harness does not
/// cluster NATS).
pub(crate) async fn start_nats(dir: &Path) -> anyhow::Result<Servers> {
    use crate::peers::nats::NatsServer;
    let binary = NatsServer::binary().ok_or_else(|| {
        anyhow!("nats-server is not installed (scripts/install-bench-deps.sh installs it)")
    })?;
    let client = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let ws = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let server = NatsServer::start(&binary, &dir.join("nats"), client, ws)
        .await
        .context("starting nats-server")?;
    let mut servers = Servers::default();
    servers.nodes.push(Node {
        name: "nats".into(),
        ws: server.ws_addr(),
        grpc: None,
        publish: server.client_addr(),
        pid: Some(server.pid()),
    });
    servers.peer_guards.push(Box::new(server));
    Ok(servers)
}

/// Starts Sockudo (single node, local adapter) on free loopback ports with the harness's Pusher app.
pub(crate) async fn start_sockudo(dir: &Path) -> anyhow::Result<Servers> {
    use crate::peers::sockudo::{PusherApp, SockudoServer};
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let binary = SockudoServer::binary(&repo).ok_or_else(|| {
        anyhow!("sockudo is not installed (scripts/install-bench-deps.sh builds it)")
    })?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let server = SockudoServer::start(
        &binary,
        &dir.join("sockudo"),
        addr,
        metrics,
        PusherApp::default(),
    )
    .await
    .context("starting sockudo")?;
    let mut servers = Servers::default();
    servers.nodes.push(Node {
        name: "sockudo".into(),
        ws: server.addr(),
        grpc: None,
        publish: server.addr(),
        pid: Some(server.pid()),
    });
    servers.peer_guards.push(Box::new(server));
    Ok(servers)
}
