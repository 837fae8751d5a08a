//! `/api/v1/tus/`: the tus 1.0 protocol's requests and answers over
//! [`crate::tus`] (docs/api.md, "Resumable uploads"). Authenticated like
//! the rest of the API; a browser session sends its CSRF token in
//! `X-CSRF-Token` on every request that changes something.

use axum::{
    body::Body,
    extract::{DefaultBodyLimit, Path, State},
    http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{head, post},
    Router,
};

use super::{error::ApiError, session::Caller};
use crate::{tus, SharedState};

const OFFSET_STREAM: &str = "application/offset+octet-stream";

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/api/v1/tus", post(create).options(options))
        .route("/api/v1/tus/", post(create).options(options))
        .route(
            "/api/v1/tus/{id}",
            head(status).patch(patch).delete(terminate).options(options),
        )
        // Chunks are streamed to disk and bounded by the upload's length.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(protocol_headers))
}

/// Every answer names the protocol version; a refusal of the client's
/// version also lists the ones we speak.
async fn protocol_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert("tus-resumable", HeaderValue::from_static(tus::VERSION));
    // An upload's state is never to be answered from a cache.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if resp.status() == StatusCode::PRECONDITION_FAILED {
        resp.headers_mut()
            .insert("tus-version", HeaderValue::from_static(tus::VERSION));
    }
    resp
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn check_version(headers: &HeaderMap) -> Result<(), ApiError> {
    match header_str(headers, "tus-resumable") {
        Some(v) if v.trim() == tus::VERSION => Ok(()),
        Some(_) => Err(ApiError::PreconditionFailed {
            code: "tus_version_unsupported",
            message: format!("this server speaks tus {}", tus::VERSION),
        }),
        None => Err(ApiError::PreconditionFailed {
            code: "tus_resumable_missing",
            message: format!("send `Tus-Resumable: {}`", tus::VERSION),
        }),
    }
}

fn number(headers: &HeaderMap, name: &'static str) -> Result<Option<u64>, ApiError> {
    match header_str(headers, name) {
        None => Ok(None),
        Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
            ApiError::bad_request(
                "header_invalid",
                format!("{name} must be a whole number of bytes"),
            )
        }),
    }
}

fn is_offset_stream(headers: &HeaderMap) -> Option<bool> {
    header_str(headers, "content-type").map(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case(OFFSET_STREAM))
    })
}

fn checksum(headers: &HeaderMap) -> Result<Option<tus::Checksum>, ApiError> {
    header_str(headers, "upload-checksum")
        .map(tus::Checksum::parse)
        .transpose()
        .map_err(ApiError::from)
}

fn set(h: &mut HeaderMap, name: &'static str, value: impl ToString) {
    if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
        h.insert(HeaderName::from_static(name), v);
    }
}

fn http_date(unix: i64) -> String {
    httpdate::fmt_http_date(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64),
    )
}

/// The headers that describe where an upload stands.
fn describe(h: &mut HeaderMap, info: &tus::Info) {
    set(h, "upload-offset", info.offset);
    set(h, "upload-expires", http_date(info.expires));
    if let Some(asset) = &info.asset {
        // Ours, not the protocol's: the movie the upload became.
        set(h, "asset-id", asset);
        set(h, "asset-location", format!("/assets/{asset}"));
    }
}

/// `OPTIONS`: what this server supports (no authentication: it says
/// nothing about anyone).
async fn options(State(st): State<SharedState>) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    set(h, "tus-version", tus::VERSION);
    set(h, "tus-extension", tus::EXTENSIONS);
    set(h, "tus-max-size", st.cfg.max_upload_bytes);
    set(h, "tus-checksum-algorithm", tus::CHECKSUM_ALGORITHMS);
    resp
}

/// `POST`: creation, and with a body, creation-with-upload.
async fn create(
    State(st): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_version(&headers)?;
    caller.check_csrf_header(&headers)?;
    if headers.contains_key("upload-defer-length") {
        return Err(ApiError::bad_request(
            "defer_length_unsupported",
            "send Upload-Length: this server needs the file's size up front",
        ));
    }
    let length = number(&headers, "upload-length")?.ok_or_else(|| {
        ApiError::bad_request(
            "upload_length_missing",
            "send Upload-Length (the file's size)",
        )
    })?;
    let (filename, title) =
        tus::parse_metadata(header_str(&headers, "upload-metadata").unwrap_or(""))?;
    let with_body = match is_offset_stream(&headers) {
        Some(true) => true,
        Some(false) if number(&headers, "content-length")?.unwrap_or(0) > 0 => {
            return Err(ApiError::UnsupportedMediaType {
                code: "content_type_invalid",
                message: format!("a chunk's Content-Type is {OFFSET_STREAM}"),
            })
        }
        _ => false,
    };
    let sum = if with_body { checksum(&headers)? } else { None };
    let info = st
        .tus
        .create(
            &st.pipeline,
            &st.uploads,
            &caller.user,
            length,
            &filename,
            &title,
        )
        .await?;
    let info = if with_body {
        match st
            .tus
            .patch(
                &st.pipeline,
                &caller.user,
                &info.id,
                tus::Chunk {
                    offset: 0,
                    announced: number(&headers, "content-length")?,
                    checksum: sum,
                },
                body.into_data_stream(),
            )
            .await
        {
            Ok(info) => info,
            // Created all the same; the client resumes from what was kept.
            Err(tus::TusError::Cut { offset }) => tus::Info { offset, ..info },
            // Every byte is here but could not be finished yet (the
            // database away): created and complete; the next HEAD
            // finishes it.
            Err(
                tus::TusError::Ingest(
                    crate::ingest::IngestError::Internal(_) | crate::ingest::IngestError::Ledger(_),
                )
                | tus::TusError::Db(_),
            ) => {
                let len = info.length;
                tus::Info {
                    offset: len,
                    ..info
                }
            }
            // Refused (a bad checksum, past its length, no room, not a
            // movie): a client takes the answer as "not created", so it
            // is not.
            Err(e) => {
                let _ = st.tus.terminate(&caller.user, &info.id).await;
                return Err(e.into());
            }
        }
    } else {
        info
    };
    let mut resp = StatusCode::CREATED.into_response();
    let h = resp.headers_mut();
    set(h, "location", format!("/api/v1/tus/{}", info.id));
    describe(h, &info);
    Ok(resp)
}

/// `HEAD`: where the upload stands (and, once finished, which movie it became).
async fn status(
    State(st): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_version(&headers)?;
    let info = st.tus.head(&st.pipeline, &caller.user, &id).await?;
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    describe(h, &info);
    set(h, "upload-length", info.length);
    set(h, "upload-metadata", tus::encode_metadata(&info));
    Ok(resp)
}

/// `PATCH`: the next chunk.
async fn patch(
    State(st): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    check_version(&headers)?;
    caller.check_csrf_header(&headers)?;
    if is_offset_stream(&headers) != Some(true) {
        return Err(ApiError::UnsupportedMediaType {
            code: "content_type_invalid",
            message: format!("a chunk's Content-Type is {OFFSET_STREAM}"),
        });
    }
    let offset = number(&headers, "upload-offset")?
        .ok_or_else(|| ApiError::bad_request("upload_offset_missing", "send Upload-Offset"))?;
    let sum = checksum(&headers)?;
    let info = st
        .tus
        .patch(
            &st.pipeline,
            &caller.user,
            &id,
            tus::Chunk {
                offset,
                announced: number(&headers, "content-length")?,
                checksum: sum,
            },
            body.into_data_stream(),
        )
        .await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    describe(resp.headers_mut(), &info);
    Ok(resp)
}

/// `DELETE`: termination.
async fn terminate(
    State(st): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_version(&headers)?;
    caller.check_csrf_header(&headers)?;
    st.tus.terminate(&caller.user, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
