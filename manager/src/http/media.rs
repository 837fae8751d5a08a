//! Media URLs answered (`crate::redirect` holds the rules): `HEAD` here,
//! `GET` with `302` to the chosen node.

use std::net::{IpAddr, SocketAddr};

use axum::{
    extract::{ConnectInfo, Path, Query, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use shared::PlaybackClaims;

use super::error::ApiError;
use crate::{
    catalog, geo,
    redirect::{check_epoch, choose_node, playback_claims, Lookup},
    SharedState,
};

#[derive(serde::Deserialize)]
pub struct MediaQuery {
    /// Forces a node by name (testing, and operators checking a mirror).
    node: Option<String>,
    /// Chooses as if the viewer were at this address (testing, and
    /// operators asking "where would a viewer in London go?"). Harmless to
    /// expose: like `node`, it can only send the caller somewhere worse.
    viewer: Option<String>,
}

/// `/media/{asset}.mp4` without a token: the pre-token form of the URL. It
/// is refused with a code that says what to do, never served.
pub async fn media_without_token() -> ApiError {
    ApiError::TokenMissing
}

pub async fn media(
    State(st): State<SharedState>,
    Path((token, file)): Path<(String, String)>,
    Query(q): Query<MediaQuery>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    method: Method,
) -> Result<Response, ApiError> {
    // The token first: a forged or expired URL costs one signature check
    // and no database read.
    let claims = st
        .tokens
        .verify(&st.minter.signer, &token)
        .map_err(ApiError::from)
        .inspect_err(|e| {
            metrics::counter!("manager_redirects_total", "node" => "none", "reason" => e.code())
                .increment(1);
        })?;
    answer(&st, claims, token, &file, q, peer, &headers, method).await
}

/// `GET`/`HEAD /media/g/{grant}/{asset}.mp4` (see [`crate::redirect::Minter::grant_media_url`]).
pub async fn media_by_grant(
    State(st): State<SharedState>,
    Path((grant, file)): Path<(String, String)>,
    Query(q): Query<MediaQuery>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    method: Method,
) -> Result<Response, ApiError> {
    let id = file.strip_suffix(".mp4").unwrap_or(&file);
    let g = match st.db.grant_view(&grant).await? {
        Some(g) if g.asset_id == id && g.state == "active" => g,
        // Unknown, refunded, or another movie's: one answer for all.
        _ => return Err(ApiError::NotFound("media URL")),
    };
    if catalog::now() >= g.expires_at {
        return Err(ApiError::Token(shared::TokenError::Expired));
    }
    let a = st.db.asset(id).await?.ok_or(ApiError::NotFound("movie"))?;
    let Some(claims) = playback_claims(&a, Some(g.id), g.expires_at) else {
        return Err(ApiError::NotFound("movie"));
    };
    let token = st.minter.sign(&claims);
    answer(&st, claims, token, &file, q, peer, &headers, method).await
}

/// The redirector's answer for a verified token: HEAD here, GET to a node.
#[allow(clippy::too_many_arguments)]
async fn answer(
    st: &SharedState,
    claims: PlaybackClaims,
    token: String,
    file: &str,
    q: MediaQuery,
    peer: SocketAddr,
    headers: &HeaderMap,
    method: Method,
) -> Result<Response, ApiError> {
    let id = file.strip_suffix(".mp4").unwrap_or(file);
    if claims.asset_id != id {
        return Err(ApiError::TokenWrongAsset);
    }
    let playable = match st.playable.get(&*st.db, id).await? {
        Lookup::Playable(p) => p,
        Lookup::Damaged => {
            // Never a corrupted byte: an error the player and operator can read.
            metrics::counter!("manager_redirects_total", "node" => "none", "reason" => "movie_damaged")
                .increment(1);
            return Err(ApiError::Damaged);
        }
        // Withdrawn or gone since the URL was handed out.
        Lookup::Gone => return Err(ApiError::NotFound("movie")),
    };
    check_epoch(&claims, playable.paid, playable.price_epoch).inspect_err(|_| {
        metrics::counter!("manager_redirects_total", "node" => "none", "reason" => "payment_required")
            .increment(1);
    })?;
    let viewer = match q.viewer.as_deref() {
        Some(v) => v.parse::<IpAddr>().map_err(|_| {
            ApiError::bad_request(
                "bad_viewer",
                format!("`viewer` is not an IP address: {v:?}"),
            )
        })?,
        None => geo::client_ip(peer.ip(), headers, &st.cfg.trusted_proxies),
    };
    let (node, reason) = choose_node(
        &st.nodes,
        st.geo.as_ref(),
        &playable.verified,
        viewer,
        q.node.as_deref(),
    )
    .inspect_err(|_| {
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
                (
                    header::CONTENT_LENGTH,
                    HeaderValue::from(playable.plain_len),
                ),
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("private, no-store"),
                ),
            ],
        )
            .into_response());
    }
    let location = format!(
        "{}/play/{token}/{id}.mp4",
        node.cfg.viewer_url().trim_end_matches('/')
    );
    metrics::counter!("manager_redirects_total", "node" => node.cfg.name.clone(), "reason" => reason).increment(1);
    node.count_redirect();
    tracing::debug!(asset = %id, node = %node.cfg.name, reason, "redirect");
    Ok((
        StatusCode::FOUND,
        [
            (
                header::LOCATION,
                HeaderValue::from_str(&location).map_err(|e| ApiError::Internal(e.into()))?,
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-store"),
            ),
        ],
    )
        .into_response())
}
