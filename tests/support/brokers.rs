//! Real message brokers for the bridge tests: a private `redis-server` and a private RabbitMQ node, each on free
//! loopback ports with its data in a temporary directory, stopped when dropped. Both come from Debian packages
//! (`scripts/install-test-deps.sh`); the packages' system services are never used.
//!
//! Each broker runs in a process group of its own (for RabbitMQ: the private `epmd`, the start script and the
//! Erlang VM). Dropping the handle kills that group and waits for its processes. A small watchdog shell, also our
//! child, holds the read end of a pipe from this process: if the test binary dies without running `Drop` (a
//! panic that aborts, a killed `cargo test`, or a [`RabbitServer::shared`] broker at process exit), the pipe
//! closes, and the watchdog kills the group and removes the data directory. So no broker outlives its test
//! binary.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::procs::{free_port, Dir};

/// How long a RabbitMQ node may take to accept AMQP connections. It takes about 20 s on the 2-core CI machine
/// when it starts alone; a second node starting at the same time roughly doubles that.
pub const RABBIT_STARTUP: Duration = Duration::from_secs(90);

/// How long `redis-server` may take to answer PING.
pub const REDIS_STARTUP: Duration = Duration::from_secs(15);

/// A unique tag per broker in this process: part of directory and node names.
fn next_tag(kind: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{kind}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `n` distinct free loopback ports.
fn free_ports(n: usize) -> Vec<u16> {
    let mut ports = BTreeSet::new();
    while ports.len() < n {
        ports.insert(free_port());
    }
    ports.into_iter().collect()
}

/// The first of `candidates` that exists, or a panic that says how to install it.
fn find_program(candidates: &[&str], package: &str) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{} not found (tried {candidates:?}); run scripts/install-test-deps.sh (Debian package {package})",
                candidates[0]
            )
        })
}

/// A process group we started: its members are killed together, by the group id (the leader's PID), when dropped.
struct Group {
    pgid: u32,
    members: Vec<(&'static str, Child)>,
    watchdog: Child,
    /// The write end of the watchdog's stdin; dropping it (or this process dying) makes the watchdog kill the group.
    trigger: Option<ChildStdin>,
}

impl Group {
    /// Starts `leader` in a new process group, and the watchdog that kills that group (and removes `dir`) once this
    /// process lets go of it.
    fn start(name: &'static str, mut leader: Command, dir: &Path) -> std::io::Result<Group> {
        let leader = leader.process_group(0).spawn()?;
        let pgid = leader.id();
        let mut watchdog = match Command::new("sh")
            .arg("-c")
            // dash's kill takes no `--`; `-KILL -<pgid>` signals the whole group.
            .arg(r#"read _; kill -KILL "-$0" 2>/dev/null; status=$?; rm -rf -- "$1"; exit $status"#)
            .arg(pgid.to_string())
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(watchdog) => watchdog,
            Err(e) => {
                let mut leader = leader;
                let _ = leader.kill();
                let _ = leader.wait();
                return Err(e);
            }
        };
        let trigger = watchdog.stdin.take();
        Ok(Group {
            pgid,
            members: vec![(name, leader)],
            watchdog,
            trigger,
        })
    }

    /// Starts another process in this group.
    fn spawn(&mut self, name: &'static str, mut command: Command) -> std::io::Result<()> {
        let child = command.process_group(self.pgid as i32).spawn()?;
        self.members.push((name, child));
        Ok(())
    }

    /// The first member that has already exited, with its status.
    fn exited(&mut self) -> Option<String> {
        self.members.iter_mut().find_map(|(name, child)| {
            child
                .try_wait()
                .ok()
                .flatten()
                .map(|status| format!("{name} exited early ({status})"))
        })
    }

    fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|(_, child)| child.id()).collect()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Closing the pipe makes the watchdog `kill -KILL -- -<pgid>`: every process in the group, including the
        // Erlang VM the start script runs in the background.
        drop(self.trigger.take());
        let killed = self.watchdog.wait().is_ok_and(|status| status.success());
        if !killed {
            // The watchdog could not signal the group (or it was empty already): signal it from here.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.pgid)])
                .stderr(Stdio::null())
                .status();
        }
        // And each member we started, by its own PID, in case it left the group.
        for (_, child) in &mut self.members {
            if !matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Polls `ready` every 100 ms until it succeeds, a member of `group` exits, or `limit` passes.
fn wait_until(
    group: &mut Group,
    limit: Duration,
    mut ready: impl FnMut() -> Result<(), String>,
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut last = String::from("not tried");
    while start.elapsed() < limit {
        if let Some(exit) = group.exited() {
            return Err(format!("{exit}; last check: {last}"));
        }
        match ready() {
            Ok(()) => return Ok(start.elapsed()),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("not ready after {limit:?}; last check: {last}"))
}

/// The last `lines` lines of a text file, for failure messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A private `redis-server` on a free loopback port, without persistence; killed when dropped.
pub struct RedisServer {
    // Fields drop in order: the processes first, then their directory.
    group: Group,
    port: u16,
    startup: Duration,
    dir: Dir,
}

impl RedisServer {
    /// Starts `redis-server` and waits until it answers PING. Panics (with its log) if it does not.
    pub fn start() -> RedisServer {
        let program = find_program(
            &["/usr/bin/redis-server", "/usr/local/bin/redis-server"],
            "redis-server",
        );
        let mut failures = Vec::new();
        for _attempt in 0..3 {
            let dir = Dir::new(&next_tag("redis"));
            let port = free_port();
            let log = dir.0.join("redis.log");
            let mut command = Command::new(&program);
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir.0)
                .arg("--logfile")
                .arg(&log)
                .args(["--daemonize", "no", "--protected-mode", "yes"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut group =
                Group::start("redis-server", command, &dir.0).expect("start redis-server");
            match wait_until(&mut group, REDIS_STARTUP, || redis_ping(port)) {
                Ok(startup) => {
                    return RedisServer {
                        group,
                        port,
                        startup,
                        dir,
                    }
                }
                Err(e) => failures.push(format!("{e}\n{}", tail(&log, 20))),
            }
        }
        panic!("redis-server did not start:\n{}", failures.join("\n---\n"));
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How long it took to answer PING.
    pub fn startup(&self) -> Duration {
        self.startup
    }

    /// The PIDs of the processes started for this server.
    pub fn pids(&self) -> Vec<u32> {
        self.group.pids()
    }

    pub fn dir(&self) -> &Path {
        &self.dir.0
    }
}

/// One PING over a plain TCP connection, expecting `+PONG`.
fn redis_ping(port: u16) -> Result<(), String> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))
            .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"PING\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = [0u8; 64];
    let n = stream.read(&mut answer).map_err(|e| format!("read: {e}"))?;
    let answer = String::from_utf8_lossy(&answer[..n]);
    if answer.starts_with("+PONG") {
        Ok(())
    } else {
        Err(format!("answered {answer:?}"))
    }
}

/// A private RabbitMQ node, fully isolated from any system broker: its own node name, Erlang cookie (`HOME`),
/// database, logs, config and (empty) plugin list in a temporary directory; the AMQP listener, the Erlang
/// distribution port and a private `epmd` all on free loopback ports. The `guest` user, which RabbitMQ allows from
/// loopback, connects. Killed (VM, start script and epmd together) when dropped.
pub struct RabbitServer {
    group: Group,
    node: String,
    amqp_port: u16,
    epmd_port: u16,
    dist_port: u16,
    startup: Duration,
    dir: Dir,
}

impl RabbitServer {
    /// Starts a node and waits until it completes an AMQP handshake (up to [`RABBIT_STARTUP`]). Panics, with the
    /// node's log, if it does not; a node that exits early (say, a port taken in the meantime) is retried on new
    /// ports.
    pub fn start() -> RabbitServer {
        let server = find_program(
            &[
                "/usr/lib/rabbitmq/bin/rabbitmq-server",
                "/usr/lib/rabbitmq/sbin/rabbitmq-server",
            ],
            "rabbitmq-server",
        );
        let epmd = find_program(
            &["/usr/bin/epmd", "/usr/lib/erlang/bin/epmd"],
            "erlang-base",
        );
        let mut failures = Vec::new();
        for _attempt in 0..3 {
            match Self::try_start(&server, &epmd) {
                Ok(node) => return node,
                Err(e) => failures.push(e),
            }
        }
        panic!("RabbitMQ did not start:\n{}", failures.join("\n---\n"));
    }

    /// One node for every test in this test binary that asks for it, started on first use. It is never dropped:
    /// the watchdog kills it when the test binary exits. Starting one node instead of one per test matters here:
    /// each start costs ~20 s of both CPU cores. Tests sharing it use their own exchange and queue names.
    pub fn shared() -> &'static RabbitServer {
        static SHARED: OnceLock<RabbitServer> = OnceLock::new();
        SHARED.get_or_init(RabbitServer::start)
    }

    fn try_start(server: &Path, epmd: &Path) -> Result<RabbitServer, String> {
        let tag = next_tag("rabbit");
        let dir = Dir::new(&tag);
        let root = dir.0.clone();
        let ports = free_ports(3);
        let (amqp_port, epmd_port, dist_port) = (ports[0], ports[1], ports[2]);
        let node = format!("herald-test-{tag}@localhost");
        for sub in ["home", "mnesia", "log", "plugins-expand"] {
            std::fs::create_dir_all(root.join(sub)).map_err(|e| e.to_string())?;
        }
        let write = |name: &str, text: &str| {
            std::fs::write(root.join(name), text).map_err(|e| format!("write {name}: {e}"))
        };
        write(
            "rabbitmq.conf",
            &format!(
                "listeners.tcp.default = 127.0.0.1:{amqp_port}\n\
                 log.console = false\n\
                 log.file.level = info\n"
            ),
        )?;
        // No plugins at all (in particular no management plugin and its HTTP listener).
        write("enabled_plugins", "[].\n")?;
        // Replaces /etc/rabbitmq/rabbitmq-env.conf, so nothing of the system broker's settings applies.
        write("rabbitmq-env.conf", "")?;

        // Our own epmd, first: the VM is told not to start one (-start_epmd false), because the one it would start
        // daemonizes into a session of its own, out of reach of the group kill.
        let mut epmd_command = Command::new(epmd);
        epmd_command
            .args(["-port", &epmd_port.to_string()])
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut group =
            Group::start("epmd", epmd_command, &root).map_err(|e| format!("start epmd: {e}"))?;
        wait_until(&mut group, Duration::from_secs(10), || {
            TcpStream::connect_timeout(&([127, 0, 0, 1], epmd_port).into(), Duration::from_secs(1))
                .map(drop)
                .map_err(|e| format!("epmd: {e}"))
        })?;

        let out = std::fs::File::create(root.join("stdout.log")).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let path = |sub: &str| root.join(sub).into_os_string();
        let mut command = Command::new(server);
        command
            .env("HOME", path("home"))
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_USE_LONGNAME", "false")
            .env("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", path("plugins-expand"))
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_PID_FILE", path("rabbit.pid"))
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}",
            )
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        group
            .spawn("rabbitmq-server", command)
            .map_err(|e| format!("start rabbitmq-server: {e}"))?;

        let url = amqp_url(amqp_port);
        let startup = wait_until(&mut group, RABBIT_STARTUP, || {
            TcpStream::connect_timeout(&([127, 0, 0, 1], amqp_port).into(), Duration::from_secs(1))
                .map_err(|e| format!("connect: {e}"))?;
            amqp_handshake(&url)
        })
        .map_err(|e| {
            format!(
                "node {node}: {e}\n--- stdout/stderr:\n{}\n--- log:\n{}",
                tail(&root.join("stdout.log"), 30),
                tail(&root.join("log").join(format!("{node}.log")), 30)
            )
        })?;
        Ok(RabbitServer {
            group,
            node,
            amqp_port,
            epmd_port,
            dist_port,
            startup,
            dir,
        })
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (the default vhost).
    pub fn amqp_url(&self) -> String {
        amqp_url(self.amqp_port)
    }

    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// The Erlang node name, `herald-test-…@localhost`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Every loopback port this node listens on: AMQP, its epmd, Erlang distribution.
    pub fn ports(&self) -> [u16; 3] {
        [self.amqp_port, self.epmd_port, self.dist_port]
    }

    /// How long the node took from launch to its first AMQP handshake.
    pub fn startup(&self) -> Duration {
        self.startup
    }

    /// The PIDs we started for this node: epmd, then the start script (whose child is the Erlang VM).
    pub fn pids(&self) -> Vec<u32> {
        self.group.pids()
    }

    pub fn dir(&self) -> &Path {
        &self.dir.0
    }
}

fn amqp_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// A full AMQP handshake (connection.open included) with lapin, on a thread and runtime of its own, so it works
/// whether or not the caller is inside a tokio runtime.
fn amqp_handshake(url: &str) -> Result<(), String> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let connection = tokio::time::timeout(
                Duration::from_secs(5),
                lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
            )
            .await
            .map_err(|_| "AMQP handshake timed out".to_owned())?
            .map_err(|e| format!("AMQP handshake: {e}"))?;
            let _ = connection.close(200, "OK".into()).await;
            Ok(())
        })
    })
    .join()
    .unwrap_or_else(|_| Err("the handshake thread panicked".to_owned()))
}
