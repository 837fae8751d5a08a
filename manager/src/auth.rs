//! Who is calling: a browser session (cookie + CSRF token) or a script
//! (`Authorization: Bearer`). Passwords are Argon2id hashes; session and API
//! tokens are random and only their SHA-256 is stored.

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use axum::{
    extract::FromRequestParts,
    http::{header, request::Parts},
};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{db, error::ApiError, SharedState};

pub const SESSION_COOKIE: &str = "slm_session";
pub const LOGIN_CSRF_COOKIE: &str = "slm_login_csrf";
pub const SESSION_SECS: i64 = 14 * 24 * 3600;

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
}

pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Password checks (Argon2id, ~19 MiB and tens of milliseconds each) that
/// may run at once. Past this, a log-in waits briefly for a slot, then is
/// answered `429 busy`: a flood of guesses must not exhaust memory or
/// starve the transcoder of the blocking pool.
pub const MAX_PASSWORD_CHECKS: usize = 4;
const PASSWORD_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// One slot of [`MAX_PASSWORD_CHECKS`], or `busy`. Owned, so it moves into
/// the blocking task: a client that hangs up drops the request's future,
/// but the hash runs on, and must keep its slot until it ends.
async fn password_slot(st: &SharedState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let slot = st.password_checks.clone().acquire_owned();
    match tokio::time::timeout(PASSWORD_SLOT_WAIT, slot).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => {
            metrics::counter!("manager_password_checks_refused_total").increment(1);
            Err(ApiError::Busy)
        }
    }
}

/// [`verify_password`] on the blocking pool, within the bound.
pub async fn verify_password_bounded(
    st: &SharedState,
    hash: &str,
    password: &str,
) -> Result<bool, ApiError> {
    let slot = password_slot(st).await?;
    metrics::counter!("manager_password_checks_total").increment(1);
    let (hash, password) = (
        hash.to_string(),
        zeroize::Zeroizing::new(password.to_string()),
    );
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        verify_password(&hash, &password)
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))
}

/// [`hash_password`] on the blocking pool, within the bound.
pub async fn hash_password_bounded(st: &SharedState, password: &str) -> Result<String, ApiError> {
    let slot = password_slot(st).await?;
    metrics::counter!("manager_password_checks_total").increment(1);
    let password = zeroize::Zeroizing::new(password.to_string());
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        hash_password(&password)
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))?
    .map_err(ApiError::Internal)
}

/// 32 random bytes, URL-safe base64.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `Set-Cookie` value: HttpOnly always, `Secure` when served over https,
/// `SameSite=Lax` so a cross-site form post carries no session.
pub fn set_cookie(name: &str, value: &str, max_age: i64, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    )
}

#[derive(Debug, Clone)]
pub struct Caller {
    pub user: db::User,
    /// The session's CSRF token; `None` for bearer-token callers, whose
    /// requests a browser cannot forge.
    pub csrf: Option<String>,
}

impl Caller {
    /// Cookie-authenticated state changes must carry the session's CSRF token.
    pub fn check_csrf(&self, presented: Option<&str>) -> Result<(), ApiError> {
        match &self.csrf {
            None => Ok(()),
            Some(expected) => match presented {
                Some(p) if ct_eq(p, expected) => Ok(()),
                _ => Err(ApiError::Csrf),
            },
        }
    }

    /// [`check_csrf`](Caller::check_csrf) for JSON calls: a session caller
    /// sends the token in `X-CSRF-Token`; bearer callers need none.
    pub fn check_csrf_header(&self, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
        self.check_csrf(headers.get("x-csrf-token").and_then(|v| v.to_str().ok()))
    }
}

async fn resolve(parts: &Parts, st: &SharedState) -> Result<Option<Caller>, ApiError> {
    if let Some(auth) = parts.headers.get(header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthenticated)?;
        return match db::api_token_user(&st.db, &token_hash(token.trim())).await? {
            Some(user) => Ok(Some(Caller { user, csrf: None })),
            None => Err(ApiError::Unauthenticated),
        };
    }
    if let Some(tok) = cookie(&parts.headers, SESSION_COOKIE) {
        if let Some((user, csrf)) = db::session_user(&st.db, &token_hash(tok)).await? {
            return Ok(Some(Caller {
                user,
                csrf: Some(csrf),
            }));
        }
    }
    Ok(None)
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        resolve(parts, st).await?.ok_or(ApiError::Unauthenticated)
    }
}

/// For pages that look different to visitors and to logged-in users.
pub struct MaybeCaller(pub Option<Caller>);

impl FromRequestParts<SharedState> for MaybeCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        match resolve(parts, st).await {
            Ok(c) => Ok(MaybeCaller(c)),
            Err(ApiError::Unauthenticated) => Ok(MaybeCaller(None)),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hashes_verify_and_differ() {
        let a = hash_password("correct horse").unwrap();
        let b = hash_password("correct horse").unwrap();
        assert_ne!(a, b, "salted");
        assert!(a.starts_with("$argon2id$"));
        assert!(verify_password(&a, "correct horse"));
        assert!(!verify_password(&a, "wrong"));
        assert!(!verify_password("not a hash", "x"));
    }

    #[test]
    fn csrf_is_required_for_cookie_callers_only() {
        let user = db::User {
            id: 1,
            email: "a@b".into(),
            password_hash: String::new(),
            role: "uploader".into(),
        };
        let browser = Caller {
            user: user.clone(),
            csrf: Some("tok".into()),
        };
        assert!(browser.check_csrf(Some("tok")).is_ok());
        assert!(matches!(
            browser.check_csrf(Some("tik")),
            Err(ApiError::Csrf)
        ));
        assert!(matches!(browser.check_csrf(None), Err(ApiError::Csrf)));
        let script = Caller { user, csrf: None };
        assert!(script.check_csrf(None).is_ok());
    }
}
