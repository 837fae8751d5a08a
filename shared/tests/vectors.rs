//! Known-answer vectors in `tests/vectors/*.json` (hex). They pin the
//! frozen v1 formats: if this test fails, stored blobs, wrapped keys, tokens
//! or node signatures from older builds would no longer be readable.
//!
//! Regenerate (only for a deliberate new format version) with
//! `SLMEDIA_WRITE_VECTORS=1 cargo test -p shared --test vectors`.
//! `tests/vectors/check_vectors.py` re-derives the seal and wrap vectors
//! with Python's `cryptography`, independently of this crate.

use std::path::PathBuf;

use serde_json::{json, Value};
use shared::{
    open_all, seal_with_params, sign_request, wrap_with_nonce, BlobId, DataKey, MasterKey,
    PlaybackClaims, TokenSigner, TokenVerifier,
};

fn dir() -> PathBuf {
    crate_dir().join("tests/vectors")
}

fn h(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("valid hex")
}

fn arr<const N: usize>(v: &Value) -> [u8; N] {
    h(v).try_into().expect("right length")
}

fn check_or_write(name: &str, generated: Value) -> Value {
    let path = dir().join(name);
    if std::env::var_os("SLMEDIA_WRITE_VECTORS").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&generated).unwrap() + "\n",
        )
        .unwrap();
    }
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        stored, generated,
        "{name} differs from what this build produces"
    );
    stored
}

fn seal_vector(name: &str, segment_size: u32, plaintext: &[u8], asset_id: &str) -> Value {
    let data_key = [0x0f; 32];
    let salt: [u8; 32] = std::array::from_fn(|i| i as u8);
    let nonce_prefix = [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6];
    let key_id = 7;
    let (sealed, id) = seal_with_params(
        &DataKey::from_bytes(data_key),
        asset_id,
        key_id,
        segment_size,
        salt,
        nonce_prefix,
        plaintext,
    );
    json!({
        "name": name,
        "data_key": hex::encode(data_key),
        "asset_id": asset_id,
        "key_id": key_id,
        "segment_size": segment_size,
        "salt": hex::encode(salt),
        "nonce_prefix": hex::encode(nonce_prefix),
        "plaintext": hex::encode(plaintext),
        "sealed": hex::encode(&sealed),
        "blob_id": id.to_string(),
    })
}

#[test]
fn seal_vectors() {
    let forty: Vec<u8> = (0..40).collect();
    let generated = json!({
        "format": "slmedia sealed blob v1 (docs/sealed-blob.md)",
        "vectors": [
            seal_vector("empty", 16, b"", "asset-1"),
            seal_vector("one byte", 16, b"a", "asset-1"),
            seal_vector("exactly one segment", 16, b"0123456789abcdef", "asset-1"),
            seal_vector("three segments, last partial", 16, &forty, "asset-1"),
            seal_vector("other asset id", 16, &forty, "asset-2"),
            seal_vector("default-style larger segment", 64, b"The quick brown fox jumps over the lazy dog", "movie"),
        ],
    });
    let stored = check_or_write("seal-v1.json", generated);
    for v in stored["vectors"].as_array().unwrap() {
        let key = DataKey::from_bytes(arr(&v["data_key"]));
        let asset = v["asset_id"].as_str().unwrap();
        let (sealed, id) = seal_with_params(
            &key,
            asset,
            v["key_id"].as_u64().unwrap() as u32,
            v["segment_size"].as_u64().unwrap() as u32,
            arr(&v["salt"]),
            arr(&v["nonce_prefix"]),
            &h(&v["plaintext"]),
        );
        assert_eq!(sealed, h(&v["sealed"]), "{}", v["name"]);
        assert_eq!(
            id,
            v["blob_id"].as_str().unwrap().parse::<BlobId>().unwrap()
        );
        assert_eq!(
            open_all(&key, asset, &h(&v["sealed"])).unwrap(),
            h(&v["plaintext"])
        );
    }
}

#[test]
fn wrap_vectors() {
    let master = MasterKey::new(7, [0x5a; 32]);
    let data_key = DataKey::from_bytes([0x0f; 32]);
    let nonce = [0xc0; 12];
    let wrapped = wrap_with_nonce(&master, "asset-1", &data_key, nonce);
    let generated = json!({
        "format": "slmedia wrapped data key v1 (docs/sealed-blob.md)",
        "vectors": [{
            "master_key_id": 7,
            "master_key": master.to_hex(),
            "asset_id": "asset-1",
            "data_key": hex::encode(data_key.as_bytes()),
            "nonce": hex::encode(nonce),
            "wrapped": hex::encode(&wrapped),
        }],
    });
    let stored = check_or_write("wrap-v1.json", generated);
    let v = &stored["vectors"][0];
    let master = MasterKey::from_hex(7, v["master_key"].as_str().unwrap()).unwrap();
    let key = master.unwrap("asset-1", &h(&v["wrapped"])).unwrap();
    assert_eq!(key.as_bytes().to_vec(), h(&v["data_key"]));
}

#[test]
fn token_and_nodeauth_vectors() {
    let signer = TokenSigner::from_seed_hex(&"11".repeat(32)).unwrap();
    let claims = PlaybackClaims {
        asset_id: "asset-1".into(),
        blob: BlobId::of(b"sealed bytes"),
        wrapped_key: vec![0xab; 64],
        expires_at: 1_700_000_000,
        grant: Some("grant-1".into()),
        epoch: 0,
    };
    let token = signer.sign(&claims);
    let auth = sign_request(
        b"node secret",
        "manager",
        "PUT",
        "/internal/v1/blobs/x",
        1_700_000_000,
        &"00".repeat(32),
    );
    let generated = json!({
        "format": "slmedia playback token v1 and node request signature v1",
        "token": {
            "seed": signer.seed_hex(),
            "public": signer.public_hex(),
            "claims": claims,
            "token": token,
        },
        "nodeauth": {
            "secret": hex::encode(b"node secret"),
            "key_id": "manager",
            "method": "PUT",
            "path_and_query": "/internal/v1/blobs/x",
            "unix_time": 1_700_000_000,
            "content_sha256": "00".repeat(32),
            "header": auth,
        },
    });
    let stored = check_or_write("token-nodeauth-v1.json", generated);
    let t = &stored["token"];
    let verifier = TokenVerifier::from_public_hex(t["public"].as_str().unwrap()).unwrap();
    let got = verifier
        .verify(t["token"].as_str().unwrap(), 1_699_999_999)
        .unwrap();
    assert_eq!(
        got,
        serde_json::from_value::<PlaybackClaims>(t["claims"].clone()).unwrap()
    );
}

#[test]
fn token_v2_and_answer_vectors() {
    let signer = TokenSigner::from_seed_hex(&"22".repeat(32)).unwrap();
    // A grant-less token minted in a movie's third price epoch (v2), and
    // the MAC a node answer carries (shared::nodeauth).
    let claims = PlaybackClaims {
        asset_id: "asset-2".into(),
        blob: BlobId::of(b"sealed bytes"),
        wrapped_key: vec![0xcd; 64],
        expires_at: 1_700_000_000,
        grant: None,
        epoch: 3,
    };
    let token = signer.sign(&claims);
    let path = "/internal/v1/nodes/utah/paid-epochs";
    let body = br#"{"node":"utah","paid":[["asset-2",3]]}"#;
    let request_auth = sign_request(
        b"node secret",
        "utah",
        "GET",
        path,
        1_700_000_000,
        &"00".repeat(32),
    );
    let generated = json!({
        "format": "slmedia playback token v2 and node answer MAC v1",
        "token": {
            "seed": signer.seed_hex(),
            "public": signer.public_hex(),
            "claims": claims,
            "token": token,
        },
        "answer_mac": {
            "secret": hex::encode(b"node secret"),
            "request_auth": request_auth,
            "status": 200,
            "body": String::from_utf8(body.to_vec()).unwrap(),
            "mac": shared::answer_mac(b"node secret", &request_auth, 200, body),
        },
    });
    let stored = check_or_write("token-v2-answers.json", generated);
    let verifier =
        TokenVerifier::from_public_hex(stored["token"]["public"].as_str().unwrap()).unwrap();
    let got = verifier
        .verify(stored["token"]["token"].as_str().unwrap(), 1_699_999_999)
        .unwrap();
    assert_eq!(got.epoch, 3);
    let a = &stored["answer_mac"];
    assert!(shared::verify_answer_mac(
        &hex::decode(a["secret"].as_str().unwrap()).unwrap(),
        a["request_auth"].as_str().unwrap(),
        a["status"].as_u64().unwrap() as u16,
        a["body"].as_str().unwrap().as_bytes(),
        a["mac"].as_str().unwrap()
    ));
}

/// This crate's folder, as `cargo test` gives it when the test runs. The
/// compile-time value is only a fallback: a build folder shared by two
/// checkouts may hand one of them a binary compiled in the other.
fn crate_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}
