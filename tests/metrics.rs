//! `/metrics` against its documentation: real processes (`herald dev` with a route, so every edge, cluster,
//! bridge and embedded-registry family is there, and a standalone `herald registry --metrics-addr`) are scraped,
//! their text is parsed, and every family documented in docs/metrics.md must be exported with the documented
//! type and labels, and every exported family must be documented. The naming rules are checked on what is
//! exported, and the Grafana dashboard may only use documented series.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::procs::{free_port, Dir, Proc};
use support::*;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// A family as documented or as exported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
    place: String,
}

/// docs/metrics.md's table: name -> family.
fn documented() -> BTreeMap<String, Family> {
    let doc = std::fs::read_to_string(format!("{ROOT}/docs/metrics.md")).unwrap();
    let mut families = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `herald_")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let name = cells[0].trim_matches('`').to_owned();
        let labels = cells[2]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty() && l != "–")
            .collect();
        let family = Family {
            kind: cells[1].to_owned(),
            labels,
            place: cells[3].to_owned(),
        };
        assert!(
            families.insert(name.clone(), family).is_none(),
            "{name} documented twice"
        );
    }
    assert!(families.len() > 20, "docs/metrics.md has no table?");
    families
}

/// Parses Prometheus text into families (type and label names); panics on a malformed line, a sample without
/// a `# TYPE`, or a family without `# HELP`.
fn parse(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(!help.trim().is_empty(), "{name} has an empty HELP");
            helped.insert(name.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            families.insert(
                name.to_owned(),
                Family {
                    kind: kind.to_owned(),
                    labels: BTreeSet::new(),
                    place: String::new(),
                },
            );
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample: series value");
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "bad value in {line:?}"
        );
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        let family = families
            .keys()
            .find(|f| {
                name == f.as_str()
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(f.as_str()))
            })
            .cloned()
            .unwrap_or_else(|| panic!("sample {name} has no # TYPE before it"));
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (label, value) = pair.split_once("=\"").expect("label=\"value\"");
            assert!(!value.is_empty() || pair.ends_with('"'), "{line}");
            if label != "le" {
                families
                    .get_mut(&family)
                    .unwrap()
                    .labels
                    .insert(label.to_owned());
            }
        }
    }
    for name in families.keys() {
        assert!(helped.contains(name), "{name} has no # HELP");
    }
    families
}

/// Prometheus naming and herald's cardinality rules.
fn check_names(families: &BTreeMap<String, Family>) {
    for (name, family) in families {
        assert!(name.starts_with("herald_"), "{name}: no herald_ prefix");
        match family.kind.as_str() {
            "counter" => assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            ),
            "gauge" => assert!(!name.ends_with("_total"), "gauge {name} ends in _total"),
            "histogram" => assert!(
                name.ends_with("_seconds"),
                "histogram {name}: base unit seconds"
            ),
            other => panic!("{name}: unexpected type {other}"),
        }
        assert!(
            !name.contains("milliseconds") && !name.contains("_ms"),
            "{name}: use base units"
        );
        for label in &family.labels {
            assert!(
                ![
                    "room",
                    "user",
                    "user_id",
                    "connection",
                    "connection_id",
                    "conn_id"
                ]
                .contains(&label.as_str()),
                "{name} has a high-cardinality label {label}"
            );
        }
    }
}

async fn scrape(addr: &str) -> String {
    let (status, text) = http_request("GET", &format!("http://{addr}/metrics"), &[], "").await;
    assert_eq!(status, 200, "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_series_is_exported_and_every_exported_one_is_documented() {
    let documented = documented();
    let dir = Dir::new("metrics");
    let config = dir.0.join("herald.yaml");
    // A room route to a webhook that cannot answer: bridge counters and a supervised destination task exist.
    std::fs::write(
        &config,
        "endpoints:\n  changes: {kind: room, room: {src: \"*\"}}\n  hook: {kind: webhook, url: \"http://127.0.0.1:1/\"}\nroutes:\n  notify: {from: changes, to: [hook]}\n",
    )
    .unwrap();
    let dev = Proc::spawn(&[
        "dev".into(),
        "--config".into(),
        config.display().to_string(),
        "--port".into(),
        "0".into(),
        "--grpc-port".into(),
        "0".into(),
    ]);
    let registry = Proc::spawn(&[
        "registry".into(),
        "--node-id".into(),
        "1".into(),
        "--listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--data-dir".into(),
        dir.0.join("r1").display().to_string(),
        "--cluster-secret".into(),
        "metrics-test-secret-0123456789".into(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
    ]);

    // The route becomes active once the edge has written it to its embedded registry and seen it back.
    let deadline = Instant::now() + Duration::from_secs(20);
    let dev_text = loop {
        let text = scrape(&dev.field("http")).await;
        if text.contains("herald_bridge_task_up{")
            && text.contains("herald_bridge_messages_failed_total{")
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the route never became active:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let dev_families = parse(&dev_text);
    check_names(&dev_families);
    for (name, family) in &dev_families {
        let doc = documented.get(name).unwrap_or_else(|| {
            panic!("{name} is exported by herald dev but not in docs/metrics.md")
        });
        assert_eq!(doc.kind, family.kind, "{name}: documented type");
        assert_eq!(doc.labels, family.labels, "{name}: documented labels");
    }
    for name in documented.keys() {
        assert!(
            dev_families.contains_key(name),
            "{name} is documented but herald dev does not export it"
        );
    }

    // The standalone member: only registry series, all documented as such; /readyz once it leads.
    let metrics_addr = registry.field("metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) =
            http_request("GET", &format!("http://{metrics_addr}/readyz"), &[], "").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "registry never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let registry_text = scrape(&metrics_addr).await;
    let registry_families = parse(&registry_text);
    check_names(&registry_families);
    let expected: BTreeSet<&String> = documented
        .iter()
        .filter(|(_, f)| f.place == "registry")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        registry_families.keys().collect::<BTreeSet<_>>(),
        expected,
        "the registry exports exactly the registry rows"
    );
    assert!(registry_text.contains("herald_registry_is_leader 1"));
    assert!(registry_text.contains("herald_registry_state{role=\"leader\"} 1"));
}

#[test]
fn the_grafana_dashboard_uses_only_documented_series() {
    let documented = documented();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/deploy/grafana/herald.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut expressions = Vec::new();
    fn collect(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    if key == "expr" {
                        out.push(v.as_str().unwrap_or_default().to_owned());
                    } else {
                        collect(v, out);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut expressions);
    assert!(expressions.len() >= 10, "the dashboard has panels");
    let mut used = BTreeSet::new();
    for expr in &expressions {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("herald_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|base| documented.get(*base).is_some_and(|f| f.kind == "histogram"))
                })
                .unwrap_or(&name)
                .to_owned();
            assert!(
                documented.contains_key(&family),
                "the dashboard uses {name}, which docs/metrics.md does not list ({expr})"
            );
            used.insert(family);
            rest = &rest[at + name.len()..];
        }
    }
    for needed in [
        "herald_connections",
        "herald_messages_delivered_total",
        "herald_publish_to_delivery_seconds",
        "herald_messages_dropped_total",
        "herald_registry_commit_index",
        "herald_registry_apply_lag",
        "herald_peer_queue_depth",
        "herald_bridge_messages_failed_total",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}
