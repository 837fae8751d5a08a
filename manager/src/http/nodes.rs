//! What view nodes call, each signed by the node (`shared::nodeauth`):
//! lost-copy reports, the paid list, journal deliveries. The signature is
//! checked here; the work is the services'.

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{get, post},
    Json, Router,
};

use super::error::ApiError;
use shared::BlobId;

use crate::{ledger, pipeline, SharedState};

/// What view nodes call, signed by them; our answers carry a MAC over
/// their request, status and body (`shared::nodeauth`), so a node can tell
/// them from ones made up on the path.
pub fn routes(state: SharedState) -> Router<SharedState> {
    Router::new()
        .route(
            "/internal/v1/nodes/{name}/events",
            post(node_events).layer(DefaultBodyLimit::max(64 * 1024)),
        )
        .route("/internal/v1/nodes/{name}/paid-epochs", get(paid_epochs))
        .route(
            "/internal/v1/nodes/{name}/journal",
            post(journal).layer(DefaultBodyLimit::max(1024 * 1024)),
        )
        .layer(axum::middleware::from_fn_with_state(
            state,
            mac_node_answers,
        ))
}

async fn mac_node_answers(
    State(st): State<SharedState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let auth = req
        .headers()
        .get(shared::AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let resp = next.run(req).await;
    let Some(auth) = auth else { return resp };
    // Refusals of the signature itself get no MAC (it was made up).
    if resp.status() == StatusCode::UNAUTHORIZED {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // Our answers here are small JSON (the paid list is the largest).
    let bytes = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::Internal(anyhow::anyhow!("answer to a node unreadable: {e}"))
                .into_response()
        }
    };
    if let Some(mac) = st.nodes.answer_mac(&auth, parts.status.as_u16(), &bytes) {
        if let Ok(v) = axum::http::HeaderValue::from_str(&mac) {
            parts.headers.insert(shared::ANSWER_MAC_HEADER, v);
        }
    }
    axum::response::Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// `POST /internal/v1/nodes/{name}/journal` (see [`ledger::record_journal`]).
pub async fn journal(
    State(st): State<SharedState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<shared::protocol::JournalReceipt>, ApiError> {
    let path = format!("/internal/v1/nodes/{name}/journal");
    st.nodes
        .verify_from_node(&name, &headers, "POST", &path, &body)
        .inspect_err(|e| tracing::warn!(node = %name, code = e.code(), "journal refused: {e}"))
        .map_err(ApiError::NodeAuth)?;
    Ok(Json(ledger::record_journal(&*st.db, name, &body).await?))
}

/// `POST /internal/v1/nodes/{name}/events`: a node reports what happened to
/// its copies (`quarantined`, `missing`). Signed by the node with its own secret
/// under key id = its name; an unknown node, or one signing for another, is
/// refused with `auth_*` codes (401).
pub async fn node_events(
    State(st): State<SharedState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let path = format!("/internal/v1/nodes/{name}/events");
    st.nodes
        .verify_from_node(&name, &headers, "POST", &path, &body)
        .inspect_err(|e| tracing::warn!(node = %name, code = e.code(), "node report refused: {e}"))
        .map_err(ApiError::NodeAuth)?;
    let events: shared::protocol::NodeReport = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("bad_node_event", format!("the report is not valid: {e}"))
    })?;
    let mut repairing = Vec::new();
    for ev in events.events {
        // `quarantined`: the node found its copy bad and set it aside.
        // `missing`: a viewer was sent to the node for a copy it does not
        // have (storage wiped). Either way the copy is gone: repair it.
        if ev.kind != "quarantined" && ev.kind != "missing" {
            tracing::warn!(node = %name, kind = %ev.kind, "unknown node event ignored");
            continue;
        }
        if ev.blob.parse::<BlobId>().is_err() {
            return Err(ApiError::bad_request(
                "bad_node_event",
                "`blob` must be a SHA-256 in hex",
            ));
        }
        let reason = format!("{} on the node ({})", ev.kind, ev.reason);
        let assets = st.db.replicas_quarantined(&name, &ev.blob, &reason).await?;
        tracing::warn!(node = %name, blob = %ev.blob, reason = %ev.reason, assets = assets.len(),
            kind = %ev.kind, "node reports a lost copy; repairing");
        metrics::counter!("manager_replicas_lost_total", "node" => name.clone()).increment(1);
        repairing.extend(assets);
    }
    // Start now rather than at the replication loop's next tick.
    for a in repairing.clone() {
        let st = st.clone();
        tokio::spawn(async move {
            if let Err(e) = pipeline::replicate_asset(&st.pipeline, &a).await {
                tracing::error!(asset = %a, "repair failed: {e:#}");
            }
        });
    }
    Ok(Json(
        serde_json::json!({ "node": name, "repairing": repairing }),
    ))
}

/// `GET /internal/v1/nodes/{name}/paid-epochs`, signed by that node: every
/// paid movie with its epoch, as `{"node", "paid": [[asset, epoch]…]}`.
pub async fn paid_epochs(
    State(st): State<SharedState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<shared::protocol::PaidEpochs>, ApiError> {
    let path = format!("/internal/v1/nodes/{name}/paid-epochs");
    st.nodes
        .verify_from_node(&name, &headers, "GET", &path, b"")
        .inspect_err(|e| tracing::warn!(node = %name, code = e.code(), "paid-epochs refused: {e}"))
        .map_err(ApiError::NodeAuth)?;
    let paid = st
        .db
        .paid_epochs()
        .await?
        .into_iter()
        .map(|(id, epoch)| (id, u32::try_from(epoch).unwrap_or(u32::MAX)))
        .collect();
    Ok(Json(shared::protocol::PaidEpochs { node: name, paid }))
}
