//! The access log and the metrics endpoint (process plumbing lives in
//! `shared::runtime`).

use std::time::Instant;

use axum::{extract::State, http::Request, middleware::Next, response::Response};

use crate::SharedState;

/// The last listing of the store, for `/metrics`: (when, the store's
/// change count then, good copies, quarantined count).
pub type InventoryCache =
    tokio::sync::Mutex<Option<(Instant, u64, Vec<(shared::BlobId, u64)>, usize)>>;

/// A listing is reused for this long unless the node stored, quarantined
/// or deleted a copy meanwhile; a disk changed under the node (wiped,
/// swapped) shows within this time.
const LISTING_TTL: std::time::Duration = std::time::Duration::from_secs(30);
const LISTING_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(5);

/// Prometheus text. Scrapes are cheap: the store's listing is reused (see
/// [`LISTING_TTL`]), redone after the node itself changed a copy (at most
/// every [`LISTING_MIN_AGE`]).
/// `metrics_allow` may restrict it to the operator's collectors.
pub async fn metrics(
    State(st): State<SharedState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if !shared::server::allowed(&st.cfg.metrics_allow, peer.ip()) {
        return crate::error::NodeError::Forbidden("metrics are not served to this address")
            .into_response();
    }
    let mut cache = st.inventory.lock().await;
    let changes = st.store.changes();
    // Reused while nothing changed, and for a few seconds even if something
    // did: a node taking many copies must not relist per scrape.
    let fresh = cache.as_ref().is_some_and(|(at, seen, _, _)| {
        at.elapsed() < LISTING_MIN_AGE || (*seen == changes && at.elapsed() < LISTING_TTL)
    });
    if !fresh {
        match (st.store.list().await, st.store.quarantined().await) {
            (Ok(good), Ok(q)) => *cache = Some((Instant::now(), changes, good, q.len())),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("cannot list blobs for metrics: {e}");
                *cache = None;
            }
        }
    }
    if let Some((_, _, good, quarantined)) = cache.as_ref() {
        let bytes: u64 = good.iter().map(|(_, n)| n).sum();
        metrics::gauge!("viewnode_blobs", "state" => "good").set(good.len() as f64);
        metrics::gauge!("viewnode_blob_bytes", "state" => "good").set(bytes as f64);
        metrics::gauge!("viewnode_blobs", "state" => "quarantined").set(*quarantined as f64);
        // Age of the stalest proof that a held copy is intact; a copy
        // never verified on this disk counts from the epoch, on purpose.
        let now = shared::runtime::unix_now();
        let oldest = st.store.oldest_verified(good).map_or(0, |t| now - t);
        metrics::gauge!("viewnode_blob_oldest_verification_age_seconds").set(oldest as f64);
    }
    drop(cache);
    let s = st.scrub.lock().expect("scrub status").clone();
    let progress = if s.pass_bytes_total == 0 {
        if s.pass_running {
            0.0
        } else {
            1.0
        }
    } else {
        s.pass_bytes_done as f64 / s.pass_bytes_total as f64
    };
    metrics::gauge!("viewnode_scrub_pass_progress_ratio").set(progress);
    metrics::gauge!("viewnode_scrub_passes_completed").set(s.passes_completed as f64);
    st.metrics.render().into_response()
}

pub async fn access_log(
    State(st): State<SharedState>,
    req: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let path = shared::runtime::loggable_path(req.uri().path());
    // The viewer's address: behind the operator's reverse proxy (listed in
    // `trusted_proxies`), the one it forwarded; otherwise the peer's.
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| {
            shared::runtime::client_ip(
                c.0.ip(),
                req.headers()
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
                &st.cfg.trusted_proxies,
            )
            .to_string()
        })
        .unwrap_or_default();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let ms = start.elapsed().as_millis() as u64;
    // Probes arrive every few seconds; logging each would bury real traffic.
    if path == "/healthz" || path == "/metrics" {
        tracing::debug!(%method, path, status, ms, %client, "request");
    } else {
        tracing::info!(%method, path, status, ms, %client, "request");
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
