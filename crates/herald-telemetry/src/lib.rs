//! herald's logs and traces.
//!
//! [`init`] installs one `tracing` subscriber per process: an `EnvFilter` (`RUST_LOG` over the configured level),
//! a human or JSON-lines formatter on stderr, and — only when an OTLP endpoint is configured — a
//! `tracing-opentelemetry` layer exporting spans over OTLP/gRPC (tonic) in batches. Without an endpoint there is
//! no exporter, no OpenTelemetry layer and [`enabled`] is false, so the publish path does not build spans at all
//! (see `herald_edge::trace`): tracing costs nothing when it is off.
//!
//! Configuration follows OpenTelemetry's conventions: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` turn export on (and win over `telemetry.otlp-endpoint` in herald.yaml),
//! `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name the process, `OTEL_TRACES_SAMPLER(_ARG)` choose the
//! sampler (else parent-based with `telemetry.sample-ratio` for new traces), and `OTEL_SDK_DISABLED=true` turns
//! everything off.
//!
//! Trace context crosses process boundaries as W3C `traceparent` values: in HTTP headers and gRPC metadata
//! ([`extract_headers`], [`inject_headers`]) and, for edge-to-edge forwards and bridge envelopes, inside the message
//! ([`parse_traceparent`], [`traceparent_of`]).

pub mod instruments;
pub mod metrics;

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The `tracing` target of the publish path's spans (`herald_edge::trace`).
pub const PUBLISH_TARGET: &str = "herald::publish";
/// The `tracing` target of the registry's spans (writes, elections).
pub const REGISTRY_TARGET: &str = "herald::registry";

/// Whether spans are exported (set once by [`init`]).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// What [`init`] needs: the `log-*` and `telemetry.*` settings of herald.yaml (or the registry's flags).
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// The log filter when `RUST_LOG` is unset, e.g. `info` or `herald_edge=debug`.
    pub log_level: String,
    /// `text` (human, for terminals) or `json` (one JSON object per line, with the current span's fields,
    /// including `trace_id`).
    pub log_format: String,
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`; empty for none (unless `OTEL_EXPORTER_OTLP_*` is set).
    pub otlp_endpoint: String,
    /// `service.name` unless `OTEL_SERVICE_NAME` is set.
    pub service_name: String,
    /// `service.instance.id`: which node this is (edge id, registry member), so one trace's spans can be told
    /// apart by node.
    pub instance: String,
    /// Share of new traces sampled (0.0..=1.0); a continued trace follows its parent's decision.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_level: "info".into(),
            log_format: "text".into(),
            otlp_endpoint: String::new(),
            service_name: "herald".into(),
            instance: String::new(),
            sample_ratio: 1.0,
        }
    }
}

/// Why telemetry could not start.
#[derive(Debug)]
pub struct TelemetryError(String);

impl std::fmt::Display for TelemetryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TelemetryError {}

/// Keeps the exporter alive; [`Telemetry::shutdown`] (or dropping it) sends the spans still buffered.
#[must_use = "dropping it stops span export"]
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes the spans still buffered and stops the exporter.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            ENABLED.store(false, Ordering::Relaxed);
            if let Err(e) = provider.shutdown() {
                eprintln!("herald: flushing traces at exit: {e}");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether spans are exported. Callers on hot paths check this before building a span.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The OTLP endpoint in effect: the standard environment variables first, then the configured one.
fn endpoint(config: &TelemetryConfig) -> Option<(String, bool)> {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        if let Ok(value) = std::env::var(var) {
            if !value.trim().is_empty() {
                return Some((value, true));
            }
        }
    }
    let configured = config.otlp_endpoint.trim();
    (!configured.is_empty()).then(|| (configured.to_string(), false))
}

/// Installs the process's subscriber. Must run inside a tokio runtime when an OTLP endpoint is configured (the
/// gRPC exporter's connection belongs to it). Call once; a second call fails.
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    // The log filter applies to logs only: `log-level: warn` must not turn traces off. herald's spans are at
    // info on the targets below, and the exporter takes exactly those.
    let format = match config.log_format.as_str() {
        "json" => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        _ => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter);
    let (provider, otel) = match endpoint(config) {
        None => (None, None),
        Some((endpoint, from_env)) => {
            let provider = tracer_provider(config, &endpoint, from_env)?;
            let tracer = provider.tracer("herald");
            let spans = Targets::new()
                .with_target(PUBLISH_TARGET, LevelFilter::INFO)
                .with_target(REGISTRY_TARGET, LevelFilter::INFO);
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_location(false)
                .with_filter(spans);
            (Some(provider), Some(layer))
        }
    };
    tracing_subscriber::registry()
        .with(format)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError(format!("installing the log subscriber: {e}")))?;
    if provider.is_some() {
        ENABLED.store(true, Ordering::Relaxed);
    }
    Ok(Telemetry { provider })
}

fn tracer_provider(
    config: &TelemetryConfig,
    endpoint: &str,
    from_env: bool,
) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if !from_env {
        exporter = exporter.with_endpoint(endpoint);
    }
    let exporter = exporter
        .build()
        .map_err(|e| TelemetryError(format!("OTLP exporter for {endpoint}: {e}")))?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(config.service_name.clone());
    }
    if !config.instance.is_empty() {
        resource = resource.with_attribute(KeyValue::new(
            "service.instance.id",
            config.instance.clone(),
        ));
    }
    resource = resource.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    let mut builder = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build());
    if std::env::var("OTEL_TRACES_SAMPLER").is_err() {
        let ratio = config.sample_ratio.clamp(0.0, 1.0);
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))));
    }
    Ok(builder.build())
}

/// A W3C trace context read from a carrier: the remote parent of the span that continues it.
#[derive(Debug, Clone)]
pub struct Parent {
    context: Context,
}

impl Parent {
    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        self.context.span().span_context().trace_id().to_string()
    }

    /// The context, for [`OpenTelemetrySpanExt::set_parent`].
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The `traceparent` value that continues this context unchanged (what to pass on when spans are not
    /// exported, so the backend's trace still reaches bridges and peers).
    pub fn traceparent(&self) -> String {
        format_traceparent(self.context.span().span_context())
    }
}

fn from_context(context: Context) -> Option<Parent> {
    context
        .span()
        .span_context()
        .is_valid()
        .then_some(Parent { context })
}

struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderSink<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderSink<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The trace context in HTTP headers (or gRPC metadata, via `MetadataMap::as_ref`), if a valid `traceparent`
/// is there. A malformed one is ignored: the request starts a new trace.
pub fn extract_headers(headers: &http::HeaderMap) -> Option<Parent> {
    if !well_formed(headers.get("traceparent")?.to_str().ok()?) {
        return None;
    }
    from_context(TraceContextPropagator::new().extract(&HeaderCarrier(headers)))
}

/// `version-traceid-spanid-flags` with exactly 2, 32, 16 and 2 lowercase hex digits (W3C Trace Context level
/// 1; the propagator alone accepts shorter ids).
fn well_formed(traceparent: &str) -> bool {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && (parts[0] != "00" || parts.len() == 4)
}

/// The trace context in a bare `traceparent` value (an edge-to-edge forward, a bridge envelope).
pub fn parse_traceparent(traceparent: &str) -> Option<Parent> {
    if traceparent.is_empty() {
        return None;
    }
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "traceparent",
        http::HeaderValue::from_str(traceparent).ok()?,
    );
    extract_headers(&headers)
}

/// Writes `span`'s trace context into outgoing headers or gRPC metadata (`MetadataMap::as_mut`). Nothing when
/// spans are not exported.
pub fn inject_headers(span: &Span, headers: &mut http::HeaderMap) {
    if !enabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderSink(headers));
}

/// `span`'s context as a `traceparent` value, when spans are exported and the span is real.
pub fn traceparent_of(span: &Span) -> Option<String> {
    if !enabled() || span.is_none() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| format_traceparent(&span_context))
}

fn format_traceparent(span_context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    )
}

/// Renames an exported span after it started (e.g. once a publish's destination is parsed). The `otel.name`
/// field only names a span before it is built, and continuing a trace builds it.
pub fn rename(span: &Span, name: String) {
    if enabled() && !span.is_none() {
        span.context().span().update_name(name);
    }
}

/// Makes `span` continue `parent` (when spans are exported) and records the trace id in the span's `trace_id`
/// field, so every log line inside it carries the id: the exported trace's id when exporting, else the one the
/// caller sent, if any. The span must declare `trace_id = tracing::field::Empty`.
pub fn continue_trace(span: &Span, parent: Option<&Parent>) {
    if span.is_none() {
        return;
    }
    if enabled() {
        if let Some(parent) = parent {
            let _ = span.set_parent(parent.context().clone());
        }
        let context = span.context();
        let span_context = context.span().span_context().clone();
        if span_context.is_valid() {
            span.record("trace_id", span_context.trace_id().to_string());
        }
    } else if let Some(parent) = parent {
        span.record("trace_id", parent.trace_id());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = parse_traceparent(tp).expect("valid");
        assert_eq!(parent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.traceparent(), tp);
    }

    #[test]
    fn malformed_or_zero_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u{1}",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn off_by_default_and_no_context_is_injected() {
        assert!(!enabled());
        let span = tracing::info_span!("x");
        let mut headers = http::HeaderMap::new();
        inject_headers(&span, &mut headers);
        assert!(headers.is_empty());
        assert_eq!(traceparent_of(&span), None);
    }
}
