//! `herald ctl` against a real `herald edge` process through its admin API: connections and rooms (paged and
//! filtered), disconnect by connection and by user (the clients see close code 4010), drain without exiting,
//! stop, and the refusals: no token, a wrong token (exit 77, counted), bad parameters (400 with the reason), an
//! unreachable node (exit 69) and a disconnect that matches nothing (exit 66). Users come from a real HTTP
//! backend answering the bootstrap call.

mod support;

use std::collections::BTreeSet;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::procs::{Proc, HERALD};
use support::*;

const TOKEN: &str = "admin-test-token-0123";

fn ctl(admin: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(HERALD);
    command
        .env_remove("HERALD_ADMIN_TOKEN")
        .args(["ctl", "--admin", admin]);
    if let Some(token) = token {
        command.args(["--admin-token", token]);
    }
    command.args(args).output().expect("run herald ctl")
}

fn ctl_json(admin: &str, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = ctl(admin, Some(TOKEN), &all);
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctl --output json prints JSON")
}

fn ids(doc: &Value) -> Vec<String> {
    doc["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A connection as `user`, subscribed to board `board`.
async fn connect_as(backend: &Backend, http: &str, user: &str, board: u32) -> WsClient {
    backend.set(BackendAnswer::ok(
        json!({"allowed_rooms": [{"board": "*"}], "user_id": user}),
    ));
    let mut client = WsClient::connect(&format!("ws://{http}/ws/"), &[]).await;
    let hello = client.recv_json().await;
    assert_eq!(hello["is_authorized"], true, "{hello}");
    let reply = client
        .subscribe(json!(format!("{user}-{board}")), json!({ "board": board }))
        .await;
    assert_eq!(reply["code"], "success", "{reply}");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_lists_pages_disconnects_drains_and_stops_a_node() {
    let backend = Backend::start(BackendAnswer::ok(json!({"allowed_rooms": []}))).await;
    let node = Proc::spawn(&[
        "edge".into(),
        "--port".into(),
        "0".into(),
        "--grpc-port".into(),
        "0".into(),
        "--set".into(),
        format!("auth.api-url=http://{}/", backend.addr),
        "--set".into(),
        format!("admin.token={TOKEN}"),
        "--set".into(),
        "shutdown.drain-delay-ms=300".into(),
    ]);
    let http = node.field("http");
    let admin = node.field("admin");

    let mut alice = Vec::new();
    for _ in 0..3 {
        alice.push(connect_as(&backend, &http, "alice", 1).await);
    }
    let mut bob = Vec::new();
    for _ in 0..2 {
        bob.push(connect_as(&backend, &http, "bob", 2).await);
    }

    // Paging: 2 per page, following `next`, visits every connection once, in id order.
    let first = ctl_json(&admin, &["connections", "--limit", "2"]);
    assert_eq!(first["matched"], 5);
    assert_eq!(ids(&first).len(), 2);
    let mut seen = ids(&first);
    let mut next = first["next"].as_str().map(str::to_owned);
    while let Some(after) = next {
        let page = ctl_json(&admin, &["connections", "--limit", "2", "--after", &after]);
        seen.extend(ids(&page));
        next = page["next"].as_str().map(str::to_owned);
    }
    assert_eq!(seen.len(), 5);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "pages come in id order");
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 5);
    let all = ctl_json(&admin, &["connections", "--all", "--limit", "2"]);
    assert_eq!(ids(&all), seen);

    // Filters.
    let bobs = ctl_json(&admin, &["connections", "--user", "bob"]);
    assert_eq!(bobs["matched"], 2);
    assert!(bobs["connections"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["user"] == "bob" && c["subscriptions"] == 1));
    let on_board_1 = ctl_json(&admin, &["connections", "--room", r#"{"board":1}"#]);
    assert_eq!(on_board_1["matched"], 3);
    let any_board = ctl_json(&admin, &["connections", "--room", r#"{"board":"*"}"#]);
    assert_eq!(any_board["matched"], 5);

    let rooms = ctl_json(&admin, &["rooms"]);
    assert_eq!(
        rooms["rooms"],
        json!([{"room": {"board": 1}, "subscriptions": 3}, {"room": {"board": 2}, "subscriptions": 2}])
    );
    let prefixed = ctl_json(&admin, &["rooms", "--prefix", r#"{"board":2"#]);
    assert_eq!(prefixed["matched"], 1);
    let text = ctl(&admin, Some(TOKEN), &["rooms"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("{\"board\":1}\t3"), "{text}");

    // Hostile parameters: a clear 400 each, a huge limit is capped rather than refused.
    for (query, reason) in [
        ("limit=-1", "limit must be a positive integer"),
        ("limit=0", "limit must be at least 1"),
        ("limit=abc", "limit must be a positive integer"),
        ("room=not-json", "room must be a room as JSON"),
        ("room=%ZZ", "bad percent-escape"),
        ("colour=red", "unknown parameter"),
    ] {
        let (status, body) = http_request(
            "GET",
            &format!("http://{admin}/admin/connections?{query}"),
            &[("authorization", &format!("Bearer {TOKEN}"))],
            "",
        )
        .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(reason), "{query}: {body}");
    }
    let (status, body) = http_request(
        "GET",
        &format!("http://{admin}/admin/connections?limit=1000000"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Refusals: no token and a wrong one exit 77 and are counted; nobody listening exits 69.
    for token in [None, Some("wrong-token")] {
        let out = ctl(&admin, token, &["connections"]);
        assert_eq!(out.status.code(), Some(77), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("refused the admin token"));
    }
    let (_, metrics) = http_request("GET", &format!("http://{http}/metrics"), &[], "").await;
    assert!(
        metrics.contains("herald_admin_refused_total 2"),
        "{metrics}"
    );
    let out = ctl("127.0.0.1:1", Some(TOKEN), &["drain"]);
    assert_eq!(out.status.code(), Some(69), "{out:?}");

    // Disconnect one connection by id: that client sees 4010, the others stay.
    let target = ids(&ctl_json(
        &admin,
        &["connections", "--user", "alice", "--limit", "1"],
    ))[0]
        .clone();
    let closed = ctl_json(&admin, &["disconnect", &target]);
    assert_eq!(closed["closed"], 1);
    let mut closed_alices = 0;
    for client in &mut alice {
        if let Ok(ended) =
            tokio::time::timeout(Duration::from_millis(300), client.expect_close()).await
        {
            assert!(matches!(ended, Ended::Closed(Some(4010))), "{ended:?}");
            closed_alices += 1;
        }
    }
    assert_eq!(closed_alices, 1);
    // The hub forgets the connection once its socket task has ended.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ctl_json(&admin, &["connections"])["matched"] != 4 {
        assert!(
            Instant::now() < deadline,
            "the closed connection is still listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every connection of a user.
    let closed = ctl_json(&admin, &["disconnect", "--user", "bob"]);
    assert_eq!(closed["closed"], 2);
    for client in &mut bob {
        assert!(matches!(
            client.expect_close().await,
            Ended::Closed(Some(4010))
        ));
    }
    let none = ctl(&admin, Some(TOKEN), &["disconnect", "--user", "bob"]);
    assert_eq!(none.status.code(), Some(66), "{none:?}");

    // Drain without exiting: readyz fails, upgrades are refused, the sockets get 1001, the process stays up.
    let drained = ctl_json(&admin, &["drain"]);
    assert_eq!(drained["draining"], true);
    let (status, _) = http_request("GET", &format!("http://{http}/readyz"), &[], "").await;
    assert_eq!(status, 503);
    assert!(WsClient::try_connect(&format!("ws://{http}/ws/"), &[])
        .await
        .is_err());
    let mut remaining = 0;
    for client in &mut alice {
        if let Ok(ended) = tokio::time::timeout(Duration::from_secs(5), client.expect_close()).await
        {
            if matches!(ended, Ended::Closed(Some(1001))) {
                remaining += 1;
            }
        }
    }
    assert_eq!(remaining, 2, "the two remaining connections got 1001");
    assert_eq!(ctl_json(&admin, &["drain"])["already_draining"], true);
    let status = ctl_json(&admin, &["status"]);
    assert_eq!(status["draining"], true);
    let text = ctl(&admin, Some(TOKEN), &["status"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("DRAINING"));
    let (status, _) = http_request("GET", &format!("http://{http}/livez"), &[], "").await;
    assert_eq!(status, 200, "still alive after the drain");

    // Stop: the process exits 0.
    let stopping = ctl_json(&admin, &["stop"]);
    assert_eq!(stopping["stopping"], true);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut node = node;
    let exit = loop {
        if let Some(status) = node.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not exit after ctl stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(0));
}
