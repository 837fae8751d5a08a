//! The access log and the metrics endpoint (process plumbing lives in
//! `shared::runtime`).

use std::time::Instant;

use axum::{extract::State, http::Request, middleware::Next, response::Response};

use crate::SharedState;

/// Prometheus text, for the addresses in `metrics_allow` (all when empty;
/// behind a reverse proxy every request comes from the proxy: restrict
/// `/metrics` there).
pub async fn metrics(
    State(st): State<SharedState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
) -> Result<String, super::error::ApiError> {
    if !shared::server::allowed(&st.cfg.metrics_allow, peer.ip()) {
        return Err(super::error::ApiError::Forbidden);
    }
    Ok(st.metrics.render())
}

pub async fn access_log(req: Request<axum::body::Body>, next: Next) -> Response {
    let method = req.method().clone();
    let path = shared::runtime::loggable_path(req.uri().path());
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let ms = start.elapsed().as_millis() as u64;
    // Probes and the nodes' journal heartbeats arrive every few seconds;
    // logging each would bury real traffic. Failures are still logged.
    let routine = path == "/healthz"
        || path == "/metrics"
        || (path.starts_with("/internal/v1/nodes/") && path.ends_with("/journal"));
    if routine && status < 400 {
        tracing::debug!(%method, path, status, ms, "request");
    } else {
        tracing::info!(%method, path, status, ms, "request");
    }
    let route = if path.starts_with("/media/") {
        "media"
    } else if path.starts_with("/api/") {
        "api"
    } else {
        "page"
    };
    metrics::counter!("manager_http_requests_total", "route" => route, "status" => status.to_string())
        .increment(1);
    resp
}
