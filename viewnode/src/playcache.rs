//! Per-movie work a playback request would otherwise redo every time.
//!
//! A player fetches a movie as many range requests (VLC seeks, every avatar
//! near a screen plays the same URL), each carrying the same token. Without
//! these caches every request pays an Ed25519 verification, a data-key
//! unwrap, a header read from storage and a key derivation before its first
//! byte: at 1 MiB ranges that was a third of the node's time.
//!
//! What is cached is derived only from signed or stored inputs and keyed by
//! them (the exact token string; the blob id plus its wrapped key), so a hit
//! can only ever give the answer a fresh computation would. Expiry is still
//! checked on every use, and the blob's presence and length are still read
//! from storage per request, so a quarantined or vanished copy is never
//! served from a cached opener.

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use shared::{BlobId, Opener, PlaybackClaims, TokenError};

use crate::SharedState;

/// Entries per cache; past it, a cache is emptied (cheap to refill).
const MAX_ENTRIES: usize = 4096;

fn tokens() -> &'static Mutex<HashMap<String, PlaybackClaims>> {
    static T: OnceLock<Mutex<HashMap<String, PlaybackClaims>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

/// Openers by blob and the wrapped data key they were built with, and
/// when each was last used.
type Openers = Mutex<HashMap<(BlobId, Vec<u8>), (Opener, Instant)>>;

/// A blob played within this long counts as warm: its directory entries
/// and inode are almost surely in memory, so opening it cannot wait on
/// the disk (see [`warm`]).
const WARM_FOR: Duration = Duration::from_secs(60);

fn openers() -> &'static Openers {
    static O: OnceLock<Openers> = OnceLock::new();
    O.get_or_init(Default::default)
}

/// Verifies `token` (signature once per distinct token, expiry every time).
/// Failures are never cached.
pub fn verify(st: &SharedState, token: &str) -> Result<PlaybackClaims, TokenError> {
    let now = shared::runtime::unix_now();
    if let Some(c) = tokens().lock().expect("not poisoned").get(token) {
        if now >= c.expires_at {
            return Err(TokenError::Expired);
        }
        return Ok(c.clone());
    }
    let claims = st.verifier.verify(token, now)?;
    let mut t = tokens().lock().expect("not poisoned");
    if t.len() >= MAX_ENTRIES {
        t.retain(|_, c| now < c.expires_at);
        if t.len() >= MAX_ENTRIES {
            t.clear();
        }
    }
    t.insert(token.to_string(), claims.clone());
    Ok(claims)
}

/// The opener for `claims`' blob as stored now (`sealed_len` just read),
/// if one was built for exactly this blob, wrapped key and length.
pub fn cached_opener(claims: &PlaybackClaims, sealed_len: u64) -> Option<Opener> {
    let mut o = openers().lock().expect("not poisoned");
    let (opener, used) = o.get_mut(&(claims.blob, claims.wrapped_key.clone()))?;
    *used = Instant::now();
    (opener.layout().sealed_len() == sealed_len).then(|| opener.clone())
}

/// Whether `claims`' blob was played within [`WARM_FOR`]. Such a blob is
/// opened right on the async worker: `open` and `fstat` of a cached inode
/// take microseconds, less than the hop to the blocking pool and back,
/// which was the largest part of a seek's time to first byte beyond
/// nginx's. A cold blob still opens on the blocking pool, so a slow disk
/// never stalls the workers serving other viewers.
pub fn warm(claims: &PlaybackClaims) -> bool {
    let o = openers().lock().expect("not poisoned");
    o.get(&(claims.blob, claims.wrapped_key.clone()))
        .is_some_and(|(_, used)| used.elapsed() < WARM_FOR)
}

/// Keeps an opener built from the stored header for later requests.
pub fn keep_opener(claims: &PlaybackClaims, opener: &Opener) {
    let mut o = openers().lock().expect("not poisoned");
    if o.len() >= MAX_ENTRIES {
        o.clear();
    }
    o.insert(
        (claims.blob, claims.wrapped_key.clone()),
        (opener.clone(), Instant::now()),
    );
}

/// A copy set aside (quarantined) or replaced: its header is read afresh
/// for the copy that takes its place.
pub fn forget_blob(blob: &BlobId) {
    openers()
        .lock()
        .expect("not poisoned")
        .retain(|(b, _), _| b != blob);
}
