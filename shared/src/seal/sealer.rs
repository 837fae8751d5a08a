//! Writing sealed blobs in constant memory.

use std::fmt;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::Aes256Gcm;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::header::{
    check_segment_size, segment_cipher, segment_nonce, SealedHeader, HEADER_LEN, NONCE_PREFIX_LEN,
    SALT_LEN,
};
use super::keys::DataKey;
use crate::BlobId;

/// Seals a plaintext stream into a blob, hashing the output as it goes.
///
/// Feed plaintext with [`update`](Sealer::update) in any chunk sizes and
/// end with [`finish`](Sealer::finish); both append sealed bytes to `out`.
/// At most one segment of plaintext is buffered (the last segment carries a
/// flag, so a full segment waits until more input or `finish` shows whether
/// it is the last).
pub struct Sealer {
    cipher: Aes256Gcm,
    header: [u8; HEADER_LEN],
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
    segment_size: usize,
    next_index: u64,
    buf: Zeroizing<Vec<u8>>,
    hasher: Sha256,
    sealed_len: u64,
    header_written: bool,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("segment_size", &self.segment_size)
            .field("sealed_len", &self.sealed_len)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer with a fresh random salt and nonce prefix.
    ///
    /// `key_id` is the id of the master key that wraps `key` (recorded in
    /// the header). Use [`DEFAULT_SEGMENT_SIZE`](super::DEFAULT_SEGMENT_SIZE)
    /// unless testing.
    ///
    /// # Panics
    /// If `segment_size` is outside
    /// [`MIN_SEGMENT_SIZE`](super::MIN_SEGMENT_SIZE)`..=`[`MAX_SEGMENT_SIZE`](super::MAX_SEGMENT_SIZE).
    pub fn new(key: &DataKey, asset_id: &str, key_id: u32, segment_size: u32) -> Sealer {
        let mut salt = [0u8; SALT_LEN];
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        OsRng.fill_bytes(&mut salt);
        OsRng.fill_bytes(&mut nonce_prefix);
        Sealer::with_params(key, asset_id, key_id, segment_size, salt, nonce_prefix)
    }

    /// A sealer with a chosen salt and nonce prefix: for test vectors only.
    #[doc(hidden)]
    pub fn with_params(
        key: &DataKey,
        asset_id: &str,
        key_id: u32,
        segment_size: u32,
        salt: [u8; SALT_LEN],
        nonce_prefix: [u8; NONCE_PREFIX_LEN],
    ) -> Sealer {
        if let Err(e) = check_segment_size(segment_size) {
            panic!("Sealer::new: {e}");
        }
        let header = SealedHeader {
            segment_size,
            key_id,
            salt,
            nonce_prefix,
        };
        Sealer {
            cipher: segment_cipher(key, asset_id, &salt),
            header: header.to_bytes(),
            nonce_prefix,
            segment_size: segment_size as usize,
            next_index: 0,
            buf: Zeroizing::new(Vec::with_capacity(segment_size as usize)),
            hasher: Sha256::new(),
            sealed_len: 0,
            header_written: false,
        }
    }

    /// Sealed bytes emitted so far.
    pub fn sealed_len(&self) -> u64 {
        self.sealed_len
    }

    /// Seals `plaintext`, appending whatever sealed bytes are ready to
    /// `out` (the header on the first call).
    pub fn update(&mut self, mut plaintext: &[u8], out: &mut Vec<u8>) {
        self.write_header(out);
        while !plaintext.is_empty() {
            if self.buf.len() == self.segment_size {
                // More input exists, so the buffered segment is not the last.
                let buf = std::mem::take(&mut *self.buf);
                self.seal_segment(&buf, false, out);
                *self.buf = buf;
                self.buf.clear();
            }
            if self.buf.is_empty() && plaintext.len() > self.segment_size {
                // Fast path: a whole segment with input after it.
                let (seg, rest) = plaintext.split_at(self.segment_size);
                self.seal_segment(seg, false, out);
                plaintext = rest;
                continue;
            }
            let take = (self.segment_size - self.buf.len()).min(plaintext.len());
            self.buf.extend_from_slice(&plaintext[..take]);
            plaintext = &plaintext[take..];
        }
    }

    /// Seals the buffered rest as the last segment, appends it to `out`,
    /// and returns the blob's name and total sealed length.
    pub fn finish(mut self, out: &mut Vec<u8>) -> (BlobId, u64) {
        self.write_header(out);
        let buf = std::mem::take(&mut *self.buf);
        self.seal_segment(&buf, true, out);
        *self.buf = buf; // zeroed on drop
        (BlobId::from_hasher(self.hasher), self.sealed_len)
    }

    fn write_header(&mut self, out: &mut Vec<u8>) {
        if !self.header_written {
            self.header_written = true;
            out.extend_from_slice(&self.header);
            self.hasher.update(self.header);
            self.sealed_len += HEADER_LEN as u64;
        }
    }

    fn seal_segment(&mut self, plain: &[u8], last: bool, out: &mut Vec<u8>) {
        let index =
            u32::try_from(self.next_index).expect("a sealed blob holds at most 2^32 segments");
        let nonce = segment_nonce(&self.nonce_prefix, index, last);
        let start = out.len();
        out.extend_from_slice(plain);
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce, &self.header, &mut out[start..])
            .expect("AES-GCM encrypts any segment-sized input");
        out.extend_from_slice(&tag);
        self.hasher.update(&out[start..]);
        self.sealed_len += (out.len() - start) as u64;
        self.next_index += 1;
    }
}

/// Seals `plaintext` in one go with a fresh salt and nonce prefix. Returns
/// the blob and its name.
pub fn seal_all(
    key: &DataKey,
    asset_id: &str,
    key_id: u32,
    segment_size: u32,
    plaintext: &[u8],
) -> (Vec<u8>, BlobId) {
    finish_all(Sealer::new(key, asset_id, key_id, segment_size), plaintext)
}

/// Seals deterministically with a chosen salt and nonce prefix: for test
/// vectors only. Never reuse a salt with the same data key and asset.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn seal_with_params(
    key: &DataKey,
    asset_id: &str,
    key_id: u32,
    segment_size: u32,
    salt: [u8; SALT_LEN],
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
    plaintext: &[u8],
) -> (Vec<u8>, BlobId) {
    let sealer = Sealer::with_params(key, asset_id, key_id, segment_size, salt, nonce_prefix);
    finish_all(sealer, plaintext)
}

fn finish_all(mut sealer: Sealer, plaintext: &[u8]) -> (Vec<u8>, BlobId) {
    let mut out = Vec::with_capacity(
        super::SealedLayout::for_plaintext(sealer.segment_size as u32, plaintext.len() as u64)
            .map_or(0, |l| l.sealed_len() as usize),
    );
    sealer.update(plaintext, &mut out);
    let (id, len) = sealer.finish(&mut out);
    debug_assert_eq!(len, out.len() as u64);
    (out, id)
}
