//! Request signing between the manager and the view nodes: HMAC-SHA256
//! with a secret shared per node.
//!
//! The signer sends two headers: [`DATE_HEADER`] = unix seconds in decimal,
//! and [`AUTH_HEADER`] = `v1 <key id> <64 hex MAC>`. The MAC is
//! HMAC-SHA256(secret, canonical) where `canonical` is these lines joined by
//! `\n`: `slmedia-node-auth-v1`, key id, method in upper case, path and
//! query, unix seconds, SHA-256 of the body in lowercase hex (the blob id
//! for a blob push; [`content_sha256_hex`]`(b"")` for no body).
//! Requests whose date is more than [`MAX_CLOCK_SKEW_SECS`] away from the
//! verifier's clock are refused.
//!
//! Answers are authenticated too ([`answer_mac`]): whoever answers a signed
//! request adds [`ANSWER_MAC_HEADER`] = hex HMAC-SHA256(same secret,
//! `slmedia-node-answer-v1` `\n` the request's [`AUTH_HEADER`] value `\n`
//! status `\n` SHA-256 of the answer body in hex). Binding the request's
//! own signature makes an answer good for that request only, so someone on
//! the path can neither make one up ("201 verified" to a push whose copy
//! was never stored) nor replay an old one. Streamed blob and backup
//! bodies are not covered: they are content-addressed and re-hashed by
//! whoever receives them.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

// FROZEN: the v1 request-signing scheme.
pub const AUTH_HEADER: &str = "x-slmedia-auth";
pub const DATE_HEADER: &str = "x-slmedia-date";
const SCHEME: &str = "v1";
const CONTEXT: &str = "slmedia-node-auth-v1";
pub const ANSWER_MAC_HEADER: &str = "x-slmedia-answer-mac";
const ANSWER_CONTEXT: &str = "slmedia-node-answer-v1";
// (end of frozen constants)

/// The [`ANSWER_MAC_HEADER`] value for an answer with `status` and `body`
/// to the request that carried `request_auth` (its [`AUTH_HEADER`]).
pub fn answer_mac(secret: &[u8], request_auth: &str, status: u16, body: &[u8]) -> String {
    hex::encode(
        answer_hmac(secret, request_auth, status, body)
            .finalize()
            .into_bytes(),
    )
}

/// Whether `presented` is [`answer_mac`] of this answer (constant time).
pub fn verify_answer_mac(
    secret: &[u8],
    request_auth: &str,
    status: u16,
    body: &[u8],
    presented: &str,
) -> bool {
    let mut given = [0u8; 32];
    if hex::decode_to_slice(presented.trim(), &mut given).is_err() {
        return false;
    }
    answer_hmac(secret, request_auth, status, body)
        .verify_slice(&given)
        .is_ok()
}

fn answer_hmac(secret: &[u8], request_auth: &str, status: u16, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    let status = status.to_string();
    let content = content_sha256_hex(body);
    for (i, field) in [ANSWER_CONTEXT, request_auth.trim(), &status, &content]
        .iter()
        .enumerate()
    {
        if i > 0 {
            mac.update(b"\n");
        }
        mac.update(field.as_bytes());
    }
    mac
}

/// The key id an [`AUTH_HEADER`] value names, if it is well formed.
pub fn auth_key_id(header: &str) -> Option<&str> {
    let mut parts = header.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(SCHEME), Some(id), Some(_), None) if !id.is_empty() => Some(id),
        _ => None,
    }
}

/// How far a request's date may be from the verifier's clock.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// Why a signed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeAuthError {
    #[error("the request is not signed")]
    Missing,
    #[error("the request signature header is malformed")]
    Malformed,
    #[error("the request is signed with an unknown key")]
    UnknownKey,
    #[error("the request signature does not match")]
    BadSignature,
    #[error("the request's date is more than {MAX_CLOCK_SKEW_SECS} s away from this clock")]
    Stale,
}

impl NodeAuthError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            NodeAuthError::Missing => "auth_missing",
            NodeAuthError::Malformed => "auth_malformed",
            NodeAuthError::UnknownKey => "auth_unknown_key",
            NodeAuthError::BadSignature => "auth_bad_signature",
            NodeAuthError::Stale => "auth_stale",
        }
    }
}

/// SHA-256 of `body` in lowercase hex, as signed requests carry it.
pub fn content_sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

fn mac(
    secret: &[u8],
    key_id: &str,
    method: &str,
    path_and_query: &str,
    unix_time: i64,
    content_sha256_hex: &str,
) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    let method = method.to_ascii_uppercase();
    let content = content_sha256_hex.to_ascii_lowercase();
    let time = unix_time.to_string();
    let fields = [CONTEXT, key_id, &method, path_and_query, &time, &content];
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            mac.update(b"\n");
        }
        mac.update(field.as_bytes());
    }
    mac
}

/// The [`AUTH_HEADER`] value for a request; send `unix_time` in
/// [`DATE_HEADER`]. `key_id` must not contain whitespace.
pub fn sign_request(
    secret: &[u8],
    key_id: &str,
    method: &str,
    path_and_query: &str,
    unix_time: i64,
    content_sha256_hex: &str,
) -> String {
    let tag = mac(
        secret,
        key_id,
        method,
        path_and_query,
        unix_time,
        content_sha256_hex,
    )
    .finalize()
    .into_bytes();
    format!("{SCHEME} {key_id} {}", hex::encode(tag))
}

/// Checks a signed request and returns the key id that signed it.
///
/// `lookup` maps a key id to its secret. Checks, in order: header present
/// and well formed, key known, MAC (constant-time), date within
/// [`MAX_CLOCK_SKEW_SECS`] of `now`. So `Stale` is only said of genuinely
/// signed requests (a clock problem, not an attack).
pub fn verify_request(
    lookup: impl Fn(&str) -> Option<Vec<u8>>,
    header: &str,
    method: &str,
    path_and_query: &str,
    date_header_value: &str,
    now: i64,
    content_sha256_hex: &str,
) -> Result<String, NodeAuthError> {
    if header.trim().is_empty() {
        return Err(NodeAuthError::Missing);
    }
    let mut parts = header.split(' ');
    let (Some(SCHEME), Some(key_id), Some(mac_hex), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(NodeAuthError::Malformed);
    };
    let mut given = [0u8; 32];
    if key_id.is_empty() || hex::decode_to_slice(mac_hex, &mut given).is_err() {
        return Err(NodeAuthError::Malformed);
    }
    let date = date_header_value.trim();
    let unix_time: i64 = date.parse().map_err(|_| NodeAuthError::Malformed)?;
    if unix_time.to_string() != date {
        return Err(NodeAuthError::Malformed);
    }
    let secret = lookup(key_id).ok_or(NodeAuthError::UnknownKey)?;
    mac(
        &secret,
        key_id,
        method,
        path_and_query,
        unix_time,
        content_sha256_hex,
    )
    .verify_slice(&given)
    .map_err(|_| NodeAuthError::BadSignature)?;
    if now.abs_diff(unix_time) > MAX_CLOCK_SKEW_SECS as u64 {
        return Err(NodeAuthError::Stale);
    }
    Ok(key_id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn lookup(id: &str) -> Option<Vec<u8>> {
        (id == "manager").then(|| SECRET.to_vec())
    }

    fn body() -> String {
        content_sha256_hex(b"hello")
    }

    #[test]
    fn answers_verify_only_for_their_request_status_and_body() {
        let req = sign_request(SECRET, "manager", "PUT", "/p", 1000, &body());
        let other = sign_request(SECRET, "manager", "PUT", "/p", 1001, &body());
        let mac = answer_mac(SECRET, &req, 201, b"{}");
        assert!(verify_answer_mac(SECRET, &req, 201, b"{}", &mac));
        assert!(
            !verify_answer_mac(SECRET, &other, 201, b"{}", &mac),
            "another request"
        );
        assert!(
            !verify_answer_mac(SECRET, &req, 200, b"{}", &mac),
            "another status"
        );
        assert!(
            !verify_answer_mac(SECRET, &req, 201, b"{ }", &mac),
            "another body"
        );
        assert!(!verify_answer_mac(
            b"another secret",
            &req,
            201,
            b"{}",
            &mac
        ));
        assert!(!verify_answer_mac(SECRET, &req, 201, b"{}", "zz"));
        assert_eq!(auth_key_id(&req), Some("manager"));
        assert_eq!(auth_key_id("v2 x y"), None);
    }

    #[test]
    fn a_signed_request_verifies() {
        let h = sign_request(
            SECRET,
            "manager",
            "put",
            "/internal/v1/blobs/ab?x=1",
            1000,
            &body(),
        );
        assert!(h.starts_with("v1 manager "));
        assert_eq!(h.len(), "v1 manager ".len() + 64);
        let ok = verify_request(
            lookup,
            &h,
            "PUT",
            "/internal/v1/blobs/ab?x=1",
            "1000",
            1200,
            &body(),
        );
        assert_eq!(ok.unwrap(), "manager");
    }

    #[test]
    fn each_defect_has_its_error() {
        let h = sign_request(SECRET, "manager", "PUT", "/p", 1000, &body());
        let v = |h: &str, m: &str, p: &str, d: &str, now: i64, c: &str| {
            verify_request(lookup, h, m, p, d, now, c)
        };
        assert_eq!(
            v("", "PUT", "/p", "1000", 1000, &body()),
            Err(NodeAuthError::Missing)
        );
        for bad in [
            "v1",
            "v2 manager 00",
            "v1 manager nothex",
            "v1  00",
            &format!("{h} extra"),
            &format!("v2{}", &h[2..]),
        ] {
            assert_eq!(
                v(bad, "PUT", "/p", "1000", 1000, &body()),
                Err(NodeAuthError::Malformed),
                "{bad}"
            );
        }
        assert_eq!(
            v(&h, "PUT", "/p", "soon", 1000, &body()),
            Err(NodeAuthError::Malformed)
        );
        assert_eq!(
            v(&h, "PUT", "/p", "+1000", 1000, &body()),
            Err(NodeAuthError::Malformed)
        );
        let other = sign_request(SECRET, "intruder", "PUT", "/p", 1000, &body());
        assert_eq!(
            v(&other, "PUT", "/p", "1000", 1000, &body()),
            Err(NodeAuthError::UnknownKey)
        );
        assert_eq!(
            v(&h, "GET", "/p", "1000", 1000, &body()),
            Err(NodeAuthError::BadSignature)
        );
        assert_eq!(
            v(&h, "PUT", "/q", "1000", 1000, &body()),
            Err(NodeAuthError::BadSignature)
        );
        assert_eq!(
            v(&h, "PUT", "/p", "1001", 1000, &body()),
            Err(NodeAuthError::BadSignature)
        );
        assert_eq!(
            v(&h, "PUT", "/p", "1000", 1000, &content_sha256_hex(b"")),
            Err(NodeAuthError::BadSignature)
        );
        let wrong_secret = sign_request(b"another secret", "manager", "PUT", "/p", 1000, &body());
        assert_eq!(
            v(&wrong_secret, "PUT", "/p", "1000", 1000, &body()),
            Err(NodeAuthError::BadSignature)
        );
        assert_eq!(
            v(&h, "PUT", "/p", "1000", 1301, &body()),
            Err(NodeAuthError::Stale)
        );
        assert_eq!(
            v(&h, "PUT", "/p", "1000", 699, &body()),
            Err(NodeAuthError::Stale)
        );
        assert!(v(&h, "PUT", "/p", "1000", 1300, &body()).is_ok());
        assert!(v(&h, "PUT", "/p", "1000", 700, &body()).is_ok());
        assert_eq!(NodeAuthError::Stale.code(), "auth_stale");
    }

    /// Pins the v1 scheme: a change here breaks nodes in the field.
    #[test]
    fn known_answer() {
        let h = sign_request(
            b"k",
            "node-utah",
            "GET",
            "/internal/v1/health",
            1_700_000_000,
            &content_sha256_hex(b""),
        );
        let mut m = Hmac::<Sha256>::new_from_slice(b"k").unwrap();
        m.update(b"slmedia-node-auth-v1\nnode-utah\nGET\n/internal/v1/health\n1700000000\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(
            h,
            format!("v1 node-utah {}", hex::encode(m.finalize().into_bytes()))
        );
    }
}
