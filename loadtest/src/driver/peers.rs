//! The peers herald is measured against, behind the same [`Driver`] and [`Publisher`] traits, built on the
//! protocol clients in `crate::peers`.
//!
//! - NATS: room `r` is the subject `lt.r.0`; a wildcard subscription is `lt.r.*` (same publishes, NATS' wildcard
//!   matching). Subscribers use the WebSocket listener; publishers the plain TCP client port.
//! - Sockudo (Pusher): room `r` is the public channel `lt-r`. Pusher has no wildcard channels, so a wildcard
//!   subscription is an exact one there. Publishers use the signed HTTP events API, one request per publish.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;

use super::{Driver, Incoming, Publisher, SubscriberClient};
use crate::payload::Scanner;
use crate::peers::nats::{NatsPublisher, NatsWsSubscriber};
use crate::peers::sockudo::{PusherApp, PusherPublisher, PusherSubscriber};
use crate::peers::PeerError;

fn subject(room: u32, wildcard: bool) -> String {
    if wildcard {
        format!("lt.{room}.*")
    } else {
        format!("lt.{room}.0")
    }
}

fn channel(room: u32) -> String {
    format!("lt-{room}")
}

fn incoming(
    scanner: &Scanner,
    result: Result<crate::peers::Delivery, PeerError>,
) -> anyhow::Result<Incoming> {
    match result {
        Ok(delivery) => Ok(match scanner.scan(&delivery.payload) {
            Some(header) => Incoming::Payload(header),
            None => Incoming::Other,
        }),
        Err(PeerError::Closed(code)) => Ok(Incoming::Closed(code)),
        Err(e) => Err(e.into()),
    }
}

// === NATS ===

/// NATS subscribers over WebSocket.
#[derive(Debug, Clone, Default)]
pub(crate) struct NatsDriver;

pub(crate) struct NatsClient {
    inner: NatsWsSubscriber,
    scanner: Scanner,
}

impl Driver for NatsDriver {
    type Client = NatsClient;

    async fn connect(&self, addr: SocketAddr, source: IpAddr) -> anyhow::Result<NatsClient> {
        Ok(NatsClient {
            inner: NatsWsSubscriber::connect(addr, Some(source)).await?,
            scanner: Scanner::default(),
        })
    }
}

impl SubscriberClient for NatsClient {
    async fn subscribe(&mut self, room: u32, wildcard: bool) -> anyhow::Result<()> {
        // The subscriber follows SUB with PING and waits for the PONG: the server has then registered it.
        self.inner.subscribe(&subject(room, wildcard)).await?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<Incoming> {
        let result = self.inner.next().await;
        incoming(&self.scanner, result)
    }
}

/// One NATS publisher connection (TCP client port). Publishes are written at once; `finish` waits for a PONG so
/// everything written has been processed by the server.
pub(crate) struct NatsPublish(pub(crate) NatsPublisher);

impl NatsPublish {
    pub(crate) async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(NatsPublish(
            NatsPublisher::connect(addr, None)
                .await
                .with_context(|| format!("NATS connect to {addr}"))?,
        ))
    }
}

impl Publisher for NatsPublish {
    async fn publish(&mut self, room: u32, data: Vec<u8>) -> anyhow::Result<()> {
        self.0.publish(&subject(room, false), &data)?;
        self.0.flush().await?;
        Ok(())
    }

    async fn finish(mut self) -> anyhow::Result<Option<u64>> {
        self.0.sync().await?;
        Ok(None)
    }
}

// === Sockudo ===

/// Pusher subscribers.
#[derive(Debug, Clone, Default)]
pub(crate) struct SockudoDriver {
    pub(crate) app: PusherApp,
}

pub(crate) struct SockudoClient {
    inner: PusherSubscriber,
    scanner: Scanner,
}

impl Driver for SockudoDriver {
    type Client = SockudoClient;

    async fn connect(&self, addr: SocketAddr, source: IpAddr) -> anyhow::Result<SockudoClient> {
        Ok(SockudoClient {
            inner: PusherSubscriber::connect(addr, &self.app.key, Some(source)).await?,
            scanner: Scanner::default(),
        })
    }
}

impl SubscriberClient for SockudoClient {
    async fn subscribe(&mut self, room: u32, _wildcard: bool) -> anyhow::Result<()> {
        // Waits for pusher_internal:subscription_succeeded.
        self.inner.subscribe(&channel(room)).await?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<Incoming> {
        let result = self.inner.next().await;
        incoming(&self.scanner, result)
    }
}

/// One Pusher HTTP publisher, awaiting each answer (the events API has no streaming form).
pub(crate) struct SockudoPublish {
    inner: PusherPublisher,
    accepted: u64,
}

impl SockudoPublish {
    pub(crate) async fn connect(addr: SocketAddr, app: PusherApp) -> anyhow::Result<Self> {
        Ok(SockudoPublish {
            inner: PusherPublisher::connect(addr, app, None)
                .await
                .with_context(|| format!("Sockudo connect to {addr}"))?,
            accepted: 0,
        })
    }
}

impl Publisher for SockudoPublish {
    async fn publish(&mut self, room: u32, data: Vec<u8>) -> anyhow::Result<()> {
        self.inner.publish(&[channel(room)], &data).await?;
        self.accepted += 1;
        Ok(())
    }

    async fn finish(self) -> anyhow::Result<Option<u64>> {
        Ok(Some(self.accepted))
    }
}
