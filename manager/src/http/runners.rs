//! What transcode workers call (`crate::runners` has the story). Every
//! call but registration is signed by the worker (`shared::nodeauth`, key
//! id = its name); a job's calls carry `?lease=` from its accept.

use axum::{
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, Path, Query, Request, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use shared::protocol::{
    RunnerCredentials, RunnerFailure, RunnerProgress, RunnerProgressAnswer, RunnerRegistration,
};

use super::error::ApiError;
use crate::{runners, SharedState};

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route(
            "/api/v1/runners/register",
            post(register).layer(DefaultBodyLimit::max(4096)),
        )
        .route(
            "/api/v1/runners/jobs/request",
            post(request).layer(DefaultBodyLimit::max(4096)),
        )
        .route(
            "/api/v1/runners/jobs/{id}/accept",
            post(accept).layer(DefaultBodyLimit::max(4096)),
        )
        .route("/api/v1/runners/jobs/{id}/source", get(source))
        .route(
            "/api/v1/runners/jobs/{id}/progress",
            post(progress).layer(DefaultBodyLimit::max(4096)),
        )
        .route(
            // The service bounds the result itself while streaming it.
            "/api/v1/runners/jobs/{id}/success",
            post(success).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/api/v1/runners/jobs/{id}/error",
            post(error).layer(DefaultBodyLimit::max(16 * 1024)),
        )
        .route(
            "/api/v1/runners/jobs/{id}/abort",
            post(abort).layer(DefaultBodyLimit::max(4096)),
        )
}

#[derive(Deserialize)]
struct Lease {
    #[serde(default)]
    lease: String,
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The worker that signed this call (`content_sha256` = the body's, or
/// the one the result upload declares).
async fn signer(
    st: &SharedState,
    headers: &HeaderMap,
    method: &str,
    path_and_query: &str,
    content_sha256: &str,
) -> Result<String, ApiError> {
    let call = runners::SignedCall {
        auth: header(headers, shared::AUTH_HEADER),
        date: header(headers, shared::DATE_HEADER),
        method,
        path_and_query,
        content_sha256,
    };
    runners::authenticate(&*st.db, &st.master, &call)
        .await
        .inspect_err(|e| {
            tracing::warn!(code = e.code(), path = %path_and_query, "transcode worker's call refused: {e}")
        })
        .map_err(ApiError::from)
}

fn path_and_query(uri: &axum::http::Uri) -> String {
    uri.path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| uri.path().to_string())
}

/// `POST /api/v1/runners/register` `{token, name}` → `{name, secret}`.
async fn register(
    State(st): State<SharedState>,
    body: Bytes,
) -> Result<Json<RunnerCredentials>, ApiError> {
    let r: RunnerRegistration = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "bad_registration",
            format!("expected {{\"token\", \"name\"}}: {e}"),
        )
    })?;
    Ok(Json(
        runners::register(&*st.db, &st.master, &r.token, &r.name).await?,
    ))
}

/// A signed call with a small body (all but the result upload, which is
/// signed with the SHA-256 it declares): the worker that signed it.
struct Signed {
    name: String,
    body: Bytes,
}

impl Signed {
    /// The body as JSON, or `400 {code}` saying what was `expected`.
    fn json<T: serde::de::DeserializeOwned>(
        &self,
        code: &'static str,
        expected: &str,
    ) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(code, format!("expected {expected}: {e}")))
    }
}

impl axum::extract::FromRequest<SharedState> for Signed {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &SharedState) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        // The routes' own limits (DefaultBodyLimit) are at most this.
        let body = axum::body::to_bytes(body, 16 * 1024)
            .await
            .map_err(|_| ApiError::TooLarge { limit: 16 * 1024 })?;
        let name = signer(
            st,
            &parts.headers,
            parts.method.as_str(),
            &path_and_query(&parts.uri),
            &shared::content_sha256_hex(&body),
        )
        .await?;
        Ok(Signed { name, body })
    }
}

/// `POST /api/v1/runners/jobs/request` → `{id}`, or 204 with no job.
async fn request(State(st): State<SharedState>, _: Signed) -> Result<Response, ApiError> {
    Ok(match runners::request(&st.pipeline).await? {
        Some(offer) => Json(offer).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

async fn accept(
    State(st): State<SharedState>,
    Path(id): Path<String>,
    w: Signed,
) -> Result<Response, ApiError> {
    Ok(Json(runners::accept(&st.pipeline, &w.name, &id).await?).into_response())
}

/// The staged source, streamed.
async fn source(
    State(st): State<SharedState>,
    Path(id): Path<String>,
    Query(q): Query<Lease>,
    w: Signed,
) -> Result<Response, ApiError> {
    let path = runners::source(&st.pipeline, &w.name, &id, &q.lease).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::from(runners::RunnerError::Lost))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .len();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (axum::http::header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn progress(
    State(st): State<SharedState>,
    Path(id): Path<String>,
    Query(q): Query<Lease>,
    w: Signed,
) -> Result<Json<RunnerProgressAnswer>, ApiError> {
    let p: RunnerProgress = w.json("bad_progress", "{\"progress\"}")?;
    let cancel = runners::progress(&st.pipeline, &w.name, &id, &q.lease, p.progress).await?;
    Ok(Json(RunnerProgressAnswer { cancel }))
}

/// The result MP4 as the body, signed with its SHA-256 (checked as it
/// arrives).
async fn success(
    State(st): State<SharedState>,
    Path(id): Path<String>,
    Query(q): Query<Lease>,
    req: Request,
) -> Result<StatusCode, ApiError> {
    let pq = path_and_query(req.uri());
    let declared = header(req.headers(), "x-content-sha256").to_string();
    let mut sha = [0u8; 32];
    if hex::decode_to_slice(declared.trim(), &mut sha).is_err() {
        return Err(ApiError::bad_request(
            "bad_content_sha256",
            "`x-content-sha256` must carry the result's SHA-256 in hex",
        ));
    }
    let name = signer(&st, req.headers(), "POST", &pq, declared.trim()).await?;
    let body = req.into_body().into_data_stream();
    runners::success(&st.pipeline, &name, &id, &q.lease, declared.trim(), body).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn error(
    State(st): State<SharedState>,
    Path(id): Path<String>,
    Query(q): Query<Lease>,
    w: Signed,
) -> Result<StatusCode, ApiError> {
    let f: RunnerFailure = w.json("bad_failure", "{\"code\", \"message\"}")?;
    runners::failed(&st.pipeline, &w.name, &id, &q.lease, &f.code, &f.message).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn abort(
    State(st): State<SharedState>,
    Path(id): Path<String>,
    Query(q): Query<Lease>,
    w: Signed,
) -> Result<StatusCode, ApiError> {
    runners::abort(&st.pipeline, &w.name, &id, &q.lease).await?;
    Ok(StatusCode::NO_CONTENT)
}
