//! Redis Pub/Sub endpoints: `SUBSCRIBE` / `PSUBSCRIBE` in, `PUBLISH` out.
//!
//! Pub/Sub is at-most-once: Redis keeps nothing for a subscriber that is not connected, so messages published
//! while a source is between owners (or reconnecting) are lost, and herald cannot do better. A source never
//! duplicates: one edge in the cluster holds the subscription at a time.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use herald_routes::template;
use herald_routes::RedisSpec;

/// How long connecting (and subscribing) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `PUBLISH` may take before the connection is considered broken.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

fn client(spec: &RedisSpec) -> Result<redis::Client, String> {
    redis::Client::open(spec.url.as_str()).map_err(|e| format!("redis url: {e}"))
}

/// Subscribes to the spec's channel or pattern and hands each message (channel, payload) to `on_message` until
/// `stop`. Returns an error when the connection fails or closes, for the supervisor to reconnect.
pub(crate) async fn consume(
    spec: &RedisSpec,
    stop: CancellationToken,
    mut on_message: impl FnMut(&str, &[u8]),
) -> Result<(), String> {
    let client = client(spec)?;
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        if template::is_glob(&spec.channel) {
            pubsub.psubscribe(&spec.channel).await?;
        } else {
            pubsub.subscribe(&spec.channel).await?;
        }
        Ok::<_, redis::RedisError>(pubsub)
    };
    let mut pubsub = tokio::select! {
        connected = tokio::time::timeout(CONNECT_TIMEOUT, connect) => match connected {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(e)) => return Err(format!("redis subscribe: {e}")),
            Err(_) => return Err(format!("redis subscribe: no answer within {CONNECT_TIMEOUT:?}")),
        },
        _ = stop.cancelled() => return Ok(()),
    };
    tracing::info!(channel = %spec.channel, "redis source subscribed");
    let mut messages = pubsub.on_message();
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(message) => on_message(message.get_channel_name(), message.get_payload_bytes()),
                None => return Err("redis connection closed".into()),
            },
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// A connection that `PUBLISH`es.
pub(crate) struct RedisSink {
    connection: redis::aio::MultiplexedConnection,
}

impl RedisSink {
    /// Connects.
    pub(crate) async fn connect(spec: &RedisSpec) -> Result<RedisSink, String> {
        let client = client(spec)?;
        // The crate's own reply timeout (500 ms by default) would fail a PUBLISH long before ours: a busy Redis
        // is not a broken one.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(PUBLISH_TIMEOUT));
        let connect = client.get_multiplexed_async_connection_with_config(&config);
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(connection)) => Ok(RedisSink { connection }),
            Ok(Err(e)) => Err(format!("redis connect: {e}")),
            Err(_) => Err(format!(
                "redis connect: no answer within {CONNECT_TIMEOUT:?}"
            )),
        }
    }

    /// Publishes `payload` on `channel`.
    pub(crate) async fn publish(&mut self, channel: &str, payload: &[u8]) -> Result<(), String> {
        let mut command = redis::cmd("PUBLISH");
        command.arg(channel).arg(payload);
        let publish = command.query_async::<i64>(&mut self.connection);
        match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
            Ok(Ok(_receivers)) => Ok(()),
            Ok(Err(e)) => Err(format!("redis publish: {e}")),
            Err(_) => Err(format!(
                "redis publish: no answer within {PUBLISH_TIMEOUT:?}"
            )),
        }
    }
}
