//! The demo page and `herald.js` in a real browser: headless Chromium, driven over the Chrome DevTools Protocol,
//! loads the page from an in-process edge, subscribes through `herald.js`, and shows a message published over
//! HTTP. Chromium comes from `make test-deps` (scripts/install-test-deps.sh).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const CHROMIUM: &str = "/usr/bin/chromium";

/// How long the page may take to reach a state the test waits for.
const PAGE_WAIT: Duration = Duration::from_secs(15);

/// A headless Chromium child process with its own throwaway profile. Dropping it kills the browser (by its PID)
/// and removes the profile, also when the test panics.
struct Chromium {
    child: Child,
    /// Holds the profile directory and Chromium's log.
    dir: PathBuf,
}

impl Chromium {
    fn launch() -> Chromium {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: the browser test needs Chromium; run `make test-deps` to install it"
        );
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("herald-browser-{}-{nanos}", std::process::id()));
        let profile = dir.join("profile");
        std::fs::create_dir_all(&profile).expect("create the chromium profile directory");
        let log = std::fs::File::create(dir.join("chromium.log")).expect("create chromium.log");
        let child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--remote-debugging-port=0", "about:blank"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {CHROMIUM}: {e}"));
        Chromium { child, dir }
    }

    /// The last lines Chromium wrote to stderr, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits for Chromium to write the DevTools port it picked into `DevToolsActivePort`.
    async fn devtools_port(&mut self) -> u16 {
        let file = self.dir.join("profile").join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // The file is written in one go, but only trust a first line that is complete.
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Some((first, _)) = text.split_once('\n') {
                    return first
                        .trim()
                        .parse()
                        .expect("DevToolsActivePort holds a port");
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "chromium exited with {status} before opening DevTools:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromium wrote no DevToolsActivePort within 20 s:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SIGTERM first: Chromium then ends its own helper processes (zygote, renderers) and stops writing to the
        // profile. A bare SIGKILL orphans the helpers, which can recreate files while the profile is removed.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for _ in 0..20 {
            match std::fs::remove_dir_all(&self.dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => break,
            }
        }
    }
}

/// A DevTools connection to one page target.
struct Page {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Uncaught exceptions and console errors the page reported, for failure messages and the final check.
    problems: Vec<String>,
}

impl Page {
    /// Connects to the first page target (the `about:blank` tab Chromium opened).
    async fn attach(devtools_port: u16) -> Page {
        let deadline = Instant::now() + Duration::from_secs(10);
        let ws_url = loop {
            let (status, body) = http_request(
                "GET",
                &format!("http://127.0.0.1:{devtools_port}/json/list"),
                &[],
                "",
            )
            .await;
            assert_eq!(status, 200, "/json/list answered {status}: {body}");
            let targets: Value = serde_json::from_str(&body).expect("/json/list is JSON");
            let page = targets.as_array().and_then(|targets| {
                targets
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            });
            if let Some(url) = page {
                break url.to_owned();
            }
            assert!(Instant::now() < deadline, "no page target in {targets}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(ws_url))
            .await
            .expect("devtools connect timed out")
            .expect("devtools connect");
        let mut page = Page {
            ws,
            next_id: 0,
            problems: vec![],
        };
        page.call("Runtime.enable", json!({})).await.unwrap();
        page
    }

    /// Sends one command and returns its `result`, or its `error`. Events that arrive meanwhile are checked for
    /// page errors and otherwise skipped.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::text(command.to_string()))
            .await
            .expect("send to devtools");
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("devtools did not answer {method} within {STEP:?}"))
                .expect("devtools connection ended")
                .expect("devtools connection failed");
            let Message::Text(text) = message else {
                continue;
            };
            let message: Value = serde_json::from_str(&text).expect("devtools sends JSON");
            if message["id"] == id {
                return match message.get("error") {
                    Some(error) => Err(error.clone()),
                    None => Ok(message["result"].clone()),
                };
            }
            self.note_event(&message);
        }
    }

    fn note_event(&mut self, event: &Value) {
        let params = &event["params"];
        match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => {
                let details = &params["exceptionDetails"];
                let text = details["exception"]["description"]
                    .as_str()
                    .or(details["text"].as_str())
                    .unwrap_or("?");
                self.problems.push(format!("uncaught exception: {text}"));
            }
            Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
                self.problems
                    .push(format!("console.error: {}", params["args"]));
            }
            _ => {}
        }
    }

    /// Evaluates an expression in the page and returns its value. Errors (for instance while the page is
    /// navigating and has no context yet) come back as `Err` with a description.
    async fn evaluate(&mut self, expression: &str) -> Result<Value, String> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await
            .map_err(|e| e.to_string())?;
        if let Some(details) = result.get("exceptionDetails") {
            return Err(details.to_string());
        }
        Ok(result["result"]["value"].clone())
    }

    /// Evaluates `expression` until `done` accepts its value, for at most [`PAGE_WAIT`]. On timeout, returns the
    /// last value or error.
    async fn wait_for(
        &mut self,
        expression: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + PAGE_WAIT;
        loop {
            let last = match self.evaluate(expression).await {
                Ok(value) if done(&value) => return Ok(value),
                Ok(value) => format!("last value: {value}"),
                Err(error) => format!("last error: {error}"),
            };
            if Instant::now() > deadline {
                return Err(format!(
                    "`{expression}` not as expected after {PAGE_WAIT:?}; {last}; page problems: {:?}",
                    self.problems
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Captures the viewport as a PNG into `path`.
    async fn screenshot(&mut self, path: &Path) {
        let result = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await
            .expect("Page.captureScreenshot");
        let png = base64_decode(result["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

/// Standard base64 (with padding, as DevTools sends it) to bytes.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {:?}", c as char),
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut bits, mut count) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        bits = (bits << 6) | u32::from(value(c));
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Where the screenshot goes: the workspace's `target/` (or `CARGO_TARGET_DIR`).
fn screenshot_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&target).expect("create target/");
    target.join("browser-test.png")
}

const STATUS: &str = "document.getElementById('status')?.textContent ?? null";
const LOG: &str = "document.querySelector('#log')?.textContent ?? null";

#[tokio::test]
async fn demo_page_subscribes_and_shows_a_published_message() {
    let server = start_server(&[]).await;
    let mut chromium = Chromium::launch();
    let port = chromium.devtools_port().await;
    let mut page = Page::attach(port).await;
    let shot = screenshot_path();
    // A desktop-sized viewport, so the screenshot shows the whole page including the received messages.
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1200, "height": 760, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await
    .expect("Emulation.setDeviceMetricsOverride");

    let url = format!(
        "http://{}/?room={}",
        server.http,
        url_encode(r#"{"chat":"browser-test"}"#)
    );
    let navigated = page
        .call("Page.navigate", json!({"url": url}))
        .await
        .expect("Page.navigate");
    assert!(
        navigated.get("errorText").is_none(),
        "navigating to {url}: {navigated}"
    );

    if let Err(why) = page.wait_for(STATUS, |v| v == "subscribed").await {
        page.screenshot(&shot).await;
        panic!(
            "the page never said subscribed ({why}); see {}",
            shot.display()
        );
    }

    let answer = server
        .publish(
            json!({"rooms": [{"chat": "browser-test"}], "data": {"text": "hello from the test"}}),
        )
        .await;
    assert_eq!(
        answer["subscriptions_reached"], 1,
        "publish answered {answer}"
    );

    let shown = page
        .wait_for(LOG, |v| {
            v.as_str()
                .is_some_and(|log| log.contains("hello from the test"))
        })
        .await;
    page.screenshot(&shot).await;
    if let Err(why) = shown {
        panic!(
            "the page never showed the message ({why}); see {}",
            shot.display()
        );
    }
    // Each delivery is its own `li.publish` holding the data as JSON.
    let item = page
        .evaluate("document.querySelector('#log li.publish')?.textContent ?? null")
        .await
        .unwrap();
    assert!(
        item.as_str()
            .is_some_and(|text| text.contains(r#"{"text":"hello from the test"}"#)),
        "publish entry: {item}"
    );
    assert!(
        page.problems.is_empty(),
        "the page reported errors: {:?}",
        page.problems
    );
    drop(chromium);
}

#[tokio::test]
async fn herald_js_reports_refusals_and_delivers_to_its_callback() {
    let server = start_server(&[]).await;
    let mut chromium = Chromium::launch();
    let port = chromium.devtools_port().await;
    let mut page = Page::attach(port).await;
    page.call(
        "Page.navigate",
        json!({"url": format!("http://{}/", server.http)}),
    )
    .await
    .expect("Page.navigate");
    page.wait_for("typeof Herald", |v| v == "function")
        .await
        .unwrap();

    // A client of its own (not the demo page's), using the API as an application would.
    let refused = page
        .evaluate(
            r#"(async () => {
                window.api = new Herald({pingInterval: 0});
                window.api.connect();
                window.got = [];
                const bad = api.subscribe({nested: {no: 1}});
                const refusal = await bad.ready.then(() => "resolved", e => e.message);
                const good = api.subscribe({chat: "api"}, (data, sub) => got.push([data, sub.requestId]));
                await good.ready;
                window.goodId = good.requestId;
                return refusal;
            })()"#,
        )
        .await
        .unwrap();
    assert_eq!(refused, "invalid-room");

    let answer = server
        .publish(json!({"rooms": [{"chat": "api"}], "data": [1, "two"]}))
        .await;
    assert_eq!(
        answer["subscriptions_reached"], 1,
        "publish answered {answer}"
    );
    let got = page
        .wait_for(
            "window.got.length ? [window.got, window.goodId] : null",
            |v| !v.is_null(),
        )
        .await
        .unwrap();
    assert_eq!(got[0], json!([[[1, "two"], got[1]]]));

    // Unsubscribing stops deliveries. herald.js does not report when the server has processed the unsubscribe,
    // so publish until one reaches nothing.
    page.evaluate("api.subscriptions()[0].unsubscribe()")
        .await
        .unwrap();
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        let answer = server
            .publish(json!({"rooms": [{"chat": "api"}], "data": 3}))
            .await;
        if answer["subscriptions_reached"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still subscribed after unsubscribe: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        page.evaluate("api.subscriptions().length").await.unwrap(),
        0
    );
    assert!(page.problems.is_empty(), "page errors: {:?}", page.problems);
    drop(chromium);
}

#[tokio::test]
async fn herald_js_rpc_round_trips_through_a_real_backend() {
    let backend = Backend::start(BackendAnswer::ok(json!({"sum": 3}))).await;
    let rpc_url = format!("http://{}/api/rpc/", backend.addr);
    let server = start_server(&[("rpc.url", &rpc_url)]).await;
    let mut chromium = Chromium::launch();
    let port = chromium.devtools_port().await;
    let mut page = Page::attach(port).await;
    page.call(
        "Page.navigate",
        json!({"url": format!("http://{}/", server.http)}),
    )
    .await
    .expect("Page.navigate");
    page.wait_for("typeof Herald", |v| v == "function")
        .await
        .unwrap();

    let answers = page
        .evaluate(
            r#"(async () => {
                const api = new Herald({pingInterval: 0});
                const early = await api.rpc("add", {}).then(() => "resolved", e => e.message);
                api.connect();
                await new Promise(r => api.on("authorized", r));
                const ok = await api.rpc("add", {a: 1, b: 2});
                const bad = await api.rpc("no/such", 1).then(() => "resolved", e => e.message);
                return [early, ok, bad];
            })()"#,
        )
        .await
        .unwrap();
    assert_eq!(
        answers,
        json!(["not-connected", {"sum": 3}, "invalid-method"])
    );
    let (path, _) = backend.last_request();
    assert_eq!(path, "/api/rpc/add");

    // The backend's HTTP error reaches the caller with its status.
    backend.set(BackendAnswer {
        status: 503,
        body: "{}".into(),
        delay: Duration::ZERO,
    });
    let failed = page
        .evaluate(
            r#"(async () => {
                const api = new Herald({pingInterval: 0});
                api.connect();
                await new Promise(r => api.on("authorized", r));
                return await api.rpc("add", 1).then(() => null, e => [e.message, e.status]);
            })()"#,
        )
        .await
        .unwrap();
    assert_eq!(failed, json!(["rpc-failed", 503]));
    assert!(page.problems.is_empty(), "page errors: {:?}", page.problems);
    drop(chromium);
}

/// Fetches `path` from the server and returns the content type and the body.
async fn get(server: &TestServer, path: &str) -> (String, String) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let uri = format!("http://{}{path}", server.http);
    let response = tokio::time::timeout(STEP, client.get(uri.parse().unwrap()))
        .await
        .expect("request timed out")
        .expect("request failed");
    assert_eq!(response.status(), 200, "GET {path}");
    let content_type = response.headers()[http::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (content_type, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn page_and_client_are_served() {
    let server = start_server(&[]).await;
    let (content_type, js) = get(&server, "/herald.js").await;
    assert!(
        content_type.starts_with("text/javascript"),
        "herald.js served as {content_type}"
    );
    assert!(js.contains("global.Herald = Herald"), "herald.js: {js}");

    let (content_type, html) = get(&server, "/").await;
    assert!(
        content_type.starts_with("text/html"),
        "/ served as {content_type}"
    );
    assert!(html.contains(r#"<script src="/herald.js">"#));
    for id in [r#"id="status""#, r#"id="room""#, r#"id="log""#] {
        assert!(html.contains(id), "the page has no {id}");
    }
}

/// A real `herald dev` process, killed (SIGKILL, by its own PID) when dropped.
struct DevProcess {
    child: std::process::Child,
    http: String,
}

impl DevProcess {
    fn spawn() -> DevProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["dev", "--port", "0", "--grpc-port", "0"])
            .env("RUST_LOG", "warn")
            .env("HERALD_ADMIN_PORT", "0")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start herald dev");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let http = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http="))
            .expect("listening line")
            .to_owned();
        std::thread::spawn(move || {
            let mut sink = String::new();
            while stdout.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        DevProcess { child, http }
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// When the edge a browser is connected to dies (SIGKILL, no close frame), herald.js moves on to the next edge
/// in its list and resubscribes there, and publishes reach it again.
#[tokio::test]
async fn herald_js_fails_over_to_another_edge_and_resubscribes() {
    let first = DevProcess::spawn();
    let second = DevProcess::spawn();
    let mut chromium = Chromium::launch();
    let port = chromium.devtools_port().await;
    let mut page = Page::attach(port).await;
    page.call(
        "Page.navigate",
        json!({"url": format!("http://{}/", first.http)}),
    )
    .await
    .expect("Page.navigate");
    page.wait_for("typeof Herald", |v| v == "function")
        .await
        .unwrap();
    page.evaluate(&format!(
        r#"(async () => {{
            window.failover = new Herald(["ws://{}/ws/", "ws://{}/ws/"], {{pingInterval: 0, minBackoff: 100}});
            window.got = [];
            window.resubscribed = 0;
            failover.on("subscribed", () => window.resubscribed++);
            failover.connect();
            await failover.subscribe({{feed: "failover"}}, data => got.push(data)).ready;
            return true;
        }})()"#,
        first.http, second.http
    ))
    .await
    .unwrap();

    let publish_to = |http: String, data: Value| async move {
        http_request(
            "POST",
            &format!("http://{http}/api/v1/publish"),
            &[("content-type", "application/json")],
            json!({"rooms": [{"feed": "failover"}], "data": data}).to_string(),
        )
        .await
    };
    let (status, body) = publish_to(first.http.clone(), json!("before")).await;
    assert_eq!(
        (status, body.contains("\"subscriptions_reached\":1")),
        (200, true),
        "{body}"
    );
    page.wait_for("window.got.join(',')", |v| v == "before")
        .await
        .unwrap();

    let second_url = format!("ws://{}/ws/", second.http);
    drop(first);
    page.wait_for("failover.url + ' ' + window.resubscribed", |v| {
        v.as_str() == Some(&format!("{second_url} 2"))
    })
    .await
    .unwrap();
    let (status, body) = publish_to(second.http.clone(), json!("after")).await;
    assert_eq!(
        (status, body.contains("\"subscriptions_reached\":1")),
        (200, true),
        "{body}"
    );
    page.wait_for("window.got.join(',')", |v| v == "before,after")
        .await
        .unwrap();
    drop(chromium);
}
