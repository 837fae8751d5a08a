//! The sealed-blob format, specified in `docs/sealed-blob.md`.
//!
//! A blob is a fixed header followed by AES-256-GCM segments (STREAM
//! construction, like Tink's streaming AEAD or age). Each segment carries
//! its own tag, its nonce encodes its index and whether it is the last one,
//! and its key is derived from the asset's data key, the header's salt and
//! the asset id. So any byte range decrypts by reading only the segments it
//! touches, and truncation, extension, reordering, swapping between blobs or
//! assets, and zeroed bytes are all detected.
//!
//! Layout of this module: `header` (frozen v1 constants and key/nonce
//! derivation), `layout` (length arithmetic), `keys` (data and master keys),
//! `sealer`/`reader` (writing), `opener`/`range` (reading).

mod header;
mod keys;
mod layout;
mod opener;
mod range;
mod reader;
mod sealer;

pub use header::{
    SealedHeader, DEFAULT_SEGMENT_SIZE, HEADER_LEN, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, TAG_LEN,
};
pub use keys::{wrap_with_nonce, wrapped_key_id, DataKey, MasterKey, WRAPPED_KEY_LEN};
pub use layout::SealedLayout;
pub use opener::{open_all, Opener};
pub use range::{
    open_file_range, open_range, open_range_with, RangeRead, ReadAt, READ_AHEAD_BYTES,
};
pub use reader::SealReader;
pub use sealer::{seal_all, seal_with_params, Sealer};

/// Everything that can go wrong sealing, opening or unwrapping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The first bytes are not the sealed-blob magic.
    #[error("not a sealed blob: bad magic bytes")]
    BadMagic,
    /// A format version this code does not know.
    #[error("unsupported sealed blob version {0}")]
    UnsupportedVersion(u8),
    /// The header parses but holds an impossible value (segment size).
    #[error("invalid sealed blob header: {0}")]
    BadHeader(String),
    /// The bytes end before the header or a segment does.
    #[error("sealed blob is truncated")]
    Truncated,
    /// A length that no sealed blob can have (cut inside a tag, an
    /// empty trailing segment, more bytes than the segment needs).
    #[error("length cannot be that of a sealed blob")]
    InvalidLength,
    /// A segment's tag does not verify: flipped or zeroed bytes, segments
    /// swapped, reordered, dropped at the end, taken from another blob or
    /// asset, or the wrong data key.
    #[error("segment {index} failed authentication (damaged, tampered with, or wrong key)")]
    SegmentAuth { index: u64 },
    /// The requested plaintext range is not inside the plaintext.
    #[error("requested range is outside the plaintext")]
    RangeOutOfBounds,
    /// A wrapped key names a master key id that is not this key's.
    #[error("no master key with id {0}")]
    UnknownKeyId(u32),
    /// A wrapped key is malformed, tampered with, or bound to another asset.
    #[error("the wrapped data key does not unwrap")]
    KeyUnwrap,
    /// Key material that is not 32 bytes of hex.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// Reading the sealed bytes failed.
    #[error("I/O error reading sealed blob: {0}")]
    Io(String),
}

impl SealError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            SealError::BadMagic => "seal_bad_magic",
            SealError::UnsupportedVersion(_) => "seal_unsupported_version",
            SealError::BadHeader(_) => "seal_bad_header",
            SealError::Truncated => "seal_truncated",
            SealError::InvalidLength => "seal_invalid_length",
            SealError::SegmentAuth { .. } => "seal_segment_auth",
            SealError::RangeOutOfBounds => "seal_range_out_of_bounds",
            SealError::UnknownKeyId(_) => "seal_unknown_key_id",
            SealError::KeyUnwrap => "seal_key_unwrap",
            SealError::InvalidKey(_) => "seal_invalid_key",
            SealError::Io(_) => "seal_io",
        }
    }

    /// True when the stored bytes themselves are wrong (given the right
    /// key): the copy should be quarantined. Note that `SegmentAuth` is also
    /// what a wrong data key or asset id produces.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            SealError::BadMagic
                | SealError::UnsupportedVersion(_)
                | SealError::BadHeader(_)
                | SealError::Truncated
                | SealError::InvalidLength
                | SealError::SegmentAuth { .. }
        )
    }
}

impl From<std::io::Error> for SealError {
    fn from(e: std::io::Error) -> SealError {
        SealError::Io(e.to_string())
    }
}

impl From<SealError> for std::io::Error {
    fn from(e: SealError) -> std::io::Error {
        match e {
            SealError::Io(msg) => std::io::Error::other(msg),
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}
