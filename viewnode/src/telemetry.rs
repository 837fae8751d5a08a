//! The access log and the metrics endpoint (process plumbing lives in
//! `shared::runtime`).

use std::time::Instant;

use axum::{extract::State, http::Request, middleware::Next, response::Response};

use crate::SharedState;

pub async fn metrics(State(st): State<SharedState>) -> String {
    st.metrics.render()
}

/// Playback paths carry a bearer token; it must never reach a log.
fn loggable_path(path: &str) -> String {
    match path.strip_prefix("/play/") {
        Some(rest) => match rest.split_once('/') {
            Some((_, name)) => format!("/play/[token]/{name}"),
            None => "/play/[token]".into(),
        },
        None => path.to_string(),
    }
}

pub async fn access_log(req: Request<axum::body::Body>, next: Next) -> Response {
    let method = req.method().clone();
    let path = loggable_path(req.uri().path());
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let ms = start.elapsed().as_millis() as u64;
    // Probes arrive every few seconds; logging each would bury real traffic.
    if path == "/healthz" || path == "/metrics" {
        tracing::debug!(%method, path, status, ms, "request");
    } else {
        tracing::info!(%method, path, status, ms, "request");
    }
    let route = if path.starts_with("/play/") {
        "play"
    } else {
        "other"
    };
    metrics::counter!("viewnode_http_requests_total", "route" => route, "status" => status.to_string())
        .increment(1);
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_redacted_from_logged_paths() {
        assert_eq!(
            super::loggable_path("/play/eyJhbGciOi.sig/abc.mp4"),
            "/play/[token]/abc.mp4"
        );
        assert_eq!(super::loggable_path("/healthz"), "/healthz");
    }
}
