//! `herald-loadtest otlp-sink`: an OTLP/gRPC trace receiver that counts and discards spans.
//!
//! For measuring what exporting traces costs herald (BENCHMARKS.md, "Tracing overhead"): start the sink, run a
//! scenario with `HERALD_TELEMETRY_OTLP_ENDPOINT` pointing at it (the harness's herald nodes inherit the
//! environment), and compare with the same scenario without it. The sink answers every export at once, as a
//! healthy collector would, and prints how many spans it received.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Clone, Default)]
struct Sink {
    spans: Arc<AtomicU64>,
    exports: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(spans as u64, Ordering::Relaxed);
        self.exports.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves on `listen` until SIGINT/SIGTERM, printing the running totals every `every`.
pub(crate) fn main(listen: &str, every: Duration) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("otlp-sink listening: {}", listener.local_addr()?);
        let sink = Sink::default();
        let totals = sink.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                println!(
                    "otlp-sink: {} spans in {} exports",
                    totals.spans.load(Ordering::Relaxed),
                    totals.exports.load(Ordering::Relaxed)
                );
            }
        });
        let stop = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop,
            )
            .await?;
        println!(
            "otlp-sink: {} spans in {} exports",
            sink.spans.load(Ordering::Relaxed),
            sink.exports.load(Ordering::Relaxed)
        );
        Ok(())
    })
}
