//! Per-asset data keys and the master key that wraps them.

use std::fmt;

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::SealError;

// FROZEN: the v1 wrapped-key format, key id u32 BE (4) || nonce (12) ||
// AES-256-GCM ciphertext of the data key (32) || tag (16).
/// Length of a wrapped data key.
pub const WRAPPED_KEY_LEN: usize = 4 + 12 + 32 + 16;
/// Domain prefix of the wrapping AAD; key id and asset id follow.
const WRAP_AAD_PREFIX: &[u8] = b"slmedia wrap v1";
// (end of frozen constants)

/// The random 32-byte key of one asset's sealed blob. Zeroed on drop;
/// `Debug` prints nothing of it. Stored only wrapped by a [`MasterKey`].
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; 32]);

impl DataKey {
    /// A fresh key from the OS random generator.
    pub fn generate() -> DataKey {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        DataKey(k)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> DataKey {
        DataKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([redacted])")
    }
}

/// A key-encryption key with an id. It wraps each asset's [`DataKey`] with
/// AES-256-GCM; the id is written in front of every wrapped key so keys can
/// be rotated (see [`wrapped_key_id`]).
#[derive(Clone)]
pub struct MasterKey {
    /// Written in every wrapped key and every blob header.
    pub id: u32,
    key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl MasterKey {
    pub fn new(id: u32, key: [u8; 32]) -> MasterKey {
        MasterKey {
            id,
            key: Zeroizing::new(key),
        }
    }

    /// From 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(id: u32, hex_key: &str) -> Result<MasterKey, SealError> {
        let mut key = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_key.trim(), key.as_mut())
            .map_err(|_| SealError::InvalidKey("a master key is 64 hex characters".into()))?;
        Ok(MasterKey { id, key })
    }

    pub fn generate(id: u32) -> MasterKey {
        let mut key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(key.as_mut());
        MasterKey { id, key }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The key as 64 lowercase hex characters (for writing config once).
    pub fn to_hex(&self) -> String {
        hex::encode(self.key.as_ref())
    }

    /// Wraps `key` for `asset_id` with a random nonce. The result is
    /// [`WRAPPED_KEY_LEN`] bytes and unwraps only with this master key and
    /// this asset id.
    pub fn wrap(&self, asset_id: &str, key: &DataKey) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        wrap_with_nonce(self, asset_id, key, nonce)
    }

    /// Reverses [`wrap`](MasterKey::wrap). A wrapped key made by another
    /// master key id gives [`SealError::UnknownKeyId`]; anything else wrong
    /// (length, tampering, other asset) gives [`SealError::KeyUnwrap`].
    pub fn unwrap(&self, asset_id: &str, wrapped: &[u8]) -> Result<DataKey, SealError> {
        if wrapped.len() != WRAPPED_KEY_LEN {
            return Err(SealError::KeyUnwrap);
        }
        let id = wrapped_key_id(wrapped).ok_or(SealError::KeyUnwrap)?;
        if id != self.id {
            return Err(SealError::UnknownKeyId(id));
        }
        let nonce = Nonce::try_from(&wrapped[4..16]).map_err(|_| SealError::KeyUnwrap)?;
        let mut buf = Zeroizing::new([0u8; 32]);
        buf.copy_from_slice(&wrapped[16..48]);
        let tag = Tag::try_from(&wrapped[48..]).map_err(|_| SealError::KeyUnwrap)?;
        self.cipher()
            .decrypt_inout_detached(
                &nonce,
                &wrap_aad(self.id, asset_id),
                buf.as_mut_slice().into(),
                &tag,
            )
            .map_err(|_| SealError::KeyUnwrap)?;
        Ok(DataKey(*buf))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(self.key.as_ref()).expect("32-byte key")
    }
}

fn wrap_aad(key_id: u32, asset_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_AAD_PREFIX.len() + 4 + asset_id.len());
    aad.extend_from_slice(WRAP_AAD_PREFIX);
    aad.extend_from_slice(&key_id.to_be_bytes());
    aad.extend_from_slice(asset_id.as_bytes());
    aad
}

/// [`MasterKey::wrap`] with a caller-chosen nonce: for test vectors only.
/// Never reuse a nonce with the same master key.
#[doc(hidden)]
pub fn wrap_with_nonce(
    master: &MasterKey,
    asset_id: &str,
    key: &DataKey,
    nonce: [u8; 12],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(WRAPPED_KEY_LEN);
    out.extend_from_slice(&master.id.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(key.as_bytes());
    let tag = master
        .cipher()
        .encrypt_inout_detached(
            &Nonce::from(nonce),
            &wrap_aad(master.id, asset_id),
            (&mut out[16..48]).into(),
        )
        .expect("AES-GCM encrypts 32 bytes");
    out.extend_from_slice(&tag);
    out
}

/// The master key id a wrapped key was made with, so a node holding several
/// master keys (rotation) can pick the right one. `None` if `wrapped` is not
/// a wrapped key.
pub fn wrapped_key_id(wrapped: &[u8]) -> Option<u32> {
    if wrapped.len() != WRAPPED_KEY_LEN {
        return None;
    }
    Some(u32::from_be_bytes(wrapped[..4].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trips_and_binds_key_id_and_asset() {
        let master = MasterKey::generate(3);
        let key = DataKey::generate();
        let wrapped = master.wrap("asset-a", &key);
        assert_eq!(wrapped.len(), WRAPPED_KEY_LEN);
        assert_eq!(wrapped_key_id(&wrapped), Some(3));
        assert_eq!(
            master.unwrap("asset-a", &wrapped).unwrap().as_bytes(),
            key.as_bytes()
        );
        assert_ne!(master.wrap("asset-a", &key), wrapped, "random nonce");

        assert_eq!(
            master.unwrap("asset-b", &wrapped).unwrap_err(),
            SealError::KeyUnwrap
        );
        let other = MasterKey::generate(4);
        assert_eq!(
            other.unwrap("asset-a", &wrapped).unwrap_err(),
            SealError::UnknownKeyId(3)
        );
        let same_id_other_key = MasterKey::generate(3);
        assert_eq!(
            same_id_other_key.unwrap("asset-a", &wrapped).unwrap_err(),
            SealError::KeyUnwrap
        );
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 0x01;
            let err = master.unwrap("asset-a", &bad).unwrap_err();
            if i < 4 {
                assert!(matches!(err, SealError::UnknownKeyId(_)));
            } else {
                assert_eq!(err, SealError::KeyUnwrap);
            }
        }
        assert_eq!(
            master.unwrap("asset-a", &wrapped[..63]).unwrap_err(),
            SealError::KeyUnwrap
        );
        assert_eq!(
            master.unwrap("asset-a", &[]).unwrap_err(),
            SealError::KeyUnwrap
        );
        assert_eq!(wrapped_key_id(&wrapped[..10]), None);
    }

    #[test]
    fn hex_forms_and_redaction() {
        let master = MasterKey::generate(9);
        let again = MasterKey::from_hex(9, &master.to_hex()).unwrap();
        assert_eq!(again.to_hex(), master.to_hex());
        assert_eq!(again.id(), 9);
        assert!(MasterKey::from_hex(1, "abc").is_err());
        assert!(MasterKey::from_hex(1, &"zz".repeat(32)).is_err());
        assert_eq!(
            MasterKey::from_hex(1, "").unwrap_err().code(),
            "seal_invalid_key"
        );
        assert!(!format!("{master:?}").contains(&master.to_hex()));
        let key = DataKey::from_bytes([0xab; 32]);
        assert_eq!(format!("{key:?}"), "DataKey([redacted])");
    }
}
