//! The public JSON API (docs/api.md): uploads and asset status. The web
//! upload form posts to the same handler.

use std::path::PathBuf;

use axum::{
    extract::{Multipart, Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Redirect, Response},
    Json,
};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use super::{
    error::ApiError,
    session::{Caller, MaybeCaller},
};
use crate::{
    catalog,
    domain::{AssetState, ReplicaState},
    SharedState,
};

use crate::ingest::MAX_TITLE_CHARS;

#[derive(Serialize)]
pub struct UploadAccepted {
    pub asset_id: String,
    pub status_url: String,
}

#[derive(Serialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

#[derive(Serialize)]
pub struct ReplicaView {
    pub node: String,
    /// The node's site (`[[nodes]] site`, default its name); empty for a
    /// node no longer configured.
    pub site: String,
    /// `pending`, `verified`, `failed`, `repairing` or `retired`.
    pub state: ReplicaState,
    /// Unix time this copy was last proven intact (push, or the node's scrub).
    pub verified_at: Option<i64>,
    /// Why it is not verified (last push error, or what reconciliation found).
    pub last_error: Option<String>,
}

#[derive(Serialize)]
pub struct AssetView {
    pub id: String,
    pub title: String,
    pub state: AssetState,
    pub progress: f64,
    pub error: Option<ErrorInfo>,
    pub replicas: Vec<ReplicaView>,
    pub media_url: Option<String>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub duration_secs: Option<f64>,
    /// Credits per view; 0 = free. A paid movie's `media_url` is shown only
    /// to its owner and operators; others buy a view (docs/credits.md).
    pub price: i64,
}

pub async fn asset_view(st: &SharedState, a: &catalog::Asset) -> Result<AssetView, ApiError> {
    let replicas = st
        .db
        .replicas(&a.id)
        .await?
        .into_iter()
        .map(|r| ReplicaView {
            site: st
                .nodes
                .get(&r.node)
                .map(|n| n.cfg.site().to_string())
                .unwrap_or_default(),
            node: r.node,
            state: r.state,
            verified_at: r.verified_at,
            last_error: r.last_error,
        })
        .collect();
    Ok(AssetView {
        id: a.id.clone(),
        title: a.title.clone(),
        state: a.state,
        progress: a.progress,
        error: a.error_code.as_ref().map(|c| ErrorInfo {
            code: c.clone(),
            message: a.error_message.clone().unwrap_or_default(),
        }),
        replicas,
        media_url: st.minter.media_url(a, None),
        width: a.width,
        height: a.height,
        duration_secs: a.duration_secs,
        price: st.db.price(&a.id).await?,
    })
}

/// Who may see an asset: anyone once it is published; before that (or when
/// rejected) only its owner and operators. Others get a plain 404 so ids of
/// private uploads cannot be probed.
pub fn visible_to(a: &catalog::Asset, caller: Option<&Caller>) -> bool {
    a.state == AssetState::Published
        || caller.is_some_and(|c| c.user.id == a.owner_id || c.user.is_operator())
}

pub async fn get_asset(
    State(st): State<SharedState>,
    MaybeCaller(caller): MaybeCaller,
    Path(id): Path<String>,
) -> Result<Json<AssetView>, ApiError> {
    let a = st.db.asset(&id).await?.ok_or(ApiError::NotFound("asset"))?;
    if !visible_to(&a, caller.as_ref()) {
        return Err(ApiError::NotFound("asset"));
    }
    let mut view = asset_view(&st, &a).await?;
    super::account::gate_media_url(&a, caller.as_ref(), &mut view);
    Ok(Json(view))
}

/// `GET /api/v1/assets`: the caller's own uploads, newest first.
pub async fn list_assets(
    State(st): State<SharedState>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut out = Vec::new();
    for a in st.db.assets_of(caller.user.id, 500).await? {
        out.push(asset_view(&st, &a).await?);
    }
    Ok(Json(serde_json::json!({ "assets": out })))
}

/// Deletes a partly received upload unless the upload commits.
struct StagingGuard(Option<PathBuf>);

impl Drop for StagingGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// An upload refused for disk space, counted once whichever check found it.
fn no_space(e: crate::quotas::QuotaError) -> ApiError {
    metrics::counter!("manager_uploads_total", "result" => "no_space").increment(1);
    e.into()
}

/// A staging write that failed: a full disk is the uploader's `507`, not
/// an internal error.
fn write_error(e: std::io::Error) -> ApiError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        return no_space(crate::quotas::QuotaError::NoSpace);
    }
    ApiError::Internal(e.into())
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::bad_request(
        "upload_incomplete",
        format!("the upload was cut off or malformed before it finished ({e}); nothing was kept, please try again"),
    )
}

/// Reads a text field, refusing one longer than any real title or token:
/// the body limit is off for this route, so nothing else bounds it.
async fn small_field(field: &mut axum::extract::multipart::Field<'_>) -> Result<String, ApiError> {
    const MAX: usize = 4 * MAX_TITLE_CHARS;
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if buf.len() + chunk.len() > MAX {
            return Err(ApiError::bad_request(
                "field_too_long",
                format!("form fields other than the file have at most {MAX} bytes"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf)
        .map_err(|_| ApiError::bad_request("field_not_utf8", "form fields must be UTF-8 text"))
}

/// `POST /api/v1/uploads`. The file streams to staging in chunks (never
/// whole in memory); the asset row is created only once every byte is on
/// disk, so an aborted upload leaves neither a file nor a row.
///
/// Browser sessions must send the `csrf` field *before* `file`, so a forged
/// cross-site post is refused before a byte is written.
pub async fn upload(
    State(st): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    mut form: Multipart,
) -> Result<Response, ApiError> {
    let header_csrf = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut csrf_ok = caller.check_csrf(header_csrf.as_deref()).is_ok();
    let mut title: Option<String> = None;
    let mut received: Option<(String, u64)> = None;
    let partial = st
        .cfg
        .staging_dir()
        .join(format!("{}.upload", uuid::Uuid::new_v4().simple()));
    let mut guard = StagingGuard(None);
    // The account's limits, before a byte is written; the slot is given
    // back when this request ends, however it ends.
    let slot =
        crate::quotas::begin_upload(&*st.db, &st.cfg.quotas, &st.uploads, &caller.user, &|| {
            st.tus.pending_of(caller.user.id)
        })
        .await?;
    // The disk's reserve, before a byte is written when the length is
    // announced (the whole form, a little more than the file).
    let staging = st.cfg.staging_dir();
    let announced = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    crate::quotas::check_space(&staging, st.cfg.disk_reserve_mb, announced).map_err(no_space)?;

    while let Some(mut field) = form.next_field().await.map_err(multipart_error)? {
        match field.name().unwrap_or("") {
            "csrf" => {
                let v = small_field(&mut field).await?;
                csrf_ok = csrf_ok || caller.check_csrf(Some(&v)).is_ok();
            }
            "title" => title = Some(small_field(&mut field).await?),
            "file" => {
                if !csrf_ok {
                    return Err(ApiError::Csrf);
                }
                if received.is_some() {
                    return Err(ApiError::bad_request(
                        "too_many_files",
                        "send one file per upload",
                    ));
                }
                let name = field
                    .file_name()
                    .unwrap_or("upload")
                    .chars()
                    .take(255)
                    .collect::<String>();
                let mut out = tokio::fs::File::create(&partial)
                    .await
                    .map_err(write_error)?;
                guard.0 = Some(partial.clone());
                let mut size = 0u64;
                let mut space_checked_at = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    size += chunk.len() as u64;
                    if size > st.cfg.max_upload_bytes {
                        metrics::counter!("manager_uploads_total", "result" => "too_large")
                            .increment(1);
                        return Err(ApiError::TooLarge {
                            limit: st.cfg.max_upload_bytes,
                        });
                    }
                    if let Err(e) = slot.check(size) {
                        metrics::counter!("manager_uploads_total", "result" => "quota_exceeded")
                            .increment(1);
                        return Err(e.into());
                    }
                    // Without an announced length (chunked), or when the
                    // disk fills from elsewhere, the reserve is looked at
                    // again every few MiB.
                    if size - space_checked_at >= crate::quotas::SPACE_CHECK_EVERY {
                        space_checked_at = size;
                        crate::quotas::check_space(&staging, st.cfg.disk_reserve_mb, 0)
                            .map_err(no_space)?;
                    }
                    out.write_all(&chunk).await.map_err(write_error)?;
                }
                out.sync_all().await.map_err(write_error)?;
                received = Some((name, size));
            }
            _ => {} // unknown fields are ignored, as browsers may add some
        }
    }
    if !csrf_ok {
        return Err(ApiError::Csrf);
    }
    let Some((source_name, size)) = received else {
        return Err(ApiError::bad_request(
            "file_missing",
            "choose a movie file to upload (form field `file`)",
        ));
    };
    let asset_id = uuid::Uuid::new_v4().simple().to_string();
    crate::ingest::accept(
        &st.pipeline,
        &caller.user,
        crate::ingest::Received {
            asset_id: &asset_id,
            staged: &partial,
            size,
            source_name: &source_name,
            title: title.as_deref().unwrap_or(""),
        },
    )
    .await?;
    drop(slot);

    let status_url = format!("/api/v1/assets/{asset_id}");
    // A browser that posted the plain form (no script) goes to the movie page.
    let wants_html = caller.csrf.is_some()
        && headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        return Ok(Redirect::to(&format!("/assets/{asset_id}")).into_response());
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(UploadAccepted {
            asset_id,
            status_url,
        }),
    )
        .into_response())
}

/// `POST /api/v1/assets/{id}/cancel` (owner or operator): stops a job that
/// has not been sealed yet; the asset ends `rejected` with code `cancelled`.
pub async fn cancel(
    State(st): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.check_csrf_header(&headers)?;
    cancel_as(&st, &caller, &id).await?;
    let a = st.db.asset(&id).await?.ok_or(ApiError::NotFound("asset"))?;
    Ok(Json(
        serde_json::to_value(asset_view(&st, &a).await?)
            .map_err(|e| ApiError::Internal(e.into()))?,
    ))
}

pub async fn cancel_as(st: &SharedState, caller: &Caller, id: &str) -> Result<(), ApiError> {
    let a = st.db.asset(id).await?.ok_or(ApiError::NotFound("asset"))?;
    if a.owner_id != caller.user.id && !caller.user.is_operator() {
        return Err(ApiError::NotFound("asset"));
    }
    match st.db.request_cancel(id).await? {
        catalog::CancelOutcome::Cancelled => {
            let _ = tokio::fs::remove_file(crate::pipeline::source_path(&st.pipeline, id)).await;
            tracing::info!(asset = id, "cancelled before processing");
            Ok(())
        }
        catalog::CancelOutcome::Requested => {
            tracing::info!(asset = id, "cancel requested");
            Ok(())
        }
        catalog::CancelOutcome::TooLate => Err(ApiError::Conflict {
            code: "not_cancellable",
            message: "this movie is already sealed or finished; it can no longer be cancelled"
                .into(),
        }),
    }
}

/// Requeues a job that failed for an internal reason, as operator
/// `caller` (the API and the admin's queue both come here).
pub async fn retry_as(st: &SharedState, caller: &Caller, id: &str) -> Result<(), ApiError> {
    st.db.asset(id).await?.ok_or(ApiError::NotFound("asset"))?;
    if !crate::pipeline::source_path(&st.pipeline, id).exists() {
        return Err(ApiError::Conflict {
            code: "source_gone",
            message: "the uploaded file is no longer kept; it must be uploaded again".into(),
        });
    }
    if !st.db.retry_failed(id).await? {
        return Err(ApiError::Conflict {
            code: "not_retryable",
            message: "only a job that failed with processing_failed can be retried".into(),
        });
    }
    st.pipeline.wake.notify_one();
    tracing::info!(asset = %id, operator = caller.user.id, "job retried by operator");
    Ok(())
}

/// `POST /api/v1/assets/{id}/retry` (operators): runs again a job that
/// failed for an internal reason (`processing_failed`).
pub async fn retry(
    State(st): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    caller.check_csrf_header(&headers)?;
    if !caller.user.is_operator() {
        return Err(ApiError::Forbidden);
    }
    retry_as(&st, &caller, &id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "asset_id": id, "state": "queued" })),
    ))
}
