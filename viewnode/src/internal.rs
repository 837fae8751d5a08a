//! Manager-facing endpoints: verified push, fetch (the source side of a
//! repair), delete (unreferenced blobs after the manager's grace period) and
//! inventory. Every call must be HMAC-signed with the secret this node shares
//! with the manager; the signed content hash of a push is the blob name
//! itself, so the signature also pins which bytes the manager meant to send.
//!
//! Only `blobs/` is ever listed or served here: quarantined copies are listed
//! apart (never as held), and anything else kept on the node (backups) is
//! none of this module's business.

use std::sync::{Arc, Mutex};

use axum::{
    body::Body,
    extract::{DefaultBodyLimit, Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use futures::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
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
            get(get_blob)
                .put(put_blob)
                .delete(delete_blob)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/internal/v1/blobs/{id}/verify",
            axum::routing::post(verify_blob),
        )
        .route(
            "/internal/v1/status",
            axum::routing::put(crate::status::put)
                .layer(DefaultBodyLimit::max(crate::status::MAX_PAGE)),
        )
}

/// Largest answer body MACed here (an inventory of ~100,000 blobs).
const MAX_MACED_ANSWER: usize = 64 << 20;

/// Adds [`shared::ANSWER_MAC_HEADER`] to the answers of signed calls (this
/// router and the backups'), keyed by the secret the request names, so the
/// manager can tell our answer from one made up on the path. Streamed
/// blob and backup bodies (successful GETs) are left alone: they are
/// checked against their names by whoever receives them.
pub async fn mac_answers(
    State(st): State<SharedState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let auth = req
        .headers()
        .get(shared::AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let streamed = req.method() == axum::http::Method::GET
        && (req.uri().path().starts_with("/internal/v1/blobs/")
            || req.uri().path().starts_with("/internal/v1/backups/"));
    let resp = next.run(req).await;
    let Some(auth) = auth else { return resp };
    // Refusals of the signature itself get no MAC: we would be MACing a
    // signature we just found to be made up.
    if (streamed && resp.status().is_success()) || resp.status() == StatusCode::UNAUTHORIZED {
        return resp;
    }
    let secret = match shared::auth_key_id(&auth) {
        Some("manager") => st.manager_secret.clone(),
        Some(crate::backups::READER_KEY_ID) => match hex::decode(st.cfg.backup_read_key.expose()) {
            Ok(k) if !k.is_empty() => k,
            _ => return resp,
        },
        _ => return resp,
    };
    let (mut parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_MACED_ANSWER).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("cannot read an internal answer to authenticate it: {e}");
            return NodeError::Storage("answer too large".into()).into_response();
        }
    };
    let mac = shared::answer_mac(&secret, &auth, parts.status.as_u16(), &bytes);
    parts.headers.insert(
        shared::ANSWER_MAC_HEADER,
        header::HeaderValue::from_str(&mac).expect("hex is a valid header"),
    );
    Response::from_parts(parts, Body::from(bytes))
}

pub(crate) fn authenticate(
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

/// The blob a manager call names in its path (`/internal/v1/blobs/{id}`
/// plus `suffix`), once the manager's signature over `method`, that path
/// and `content_sha256` (the id itself, for a push) is checked.
fn signed_blob(
    st: &SharedState,
    headers: &HeaderMap,
    method: &str,
    id: &str,
    suffix: &str,
    content_sha256: Option<&str>,
) -> Result<BlobId, NodeError> {
    let id: BlobId = id.parse().map_err(|_| NodeError::BadBlobName)?;
    let name = id.to_string();
    authenticate(
        st,
        headers,
        method,
        &format!("/internal/v1/blobs/{id}{suffix}"),
        content_sha256.unwrap_or(&name),
    )?;
    Ok(id)
}

async fn put_blob(
    State(st): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<serde_json::Value>), NodeError> {
    let id = signed_blob(&st, &headers, "PUT", &id, "", None)?;
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

/// Streams a good copy's sealed bytes (a repair's source). The bytes are
/// re-hashed on the way out: should they no longer match the name, the copy
/// is quarantined and reported like a failed scrub, and the connection is
/// reset. (The receiver re-hashes too and refuses to commit such bytes; the
/// check here is so the bad source is found at once, not at its next scrub.)
async fn get_blob(
    State(st): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, NodeError> {
    let id = signed_blob(&st, &headers, "GET", &id, "", Some(EMPTY_SHA256))?;
    let (stream, meta) = st.store.read(&id, 256 * 1024).await?;
    let len = meta.size;
    // (hasher, bytes seen, read failed)
    let seen = Arc::new(Mutex::new((Sha256::new(), 0u64, false)));
    let seen2 = seen.clone();
    let body = stream.map(move |r| {
        let mut s = seen2.lock().expect("hash state");
        match &r {
            Ok(b) => {
                s.0.update(b);
                s.1 += b.len() as u64;
            }
            Err(_) => s.2 = true,
        }
        r
    });
    let tail = futures::stream::once(async move {
        let (hasher, n, failed) = std::mem::take(&mut *seen.lock().expect("hash state"));
        if failed || n != len {
            return None; // a read error, not proof of corruption
        }
        if BlobId::from_hasher(hasher) == id {
            metrics::counter!("viewnode_blobs_served_for_repair_total").increment(1);
            return None;
        }
        tracing::error!(blob = %id, "copy sent for a repair does not hash to its name; quarantining");
        crate::scrub::quarantine_and_report(&st, id, "fetch_mismatch").await;
        Some(Err(std::io::Error::other("stored copy does not hash to its name")))
    })
    .filter_map(futures::future::ready);
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .body(Body::from_stream(body.chain(tail)))
        .expect("valid response"))
}

/// Re-hashes one copy now (an operator's "re-verify" in the manager's
/// console). A mismatch is quarantined and reported like a failed scrub.
async fn verify_blob(
    State(st): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, NodeError> {
    let id = signed_blob(&st, &headers, "POST", &id, "/verify", Some(EMPTY_SHA256))?;
    let checked = crate::scrub::verify_now(&st, id)
        .await
        .map_err(|e| NodeError::Storage(e.to_string()))?
        .ok_or(NodeError::Busy(
            "another copy is being re-verified; try again when it is done",
        ))?;
    tracing::info!(blob = %id, ?checked, "copy re-verified at the manager's request");
    Ok(Json(json!({
        "blob": id,
        "state": checked,
        "verified_at": st.store.verified_at(&id),
    })))
}

/// Removes a good copy no asset references (the manager's call, after its
/// grace period).
async fn delete_blob(
    State(st): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, NodeError> {
    let id = signed_blob(&st, &headers, "DELETE", &id, "", Some(EMPTY_SHA256))?;
    st.store.delete(&id).await?;
    metrics::counter!("viewnode_blobs_deleted_total").increment(1);
    tracing::warn!(blob = %id, "unreferenced blob deleted at the manager's request");
    Ok(Json(json!({ "blob": id, "state": "deleted" })))
}

/// What this node holds: good copies with size and last proof of their
/// hash, quarantined copies apart, and scrub progress.
async fn inventory(
    State(st): State<SharedState>,
    headers: HeaderMap,
) -> Result<Json<shared::protocol::Inventory>, NodeError> {
    use shared::protocol::{HeldBlob, Inventory, InventoryCounts, QuarantinedBlob};
    authenticate(&st, &headers, "GET", "/internal/v1/blobs", EMPTY_SHA256)?;
    let good = st.store.list().await?;
    let good_bytes: u64 = good.iter().map(|(_, n)| n).sum();
    let blobs: Vec<HeldBlob> = good
        .iter()
        .zip(st.store.verified_times(&good))
        .map(|((id, size), verified_at)| HeldBlob {
            blob: id.to_string(),
            size: *size,
            verified_at,
        })
        .collect();
    let quarantined: Vec<QuarantinedBlob> = st
        .store
        .quarantined()
        .await?
        .into_iter()
        .map(|q| QuarantinedBlob {
            blob: q.id.to_string(),
            since: q.since,
        })
        .collect();
    let scrub = st.scrub.lock().expect("scrub status").clone();
    Ok(Json(Inventory {
        node: st.cfg.name.clone(),
        counts: InventoryCounts {
            good: blobs.len() as u64,
            good_bytes,
            quarantined: quarantined.len() as u64,
        },
        blobs,
        quarantined,
        scrub: serde_json::to_value(scrub).unwrap_or_default(),
    }))
}

/// Health means working: the disk is written, read back and cleaned up.
pub async fn healthz(State(st): State<SharedState>) -> (StatusCode, Json<serde_json::Value>) {
    let st2 = st.clone();
    let storage = st
        .health
        .get_or(
            async move { st2.store.health_check().await.map_err(|e| e.to_string()) },
            || Err("the storage check took over 5 s".into()),
        )
        .await;
    // A journal that refuses paid views fails health too, so the manager
    // sends viewers to another mirror rather than to a 503.
    let refusing = st.journal.refusing_views();
    let ok = storage.is_ok() && !refusing;
    // Reported, not failed on: viewers are still served (refunds wait for a
    // journal that cannot be written; a stale price list refuses what it
    // last knew), and the operator must see both.
    let journal_ok = !st
        .journal
        .write_failing
        .load(std::sync::atomic::Ordering::Acquire);
    let body = json!({
        "status": if ok { "ok" } else { "failing" },
        "node": st.cfg.name,
        "version": shared::protocol::build_version(),
        // The manager's console compares these with its own (drift) and
        // its clock with ours (skew).
        "config_fingerprint": shared::protocol::config_fingerprint(&st.cfg.token_public_key, st.cfg.master_key_id),
        "time_ms": shared::runtime::unix_now_ms(),
        "checks": { "storage": match &storage { Ok(()) => "ok".to_string(), Err(e) => e.to_string() } },
        "journal": if refusing { "full" } else if journal_ok { "ok" } else { "write_failing" },
        "journal_unwritten": st.journal.unwritten(),
        "price_list_age_secs": st.prices.age_secs(),
        // The operator's console shows it per node; absent when the
        // call fails (then the storage check above says why).
        "disk": shared::runtime::disk_space(&st.cfg.storage_dir).ok(),
    });
    if let Err(e) = &storage {
        tracing::error!("health check failed: {e}");
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
