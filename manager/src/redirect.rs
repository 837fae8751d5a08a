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
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use shared::PlaybackClaims;

use crate::{
    catalog,
    domain::{AssetState, ReplicaState},
    geo, nodes,
};

/// Why a media URL is not answered with a node.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// Forged, malformed or expired (`shared::TokenError`).
    #[error("{0}")]
    Token(shared::TokenError),
    /// No healthy node holds a verified copy.
    #[error("no mirror holding this movie is reachable right now; try again in a minute")]
    NoMirror,
    /// A grant-less token minted before the movie turned paid.
    #[error("this movie now has a price: buy a view for a new media URL")]
    PaymentRequired,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Mints media URLs and their playback tokens.
pub struct Minter {
    pub signer: shared::TokenSigner,
    /// The manager's public base URL, without a trailing `/`.
    pub public_url: String,
    /// How long a grant-less media URL lasts.
    pub token_ttl_secs: u64,
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
    pub async fn get(&self, db: &dyn catalog::Catalog, id: &str) -> Result<Lookup, RedirectError> {
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
        let found = match (Self::load(db, id).await, stale) {
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

    async fn load(db: &dyn catalog::Catalog, id: &str) -> Result<Lookup, RedirectError> {
        let Some(a) = db.asset(id).await? else {
            return Ok(Lookup::Gone);
        };
        match a.state {
            AssetState::Published => {}
            AssetState::Damaged => return Ok(Lookup::Damaged),
            _ => return Ok(Lookup::Gone),
        }
        let Some(plain_len) = a.plain_len else {
            return Err(RedirectError::Internal(anyhow::anyhow!(
                "published asset {id} lacks its blob record"
            )));
        };
        let verified = db
            .replicas(id)
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
    pub fn verify(
        &self,
        signer: &shared::TokenSigner,
        token: &str,
    ) -> Result<PlaybackClaims, RedirectError> {
        let now = catalog::now();
        if let Some(claims) = self.entries.lock().expect("not poisoned").get(token) {
            if now >= claims.expires_at {
                return Err(RedirectError::Token(shared::TokenError::Expired));
            }
            return Ok(claims.clone());
        }
        let claims = signer
            .verifier()
            .verify(token, now)
            .map_err(RedirectError::Token)?;
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
    nodes: &'a nodes::Nodes,
    geo: Option<&geo::GeoDb>,
    verified: &[String],
    viewer: IpAddr,
    forced: Option<&str>,
) -> Result<(&'a nodes::Node, &'static str), RedirectError> {
    let candidates: Vec<&nodes::Node> = nodes
        .list
        .iter()
        .filter(|n| verified.contains(&n.cfg.name) && n.is_healthy())
        .collect();
    if let Some(name) = forced {
        return candidates
            .into_iter()
            .find(|n| n.cfg.name == name)
            .map(|n| (n, "forced"))
            .ok_or(RedirectError::NoMirror);
    }
    // Nodes an operator drained get no new viewers while another node can
    // serve; a movie only a drained node holds still plays from it.
    let undrained: Vec<&nodes::Node> = candidates
        .iter()
        .copied()
        .filter(|n| !n.is_drained())
        .collect();
    let candidates = if undrained.is_empty() {
        candidates
    } else {
        undrained
    };
    let ranked: Vec<geo::Candidate<'_>> = candidates
        .iter()
        .map(|n| geo::Candidate {
            name: &n.cfg.name,
            lat: n.cfg.lat,
            lon: n.cfg.lon,
            weight: n.cfg.weight,
        })
        .collect();
    let at = geo.and_then(|g| g.locate(viewer));
    let (i, reason) = geo::choose(&ranked, at).ok_or(RedirectError::NoMirror)?;
    Ok((candidates[i], reason.as_str()))
}

/// What such a token says (see [`Minter::playback_token_until`]).
pub fn playback_claims(
    a: &catalog::Asset,
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

fn epoch_of(a: &catalog::Asset) -> u32 {
    u32::try_from(a.price_epoch).unwrap_or(u32::MAX)
}

/// A grant-less token minted before its movie turned paid is refused: a
/// free movie's URL stops playing for everyone once a price is set (the
/// owner and operators are handed fresh tokens, of the current epoch).
pub fn check_epoch(
    claims: &PlaybackClaims,
    paid: bool,
    price_epoch: u32,
) -> Result<(), RedirectError> {
    if paid && claims.grant.is_none() && claims.epoch < price_epoch {
        return Err(RedirectError::PaymentRequired);
    }
    Ok(())
}

impl Minter {
    /// Signs the playback token a media URL carries: the asset, its blob and
    /// wrapped data key (so a node can serve without asking the manager), an
    /// expiry and, for paid views, the grant (whose window the expiry is).
    /// `None` unless the asset is published with its blob recorded.
    pub fn playback_token_until(
        &self,
        a: &catalog::Asset,
        grant: Option<String>,
        expires_at: i64,
    ) -> Option<String> {
        Some(self.signer.sign(&playback_claims(a, grant, expires_at)?))
    }

    /// The in-world media URL for `a`: `{public_url}/media/{token}/{asset}.mp4`.
    /// The token is the same one the chosen node checks, so what the manager
    /// hands out is all a viewer needs until it expires, even with the manager
    /// down once the player has been redirected.
    pub fn media_url(&self, a: &catalog::Asset, grant: Option<String>) -> Option<String> {
        self.media_url_until(a, grant, catalog::now() + self.token_ttl_secs as i64)
    }

    /// [`Minter::media_url`] expiring at `expires_at` (a paid view's grant window).
    pub fn media_url_until(
        &self,
        a: &catalog::Asset,
        grant: Option<String>,
        expires_at: i64,
    ) -> Option<String> {
        let token = self.playback_token_until(a, grant, expires_at)?;
        Some(format!("{}/media/{token}/{}.mp4", self.public_url, a.id))
    }

    /// The short media URL of a paid view: `{public_url}/media/g/{grant}/{asset}.mp4`.
    /// Second Life's per-agent parcel media (how a screen plays a paid view for
    /// its buyer alone) takes URLs of at most 254 characters, and a token alone
    /// is longer. The grant id is 128 random bits, as unguessable as a token;
    /// the token the node needs is minted here on each redirect.
    pub fn grant_media_url(&self, asset_id: &str, grant_id: &str) -> String {
        format!("{}/media/g/{grant_id}/{asset_id}.mp4", self.public_url)
    }

    /// Signs `claims` (a token minted per redirect for a short URL).
    pub fn sign(&self, claims: &PlaybackClaims) -> String {
        self.signer.sign(claims)
    }
}
