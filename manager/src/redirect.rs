//! The media URL a viewer's player is given: `/media/{asset}.mp4`.
//!
//! `HEAD` is answered here, directly, with `Content-Type: video/mp4` and the
//! length: the Second Life viewer decides which plugin plays a URL from a
//! headers-only probe, and some viewers do not follow redirects during it.
//! `GET` answers `302` to a view node holding a verified copy, with a
//! short-lived playback token the node verifies on its own.

use axum::{
    extract::{Path, State},
    http::{header, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use shared::PlaybackClaims;

use crate::{db, error::ApiError, SharedState};

/// Picks the node to send a viewer to: healthy, holding a verified copy;
/// heavier weight first, then configuration order. GeoIP proximity slots in
/// here.
pub fn choose_node<'a>(st: &'a SharedState, verified: &[String]) -> Option<&'a crate::nodes::Node> {
    let mut candidates: Vec<&crate::nodes::Node> = st
        .nodes
        .list
        .iter()
        .filter(|n| verified.contains(&n.cfg.name) && n.is_healthy())
        .collect();
    candidates.sort_by_key(|n| std::cmp::Reverse(n.cfg.weight));
    candidates.into_iter().next()
}

pub async fn media(
    State(st): State<SharedState>,
    Path(file): Path<String>,
    method: Method,
) -> Result<Response, ApiError> {
    let id = file.strip_suffix(".mp4").unwrap_or(&file);
    let a = db::asset(&st.db, id)
        .await?
        .ok_or(ApiError::NotFound("movie"))?;
    if a.state != "published" {
        return Err(ApiError::NotPublished);
    }
    let (Some(blob), Some(wrapped), Some(plain_len)) =
        (a.blob_id.as_deref(), a.wrapped_key.clone(), a.plain_len)
    else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "published asset {id} lacks its blob record"
        )));
    };
    if method == Method::HEAD {
        return Ok((
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("video/mp4")),
                (header::ACCEPT_RANGES, HeaderValue::from_static("bytes")),
                (header::CONTENT_LENGTH, HeaderValue::from(plain_len)),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
        )
            .into_response());
    }
    let verified: Vec<String> = db::replicas(&st.db, id)
        .await?
        .into_iter()
        .filter(|r| r.state == "verified")
        .map(|r| r.node)
        .collect();
    let node = choose_node(&st, &verified).ok_or_else(|| {
        metrics::counter!("manager_redirects_total", "node" => "none").increment(1);
        ApiError::NoMirror
    })?;
    let claims = PlaybackClaims {
        asset_id: a.id.clone(),
        blob: blob
            .parse()
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("bad blob id in catalog")))?,
        wrapped_key: wrapped,
        expires_at: db::now() + st.cfg.token_ttl_secs as i64,
        grant: None,
    };
    let token = st.signer.sign(&claims);
    let location = format!(
        "{}/play/{token}/{}.mp4",
        node.cfg.url.trim_end_matches('/'),
        a.id
    );
    metrics::counter!("manager_redirects_total", "node" => node.cfg.name.clone()).increment(1);
    Ok((
        StatusCode::FOUND,
        [
            (
                header::LOCATION,
                HeaderValue::from_str(&location).map_err(|e| ApiError::Internal(e.into()))?,
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response())
}
