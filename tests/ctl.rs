//! `herald ctl cluster ...` against real `herald registry` processes on loopback: status, growing the group with
//! a learner that is then promoted, removing an original member, and the exit codes for a wrong secret, an
//! unreachable registry, bad arguments and an unsafe removal.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::procs::{free_port, Dir, Proc, HERALD};

const SECRET: &str = "ctl-test-secret-0123456789";

fn registry(node_id: u64, port: u16, peers: &[String], dir: &Dir) -> Proc {
    Proc::spawn(&[
        "registry".into(),
        "--node-id".into(),
        node_id.to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--peers".into(),
        peers.join(","),
        "--data-dir".into(),
        dir.0.display().to_string(),
        "--cluster-secret".into(),
        SECRET.into(),
    ])
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: {:?} / {:?}", self.stdout, self.stderr))
    }
}

/// Runs `herald ctl <args>` with the registry and secret passed through the environment (the other way to give
/// them), and any other `HERALD_*` variable of the test's own environment removed.
fn ctl(registry: &str, secret: &str, args: &[&str]) -> Outcome {
    let mut command = Command::new(HERALD);
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") {
            command.env_remove(key);
        }
    }
    let output = command
        .arg("ctl")
        .args(args)
        .env("HERALD_CTL_REGISTRY", registry)
        .env("HERALD_CLUSTER_SECRET", secret)
        .output()
        .expect("run herald ctl");
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `ctl ... --output json cluster status` until `done` holds for it, within 30 seconds.
fn wait_for_status(registry: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        let out = ctl(registry, SECRET, &["--output", "json", "cluster", "status"]);
        if out.code == Some(0) {
            let status = out.json();
            if done(&status) {
                return status;
            }
            last = status.to_string();
        } else {
            last = format!("exit {:?}: {}", out.code, out.stderr);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}; last status: {last}");
}

fn voter_ids(status: &Value) -> Vec<u64> {
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "voter")
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

fn member(status: &Value, id: u64) -> Option<&Value> {
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
}

/// Registers an edge the way `herald edge` does, without running one: only its registry entry matters here.
fn register_edge(registry: &str, edge: &str, peer_addr: &str, room: &str) {
    let secret = herald_registry::ClusterSecret::new(SECRET).unwrap();
    let addrs = registry.split(',').map(str::to_owned).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Inside the runtime: the client's channels are made lazily and need one to exist.
    runtime
        .block_on(async {
            let client = herald_registry::RegistryClient::new(addrs, secret).unwrap();
            let ttl = Duration::from_secs(300);
            client
                .register(edge, peer_addr, ttl, vec![room.to_owned()])
                .await
        })
        .expect("register an edge");
}

#[test]
fn status_add_learner_promote_and_remove() {
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let peers: Vec<String> = (0..3).map(|i| format!("{}={}", i + 1, addr(i))).collect();
    let dirs: Vec<Dir> = (1..=5).map(|i| Dir::new(&format!("r{i}"))).collect();
    let mut procs: Vec<Proc> = (0..3)
        .map(|i| registry(i as u64 + 1, ports[i], &peers, &dirs[i]))
        .collect();
    let members = (0..3).map(addr).collect::<Vec<_>>().join(",");

    let status = wait_for_status(&members, "a leader and 3 voters", |s| {
        s["leader"]["id"].is_u64() && voter_ids(s).len() == 3
    });
    assert_eq!(voter_ids(&status), [1, 2, 3]);
    let leader = status["leader"]["id"].as_u64().unwrap();
    assert_eq!(
        status["leader"]["addr"],
        addr(leader as usize - 1),
        "{status}"
    );
    assert!(status["term"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["revision"].is_u64(), "{status}");

    // An edge registered with the registry shows up with its peer address, room count and lease age.
    register_edge(&members, "edge-a", "127.0.0.1:9", r#"{"chat":"lobby"}"#);
    let status = wait_for_status(&members, "edge-a registered", |s| {
        s["edges"].as_array().is_some_and(|e| e.len() == 1)
    });
    let edge = &status["edges"][0];
    assert_eq!(
        (&edge["edge"], &edge["peer_addr"], &edge["rooms"]),
        (&"edge-a".into(), &"127.0.0.1:9".into(), &1.into()),
        "{status}"
    );
    assert!(edge["lease_age_ms"].is_u64(), "{status}");

    // The human tables have every member and the edge.
    let text = ctl(&members, SECRET, &["cluster", "status"]);
    assert_eq!(text.code, Some(0), "{}", text.stderr);
    assert!(
        text.stdout.contains(&format!("leader: {leader} (")),
        "{}",
        text.stdout
    );
    for i in 0..3 {
        assert!(text.stdout.contains(&addr(i)), "{}", text.stdout);
    }
    assert!(text.stdout.contains("edge-a"), "{}", text.stdout);

    // Bad arguments and refused requests exit 64 without changing anything.
    let missing = ctl(&members, SECRET, &["cluster", "promote"]);
    assert_eq!(missing.code, Some(64), "{}", missing.stderr);
    let not_learner = ctl(&members, SECRET, &["cluster", "promote", "--node-id", "2"]);
    assert_eq!(not_learner.code, Some(64), "{}", not_learner.stderr);
    assert!(
        not_learner.stderr.contains("already a voter"),
        "{}",
        not_learner.stderr
    );
    let unknown = ctl(&members, SECRET, &["cluster", "promote", "--node-id", "9"]);
    assert_eq!(unknown.code, Some(64), "{}", unknown.stderr);
    assert!(
        unknown.stderr.contains("not a member"),
        "{}",
        unknown.stderr
    );

    // A 4th member joins: it lists the running members and a larger id of its own, so it does not bootstrap a
    // cluster of its own but waits to be added.
    let mut peers4 = peers.clone();
    peers4.push(format!("4={}", addr(3)));
    procs.push(registry(4, ports[3], &peers4, &dirs[3]));
    let added = ctl(
        &members,
        SECRET,
        &[
            "--output",
            "json",
            "cluster",
            "add-learner",
            "--node-id",
            "4",
            "--addr",
            &addr(3),
        ],
    );
    assert_eq!(added.code, Some(0), "{}", added.stderr);
    assert_eq!(added.json()["node_id"], 4);
    let status = wait_for_status(&members, "node 4 caught up as a learner", |s| {
        member(s, 4).is_some_and(|m| m["role"] == "learner" && m["lag"].as_u64() == Some(0))
    });
    assert_eq!(member(&status, 4).unwrap()["addr"], addr(3));

    let promoted = ctl(&members, SECRET, &["cluster", "promote", "--node-id", "4"]);
    assert_eq!(promoted.code, Some(0), "{}", promoted.stderr);
    wait_for_status(&members, "4 voters", |s| voter_ids(s) == [1, 2, 3, 4]);

    // Removing one of 4 keeps the tolerance of one failure: no --force needed. Remove node 1, the one that
    // bootstrapped the cluster; node 4 is the way in from now on as well.
    let all = format!("{members},{}", addr(3));
    let removed = ctl(
        &all,
        SECRET,
        &["--output", "json", "cluster", "remove", "--node-id", "1"],
    );
    assert_eq!(removed.code, Some(0), "{}", removed.stderr);
    assert_eq!(removed.json()["voters"], serde_json::json!([2, 3, 4]));
    // Stopped as an operator would: a removed member left running only confuses status answers.
    drop(procs.remove(0));
    let status = wait_for_status(&all, "3 voters without node 1 and a leader", |s| {
        voter_ids(s) == [2, 3, 4] && s["leader"]["id"].is_u64() && s["leader"]["id"] != 1
    });
    assert!(member(&status, 1).is_none(), "{status}");

    // 3 -> 2 voters loses the tolerance of one failure: refused without --force.
    let unsafe_remove = ctl(&all, SECRET, &["cluster", "remove", "--node-id", "2"]);
    assert_eq!(unsafe_remove.code, Some(64), "{}", unsafe_remove.stderr);
    assert!(
        unsafe_remove.stderr.contains("--force"),
        "{}",
        unsafe_remove.stderr
    );
    wait_for_status(&all, "still 3 voters", |s| voter_ids(s) == [2, 3, 4]);

    // A learner that is not wanted after all leaves without touching the voters (and without --force).
    procs.push(registry(
        5,
        ports[4],
        &{
            let mut peers5 = peers4.clone();
            peers5.push(format!("5={}", addr(4)));
            peers5
        },
        &dirs[4],
    ));
    let added = ctl(
        &all,
        SECRET,
        &[
            "cluster",
            "add-learner",
            "--node-id",
            "5",
            "--addr",
            &addr(4),
        ],
    );
    assert_eq!(added.code, Some(0), "{}", added.stderr);
    wait_for_status(&all, "node 5 is a learner", |s| {
        member(s, 5).is_some_and(|m| m["role"] == "learner")
    });
    let dropped = ctl(
        &all,
        SECRET,
        &["--output", "json", "cluster", "remove", "--node-id", "5"],
    );
    assert_eq!(dropped.code, Some(0), "{}", dropped.stderr);
    assert_eq!(dropped.json()["role"], "learner");
    assert_eq!(dropped.json()["voters"], serde_json::json!([2, 3, 4]));
    let status = wait_for_status(&all, "node 5 gone, voters unchanged", |s| {
        member(s, 5).is_none() && voter_ids(s) == [2, 3, 4]
    });
    assert!(member(&status, 5).is_none(), "{status}");
    let gone = ctl(&all, SECRET, &["cluster", "remove", "--node-id", "5"]);
    assert_eq!(gone.code, Some(64), "{}", gone.stderr);
    assert!(gone.stderr.contains("not a member"), "{}", gone.stderr);

    // A wrong secret is refused by the members and reported as such.
    let wrong = ctl(&all, "not-the-cluster-secret-0000", &["cluster", "status"]);
    assert_eq!(wrong.code, Some(77), "{}", wrong.stderr);
    assert!(
        wrong
            .stderr
            .contains("the registry refused the cluster secret"),
        "{}",
        wrong.stderr
    );
}

#[test]
fn an_unreachable_registry_exits_69_naming_the_addresses() {
    // Ports nothing listens on: bound for a moment to find them free, then released.
    let addrs = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let started = Instant::now();
    let out = ctl(&addrs, SECRET, &["cluster", "status"]);
    assert_eq!(out.code, Some(69), "{}", out.stderr);
    for addr in addrs.split(',') {
        assert!(out.stderr.contains(addr), "{}", out.stderr);
    }
    assert!(started.elapsed() < Duration::from_secs(20));

    // No registry at all is a usage error, not an outage.
    let none = ctl("", SECRET, &["cluster", "status"]);
    assert_eq!(none.code, Some(64), "{}", none.stderr);
}
