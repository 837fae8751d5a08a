//! The v1 header and the per-blob key and nonce derivation.

use aes_gcm::aead::consts::U12;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::keys::DataKey;
use super::SealError;

// FROZEN: the v1 format. Changing any of these constants breaks every blob
// already stored. A new format gets a new VERSION and keeps v1 readable.
// The test vectors in shared/tests/vectors pin them.
/// Magic bytes at offset 0.
pub(crate) const MAGIC: [u8; 4] = *b"SLMB";
/// Format version at offset 4.
pub(crate) const VERSION: u8 = 1;
/// Bytes of random salt for the segment-key derivation.
pub(crate) const SALT_LEN: usize = 32;
/// Bytes of random nonce prefix.
pub(crate) const NONCE_PREFIX_LEN: usize = 7;
/// HKDF `info` prefix; the asset id follows it.
pub(crate) const KDF_INFO: &[u8] = b"slmedia seal v1";
/// Header length: magic 4, version 1, segment size 4, key id 4, salt 32,
/// nonce prefix 7.
pub const HEADER_LEN: usize = 4 + 1 + 4 + 4 + SALT_LEN + NONCE_PREFIX_LEN;
/// AES-GCM tag length, after every segment's ciphertext.
pub const TAG_LEN: usize = 16;
// (end of frozen constants)

/// Plaintext bytes per segment the manager uses (64 KiB, as age). Any size in
/// `MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE` is valid; it is in the header.
pub const DEFAULT_SEGMENT_SIZE: u32 = 64 * 1024;
/// Smallest segment size accepted (tests use tiny segments).
pub const MIN_SEGMENT_SIZE: u32 = 16;
/// Largest segment size accepted: bounds the memory one segment costs.
pub const MAX_SEGMENT_SIZE: u32 = 16 * 1024 * 1024;

/// The parsed fields of a sealed blob's header.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedHeader {
    /// Plaintext bytes per segment (the last may be shorter).
    pub segment_size: u32,
    /// Id of the master key that wrapped this blob's data key (informative;
    /// the wrapped key itself travels in the playback token).
    pub key_id: u32,
    pub salt: [u8; SALT_LEN],
    pub nonce_prefix: [u8; NONCE_PREFIX_LEN],
}

impl std::fmt::Debug for SealedHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedHeader")
            .field("segment_size", &self.segment_size)
            .field("key_id", &self.key_id)
            .field("salt", &hex::encode(self.salt))
            .field("nonce_prefix", &hex::encode(self.nonce_prefix))
            .finish()
    }
}

pub(crate) fn check_segment_size(segment_size: u32) -> Result<(), SealError> {
    if (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size) {
        Ok(())
    } else {
        Err(SealError::BadHeader(format!(
            "segment size {segment_size} is outside {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE}"
        )))
    }
}

impl SealedHeader {
    /// Parses the first [`HEADER_LEN`] bytes of `bytes` (more may follow).
    pub fn parse(bytes: &[u8]) -> Result<SealedHeader, SealError> {
        if bytes.len() >= 4 && bytes[..4] != MAGIC {
            return Err(SealError::BadMagic);
        }
        if bytes.len() < HEADER_LEN {
            return Err(SealError::Truncated);
        }
        if bytes[4] != VERSION {
            return Err(SealError::UnsupportedVersion(bytes[4]));
        }
        let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let segment_size = be32(5);
        check_segment_size(segment_size)?;
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&bytes[13..13 + SALT_LEN]);
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        nonce_prefix.copy_from_slice(&bytes[13 + SALT_LEN..HEADER_LEN]);
        Ok(SealedHeader {
            segment_size,
            key_id: be32(9),
            salt,
            nonce_prefix,
        })
    }

    /// The exact header bytes (also the AAD of every segment).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5..9].copy_from_slice(&self.segment_size.to_be_bytes());
        out[9..13].copy_from_slice(&self.key_id.to_be_bytes());
        out[13..13 + SALT_LEN].copy_from_slice(&self.salt);
        out[13 + SALT_LEN..].copy_from_slice(&self.nonce_prefix);
        out
    }
}

/// The AES-256-GCM instance for one blob:
/// HKDF-SHA256(ikm = data key, salt = header salt,
/// info = "slmedia seal v1" || asset id).
pub(crate) fn segment_cipher(key: &DataKey, asset_id: &str, salt: &[u8; SALT_LEN]) -> Aes256Gcm {
    let hk = Hkdf::<Sha256>::new(Some(salt), key.as_bytes());
    let mut okm = Zeroizing::new([0u8; 32]);
    hk.expand_multi_info(&[KDF_INFO, asset_id.as_bytes()], okm.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    Aes256Gcm::new_from_slice(okm.as_ref()).expect("32-byte key")
}

/// Nonce of segment `index`: prefix (7) || index u32 BE (4) || last flag (1).
pub(crate) fn segment_nonce(prefix: &[u8; NONCE_PREFIX_LEN], index: u32, last: bool) -> Nonce<U12> {
    let mut n = [0u8; 12];
    n[..NONCE_PREFIX_LEN].copy_from_slice(prefix);
    n[NONCE_PREFIX_LEN..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    n.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frozen constants, spelled out next to their definition.
    #[test]
    fn frozen_v1_constants() {
        assert_eq!(&MAGIC, b"SLMB");
        assert_eq!(VERSION, 1);
        assert_eq!(HEADER_LEN, 52);
        assert_eq!(TAG_LEN, 16);
        assert_eq!(KDF_INFO, b"slmedia seal v1");
        let n = segment_nonce(&[1, 2, 3, 4, 5, 6, 7], 0x0a0b_0c0d, true);
        assert_eq!(
            n.as_slice(),
            &[1, 2, 3, 4, 5, 6, 7, 0x0a, 0x0b, 0x0c, 0x0d, 1]
        );
        let n = segment_nonce(&[0; 7], 2, false);
        assert_eq!(n.as_slice(), &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
    }

    #[test]
    fn header_round_trips_and_rejects_each_defect() {
        let h = SealedHeader {
            segment_size: 65536,
            key_id: 7,
            salt: [0x11; 32],
            nonce_prefix: [0x22; 7],
        };
        let bytes = h.to_bytes();
        assert_eq!(&bytes[..9], b"SLMB\x01\x00\x01\x00\x00");
        assert_eq!(&bytes[9..13], &[0, 0, 0, 7]);
        assert_eq!(SealedHeader::parse(&bytes).unwrap(), h);

        let mut bad = bytes;
        bad[0] = b'X';
        assert_eq!(SealedHeader::parse(&bad), Err(SealError::BadMagic));
        let mut bad = bytes;
        bad[4] = 2;
        assert_eq!(
            SealedHeader::parse(&bad),
            Err(SealError::UnsupportedVersion(2))
        );
        for size in [0u32, 15, MAX_SEGMENT_SIZE + 1, u32::MAX] {
            let mut bad = bytes;
            bad[5..9].copy_from_slice(&size.to_be_bytes());
            assert!(matches!(
                SealedHeader::parse(&bad),
                Err(SealError::BadHeader(_))
            ));
        }
        assert_eq!(
            SealedHeader::parse(&bytes[..HEADER_LEN - 1]),
            Err(SealError::Truncated)
        );
        assert_eq!(SealedHeader::parse(b"SL"), Err(SealError::Truncated));
        assert_eq!(SealedHeader::parse(b"nope"), Err(SealError::BadMagic));
    }
}
