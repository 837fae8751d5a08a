//! Passwords and tokens: passwords are Argon2id hashes, checked a bounded
//! number at a time; session and API tokens are random and only their
//! SHA-256 is stored. Who is calling is the HTTP layer's (`http::session`).

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

/// Why a password could not be checked or hashed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Every slot is taken (`busy`); nothing was checked.
    #[error("the site is busy; try again in a few seconds")]
    Busy,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

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
async fn password_slot(
    slots: &Arc<Semaphore>,
) -> Result<tokio::sync::OwnedSemaphorePermit, AuthError> {
    let slot = slots.clone().acquire_owned();
    match tokio::time::timeout(PASSWORD_SLOT_WAIT, slot).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => {
            metrics::counter!("manager_password_checks_refused_total").increment(1);
            Err(AuthError::Busy)
        }
    }
}

/// [`verify_password`] on the blocking pool, within the bound.
pub async fn verify_password_bounded(
    slots: &Arc<Semaphore>,
    hash: &str,
    password: &str,
) -> Result<bool, AuthError> {
    let slot = password_slot(slots).await?;
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
    .map_err(|e| AuthError::Internal(e.into()))
}

/// [`hash_password`] on the blocking pool, within the bound.
pub async fn hash_password_bounded(
    slots: &Arc<Semaphore>,
    password: &str,
) -> Result<String, AuthError> {
    let slot = password_slot(slots).await?;
    metrics::counter!("manager_password_checks_total").increment(1);
    let password = zeroize::Zeroizing::new(password.to_string());
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        hash_password(&password)
    })
    .await
    .map_err(|e| AuthError::Internal(e.into()))?
    .map_err(AuthError::Internal)
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
}
