//! The media URL a viewer's player is given: `/media/{asset}.mp4`.
//!
//! `HEAD` is answered here, directly, with `Content-Type: video/mp4` and the
//! length: the Second Life viewer decides which plugin plays a URL from a
//! headers-only probe, and some viewers do not follow redirects during it.
//! `GET` answers `302` to a view node holding a verified copy, with a
//! short-lived playback token the node verifies on its own.

use std::net::{IpAddr, SocketAddr};

use axum::{
    extract::{ConnectInfo, Path, Query, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use shared::PlaybackClaims;

use crate::{db, error::ApiError, geo, SharedState};

#[derive(serde::Deserialize)]
pub struct MediaQuery {
    /// Forces a node by name (testing, and operators checking a mirror).
    node: Option<String>,
}

/// Picks the node for this viewer among healthy nodes holding a verified
/// copy (see [`geo`]). Returns the node and why it was chosen.
pub fn choose_node<'a>(
    st: &'a SharedState,
    verified: &[String],
    viewer: IpAddr,
    forced: Option<&str>,
) -> Result<(&'a crate::nodes::Node, &'static str), ApiError> {
    let candidates: Vec<&crate::nodes::Node> = st
        .nodes
        .list
        .iter()
        .filter(|n| verified.contains(&n.cfg.name) && n.is_healthy())
        .collect();
    if let Some(name) = forced {
        return candidates
            .into_iter()
            .find(|n| n.cfg.name == name)
            .map(|n| (n, "forced"))
            .ok_or(ApiError::NoMirror);
    }
    let ranked: Vec<geo::Candidate<'_>> = candidates
        .iter()
        .map(|n| geo::Candidate {
            name: &n.cfg.name,
            lat: n.cfg.lat,
            lon: n.cfg.lon,
            weight: n.cfg.weight,
        })
        .collect();
    let at = st.geo.as_ref().and_then(|g| g.locate(viewer));
    let (i, reason) = geo::choose(&ranked, at).ok_or(ApiError::NoMirror)?;
    Ok((candidates[i], reason.as_str()))
}

pub async fn media(
    State(st): State<SharedState>,
    Path(file): Path<String>,
    Query(q): Query<MediaQuery>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    method: Method,
) -> Result<Response, ApiError> {
    let id = file.strip_suffix(".mp4").unwrap_or(&file);
    let a = db::asset(&st.db, id)
        .await?
        .ok_or(ApiError::NotFound("movie"))?;
    if a.state != "published" {
        // Same answer as for an id that does not exist: private uploads'
        // ids cannot be probed through the media URL.
        return Err(ApiError::NotFound("movie"));
    }
    let (Some(blob), Some(wrapped), Some(plain_len)) =
        (a.blob_id.as_deref(), a.wrapped_key.clone(), a.plain_len)
    else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "published asset {id} lacks its blob record"
        )));
    };
    let verified: Vec<String> = db::replicas(&st.db, id)
        .await?
        .into_iter()
        .filter(|r| r.state == "verified")
        .map(|r| r.node)
        .collect();
    let viewer = geo::client_ip(peer.ip(), &headers, &st.cfg.trusted_proxies);
    let (node, reason) =
        choose_node(&st, &verified, viewer, q.node.as_deref()).inspect_err(|_| {
            metrics::counter!("manager_redirects_total", "node" => "none", "reason" => "no_mirror")
                .increment(1);
        })?;
    // HEAD is answered here (the viewer's probe may not follow a
    // redirect), but only when a GET would find a mirror.
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
    metrics::counter!("manager_redirects_total", "node" => node.cfg.name.clone(), "reason" => reason).increment(1);
    tracing::debug!(asset = %a.id, node = %node.cfg.name, reason, "redirect");
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
