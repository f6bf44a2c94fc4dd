//! `herald ctl round-trip`, the check the Helm chart's `helm test` pod runs: against real `herald edge` processes
//! (the production role, with static or JWT auth and API keys), across two edges of a cluster (subscribe on one,
//! publish on the other, over HTTP and gRPC), and its exit codes when the key, the room or the edge is wrong.

mod support;

use std::process::Command;

use serde_json::Value;
use support::procs::{free_port, Dir, Proc, HERALD};

const SECRET: &str = "round-trip-test-secret-0123456789";
const API_KEY: &str = "round-trip-key";
const JWT_SECRET: &str = "round-trip-jwt-secret";

/// `herald edge` with `yaml` as its herald.yaml, plus `--set` overrides.
fn edge(config: &Dir, yaml: &str, sets: &[String]) -> Proc {
    let path = config.0.join(format!("herald-{}.yaml", free_port()));
    std::fs::write(&path, yaml).unwrap();
    let mut args: Vec<String> = vec![
        "edge".into(),
        "--config".into(),
        path.display().to_string(),
        "--port".into(),
        "0".into(),
        "--grpc-port".into(),
        "0".into(),
    ];
    for set in sets {
        args.extend(["--set".into(), set.clone()]);
    }
    Proc::spawn(&args)
}

fn static_auth() -> String {
    format!(
        "auth:\n  method: static\n  static-rooms:\n    - {{helm: test}}\n  api-keys: [{API_KEY}]\n"
    )
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `herald ctl round-trip <args>` with `env`, and no other `HERALD_*` variable of the test's environment.
fn round_trip(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut command = Command::new(HERALD);
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") {
            command.env_remove(key);
        }
    }
    let output = command
        .args(["ctl", "round-trip"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run herald ctl round-trip");
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn subscribes_on_one_edge_and_sees_publishes_from_another_over_http_and_grpc() {
    let port = free_port();
    let registry_addr = format!("127.0.0.1:{port}");
    let data = Dir::new("round-trip-r1");
    let _registry = Proc::spawn(&[
        "registry".into(),
        "--node-id".into(),
        "0".into(),
        "--listen".into(),
        registry_addr.clone(),
        "--peers".into(),
        format!("0={registry_addr}"),
        "--data-dir".into(),
        data.0.display().to_string(),
        "--cluster-secret".into(),
        SECRET.into(),
    ]);
    let config = Dir::new("round-trip-config");
    let cluster = |id: &str| {
        vec![
            format!("cluster.registry={registry_addr}"),
            format!("cluster.secret={SECRET}"),
            "cluster.peer-port=0".into(),
            format!("cluster.edge-id={id}"),
        ]
    };
    let a = edge(&config, &static_auth(), &cluster("edge-a"));
    let b = edge(&config, &static_auth(), &cluster("edge-b"));

    // The key list as the chart's Secret holds it: the first key is used.
    let keys = format!("{API_KEY},another-key");
    let outcome = round_trip(
        &[
            "--edge",
            &a.field("http"),
            "--publish-edge",
            &b.field("http"),
            "--grpc",
            &b.field("grpc"),
            "--room",
            r#"{"helm":"test"}"#,
            "--output",
            "json",
        ],
        &[("HERALD_CTL_API_KEY", &keys)],
    );
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
    let report: Value = serde_json::from_str(&outcome.stdout).unwrap();
    assert_eq!(report["ok"], true);
    let legs = report["deliveries"].as_array().unwrap();
    assert_eq!(legs.len(), 2, "{report}");
    assert_eq!(legs[0]["via"], "http");
    assert_eq!(legs[1]["via"], "grpc");
    for leg in legs {
        assert!(leg["publishes"].as_u64().unwrap() >= 1, "{report}");
    }
}

#[test]
fn a_standalone_edge_round_trips_and_wrong_keys_rooms_and_addresses_have_their_exit_codes() {
    let config = Dir::new("round-trip-standalone");
    let node = edge(&config, &static_auth(), &[]);
    let http = node.field("http");
    let grpc = node.field("grpc");

    let ok = round_trip(
        &[
            "--edge",
            &http,
            "--grpc",
            &grpc,
            "--room",
            r#"{"helm":"test"}"#,
        ],
        &[("HERALD_CTL_API_KEY", API_KEY)],
    );
    assert_eq!(ok.code, Some(0), "{}", ok.stderr);
    assert!(
        ok.stdout
            .starts_with("round trip ok: subscribed to {\"helm\":\"test\"}"),
        "{}",
        ok.stdout
    );
    assert!(
        ok.stdout.contains("grpc publish delivered"),
        "{}",
        ok.stdout
    );

    // A key the edge does not know: 77.
    let refused = round_trip(
        &["--edge", &http, "--room", r#"{"helm":"test"}"#],
        &[("HERALD_CTL_API_KEY", "not-a-key")],
    );
    assert_eq!(refused.code, Some(77), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("refused the API key"),
        "{}",
        refused.stderr
    );

    // A room the edge's auth does not allow: 77, naming the room.
    let room = round_trip(
        &["--edge", &http, "--room", r#"{"other":"room"}"#],
        &[("HERALD_CTL_API_KEY", API_KEY)],
    );
    assert_eq!(room.code, Some(77), "{}", room.stderr);
    assert!(room.stderr.contains("room-not-found"), "{}", room.stderr);

    // Nothing listening where it publishes: 69.
    let publish_edge = format!("127.0.0.1:{}", free_port());
    let unreachable = round_trip(
        &[
            "--edge",
            &http,
            "--publish-edge",
            &publish_edge,
            "--room",
            r#"{"helm":"test"}"#,
        ],
        &[("HERALD_CTL_API_KEY", API_KEY)],
    );
    assert_eq!(unreachable.code, Some(69), "{}", unreachable.stderr);

    // Nothing listening at all: 69 once the timeout has passed.
    let nowhere = round_trip(
        &["--edge", &publish_edge, "--timeout-secs", "2"],
        &[("HERALD_CTL_API_KEY", API_KEY)],
    );
    assert_eq!(nowhere.code, Some(69), "{}", nowhere.stderr);
    assert!(
        nowhere.stderr.contains("no WebSocket"),
        "{}",
        nowhere.stderr
    );

    // Not JSON: 64.
    let usage = round_trip(&["--edge", &http, "--room", "helm=test"], &[]);
    assert_eq!(usage.code, Some(64), "{}", usage.stderr);
}

#[test]
fn with_jwt_auth_it_signs_its_own_token() {
    let config = Dir::new("round-trip-jwt");
    let yaml = format!(
        "auth:\n  method: jwt\n  jwt:\n    hs256-secret: {JWT_SECRET}\n  api-keys: [{API_KEY}]\n"
    );
    let node = edge(&config, &yaml, &[]);
    let http = node.field("http");

    let ok = round_trip(
        &["--edge", &http, "--room", r#"{"herald":"round-trip"}"#],
        &[
            ("HERALD_CTL_API_KEY", API_KEY),
            ("HERALD_CTL_JWT_HS256_SECRET", JWT_SECRET),
        ],
    );
    assert_eq!(ok.code, Some(0), "{}", ok.stderr);

    // Without a token the edge refuses the WebSocket: 77, saying why.
    let anonymous = round_trip(&["--edge", &http], &[("HERALD_CTL_API_KEY", API_KEY)]);
    assert_eq!(anonymous.code, Some(77), "{}", anonymous.stderr);
    assert!(
        anonymous.stderr.contains("did not authorize"),
        "{}",
        anonymous.stderr
    );

    // A token signed with another secret is refused the same way.
    let forged = round_trip(
        &["--edge", &http],
        &[
            ("HERALD_CTL_API_KEY", API_KEY),
            ("HERALD_CTL_JWT_HS256_SECRET", "some-other-secret"),
        ],
    );
    assert_eq!(forged.code, Some(77), "{}", forged.stderr);
}
