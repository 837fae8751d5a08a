//! Code shared by the `manager` and the `viewnode` binaries.
//!
//! - `blob`: [`BlobId`], the SHA-256 name of a stored (sealed) blob.
//! - `seal`: the sealed-blob format (`docs/sealed-blob.md`): streaming
//!   AES-256-GCM in fixed-size segments, so any byte range decrypts by
//!   reading only the segments it touches. [`Sealer`] and [`SealReader`]
//!   write, [`Opener`] and [`open_range`] read, [`MasterKey`] wraps the
//!   per-asset [`DataKey`].
//! - `token`: Ed25519 playback tokens. The manager holds the
//!   [`TokenSigner`]; nodes hold only a [`TokenVerifier`].
//! - `nodeauth`: HMAC-SHA256 request signing between manager and nodes.
//! - [`protocol`]: the wire types between manager and nodes, written once.
//! - `tls`: the cluster's private CA, node certificates, the nodes' TLS set-up.
//! - `secret`: [`Secret`], a config string that never prints.
//! - [`runtime`]: logging set-up, the metrics recorder, the shutdown signal.
//!
//! Every error enum here has a `code()` giving a stable machine-readable
//! string; the binaries map errors to HTTP statuses.

mod blob;
mod nodeauth;
pub mod protocol;
pub mod runtime;
mod seal;
mod secret;
pub mod server;
pub mod tls;
mod token;

pub use blob::{BlobId, ParseBlobIdError};
pub use nodeauth::{
    answer_mac, auth_key_id, content_sha256_hex, sign_request, verify_answer_mac, verify_request,
    NodeAuthError, ANSWER_MAC_HEADER, AUTH_HEADER, DATE_HEADER, MAX_CLOCK_SKEW_SECS,
};
pub use seal::{
    open_all, open_file_range, open_range, open_range_with, seal_all, wrapped_key_id, DataKey,
    MasterKey, Opener, RangeRead, ReadAt, SealError, SealReader, SealedHeader, SealedLayout,
    Sealer, DEFAULT_SEGMENT_SIZE, HEADER_LEN, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, READ_AHEAD_BYTES,
    TAG_LEN, WRAPPED_KEY_LEN,
};
#[doc(hidden)]
pub use seal::{seal_with_params, wrap_with_nonce};
pub use secret::Secret;
pub use token::{PlaybackClaims, TokenError, TokenSigner, TokenVerifier, MAX_TOKEN_LEN};
