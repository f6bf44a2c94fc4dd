//! RabbitMQ (AMQP 0-9-1) endpoints for herald's bridges: an [`AmqpSource`] consumes a queue bound to an exchange,
//! an [`AmqpSink`] publishes to an exchange.
//!
//! # Delivery guarantees
//! - A source is **at-least-once**: the queue is consumed with manual acknowledgements, and a delivery is acked
//!   only when the caller says it was handled ([`AmqpDelivery::ack`]). A delivery that was never acked (the
//!   process died, the connection dropped, the source was dropped) is requeued by the broker and delivered again,
//!   with [`AmqpDelivery::redelivered`] set. A body that can never be handled is [`AmqpDelivery::reject`]ed,
//!   which drops it instead of requeueing it, so one bad message cannot loop forever.
//! - A sink uses **publisher confirms**: [`AmqpSink::publish`] returns `Ok` only once the broker has taken the
//!   message (for a durable endpoint, as a persistent message).
//!
//! # Failure
//! Reconnecting is not this module's job: the bridge supervisor restarts a failed source or sink with backoff. So
//! every call here returns an error promptly instead of retrying, and none waits without bound: connecting and
//! declaring take at most [`CONNECT_TIMEOUT`], a publish or an acknowledgement at most [`OPERATION_TIMEOUT`].
//! [`AmqpSource::next`] waits for the next message as long as the connection lives; the broker's heartbeat
//! notices a dead connection.
//!
//! # Topology
//! Both sides declare the endpoint's exchange (so the first one up creates it) with the endpoint's type and
//! durability; an exchange that already exists must have been declared with the same arguments, or the broker
//! refuses with `PRECONDITION_FAILED`. Exchanges named `amq.*` are the broker's own: they are only checked for
//! existence (a passive declare), since declaring them is refused. A source also declares its queue (always
//! durable, see [`AmqpEndpoint::durable`]) and binds it with the endpoint's routing key.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use serde::{Deserialize, Serialize};

/// How long connecting, opening a channel and declaring the topology may take together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one publish (until its confirm) or one acknowledgement may take.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest exchange, queue or routing key AMQP can carry (a `shortstr`).
pub const MAX_NAME_BYTES: usize = 255;

/// The type of an AMQP exchange (the route table's: one definition for config, registry and this module).
pub use herald_routes::ExchangeKind;

fn to_lapin(kind: ExchangeKind) -> lapin::ExchangeKind {
    match kind {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
    }
}

/// An `amqp` endpoint as written in herald.yaml under `endpoints:` (serde, kebab-case, deny_unknown_fields).
///
/// Only `url` and `exchange` are required; see each field for its default. Parsing checks the shape and applies
/// the defaults; [`AmqpEndpoint::validate`] checks the values. `Debug` hides the URL's password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "RawAmqpEndpoint")]
pub struct AmqpEndpoint {
    /// `amqp://user:password@host:port/vhost` (the default vhost `/` is `%2f`). `amqps://` is not supported:
    /// this build has no TLS.
    pub url: String,
    /// The exchange messages are published to and queues are bound to. Not the default exchange (`""`), which
    /// cannot be bound.
    pub exchange: String,
    /// The exchange's type (default `topic`).
    pub exchange_kind: ExchangeKind,
    /// A source's binding key, a sink's default routing key (default `#` for a topic exchange, which binds to
    /// everything; empty otherwise).
    pub routing_key: String,
    /// The queue a source consumes (default `herald.<route name>`, see [`AmqpEndpoint::queue_name`]).
    pub queue: Option<String>,
    /// Whether the exchange is declared durable, and a sink's messages are published persistent (default true).
    ///
    /// It must match how an existing exchange was declared. The source's queue is always durable, whatever this
    /// says: it has to outlive a connection for at-least-once delivery (a non-durable queue goes at a broker
    /// restart, with the messages waiting in it), and RabbitMQ 4.3 refuses non-durable queues that are not
    /// exclusive. A durable queue may be bound to a non-durable exchange.
    pub durable: bool,
    /// How many unacknowledged deliveries a source may hold at once (default 256, at least 1). This bounds the
    /// messages in flight between the broker and herald, and so the memory a slow consumer can take.
    pub prefetch: u16,
}

/// The endpoint as written, before defaults depending on other fields are applied.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawAmqpEndpoint {
    url: String,
    exchange: String,
    #[serde(default)]
    exchange_kind: ExchangeKind,
    #[serde(default)]
    routing_key: Option<String>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default = "default_durable")]
    durable: bool,
    #[serde(default = "default_prefetch")]
    prefetch: u16,
}

fn default_durable() -> bool {
    true
}

fn default_prefetch() -> u16 {
    256
}

impl TryFrom<RawAmqpEndpoint> for AmqpEndpoint {
    type Error = String;

    fn try_from(raw: RawAmqpEndpoint) -> Result<Self, String> {
        let routing_key = raw.routing_key.unwrap_or_else(|| match raw.exchange_kind {
            ExchangeKind::Topic => "#".to_owned(),
            ExchangeKind::Direct | ExchangeKind::Fanout => String::new(),
        });
        Ok(AmqpEndpoint {
            url: raw.url,
            exchange: raw.exchange,
            exchange_kind: raw.exchange_kind,
            routing_key,
            queue: raw.queue,
            durable: raw.durable,
            prefetch: raw.prefetch,
        })
    }
}

impl fmt::Debug for AmqpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpEndpoint")
            .field("url", &redacted_url(&self.url))
            .field("exchange", &self.exchange)
            .field("exchange_kind", &self.exchange_kind)
            .field("routing_key", &self.routing_key)
            .field("queue", &self.queue)
            .field("durable", &self.durable)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

impl AmqpEndpoint {
    /// The preset that takes over from High-templar 3.x unchanged.
    ///
    /// High-templar declared a **direct, non-durable** exchange `hightemplar` (pika's `exchange_declare` defaults:
    /// not auto-delete, not internal, no arguments) and bound its queue with the routing key `*`; django-binder
    /// publishes `basic_publish("hightemplar", routing_key="*", body=json)` with a body
    /// `{"data": ..., "rooms": [...]}`. On a direct exchange `*` is no wildcard, just the key both sides use. The
    /// exchange is declared with exactly High-templar's arguments, so herald can run against a broker where
    /// High-templar (or an earlier herald) already declared it, instead of failing with `PRECONDITION_FAILED`.
    pub fn hightemplar(url: impl Into<String>) -> Self {
        AmqpEndpoint {
            url: url.into(),
            exchange: "hightemplar".to_owned(),
            exchange_kind: ExchangeKind::Direct,
            routing_key: "*".to_owned(),
            queue: None,
            durable: false,
            prefetch: default_prefetch(),
        }
    }

    /// The queue a source for `route` consumes: [`AmqpEndpoint::queue`], else `herald.<route>`. A fixed name,
    /// rather than one per process as High-templar had, so that a restarted consumer (or the edge that takes the
    /// source over) finds the messages that waited for it.
    pub fn queue_name(&self, route: &str) -> String {
        self.queue
            .clone()
            .unwrap_or_else(|| format!("herald.{route}"))
    }

    /// Checks the values: a parseable `amqp://` URL with a host, names AMQP can carry, a usable prefetch.
    pub fn validate(&self) -> Result<(), String> {
        let uri = parse_url(&self.url)?;
        if uri.authority.host.is_empty() {
            return Err(format!("url {}: no host", redacted_url(&self.url)));
        }
        if self.exchange.is_empty() {
            return Err(
                "exchange: required (the default exchange \"\" cannot be bound to)".to_owned(),
            );
        }
        check_name("exchange", &self.exchange)?;
        check_name("routing-key", &self.routing_key)?;
        if let Some(queue) = &self.queue {
            check_queue(queue)?;
        }
        if self.prefetch == 0 {
            return Err(
                "prefetch: must be at least 1 (0 would let the broker send without limit)"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

/// Parses an `amqp://` URL; `amqps://` is refused because this build has no TLS.
fn parse_url(url: &str) -> Result<AMQPUri, String> {
    let uri: AMQPUri = url
        .parse()
        .map_err(|e| format!("url {}: {e}", redacted_url(url)))?;
    if uri.scheme == AMQPScheme::AMQPS {
        return Err(format!(
            "url {}: amqps:// is not supported (no TLS in this build); use amqp://",
            redacted_url(url)
        ));
    }
    Ok(uri)
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{what}: {} bytes, more than AMQP's {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{what} {name:?}: control characters"));
    }
    Ok(())
}

fn check_queue(queue: &str) -> Result<(), String> {
    if queue.is_empty() {
        return Err(
            "queue: empty (the broker would make up a new name on every connect)".to_owned(),
        );
    }
    if queue.starts_with("amq.") {
        return Err(format!(
            "queue {queue:?}: names starting with amq. are reserved by the broker"
        ));
    }
    check_name("queue", queue)
}

/// The URL without its password, for messages and logs. Text that does not parse is replaced as a whole, since it
/// may still hold a password.
fn redacted_url(url: &str) -> String {
    match url.parse::<AMQPUri>() {
        Ok(uri) => format!(
            "{}://{}@{}:{}/{}",
            uri.scheme,
            uri.authority.userinfo.username,
            uri.authority.host,
            uri.authority.port,
            uri.vhost.replace('/', "%2f")
        ),
        Err(_) => "<unparseable url>".to_owned(),
    }
}

/// What went wrong talking to the broker, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The endpoint's values are unusable (see [`AmqpEndpoint::validate`]).
    #[error("invalid amqp endpoint: {0}")]
    Invalid(String),
    /// The broker did not answer in time.
    #[error("{during}: no answer within {}s", after.as_secs())]
    Timeout {
        /// What was being done.
        during: String,
        /// How long it waited.
        after: Duration,
    },
    /// The broker, the connection or the protocol failed; the source says how (a refused connection, bad
    /// credentials, `PRECONDITION_FAILED` on a declare, a closed channel...).
    #[error("{during}: {source}")]
    Broker {
        /// What was being done.
        during: String,
        /// lapin's error.
        source: lapin::Error,
    },
    /// The broker negatively confirmed a publish (`basic.nack`): it did not take the message.
    #[error("publish to exchange {exchange:?} with routing key {routing_key:?}: the broker refused it (nack)")]
    Nacked {
        /// The exchange published to.
        exchange: String,
        /// The routing key used.
        routing_key: String,
    },
    /// An acknowledgement could not be sent because the channel is gone; the broker redelivers the message.
    #[error("{during}: the channel is closed, so the broker will deliver the message again")]
    ChannelClosed {
        /// What was being done.
        during: String,
    },
}

/// Runs `operation` with a deadline, naming `during` in either error.
async fn bounded<T>(
    during: impl Fn() -> String,
    after: Duration,
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<T, AmqpError> {
    match tokio::time::timeout(after, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(AmqpError::Broker {
            during: during(),
            source,
        }),
        Err(_) => Err(AmqpError::Timeout {
            during: during(),
            after,
        }),
    }
}

/// Connects, opens a channel and declares the endpoint's exchange. The caller bounds the time.
async fn open(endpoint: &AmqpEndpoint, name: String) -> Result<(Connection, Channel), AmqpError> {
    endpoint.validate().map_err(AmqpError::Invalid)?;
    let uri = parse_url(&endpoint.url).map_err(AmqpError::Invalid)?;
    let target = redacted_url(&endpoint.url);
    let broker = |during: String| move |source: lapin::Error| AmqpError::Broker { during, source };
    let connection = Connection::connect_uri(
        uri,
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .map_err(broker(format!("connecting to {target}")))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(broker(format!("opening a channel on {target}")))?;
    let passive = endpoint.exchange.starts_with("amq.");
    channel
        .exchange_declare(
            endpoint.exchange.as_str().into(),
            to_lapin(endpoint.exchange_kind),
            ExchangeDeclareOptions {
                passive,
                durable: endpoint.durable,
                auto_delete: false,
                internal: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await
        .map_err(broker(format!(
            "declaring {} exchange {:?} (durable: {}) on {target}",
            kind_name(endpoint.exchange_kind),
            endpoint.exchange,
            endpoint.durable
        )))?;
    Ok((connection, channel))
}

fn kind_name(kind: ExchangeKind) -> &'static str {
    match kind {
        ExchangeKind::Direct => "direct",
        ExchangeKind::Topic => "topic",
        ExchangeKind::Fanout => "fanout",
    }
}

/// Consumes one queue bound to the endpoint's exchange + routing key; at-least-once: a delivery is acked only
/// after the caller says it was handled.
///
/// Dropping the source closes its connection; the broker then requeues every delivery not acked yet.
pub struct AmqpSource {
    consumer: Consumer,
    queue: String,
    /// Set once the consumer ended (error, cancel or close): lapin's stream is not polled past its end.
    ended: bool,
    // Kept for their lifetime: dropping them closes the channel and the connection.
    _channel: Channel,
    _connection: Connection,
}

impl fmt::Debug for AmqpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSource")
            .field("queue", &self.queue)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl AmqpSource {
    /// Connects and sets up consuming `queue` (usually [`AmqpEndpoint::queue_name`]): declares the exchange (not
    /// passively, except `amq.*`), the queue (durable, not exclusive, not auto-delete, so it keeps messages while
    /// no consumer is connected), binds it with the endpoint's routing key, limits unacknowledged deliveries to
    /// the endpoint's prefetch (per consumer), and starts consuming with manual acks. Takes at most
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect(endpoint: &AmqpEndpoint, queue: &str) -> Result<AmqpSource, AmqpError> {
        check_queue(queue).map_err(AmqpError::Invalid)?;
        let during = || {
            format!(
                "setting up the consumer of queue {queue:?} on {}",
                redacted_url(&endpoint.url)
            )
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, Self::setup(endpoint, queue)).await {
            Ok(result) => result,
            Err(_) => Err(AmqpError::Timeout {
                during: during(),
                after: CONNECT_TIMEOUT,
            }),
        }
    }

    async fn setup(endpoint: &AmqpEndpoint, queue: &str) -> Result<AmqpSource, AmqpError> {
        let (connection, channel) = open(endpoint, format!("herald source {queue}")).await?;
        let broker =
            |during: String| move |source: lapin::Error| AmqpError::Broker { during, source };
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: false,
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    nowait: false,
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker(format!("declaring queue {queue:?}")))?;
        channel
            .queue_bind(
                queue.into(),
                endpoint.exchange.as_str().into(),
                endpoint.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker(format!(
                "binding queue {queue:?} to exchange {:?} with key {:?}",
                endpoint.exchange, endpoint.routing_key
            )))?;
        // Per consumer (global: false): RabbitMQ 4.3 refuses a global prefetch.
        channel
            .basic_qos(endpoint.prefetch.max(1), BasicQosOptions { global: false })
            .await
            .map_err(broker(format!("setting prefetch {}", endpoint.prefetch)))?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_local: false,
                    no_ack: false,
                    exclusive: false,
                    nowait: false,
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker(format!("consuming queue {queue:?}")))?;
        Ok(AmqpSource {
            consumer,
            queue: queue.to_owned(),
            ended: false,
            _channel: channel,
            _connection: connection,
        })
    }

    /// The next delivery. `Ok(None)` when the consumer was cancelled (say, the queue was deleted) or the
    /// connection closed cleanly, and on every call after the consumer ended; an error when the connection or
    /// channel failed. Either way the source is done: the supervisor connects a new one.
    pub async fn next(&mut self) -> Result<Option<AmqpDelivery>, AmqpError> {
        if self.ended {
            return Ok(None);
        }
        match self.consumer.next().await {
            Some(Ok(delivery)) => Ok(Some(AmqpDelivery { inner: delivery })),
            Some(Err(source)) => {
                self.ended = true;
                Err(AmqpError::Broker {
                    during: format!("consuming queue {:?}", self.queue),
                    source,
                })
            }
            None => {
                self.ended = true;
                Ok(None)
            }
        }
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }
}

/// One message from an [`AmqpSource`], to be [`ack`](AmqpDelivery::ack)ed once handled or
/// [`reject`](AmqpDelivery::reject)ed if it never can be. Dropping it without either leaves it unacknowledged:
/// the broker delivers it again after this source's connection closes.
pub struct AmqpDelivery {
    inner: lapin::message::Delivery,
}

impl fmt::Debug for AmqpDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpDelivery")
            .field("exchange", &self.exchange())
            .field("routing_key", &self.routing_key())
            .field("redelivered", &self.redelivered())
            .field("bytes", &self.inner.data.len())
            .finish()
    }
}

impl AmqpDelivery {
    /// The message body.
    pub fn payload(&self) -> &[u8] {
        &self.inner.data
    }

    /// The routing key it was published with (for the `hightemplar` preset, always `*`).
    pub fn routing_key(&self) -> &str {
        self.inner.routing_key.as_str()
    }

    /// The exchange it was published to.
    pub fn exchange(&self) -> &str {
        self.inner.exchange.as_str()
    }

    /// Whether the broker delivered it before (to a consumer that did not ack it): it may have been handled
    /// already.
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// Tells the broker the message was handled; it will not be delivered again. Fails if the channel is gone
    /// (then the broker delivers it again, to the next consumer).
    pub async fn ack(self) -> Result<(), AmqpError> {
        let tag = self.inner.delivery_tag;
        let during = move || format!("acknowledging delivery {tag}");
        let sent = bounded(
            during,
            OPERATION_TIMEOUT,
            self.inner.acker.ack(BasicAckOptions { multiple: false }),
        )
        .await?;
        if sent {
            Ok(())
        } else {
            Err(AmqpError::ChannelClosed { during: during() })
        }
    }

    /// Drops the message without requeueing it (to the queue's dead-letter exchange, if the broker has one set
    /// up): for bodies that can never be decoded, which would otherwise come back forever.
    pub async fn reject(self) -> Result<(), AmqpError> {
        let tag = self.inner.delivery_tag;
        let during = move || format!("rejecting delivery {tag}");
        let sent = bounded(
            during,
            OPERATION_TIMEOUT,
            self.inner
                .acker
                .reject(BasicRejectOptions { requeue: false }),
        )
        .await?;
        if sent {
            Ok(())
        } else {
            Err(AmqpError::ChannelClosed { during: during() })
        }
    }
}

/// Publishes to the endpoint's exchange with a routing key; waits for publisher confirms so a returned Ok means
/// the broker has it.
///
/// A message that no queue is bound for is still confirmed (and dropped by the broker): an exchange with no
/// consumers is not an error in pub/sub. Publishes may run concurrently from several tasks.
pub struct AmqpSink {
    channel: Channel,
    exchange: String,
    persistent: bool,
    _connection: Connection,
}

impl fmt::Debug for AmqpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSink")
            .field("exchange", &self.exchange)
            .field("persistent", &self.persistent)
            .finish_non_exhaustive()
    }
}

impl AmqpSink {
    /// Connects, declares the endpoint's exchange (so publishing never fails for want of it) and turns on
    /// publisher confirms. Takes at most [`CONNECT_TIMEOUT`].
    pub async fn connect(endpoint: &AmqpEndpoint) -> Result<AmqpSink, AmqpError> {
        Self::connect_within(endpoint, CONNECT_TIMEOUT).await
    }

    async fn connect_within(
        endpoint: &AmqpEndpoint,
        limit: Duration,
    ) -> Result<AmqpSink, AmqpError> {
        let setup = async {
            let (connection, channel) =
                open(endpoint, format!("herald sink {}", endpoint.exchange)).await?;
            channel
                .confirm_select(ConfirmSelectOptions { nowait: false })
                .await
                .map_err(|source| AmqpError::Broker {
                    during: "turning on publisher confirms".to_owned(),
                    source,
                })?;
            Ok(AmqpSink {
                channel,
                exchange: endpoint.exchange.clone(),
                persistent: endpoint.durable,
                _connection: connection,
            })
        };
        match tokio::time::timeout(limit, setup).await {
            Ok(result) => result,
            Err(_) => Err(AmqpError::Timeout {
                during: format!(
                    "connecting the publisher to exchange {:?} on {}",
                    endpoint.exchange,
                    redacted_url(&endpoint.url)
                ),
                after: limit,
            }),
        }
    }

    /// Publishes `payload` with `routing_key` and waits (at most [`OPERATION_TIMEOUT`], including any time the
    /// broker holds publishers back under a resource alarm) until the broker confirms it.
    pub async fn publish(&self, routing_key: &str, payload: &[u8]) -> Result<(), AmqpError> {
        check_name("routing key", routing_key).map_err(AmqpError::Invalid)?;
        let during = || {
            format!(
                "publishing to exchange {:?} with routing key {routing_key:?}",
                self.exchange
            )
        };
        let properties =
            BasicProperties::default().with_delivery_mode(if self.persistent { 2 } else { 1 });
        let publish = async {
            let confirm = self
                .channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: false,
                        immediate: false,
                    },
                    payload,
                    properties,
                )
                .await?;
            confirm.await
        };
        match bounded(during, OPERATION_TIMEOUT, publish).await? {
            Confirmation::Ack(_) => Ok(()),
            Confirmation::Nack(_) => Err(AmqpError::Nacked {
                exchange: self.exchange.clone(),
                routing_key: routing_key.to_owned(),
            }),
            // Confirms are turned on in `connect`, so the broker always answers one way or the other.
            Confirmation::NotRequested => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<AmqpEndpoint, String> {
        serde_norway::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_apply_to_the_two_required_fields() {
        let endpoint =
            parse("url: amqp://guest:guest@127.0.0.1:5672/%2f\nexchange: events\n").unwrap();
        assert_eq!(
            endpoint,
            AmqpEndpoint {
                url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
                exchange: "events".to_owned(),
                exchange_kind: ExchangeKind::Topic,
                routing_key: "#".to_owned(),
                queue: None,
                durable: true,
                prefetch: 256,
            }
        );
        endpoint.validate().unwrap();
        assert_eq!(endpoint.queue_name("orders"), "herald.orders");
    }

    #[test]
    fn every_field_parses_in_kebab_case() {
        let endpoint = parse(
            "url: amqp://u:p@broker:5673/prod\n\
             exchange: legacy\n\
             exchange-kind: direct\n\
             routing-key: orders.created\n\
             queue: herald-orders\n\
             durable: false\n\
             prefetch: 16\n",
        )
        .unwrap();
        assert_eq!(endpoint.exchange_kind, ExchangeKind::Direct);
        assert_eq!(endpoint.routing_key, "orders.created");
        assert_eq!(endpoint.queue_name("orders"), "herald-orders");
        assert!(!endpoint.durable);
        assert_eq!(endpoint.prefetch, 16);
        endpoint.validate().unwrap();
    }

    #[test]
    fn the_routing_key_default_depends_on_the_exchange_kind() {
        for (kind, key) in [("topic", "#"), ("direct", ""), ("fanout", "")] {
            let endpoint = parse(&format!(
                "url: amqp://h/\nexchange: x\nexchange-kind: {kind}\n"
            ))
            .unwrap();
            assert_eq!(endpoint.routing_key, key, "{kind}");
        }
    }

    #[test]
    fn unknown_fields_missing_fields_and_unknown_kinds_are_refused() {
        let unknown = parse("url: amqp://h/\nexchange: x\nrouting_key: a\n").unwrap_err();
        assert!(unknown.contains("unknown field"), "{unknown}");
        let missing = parse("url: amqp://h/\n").unwrap_err();
        assert!(missing.contains("exchange"), "{missing}");
        let kind = parse("url: amqp://h/\nexchange: x\nexchange-kind: headers\n").unwrap_err();
        assert!(kind.contains("headers"), "{kind}");
    }

    #[test]
    fn validate_refuses_what_the_broker_or_this_build_cannot_do() {
        let good = AmqpEndpoint::hightemplar("amqp://guest:guest@127.0.0.1:5672/%2f");
        good.validate().unwrap();
        let with = |change: &dyn Fn(&mut AmqpEndpoint)| {
            let mut endpoint = good.clone();
            change(&mut endpoint);
            endpoint.validate().unwrap_err()
        };
        assert!(with(&|e| e.url = "not a url".into()).contains("url"));
        assert!(with(&|e| e.url = "http://h/".into()).contains("url"));
        assert!(with(&|e| e.url = "amqps://h/".into()).contains("amqps"));
        assert!(with(&|e| e.exchange.clear()).contains("exchange"));
        assert!(with(&|e| e.exchange = "x".repeat(256)).contains("255"));
        assert!(with(&|e| e.routing_key = "k".repeat(256)).contains("routing-key"));
        assert!(with(&|e| e.queue = Some(String::new())).contains("queue"));
        assert!(with(&|e| e.queue = Some("amq.mine".into())).contains("reserved"));
        assert!(with(&|e| e.exchange = "a\nb".into()).contains("control"));
        assert!(with(&|e| e.prefetch = 0).contains("prefetch"));
        // The broker's own exchanges are fine: they are declared passively.
        let mut amq = good.clone();
        amq.exchange = "amq.topic".into();
        amq.validate().unwrap();
    }

    #[test]
    fn the_hightemplar_preset_matches_what_high_templar_declared_and_binder_publishes() {
        let preset = AmqpEndpoint::hightemplar("amqp://guest:guest@rabbit:5672/%2f");
        assert_eq!(preset.exchange, "hightemplar");
        assert_eq!(preset.exchange_kind, ExchangeKind::Direct);
        assert!(!preset.durable, "High-templar's exchange is not durable");
        assert_eq!(preset.routing_key, "*");
        assert_eq!(preset.queue_name("django"), "herald.django");
        assert_eq!(preset.prefetch, 256);
        preset.validate().unwrap();
        // Written out in full, the preset parses back to itself.
        let yaml = "url: amqp://guest:guest@rabbit:5672/%2f\nexchange: hightemplar\nexchange-kind: direct\n\
                    routing-key: '*'\ndurable: false\n";
        assert_eq!(parse(yaml).unwrap(), preset);
    }

    #[test]
    fn serialization_round_trips() {
        let endpoint = AmqpEndpoint::hightemplar("amqp://h/");
        let json = serde_json::to_value(&endpoint).unwrap();
        assert_eq!(json["exchange-kind"], "direct");
        assert_eq!(json["routing-key"], "*");
        let back: AmqpEndpoint = serde_json::from_value(json).unwrap();
        assert_eq!(back, endpoint);
    }

    #[test]
    fn passwords_stay_out_of_debug_and_messages() {
        let endpoint = AmqpEndpoint::hightemplar("amqp://herald:s3cret@rabbit:5672/%2f");
        let debug = format!("{endpoint:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("amqp://herald@rabbit:5672/%2f"), "{debug}");
        let mut bad = endpoint.clone();
        bad.url = "amqps://herald:s3cret@rabbit/".into();
        let message = bad.validate().unwrap_err();
        assert!(!message.contains("s3cret"), "{message}");
        assert_eq!(redacted_url("amqp://u:p@h:port/"), "<unparseable url>");
    }

    #[tokio::test]
    async fn connecting_to_nothing_fails_promptly_with_context() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint =
            AmqpEndpoint::hightemplar(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
        let start = std::time::Instant::now();
        let error = AmqpSink::connect(&endpoint).await.unwrap_err();
        assert!(start.elapsed() < CONNECT_TIMEOUT, "{:?}", start.elapsed());
        let message = error.to_string();
        assert!(
            message.contains("connecting to amqp://guest@127.0.0.1"),
            "{message}"
        );
        assert!(!message.contains("guest:guest"), "{message}");
        let error = AmqpSource::connect(&endpoint, "herald.test")
            .await
            .unwrap_err();
        assert!(matches!(error, AmqpError::Broker { .. }), "{error}");
        let error = AmqpSource::connect(&endpoint, "amq.no").await.unwrap_err();
        assert!(matches!(error, AmqpError::Invalid(_)), "{error}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        // Accepts the TCP connection and then says nothing, like a wedged broker.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let endpoint =
            AmqpEndpoint::hightemplar(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
        let error = AmqpSink::connect_within(&endpoint, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(error, AmqpError::Timeout { .. }), "{error}");
        assert!(
            error.to_string().contains("exchange \"hightemplar\""),
            "{error}"
        );
        hold.abort();
    }
}
