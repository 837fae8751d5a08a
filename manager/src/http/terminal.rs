//! In-world terminals (`lsl/slmedia-screen.lsl`): an owner registers one on
//! the web site and gets a secret once; the script signs each request with
//! `llHMAC(secret, body, "sha256")`. The manager checks the signature, that
//! the request is fresh (`ts` within [`WINDOW_SECS`]) and that its nonce is
//! new, before handing out a media URL. `X-SecondLife-*` headers are never
//! trusted: anyone can send them.

use axum::{body::Bytes, extract::State, http::HeaderMap, Json};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use shared::DataKey;

use super::error::ApiError;
use crate::{catalog, domain::AssetState, SharedState};

pub const WINDOW_SECS: i64 = 300;
pub const SIGNATURE_HEADER: &str = "x-terminal-signature";
const SECRET_PREFIX: &str = "slt_";

/// Binds a wrapped terminal secret to its terminal, so a wrapped secret
/// copied onto another terminal's row does not unwrap.
fn wrap_context(terminal_id: &str) -> String {
    format!("terminal:{terminal_id}")
}

fn secret_string(raw: &DataKey) -> String {
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.as_bytes())
    )
}

/// Creates a terminal; returns its id and its secret (shown once).
pub async fn register(
    st: &SharedState,
    owner_id: i64,
    name: &str,
) -> Result<(String, String), ApiError> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let raw = DataKey::generate();
    let wrapped = st.master.wrap(&wrap_context(&id), &raw);
    st.db.insert_terminal(&id, owner_id, name, &wrapped).await?;
    Ok((id, secret_string(&raw)))
}

/// `base64(HMAC-SHA256(secret, body))`, as LSL's `llHMAC` computes it.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[derive(Deserialize)]
struct PlayRequest {
    terminal: String,
    asset: String,
    avatar: String,
    ts: i64,
    nonce: String,
}

fn refuse(code: &'static str, message: &str) -> ApiError {
    ApiError::TerminalRefused {
        code,
        message: message.to_string(),
    }
}

/// `POST /api/v1/terminal/play`: a signed form body
/// `terminal=…&asset=…&avatar=…&ts=…&nonce=…` → `{"media_url", "title"}`.
pub async fn play(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: PlayRequest = serde_urlencoded::from_bytes(&body).map_err(|e| {
        ApiError::bad_request(
            "terminal_bad_request",
            format!("expected terminal, asset, avatar, ts and nonce: {e}"),
        )
    })?;
    if req.nonce.is_empty() || req.nonce.len() > 64 || req.avatar.len() > 64 {
        return Err(ApiError::bad_request(
            "terminal_bad_request",
            "nonce and avatar must be 1–64 characters",
        ));
    }
    check_signed(&st, &headers, &body, &req.terminal, req.ts, &req.nonce).await?;
    let a = st
        .db
        .asset(&req.asset)
        .await?
        .ok_or(ApiError::NotFound("movie"))?;
    if a.state != AssetState::Published {
        return Err(ApiError::NotPublished);
    }
    // A paid movie is played through `/api/v1/terminal/buy` (docs/credits.md).
    if st.db.price(&a.id).await? > 0 {
        return Err(ApiError::Conflict {
            code: "payment_required",
            message: "this movie has a price: buy a view (the screen's buy request)".into(),
        });
    }
    tracing::info!(terminal = %req.terminal, asset = %a.id, avatar = %req.avatar, "terminal play");
    metrics::counter!("manager_terminal_plays_total").increment(1);
    let media_url = st.minter.media_url(&a, None).ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!("published asset {} lacks its blob", a.id))
    })?;
    Ok(Json(
        serde_json::json!({ "media_url": media_url, "title": a.title }),
    ))
}

/// Checks a terminal request: known terminal, signature over the exact
/// body, fresh time, unused nonce. Every terminal endpoint calls it first.
pub async fn check_signed(
    st: &SharedState,
    headers: &HeaderMap,
    body: &[u8],
    terminal_id: &str,
    ts: i64,
    nonce: &str,
) -> Result<catalog::Terminal, ApiError> {
    if nonce.is_empty() || nonce.len() > 64 {
        return Err(ApiError::bad_request(
            "terminal_bad_request",
            "nonce must be 1–64 characters",
        ));
    }
    let Some(term) = st.db.terminal(terminal_id).await? else {
        return Err(refuse(
            "terminal_unknown",
            "this terminal is not registered (or was removed)",
        ));
    };
    let raw = st
        .master
        .unwrap(&wrap_context(&term.id), &term.wrapped_secret)
        .map_err(|e| {
            ApiError::Internal(anyhow::anyhow!(
                "terminal {} secret does not unwrap: {e}",
                term.id
            ))
        })?;
    let presented = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !crate::auth::ct_eq(presented.trim(), &sign(&secret_string(&raw), body)) {
        tracing::warn!(terminal = %term.id, "terminal request with a bad signature");
        return Err(refuse(
            "terminal_bad_signature",
            "the request is not signed with this terminal's secret",
        ));
    }
    if (catalog::now() - ts).abs() > WINDOW_SECS {
        return Err(refuse(
            "terminal_stale",
            "the request's time is too far from ours; check it is sent at once",
        ));
    }
    if !st
        .db
        .use_terminal_nonce(&term.id, nonce, 2 * WINDOW_SECS)
        .await?
    {
        return Err(ApiError::Conflict {
            code: "terminal_replayed",
            message: "this request was already used".into(),
        });
    }
    Ok(term)
}

#[derive(Deserialize)]
struct BuyRequest {
    terminal: String,
    asset: String,
    avatar: String,
    /// The purchase's idempotency key: a screen that retries sends the
    /// same one (with a new nonce) and is charged once.
    request: String,
    ts: i64,
    nonce: String,
}

fn parse_form<T: serde::de::DeserializeOwned>(body: &[u8], fields: &str) -> Result<T, ApiError> {
    serde_urlencoded::from_bytes(body).map_err(|e| {
        ApiError::bad_request("terminal_bad_request", format!("expected {fields}: {e}"))
    })
}

fn check_avatar(avatar: &str) -> Result<(), ApiError> {
    if avatar.is_empty() || avatar.len() > 64 {
        return Err(ApiError::bad_request(
            "terminal_bad_request",
            "avatar must be 1–64 characters",
        ));
    }
    Ok(())
}

/// `POST /api/v1/terminal/buy`: a signed form body
/// `terminal=…&asset=…&avatar=…&request=…&ts=…&nonce=…` → a purchase
/// charged to the account linked to the avatar (docs/credits.md).
pub async fn buy(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: BuyRequest = parse_form(&body, "terminal, asset, avatar, request, ts and nonce")?;
    check_avatar(&req.avatar)?;
    let term = check_signed(&st, &headers, &body, &req.terminal, req.ts, &req.nonce).await?;
    tracing::info!(terminal = %term.id, asset = %req.asset, avatar = %req.avatar, "terminal purchase");
    Ok(Json(
        super::account::terminal_purchase(
            &st,
            term.owner_id,
            &req.avatar,
            &req.asset,
            &req.request,
        )
        .await?,
    ))
}

#[derive(Deserialize)]
struct LinkRequest {
    terminal: String,
    avatar: String,
    code: String,
    ts: i64,
    nonce: String,
}

/// `POST /api/v1/terminal/link`: `terminal=…&avatar=…&code=…&ts=…&nonce=…`
/// links the avatar to the account that made the one-time code.
pub async fn link(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: LinkRequest = parse_form(&body, "terminal, avatar, code, ts and nonce")?;
    check_avatar(&req.avatar)?;
    let term = check_signed(&st, &headers, &body, &req.terminal, req.ts, &req.nonce).await?;
    crate::avatars::redeem_code(&*st.db, &req.code, &req.avatar, &term).await?;
    tracing::info!(terminal = %term.id, avatar = %req.avatar, "avatar linked");
    Ok(Json(
        serde_json::json!({ "linked": true, "avatar": req.avatar }),
    ))
}

/// The shipped script with this terminal's values filled in.
pub fn script_for(manager_url: &str, terminal_id: &str, secret: &str, asset_id: &str) -> String {
    include_str!("../../../lsl/slmedia-screen.lsl")
        .replace("__MANAGER_URL__", manager_url)
        .replace("__TERMINAL_ID__", terminal_id)
        .replace("__TERMINAL_SECRET__", secret)
        .replace("__ASSET_ID__", asset_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_llhmac_sha256_base64() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            base64::engine::general_purpose::STANDARD.encode(
                hex::decode("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
                    .unwrap()
            )
        );
    }

    #[test]
    fn the_script_gets_every_value() {
        let s = script_for("http://m", "tid", "slt_x", "aid");
        assert!(!s.contains("__"), "a placeholder is left: {s}");
        assert!(s.contains("\"slt_x\"") && s.contains("\"http://m\""));
    }
}
