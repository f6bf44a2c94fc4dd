//! herald: the High-templar WebSocket protocol for subscribers; gRPC `PublishStream` or HTTP
//! `POST /api/v1/publish` for publishers.
//!
//! Room `r` is `{"lt":"r","shard":"0"}`; its wildcard subscription is `{"lt":"r","shard":"*"}`, which matches
//! exactly the same publishes but goes through herald's wildcard index.

use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use herald_proto::v1::publisher_client::PublisherClient;
use herald_proto::v1::{scalar, target, PublishRequest, Room, Scalar, Target};

use super::{Driver, Incoming, Publisher, SubscriberClient};
use crate::payload::Scanner;
use crate::ws::{self, Ws};

/// The room a publish goes to, as herald's JSON.
pub(crate) fn room_json(room: u32, wildcard: bool) -> String {
    let shard = if wildcard { "*" } else { "0" };
    format!(r#"{{"lt":"{room}","shard":"{shard}"}}"#)
}

/// Subscribers' side of herald.
#[derive(Debug, Clone, Default)]
pub(crate) struct HeraldDriver {
    /// Appended to `/ws/`, e.g. `?token=<jwt>` for a cluster that authorizes with JWT.
    pub(crate) query: String,
}

impl Driver for HeraldDriver {
    type Client = HeraldClient;

    async fn connect(&self, addr: SocketAddr, source: IpAddr) -> anyhow::Result<HeraldClient> {
        let ws = ws::connect(addr, &format!("/ws/{}", self.query), Some(source)).await?;
        let mut client = HeraldClient {
            ws,
            scanner: Scanner::default(),
            next_request: 1,
        };
        let first = client
            .text()
            .await
            .context("waiting for the authorization frame")?;
        let first: serde_json::Value = serde_json::from_slice(&first).map_err(|_| {
            anyhow!(
                "first frame is not JSON: {}",
                String::from_utf8_lossy(&first)
            )
        })?;
        if first["is_authorized"] != true {
            bail!("not authorized: {first}");
        }
        Ok(client)
    }
}

/// One herald subscriber connection.
pub(crate) struct HeraldClient {
    ws: Ws,
    scanner: Scanner,
    next_request: u64,
}

impl HeraldClient {
    /// The next text frame, as owned bytes (only used outside the delivery path).
    async fn text(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            let frame = self.ws.read_frame().await?;
            match frame.opcode {
                OpCode::Text => return Ok(frame.payload.to_vec()),
                OpCode::Close => bail!("closed by the server{}", close_suffix(&frame.payload)),
                _ => {}
            }
        }
    }
}

fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

fn close_suffix(payload: &[u8]) -> String {
    match close_code(payload) {
        Some(code) => format!(" with {code} {}", String::from_utf8_lossy(&payload[2..])),
        None => String::new(),
    }
}

impl SubscriberClient for HeraldClient {
    async fn subscribe(&mut self, room: u32, wildcard: bool) -> anyhow::Result<()> {
        let id = self.next_request;
        self.next_request += 1;
        let request = format!(
            r#"{{"type":"subscribe","room":{},"requestId":{id}}}"#,
            room_json(room, wildcard)
        );
        self.ws
            .write_frame(Frame::text(Payload::Owned(request.into_bytes())))
            .await?;
        loop {
            let text = self
                .text()
                .await
                .context("waiting for the subscribe answer")?;
            let Ok(reply) = serde_json::from_slice::<serde_json::Value>(&text) else {
                continue;
            };
            if reply["requestId"] != id {
                continue;
            }
            if reply["code"] == "success" {
                return Ok(());
            }
            bail!("subscribe refused: {reply}");
        }
    }

    async fn recv(&mut self) -> anyhow::Result<Incoming> {
        let frame = self.ws.read_frame().await?;
        Ok(match frame.opcode {
            OpCode::Text | OpCode::Continuation => match self.scanner.scan(&frame.payload) {
                Some(header) => Incoming::Payload(header),
                None => Incoming::Other,
            },
            OpCode::Close => Incoming::Closed(close_code(&frame.payload)),
            _ => Incoming::Other,
        })
    }
}

// === publishers ===

/// gRPC: one client-streaming `PublishStream`; `publish` only queues, so the schedule never waits on the server.
pub(crate) struct GrpcPublisher {
    tx: Option<mpsc::UnboundedSender<PublishRequest>>,
    call: tokio::task::JoinHandle<Result<u64, tonic::Status>>,
}

impl GrpcPublisher {
    pub(crate) async fn connect(addr: SocketAddr, api_key: Option<&str>) -> anyhow::Result<Self> {
        let mut client = PublisherClient::connect(format!("http://{addr}"))
            .await
            .with_context(|| format!("gRPC connect to {addr}"))?
            .max_decoding_message_size(1 << 20);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
        if let Some(key) = api_key {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {key}")
                    .parse()
                    .map_err(|_| anyhow!("the API key is not a valid header value"))?,
            );
        }
        let call = tokio::spawn(async move {
            client
                .publish_stream(request)
                .await
                .map(|reply| reply.into_inner().published)
        });
        Ok(GrpcPublisher { tx: Some(tx), call })
    }
}

impl Publisher for GrpcPublisher {
    async fn publish(&mut self, room: u32, data: Vec<u8>) -> anyhow::Result<()> {
        let mut fields = std::collections::HashMap::new();
        fields.insert(
            "lt".to_owned(),
            Scalar {
                kind: Some(scalar::Kind::StringValue(room.to_string())),
            },
        );
        fields.insert(
            "shard".to_owned(),
            Scalar {
                kind: Some(scalar::Kind::StringValue("0".to_owned())),
            },
        );
        let request = PublishRequest {
            targets: vec![Target {
                kind: Some(target::Kind::Room(Room { fields })),
            }],
            data_json: data,
        };
        // A call that ended (its connection broke: the edge died) may still hold the stream's receiver for a
        // moment, so check the call first: a failover run's publisher then moves on at its next publish, and a
        // publish it resends elsewhere was never queued here.
        if self.call.is_finished() {
            bail!("the PublishStream call ended early");
        }
        let sent = self.tx.as_ref().map(|tx| tx.send(request).is_ok());
        if sent != Some(true) {
            bail!("the PublishStream call ended early");
        }
        Ok(())
    }

    async fn finish(mut self) -> anyhow::Result<Option<u64>> {
        drop(self.tx.take());
        let published = self
            .call
            .await
            .context("the PublishStream task panicked")?
            .map_err(|status| anyhow!("PublishStream failed: {status}"))?;
        Ok(Some(published))
    }
}

/// HTTP/1.1: one connection awaiting each answer, as README's order guarantee requires of an HTTP publisher.
pub(crate) struct HttpPublisher {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    auth: Option<String>,
    accepted: u64,
}

impl HttpPublisher {
    pub(crate) async fn connect(addr: SocketAddr, api_key: Option<&str>) -> anyhow::Result<Self> {
        let stream = ws::tcp(addr, None).await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .with_context(|| format!("HTTP connect to {addr}"))?;
        tokio::spawn(conn);
        Ok(HttpPublisher {
            sender,
            addr,
            auth: api_key.map(|k| format!("Bearer {k}")),
            accepted: 0,
        })
    }
}

impl Publisher for HttpPublisher {
    async fn publish(&mut self, room: u32, data: Vec<u8>) -> anyhow::Result<()> {
        let mut body = Vec::with_capacity(data.len() + 64);
        body.extend_from_slice(br#"{"rooms":["#);
        body.extend_from_slice(room_json(room, false).as_bytes());
        body.extend_from_slice(br#"],"data":"#);
        body.extend_from_slice(&data);
        body.push(b'}');
        let mut request = hyper::Request::post("/api/v1/publish")
            .header("host", self.addr.to_string())
            .header("content-type", "application/json");
        if let Some(auth) = &self.auth {
            request = request.header("authorization", auth);
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let answer = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "publish answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
        self.accepted += 1;
        Ok(())
    }

    async fn finish(self) -> anyhow::Result<Option<u64>> {
        Ok(Some(self.accepted))
    }
}
