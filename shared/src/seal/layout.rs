//! Length arithmetic: which sealed bytes hold which plaintext.

use std::ops::Range;

use super::header::{check_segment_size, HEADER_LEN, TAG_LEN};
use super::SealError;

const H: u64 = HEADER_LEN as u64;
const T: u64 = TAG_LEN as u64;

/// Where each segment of a sealed blob lies, derived from the segment size
/// (in the header) and the sealed length (from storage).
///
/// A blob is `HEADER_LEN` bytes of header, then segments of
/// `segment_size + TAG_LEN` sealed bytes; the last segment holds
/// `1..=segment_size` plaintext bytes, or 0 when the whole plaintext is
/// empty (then it is the only segment). Every plaintext length has exactly
/// one sealed length, and lengths in between are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedLayout {
    segment_size: u32,
    sealed_len: u64,
    segment_count: u64,
    plaintext_len: u64,
}

impl SealedLayout {
    /// Validates that `sealed_len` can be a blob with this segment size.
    /// Errors: segment size out of range → `BadHeader`; shorter than a
    /// header plus one tag → `Truncated`; a length that falls inside a tag,
    /// or leaves an empty trailing segment, or needs more than 2^32
    /// segments → `InvalidLength`.
    pub fn new(segment_size: u32, sealed_len: u64) -> Result<SealedLayout, SealError> {
        check_segment_size(segment_size)?;
        if sealed_len < H + T {
            return Err(SealError::Truncated);
        }
        let body = sealed_len - H;
        let full = u64::from(segment_size) + T;
        let (whole, rest) = (body / full, body % full);
        let segment_count = match rest {
            0 => whole,
            r if r < T => return Err(SealError::InvalidLength),
            // An empty segment after full ones is never written.
            r if r == T && whole > 0 => return Err(SealError::InvalidLength),
            _ => whole + 1,
        };
        if segment_count > 1 << 32 {
            return Err(SealError::InvalidLength);
        }
        Ok(SealedLayout {
            segment_size,
            sealed_len,
            segment_count,
            plaintext_len: body - segment_count * T,
        })
    }

    /// The layout a plaintext of `plaintext_len` bytes seals to.
    pub fn for_plaintext(segment_size: u32, plaintext_len: u64) -> Result<SealedLayout, SealError> {
        check_segment_size(segment_size)?;
        let count = plaintext_len.div_ceil(u64::from(segment_size)).max(1);
        let sealed_len = count
            .checked_mul(T)
            .and_then(|t| t.checked_add(plaintext_len))
            .and_then(|n| n.checked_add(H))
            .ok_or(SealError::InvalidLength)?;
        SealedLayout::new(segment_size, sealed_len)
    }

    pub fn segment_size(&self) -> u32 {
        self.segment_size
    }

    pub fn sealed_len(&self) -> u64 {
        self.sealed_len
    }

    pub fn plaintext_len(&self) -> u64 {
        self.plaintext_len
    }

    /// At least 1.
    pub fn segment_count(&self) -> u64 {
        self.segment_count
    }

    /// Offset in the plaintext where segment `index` starts.
    pub fn plain_offset(&self, index: u64) -> u64 {
        index.saturating_mul(u64::from(self.segment_size))
    }

    /// Plaintext range segment `index` holds.
    ///
    /// # Panics
    /// If `index >= segment_count()`.
    pub fn plain_range(&self, index: u64) -> Range<u64> {
        assert!(index < self.segment_count, "segment {index} out of range");
        let start = self.plain_offset(index);
        start..(start + u64::from(self.segment_size)).min(self.plaintext_len)
    }

    /// Absolute byte range of segment `index` (ciphertext and tag) in the
    /// blob, header included in the offsets.
    ///
    /// # Panics
    /// If `index >= segment_count()`.
    pub fn sealed_range(&self, index: u64) -> Range<u64> {
        assert!(index < self.segment_count, "segment {index} out of range");
        let full = u64::from(self.segment_size) + T;
        let start = H + index * full;
        start..(start + full).min(self.sealed_len)
    }

    /// Indices of the segments holding plaintext bytes `plain_start..plain_end`
    /// (clamped to the plaintext). Empty when the range is empty.
    pub fn segments_for(&self, plain_start: u64, plain_end: u64) -> Range<u64> {
        let end = plain_end.min(self.plaintext_len);
        let seg = u64::from(self.segment_size);
        if plain_start >= end {
            let i = (plain_start / seg).min(self.segment_count);
            return i..i;
        }
        plain_start / seg..(end - 1) / seg + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_for_small_segments() {
        // seg 16: header 52, each full segment 32 sealed bytes.
        let empty = SealedLayout::new(16, 52 + 16).unwrap();
        assert_eq!((empty.plaintext_len(), empty.segment_count()), (0, 1));
        assert_eq!(empty.sealed_range(0), 52..68);
        assert_eq!(empty.segments_for(0, 0), 0..0);

        let one = SealedLayout::new(16, 52 + 17).unwrap();
        assert_eq!((one.plaintext_len(), one.segment_count()), (1, 1));

        let full = SealedLayout::new(16, 52 + 32).unwrap();
        assert_eq!((full.plaintext_len(), full.segment_count()), (16, 1));

        let l = SealedLayout::new(16, 52 + 32 * 2 + 16 + 5).unwrap();
        assert_eq!((l.plaintext_len(), l.segment_count()), (37, 3));
        assert_eq!(l.sealed_range(0), 52..84);
        assert_eq!(l.sealed_range(1), 84..116);
        assert_eq!(l.sealed_range(2), 116..137);
        assert_eq!(l.plain_range(2), 32..37);
        assert_eq!(l.plain_offset(1), 16);
        assert_eq!(l.segments_for(0, 37), 0..3);
        assert_eq!(l.segments_for(15, 17), 0..2);
        assert_eq!(l.segments_for(16, 32), 1..2);
        assert_eq!(l.segments_for(36, 100), 2..3);
        assert!(l.segments_for(37, 37).is_empty());
        assert!(l.segments_for(20, 10).is_empty());
    }

    #[test]
    fn impossible_lengths_are_rejected() {
        assert_eq!(SealedLayout::new(16, 0), Err(SealError::Truncated));
        assert_eq!(SealedLayout::new(16, 52 + 15), Err(SealError::Truncated));
        // cut inside the second segment's tag
        assert_eq!(
            SealedLayout::new(16, 52 + 32 + 15),
            Err(SealError::InvalidLength)
        );
        // an empty segment after a full one
        assert_eq!(
            SealedLayout::new(16, 52 + 32 + 16),
            Err(SealError::InvalidLength)
        );
        assert!(matches!(
            SealedLayout::new(0, 100),
            Err(SealError::BadHeader(_))
        ));
        assert_eq!(
            SealedLayout::new(16, u64::MAX),
            Err(SealError::InvalidLength)
        );
    }

    #[test]
    fn for_plaintext_matches_new() {
        for seg in [16u32, 17, 64] {
            for len in 0..300u64 {
                let l = SealedLayout::for_plaintext(seg, len).unwrap();
                assert_eq!(l.plaintext_len(), len);
                assert_eq!(SealedLayout::new(seg, l.sealed_len()).unwrap(), l);
            }
        }
    }
}
