//! Playback tokens: signed by the manager with Ed25519, verified by nodes
//! that hold only the public key (so a node cannot mint tokens).
//!
//! Format (v1): `base64url(body) "." base64url(signature)`, no padding.
//! `body` = version byte 1 || asset id (u16 BE length, UTF-8) || blob id
//! (32) || wrapped key (u16 BE length, bytes) || expires_at (i64 BE, unix
//! seconds) || grant (u8 0 = none, or 1 then u16 BE length, UTF-8).
//! The signature is Ed25519 over `"slmedia token v1\0" || body`.
//!
//! v2 (`docs/credits.md`, "Price changes") is v1 with version byte 2, the
//! asset's price epoch (u32 BE) appended after the grant, and the context
//! `"slmedia token v2\0"`. A token whose epoch is 0 is always written as
//! v1, so every token minted for a movie that was never paid reads the
//! same to a node that knows only v1.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::BlobId;

// FROZEN: the v1 and v2 token formats.
const VERSION: u8 = 1;
const SIGNING_CONTEXT: &[u8] = b"slmedia token v1\0";
const VERSION_2: u8 = 2;
const SIGNING_CONTEXT_2: &[u8] = b"slmedia token v2\0";
// (end of frozen constants)

/// Longest token accepted, in characters (a typical one is under 300).
pub const MAX_TOKEN_LEN: usize = 2048;

/// What a playback token grants: one asset's blob, until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaybackClaims {
    pub asset_id: String,
    /// The sealed blob to serve.
    pub blob: BlobId,
    /// The asset's data key wrapped by a master key the nodes hold.
    #[serde(with = "hex_bytes")]
    pub wrapped_key: Vec<u8>,
    /// Unix seconds; the token is refused from this second on.
    pub expires_at: i64,
    /// Opaque reference for the manager (a paid view's grant id), echoed in
    /// the node's view journal.
    pub grant: Option<String>,
    /// The asset's price epoch when a grant-less token was minted: it goes
    /// up each time the movie turns from free to paid, and a grant-less
    /// token older than the current epoch of a paid movie is refused
    /// (`payment_required`). 0 for a movie that was never paid.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
        hex::decode(s.as_ref()).map_err(serde::de::Error::custom)
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the playback token is malformed")]
    Malformed,
    #[error("the playback token's signature is not valid")]
    BadSignature,
    #[error("the playback token has expired")]
    Expired,
    /// Key material in configuration is not 32 bytes of hex.
    #[error("invalid token key: {0}")]
    InvalidKey(String),
}

impl TokenError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Malformed => "token_malformed",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Expired => "token_expired",
            TokenError::InvalidKey(_) => "token_invalid_key",
        }
    }
}

fn decode_hex32(s: &str, what: &str) -> Result<Zeroizing<[u8; 32]>, TokenError> {
    let mut out = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(s.trim(), out.as_mut())
        .map_err(|_| TokenError::InvalidKey(format!("{what} is 64 hex characters")))?;
    Ok(out)
}

/// Mints tokens. Held by the manager only. `Debug` shows only the public key.
#[derive(Clone)]
pub struct TokenSigner {
    key: SigningKey,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("public", &self.public_hex())
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// From the 32-byte Ed25519 seed in hex.
    pub fn from_seed_hex(seed_hex: &str) -> Result<TokenSigner, TokenError> {
        let seed = decode_hex32(seed_hex, "a token signing seed")?;
        Ok(TokenSigner {
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn generate() -> TokenSigner {
        TokenSigner {
            key: SigningKey::generate(&mut OsRng),
        }
    }

    /// The seed in hex (secret: for writing configuration once).
    pub fn seed_hex(&self) -> String {
        hex::encode(self.key.to_bytes())
    }

    /// The public key in hex, for the nodes' configuration.
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// The matching verifier.
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier {
            keys: vec![self.key.verifying_key()],
        }
    }

    /// Signs `claims` into a URL-safe token.
    ///
    /// # Panics
    /// If the asset id, wrapped key or grant is longer than 65535 bytes.
    pub fn sign(&self, claims: &PlaybackClaims) -> String {
        let body = encode_claims(claims);
        let sig = self.key.sign(&signing_input(&body));
        let mut out = URL_SAFE_NO_PAD.encode(&body);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.to_bytes(), &mut out);
        out
    }
}

/// Checks tokens. Holds public keys only; more than one during a key
/// rotation (a token verifies if any key accepts it).
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    keys: Vec<VerifyingKey>,
}

impl TokenVerifier {
    /// From a 32-byte Ed25519 public key in hex.
    pub fn from_public_hex(public_hex: &str) -> Result<TokenVerifier, TokenError> {
        let bytes = decode_hex32(public_hex, "a token public key")?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| TokenError::InvalidKey("not an Ed25519 public key".into()))?;
        Ok(TokenVerifier { keys: vec![key] })
    }

    /// Also accept tokens signed by the key `public_hex` (rotation).
    pub fn with_key(mut self, public_hex: &str) -> Result<TokenVerifier, TokenError> {
        self.keys
            .extend(TokenVerifier::from_public_hex(public_hex)?.keys);
        Ok(self)
    }

    /// Verifies `token` at unix time `now` and returns its claims.
    /// Order of checks: shape → signature → claims → expiry, so `Expired`
    /// is only said of genuine tokens.
    pub fn verify(&self, token: &str, now: i64) -> Result<PlaybackClaims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (body_b64, sig_b64) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let body = URL_SAFE_NO_PAD
            .decode(body_b64)
            .map_err(|_| TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| TokenError::Malformed)?;
        let sig: [u8; 64] = sig.try_into().map_err(|_| TokenError::Malformed)?;
        if !matches!(body.first(), Some(&VERSION) | Some(&VERSION_2)) {
            return Err(TokenError::Malformed);
        }
        let sig = Signature::from_bytes(&sig);
        let msg = signing_input(&body);
        if !self
            .keys
            .iter()
            .any(|k| k.verify_strict(&msg, &sig).is_ok())
        {
            return Err(TokenError::BadSignature);
        }
        let claims = decode_claims(&body).ok_or(TokenError::Malformed)?;
        if now >= claims.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

fn signing_input(body: &[u8]) -> Vec<u8> {
    // The version byte picks the context, so a v1 body can never be
    // presented as v2 or the reverse.
    let context = if body.first() == Some(&VERSION_2) {
        SIGNING_CONTEXT_2
    } else {
        SIGNING_CONTEXT
    };
    let mut msg = Vec::with_capacity(context.len() + body.len());
    msg.extend_from_slice(context);
    msg.extend_from_slice(body);
    msg
}

fn put_bytes(out: &mut Vec<u8>, field: &str, bytes: &[u8]) {
    let len = u16::try_from(bytes.len())
        .unwrap_or_else(|_| panic!("playback token field `{field}` is longer than 65535 bytes"));
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

fn encode_claims(c: &PlaybackClaims) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + c.asset_id.len() + c.wrapped_key.len());
    out.push(if c.epoch == 0 { VERSION } else { VERSION_2 });
    put_bytes(&mut out, "asset_id", c.asset_id.as_bytes());
    out.extend_from_slice(c.blob.as_bytes());
    put_bytes(&mut out, "wrapped_key", &c.wrapped_key);
    out.extend_from_slice(&c.expires_at.to_be_bytes());
    match &c.grant {
        None => out.push(0),
        Some(g) => {
            out.push(1);
            put_bytes(&mut out, "grant", g.as_bytes());
        }
    }
    if c.epoch != 0 {
        out.extend_from_slice(&c.epoch.to_be_bytes());
    }
    out
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn sized(&mut self) -> Option<&'a [u8]> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().ok()?);
        self.take(len.into())
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.sized()?.to_vec()).ok()
    }
}

fn decode_claims(body: &[u8]) -> Option<PlaybackClaims> {
    let mut c = Cursor(body);
    let version = c.u8()?;
    if version != VERSION && version != VERSION_2 {
        return None;
    }
    let asset_id = c.string()?;
    let blob = BlobId::from_bytes(c.take(32)?.try_into().ok()?);
    let wrapped_key = c.sized()?.to_vec();
    let expires_at = i64::from_be_bytes(c.take(8)?.try_into().ok()?);
    let grant = match c.u8()? {
        0 => None,
        1 => Some(c.string()?),
        _ => return None,
    };
    let epoch = if version == VERSION_2 {
        // v2 exists to carry a non-zero epoch; a zero one is not canonical.
        let e = u32::from_be_bytes(c.take(4)?.try_into().ok()?);
        if e == 0 {
            return None;
        }
        e
    } else {
        0
    };
    if !c.0.is_empty() {
        return None;
    }
    Some(PlaybackClaims {
        asset_id,
        blob,
        wrapped_key,
        expires_at,
        grant,
        epoch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> PlaybackClaims {
        PlaybackClaims {
            asset_id: "0b9e4c1e-7d0e-4a36-9c55-3f1f6f3a9d10".into(),
            blob: BlobId::of(b"sealed"),
            wrapped_key: vec![7; 64],
            expires_at: 1_000_000,
            grant: Some("grant-42".into()),
            epoch: 0,
        }
    }

    #[test]
    fn epochs_round_trip_in_v2_and_zero_stays_v1() {
        let signer = TokenSigner::generate();
        let v1 = signer.sign(&claims());
        let raw = URL_SAFE_NO_PAD
            .decode(v1.split('.').next().unwrap())
            .unwrap();
        assert_eq!(raw[0], 1, "epoch 0 is written as v1");
        let with_epoch = PlaybackClaims {
            grant: None,
            epoch: 3,
            ..claims()
        };
        let v2 = signer.sign(&with_epoch);
        let (body, sig) = v2.split_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(body).unwrap();
        assert_eq!(raw[0], 2);
        assert_eq!(signer.verifier().verify(&v2, 0).unwrap(), with_epoch);
        // The epoch is signed: lowering it breaks the signature, and a v2
        // body relabelled v1 is checked under the other context.
        let n = raw.len();
        raw[n - 1] = 1;
        let lowered = format!("{}.{sig}", URL_SAFE_NO_PAD.encode(&raw));
        assert_eq!(
            signer.verifier().verify(&lowered, 0),
            Err(TokenError::BadSignature)
        );
        raw[n - 1] = 3;
        raw[0] = 1;
        let relabelled = format!("{}.{sig}", URL_SAFE_NO_PAD.encode(&raw));
        assert_eq!(
            signer.verifier().verify(&relabelled, 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn round_trip_is_compact_and_url_safe() {
        let signer = TokenSigner::generate();
        let verifier = TokenVerifier::from_public_hex(&signer.public_hex()).unwrap();
        let token = signer.sign(&claims());
        assert!(token.len() < 400, "{} chars", token.len());
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        assert_eq!(verifier.verify(&token, 999_999).unwrap(), claims());
        let no_grant = PlaybackClaims {
            grant: None,
            ..claims()
        };
        assert_eq!(
            verifier.verify(&signer.sign(&no_grant), 0).unwrap(),
            no_grant
        );
        assert_eq!(signer.verifier().verify(&token, 0).unwrap(), claims());
    }

    #[test]
    fn expired_forged_and_malformed_tokens_are_refused() {
        let signer = TokenSigner::generate();
        let verifier = signer.verifier();
        let token = signer.sign(&claims());
        assert_eq!(verifier.verify(&token, 1_000_000), Err(TokenError::Expired));
        assert_eq!(TokenError::Expired.code(), "token_expired");

        let other = TokenSigner::generate();
        let forged = other.sign(&claims());
        assert_eq!(verifier.verify(&forged, 0), Err(TokenError::BadSignature));
        assert_eq!(TokenError::BadSignature.code(), "token_bad_signature");

        // Change the expiry inside a genuine token.
        let (body, sig) = token.split_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(body).unwrap();
        let n = raw.len();
        raw[n - 12] ^= 0x40;
        let tampered = format!("{}.{sig}", URL_SAFE_NO_PAD.encode(&raw));
        assert_eq!(verifier.verify(&tampered, 0), Err(TokenError::BadSignature));

        for bad in [
            "",
            ".",
            "abc",
            "abc.def",
            &format!("{body}."),
            &format!("{body}.{body}"),
            &"a".repeat(5000),
        ] {
            assert_eq!(verifier.verify(bad, 0), Err(TokenError::Malformed), "{bad}");
        }
        assert_eq!(TokenError::Malformed.code(), "token_malformed");
    }

    #[test]
    fn a_signed_but_undecodable_body_is_malformed() {
        let signer = TokenSigner::generate();
        let mut body = encode_claims(&claims());
        body.push(0); // trailing byte
        let sig = signer.key.sign(&signing_input(&body));
        let token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&body),
            URL_SAFE_NO_PAD.encode(sig.to_bytes())
        );
        assert_eq!(
            signer.verifier().verify(&token, 0),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn keys_round_trip_through_hex_and_rotate() {
        let signer = TokenSigner::generate();
        let again = TokenSigner::from_seed_hex(&signer.seed_hex()).unwrap();
        assert_eq!(again.public_hex(), signer.public_hex());
        assert!(!format!("{signer:?}").contains(&signer.seed_hex()));
        assert_eq!(
            TokenSigner::from_seed_hex("zz").unwrap_err().code(),
            "token_invalid_key"
        );
        assert!(TokenVerifier::from_public_hex("00").is_err());

        let new = TokenSigner::generate();
        let both = TokenVerifier::from_public_hex(&new.public_hex())
            .unwrap()
            .with_key(&signer.public_hex())
            .unwrap();
        assert!(both.verify(&signer.sign(&claims()), 0).is_ok());
        assert!(both.verify(&new.sign(&claims()), 0).is_ok());
    }

    #[test]
    fn claims_serde_uses_hex_for_the_key() {
        let json = serde_json::to_value(claims()).unwrap();
        assert_eq!(json["wrapped_key"], "07".repeat(64));
        assert_eq!(json["blob"], BlobId::of(b"sealed").to_string());
        let back: PlaybackClaims = serde_json::from_value(json).unwrap();
        assert_eq!(back, claims());
    }
}
