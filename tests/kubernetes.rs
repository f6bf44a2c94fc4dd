//! The Helm chart's command lines, run for real on loopback: three registry members started the way the
//! StatefulSet starts them (node id from `HERALD_REGISTRY_NODE_ID`, as the pod-index label gives it; `--peers` and
//! `--advertise` by the pods' stable names under the headless Service), one of them not resolvable yet when the
//! others start (its pod is not scheduled), and an edge configured the way the Deployment configures it (the
//! registry by those names, all through `HERALD_*` variables), checked with `herald ctl round-trip` as `helm test`
//! does.
//!
//! The names resolve through a private `/etc/hosts` bind-mounted in each process's own mount namespace (and a
//! `resolv.conf` pointing at loopback, so an unknown name never leaves the machine). That needs root; without it
//! the test says so and does nothing.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::procs::{free_port, Dir, HERALD};

const SECRET: &str = "kubernetes-test-secret-0123456789";
const API_KEY: &str = "kubernetes-test-key";
const HEADLESS: &str = "herald-registry-headless";

fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// `herald args...` with `env`, seeing `dir`/hosts, `dir`/resolv.conf and `dir`/nsswitch.conf as its own.
fn spawn(dir: &Path, env: &[(&str, String)], args: &[String]) -> Killed {
    let script = format!(
        "mount --bind '{d}/hosts' /etc/hosts && mount --bind '{d}/resolv.conf' /etc/resolv.conf && \
         mount --bind '{d}/nsswitch.conf' /etc/nsswitch.conf && exec '{HERALD}' \"$@\"",
        d = dir.display()
    );
    let mut command = Command::new("unshare");
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") {
            command.env_remove(key);
        }
    }
    let child = command
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "herald",
        ])
        .args(args)
        .env("HERALD_ADMIN_PORT", "0")
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start herald");
    Killed(child)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on `addr` answered 200.
async fn answers_ok(addr: &str, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut response)).await;
    response.starts_with(b"HTTP/1.1 200")
}

async fn wait_ready(what: &str, addr: &str, child: &mut Killed) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("{what} exited with {status}");
        }
        if answers_ok(addr, "/readyz").await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {addr}/readyz never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write_hosts(dir: &Path, members: usize) {
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for i in 0..members {
        hosts.push_str(&format!("127.0.0.1 herald-registry-{i}.{HEADLESS}\n"));
    }
    // In place: the bind mounts keep pointing at this inode.
    std::fs::write(dir.join("hosts"), hosts).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_members_and_an_edge_started_as_the_chart_starts_them_form_a_cluster() {
    if !can_unshare() {
        eprintln!("SKIPPED: needs root with unshare(1) to give each process a private /etc/hosts");
        return;
    }
    let dir = Dir::new("kubernetes");
    std::fs::write(
        dir.0.join("resolv.conf"),
        "nameserver 127.0.0.1\noptions attempts:1 timeout:1\n",
    )
    .unwrap();
    std::fs::write(dir.0.join("nsswitch.conf"), "hosts: files dns\n").unwrap();
    // Pod 2 is not scheduled yet: its name does not resolve.
    write_hosts(&dir.0, 2);

    let grpc: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let metrics: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let name = |i: usize| format!("herald-registry-{i}.{HEADLESS}:{}", grpc[i]);
    let peers: Vec<String> = (0..3).map(|i| format!("{i}={}", name(i))).collect();
    let member = |i: usize| {
        let data = dir.0.join(format!("data-{i}"));
        std::fs::create_dir_all(&data).unwrap();
        spawn(
            &dir.0,
            &[
                ("HERALD_REGISTRY_NODE_ID", i.to_string()),
                ("HERALD_CLUSTER_SECRET", SECRET.into()),
            ],
            &[
                "registry".into(),
                format!("--listen=127.0.0.1:{}", grpc[i]),
                format!("--advertise={}", name(i)),
                format!("--peers={}", peers.join(",")),
                format!("--data-dir={}", data.display()),
                format!("--metrics-addr=127.0.0.1:{}", metrics[i]),
            ],
        )
    };
    let mut members = vec![member(0), member(1)];
    for i in 0..2 {
        let addr = format!("127.0.0.1:{}", metrics[i]);
        wait_ready(&format!("registry member {i}"), &addr, &mut members[i]).await;
    }

    // Pod 2 comes up: its name resolves and it catches up as the voter it was listed as.
    write_hosts(&dir.0, 3);
    members.push(member(2));
    let addr = format!("127.0.0.1:{}", metrics[2]);
    wait_ready("registry member 2", &addr, &mut members[2]).await;

    // An edge as the Deployment runs it, the registry by the members' names.
    let (http, edge_grpc) = (free_port(), free_port());
    let config = dir.0.join("herald.yaml");
    std::fs::write(
        &config,
        "auth:\n  method: static\n  static-rooms:\n    - {helm: test}\n",
    )
    .unwrap();
    let mut edge = spawn(
        &dir.0,
        &[
            ("HERALD_CLUSTER_EDGE_ID", "herald-edge-abc12".into()),
            ("HERALD_CLUSTER_ADVERTISE_HOST", "127.0.0.1".into()),
            ("HERALD_CLUSTER_PEER_PORT", free_port().to_string()),
            (
                "HERALD_CLUSTER_REGISTRY",
                (0..3).map(name).collect::<Vec<_>>().join(","),
            ),
            ("HERALD_CLUSTER_SECRET", SECRET.into()),
            ("HERALD_AUTH_API_KEYS", API_KEY.into()),
            ("HERALD_SERVER_HOST", "127.0.0.1".into()),
            ("HERALD_SERVER_PORT", http.to_string()),
            ("HERALD_GRPC_PORT", edge_grpc.to_string()),
        ],
        &[
            "edge".into(),
            "--config".into(),
            config.display().to_string(),
        ],
    );
    wait_ready("the edge", &format!("127.0.0.1:{http}"), &mut edge).await;

    // `helm test`'s round trip; then the registry lists the edge (it registered through the names).
    let round_trip = spawn(
        &dir.0,
        &[("HERALD_CTL_API_KEY", API_KEY.into())],
        &[
            "ctl".into(),
            "round-trip".into(),
            format!("--edge=127.0.0.1:{http}"),
            format!("--grpc=127.0.0.1:{edge_grpc}"),
            r#"--room={"helm":"test"}"#.into(),
        ],
    );
    let mut round_trip = round_trip;
    let status = tokio::task::spawn_blocking(move || round_trip.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "herald ctl round-trip: {status}");

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&spawn_status(&dir.0, &name(2))).unwrap_or_default();
        let voters = status["members"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["role"] == "voter").count());
        let edge_listed = status["edges"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["edge"] == "herald-edge-abc12"));
        if voters == 3 && edge_listed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cluster status never showed 3 voters and the edge: {status}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `herald ctl cluster status` through member `registry` (a name), as JSON text.
fn spawn_status(dir: &Path, registry: &str) -> String {
    let script = format!(
        "mount --bind '{d}/hosts' /etc/hosts && mount --bind '{d}/resolv.conf' /etc/resolv.conf && \
         mount --bind '{d}/nsswitch.conf' /etc/nsswitch.conf && exec '{HERALD}' \"$@\"",
        d = dir.display()
    );
    let output = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "herald",
        ])
        .args([
            "ctl",
            "--output",
            "json",
            "cluster",
            "status",
            "--registry",
            registry,
        ])
        .env("HERALD_CLUSTER_SECRET", SECRET)
        .output()
        .expect("herald ctl cluster status");
    String::from_utf8_lossy(&output.stdout).into_owned()
}
