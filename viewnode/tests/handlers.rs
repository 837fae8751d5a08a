//! Handler tests through the real router (`oneshot`), no sockets: push
//! authentication and verification, ranged playback, token refusals, and the
//! quarantine of a copy whose bytes went bad on disk.

use std::sync::Arc;

use axum::{body::Body, http::Request};
use http_body_util::BodyExt;
use shared::{BlobId, DataKey, MasterKey, PlaybackClaims, TokenSigner};
use tower::ServiceExt;
use viewnode::{build_router, AppState, Config, SharedState};

struct Fixture {
    _dir: tempfile::TempDir,
    storage: std::path::PathBuf,
    state: SharedState,
    signer: TokenSigner,
    master: MasterKey,
    secret: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let master = MasterKey::generate(1);
    let signer = TokenSigner::generate();
    let secret = vec![7u8; 32];
    let storage = dir.path().join("store");
    let cfg = Config {
        name: "utah".into(),
        storage_dir: storage.clone(),
        master_key: master.to_hex().into(),
        token_public_key: signer.public_hex(),
        manager_secret: hex::encode(&secret).into(),
        ..Config::default()
    };
    let state = Arc::new(AppState::new(cfg).unwrap());
    Fixture {
        _dir: dir,
        storage,
        state,
        signer,
        master,
        secret,
    }
}

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

impl Fixture {
    fn push_request(&self, name: &BlobId, body: Vec<u8>, secret: &[u8]) -> Request<Body> {
        let path = format!("/internal/v1/blobs/{name}");
        let t = shared::runtime::unix_now();
        let auth = shared::sign_request(secret, "manager", "PUT", &path, t, &name.to_string());
        Request::put(path)
            .header(shared::AUTH_HEADER, auth)
            .header(shared::DATE_HEADER, t.to_string())
            .body(Body::from(body))
            .unwrap()
    }

    async fn call(&self, req: Request<Body>) -> (u16, axum::http::HeaderMap, Vec<u8>) {
        let resp = build_router(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        (status, headers, body)
    }

    /// Seals `plain` for `asset`, pushes it, and returns a valid play path.
    async fn publish(&self, asset: &str, plain: &[u8]) -> (BlobId, String) {
        let key = DataKey::generate();
        let (sealed, blob) = shared::seal_all(&key, asset, 1, 1024, plain);
        let (status, _, body) = self
            .call(self.push_request(&blob, sealed, &self.secret))
            .await;
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
        let token = self.signer.sign(&PlaybackClaims {
            asset_id: asset.into(),
            blob,
            wrapped_key: self.master.wrap(asset, &key),
            expires_at: shared::runtime::unix_now() + 600,
            grant: None,
            epoch: 0,
        });
        (blob, format!("/play/{token}/{asset}.mp4"))
    }
}

fn code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["error"]["code"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn pushes_must_be_signed_and_match_their_name() {
    let f = fixture();
    let data = b"pretend sealed bytes".to_vec();
    let name = BlobId::of(&data);

    let (status, _, body) = f
        .call(f.push_request(&name, data.clone(), b"not the shared secret, no"))
        .await;
    assert_eq!(status, 401);
    assert_eq!(code(&body), "auth_bad_signature");

    let unsigned = Request::put(format!("/internal/v1/blobs/{name}"))
        .body(Body::from(data.clone()))
        .unwrap();
    let (status, _, body) = f.call(unsigned).await;
    assert_eq!(status, 401);
    assert_eq!(code(&body), "auth_missing");

    let other = BlobId::of(b"different bytes");
    let (status, _, body) = f
        .call(f.push_request(&other, data.clone(), &f.secret))
        .await;
    assert_eq!(status, 422);
    assert_eq!(code(&body), "hash_mismatch");
    assert!(
        f.state.store.list().await.unwrap().is_empty(),
        "a mismatched push stores nothing"
    );

    let (status, _, _) = f.call(f.push_request(&name, data.clone(), &f.secret)).await;
    assert_eq!(status, 201);
    let (status, _, _) = f.call(f.push_request(&name, data, &f.secret)).await;
    assert_eq!(status, 200, "a second push of the same blob is idempotent");

    let t = shared::runtime::unix_now();
    let inv = Request::get("/internal/v1/blobs")
        .header(
            shared::AUTH_HEADER,
            shared::sign_request(
                &f.secret,
                "manager",
                "GET",
                "/internal/v1/blobs",
                t,
                EMPTY_SHA256,
            ),
        )
        .header(shared::DATE_HEADER, t.to_string())
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = f.call(inv).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["blobs"][0]["blob"], name.to_string());
}

#[tokio::test]
async fn playback_serves_exact_ranges() {
    let f = fixture();
    let plain: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let (blob, path) = f.publish("asset-a", &plain).await;

    let (status, h, body) = f
        .call(Request::get(&path).body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, plain);
    assert_eq!(h["content-type"], "video/mp4");
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["etag"], format!("\"{blob}\""));

    let head = Request::head(&path).body(Body::empty()).unwrap();
    let (status, h, body) = f.call(head).await;
    assert_eq!(status, 200);
    assert_eq!(h["content-length"], "10000");
    assert!(body.is_empty());

    for (range, want) in [
        ("bytes=0-0", 0..1),
        ("bytes=1000-3047", 1000..3048),
        ("bytes=-10", 9990..10000),
        ("bytes=9000-", 9000..10000),
    ] {
        let req = Request::get(&path)
            .header("range", range)
            .body(Body::empty())
            .unwrap();
        let (status, h, body) = f.call(req).await;
        assert_eq!(status, 206, "{range}");
        assert_eq!(
            h["content-range"],
            format!("bytes {}-{}/10000", want.start, want.end - 1)
        );
        assert_eq!(body, &plain[want], "{range}");
    }
    let req = Request::get(&path)
        .header("range", "bytes=10000-")
        .body(Body::empty())
        .unwrap();
    let (status, h, _) = f.call(req).await;
    assert_eq!(status, 416);
    assert_eq!(h["content-range"], "bytes */10000");
}

#[tokio::test]
async fn bad_and_expired_tokens_are_refused_with_codes() {
    let f = fixture();
    let (blob, path) = f.publish("asset-b", b"some movie bytes").await;

    let tampered = path.replacen("/play/", "/play/A", 1);
    let (status, _, body) = f
        .call(Request::get(&tampered).body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, 403);
    assert!(code(&body).starts_with("token_"));

    // A token signed by someone else's key.
    let stranger = TokenSigner::generate().sign(&PlaybackClaims {
        asset_id: "asset-b".into(),
        blob,
        wrapped_key: vec![0; 64],
        expires_at: shared::runtime::unix_now() + 600,
        grant: None,
        epoch: 0,
    });
    let (status, _, body) = f
        .call(
            Request::get(format!("/play/{stranger}/x.mp4"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(code(&body), "token_bad_signature");

    let expired = f.signer.sign(&PlaybackClaims {
        asset_id: "asset-b".into(),
        blob,
        wrapped_key: vec![0; 64],
        expires_at: shared::runtime::unix_now() - 1,
        grant: None,
        epoch: 0,
    });
    let (status, _, body) = f
        .call(
            Request::get(format!("/play/{expired}/x.mp4"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, 410);
    assert_eq!(code(&body), "token_expired");
}

#[tokio::test]
async fn a_copy_corrupted_on_disk_is_quarantined_not_served() {
    let f = fixture();
    let plain = vec![42u8; 5000];
    let (blob, path) = f.publish("asset-c", &plain).await;
    let hex = blob.to_string();
    let file = f.storage.join("blobs").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&file).unwrap();
    for b in &mut bytes[2000..2100] {
        *b = 0;
    }
    std::fs::write(&file, &bytes).unwrap();

    let resp = build_router(f.state.clone())
        .oneshot(Request::get(&path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "headers are sent before the bad segment is reached"
    );
    assert!(
        resp.into_body().collect().await.is_err(),
        "the body must fail, not deliver bad bytes"
    );
    assert_eq!(
        f.state.store.size(&blob).await.unwrap(),
        None,
        "quarantined"
    );
    assert_eq!(
        std::fs::read_dir(f.storage.join("quarantine"))
            .unwrap()
            .count(),
        1
    );

    let (status, _, body) = f
        .call(Request::get(&path).body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, 404);
    assert_eq!(code(&body), "blob_missing");
}

#[tokio::test]
async fn a_copy_is_re_verified_on_the_managers_signed_request() {
    let f = fixture();
    let (blob, _) = f.publish("asset-v", &vec![7u8; 5000]).await;
    let verify = |blob: &BlobId, secret: &[u8]| {
        let path = format!("/internal/v1/blobs/{blob}/verify");
        let t = shared::runtime::unix_now();
        let auth = shared::sign_request(secret, "manager", "POST", &path, t, EMPTY_SHA256);
        Request::post(path)
            .header(shared::AUTH_HEADER, auth)
            .header(shared::DATE_HEADER, t.to_string())
            .body(Body::empty())
            .unwrap()
    };
    let (status, _, body) = f.call(verify(&blob, &[9u8; 32])).await;
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    f.state.store.set_verified(&blob, Some(1));
    let (status, h, body) = f.call(verify(&blob, &f.secret)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        h.contains_key(shared::ANSWER_MAC_HEADER),
        "the answer is MACed"
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["state"], "verified");
    let at = v["verified_at"].as_i64().unwrap();
    assert!(at > 1, "the proof time moved to now: {v}");
    // Bytes gone bad on disk: quarantined, as a scrub would.
    let hex = blob.to_string();
    let file = f.storage.join("blobs").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let (status, _, body) = f.call(verify(&blob, &f.secret)).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["state"], "quarantined", "{v}");
    assert_eq!(f.state.store.size(&blob).await.unwrap(), None);
    let (status, _, body) = f.call(verify(&blob, &f.secret)).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["state"], "missing", "{v}");
    let (status, _, body) = f
        .call(
            Request::post("/internal/v1/blobs/not-a-blob/verify")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
}
