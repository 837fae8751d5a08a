//! A full disk under the manager loses nothing: uploads are refused with
//! `507 insufficient_storage` at the free-space reserve (announced length
//! or mid-stream), purchases and playback go on, a database that cannot
//! grow refuses with `507` and changes nothing, and once space is back
//! everything resumes with the books exact and no half-written file left.
//! A node whose disk is full refuses a push with `507` and keeps nothing;
//! the copy is pushed again once there is room. (A node's journal on a
//! full disk is in `trust.rs`.)

use std::{io::Write, path::Path, time::Duration};

use e2e::{make_webm, metric_sum as metric, status_json as json, Cluster, ClusterOpts, Tmpfs};

const LIMIT: Duration = Duration::from_secs(120);
const RESERVE_MB: u64 = 24;

fn free_bytes(dir: &Path) -> u64 {
    shared::runtime::disk_space(dir).unwrap().free_bytes
}

/// Writes zeros into `path` until the disk keeps only `keep` bytes free
/// (or is full, with `keep` 0).
fn fill(path: &Path, dir: &Path, keep: u64) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let block = vec![0u8; 1 << 16];
    loop {
        let free = free_bytes(dir);
        if free <= keep {
            break;
        }
        let n = (free - keep).min(block.len() as u64) as usize;
        if f.write_all(&block[..n]).and_then(|_| f.sync_all()).is_err() {
            break;
        }
    }
}

fn leftovers(staging: &Path) -> Vec<String> {
    std::fs::read_dir(staging)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".upload"))
        .collect()
}

/// Announces an upload of `len` bytes and sends none of them: the answer
/// must come from the announced length alone. (A client that sends its
/// body regardless may find the connection closed under it and never read
/// the answer, so this speaks HTTP over a plain socket.)
async fn announce_upload(cluster: &Cluster, len: u64) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = reqwest::Url::parse(&cluster.manager.url).unwrap();
    let mut sock = tokio::net::TcpStream::connect((url.host_str().unwrap(), url.port().unwrap()))
        .await
        .unwrap();
    let head = format!(
        "POST /api/v1/uploads HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\n\
         content-type: multipart/form-data; boundary=XyZ\r\ncontent-length: {len}\r\n\r\n",
        url.authority(),
        cluster.api_token
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no answer: {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or_default())
}

/// The same without a length: a chunked body of `mib` MiB.
async fn upload_chunked(cluster: &Cluster, mib: usize) -> Option<(u16, serde_json::Value)> {
    let chunks = futures::stream::iter(
        (0..mib).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; 1 << 20]))),
    );
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(chunks)).file_name("big.webm"),
    );
    // A server that answers before the body ends may close the connection
    // under the client's feet: then only the counters tell.
    let r = cluster
        .client()
        .post(format!("{}/api/v1/uploads", cluster.manager.url))
        .bearer_auth(&cluster.api_token)
        .multipart(form)
        .send()
        .await
        .ok()?;
    Some(json(r).await)
}

fn ledger_sum(acct: &serde_json::Value) -> i64 {
    acct["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["amount"].as_i64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_manager_disk_refuses_uploads_with_507_and_loses_nothing() {
    let mut o = ClusterOpts::new(&["utah"]);
    o.min_replicas = 1;
    // The node comes back on its port after its disk is moved.
    o.fixed_ports = true;
    let mut cluster = Cluster::start_with(&o);
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);
    let asset = cluster.publish(&input, "Paid", LIMIT).await;
    cluster.set_price(&asset, 1).await;
    let buyer = cluster.buyer("buyer@example.com", 100);

    let (_, acct) = cluster.get_as(&buyer, "/api/v1/account").await;
    let start = acct["balance"].as_i64().unwrap();
    assert_eq!(ledger_sum(&acct), start, "{acct}");

    // The manager's data folder moves onto a small disk of its own.
    let data = cluster.manager_data.clone();
    assert!(cluster.manager.stop());
    let _mount = Tmpfs::move_onto(&data, &cluster.dir.path().join("manager-data-aside"), "96m");
    let cfg = std::fs::read_to_string(&cluster.manager_config).unwrap();
    std::fs::write(
        &cluster.manager_config,
        format!("disk_reserve_mb = {RESERVE_MB}\n{cfg}"),
    )
    .unwrap();
    cluster.restart_manager();
    let m = cluster.manager.url.clone();
    let staging = data.join("staging");
    let reserve = RESERVE_MB << 20;

    // 8 MiB above the reserve: a 16 MiB upload is refused before its first
    // byte is written, from its announced length.
    let filler = data.join("filler");
    fill(&filler, &data, reserve + (8 << 20));
    let (s, v) = announce_upload(&cluster, 16 << 20).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (507, Some("insufficient_storage")),
        "{v}"
    );
    // Without a length, it is refused once it reaches the reserve.
    let before = metric(
        &cluster.metrics(&m).await,
        "manager_uploads_total{result=\"no_space\"}",
    );
    if let Some((s, v)) = upload_chunked(&cluster, 32).await {
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (507, Some("insufficient_storage")),
            "{v}"
        );
    }
    let after = metric(
        &cluster.metrics(&m).await,
        "manager_uploads_total{result=\"no_space\"}",
    );
    assert!(after > before, "the chunked upload was refused for space");
    assert!(leftovers(&staging).is_empty(), "{:?}", leftovers(&staging));

    // Buying and playing go on at the reserve.
    let mut charged = 0i64;
    for i in 0..3 {
        let (s, v) = cluster.purchase(&buyer, &asset, &format!("r-{i}")).await;
        assert_eq!(s, 200, "{v}");
        charged += 1;
        if i == 0 {
            let to = cluster
                .redirect_location(v["media_url"].as_str().unwrap())
                .await;
            let r = cluster
                .client()
                .get(to)
                .header("range", "bytes=0-1023")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 206);
        }
    }

    // The disk entirely full: a purchase either fits in what the database
    // already holds or is refused with 507, never half-made.
    let filler2 = data.join("filler2");
    fill(&filler2, &data, 0);
    let mut refused = Vec::new();
    for i in 0..5 {
        let (s, v) = cluster.purchase(&buyer, &asset, &format!("full-{i}")).await;
        match s {
            200 => charged += 1,
            507 => {
                assert_eq!(v["error"]["code"], "insufficient_storage", "{v}");
                refused.push(i);
            }
            _ => panic!(
                "a purchase on a full disk answered {s}: {v}\n{}",
                cluster.manager.log_text()
            ),
        }
    }
    let (s, v) = announce_upload(&cluster, 1 << 20).await;
    assert_eq!(s, 507, "{v}");
    eprintln!("on a full disk: purchases {refused:?} of 0..5 refused with 507");
    if e2e::on_postgres() {
        // The catalog lives on the database server's disk, which has room:
        // the manager's full data disk must not refuse what it does not hold.
        assert!(
            refused.is_empty(),
            "purchases refused with the database's disk free"
        );
    } else {
        assert!(
            !refused.is_empty(),
            "a database with no room left took five purchases"
        );
    }

    // Space again: everything resumes, the books exact.
    std::fs::remove_file(&filler2).unwrap();
    std::fs::remove_file(&filler).unwrap();
    let (s, acct) = cluster.get_as(&buyer, "/api/v1/account").await;
    assert_eq!(s, 200, "{acct}");
    assert_eq!(acct["balance"].as_i64(), Some(start - charged), "{acct}");
    assert_eq!(ledger_sum(&acct), start - charged, "{acct}");
    let (s, v) = cluster.purchase(&buyer, &asset, "after").await;
    assert_eq!(s, 200, "{v}");
    charged += 1;
    // Every request sent again is charged once in all: the ones that went
    // through are answered from their idempotency key, the refused ones
    // are charged now.
    for i in 0..5 {
        let (s, v) = cluster.purchase(&buyer, &asset, &format!("full-{i}")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            v["charged_now"].as_bool(),
            Some(refused.contains(&i)),
            "{v}"
        );
    }
    charged += refused.len() as i64;
    let (_, acct) = cluster.get_as(&buyer, "/api/v1/account").await;
    assert_eq!(acct["balance"].as_i64(), Some(start - charged), "{acct}");
    assert_eq!(ledger_sum(&acct), start - charged, "{acct}");
    cluster.publish(&input, "After", LIMIT).await;
    assert!(leftovers(&staging).is_empty(), "{:?}", leftovers(&staging));
    let log = cluster.manager.log_text();
    assert!(log.contains("insufficient_storage"), "logged with its code");
    assert!(!log.contains("panicked"), "{log}");

    // The node's disk full: a push is refused with its code, nothing half-
    // written is kept, the movie waits, and it is pushed again once there
    // is room.
    let storage = cluster.nodes[0].storage.clone();
    assert!(cluster.nodes[0].proc.stop());
    let _node_mount = Tmpfs::move_onto(
        &storage,
        &cluster.dir.path().join("node-storage-aside"),
        "48m",
    );
    cluster.restart_node(0);
    let node_filler = storage.join("filler");
    fill(&node_filler, &storage, 0);
    let (s, v) = cluster.upload(&input, "Pushed").await.unwrap();
    assert_eq!(s, 202, "{v}");
    let pushed = v["asset_id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let v = cluster.asset(&pushed).await;
        let err = v["replicas"][0]["last_error"].as_str().unwrap_or("");
        if err.contains("insufficient_storage") {
            assert_ne!(v["state"], "published", "{v}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{v}\n{}",
            cluster.nodes[0].proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let tmp_left: Vec<_> = std::fs::read_dir(storage.join("tmp")).unwrap().collect();
    assert!(tmp_left.is_empty(), "{tmp_left:?}");
    assert!(cluster.nodes[0]
        .proc
        .log_text()
        .contains("insufficient_storage"));
    std::fs::remove_file(&node_filler).unwrap();
    let v = cluster.wait_terminal(&pushed, LIMIT).await;
    assert_eq!(v["state"], "published", "{v}");
    cluster.manager.stop();
    cluster.nodes[0].proc.stop();
}
