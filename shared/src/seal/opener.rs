//! Authenticating and decrypting single segments.

use std::fmt;

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, Tag};

use super::header::{segment_cipher, segment_nonce, SealedHeader, HEADER_LEN, TAG_LEN};
use super::keys::DataKey;
use super::layout::SealedLayout;
use super::SealError;

/// Opens the segments of one sealed blob, given its header and length.
///
/// Each segment is authenticated on its own; which segment is the last
/// comes from the layout, so a blob cut at a segment boundary or extended
/// fails on its (apparent) last segment.
#[derive(Clone)]
pub struct Opener {
    cipher: Aes256Gcm,
    header_bytes: [u8; HEADER_LEN],
    header: SealedHeader,
    layout: SealedLayout,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("header", &self.header)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// Parses the header (the first [`HEADER_LEN`] bytes of `header_bytes`;
    /// passing the whole blob is fine) and checks `sealed_len` against it.
    /// Does not authenticate anything yet: a wrong key or asset id shows up
    /// as [`SealError::SegmentAuth`] on the first segment opened.
    pub fn new(
        key: &DataKey,
        asset_id: &str,
        header_bytes: &[u8],
        sealed_len: u64,
    ) -> Result<Opener, SealError> {
        let header = SealedHeader::parse(header_bytes)?;
        let layout = SealedLayout::new(header.segment_size, sealed_len)?;
        Ok(Opener {
            cipher: segment_cipher(key, asset_id, &header.salt),
            header_bytes: header.to_bytes(),
            header,
            layout,
        })
    }

    pub fn layout(&self) -> &SealedLayout {
        &self.layout
    }

    pub fn header(&self) -> &SealedHeader {
        &self.header
    }

    /// Authenticates and decrypts segment `index` from its sealed bytes
    /// (exactly [`SealedLayout::sealed_range`]`(index)` of the blob).
    pub fn open_segment(&self, index: u64, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut buf = Vec::new();
        self.open_segment_into(index, sealed, &mut buf)?;
        Ok(buf)
    }

    /// Like [`open_segment`](Opener::open_segment), replacing the contents
    /// of `buf` (reuse one buffer across segments). On error `buf` is empty.
    pub fn open_segment_into(
        &self,
        index: u64,
        sealed: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        buf.resize(sealed.len().saturating_sub(TAG_LEN), 0);
        let result = self.open_segment_to(index, sealed, buf);
        if result.is_err() {
            buf.clear();
        }
        result
    }

    /// Authenticates segment `index` and decrypts it where it lies: `sealed`
    /// holds exactly the segment (ciphertext and tag); on success its first
    /// `sealed.len() - TAG_LEN` bytes are the plaintext. On error the bytes
    /// are left as they were (the tag is checked before anything is
    /// decrypted). Saves a second buffer when the reader owns the bytes.
    pub fn open_segment_in_place(&self, index: u64, sealed: &mut [u8]) -> Result<(), SealError> {
        let (expected, nonce) = self.check_segment(index, sealed.len())?;
        let (ciphertext, tag) = sealed.split_at_mut(expected - TAG_LEN);
        let tag = Tag::try_from(&*tag).map_err(|_| SealError::InvalidLength)?;
        self.cipher
            .decrypt_inout_detached(&nonce, &self.header_bytes, ciphertext.into(), &tag)
            .map_err(|_| SealError::SegmentAuth { index })
    }

    /// The sealed length segment `index` must have (checked against
    /// `len`), and its nonce.
    fn check_segment(
        &self,
        index: u64,
        len: usize,
    ) -> Result<(usize, aes_gcm::Nonce<U12>), SealError> {
        if index >= self.layout.segment_count() {
            return Err(SealError::RangeOutOfBounds);
        }
        let range = self.layout.sealed_range(index);
        let expected = (range.end - range.start) as usize;
        if len < expected {
            return Err(SealError::Truncated);
        }
        if len > expected {
            return Err(SealError::InvalidLength);
        }
        let last = index + 1 == self.layout.segment_count();
        let index32 = u32::try_from(index).map_err(|_| SealError::InvalidLength)?;
        Ok((
            expected,
            segment_nonce(&self.header.nonce_prefix, index32, last),
        ))
    }

    /// Authenticates segment `index` and decrypts it into `out`, which must
    /// be exactly its plaintext length (`sealed.len() - TAG_LEN`): lets a
    /// reader decrypt consecutive segments straight into one buffer.
    /// Nothing is written to `out` unless the tag verifies.
    pub fn open_segment_to(
        &self,
        index: u64,
        sealed: &[u8],
        out: &mut [u8],
    ) -> Result<(), SealError> {
        let (expected, nonce) = self.check_segment(index, sealed.len())?;
        if out.len() != expected - TAG_LEN {
            return Err(SealError::InvalidLength);
        }
        let (ciphertext, tag) = sealed.split_at(expected - TAG_LEN);
        let tag = Tag::try_from(tag).map_err(|_| SealError::InvalidLength)?;
        // Decrypt from `sealed` straight into `out` (no copy first).
        let inout = InOutBuf::new(ciphertext, out).expect("same lengths");
        self.cipher
            .decrypt_inout_detached(&nonce, &self.header_bytes, inout, &tag)
            .map_err(|_| SealError::SegmentAuth { index })
    }
}

/// Opens a whole blob held in memory. Checks every segment.
pub fn open_all(key: &DataKey, asset_id: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    let opener = Opener::new(key, asset_id, sealed, sealed.len() as u64)?;
    let layout = *opener.layout();
    let mut out = Vec::with_capacity(layout.plaintext_len() as usize);
    let mut buf = Vec::with_capacity(layout.segment_size() as usize);
    for i in 0..layout.segment_count() {
        let r = layout.sealed_range(i);
        opener.open_segment_into(i, &sealed[r.start as usize..r.end as usize], &mut buf)?;
        out.extend_from_slice(&buf);
    }
    Ok(out)
}
