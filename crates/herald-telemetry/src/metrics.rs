//! The node's Prometheus metrics, also pushed over OTLP/gRPC.
//!
//! herald keeps its instruments as atomics rendered in the Prometheus text format (`/metrics`); when an OTLP
//! endpoint is configured, [`spawn_export`] renders the same text every interval, converts each family (counter
//! -> monotonic cumulative sum, gauge -> gauge, histogram -> explicit-bucket histogram, labels -> attributes)
//! and sends it to the collector's `MetricsService`. One source of truth, so `/metrics` and OTLP can never
//! disagree on names or values, and no second set of instruments sits on the hot path.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio::task::JoinHandle;

/// The OTLP endpoint for metrics, by the standard environment variables first, then `configured`; `None` when
/// metrics are not pushed.
pub fn endpoint(configured: &str) -> Option<String> {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    for var in [
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        if let Ok(value) = std::env::var(var) {
            if !value.trim().is_empty() {
                return Some(value.trim().to_owned());
            }
        }
    }
    let configured = configured.trim();
    (!configured.is_empty()).then(|| configured.to_owned())
}

/// How often metrics are pushed: `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds), else 60 s as the SDKs do.
pub fn interval() -> Duration {
    std::env::var("OTEL_METRIC_EXPORT_INTERVAL")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map_or(Duration::from_secs(60), Duration::from_millis)
}

/// Pushes `render()` (Prometheus text) to `endpoint` every `every`, as `service` / `instance`, until the task is
/// aborted. A failed push is logged and retried at the next interval; the values are cumulative, so nothing is
/// lost but resolution.
pub fn spawn_export(
    endpoint: String,
    every: Duration,
    service: String,
    instance: String,
    render: impl Fn() -> String + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let started = unix_nanos();
        let resource = Resource {
            attributes: [
                ("service.name", service),
                ("service.instance.id", instance),
                ("service.version", env!("CARGO_PKG_VERSION").to_owned()),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| string_attribute(k, v))
            .collect(),
            ..Resource::default()
        };
        let mut client = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let metrics = from_prometheus(&render(), started, unix_nanos());
            let request = ExportMetricsServiceRequest {
                resource_metrics: vec![ResourceMetrics {
                    resource: Some(resource.clone()),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(InstrumentationScope {
                            name: "herald".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..InstrumentationScope::default()
                        }),
                        metrics,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }],
            };
            if client.is_none() {
                client = tonic::transport::Endpoint::from_shared(endpoint.clone())
                    .ok()
                    .map(|e| {
                        MetricsServiceClient::new(e.timeout(Duration::from_secs(10)).connect_lazy())
                    });
            }
            let Some(rpc) = client.as_mut() else {
                tracing::warn!(%endpoint, "OTLP metrics endpoint is not a valid URL; metrics are not pushed");
                return;
            };
            match rpc.export(request).await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!(%endpoint, "OTLP metrics export recovered");
                }
                Ok(_) => {}
                Err(status) if !failing => {
                    failing = true;
                    tracing::warn!(%endpoint, error = %status, "OTLP metrics export failed; retrying each interval");
                }
                Err(_) => {}
            }
        }
    })
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn string_attribute(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..KeyValue::default()
    }
}

/// A sample's labels, in the order written.
type Labels = Vec<(String, String)>;

/// One histogram series: buckets (upper bound, cumulative count), sum, count.
#[derive(Default)]
struct Series {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

/// One family being collected from the text.
#[derive(Default)]
struct Family {
    kind: String,
    help: String,
    /// Plain samples: labels -> value.
    samples: Vec<(Labels, f64)>,
    /// Histogram series by labels (without `le`).
    histograms: BTreeMap<Labels, Series>,
}

/// The family `name`, created (and its place in the output kept) on first sight.
fn family<'a>(
    families: &'a mut BTreeMap<String, Family>,
    order: &mut Vec<String>,
    name: &str,
) -> &'a mut Family {
    families.entry(name.to_owned()).or_insert_with(|| {
        order.push(name.to_owned());
        Family::default()
    })
}

/// Converts the Prometheus text format into OTLP metrics. Lines that do not parse are skipped (the text is
/// herald's own, so that would be a bug, not an attack).
pub fn from_prometheus(text: &str, start_nanos: u64, now_nanos: u64) -> Vec<Metric> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                family(&mut families, &mut order, name).kind = kind.trim().to_owned();
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, help)) = rest.split_once(' ') {
                family(&mut families, &mut order, name).help = help.to_owned();
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = parse_sample(line) else {
            continue;
        };
        if let Some(family) = families.get_mut(name) {
            family.samples.push((labels, value));
            continue;
        }
        for (suffix, part) in [("_bucket", 0), ("_sum", 1), ("_count", 2)] {
            let Some(base) = name.strip_suffix(suffix) else {
                continue;
            };
            let Some(family) = families.get_mut(base).filter(|f| f.kind == "histogram") else {
                continue;
            };
            let mut labels = labels.clone();
            let le = labels
                .iter()
                .position(|(k, _)| k == "le")
                .map(|i| labels.remove(i).1);
            let series = family.histograms.entry(labels).or_default();
            match (part, le) {
                (0, Some(le)) => {
                    let bound = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or(f64::NAN)
                    };
                    series.buckets.push((bound, value));
                }
                (1, _) => series.sum = value,
                (2, _) => series.count = value,
                _ => {}
            }
            break;
        }
    }
    order
        .into_iter()
        .filter_map(|name| {
            let family = families.remove(&name)?;
            let attributes = |labels: &[(String, String)]| -> Vec<KeyValue> {
                labels
                    .iter()
                    .map(|(k, v)| string_attribute(k, v.clone()))
                    .collect()
            };
            let points = |family: &Family| -> Vec<NumberDataPoint> {
                family
                    .samples
                    .iter()
                    .map(|(labels, value)| NumberDataPoint {
                        attributes: attributes(labels),
                        start_time_unix_nano: start_nanos,
                        time_unix_nano: now_nanos,
                        value: Some(number_data_point::Value::AsDouble(*value)),
                        ..NumberDataPoint::default()
                    })
                    .collect()
            };
            let data = match family.kind.as_str() {
                "counter" => metric::Data::Sum(Sum {
                    data_points: points(&family),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                }),
                "gauge" => metric::Data::Gauge(Gauge {
                    data_points: points(&family),
                }),
                "histogram" => metric::Data::Histogram(Histogram {
                    data_points: family
                        .histograms
                        .iter()
                        .map(|(labels, series)| {
                            histogram_point(attributes(labels), series, start_nanos, now_nanos)
                        })
                        .collect(),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                }),
                _ => return None,
            };
            let unit = if name.ends_with("_seconds") || name.contains("_seconds_") {
                "s"
            } else if name.contains("_bytes") {
                "By"
            } else {
                ""
            };
            Some(Metric {
                name,
                description: family.help,
                unit: unit.into(),
                data: Some(data),
                ..Metric::default()
            })
        })
        .collect()
}

/// Prometheus buckets are cumulative with an `+Inf` bound; OTLP's are per bucket, bounds without `+Inf`.
fn histogram_point(
    attributes: Vec<KeyValue>,
    series: &Series,
    start_nanos: u64,
    now_nanos: u64,
) -> HistogramDataPoint {
    let (sum, count) = (series.sum, series.count);
    let mut buckets = series.buckets.clone();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut explicit_bounds = Vec::new();
    let mut bucket_counts = Vec::new();
    let mut below = 0.0;
    for (bound, cumulative) in &buckets {
        bucket_counts.push((cumulative - below).max(0.0) as u64);
        below = *cumulative;
        if bound.is_finite() {
            explicit_bounds.push(*bound);
        }
    }
    if buckets.last().is_none_or(|(bound, _)| bound.is_finite()) {
        // No +Inf bucket in the text: the rest of the count is above the last bound.
        bucket_counts.push((count - below).max(0.0) as u64);
    }
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start_nanos,
        time_unix_nano: now_nanos,
        count: count as u64,
        sum: Some(sum),
        bucket_counts,
        explicit_bounds,
        ..HistogramDataPoint::default()
    }
}

/// `name{k="v",...} value` or `name value`.
fn parse_sample(line: &str) -> Option<(&str, Labels, f64)> {
    let Some(open) = line.find('{') else {
        let (name, value) = line.split_once(' ')?;
        return Some((name, Vec::new(), parse_value(value)?));
    };
    let name = &line[..open];
    let mut rest = &line[open + 1..];
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Some((name, labels, parse_value(after)?));
        }
        let (key, after_key) = rest.split_once('=')?;
        let quoted = after_key.strip_prefix('"')?;
        let mut value = String::new();
        let mut escaped = false;
        let mut end = None;
        for (i, c) in quoted.char_indices() {
            match (escaped, c) {
                (true, 'n') => value.push('\n'),
                (true, c) => value.push(c),
                (false, '\\') => {
                    escaped = true;
                    continue;
                }
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                (false, c) => value.push(c),
            }
            escaped = false;
        }
        rest = &quoted[end? + 1..];
        labels.push((key.trim().to_owned(), value));
    }
}

fn parse_value(value: &str) -> Option<f64> {
    let value = value.split_whitespace().next()?;
    match value {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        v => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP herald_connections Open WebSocket connections.
# TYPE herald_connections gauge
herald_connections 3
# HELP herald_messages_published_total Publishes accepted, by API.
# TYPE herald_messages_published_total counter
herald_messages_published_total{api="http"} 5
herald_messages_published_total{api="grpc",note="a \"quoted\", value"} 7
# HELP herald_publish_to_delivery_seconds Publish to socket write.
# TYPE herald_publish_to_delivery_seconds histogram
herald_publish_to_delivery_seconds_bucket{le="0.001"} 2
herald_publish_to_delivery_seconds_bucket{le="0.01"} 5
herald_publish_to_delivery_seconds_bucket{le="+Inf"} 6
herald_publish_to_delivery_seconds_sum 0.5
herald_publish_to_delivery_seconds_count 6
"#;

    fn number(point: &NumberDataPoint) -> f64 {
        match point.value {
            Some(number_data_point::Value::AsDouble(v)) => v,
            _ => panic!("not a double"),
        }
    }

    #[test]
    fn families_become_otlp_metrics() {
        let metrics = from_prometheus(TEXT, 1, 2);
        let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "herald_connections",
                "herald_messages_published_total",
                "herald_publish_to_delivery_seconds"
            ]
        );
        let Some(metric::Data::Gauge(gauge)) = &metrics[0].data else {
            panic!("gauge")
        };
        assert_eq!(number(&gauge.data_points[0]), 3.0);
        let Some(metric::Data::Sum(sum)) = &metrics[1].data else {
            panic!("sum")
        };
        assert!(sum.is_monotonic);
        assert_eq!(sum.data_points.len(), 2);
        assert_eq!(number(&sum.data_points[1]), 7.0);
        let note = &sum.data_points[1].attributes[1];
        assert_eq!(note.key, "note");
        assert_eq!(
            note.value.as_ref().unwrap().value,
            Some(any_value::Value::StringValue(r#"a "quoted", value"#.into()))
        );
        let Some(metric::Data::Histogram(histogram)) = &metrics[2].data else {
            panic!("histogram")
        };
        let point = &histogram.data_points[0];
        assert_eq!(point.explicit_bounds, [0.001, 0.01]);
        assert_eq!(point.bucket_counts, [2, 3, 1]);
        assert_eq!((point.count, point.sum), (6, Some(0.5)));
        assert_eq!(metrics[2].unit, "s");
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let text = "# TYPE a gauge\na{x=\"unterminated} 1\na{x=1} 2\na 4\n";
        let metrics = from_prometheus(text, 0, 0);
        let Some(metric::Data::Gauge(gauge)) = &metrics[0].data else {
            panic!("gauge")
        };
        assert_eq!(gauge.data_points.len(), 1);
        assert_eq!(number(&gauge.data_points[0]), 4.0);
    }
}
