//! A member's plain-HTTP endpoints for operators and orchestrators, on their own listener
//! (`herald registry --metrics-addr`): `GET /metrics` (Prometheus text, [`crate::metrics`]), `GET /livez` (the
//! process serves) and `GET /readyz` (this member knows a leader, so it can answer registry calls or point to
//! who can). Internal gRPC stays behind the cluster secret; these say nothing secret.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::node::Core;

/// Serves the endpoints on `listener` until `stop`.
pub(crate) async fn serve(core: Arc<Core>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "registry http listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let core = core.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let core = core.clone();
                async move { Ok::<_, Infallible>(respond(&core, &request)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn respond(core: &Core, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut response = text(StatusCode::OK, crate::metrics::render(core));
            response.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (&Method::GET, "/livez") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/readyz") => match core.metrics().current_leader {
            Some(leader) => text(StatusCode::OK, format!("ready; leader {leader}\n")),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no leader known yet\n".into(),
            ),
        },
        (_, "/metrics" | "/livez" | "/readyz") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into())
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}
