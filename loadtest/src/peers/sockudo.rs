//! Sockudo as a peer: a Pusher-protocol server, subscribed to over Pusher's WebSocket protocol (version 7) and
//! published to over Pusher's signed HTTP API.
//!
//! WebSocket: `GET /app/<key>?protocol=7` answers `{"event":"pusher:connection_established","data":"{\"socket_id\":
//! ...}"}`; `{"event":"pusher:subscribe","data":{"channel":C}}` answers
//! `{"event":"pusher_internal:subscription_succeeded","channel":C,...}` (or a `pusher:error`); events arrive as
//! `{"event":E,"channel":C,"data":D}`; the server sends `{"event":"pusher:ping"}` to an idle connection and
//! expects `{"event":"pusher:pong"}` back.
//!
//! HTTP: `POST /apps/<id>/events` with a JSON body `{"name":E,"channel":C | "channels":[..],"data":D}` and the
//! query `auth_key`, `auth_timestamp` (Unix seconds, within 600 s of the server's clock), `auth_version=1.0`,
//! `body_md5` (hex MD5 of the body) and `auth_signature`: hex HMAC-SHA256, keyed with the app secret, of
//! `"POST\n<path>\n<the other query parameters sorted by name, as k=v joined with &>"`.
//!
//! **Payloads.** Pusher carries `data` as a JSON string, so a payload must be UTF-8. The publisher sends it as a
//! JSON string literal (serde_json escaping: `"` `\` and control characters escaped, everything else as is) and
//! the subscriber JSON-decodes the `data` string it receives, so [`Delivery::payload`] is exactly the published
//! bytes. Payloads without `"`, `\` and control characters cost no escaping on either side. A non-UTF-8 payload
//! is refused with [`PeerError::InvalidInput`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use md5::{Digest, Md5};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;
use tokio::task::JoinHandle;

use super::{connect_tcp, ws_connect, Delivery, PeerError, ServerProcess, WsConn};

/// The event name the publisher uses; the subscriber accepts any non-internal event.
pub(crate) const EVENT_NAME: &str = "m";

/// A Pusher app: the id is in publish URLs, the key in WebSocket URLs and signatures, the secret signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PusherApp {
    /// App id (`/apps/<id>/events`).
    pub(crate) id: String,
    /// App key (`/app/<key>`, `auth_key`).
    pub(crate) key: String,
    /// App secret (HMAC key).
    pub(crate) secret: String,
}

impl Default for PusherApp {
    /// The one static app the harness configures.
    fn default() -> Self {
        Self {
            id: "herald-bench".into(),
            key: "herald-bench-key".into(),
            secret: "herald-bench-secret".into(),
        }
    }
}

// === impl SockudoServer ===

/// A Sockudo server started by the harness: WebSocket and HTTP API on one loopback port, its Prometheus
/// metrics on another, one static app. Dropping it kills the server.
#[derive(Debug)]
pub(crate) struct SockudoServer {
    process: ServerProcess,
    addr: SocketAddr,
    app: PusherApp,
}

impl SockudoServer {
    /// Finds `sockudo` in `<repo>/target/bench-tools/bin` (where `scripts/install-bench-deps.sh` installs it),
    /// then on `PATH`; `None`: not installed. `repo` is the workspace root.
    pub(crate) fn binary(repo: &Path) -> Option<PathBuf> {
        super::find_binary("sockudo", &[repo.join("target/bench-tools/bin")])
    }

    /// Writes `sockudo.toml` into `dir`, starts `binary` with it (working directory `dir`, environment cleared
    /// but for `PATH`, so no `config/config.toml` or environment variable overrides it) and waits (up to 30 s)
    /// until `addr` accepts. Both addresses must be loopback with explicit ports. The log is `dir/sockudo.log`.
    pub(crate) async fn start(
        binary: &Path,
        dir: &Path,
        addr: SocketAddr,
        metrics_addr: SocketAddr,
        app: PusherApp,
    ) -> Result<Self, PeerError> {
        for a in [addr, metrics_addr] {
            if !a.ip().is_loopback() || a.port() == 0 {
                return Err(PeerError::InvalidInput(format!(
                    "Sockudo must listen on a loopback address with a fixed port, not {a}"
                )));
            }
        }
        std::fs::create_dir_all(dir)?;
        let config_path = dir.join("sockudo.toml");
        std::fs::write(&config_path, config(addr, metrics_addr, &app)?)?;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        let mut process = ServerProcess::spawn("sockudo", command, dir.join("sockudo.log"))?;
        process
            .wait_accepting(&[addr], Duration::from_secs(30))
            .await?;
        Ok(Self { process, addr, app })
    }

    /// The server's process id, for `/proc/<pid>/status` and `/proc/<pid>/stat`.
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Where subscribers (`/app/<key>`) and publishers (`/apps/<id>/events`) connect.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The app the server was configured with.
    pub(crate) fn app(&self) -> &PusherApp {
        &self.app
    }

    /// The server's log file.
    pub(crate) fn log_path(&self) -> &Path {
        self.process.log_path()
    }
}

/// The configuration file. Every setting that differs from Sockudo's defaults is here, and each is explained
/// in peers.md.
fn config(
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    app: &PusherApp,
) -> Result<String, PeerError> {
    for value in [&app.id, &app.key, &app.secret] {
        if value.is_empty()
            || !value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(PeerError::InvalidInput(format!(
                "Pusher app id, key and secret must be non-empty [A-Za-z0-9_-], not {value:?}"
            )));
        }
    }
    Ok(format!(
        r#"# Written by herald-loadtest (loadtest/src/peers/sockudo.rs); see loadtest/peers.md.
host = "{host}"
port = {port}
shutdown_grace_period = 1

[adapter]
driver = "local"

[app_manager]
driver = "memory"

[[app_manager.array.apps]]
id = "{id}"
key = "{key}"
secret = "{secret}"
enabled = true

[queue]
driver = "none"

[rate_limiter]
enabled = false

[event_limits]
max_batch_size = 100

[logging]
colors_enabled = false

[metrics]
enabled = true
host = "{metrics_host}"
port = {metrics_port}
"#,
        host = addr.ip(),
        port = addr.port(),
        id = app.id,
        key = app.key,
        secret = app.secret,
        metrics_host = metrics_addr.ip(),
        metrics_port = metrics_addr.port(),
    ))
}

// === impl PusherSubscriber ===

/// A subscriber speaking Pusher's WebSocket protocol (version 7) over one connection.
///
/// Drive it by calling [`next`](Self::next) in a loop: that also answers the server's `pusher:ping`s (sent after
/// `activity_timeout`, 120 s by default, of silence; an unanswered one closes the connection).
pub(crate) struct PusherSubscriber {
    ws: WsConn,
    socket_id: String,
    /// Subscribed channel -> (its position, its name as shared bytes for [`Delivery::topic`]).
    channels: HashMap<String, (usize, Bytes)>,
    pending: VecDeque<Delivery>,
}

/// The fields of a server message the client looks at.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// A server message, classified.
enum Event {
    Delivery(Delivery),
    Subscribed(String),
    Error {
        channel: Option<String>,
        message: String,
    },
}

impl PusherSubscriber {
    /// Connects to `/app/<key>?protocol=7`, optionally from the source address `local`, and waits for
    /// `pusher:connection_established`.
    pub(crate) async fn connect(
        addr: SocketAddr,
        app_key: &str,
        local: Option<IpAddr>,
    ) -> Result<Self, PeerError> {
        let path =
            format!("/app/{app_key}?protocol=7&client=herald-loadtest&version=0.1.0&flash=false");
        let mut ws = ws_connect(addr, local, &path).await?;
        let frame = read_message(&mut ws).await?;
        let first: Incoming<'_> = serde_json::from_slice(&frame).map_err(|err| {
            PeerError::Protocol(format!("first message is not a Pusher message: {err}"))
        })?;
        match &*first.event {
            "pusher:connection_established" => {}
            "pusher:error" => return Err(PeerError::Rejected(raw_text(first.data))),
            other => {
                return Err(PeerError::Protocol(format!(
                    "expected pusher:connection_established, got {other}"
                )))
            }
        }
        #[derive(Deserialize)]
        struct Established {
            socket_id: String,
        }
        let data = decode_data(first.data)?;
        let established: Established = serde_json::from_slice(&data).map_err(|err| {
            PeerError::Protocol(format!("bad connection_established data: {err}"))
        })?;
        Ok(Self {
            ws,
            socket_id: established.socket_id,
            channels: HashMap::new(),
            pending: VecDeque::new(),
        })
    }

    /// The socket id the server assigned.
    pub(crate) fn socket_id(&self) -> &str {
        &self.socket_id
    }

    /// Subscribes to one public channel and waits for `pusher_internal:subscription_succeeded`; returns the
    /// time that took.
    pub(crate) async fn subscribe(&mut self, channel: &str) -> Result<Duration, PeerError> {
        Ok(self.subscribe_all(&[channel]).await?[0])
    }

    /// Subscribes to every channel, pipelined (all `pusher:subscribe`s sent at once), and waits for each one's
    /// `subscription_succeeded`. Returns, per channel, the time from sending to its acknowledgement. The
    /// channels' positions count on from the previous calls' and are [`Delivery::subscription`]. A channel
    /// this connection already subscribed to is an error.
    pub(crate) async fn subscribe_all<S: AsRef<str>>(
        &mut self,
        channels: &[S],
    ) -> Result<Vec<Duration>, PeerError> {
        let mut waiting: HashMap<String, usize> = HashMap::with_capacity(channels.len());
        for (i, channel) in channels.iter().enumerate() {
            let channel = channel.as_ref();
            if self.channels.contains_key(channel)
                || waiting.insert(channel.to_owned(), i).is_some()
            {
                return Err(PeerError::InvalidInput(format!(
                    "already subscribed to {channel:?}"
                )));
            }
        }
        let sent = Instant::now();
        for channel in channels {
            let channel = channel.as_ref();
            let message = format!(
                r#"{{"event":"pusher:subscribe","data":{{"channel":{}}}}}"#,
                json_string(channel)
            );
            self.ws
                .write_frame(Frame::text(Payload::Owned(message.into_bytes())))
                .await?;
            let position = self.channels.len();
            self.channels.insert(
                channel.to_owned(),
                (position, Bytes::copy_from_slice(channel.as_bytes())),
            );
        }
        let mut acked = vec![Duration::ZERO; channels.len()];
        while !waiting.is_empty() {
            match self.next_event().await? {
                Event::Subscribed(channel) => {
                    if let Some(i) = waiting.remove(&channel) {
                        acked[i] = sent.elapsed();
                    }
                }
                Event::Delivery(delivery) => self.pending.push_back(delivery),
                Event::Error { channel, message } => {
                    if channel.as_ref().is_none_or(|c| waiting.contains_key(c)) {
                        return Err(PeerError::Rejected(format!(
                            "subscribe to {}: {message}",
                            channel.as_deref().unwrap_or("?")
                        )));
                    }
                }
            }
        }
        Ok(acked)
    }

    /// The next event on a subscribed channel, in the order the server sent them. `Err(PeerError::Closed(code))`
    /// when the server closed the connection (e.g. Sockudo's outbound buffer for it filled up);
    /// `Err(PeerError::Rejected)` for a `pusher:error`. Not cancel-safe.
    pub(crate) async fn next(&mut self) -> Result<Delivery, PeerError> {
        if let Some(delivery) = self.pending.pop_front() {
            return Ok(delivery);
        }
        loop {
            match self.next_event().await? {
                Event::Delivery(delivery) => return Ok(delivery),
                Event::Error { message, .. } => return Err(PeerError::Rejected(message)),
                Event::Subscribed(_) => {}
            }
        }
    }

    /// Reads until a message the caller cares about, answering `pusher:ping` and skipping other internal
    /// events.
    async fn next_event(&mut self) -> Result<Event, PeerError> {
        loop {
            let frame = read_message(&mut self.ws).await?;
            let message: Incoming<'_> = serde_json::from_slice(&frame).map_err(|err| {
                PeerError::Protocol(format!(
                    "not a Pusher message ({err}): {:?}",
                    String::from_utf8_lossy(&frame[..frame.len().min(128)])
                ))
            })?;
            let event = &*message.event;
            if event == "pusher:ping" {
                self.ws
                    .write_frame(Frame::text(Payload::Borrowed(
                        br#"{"event":"pusher:pong","data":{}}"#,
                    )))
                    .await?;
                continue;
            }
            if event == "pusher:error" || event.ends_with(":subscription_error") {
                return Ok(Event::Error {
                    channel: message.channel.map(|c| c.into_owned()),
                    message: raw_text(message.data),
                });
            }
            if event == "pusher_internal:subscription_succeeded" {
                let channel = message.channel.ok_or_else(|| {
                    PeerError::Protocol("subscription_succeeded without a channel".into())
                })?;
                return Ok(Event::Subscribed(channel.into_owned()));
            }
            if event.starts_with("pusher:") || event.starts_with("pusher_internal:") {
                continue;
            }
            let Some(channel) = message.channel else {
                return Err(PeerError::Protocol(format!(
                    "event {event} without a channel"
                )));
            };
            let Some((position, topic)) = self.channels.get(&*channel) else {
                return Err(PeerError::Protocol(format!(
                    "event on unsubscribed channel {channel}"
                )));
            };
            return Ok(Event::Delivery(Delivery {
                subscription: *position,
                topic: topic.clone(),
                payload: decode_data(message.data)?,
            }));
        }
    }
}

/// The next whole text or binary message.
async fn read_message(ws: &mut WsConn) -> Result<bytes::BytesMut, PeerError> {
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Text | OpCode::Binary => return Ok(super::payload_bytes(frame.payload)),
            OpCode::Close => return Err(super::closed(&frame.payload)),
            OpCode::Ping | OpCode::Pong | OpCode::Continuation => {}
        }
    }
}

/// A message's `data` as bytes: a JSON string decoded (what the publisher sent), anything else as raw JSON.
fn decode_data(data: Option<&RawValue>) -> Result<Bytes, PeerError> {
    let Some(raw) = data else {
        return Ok(Bytes::new());
    };
    let text = raw.get();
    if !text.starts_with('"') {
        return Ok(Bytes::copy_from_slice(text.as_bytes()));
    }
    // Without escapes the string's bytes are the payload; otherwise let serde_json unescape it.
    let inner = &text[1..text.len() - 1];
    if !inner.contains('\\') {
        return Ok(Bytes::copy_from_slice(inner.as_bytes()));
    }
    let decoded: String = serde_json::from_str(text)
        .map_err(|err| PeerError::Protocol(format!("bad data string: {err}")))?;
    Ok(Bytes::from(decoded))
}

/// An error message's `data` for humans.
fn raw_text(data: Option<&RawValue>) -> String {
    data.map(|raw| raw.get().to_owned()).unwrap_or_default()
}

fn json_string(text: &str) -> String {
    // Serializing a str into JSON cannot fail.
    serde_json::to_string(text).unwrap_or_default()
}

// === impl PusherPublisher ===

/// A publisher on Sockudo's HTTP API, one request at a time over HTTP/1.1.
///
/// Sockudo answers every HTTP API request with `Connection: close` (its router adds the header to "prevent idle
/// HTTP connection buildup"; no setting turns it off), so each request needs a new TCP connection. The publisher
/// opens the next one as soon as a response has been read, so the handshake happens between publishes rather
/// than at the start of the next one; [`connections_opened`](Self::connections_opened) counts them. For a high
/// publish rate use [`publish_batch`](Self::publish_batch) (up to 100 events per request) and several
/// publishers; do not bind publishers to a source address unless needed, so the kernel can pick ports by
/// destination (every request leaves a connection in `TIME_WAIT`).
pub(crate) struct PusherPublisher {
    addr: SocketAddr,
    local: Option<IpAddr>,
    connection: Option<HttpConnection>,
    connections_opened: u64,
    app: PusherApp,
    host: String,
    events_path: String,
    batch_path: String,
    body: Vec<u8>,
}

/// One HTTP/1.1 client connection and the task driving it (aborted when dropped).
struct HttpConnection {
    sender: SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
}

impl HttpConnection {
    async fn open(addr: SocketAddr, local: Option<IpAddr>) -> Result<Self, PeerError> {
        let stream = connect_tcp(addr, local).await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let task = tokio::spawn(async move {
            // An error here surfaces as the next request's error.
            let _ = connection.await;
        });
        Ok(Self { sender, task })
    }
}

impl Drop for HttpConnection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PusherPublisher {
    /// Opens the first connection, optionally from the source address `local`.
    pub(crate) async fn connect(
        addr: SocketAddr,
        app: PusherApp,
        local: Option<IpAddr>,
    ) -> Result<Self, PeerError> {
        let connection = HttpConnection::open(addr, local).await?;
        Ok(Self {
            addr,
            local,
            connection: Some(connection),
            connections_opened: 1,
            events_path: format!("/apps/{}/events", app.id),
            batch_path: format!("/apps/{}/batch_events", app.id),
            app,
            host: addr.to_string(),
            body: Vec::with_capacity(4096),
        })
    }

    /// How many TCP connections this publisher has opened (Sockudo closes each after one request).
    pub(crate) fn connections_opened(&self) -> u64 {
        self.connections_opened
    }

    /// Publishes one event carrying `payload` to `channels` (at most 100, Pusher's limit) and waits for the
    /// server's 200.
    pub(crate) async fn publish<S: AsRef<str>>(
        &mut self,
        channels: &[S],
        payload: &[u8],
    ) -> Result<(), PeerError> {
        if channels.is_empty() || channels.len() > 100 {
            return Err(PeerError::InvalidInput(format!(
                "a Pusher event goes to 1..=100 channels, not {}",
                channels.len()
            )));
        }
        let data = payload_text(payload)?;
        let mut body = std::mem::take(&mut self.body);
        body.clear();
        body.extend_from_slice(br#"{"name":""#);
        body.extend_from_slice(EVENT_NAME.as_bytes());
        if let [channel] = channels {
            body.extend_from_slice(br#"","channel":"#);
            push_json_string(&mut body, channel.as_ref());
        } else {
            body.extend_from_slice(br#"","channels":["#);
            for (i, channel) in channels.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                push_json_string(&mut body, channel.as_ref());
            }
            body.push(b']');
        }
        body.extend_from_slice(br#","data":"#);
        push_json_string(&mut body, data);
        body.push(b'}');
        let path = std::mem::take(&mut self.events_path);
        let result = self.post(&path, &body).await;
        self.events_path = path;
        self.body = body;
        result
    }

    /// Publishes several events, each `(channel, payload)`, in one `batch_events` request (at most 100: the
    /// harness raises Sockudo's default of 10, see peers.md) and waits for the server's 200.
    pub(crate) async fn publish_batch<S: AsRef<str>, P: AsRef<[u8]>>(
        &mut self,
        events: &[(S, P)],
    ) -> Result<(), PeerError> {
        if events.is_empty() || events.len() > 100 {
            return Err(PeerError::InvalidInput(format!(
                "a Pusher batch holds 1..=100 events, not {}",
                events.len()
            )));
        }
        let mut body = std::mem::take(&mut self.body);
        body.clear();
        body.extend_from_slice(br#"{"batch":["#);
        for (i, (channel, payload)) in events.iter().enumerate() {
            let data = match payload_text(payload.as_ref()) {
                Ok(data) => data,
                Err(err) => {
                    self.body = body;
                    return Err(err);
                }
            };
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(br#"{"name":""#);
            body.extend_from_slice(EVENT_NAME.as_bytes());
            body.extend_from_slice(br#"","channel":"#);
            push_json_string(&mut body, channel.as_ref());
            body.extend_from_slice(br#","data":"#);
            push_json_string(&mut body, data);
            body.push(b'}');
        }
        body.extend_from_slice(b"]}");
        let path = std::mem::take(&mut self.batch_path);
        let result = self.post(&path, &body).await;
        self.batch_path = path;
        self.body = body;
        result
    }

    /// Signs and sends one POST and reads the whole response; then, if the server is closing the connection,
    /// opens the next one.
    async fn post(&mut self, path: &str, body: &[u8]) -> Result<(), PeerError> {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let uri = signed_uri(&self.app, "POST", path, body, timestamp);
        let request = hyper::Request::post(uri)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|err| PeerError::InvalidInput(format!("bad request: {err}")))?;
        let mut connection = self.ready_connection().await?;
        let response = match connection.sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut err) => match err.take_message() {
                // Not written: the server had closed the idle connection. Send it on a new one.
                Some(request) => {
                    connection = self.new_connection().await?;
                    connection.sender.send_request(request).await?
                }
                None => return Err(err.into_error().into()),
            },
        };
        let status = response.status();
        let closing = response
            .headers()
            .get_all(hyper::header::CONNECTION)
            .iter()
            .any(|value| value.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = response.into_body().collect().await?.to_bytes();
        if closing || connection.sender.is_closed() {
            drop(connection);
            // A failure here is reported by the next publish, which tries again.
            if let Ok(next) = HttpConnection::open(self.addr, self.local).await {
                self.connections_opened += 1;
                self.connection = Some(next);
            }
        } else {
            self.connection = Some(connection);
        }
        if !status.is_success() {
            return Err(PeerError::Rejected(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(256)])
            )));
        }
        Ok(())
    }

    /// A connection ready for a request: the open one, or a new one if the server has closed it.
    async fn ready_connection(&mut self) -> Result<HttpConnection, PeerError> {
        if let Some(mut connection) = self.connection.take() {
            if !connection.sender.is_closed() && connection.sender.ready().await.is_ok() {
                return Ok(connection);
            }
        }
        self.new_connection().await
    }

    async fn new_connection(&mut self) -> Result<HttpConnection, PeerError> {
        let mut connection = HttpConnection::open(self.addr, self.local).await?;
        self.connections_opened += 1;
        connection.sender.ready().await?;
        Ok(connection)
    }
}

fn payload_text(payload: &[u8]) -> Result<&str, PeerError> {
    std::str::from_utf8(payload).map_err(|_| {
        PeerError::InvalidInput(
            "Pusher carries data as a JSON string: the payload must be UTF-8".into(),
        )
    })
}

fn push_json_string(out: &mut Vec<u8>, text: &str) {
    // Writing a str as JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// `path?auth_key=..&auth_timestamp=..&auth_version=1.0&body_md5=..&auth_signature=..`, signed the Pusher way.
fn signed_uri(app: &PusherApp, method: &str, path: &str, body: &[u8], timestamp: u64) -> String {
    let body_md5 = hex(&Md5::digest(body));
    // Already sorted by name, as the signature needs.
    let query = format!(
        "auth_key={}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={body_md5}",
        app.key
    );
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(app.secret.as_bytes())
        .expect("HMAC accepts a key of any length");
    mac.update(method.as_bytes());
    mac.update(b"\n");
    mac.update(path.as_bytes());
    mac.update(b"\n");
    mac.update(query.as_bytes());
    let signature = hex(&mac.finalize().into_bytes());
    format!("{path}?{query}&auth_signature={signature}")
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_pushers_documented_example() {
        // The worked example in Pusher's HTTP API reference (key 278d425bdf160c739803, secret
        // 7ad3773142a6692b25b8, timestamp 1353088179, body {"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}).
        let app = PusherApp {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
        };
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let uri = signed_uri(&app, "POST", "/apps/3/events", body, 1353088179);
        assert_eq!(
            uri,
            "/apps/3/events?auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn data_round_trips_exactly() {
        for payload in ["plain 123 abc", "quote \" back\\slash \n tab\t ünï €", ""] {
            let mut json = Vec::new();
            push_json_string(&mut json, payload);
            let raw: &RawValue = serde_json::from_slice(&json).unwrap();
            assert_eq!(&decode_data(Some(raw)).unwrap()[..], payload.as_bytes());
        }
        assert!(payload_text(&[0xff, 0xfe]).is_err());
    }
}
