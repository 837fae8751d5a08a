//! Manager-facing endpoints: verified push and inventory. Every call must be
//! HMAC-signed with the secret this node shares with the manager; the signed
//! content hash of a push is the blob name itself, so the signature also
//! pins which bytes the manager meant to send.

use axum::{
    body::Body,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode},
    routing::{get, put},
    Json, Router,
};
use serde_json::json;
use shared::BlobId;

use crate::{error::NodeError, store::PutOutcome, SharedState};

/// SHA-256 of the empty body, signed for requests that carry none.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/internal/v1/blobs", get(inventory))
        // Blobs are movies: no body limit here, the hash check bounds trust.
        .route(
            "/internal/v1/blobs/{id}",
            put(put_blob).layer(DefaultBodyLimit::disable()),
        )
}

fn authenticate(
    st: &SharedState,
    headers: &HeaderMap,
    method: &str,
    path: &str,
    content_sha256: &str,
) -> Result<(), NodeError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    shared::verify_request(
        |key_id| (key_id == "manager").then(|| st.manager_secret.clone()),
        header(shared::AUTH_HEADER),
        method,
        path,
        header(shared::DATE_HEADER),
        shared::runtime::unix_now(),
        content_sha256,
    )?;
    Ok(())
}

async fn put_blob(
    State(st): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<serde_json::Value>), NodeError> {
    let id: BlobId = id.parse().map_err(|_| NodeError::BadBlobName)?;
    authenticate(
        &st,
        &headers,
        "PUT",
        &format!("/internal/v1/blobs/{id}"),
        &id.to_string(),
    )?;
    let outcome = st.store.put_verified(&id, body.into_data_stream()).await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            metrics::counter!("viewnode_push_rejected_total").increment(1);
            tracing::warn!(blob = %id, "push rejected: {e}");
            return Err(e.into());
        }
    };
    let size = st.store.size(&id).await?.unwrap_or(0);
    metrics::counter!("viewnode_push_stored_total").increment(1);
    tracing::info!(blob = %id, size, ?outcome, "blob verified and stored");
    let status = match outcome {
        PutOutcome::Stored => StatusCode::CREATED,
        PutOutcome::AlreadyPresent => StatusCode::OK,
    };
    Ok((
        status,
        Json(json!({ "blob": id, "size": size, "state": "verified" })),
    ))
}

async fn inventory(
    State(st): State<SharedState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, NodeError> {
    authenticate(&st, &headers, "GET", "/internal/v1/blobs", EMPTY_SHA256)?;
    let blobs: Vec<_> = st
        .store
        .list()
        .await?
        .into_iter()
        .map(|(id, size)| json!({ "blob": id, "size": size }))
        .collect();
    Ok(Json(json!({ "node": st.cfg.name, "blobs": blobs })))
}

/// Health means working: the disk is written, read back and cleaned up.
pub async fn healthz(State(st): State<SharedState>) -> (StatusCode, Json<serde_json::Value>) {
    let storage = st.store.health_check().await;
    let ok = storage.is_ok();
    let body = json!({
        "status": if ok { "ok" } else { "failing" },
        "node": st.cfg.name,
        "version": env!("CARGO_PKG_VERSION"),
        "checks": { "storage": match &storage { Ok(()) => "ok".to_string(), Err(e) => e.to_string() } },
    });
    if !ok {
        tracing::error!("health check failed: {:?}", storage.err());
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
