//! The servers a run measures: started by the harness (`herald dev`, or registries + edges) or attached to.
//!
//! Every process the harness starts is a direct child, killed by its own PID when [`Servers`] is dropped, with
//! its stderr in the run's log directory and its stdout drained so it never blocks on a full pipe. A failover
//! run kills some of them on purpose and restarts them with the same arguments ([`Procs`]).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
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
    /// A self-started cluster's registry members, `host:port`, member `i + 1` at index `i` (named
    /// `registry-{i + 1}` in [`Procs`]); empty otherwise.
    pub(crate) registry: Vec<String>,
    pub(crate) procs: Procs,
    /// The private redis-server publishers use when the run publishes through herald's Redis bridge.
    pub(crate) redis_url: Option<String>,
    temp_dirs: Vec<PathBuf>,
    /// Peer servers, which stop themselves when dropped.
    peer_guards: Vec<Box<dyn std::any::Any + Send>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.peer_guards.clear();
        for proc in self.procs.lock().iter_mut() {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
        for dir in &self.temp_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The server processes the harness started, by name (`dev`, `registry-1`, `edge-0`, …), shared with the
/// failover controller, which kills and restarts them while the coordinator checks the others stay up.
#[derive(Clone, Default)]
pub(crate) struct Procs(Arc<Mutex<Vec<Managed>>>);

struct Managed {
    name: String,
    child: Child,
    bin: PathBuf,
    /// What a restart runs with: the first start's arguments, with an edge's ports fixed to the ones it got.
    restart_args: Vec<String>,
    log_dir: PathBuf,
    restarts: u32,
    /// Killed on purpose and not running again yet: its absence is no failure.
    down: bool,
}

impl Procs {
    fn lock(&self) -> MutexGuard<'_, Vec<Managed>> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, name: &str, child: Child, bin: &Path, restart_args: Vec<String>, log_dir: &Path) {
        self.lock().push(Managed {
            name: name.to_owned(),
            child,
            bin: bin.to_owned(),
            restart_args,
            log_dir: log_dir.to_owned(),
            restarts: 0,
            down: false,
        });
    }

    /// Fails if any process has exited that was not killed on purpose (it would otherwise show up as refused
    /// connections).
    pub(crate) fn check_alive(&self) -> anyhow::Result<()> {
        for proc in self.lock().iter_mut().filter(|p| !p.down) {
            if let Some(status) = proc.child.try_wait()? {
                bail!(
                    "server process {} ({}) exited during the run ({status})",
                    proc.child.id(),
                    proc.name
                );
            }
        }
        Ok(())
    }

    /// SIGKILLs `name` (by its PID) and reaps it.
    pub(crate) fn kill(&self, name: &str) -> anyhow::Result<()> {
        let mut procs = self.lock();
        let proc = procs
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("no server process named {name}"))?;
        if let Some(status) = proc.child.try_wait()? {
            bail!("{name} had already exited ({status})");
        }
        proc.down = true;
        // `Child::kill` is SIGKILL on Unix: no shutdown path runs, as when a machine dies.
        proc.child
            .kill()
            .with_context(|| format!("cannot SIGKILL {name}"))?;
        proc.child.wait()?;
        Ok(())
    }

    /// Starts `name` again with the same arguments (a registry member: same node id, port and data directory;
    /// an edge: same ports) and returns its PID and first stdout line. Blocks until that line (at most 30 s).
    pub(crate) fn restart(&self, name: &str) -> anyhow::Result<(u32, String)> {
        let (bin, args, log) = {
            let mut procs = self.lock();
            let proc = procs
                .iter_mut()
                .find(|p| p.name == name)
                .ok_or_else(|| anyhow!("no server process named {name}"))?;
            proc.restarts += 1;
            (
                proc.bin.clone(),
                proc.restart_args.clone(),
                proc.log_dir
                    .join(format!("{name}.restart-{}.log", proc.restarts)),
            )
        };
        // A restarted port can be refused for a moment while the kernel finishes closing the old sockets.
        let mut attempt = 0;
        let (child, line) = loop {
            match spawn(&bin, &args, &log) {
                Ok(started) => break started,
                Err(e) if attempt >= 10 => return Err(e),
                Err(_) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        let pid = child.id();
        let mut procs = self.lock();
        if let Some(proc) = procs.iter_mut().find(|p| p.name == name) {
            proc.child = child;
            proc.down = false;
        }
        Ok((pid, line))
    }

    /// Processes restarted during the run, as (name, restarts).
    pub(crate) fn restarted(&self) -> Vec<(String, u32)> {
        self.lock()
            .iter()
            .filter(|p| p.restarts > 0)
            .map(|p| (p.name.clone(), p.restarts))
            .collect()
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

    /// Fails if any started process has exited that was not killed on purpose.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        self.procs.check_alive()
    }
}

/// The key self-started herald nodes accept.
pub(crate) const API_KEY: &str = "loadtest-api-key";
/// The cluster secret of a self-started cluster.
pub(crate) const SECRET: &str = "loadtest-cluster-secret-0123456789";

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
        let args = args.iter().map(|a| a.to_string()).collect();
        servers.procs.add("dev", child, bin, args, log_dir);
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
        let name = format!("registry-{}", i + 1);
        let log = log_dir.join(format!("{name}.log"));
        let (child, _) = spawn(bin, &args, &log)?;
        servers.support.push((name.clone(), child.id()));
        servers.procs.add(&name, child, bin, args.to_vec(), log_dir);
    }
    servers.registry = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let registry = servers.registry.join(",");
    let edge_args = |i: usize, http: u16, grpc: u16| {
        vec![
            "edge".to_owned(),
            "--port".to_owned(),
            http.to_string(),
            "--grpc-port".to_owned(),
            grpc.to_string(),
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
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .collect::<Vec<String>>()
    };
    for i in 0..nodes {
        let name = format!("edge-{i}");
        let log = log_dir.join(format!("{name}.log"));
        let (child, line) = spawn(bin, &edge_args(i, 0, 0), &log)?;
        let node = node_from_line(&name, &line, child.id())?;
        // A restart keeps the ports clients and publishers know.
        let restart = edge_args(i, node.ws.port(), node.grpc.map_or(0, |g| g.port()));
        servers.procs.add(&name, child, bin, restart, log_dir);
        servers.nodes.push(node);
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
        // herald nodes share this machine: each takes a free admin port.
        .env("HERALD_ADMIN_PORT", "0")
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
