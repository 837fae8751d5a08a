//! The manager's sealed database backups, kept apart from movie blobs.
//!
//! They live in the blob backend's backups area (`<storage_dir>/backups/
//! <created>-<sha256>` on a local folder, `backups/…` in a bucket; see
//! `store`), apart from the movie blobs, so scrubbing and reconciliation
//! of movie blobs never see them. The node cannot read them:
//! they are sealed with a key derived from the operator's recovery key,
//! which no node holds.
//!
//! Endpoints, all HMAC-signed (`shared::nodeauth`):
//! - `PUT /internal/v1/backups/{name}`: manager only (key id `manager`).
//!   The body must hash to the name's SHA-256 (which the signature covers);
//!   written like a blob (`store::Backend::put_verified`: hashed as it
//!   arrives, committed create-only on a match). The same name again with
//!   the same bytes is a no-op.
//! - `GET /internal/v1/backups`, `GET /internal/v1/backups/{name}`: the
//!   manager, or a restore on an empty machine signing with the
//!   `backup_read_key` (key id `backup-reader`), which can do nothing else.
//! - `DELETE /internal/v1/backups/{name}`: manager only (retention).

use std::io;

use axum::{
    body::Body,
    extract::{DefaultBodyLimit, Path as UrlPath, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::json;
use shared::BlobId;

use crate::store::{PutOutcome, StoreError};
use crate::SharedState;

/// Key id of the read-only credential (`backup_read_key`).
pub const READER_KEY_ID: &str = "backup-reader";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Auth(#[from] shared::NodeAuthError),
    #[error("this credential may only list and fetch backups")]
    ReadOnly,
    #[error("a backup name is `<unix seconds>-<64 hex SHA-256>`")]
    BadName,
    #[error("the received bytes hash to {actual}, not to the name's {expected}")]
    HashMismatch { expected: BlobId, actual: BlobId },
    #[error("the upload was cut off before it finished")]
    BodyAborted,
    #[error("this node holds no backup by that name")]
    Missing,
    #[error("storage failure")]
    Io(#[from] io::Error),
}

impl From<StoreError> for BackupError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::HashMismatch { expected, actual } => {
                BackupError::HashMismatch { expected, actual }
            }
            StoreError::Body(_) => BackupError::BodyAborted,
            StoreError::NotFound => BackupError::Missing,
            StoreError::Io(e) => BackupError::Io(e),
            e @ StoreError::Object(_) => BackupError::Io(io::Error::other(e.to_string())),
        }
    }
}

impl BackupError {
    pub fn code(&self) -> &'static str {
        match self {
            BackupError::Auth(e) => e.code(),
            BackupError::ReadOnly => "auth_read_only",
            BackupError::BadName => "bad_backup_name",
            BackupError::HashMismatch { .. } => "hash_mismatch",
            BackupError::BodyAborted => "body_aborted",
            BackupError::Missing => "backup_missing",
            BackupError::Io(_) => "storage_error",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            BackupError::Auth(_) => StatusCode::UNAUTHORIZED,
            BackupError::ReadOnly => StatusCode::FORBIDDEN,
            BackupError::BadName | BackupError::BodyAborted => StatusCode::BAD_REQUEST,
            BackupError::HashMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            BackupError::Missing => StatusCode::NOT_FOUND,
            BackupError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for BackupError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = self.code(), "backup request failed: {self:?}");
        } else {
            tracing::info!(code = self.code(), "backup request rejected: {self}");
        }
        let body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        (status, Json(body)).into_response()
    }
}

fn parse_name(name: &str) -> Result<BlobId, BackupError> {
    let (t, h) = name.split_once('-').ok_or(BackupError::BadName)?;
    if t.is_empty() || t.len() > 18 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BackupError::BadName);
    }
    h.parse().map_err(|_| BackupError::BadName)
}

/// Who may do what: the manager everything, the recovery reader only reads.
fn authenticate(
    st: &SharedState,
    headers: &HeaderMap,
    method: &str,
    path: &str,
    content_sha256: &str,
    write: bool,
) -> Result<(), BackupError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let reader = hex::decode(st.cfg.backup_read_key.expose()).ok();
    let key_id = shared::verify_request(
        |id| match id {
            "manager" => Some(st.manager_secret.clone()),
            READER_KEY_ID => reader.clone().filter(|k| !k.is_empty()),
            _ => None,
        },
        header(shared::AUTH_HEADER),
        method,
        path,
        header(shared::DATE_HEADER),
        shared::runtime::unix_now(),
        content_sha256,
    )?;
    if write && key_id != "manager" {
        return Err(BackupError::ReadOnly);
    }
    Ok(())
}

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/internal/v1/backups", get(list))
        .route(
            "/internal/v1/backups/{name}",
            // The hash check and the signature bound what is accepted.
            get(fetch)
                .put(store)
                .delete(remove)
                .layer(DefaultBodyLimit::disable()),
        )
}

async fn store(
    State(st): State<SharedState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<serde_json::Value>), BackupError> {
    let expected = parse_name(&name)?;
    authenticate(
        &st,
        &headers,
        "PUT",
        &format!("/internal/v1/backups/{name}"),
        &expected.to_string(),
        true,
    )?;
    let outcome = match st
        .store
        .put_backup(&name, &expected, body.into_data_stream())
        .await
    {
        Ok(o) => o,
        Err(e @ StoreError::HashMismatch { .. }) => {
            metrics::counter!("viewnode_backups_rejected_total").increment(1);
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let stored = outcome == PutOutcome::Stored;
    let size = st.store.backup_meta(&name).await?.map_or(0, |m| m.size);
    metrics::counter!("viewnode_backups_stored_total").increment(u64::from(stored));
    tracing::info!(backup = %name, size, stored, "sealed backup verified and kept");
    let status = if stored {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({ "backup": name, "size": size }))))
}

async fn list(
    State(st): State<SharedState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, BackupError> {
    authenticate(
        &st,
        &headers,
        "GET",
        "/internal/v1/backups",
        &shared::content_sha256_hex(b""),
        false,
    )?;
    let mut out = Vec::new();
    for (name, size) in st.store.backups().await? {
        if parse_name(&name).is_ok() {
            let created: i64 = name
                .split('-')
                .next()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            out.push((created, name, size));
        }
    }
    out.sort_by(|a, b| b.cmp(a));
    let backups: Vec<_> = out
        .into_iter()
        .map(|(created, name, size)| json!({ "name": name, "created": created, "size": size }))
        .collect();
    Ok(Json(json!({ "node": st.cfg.name, "backups": backups })))
}

async fn fetch(
    State(st): State<SharedState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, BackupError> {
    parse_name(&name)?;
    authenticate(
        &st,
        &headers,
        "GET",
        &format!("/internal/v1/backups/{name}"),
        &shared::content_sha256_hex(b""),
        false,
    )?;
    // Served as stored: the reader checks the hash against the name and
    // authenticates every segment, so a damaged copy is found there.
    let (stream, meta) = st.store.read_backup(&name).await?;
    let len = meta.size;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn remove(
    State(st): State<SharedState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Result<StatusCode, BackupError> {
    parse_name(&name)?;
    authenticate(
        &st,
        &headers,
        "DELETE",
        &format!("/internal/v1/backups/{name}"),
        &shared::content_sha256_hex(b""),
        true,
    )?;
    st.store.delete_backup(&name).await?;
    tracing::info!(backup = %name, "backup deleted at the manager's request");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use std::path::Path;
    use tower::ServiceExt;

    const MANAGER: &[u8] = b"0123456789abcdef0123456789abcdef";
    const READER: [u8; 32] = [7u8; 32];

    fn state(dir: &Path) -> SharedState {
        let signer = shared::TokenSigner::generate();
        let file = dir.join("node.toml");
        std::fs::write(&file, format!(
            "name = \"utah\"\nstorage_dir = \"{}\"\nmaster_key = \"{}\"\ntoken_public_key = \"{}\"\n\
             manager_secret = \"{}\"\nbackup_read_key = \"{}\"\n",
            dir.display(),
            "11".repeat(32),
            signer.public_hex(),
            hex::encode(MANAGER),
            hex::encode(READER),
        ))
        .unwrap();
        let cfg = crate::Config::load(Some(&file)).unwrap();
        std::sync::Arc::new(crate::AppState::new(cfg).unwrap())
    }

    fn req(
        method: &str,
        path: &str,
        key: (&str, &[u8]),
        content: &str,
        body: Vec<u8>,
    ) -> Request<Body> {
        let now = shared::runtime::unix_now();
        Request::builder()
            .method(method)
            .uri(path)
            .header(
                shared::AUTH_HEADER,
                shared::sign_request(key.1, key.0, method, path, now, content),
            )
            .header(shared::DATE_HEADER, now.to_string())
            .body(Body::from(body))
            .unwrap()
    }

    async fn send(st: &SharedState, r: Request<Body>) -> (StatusCode, Vec<u8>) {
        let resp = crate::build_router(st.clone()).oneshot(r).await.unwrap();
        let status = resp.status();
        (
            status,
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
    }

    fn code(body: &[u8]) -> String {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        v["error"]["code"].as_str().unwrap_or("").to_string()
    }

    #[tokio::test]
    async fn store_list_fetch_delete_with_the_right_credentials() {
        let d = tempfile::tempdir().unwrap();
        let st = state(d.path());
        let data = b"sealed backup bytes".to_vec();
        let sha = BlobId::of(&data).to_string();
        let name = format!("1700000000-{sha}");
        let path = format!("/internal/v1/backups/{name}");
        let empty = shared::content_sha256_hex(b"");
        let m = ("manager", MANAGER);
        let r = ("backup-reader", &READER[..]);

        // The reader cannot write; a wrong body is refused; nothing half-written.
        let (s, b) = send(&st, req("PUT", &path, r, &sha, data.clone())).await;
        assert_eq!(
            (s, code(&b).as_str()),
            (StatusCode::FORBIDDEN, "auth_read_only")
        );
        let (s, b) = send(&st, req("PUT", &path, m, &sha, b"other".to_vec())).await;
        assert_eq!(
            (s, code(&b).as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "hash_mismatch")
        );
        assert_eq!(
            std::fs::read_dir(d.path().join("backups-tmp"))
                .unwrap()
                .count(),
            0
        );
        let (s, b) = send(
            &st,
            req("PUT", "/internal/v1/backups/nope", m, &sha, data.clone()),
        )
        .await;
        assert_eq!(
            (s, code(&b).as_str()),
            (StatusCode::BAD_REQUEST, "bad_backup_name")
        );

        let (s, _) = send(&st, req("PUT", &path, m, &sha, data.clone())).await;
        assert_eq!(s, StatusCode::CREATED);
        let (s, _) = send(&st, req("PUT", &path, m, &sha, data.clone())).await;
        assert_eq!(s, StatusCode::OK, "same bytes again: no-op");
        assert_eq!(
            std::fs::read(d.path().join("backups").join(&name)).unwrap(),
            data
        );
        assert!(
            !d.path().join("blobs").join(&sha[..2]).exists(),
            "apart from blobs"
        );

        // Unsigned: refused. The reader lists and fetches.
        let unsigned = Request::get("/internal/v1/backups")
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&st, unsigned).await.0, StatusCode::UNAUTHORIZED);
        let (s, b) = send(&st, req("GET", "/internal/v1/backups", r, &empty, vec![])).await;
        assert_eq!(s, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["node"], "utah");
        assert_eq!(v["backups"][0]["name"], name.as_str());
        assert_eq!(v["backups"][0]["size"], data.len());
        let (s, b) = send(&st, req("GET", &path, r, &empty, vec![])).await;
        assert_eq!((s, b), (StatusCode::OK, data.clone()));

        // Only the manager deletes.
        let (s, _) = send(&st, req("DELETE", &path, r, &empty, vec![])).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, _) = send(&st, req("DELETE", &path, m, &empty, vec![])).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, b) = send(&st, req("GET", &path, m, &empty, vec![])).await;
        assert_eq!(
            (s, code(&b).as_str()),
            (StatusCode::NOT_FOUND, "backup_missing")
        );
    }
}
