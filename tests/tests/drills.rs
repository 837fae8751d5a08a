//! Mirror drills (issue 5): break the storage for real, with real processes
//! and real files, and watch the cluster notice and repair it.
//!
//! - zeroes written over 64 KiB in the middle of node A's blob are found
//!   within one scrub pass and repaired from node B, whose copy is left
//!   untouched, while playback never returns a wrong byte;
//! - node A's whole storage folder deleted while it runs is refilled and the
//!   movie stays `published`;
//! - with three nodes and `min_replicas = 2`, node A stopped during an
//!   upload: published on B and C, and A gets its copy when it returns;
//! - both copies corrupted: the movie becomes `damaged`, the alert shows in
//!   `/metrics` and the log, and its media URL answers `movie_damaged`;
//! - node A killed with SIGKILL in the middle of a push: no partial blob is
//!   ever visible or served, and the push completes after the restart.
//!
//! The drills run one at a time (each starts a cluster and transcodes on a
//! machine that may have two cores for everything) and poll for conditions
//! with generous limits rather than sleeping fixed times.

use std::{
    io::{Seek, SeekFrom, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use e2e::{files_under, make_webm, Cluster, ClusterOpts};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Limit for waits that involve the pipeline or a repair; the machine is
/// shared and slow, so these are far above what a healthy run takes.
const LIMIT: Duration = Duration::from_secs(180);

fn drill_opts(nodes: &[&str]) -> ClusterOpts {
    let mut o = ClusterOpts::new(nodes);
    // These drills break the nodes' files by hand (tests/tests/garage.rs
    // breaks a bucket's objects).
    o.garage_node = false;
    o.fixed_ports = true;
    o.reconcile_interval_secs = 2;
    o
}

fn sha_hex(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("read blob")))
}

/// The one blob file a node holds (panics unless there is exactly one).
fn only_blob(storage: &Path) -> PathBuf {
    let files = files_under(&storage.join("blobs"));
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

/// Every file in `blobs/` hashes to its own name: nothing partial or
/// corrupt is ever in the serving path.
fn assert_blobs_all_whole(storage: &Path) {
    for f in files_under(&storage.join("blobs")) {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(
            sha_hex(&f),
            name,
            "a blob that is not whole: {}",
            f.display()
        );
    }
}

fn zero_64k_in_the_middle(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    assert!(len > 256 * 1024, "blob too small for the drill: {len}");
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(len / 2 - 32 * 1024)).unwrap();
    f.write_all(&[0u8; 64 * 1024]).unwrap();
    f.sync_all().unwrap();
}

/// Uploads a fresh 10-second movie and waits until it is published.
async fn publish_movie(cluster: &Cluster, title: &str) -> (String, serde_json::Value) {
    let input = cluster.dir.path().join(format!("{title}.webm"));
    make_webm(&input);
    let (status, body) = cluster.upload(&input, title).await.unwrap();
    assert_eq!(status, 202, "{body}");
    let id = body["asset_id"].as_str().unwrap().to_string();
    let asset = cluster.wait_terminal(&id, LIMIT).await;
    assert_eq!(asset["state"], "published", "{asset}");
    (id, asset)
}

/// GET following redirects: the body, or why there is none. A body cut
/// off part-way (a node that found a bad segment) is an error, not bytes.
async fn fetch(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let r = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let body = r.bytes().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(body.to_vec())
}

fn replica<'a>(asset: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    asset["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == node)
        .unwrap_or_else(|| panic!("no replica on {node}: {asset}"))
}

fn forced(media_url: &str, node: &str) -> String {
    format!("{media_url}?node={node}")
}

/// [`fetch`] from a node just made verified again: the redirector's view of
/// which nodes hold a copy lags by up to `PLAYABLE_TTL` (1 s), so a
/// `no_mirror_available` right after a repair is retried for a few seconds.
async fn fetch_from_repaired(client: &reqwest::Client, media_url: &str, node: &str) -> Vec<u8> {
    let started = Instant::now();
    loop {
        match fetch(client, &forced(media_url, node)).await {
            Ok(body) => return body,
            Err(e)
                if e.contains("no_mirror_available")
                    && started.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{node}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroed_bytes_are_found_by_one_scrub_pass_and_repaired_from_the_other_node() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut opts = drill_opts(&["utah", "toronto"]);
    opts.scrub_rate_mb_per_sec = 4.0;
    opts.scrub_interval_secs = 1;
    // Reconciliation slow on purpose: the node's own report must start the
    // repair, not the backstop.
    opts.reconcile_interval_secs = 3600;
    let cluster = Cluster::start_with(&opts);
    let (id, asset) = publish_movie(&cluster, "zeroes").await;
    let media_url = asset["media_url"].as_str().unwrap().to_string();
    let client = cluster.client();
    let reference = fetch(&client, &forced(&media_url, "toronto"))
        .await
        .unwrap();
    assert!(!reference.is_empty());

    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let a_blob = only_blob(&a.storage);
    let b_blob = only_blob(&b.storage);
    let blob_name = a_blob.file_name().unwrap().to_string_lossy().to_string();
    let b_before = std::fs::metadata(&b_blob).unwrap();

    // A viewer on the untouched mirror keeps playing through it all, in
    // full. (Nothing reads A's copy but the scrubber until it is repaired:
    // this drill is about the scrub finding it.)
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let player = {
        let (client, url, reference, stop) = (
            client.clone(),
            media_url.clone(),
            reference.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut plays = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let b = fetch(&client, &forced(&url, "toronto")).await;
                assert!(
                    b.as_deref().ok() == Some(&reference[..]),
                    "mirror B failed: {:?}",
                    b.err()
                );
                plays += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            plays
        })
    };

    let before = cluster.node_inventory(0).await;
    let passes_before = before["scrub"]["passes_completed"].as_u64().unwrap();
    zero_64k_in_the_middle(&a_blob);
    let started = Instant::now();

    // Detected within one full pass: the pass under way may already be
    // past the blob (it ends without finding it, and the count may also
    // have moved between the reading above and the zeroing), so the
    // next one finds it.
    let passes_at_detection = loop {
        let inv = cluster.node_inventory(0).await;
        if inv["quarantined"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["blob"] == blob_name.as_str())
        {
            break inv["scrub"]["passes_completed"].as_u64().unwrap();
        }
        assert!(started.elapsed() < LIMIT, "never detected: {inv}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        passes_at_detection <= passes_before + 2,
        "took more than one pass: {passes_before} -> {passes_at_detection}"
    );

    // Repaired from B: A holds a whole copy again and the catalog says so.
    loop {
        let v = cluster.asset(&id).await;
        assert_eq!(v["state"], "published", "{v}");
        let whole = std::fs::metadata(&a_blob).is_ok() && sha_hex(&a_blob) == blob_name;
        if whole && replica(&v, "utah")["state"] == "verified" {
            break;
        }
        assert!(
            started.elapsed() < LIMIT,
            "never repaired: {v}\nmanager log:\n{}",
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "repair took {:?}",
        started.elapsed()
    );
    let log = cluster.manager.log_text();
    assert!(log.contains("node reports a lost copy"), "{log}");
    assert!(log.contains("from=toronto"), "repaired from B: {log}");

    // B's copy untouched: same file, same bytes, same modification time.
    let b_after = std::fs::metadata(&b_blob).unwrap();
    assert_eq!(sha_hex(&b_blob), blob_name);
    assert_eq!(b_after.modified().unwrap(), b_before.modified().unwrap());
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&b_after),
        std::os::unix::fs::MetadataExt::ino(&b_before)
    );

    // A serves the right bytes again, and so does whichever node the
    // redirector picks.
    assert!(fetch_from_repaired(&client, &media_url, "utah").await == reference);
    for _ in 0..4 {
        assert!(fetch(&client, &media_url).await.unwrap() == reference);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let plays = player.await.expect("the player saw only right bytes");
    assert!(plays > 0);

    let metrics = cluster.metrics(&a.proc.url).await;
    assert!(
        metrics.contains("viewnode_scrub_mismatches_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("viewnode_blobs{state=\"quarantined\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("viewnode_blobs{state=\"good\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("viewnode_scrub_pass_progress_ratio"),
        "{metrics}"
    );
    // The API shows each replica's last verification.
    let v = cluster.asset(&id).await;
    for node in ["utah", "toronto"] {
        assert!(
            replica(&v, node)["verified_at"].as_i64().unwrap() > 0,
            "{v}"
        );
    }
}

/// A viewer sent to a node whose storage vanished gets a `404` with a code,
/// and the node tells the manager at once: the copy is refilled long before
/// reconciliation (here an hour away) would have noticed, and viewers are
/// no longer sent there meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_finding_a_copy_missing_makes_the_node_report_it_at_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut opts = drill_opts(&["utah", "toronto"]);
    opts.reconcile_interval_secs = 3600;
    let cluster = Cluster::start_with(&opts);
    let (id, asset) = publish_movie(&cluster, "vanished").await;
    let media_url = asset["media_url"].as_str().unwrap().to_string();
    let client = cluster.client();
    let reference = fetch(&client, &media_url).await.unwrap();
    std::fs::remove_dir_all(&cluster.nodes[0].storage).unwrap();

    let err = fetch(&client, &forced(&media_url, "utah"))
        .await
        .unwrap_err();
    assert!(
        err.starts_with("404") && err.contains("blob_missing"),
        "{err}"
    );
    let started = Instant::now();
    let mut lost_seen: Option<Instant> = None;
    loop {
        let v = cluster.asset(&id).await;
        let r = replica(&v, "utah");
        if r["state"] == "verified"
            && files_under(&cluster.nodes[0].storage.join("blobs")).len() == 1
        {
            break;
        }
        // Meanwhile the redirector sends viewers to the intact mirror (once
        // its 1 s view of the replicas has caught up).
        if r["state"] != "verified" {
            let since = *lost_seen.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(1500) {
                assert!(fetch(&client, &media_url).await.unwrap() == reference);
            }
        }
        assert!(
            started.elapsed() < LIMIT,
            "never refilled without reconciliation: {v}\nmanager log:\n{}",
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(cluster
        .manager
        .log_text()
        .contains("node reports a lost copy"));
    assert!(fetch_from_repaired(&client, &media_url, "utah").await == reference);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_folder_deleted_under_a_running_node_is_refilled() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start_with(&drill_opts(&["utah", "toronto"]));
    let (id, asset) = publish_movie(&cluster, "wiped").await;
    let media_url = asset["media_url"].as_str().unwrap().to_string();
    let client = cluster.client();
    let reference = fetch(&client, &media_url).await.unwrap();
    let a = &cluster.nodes[0];
    let blob_name = only_blob(&a.storage)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();

    std::fs::remove_dir_all(&a.storage).unwrap();
    let started = Instant::now();
    loop {
        let v = cluster.asset(&id).await;
        assert_eq!(v["state"], "published", "stays published: {v}");
        let r = replica(&v, "utah");
        let held = files_under(&a.storage.join("blobs"));
        let noticed = cluster
            .manager
            .log_text()
            .contains("missing from the node's inventory");
        if noticed && r["state"] == "verified" && held.len() == 1 {
            assert_eq!(sha_hex(&held[0]), blob_name);
            break;
        }
        // The movie plays throughout from the intact mirror.
        assert!(
            fetch(&client, &forced(&media_url, "toronto"))
                .await
                .unwrap()
                == reference
        );
        assert!(
            started.elapsed() < LIMIT,
            "never refilled: {v}\nmanager log:\n{}",
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(fetch_from_repaired(&client, &media_url, "utah").await == reference);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_during_an_upload_gets_its_copy_when_it_returns() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut opts = drill_opts(&["utah", "toronto", "paris"]);
    opts.min_replicas = 2;
    let mut cluster = Cluster::start_with(&opts);
    assert!(cluster.nodes[0].proc.stop(), "utah stops cleanly");

    let (id, asset) = publish_movie(&cluster, "three").await;
    assert_eq!(replica(&asset, "toronto")["state"], "verified", "{asset}");
    assert_eq!(replica(&asset, "paris")["state"], "verified", "{asset}");
    assert_ne!(replica(&asset, "utah")["state"], "verified", "{asset}");
    assert!(files_under(&cluster.nodes[0].storage.join("blobs")).is_empty());
    // Still playable from B and C.
    let media_url = asset["media_url"].as_str().unwrap().to_string();
    let client = cluster.client();
    let reference = fetch(&client, &media_url).await.unwrap();

    cluster.restart_node(0);
    let started = Instant::now();
    loop {
        let v = cluster.asset(&id).await;
        if replica(&v, "utah")["state"] == "verified" {
            break;
        }
        assert!(
            started.elapsed() < LIMIT,
            "utah never got its copy: {v}\nmanager log:\n{}",
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let held = only_blob(&cluster.nodes[0].storage);
    assert_blobs_all_whole(&cluster.nodes[0].storage);
    assert!(
        fetch_from_repaired(&client, &media_url, "utah").await == reference,
        "{}",
        held.display()
    );
    // Every copy is verified now, so the outbox copy is gone.
    assert!(files_under(&cluster.manager_data.join("outbox")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_copies_corrupt_make_the_movie_damaged_and_never_served() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut opts = drill_opts(&["utah", "toronto"]);
    opts.scrub_rate_mb_per_sec = 8.0;
    opts.scrub_interval_secs = 1;
    let cluster = Cluster::start_with(&opts);
    let (id, asset) = publish_movie(&cluster, "doomed").await;
    let media_url = asset["media_url"].as_str().unwrap().to_string();
    for node in &cluster.nodes {
        zero_64k_in_the_middle(&only_blob(&node.storage));
    }
    let started = Instant::now();
    let damaged = loop {
        let v = cluster.asset(&id).await;
        if v["state"] == "damaged" {
            break v;
        }
        assert!(
            started.elapsed() < LIMIT,
            "never damaged: {v}\nmanager log:\n{}",
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(damaged["error"]["code"], "movie_damaged", "{damaged}");
    assert!(damaged["media_url"].is_null(), "{damaged}");
    for node in ["utah", "toronto"] {
        assert_eq!(replica(&damaged, node)["state"], "repairing", "{damaged}");
    }

    // The media URL answers an error with a code, never bytes.
    let client = cluster.client();
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let r = client
            .request(method.clone(), &media_url)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{method}");
        if method == reqwest::Method::GET {
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "movie_damaged", "{v}");
        }
    }
    // Neither node holds anything it would serve.
    for node in &cluster.nodes {
        assert!(files_under(&node.storage.join("blobs")).is_empty());
        assert_eq!(files_under(&node.storage.join("quarantine")).len(), 1);
    }
    // Only a configured node, signing with its own secret, may report.
    let path = "/internal/v1/nodes/utah/events";
    let body = format!(
        r#"{{"events":[{{"kind":"quarantined","blob":"{}","reason":"forged"}}]}}"#,
        "ab".repeat(32)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let sha = shared::content_sha256_hex(body.as_bytes());
    let toronto_secret = hex::decode(&cluster.nodes[1].secret).unwrap();
    for (key_id, secret, code) in [
        ("utah", toronto_secret.as_slice(), "auth_bad_signature"),
        ("toronto", toronto_secret.as_slice(), "auth_unknown_key"),
        (
            "intruder",
            b"0123456789abcdef".as_slice(),
            "auth_unknown_key",
        ),
    ] {
        let auth = shared::sign_request(secret, key_id, "POST", path, now, &sha);
        let r = client
            .post(format!("{}{path}", cluster.manager.url))
            .header(shared::AUTH_HEADER, auth)
            .header(shared::DATE_HEADER, now.to_string())
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{key_id}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{key_id}: {v}");
    }

    // The alert: an error-level log line and a gauge.
    let log = cluster.manager.log_text();
    assert!(
        log.contains("ERROR") && log.contains("ALERT: every copy of this movie"),
        "{log}"
    );
    let deadline = Instant::now() + LIMIT;
    loop {
        let m = cluster.metrics(&cluster.manager.url).await;
        if m.contains("manager_assets_damaged 1") {
            break;
        }
        assert!(Instant::now() < deadline, "no damaged gauge: {m}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A TCP proxy to `upstream` that lets at most `bytes_per_sec` through
/// towards it, so a push to that node takes seconds instead of
/// milliseconds and can be interrupted. Returns its port.
async fn throttled_proxy(upstream: SocketAddr, bytes_per_sec: u64) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        let pause = n as f64 / bytes_per_sec as f64;
                        tokio::time::sleep(Duration::from_secs_f64(pause)).await;
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_push_never_shows_a_partial_blob_and_the_push_completes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start_with(&drill_opts(&["utah", "toronto"]));
    // Route the manager's calls to utah through a slow link.
    let a_url = cluster.nodes[0].proc.url.clone();
    let a_addr: SocketAddr = a_url.trim_start_matches("http://").parse().unwrap();
    let proxy = throttled_proxy(a_addr, 100 * 1024).await;
    cluster.manager.stop();
    std::fs::write(
        &cluster.manager_config,
        std::fs::read_to_string(&cluster.manager_config)
            .unwrap()
            .replace(&a_url, &format!("http://127.0.0.1:{proxy}")),
    )
    .unwrap();
    cluster.restart_manager();

    let input = cluster.dir.path().join("push.webm");
    make_webm(&input);
    let (status, body) = cluster.upload(&input, "push").await.unwrap();
    assert_eq!(status, 202, "{body}");
    let id = body["asset_id"].as_str().unwrap().to_string();

    // Wait until utah is part-way through receiving it, then pull the plug.
    let storage = cluster.nodes[0].storage.clone();
    let started = Instant::now();
    loop {
        let receiving = files_under(&storage.join("tmp")).into_iter().any(|f| {
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            name.len() > 64
                && name[..64].bytes().all(|b| b.is_ascii_hexdigit())
                && std::fs::metadata(&f)
                    .map(|m| m.len() > 64 * 1024)
                    .unwrap_or(false)
        });
        if receiving {
            break;
        }
        let v = cluster.asset(&id).await;
        assert!(
            replica_state(&v, "utah") != Some("verified"),
            "the push finished before it could be interrupted: {v}"
        );
        assert!(
            started.elapsed() < LIMIT,
            "utah never started receiving: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.nodes[0].proc.kill9();

    // Nothing partial in the serving path, and nothing served from utah.
    assert!(files_under(&storage.join("blobs")).is_empty());
    let v = cluster.asset(&id).await;
    assert_ne!(replica_state(&v, "utah"), Some("verified"), "{v}");
    assert_ne!(v["state"], "published", "min_replicas is 2: {v}");

    cluster.restart_node(0);
    // The interrupted temp file is gone at start; blobs/ holds only whole
    // blobs from then on (checked at every poll).
    assert!(
        files_under(&storage.join("tmp")).is_empty(),
        "{:?}",
        files_under(&storage.join("tmp"))
    );
    let asset = loop {
        assert_blobs_all_whole(&storage);
        let v = cluster.asset(&id).await;
        if v["state"] == "published" && replica_state(&v, "utah") == Some("verified") {
            break v;
        }
        assert!(
            started.elapsed() < LIMIT * 2,
            "the push never completed: {v}\nmanager log:\n{}",
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    only_blob(&storage);
    assert_blobs_all_whole(&storage);
    let media_url = asset["media_url"].as_str().unwrap();
    let client = cluster.client();
    let from_a = fetch(&client, &forced(media_url, "utah")).await.unwrap();
    let from_b = fetch(&client, &forced(media_url, "toronto")).await.unwrap();
    assert!(from_a == from_b, "utah and toronto serve different bytes");
}

fn replica_state<'a>(asset: &'a serde_json::Value, node: &str) -> Option<&'a str> {
    asset["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["node"] == node)?["state"]
        .as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreferenced_blob_is_reported_then_deleted_only_after_the_grace_period() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut opts = drill_opts(&["utah", "toronto"]);
    opts.reconcile_interval_secs = 1;
    opts.unreferenced_grace_secs = 6;
    let cluster = Cluster::start_with(&opts);
    // A blob no movie references, pushed as the manager would push it.
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let blob = hex::encode(Sha256::digest(&bytes));
    let path = format!("/internal/v1/blobs/{blob}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let secret = hex::decode(&cluster.nodes[0].secret).unwrap();
    let auth = shared::sign_request(&secret, "manager", "PUT", &path, now, &blob);
    let client = cluster.client();
    let r = client
        .put(format!("{}{path}", cluster.nodes[0].proc.url))
        .header(shared::AUTH_HEADER, auth)
        .header(shared::DATE_HEADER, now.to_string())
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let put_at = Instant::now();

    // Fetching it is for the manager only; signed, it streams the bytes.
    let r = client
        .get(format!("{}{path}", cluster.nodes[0].proc.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = cluster.node_call(0, reqwest::Method::GET, &path).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap()[..] == bytes[..]);

    let file = cluster.nodes[0]
        .storage
        .join("blobs")
        .join(&blob[..2])
        .join(&blob);
    let mut reported = false;
    while file.exists() {
        reported |= cluster
            .metrics(&cluster.manager.url)
            .await
            .contains("manager_unreferenced_blobs{node=\"utah\"} 1");
        assert!(put_at.elapsed() < LIMIT, "never deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The manager keeps times in whole seconds: the grace may end up to a
    // second before six have passed on this clock, never earlier.
    assert!(
        put_at.elapsed() >= Duration::from_secs(5),
        "deleted before the grace period: {:?}",
        put_at.elapsed()
    );
    assert!(
        reported,
        "the unreferenced blob was never reported in /metrics"
    );
    // The node removes the file before it answers; the manager logs the
    // deletion once it has the answer: give it that moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut log = cluster.manager.log_text();
    while !log.contains("unreferenced blob deleted") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        log = cluster.manager.log_text();
    }
    assert!(log.contains("blob referenced by no movie"), "{log}");
    assert!(log.contains("unreferenced blob deleted"), "{log}");
    let inv = cluster.node_inventory(0).await;
    assert_eq!(inv["counts"]["good"], 0, "{inv}");
}
