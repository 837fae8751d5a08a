//! Resumable uploads (tus 1.0, `/api/v1/tus/`) against the real manager:
//! every answer the protocol names for bad input, an upload that lives
//! through a restart and ends in a published movie, expiry, termination,
//! the account's limits, and conformance with an independent client
//! (`tuspy`, installed by scripts/install-tuspy; its absence fails).

use std::{path::Path, time::Duration};

use base64::Engine;
use e2e::{error_code, make_webm, status_json, Cluster, ClusterOpts};
use reqwest::{Method, RequestBuilder, Response};
use sha2::Digest;

const OFFSET_STREAM: &str = "application/offset+octet-stream";

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(v)
}

fn tus(c: &Cluster, method: Method, path: &str, token: &str) -> RequestBuilder {
    c.client()
        .request(method, format!("{}{path}", c.manager.url))
        .header("Tus-Resumable", "1.0.0")
        .bearer_auth(token)
}

fn header<'a>(r: &'a Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Creates an upload of `len` bytes; returns its path.
async fn create(c: &Cluster, token: &str, len: u64, name: &str) -> String {
    let r = tus(c, Method::POST, "/api/v1/tus/", token)
        .header("Upload-Length", len.to_string())
        .header(
            "Upload-Metadata",
            format!(
                "filename {},title {}",
                b64(name.as_bytes()),
                b64(b"Resumed")
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    assert!(!header(&r, "upload-expires").is_empty());
    let loc = header(&r, "location").to_string();
    assert!(loc.starts_with("/api/v1/tus/"), "{loc}");
    loc
}

async fn patch(c: &Cluster, token: &str, loc: &str, offset: u64, body: Vec<u8>) -> Response {
    tus(c, Method::PATCH, loc, token)
        .header("Content-Type", OFFSET_STREAM)
        .header("Upload-Offset", offset.to_string())
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn offset_of(c: &Cluster, token: &str, loc: &str) -> (u16, Option<u64>) {
    let r = tus(c, Method::HEAD, loc, token).send().await.unwrap();
    (
        r.status().as_u16(),
        header(&r, "upload-offset").parse().ok(),
    )
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_uploads_answer_as_the_protocol_says_and_survive_a_restart() {
    let mut o = ClusterOpts::new(&["utah", "toronto"]);
    o.manager_extra = "[quotas]\nconcurrent_uploads = 2\n".into();
    let mut c = Cluster::start_with(&o);
    let movie = c.dir.path().join("garden.webm");
    make_webm(&movie);
    let bytes = std::fs::read(&movie).unwrap();
    let len = bytes.len() as u64;
    let op = c.api_token.clone();
    let tus_dir = c.manager_data.join("staging").join("tus");

    // What the server speaks, without logging in.
    let r = c
        .client()
        .request(Method::OPTIONS, format!("{}/api/v1/tus/", c.manager.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "tus-version"), "1.0.0");
    for ext in [
        "creation",
        "creation-with-upload",
        "expiration",
        "checksum",
        "termination",
    ] {
        assert!(
            header(&r, "tus-extension").split(',').any(|e| e == ext),
            "{ext} missing from {}",
            header(&r, "tus-extension")
        );
    }
    assert_eq!(header(&r, "tus-checksum-algorithm"), "sha1,sha256");
    assert_eq!(header(&r, "tus-max-size"), (2u64 << 30).to_string());

    // No version, no account, too large.
    let r = c
        .client()
        .post(format!("{}/api/v1/tus/", c.manager.url))
        .bearer_auth(&op)
        .header("Upload-Length", "10")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    assert_eq!(header(&r, "tus-version"), "1.0.0");
    let r = c
        .client()
        .post(format!("{}/api/v1/tus/", c.manager.url))
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", "10")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = tus(&c, Method::POST, "/api/v1/tus/", &op)
        .header("Upload-Length", (3u64 << 30).to_string())
        .send()
        .await
        .unwrap();
    let (s, v) = status_json(r).await;
    assert_eq!((s, error_code(&v)), (413, Some("too_large")), "{v}");
    let r = tus(&c, Method::POST, "/api/v1/tus/", &op)
        .header("Upload-Length", "10")
        .header("Upload-Metadata", "filename ***")
        .send()
        .await
        .unwrap();
    let (s, v) = status_json(r).await;
    assert_eq!(
        (s, error_code(&v)),
        (400, Some("metadata_malformed")),
        "{v}"
    );
    // Nothing was left behind by the refusals.
    assert!(files_in(&tus_dir).is_empty(), "{:?}", files_in(&tus_dir));

    let loc = create(&c, &op, len, "garden.webm").await;
    let first = bytes[..100_000].to_vec();

    // Wrong content type, wrong offset, bad checksums, a chunk past the end.
    let r = tus(&c, Method::PATCH, &loc, &op)
        .header("Content-Type", "application/octet-stream")
        .header("Upload-Offset", "0")
        .body(first.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = patch(&c, &op, &loc, 5, first.clone()).await;
    let (s, v) = status_json(r).await;
    assert_eq!((s, error_code(&v)), (409, Some("offset_mismatch")), "{v}");
    let wrong = b64(&sha2::Sha256::digest(b"other bytes"));
    let r = tus(&c, Method::PATCH, &loc, &op)
        .header("Content-Type", OFFSET_STREAM)
        .header("Upload-Offset", "0")
        .header("Upload-Checksum", format!("sha256 {wrong}"))
        .body(first.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 460);
    assert_eq!(offset_of(&c, &op, &loc).await, (200, Some(0)), "discarded");
    let r = tus(&c, Method::PATCH, &loc, &op)
        .header("Content-Type", OFFSET_STREAM)
        .header("Upload-Offset", "0")
        .header("Upload-Checksum", "md5 kAFQmDzST7DWlj99KOF/cg==")
        .body(first.clone())
        .send()
        .await
        .unwrap();
    let (s, v) = status_json(r).await;
    assert_eq!(
        (s, error_code(&v)),
        (400, Some("checksum_algorithm_unsupported")),
        "{v}"
    );
    let sha1 = sha1::Sha1::digest(&first);
    let r = tus(&c, Method::PATCH, &loc, &op)
        .header("Content-Type", OFFSET_STREAM)
        .header("Upload-Offset", "0")
        .header("Upload-Checksum", format!("sha1 {}", b64(&sha1)))
        .body(first.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "upload-offset"), "100000");
    let mut past = bytes[100_000..].to_vec();
    past.extend_from_slice(&[0u8; 10]);
    let r = patch(&c, &op, &loc, 100_000, past).await;
    let (s, v) = status_json(r).await;
    assert_eq!(
        (s, error_code(&v)),
        (413, Some("past_upload_length")),
        "{v}"
    );
    assert_eq!(offset_of(&c, &op, &loc).await, (200, Some(100_000)));

    // Someone else's upload, an unknown one, a forged id: all 404.
    let other = c.buyer("other@example.com", 10);
    assert_eq!(offset_of(&c, &other, &loc).await.0, 404);
    let r = patch(&c, &other, &loc, 100_000, bytes[100_000..].to_vec()).await;
    assert_eq!(r.status(), 404);
    let r = tus(&c, Method::DELETE, &loc, &other).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        offset_of(&c, &op, "/api/v1/tus/0123456789abcdef0123456789abcdef")
            .await
            .0,
        404
    );
    assert_eq!(
        offset_of(&c, &op, "/api/v1/tus/..%2F..%2Fmanager.db")
            .await
            .0,
        404
    );

    // The account's limits hold unfinished uploads: two at once here.
    let a = create(&c, &other, 1000, "a.mp4").await;
    let b = create(&c, &other, 1000, "b.mp4").await;
    // The upload page lists one's own unfinished uploads, no one else's.
    let page = c
        .client()
        .get(format!("{}/upload", c.manager.url))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("data-name=\"a.mp4\"") && page.contains("data-name=\"b.mp4\""),
        "{page}"
    );
    assert!(
        !page.contains("garden.webm"),
        "the operator's upload on another's page"
    );
    let r = tus(&c, Method::POST, "/api/v1/tus/", &other)
        .header("Upload-Length", "1000")
        .header("Upload-Metadata", format!("filename {}", b64(b"c.mp4")))
        .send()
        .await
        .unwrap();
    let (s, v) = status_json(r).await;
    assert_eq!((s, error_code(&v)), (429, Some("too_many_uploads")), "{v}");
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(bytes.clone()).file_name("garden.webm"),
    );
    let r = c
        .client()
        .post(format!("{}/api/v1/uploads", c.manager.url))
        .bearer_auth(&other)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (s, v) = status_json(r).await;
    assert_eq!((s, error_code(&v)), (429, Some("too_many_uploads")), "{v}");

    // Termination removes the bytes and frees the place.
    let r = patch(&c, &other, &a, 0, vec![7u8; 500]).await;
    assert_eq!(r.status(), 204);
    let r = tus(&c, Method::DELETE, &a, &other).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(offset_of(&c, &other, &a).await.0, 404);
    let a_id = a.rsplit('/').next().unwrap();
    assert!(
        !files_in(&tus_dir).iter().any(|f| f.starts_with(a_id)),
        "{:?}",
        files_in(&tus_dir)
    );

    // Expiry: b's last byte is made 25 hours old (expiry counts from it,
    // and it is read from the file's time at start), so after a restart it
    // answers 410 and its bytes are gone. The operator's upload survives
    // the same restart with its offset (less an unchecked chunk).
    let b_id = b.rsplit('/').next().unwrap().to_string();
    let r = patch(&c, &other, &b, 0, vec![1u8; 10]).await;
    assert_eq!(r.status(), 204);
    c.manager.stop();
    let old = std::time::SystemTime::now() - Duration::from_secs(25 * 3600);
    let f = std::fs::File::options()
        .write(true)
        .open(tus_dir.join(format!("{b_id}.bin")))
        .unwrap();
    f.set_modified(old).unwrap();
    drop(f);
    let rec = tus_dir.join(format!("{b_id}.json"));
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    v["created"] = (v["created"].as_i64().unwrap() - 25 * 3600).into();
    std::fs::write(&rec, serde_json::to_vec(&v).unwrap()).unwrap();
    // And the operator's upload as a kill -9 would leave it in the middle
    // of a checksummed chunk from byte 50,000: never checked, so cut off.
    let loc_rec = tus_dir.join(format!("{}.json", loc.rsplit('/').next().unwrap()));
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&loc_rec).unwrap()).unwrap();
    v["verifying_from"] = 50_000.into();
    std::fs::write(&loc_rec, serde_json::to_vec(&v).unwrap()).unwrap();
    c.restart_manager();
    let (s, _) = offset_of(&c, &other, &b).await;
    assert_eq!(s, 410, "an expired upload is gone");
    let r = patch(&c, &other, &b, 10, vec![1u8; 10]).await;
    assert_eq!(r.status(), 410);
    // Its bytes go at the first sweep, which runs as the manager starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tus_dir.join(format!("{b_id}.bin")).exists() {
        assert!(std::time::Instant::now() < deadline, "expired bytes kept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(offset_of(&c, &op, &loc).await, (200, Some(50_000)));

    // The rest, and the movie publishes; the answer names it.
    let r = patch(&c, &op, &loc, 50_000, bytes[50_000..].to_vec()).await;
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "upload-offset"), len.to_string());
    let asset = header(&r, "asset-id").to_string();
    assert_eq!(asset.len(), 32, "{:?}", r.headers());
    let v = c.wait_terminal(&asset, Duration::from_secs(180)).await;
    assert_eq!(v["state"], "published", "{v}");
    assert_eq!(v["title"], "Resumed");
    // A client that lost that answer learns it from a HEAD.
    let r = tus(&c, Method::HEAD, &loc, &op).send().await.unwrap();
    assert_eq!(header(&r, "upload-offset"), len.to_string());
    assert_eq!(header(&r, "asset-id"), asset);

    // The last byte goes through the same door as the form: a file that is
    // not a movie is refused with the form's code, and nothing is kept.
    let junk = c.dir.path().join("junk.mp4");
    std::fs::write(&junk, vec![0x42u8; 64 * 1024]).unwrap();
    let (s, form_answer) = c.upload(&junk, "junk").await.unwrap();
    assert_eq!(s, 422, "{form_answer}");
    let r = tus(&c, Method::POST, "/api/v1/tus/", &op)
        .header("Upload-Length", (64 * 1024).to_string())
        .header("Upload-Metadata", format!("filename {}", b64(b"junk.mp4")))
        .header("Content-Type", OFFSET_STREAM)
        .body(vec![0x42u8; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert!(header(&r, "location").is_empty(), "refused, so not created");
    let (s, v) = status_json(r).await;
    assert_eq!((s, error_code(&v)), (422, error_code(&form_answer)), "{v}");
    // Left: the finished upload's record and the expired one's (410 for a
    // while yet); nothing of the refused one.
    let mut left = vec![
        format!("{}.json", loc.rsplit('/').next().unwrap()),
        format!("{b_id}.json"),
    ];
    left.sort();
    assert_eq!(files_in(&tus_dir), left);

    // Creation with upload: one request, the whole movie.
    let r = tus(&c, Method::POST, "/api/v1/tus/", &op)
        .header("Upload-Length", len.to_string())
        .header(
            "Upload-Metadata",
            format!("filename {}", b64(b"second.webm")),
        )
        .header("Content-Type", OFFSET_STREAM)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "upload-offset"), len.to_string());
    let second = header(&r, "asset-id").to_string();
    let v = c.wait_terminal(&second, Duration::from_secs(180)).await;
    assert_eq!(v["state"], "published", "{v}");
    assert_eq!(v["title"], "second");

    // A kill -9 after the movie was recorded but before the upload's record
    // said so: at the next start the upload is found finished as that
    // movie (asked again, it does not become a second one).
    let movies_before = c.my_assets().await.len();
    c.manager.kill9();
    let rec_path = tus_dir.join(format!("{}.json", loc.rsplit('/').next().unwrap()));
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec_path).unwrap()).unwrap();
    rec["ingesting"] = rec["asset"].clone();
    rec["asset"] = serde_json::Value::Null;
    rec["closed_at"] = serde_json::Value::Null;
    std::fs::write(&rec_path, serde_json::to_vec(&rec).unwrap()).unwrap();
    c.restart_manager();
    let r = tus(&c, Method::HEAD, &loc, &op).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "asset-id"), asset);
    assert_eq!(c.my_assets().await.len(), movies_before);
}

/// The independent client (tests/tus/conformance.py): tuspy uploads in
/// 64 KiB chunks with a sha1 per chunk, stops halfway, and a second tuspy
/// uploader resumes from the URL; then, on an upload tuspy created, every
/// answer the protocol names for a bad request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuspy_uploads_and_resumes() {
    let c = Cluster::start(&["utah", "toronto"]);
    let movie = c.dir.path().join("tuspy.webm");
    make_webm(&movie);
    let python = e2e::tool_path("tuspy/bin/python");
    assert!(
        python.exists(),
        "{} missing: scripts/install-tuspy installs it",
        python.display()
    );
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tus/conformance.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(format!("{}/api/v1/tus/", c.manager.url))
        .arg(&c.api_token)
        .arg(c.buyer("peer@example.com", 10))
        .arg(&movie)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "tuspy: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let asset = stdout
        .lines()
        .find_map(|l| l.strip_prefix("asset "))
        .unwrap_or_else(|| panic!("no asset in tuspy's output: {stdout}"))
        .trim()
        .to_string();
    let v = c.wait_terminal(&asset, Duration::from_secs(180)).await;
    assert_eq!(v["state"], "published", "{v}");
    assert_eq!(v["title"], "Conformance");
}
