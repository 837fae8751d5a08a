//! Blob names: the SHA-256 of the sealed bytes.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The name of a stored blob: SHA-256 of its sealed bytes.
///
/// Written as 64 lowercase hex characters ([`Display`](fmt::Display),
/// [`FromStr`], serde). Parsing accepts only that canonical form, so one
/// blob never has two names.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId([u8; 32]);

/// Why a string is not a [`BlobId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a blob id is 64 lowercase hex characters")]
pub struct ParseBlobIdError;

impl BlobId {
    /// Hashes `bytes` in one go.
    pub fn of(bytes: &[u8]) -> BlobId {
        BlobId(Sha256::digest(bytes).into())
    }

    /// Finishes a hasher that was fed the sealed bytes while streaming.
    pub fn from_hasher(hasher: Sha256) -> BlobId {
        BlobId(hasher.finalize().into())
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> BlobId {
        BlobId(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The canonical 64-character lowercase hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        hex::encode_to_slice(self.0, &mut buf).expect("64 hex digits fit");
        f.write_str(std::str::from_utf8(&buf).expect("hex is ASCII"))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({self})")
    }
}

impl FromStr for BlobId {
    type Err = ParseBlobIdError;

    fn from_str(s: &str) -> Result<BlobId, ParseBlobIdError> {
        let canonical = s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !canonical {
            return Err(ParseBlobIdError);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseBlobIdError)?;
        Ok(BlobId(out))
    }
}

impl serde::Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BlobId, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = BlobId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 lowercase hex characters")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BlobId, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer_and_text_forms() {
        let id = BlobId::of(b"abc");
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(id.to_string(), hex);
        assert_eq!(id.to_hex(), hex);
        assert_eq!(hex.parse::<BlobId>().unwrap(), id);
        let mut h = Sha256::new();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(BlobId::from_hasher(h), id);
        assert_eq!(BlobId::from_bytes(*id.as_bytes()), id);
        assert_eq!(format!("{id:?}"), format!("BlobId({hex})"));
    }

    #[test]
    fn only_canonical_hex_parses() {
        let upper = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert_eq!(upper.parse::<BlobId>(), Err(ParseBlobIdError));
        assert!("".parse::<BlobId>().is_err());
        assert!("ab".repeat(33).parse::<BlobId>().is_err());
        assert!("zz".repeat(32).parse::<BlobId>().is_err());
        assert!("../etc/passwd".parse::<BlobId>().is_err());
    }

    #[test]
    fn serde_is_the_hex_string() {
        let id = BlobId::of(b"abc");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<BlobId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<BlobId>("\"nothex\"").is_err());
        assert!(serde_json::from_str::<BlobId>("7").is_err());
    }
}
