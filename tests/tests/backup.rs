//! Disaster-recovery drills with real processes (issue 8, docs/backup.md):
//! the manager's machine is lost and rebuilt from the view nodes with only
//! their addresses and the recovery key; a damaged newest backup is skipped
//! for the previous verified one; a backup taken while uploads and other
//! writes go on is consistent.
//!
//! The harness writes node and manager configurations itself, so the
//! recovery key reaches them as environment overrides
//! (`MANAGER_BACKUP__RECOVERY_KEY`, `VIEWNODE_BACKUP_READ_KEY`), set once per
//! test binary before any process starts. The restore command itself runs
//! with those removed: it gets the key on standard input, as an operator
//! would type it.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::Duration,
};

use e2e::{bin, make_webm, Cluster};

/// (recovery key, node `backup_read_key`), from `manager backup keygen`.
fn keys() -> &'static (String, String) {
    static KEYS: OnceLock<(String, String)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let out = Command::new(bin("manager"))
            .args(["backup", "keygen"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let recovery = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let err = String::from_utf8(out.stderr).unwrap();
        let read = err
            .lines()
            .find_map(|l| l.trim().strip_prefix("backup_read_key = \""))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap_or_else(|| panic!("no backup_read_key line in: {err}"))
            .to_string();
        assert!(recovery.starts_with("slmrk1-"), "{recovery}");
        assert_eq!(read.len(), 64);
        // Every test calls this before it starts anything, so no other
        // thread of this binary reads the environment meanwhile.
        std::env::set_var("MANAGER_BACKUP__RECOVERY_KEY", &recovery);
        std::env::set_var("VIEWNODE_BACKUP_READ_KEY", &read);
        (recovery, read)
    })
}

fn manager_cmd(cluster: &Cluster) -> Command {
    let mut c = Command::new(bin("manager"));
    c.arg("--config").arg(&cluster.manager_config);
    c
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `manager backup now`; returns the backup id after checking that both
/// nodes stored a sealed copy.
async fn backup_now(cluster: &Cluster) -> String {
    let mut cmd = manager_cmd(cluster);
    cmd.args(["backup", "now"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("NODE utah stored"), "{all}");
    assert!(stdout.contains("NODE toronto stored"), "{all}");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("BACKUP "))
        .unwrap_or_else(|| panic!("no BACKUP line: {all}"))
        .to_string()
}

fn created_of(id: &str) -> &str {
    id.split('-').next().unwrap()
}

/// The sealed copy of backup `id` on a node.
fn node_copy(storage: &Path, id: &str) -> PathBuf {
    let prefix = format!("{}-", created_of(id));
    std::fs::read_dir(storage.join("backups"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        })
        .unwrap_or_else(|| panic!("no copy of {id} in {}", storage.display()))
}

/// What the operator does on the new machine: node addresses and the
/// recovery key, nothing from the old machine.
fn restore(cluster: &Cluster, recovery: &str) -> Output {
    let mut child = Command::new(bin("manager"))
        .args(["backup", "restore"])
        .args(["--node", &cluster.nodes[0].proc.url])
        .args(["--node", &cluster.nodes[1].proc.url])
        .arg("--data-dir")
        .arg(&cluster.manager_data)
        .arg("--write-config")
        .arg(&cluster.manager_config)
        .env_remove("MANAGER_BACKUP__RECOVERY_KEY")
        .env_remove("VIEWNODE_BACKUP_READ_KEY")
        .env_remove("SLMEDIA_RECOVERY_KEY")
        .env_remove("MANAGER_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{recovery}").unwrap();
    child.wait_with_output().unwrap()
}

/// The machine is gone: the process dies, its folder and configuration too.
fn lose_the_manager(cluster: &mut Cluster) {
    cluster.manager.kill9();
    std::fs::remove_dir_all(&cluster.manager_data).unwrap();
    std::fs::remove_file(&cluster.manager_config).unwrap();
}

/// Follows the movie's media URL as a viewer does and reads a byte range
/// from the node it is sent to.
async fn play_range(cluster: &Cluster, asset_id: &str) -> Vec<u8> {
    let asset = cluster.asset(asset_id).await;
    let media_url = asset["media_url"]
        .as_str()
        .unwrap_or_else(|| panic!("no media_url: {asset}"));
    let location = cluster.redirect_location(media_url).await;
    let resp = cluster
        .client()
        .get(&location)
        .header("range", "bytes=1000-70999")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206, "{location}");
    let body = resp.bytes().await.unwrap().to_vec();
    assert_eq!(body.len(), 70_000);
    body
}

async fn upload_published(cluster: &Cluster, input: &Path, title: &str) -> String {
    let (status, body) = cluster.upload(input, title).await.unwrap();
    assert_eq!(status, 202, "{body}");
    let id = body["asset_id"].as_str().unwrap().to_string();
    let a = cluster.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(a["state"], "published", "{a}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_is_rebuilt_from_the_nodes_and_a_damaged_backup_is_skipped() {
    let (recovery, _) = keys();
    let mut cluster = Cluster::start(&["utah", "toronto"]);
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);

    let first = upload_published(&cluster, &input, "First").await;
    let b1 = backup_now(&cluster).await;
    let second = upload_published(&cluster, &input, "Second").await;
    let b2 = backup_now(&cluster).await;
    assert!(created_of(&b2) > created_of(&b1), "{b1} {b2}");
    let before = [
        (first.clone(), play_range(&cluster, &first).await),
        (second.clone(), play_range(&cluster, &second).await),
    ];
    // Both nodes hold both sealed backups, apart from the movie blobs, and
    // a copy is ciphertext: no SQLite header in it.
    for node in &cluster.nodes {
        for id in [&b1, &b2] {
            let bytes = std::fs::read(node_copy(&node.storage, id)).unwrap();
            assert!(!bytes.windows(15).any(|w| w == b"SQLite format 3"));
        }
    }

    lose_the_manager(&mut cluster);
    let out = restore(&cluster, recovery);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("RESTORED {b2} ")),
        "the newest backup: {all}"
    );
    assert!(!all.contains(recovery.as_str()), "the key is never echoed");
    let written = std::fs::read_to_string(&cluster.manager_config).unwrap();
    assert!(written.contains("master_key") && written.contains("[[nodes]]"));
    cluster.restart_manager();
    // The API token in the restored database still works, and every movie
    // plays the same bytes as before.
    assert_eq!(cluster.my_assets().await.len(), 2);
    for (id, bytes) in &before {
        assert_eq!(&play_range(&cluster, id).await, bytes, "movie {id}");
    }
    let health: serde_json::Value = cluster
        .client()
        .get(format!("{}/healthz", cluster.manager.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["backup"]["newest"], b2.as_str(), "{health}");
    assert_eq!(health["backup"]["stale"], false, "{health}");

    // A disk zeroes 4 KiB inside the newest backup on every node.
    for node in &cluster.nodes {
        let p = node_copy(&node.storage, &b2);
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes.len() / 2;
        bytes[at..at + 4096].fill(0);
        std::fs::write(&p, bytes).unwrap();
    }
    lose_the_manager(&mut cluster);
    let out = restore(&cluster, recovery);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for node in ["utah", "toronto"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("SKIPPED {}-", created_of(&b2)))
                    && l.contains(&format!(" {node} hash_mismatch "))),
            "the damaged copy on {node} is reported: {all}"
        );
    }
    assert!(stdout.contains(&format!("RESTORED {b1} ")), "{all}");
    cluster.restart_manager();
    assert_eq!(play_range(&cluster, &first).await, before[0].1);
    // The second movie came after that backup: this manager never knew it.
    let gone = cluster
        .client()
        .get(format!("{}/api/v1/assets/{second}", cluster.manager.url))
        .bearer_auth(&cluster.api_token)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_during_uploads_and_writes_is_consistent() {
    keys();
    let cluster = Cluster::start(&["utah", "toronto"]);
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);

    // Writers: uploads through the API (assets, replicas, job state), and
    // API tokens created by another process, all while backups are taken.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let token_writer = {
        let stop = stop.clone();
        let config = cluster.manager_config.clone();
        let email = cluster.operator_email.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new(bin("manager"))
                    .arg("--config")
                    .arg(&config)
                    .args(["create-token", "--email", &email, "--label", "drill"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", text(&out));
                n += 1;
            }
            n
        })
    };
    let uploads = async {
        let mut ids = Vec::new();
        for i in 0..3 {
            let (status, body) = cluster.upload(&input, &format!("Busy {i}")).await.unwrap();
            assert_eq!(status, 202, "{body}");
            ids.push(body["asset_id"].as_str().unwrap().to_string());
        }
        for id in &ids {
            cluster.wait_terminal(id, Duration::from_secs(300)).await;
        }
    };
    let backups = async {
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(backup_now(&cluster).await);
        }
        ids
    };
    let ((), ids) = tokio::join!(uploads, backups);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let tokens_made = token_writer.join().unwrap();
    assert!(tokens_made > 0);

    // Each backup, checked by the sqlite3 tool rather than by our own code:
    // intact, and every table holds exactly the rows its manifest recorded.
    let mut token_counts = std::collections::BTreeSet::new();
    for id in &ids {
        let dir = cluster.manager_data.join("backups");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{id}.json"))).unwrap())
                .unwrap();
        let db = dir.join(format!("{id}.db"));
        let sql = |q: &str| {
            let out = Command::new("sqlite3")
                .arg("-readonly")
                .arg(&db)
                .arg(q)
                .output()
                .expect("sqlite3 is installed by scripts/setup");
            assert!(out.status.success(), "{}", text(&out));
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        assert_eq!(sql("PRAGMA integrity_check;"), "ok", "{id}");
        let tables = manifest["tables"].as_object().unwrap();
        for t in ["users", "api_tokens", "assets", "replicas", "sessions"] {
            assert!(tables.contains_key(t), "{t} missing from {manifest}");
        }
        for (table, count) in tables {
            let n: i64 = sql(&format!("SELECT count(*) FROM \"{table}\";"))
                .parse()
                .unwrap();
            assert_eq!(Some(n), count.as_i64(), "{id}: table {table}");
        }
        token_counts.insert(tables["api_tokens"].as_i64().unwrap());
    }
    assert!(
        token_counts.len() >= 2,
        "writes went on between the backups: {token_counts:?}"
    );

    // And the sealed copies on both nodes open and verify.
    let out = manager_cmd(&cluster)
        .args(["backup", "verify", "--remote"])
        .output()
        .unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for id in &ids {
        assert!(all.contains(&format!("OK {id} local")), "{all}");
        assert_eq!(
            all.matches(&format!("(backup {id})")).count(),
            2,
            "one verified copy per node: {all}"
        );
    }
}

#[tokio::test]
async fn init_cluster_hands_out_a_recovery_key_the_nodes_can_check() {
    keys();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("manager"))
        .args(["init-cluster", "--dir"])
        .arg(dir.path())
        .args(["--node", "utah:40.76:-111.89:127.0.0.1:0"])
        .args(["--node", "toronto:43.65:-79.38:127.0.0.1:0"])
        .env_remove("MANAGER_BACKUP__RECOVERY_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let recovery = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(recovery.starts_with("slmrk1-"), "{recovery}");
    let manager = std::fs::read_to_string(dir.path().join("manager.toml")).unwrap();
    assert!(manager.contains(&format!("recovery_key = \"{recovery}\"")));
    // The nodes get the read credential derived from it, never the key.
    let node = std::fs::read_to_string(dir.path().join("viewnode-utah.toml")).unwrap();
    assert!(!node.contains(&recovery[7..]));
    assert!(node.contains("backup_read_key = \""));
    // A typo in the key is caught before any node is asked anything.
    let mut typo = recovery.clone().into_bytes();
    typo[30] = if typo[30] == b'0' { b'1' } else { b'0' };
    let mut child = Command::new(bin("manager"))
        .args(["backup", "restore", "--node", "http://127.0.0.1:9"])
        .arg("--data-dir")
        .arg(dir.path().join("restored"))
        .arg("--write-config")
        .arg(dir.path().join("restored.toml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&typo).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum"), "{err}");
    assert!(!dir.path().join("restored.toml").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_database_is_refused_at_start_and_restored_in_place() {
    keys();
    let mut cluster = Cluster::start(&["utah", "toronto"]);
    let b = backup_now(&cluster).await;
    assert!(cluster.manager.stop());
    let db = cluster.manager_data.join("manager.db");
    // Everything into the main file first, as after a clean checkpoint; then
    // a disk zeroes one 4 KiB page of it.
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg("PRAGMA wal_checkpoint(TRUNCATE);")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 4 * 4096, "{}", bytes.len());
    bytes[3 * 4096..4 * 4096].fill(0);
    std::fs::write(&db, bytes).unwrap();

    let mut child = manager_cmd(&cluster)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the manager started on a damaged database");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("damaged") && err.contains("manager backup restore"),
        "says what is wrong and how to restore: {err}"
    );

    // The operator still has the configuration: restore over the damage.
    let out = manager_cmd(&cluster)
        .args(["backup", "restore"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "refuses without --replace");
    let out = manager_cmd(&cluster)
        .args(["backup", "restore", "--replace"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("RESTORED {b} ")));
    let kept_aside = std::fs::read_dir(&cluster.manager_data)
        .unwrap()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("manager.db.before-restore-")
        });
    assert!(kept_aside, "the damaged file is moved aside, never deleted");
    cluster.restart_manager();
    assert!(cluster.my_assets().await.is_empty(), "serves again");
}
