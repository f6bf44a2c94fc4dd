//! The smoke scenario end to end, as `make test` runs it: the real `herald-loadtest` binary starts a real
//! `herald dev` process, its workers connect and subscribe, the coordinator publishes for a few seconds, and the
//! run must account for every delivery and write its report files. The failover smoke does the same against a
//! 3-registry, 3-edge cluster while the harness SIGKILLs the registry leader once and an edge once.
//!
//! It needs the `herald` binary of the same cargo profile (target/<profile>/herald), which
//! `cargo test --workspace` builds; alone, run `cargo build -p herald` first. No timing is asserted: on a shared
//! machine that would be a flaky benchmark, not a test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

const LOADTEST: &str = env!("CARGO_BIN_EXE_herald-loadtest");

/// The runs take turns: both at once on a 2-core machine would only make each slower.
static RUNS: Mutex<()> = Mutex::new(());

fn herald_bin() -> PathBuf {
    let dir = Path::new(LOADTEST).parent().expect("binary directory");
    let herald = dir.join("herald");
    assert!(
        herald.is_file(),
        "{} is missing: build it with `cargo build -p herald` (cargo test --workspace does)",
        herald.display()
    );
    herald
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn smoke_scenario_delivers_everything_and_writes_reports() {
    let _turn = RUNS.lock().unwrap_or_else(|e| e.into_inner());
    let out =
        TempDir(std::env::temp_dir().join(format!("herald-loadtest-smoke-{}", std::process::id())));
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/smoke.toml");
    let output = Command::new(LOADTEST)
        .arg("run")
        .arg(&scenario)
        .arg("--herald-bin")
        .arg(herald_bin())
        .arg("--out")
        .arg(&out.0)
        .arg("--quiet")
        .output()
        .expect("run herald-loadtest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "herald-loadtest failed ({}):\n{stdout}\n{stderr}",
        output.status
    );

    let result: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.0.join("result.json")).expect("result.json written"),
    )
    .expect("result.json is JSON");
    assert_eq!(result["passed"], true, "{result:#}");
    // The smoke scenario checks correctness only: it has no performance targets to meet or miss.
    assert_eq!(result["targets"], serde_json::json!([]), "{result:#}");
    assert_eq!(result["verdict"], "passed (no performance targets)");
    let delivery = &result["delivery"];
    assert_eq!(delivery["lost"], 0, "{delivery:#}");
    assert_eq!(delivery["duplicates"], 0, "{delivery:#}");
    assert_eq!(delivery["reordered"], 0, "{delivery:#}");
    assert_eq!(delivery["unparsed_or_misrouted"], 0, "{delivery:#}");
    // 200 subscribers, 10 per room, 200 publishes/s for 3 s: every publish reaches its room's 10 members.
    let sent = result["publish"]["sent"].as_u64().expect("sent");
    assert!(sent > 0);
    assert_eq!(delivery["delivered"].as_u64(), Some(sent * 10));
    assert_eq!(result["connect"]["subscribed"], 200);
    assert!(result["latency"]["same_node"]["count"].as_u64() > Some(0));

    let report = std::fs::read_to_string(out.0.join("report.md")).expect("report.md written");
    assert!(
        report.contains("| deliveries/s (first publish to last delivery) |"),
        "{report}"
    );
    let chart = std::fs::read(out.0.join("chart.png")).expect("chart.png written");
    assert!(
        chart.starts_with(b"\x89PNG\r\n\x1a\n"),
        "chart.png is a PNG"
    );
}

/// One registry leader kill and one edge kill under light load: every kill happens, the cut clients all come
/// back, publishers move off the killed edge, and nothing is lost, duplicated or reordered on the live edges.
/// Correctness only: the failover times are reported, never asserted.
#[test]
fn failover_smoke_loses_nothing_on_live_edges() {
    let _turn = RUNS.lock().unwrap_or_else(|e| e.into_inner());
    let out = TempDir(
        std::env::temp_dir().join(format!("herald-loadtest-failover-{}", std::process::id())),
    );
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/failover-smoke.toml");
    let output = Command::new(LOADTEST)
        .arg("run")
        .arg(&scenario)
        .arg("--herald-bin")
        .arg(herald_bin())
        .arg("--out")
        .arg(&out.0)
        .arg("--quiet")
        .output()
        .expect("run herald-loadtest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "herald-loadtest failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let result: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.0.join("result.json")).expect("result.json written"),
    )
    .expect("result.json is JSON");
    assert_eq!(result["passed"], true, "{result:#}");
    let delivery = &result["delivery"];
    for key in ["lost", "duplicates", "reordered", "unparsed_or_misrouted"] {
        assert_eq!(delivery[key], 0, "{key}: {delivery:#}");
    }
    let f = &result["failover"];
    assert_eq!(f["skipped_kills"], 0, "{f:#}");
    assert_eq!(
        f["leader_rounds"].as_array().map(Vec::len),
        Some(1),
        "{f:#}"
    );
    assert!(
        f["leader_rounds"][0]["write_after_secs"].is_number(),
        "a registry write committed after the leader kill: {f:#}"
    );
    assert_eq!(f["edge_kills"].as_array().map(Vec::len), Some(1), "{f:#}");
    let cut = f["clients_cut"].as_u64().expect("clients_cut");
    assert!(cut > 0, "the edge kill cut its subscribers: {f:#}");
    assert_eq!(f["clients_resubscribed"].as_u64(), Some(cut), "{f:#}");
    assert_eq!(f["unexplained_reconnects"], 0, "{f:#}");
    assert!(
        f["publisher_switches"].as_u64() >= Some(1),
        "the killed edge's publisher moved: {f:#}"
    );
    assert_eq!(f["lost_on_live_edges"], 0, "{f:#}");
    // Every delivery a publish owed a subscriber (10 per room) is either delivered or explained by a kill.
    let sent = result["publish"]["sent"].as_u64().expect("sent");
    let explained = f["reconnect_gap"].as_u64().unwrap() + f["in_flight_at_kill"].as_u64().unwrap();
    assert_eq!(
        delivery["delivered"].as_u64().unwrap() + explained,
        sent * 10,
        "{result:#}"
    );
    let report = std::fs::read_to_string(out.0.join("report.md")).expect("report.md written");
    assert!(
        report.contains("| lost on live edges (missing deliveries no kill explains) | 0 |"),
        "{report}"
    );
}

#[test]
fn failover_against_a_peer_is_not_applicable_not_a_failure() {
    let out =
        TempDir(std::env::temp_dir().join(format!("herald-loadtest-na-{}", std::process::id())));
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/failover.toml");
    // The peer is never started, so this needs no nats-server.
    let output = Command::new(LOADTEST)
        .arg("run")
        .arg(&scenario)
        .args(["--target", "nats", "--quiet", "--out"])
        .arg(&out.0)
        .output()
        .expect("run herald-loadtest");
    assert!(output.status.success(), "{output:?}");
    let report = std::fs::read_to_string(out.0.join("report.md")).expect("report.md written");
    assert!(report.contains("**Result: not applicable**"), "{report}");
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.0.join("result.json")).unwrap()).unwrap();
    assert_eq!(result["verdict"], "not applicable");
}

#[test]
fn bad_scenarios_exit_64_with_the_reason() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("herald-loadtest-bad-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("bad.toml");
    std::fs::write(
        &file,
        "name = \"bad\"\nduration_secs = 1\n[clients]\nconnections = 10\nrooms = 2\nmembrs = 5\n",
    )
    .unwrap();
    let output = Command::new(LOADTEST)
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("membrs"), "{stderr}");
}

/// The smoke scenario published through herald's Redis bridge (`--publish-api redis`): the harness starts a
/// private `redis-server` (Debian's package, which `scripts/install-test-deps.sh` installs) and herald with a
/// route from it into the rooms, and every PUBLISH must reach every subscriber of its room exactly once, in order.
#[test]
fn smoke_scenario_through_the_redis_bridge_delivers_everything() {
    assert!(
        ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .iter()
            .any(|p| Path::new(p).is_file()),
        "redis-server is not installed: run scripts/install-test-deps.sh (Debian package redis-server)"
    );
    let out = TempDir(std::env::temp_dir().join(format!(
        "herald-loadtest-smoke-redis-{}",
        std::process::id()
    )));
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/smoke.toml");
    let output = Command::new(LOADTEST)
        .arg("run")
        .arg(&scenario)
        .args(["--publish-api", "redis"])
        .arg("--herald-bin")
        .arg(herald_bin())
        .arg("--out")
        .arg(&out.0)
        .arg("--quiet")
        .output()
        .expect("run herald-loadtest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "herald-loadtest failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let result: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.0.join("result.json")).expect("result.json written"),
    )
    .expect("result.json is JSON");
    assert_eq!(result["passed"], true, "{result:#}");
    assert_eq!(
        result["publish_api"], "Redis PUBLISH through herald's bridge",
        "{result:#}"
    );
    let delivery = &result["delivery"];
    for key in ["lost", "duplicates", "reordered", "unparsed_or_misrouted"] {
        assert_eq!(delivery[key], 0, "{key}: {delivery:#}");
    }
    let sent = result["publish"]["sent"].as_u64().expect("sent");
    assert!(sent > 0);
    assert_eq!(result["publish"]["accepted"].as_u64(), Some(sent));
    assert_eq!(delivery["delivered"].as_u64(), Some(sent * 10));
    // herald's own counters agree: every PUBLISH of the run (not the probe's) went in and out of the route.
    let bridge = &result["bridge"];
    assert_eq!(bridge["messages_in"].as_u64(), Some(sent), "{bridge:#}");
    assert_eq!(bridge["messages_out"].as_u64(), Some(sent), "{bridge:#}");
    assert_eq!(bridge["failed"], serde_json::json!([]), "{bridge:#}");
    assert_eq!(bridge["source_restarts"], 0, "{bridge:#}");
    let servers: Vec<&str> = result["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(servers.contains(&"redis-server"), "{servers:?}");
    let report = std::fs::read_to_string(out.0.join("report.md")).expect("report.md written");
    assert!(
        report.contains("| herald bridge: messages in / into rooms / not carried |"),
        "{report}"
    );
}

#[test]
fn the_redis_bridge_is_not_applicable_to_peers() {
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/bridge-redis.toml");
    let output = Command::new(LOADTEST)
        .arg("run")
        .arg(&scenario)
        .args(["--target", "nats", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not applicable to nats"), "{stderr}");
}
