//! The media URL a viewer's player is given:
//! `/media/{token}/{asset}.mp4`, the token signed by the manager (Ed25519;
//! see `shared::token`) and checked here before anything else: `403` for a
//! forged one, `410` once expired.
//!
//! `HEAD` is answered here, directly, with `Content-Type: video/mp4` and the
//! length: the Second Life viewer decides which plugin plays a URL from a
//! headers-only probe, and some viewers do not follow redirects during it.
//! `GET` answers `302` to a view node holding a verified copy, with a
//! short-lived playback token the node verifies on its own.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, Path, Query, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use shared::PlaybackClaims;

use crate::{
    db,
    domain::{AssetState, ReplicaState},
    error::ApiError,
    geo, SharedState,
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

/// How long the redirector trusts what it read of a movie. Every viewer
/// near a screen fetches the media URL when it starts, and two database
/// reads per request would cap the redirector far below what the nodes
/// serve; a movie withdrawn or damaged, or a copy lost, reaches viewers
/// within this time. Node health is not cached: it is read per request.
pub const PLAYABLE_TTL: Duration = Duration::from_secs(1);
/// Past this many entries, expired ones are swept before inserting.
const PLAYABLE_SWEEP_AT: usize = 10_000;

/// What the redirector needs of a published movie.
#[derive(Clone)]
pub struct Playable {
    pub plain_len: u64,
    /// Whether grant-less tokens need the current price epoch (a paid movie).
    pub paid: bool,
    pub price_epoch: u32,
    /// Nodes holding a verified copy.
    pub verified: Arc<[String]>,
}

#[derive(Clone)]
pub enum Lookup {
    Playable(Playable),
    /// Every copy lost or corrupt: answered with its own code.
    Damaged,
    /// No such movie, or not (or no longer) published.
    Gone,
}

/// Movie id → what was read of it, and when.
#[derive(Default)]
pub struct PlayableCache {
    entries: Mutex<HashMap<String, (Instant, Lookup)>>,
}

impl PlayableCache {
    pub async fn get(&self, st: &SharedState, id: &str) -> Result<Lookup, ApiError> {
        // A stale entry is refreshed by the one request that finds it so;
        // the others keep the old answer meanwhile instead of all queueing
        // on the database at once (which is what p99 latency would show).
        let stale = {
            let mut entries = self.entries.lock().expect("not poisoned");
            match entries.get_mut(id) {
                Some((at, found)) if at.elapsed() < PLAYABLE_TTL => return Ok(found.clone()),
                Some((at, found)) => {
                    *at = Instant::now();
                    Some(found.clone())
                }
                None => None,
            }
        };
        let found = match (Self::load(st, id).await, stale) {
            (Ok(found), _) => found,
            // A database hiccup does not stop playback of what was playable.
            (Err(e), Some(old)) => {
                tracing::warn!(asset = %id, "redirector keeps its last answer: {e}");
                return Ok(old);
            }
            (Err(e), None) => return Err(e),
        };
        let mut entries = self.entries.lock().expect("not poisoned");
        if entries.len() >= PLAYABLE_SWEEP_AT {
            entries.retain(|_, (at, _)| at.elapsed() < PLAYABLE_TTL);
        }
        entries.insert(id.to_string(), (Instant::now(), found.clone()));
        Ok(found)
    }

    /// Drops what was read of `id`, so the next request reads it afresh
    /// (a price was just set: stale free URLs must stop at once).
    pub fn forget(&self, id: &str) {
        self.entries.lock().expect("not poisoned").remove(id);
    }

    async fn load(st: &SharedState, id: &str) -> Result<Lookup, ApiError> {
        let Some(a) = db::asset(&st.db, id).await? else {
            return Ok(Lookup::Gone);
        };
        match a.state {
            AssetState::Published => {}
            AssetState::Damaged => return Ok(Lookup::Damaged),
            _ => return Ok(Lookup::Gone),
        }
        let Some(plain_len) = a.plain_len else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "published asset {id} lacks its blob record"
            )));
        };
        let verified = db::replicas(&st.db, id)
            .await?
            .into_iter()
            .filter(|r| r.state == ReplicaState::Verified)
            .map(|r| r.node)
            .collect();
        Ok(Lookup::Playable(Playable {
            plain_len: plain_len as u64,
            paid: a.price > 0,
            price_epoch: epoch_of(&a),
            verified,
        }))
    }
}

/// Tokens this manager has already verified, with their claims. A media
/// URL is set on a screen and fetched by every avatar near it, so the same
/// token arrives many times; an Ed25519 verification costs more than the
/// rest of a redirect. Keyed by the whole token string, so only exactly
/// those bytes hit; expiry is still checked on every use; failures are
/// never cached (a forger pays a verification per try).
#[derive(Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<String, PlaybackClaims>>,
}

/// Bound on [`TokenCache`]; past it, expired entries go, then everything.
const TOKEN_CACHE_MAX: usize = 10_000;

impl TokenCache {
    pub fn verify(&self, st: &SharedState, token: &str) -> Result<PlaybackClaims, ApiError> {
        let now = db::now();
        if let Some(claims) = self.entries.lock().expect("not poisoned").get(token) {
            if now >= claims.expires_at {
                return Err(ApiError::Token(shared::TokenError::Expired));
            }
            return Ok(claims.clone());
        }
        let claims = st
            .signer
            .verifier()
            .verify(token, now)
            .map_err(ApiError::Token)?;
        let mut entries = self.entries.lock().expect("not poisoned");
        if entries.len() >= TOKEN_CACHE_MAX {
            entries.retain(|_, c| now < c.expires_at);
            if entries.len() >= TOKEN_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(token.to_string(), claims.clone());
        Ok(claims)
    }
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

/// Signs the playback token a media URL carries: the asset, its blob and
/// wrapped data key (so a node can serve without asking the manager), an
/// expiry and, for paid views, the grant (whose window the expiry is).
/// `None` unless the asset is published with its blob recorded.
pub fn playback_token_until(
    st: &SharedState,
    a: &db::Asset,
    grant: Option<String>,
    expires_at: i64,
) -> Option<String> {
    Some(st.signer.sign(&playback_claims(a, grant, expires_at)?))
}

/// What such a token says (see [`playback_token_until`]).
fn playback_claims(
    a: &db::Asset,
    grant: Option<String>,
    expires_at: i64,
) -> Option<PlaybackClaims> {
    if a.state != AssetState::Published {
        return None;
    }
    Some(PlaybackClaims {
        asset_id: a.id.clone(),
        blob: a.blob_id.as_deref()?.parse().ok()?,
        wrapped_key: a.wrapped_key.clone()?,
        expires_at,
        // A grant pays for itself; only grant-less tokens need the epoch.
        epoch: if grant.is_none() { epoch_of(a) } else { 0 },
        grant,
    })
}

fn epoch_of(a: &db::Asset) -> u32 {
    u32::try_from(a.price_epoch).unwrap_or(u32::MAX)
}

/// A grant-less token minted before its movie turned paid is refused: a
/// free movie's URL stops playing for everyone once a price is set (the
/// owner and operators are handed fresh tokens, of the current epoch).
pub fn check_epoch(claims: &PlaybackClaims, paid: bool, price_epoch: u32) -> Result<(), ApiError> {
    if paid && claims.grant.is_none() && claims.epoch < price_epoch {
        return Err(ApiError::PaymentRequired {
            code: "payment_required",
            message: "this movie now has a price: buy a view for a new media URL".into(),
        });
    }
    Ok(())
}

/// The in-world media URL for `a`: `{public_url}/media/{token}/{asset}.mp4`.
/// The token is the same one the chosen node checks, so what the manager
/// hands out is all a viewer needs until it expires, even with the manager
/// down once the player has been redirected.
pub fn media_url(st: &SharedState, a: &db::Asset, grant: Option<String>) -> Option<String> {
    media_url_until(st, a, grant, db::now() + st.cfg.token_ttl_secs as i64)
}

/// [`media_url`] expiring at `expires_at` (a paid view's grant window).
pub fn media_url_until(
    st: &SharedState,
    a: &db::Asset,
    grant: Option<String>,
    expires_at: i64,
) -> Option<String> {
    let token = playback_token_until(st, a, grant, expires_at)?;
    Some(format!("{}/media/{token}/{}.mp4", st.public_url, a.id))
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
    let claims = st.tokens.verify(&st, &token).inspect_err(|e| {
        metrics::counter!("manager_redirects_total", "node" => "none", "reason" => e.code())
            .increment(1);
    })?;
    answer(&st, claims, token, &file, q, peer, &headers, method).await
}

/// The short media URL of a paid view: `{public_url}/media/g/{grant}/{asset}.mp4`.
/// Second Life's per-agent parcel media (how a screen plays a paid view for
/// its buyer alone) takes URLs of at most 254 characters, and a token alone
/// is longer. The grant id is 128 random bits, as unguessable as a token;
/// the token the node needs is minted here on each redirect.
pub fn grant_media_url(st: &SharedState, asset_id: &str, grant_id: &str) -> String {
    format!("{}/media/g/{grant_id}/{asset_id}.mp4", st.public_url)
}

/// `GET`/`HEAD /media/g/{grant}/{asset}.mp4` (see [`grant_media_url`]).
pub async fn media_by_grant(
    State(st): State<SharedState>,
    Path((grant, file)): Path<(String, String)>,
    Query(q): Query<MediaQuery>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    method: Method,
) -> Result<Response, ApiError> {
    let id = file.strip_suffix(".mp4").unwrap_or(&file);
    let g = match crate::ledger::grant_view(&st.db, &grant).await? {
        Some(g) if g.asset_id == id && g.state == "active" => g,
        // Unknown, refunded, or another movie's: one answer for all.
        _ => return Err(ApiError::NotFound("media URL")),
    };
    if db::now() >= g.expires_at {
        return Err(ApiError::Token(shared::TokenError::Expired));
    }
    let a = db::asset(&st.db, id)
        .await?
        .ok_or(ApiError::NotFound("movie"))?;
    let Some(claims) = playback_claims(&a, Some(g.id), g.expires_at) else {
        return Err(ApiError::NotFound("movie"));
    };
    let token = st.signer.sign(&claims);
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
    let playable = match st.playable.get(st, id).await? {
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
    let (node, reason) = choose_node(st, &playable.verified, viewer, q.node.as_deref())
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
