//! The real `herald` binary as a child process: startup output, configuration errors (exit 64), and the
//! SIGTERM / SIGINT drain (readiness fails, new upgrades refused, every socket gets 1001, exit 0).

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// A herald child process, killed (by its own PID) if a test fails before it exits.
struct Herald {
    child: Child,
    http: String,
    stdout_rest: std::sync::mpsc::Receiver<String>,
}

impl Herald {
    fn spawn(args: &[&str]) -> Herald {
        let mut child = Command::new(HERALD)
            .args(args)
            .env("RUST_LOG", "info")
            .env("HERALD_ADMIN_PORT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start herald");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let http = first
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http="))
            .unwrap_or_else(|| panic!("no listening line, got {first:?}"))
            .to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stdout.read_to_string(&mut rest);
            let _ = tx.send(rest);
        });
        Herald {
            child,
            http,
            stdout_rest: rx,
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit and returns (exit code, stderr).
    fn wait(&mut self, within: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut stderr = String::new();
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr)
                    .unwrap();
                return (status.code(), stderr);
            }
            assert!(
                Instant::now() < deadline,
                "herald did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(HERALD)
        .args(args)
        .env("HERALD_ADMIN_PORT", "0")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn invalid_configuration_exits_64_and_says_what_is_wrong() {
    let (code, stderr) = run_to_exit(
        &[
            "dev",
            "--port",
            "0",
            "--set",
            "limits.max-message-bytes=lots",
        ],
        &[],
    );
    assert_eq!(code, Some(64));
    assert!(stderr.contains("lots"), "{stderr}");

    let (code, stderr) = run_to_exit(
        &["dev", "--port", "0"],
        &[("HERALD_LIMITS_IDLE_TIMEOUT_SECS", "0")],
    );
    assert_eq!(code, Some(64));
    assert!(stderr.contains("limits.idle-timeout-secs"), "{stderr}");

    let dir = std::env::temp_dir().join(format!("herald-process-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("herald.yaml");
    std::fs::write(&file, "server-port: 0\nlimits:\n  max-mesage-bytes: 10\n").unwrap();
    let (code, stderr) = run_to_exit(&["-c", file.to_str().unwrap(), "dev"], &[]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("max-mesage-bytes"), "{stderr}");
    let (code, stderr) = run_to_exit(
        &["-c", dir.join("missing.yaml").to_str().unwrap(), "dev"],
        &[],
    );
    assert_eq!(code, Some(64));
    assert!(stderr.contains("missing.yaml"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn edge_refuses_to_start_without_auth() {
    let (code, stderr) = run_to_exit(&["edge", "--port", "0", "--grpc-port", "0"], &[]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("no auth method"), "{stderr}");
}

#[test]
fn config_prints_every_setting() {
    let output = Command::new(HERALD).arg("config").output().unwrap();
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    for needle in [
        "`server-port`",
        "`HERALD_SERVER_PORT`",
        "`limits.max-message-bytes`",
        "`auth.jwt.hs256-secret`",
    ] {
        assert!(table.contains(needle), "{needle} missing from:\n{table}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_prints_how_to_connect_and_warns_loudly() {
    let mut herald = Herald::spawn(&["dev", "--port", "0", "--grpc-port", "0"]);
    let (status, _) = http_request("GET", &format!("http://{}/livez", herald.http), &[], "").await;
    assert_eq!(status, 200);
    // Give the edge time to register with the embedded registry (a one-member election, then one write); its
    // log line is checked below.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    herald.signal("INT");
    let (code, stderr) = herald.wait(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{stderr}");
    let guide = herald
        .stdout_rest
        .recv_timeout(Duration::from_secs(5))
        .unwrap();
    assert!(
        guide.contains(&format!("ws://{}/ws/", herald.http)),
        "{guide}"
    );
    assert!(guide.contains("curl -X POST"), "{guide}");
    assert!(stderr.contains("DEV MODE"), "{stderr}");
    assert!(stderr.contains("SIGINT"), "{stderr}");
    // `herald dev` is a one-member cluster: its edge registered with the embedded registry.
    assert!(stderr.contains("registered with the registry"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_readiness_then_sockets_then_exits_zero() {
    let mut herald = Herald::spawn(&[
        "dev",
        "--port",
        "0",
        "--grpc-port",
        "0",
        "--set",
        "shutdown.drain-delay-ms=1500",
    ]);
    let base = format!("http://{}", herald.http);
    let ws_url = format!("ws://{}/ws/", herald.http);
    assert_eq!(
        http_request("GET", &format!("{base}/readyz"), &[], "")
            .await
            .0,
        200
    );
    let mut client = WsClient::connect(&ws_url, &[]).await;
    assert_eq!(client.recv_json().await["is_authorized"], true);
    client.subscribe(json!("r"), json!({"a": 1})).await;

    herald.signal("TERM");
    // Readiness fails first, while plain HTTP is still served...
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = http_request("GET", &format!("{base}/readyz"), &[], "").await;
        if status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "readyz never failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...new WebSocket upgrades are refused...
    match WsClient::try_connect(&ws_url, &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!(
            "expected 503 while draining, got {:?}",
            other.map(|_| "a connection")
        ),
    }
    // ...then every socket is told the server is going away.
    assert_eq!(client.expect_close().await, Ended::Closed(Some(1001)));
    let (code, stderr) = herald.wait(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("draining"), "{stderr}");
    assert!(!stderr.contains("deadline cut"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_is_enforced_and_reported() {
    let mut herald = Herald::spawn(&[
        "dev",
        "--port",
        "0",
        "--grpc-port",
        "0",
        "--set",
        "shutdown.drain-timeout-ms=300",
    ]);
    // This client never reads again, so it never answers the server's close frame.
    let mut client = WsClient::connect(&format!("ws://{}/ws/", herald.http), &[]).await;
    client.recv_json().await;
    let started = Instant::now();
    herald.signal("TERM");
    let (code, stderr) = herald.wait(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("drain deadline cut the drain short"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(client);
}

#[test]
fn a_port_in_use_exits_69_naming_it() {
    // Held by this test for the whole run: herald's listener (with SO_REUSEADDR) must still be refused.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, stderr) = run_to_exit(&["dev", "--port", &port], &[]);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    drop(taken);
}
