//! Disaster-recovery drills with real processes (issue 8, docs/backup.md):
//! the manager's machine is lost and rebuilt from the view nodes with only
//! their addresses and the recovery key, with balances, ledgers and
//! idempotency keys as they were at the backup; a damaged newest backup is
//! skipped for the previous verified one; a backup taken while uploads,
//! purchases and other writes go on is consistent (exact books, no purchase
//! half in it).
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

/// A restored catalog, read by tools that are not our code: an SQLite file
/// by `sqlite3`, a PostgreSQL database by `psql`.
enum Db {
    File(PathBuf),
    Pg(String),
}

impl std::fmt::Display for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Db::File(p) => write!(f, "{}", p.display()),
            Db::Pg(url) => f.write_str(url),
        }
    }
}

impl Db {
    /// A local backup copy: the SQLite file itself, or a dump restored by
    /// `pg_restore` into a new database.
    fn of_backup(file: &Path) -> Db {
        if !e2e::on_postgres() {
            return Db::File(file.to_path_buf());
        }
        let url = e2e::new_pg_database();
        let out = Command::new("pg_restore")
            .args(["--no-owner", "--exit-on-error", "--dbname", &url])
            .arg(file)
            .output()
            .expect("pg_restore (postgresql-client) runs");
        assert!(out.status.success(), "pg_restore: {}", text(&out));
        Db::Pg(url)
    }
}

/// What the operator does on the new machine: node addresses and the
/// recovery key, nothing from the old machine (on PostgreSQL, a new empty
/// database to restore into). Also the restored catalog.
fn restore(cluster: &Cluster, recovery: &str) -> (Output, Db) {
    let mut cmd = Command::new(bin("manager"));
    cmd.args(["backup", "restore"]);
    let db = if e2e::on_postgres() {
        let url = e2e::new_pg_database();
        cmd.args(["--database-url", &url]);
        Db::Pg(url)
    } else {
        Db::File(cluster.manager_data.join("manager.db"))
    };
    let mut child = cmd
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
    (child.wait_with_output().unwrap(), db)
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

/// The price of a view in these drills; the uploader's share is 70 %.
const PRICE: i64 = 600;
const SHARE: i64 = PRICE * 70 / 100;
const LIMIT: Duration = Duration::from_secs(240);

use e2e::status_json as json;

/// A purchase that must succeed. A manager that has just started has not
/// heard from its nodes yet and answers `503 no_mirror_available` (nothing
/// charged), so that answer is retried for a while.
async fn buy(cluster: &Cluster, token: &str, asset: &str, request: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let (s, v) = cluster.purchase(token, asset, request).await;
        if s == 200 {
            return v;
        }
        assert!(
            s == 503 && v["error"]["code"] == "no_mirror_available",
            "purchase {request}: {s} {v}"
        );
        assert!(std::time::Instant::now() < deadline, "no mirror: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `GET /api/v1/account` as the token's account, checked to be whole: the
/// ledger listed sums to the balance.
async fn account(cluster: &Cluster, token: &str) -> (i64, serde_json::Value) {
    let (s, v) = json(
        cluster
            .client()
            .get(format!("{}/api/v1/account", cluster.manager.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let balance = v["balance"].as_i64().unwrap();
    let ledger = v["ledger"].clone();
    let entries = ledger.as_array().unwrap();
    assert!(entries.len() < 200, "the API lists the whole ledger here");
    let sum: i64 = entries.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    assert_eq!(sum, balance, "the ledger sums to the balance: {v}");
    (balance, ledger)
}

async fn grant_status(cluster: &Cluster, token: &str, grant: &str) -> u16 {
    cluster
        .client()
        .get(format!("{}/api/v1/grants/{grant}", cluster.manager.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// One query by the `sqlite3` or `psql` command (not our code).
fn sql(db: &Db, q: &str) -> String {
    let path = match db {
        Db::Pg(url) => return e2e::psql(url, q),
        Db::File(p) => p,
    };
    let out = Command::new("sqlite3")
        .arg("-readonly")
        .arg(path)
        .arg(q)
        .output()
        .expect("sqlite3 is installed by scripts/setup");
    assert!(out.status.success(), "{q}: {}", text(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The books in a database file are exact: every account's cached balance
/// equals the sum of its ledger entries, and every purchase is whole: its
/// grant, the buyer's debit and the uploader's sale credit are all there,
/// or none of them is.
fn assert_books_exact(db: &Db) {
    let label = db.to_string();
    assert_eq!(
        sql(
            db,
            "SELECT count(*) FROM users u WHERE u.balance <> \
             (SELECT COALESCE(SUM(l.amount), 0) FROM ledger l WHERE l.account_id = u.id);"
        ),
        "0",
        "{label}: balances differ from their ledgers: {}",
        sql(
            db,
            "SELECT u.id, u.balance, (SELECT SUM(amount) FROM ledger WHERE account_id = u.id) \
             FROM users u;"
        )
    );
    assert_eq!(
        sql(
            db,
            "SELECT count(*) FROM play_grants g WHERE \
             (SELECT count(*) FROM ledger l WHERE l.idem_key = 'purchase:' || g.id \
                AND l.kind = 'purchase' AND l.account_id = g.buyer_id AND l.amount = -g.price) <> 1 \
             OR (g.seller_share > 0 AND (SELECT count(*) FROM ledger l WHERE l.idem_key = 'sale:' || g.id \
                AND l.kind = 'sale' AND l.account_id = g.seller_id AND l.amount = g.seller_share) <> 1);"
        ),
        "0",
        "{label}: a grant without its debit or its sale credit"
    );
    assert_eq!(
        sql(
            db,
            "SELECT count(*) FROM ledger l WHERE l.kind IN ('purchase', 'sale') \
             AND NOT EXISTS (SELECT 1 FROM play_grants g WHERE g.id = l.reference);"
        ),
        "0",
        "{label}: a purchase or sale entry without its grant"
    );
}

/// A buyer account made by the operator's commands, with `credits` and an
/// API token.
fn make_buyer(cluster: &Cluster, email: &str, credits: i64) -> String {
    cluster.manager_cli(&["create-user", "--email", email, "--generate-password"]);
    let key = format!("drill-{email}");
    let granted = cluster.manager_cli(&[
        "grant-credits",
        "--email",
        email,
        "--amount",
        &credits.to_string(),
        "--reason",
        "backup drill",
        "--by",
        "test",
        "--key",
        &key,
    ]);
    assert_eq!(granted, "1");
    cluster.manager_cli(&["create-token", "--email", email])
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
    let mut cluster = Cluster::start_local(&["utah", "toronto"]);
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);

    let first = upload_published(&cluster, &input, "First").await;
    // Money before the first backup: a second account buys two views of
    // the operator's movie, and the operator (its uploader) is credited the
    // share of each.
    cluster.set_price(&first, PRICE).await;
    let buyer = make_buyer(&cluster, "buyer@example.com", 5000);
    let op = cluster.api_token.clone();
    let mut grants = Vec::new();
    for request in ["pre-1", "pre-2"] {
        let v = buy(&cluster, &buyer, &first, request).await;
        assert_eq!(v["charged_now"], true, "{v}");
        grants.push(v["grant_id"].as_str().unwrap().to_string());
    }
    let at_b1 = [
        account(&cluster, &buyer).await,
        account(&cluster, &op).await,
    ];
    assert_eq!(at_b1[0].0, 5000 - 2 * PRICE);
    assert_eq!(at_b1[1].0, 2 * SHARE);
    let entries = |a: &(i64, serde_json::Value)| a.1.as_array().unwrap().len();
    assert_eq!(
        (entries(&at_b1[0]), entries(&at_b1[1])),
        (3, 2),
        "buyer: grant + 2 purchases; uploader: 2 sales"
    );
    let b1 = backup_now(&cluster).await;
    // A purchase only the second backup knows.
    let v = buy(&cluster, &buyer, &first, "between-backups").await;
    let between = v["grant_id"].as_str().unwrap().to_string();
    let second = upload_published(&cluster, &input, "Second").await;
    let at_b2 = [
        account(&cluster, &buyer).await,
        account(&cluster, &op).await,
    ];
    assert_eq!((at_b2[0].0, at_b2[1].0), (5000 - 3 * PRICE, 3 * SHARE));
    let b2 = backup_now(&cluster).await;
    // And one no backup knows.
    let v = buy(&cluster, &buyer, &first, "after-backups").await;
    let after = v["grant_id"].as_str().unwrap().to_string();
    assert_eq!(v["balance"], 5000 - 4 * PRICE, "{v}");
    assert!(created_of(&b2) > created_of(&b1), "{b1} {b2}");
    let before = [
        (first.clone(), play_range(&cluster, &first).await),
        (second.clone(), play_range(&cluster, &second).await),
    ];
    // Both nodes hold both sealed backups, apart from the movie blobs, and
    // a copy is ciphertext: no SQLite header (or pg_dump's) in it.
    for node in &cluster.nodes {
        for id in [&b1, &b2] {
            let bytes = std::fs::read(node_copy(&node.storage, id)).unwrap();
            assert!(!bytes.windows(15).any(|w| w == b"SQLite format 3"));
            assert!(!bytes.windows(5).any(|w| w == b"PGDMP"));
        }
    }

    lose_the_manager(&mut cluster);
    let (out, restored_db) = restore(&cluster, recovery);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("RESTORED {b2} ")),
        "the newest backup: {all}"
    );
    assert!(!all.contains(recovery.as_str()), "the key is never echoed");
    let written = std::fs::read_to_string(&cluster.manager_config).unwrap();
    assert!(written.contains("master_key") && written.contains("[[nodes]]"));
    // The restored catalog, read by the sqlite3 or psql tool: exact books,
    // the buyer's balance as at the backup.
    assert_books_exact(&restored_db);
    assert_eq!(
        sql(
            &restored_db,
            "SELECT balance FROM users WHERE email = 'buyer@example.com';"
        ),
        at_b2[0].0.to_string()
    );
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
    // Balances and ledgers are those at the backup: the purchase made after
    // it is gone, the ones before it are there.
    assert_eq!(account(&cluster, &buyer).await, at_b2[0]);
    assert_eq!(account(&cluster, &op).await, at_b2[1]);
    assert_eq!(grant_status(&cluster, &buyer, &after).await, 404);
    for g in grants.iter().chain([&between]) {
        assert_eq!(grant_status(&cluster, &buyer, g).await, 200, "grant {g}");
    }
    // Idempotency keys survive: replaying a request the backup knows
    // answers its grant and charges nothing; a new request is charged.
    let v = buy(&cluster, &buyer, &first, "pre-1").await;
    assert_eq!(
        (
            v["charged_now"].as_bool(),
            v["grant_id"].as_str(),
            v["balance"].as_i64()
        ),
        (Some(false), Some(grants[0].as_str()), Some(at_b2[0].0)),
        "{v}"
    );
    let v = buy(&cluster, &buyer, &first, "after-restore").await;
    assert_eq!(
        (v["charged_now"].as_bool(), v["balance"].as_i64()),
        (Some(true), Some(at_b2[0].0 - PRICE)),
        "{v}"
    );
    let (balance, ledger) = account(&cluster, &buyer).await;
    assert_eq!(
        (balance, ledger.as_array().unwrap().len()),
        (at_b2[0].0 - PRICE, entries(&at_b2[0]) + 1)
    );
    assert_eq!(account(&cluster, &op).await.0, at_b2[1].0 + SHARE);

    // A disk zeroes 4 KiB inside the newest backup on every node.
    for node in &cluster.nodes {
        let p = node_copy(&node.storage, &b2);
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes.len() / 2;
        bytes[at..at + 4096].fill(0);
        std::fs::write(&p, bytes).unwrap();
    }
    lose_the_manager(&mut cluster);
    let (out, restored_db) = restore(&cluster, recovery);
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
    assert_books_exact(&restored_db);
    cluster.restart_manager();
    assert_eq!(play_range(&cluster, &first).await, before[0].1);
    // The money is as at the previous verified backup: the purchase made
    // between the two backups, and everything since, never happened.
    assert_eq!(account(&cluster, &buyer).await, at_b1[0]);
    assert_eq!(account(&cluster, &op).await, at_b1[1]);
    assert_eq!(grant_status(&cluster, &buyer, &between).await, 404);
    assert_eq!(grant_status(&cluster, &buyer, &grants[1]).await, 200);
    let v = buy(&cluster, &buyer, &first, "pre-2").await;
    assert_eq!(
        (
            v["charged_now"].as_bool(),
            v["grant_id"].as_str(),
            v["balance"].as_i64()
        ),
        (Some(false), Some(grants[1].as_str()), Some(at_b1[0].0)),
        "{v}"
    );
    let v = buy(&cluster, &buyer, &first, "after-second-restore").await;
    assert_eq!(
        (v["charged_now"].as_bool(), v["balance"].as_i64()),
        (Some(true), Some(at_b1[0].0 - PRICE)),
        "{v}"
    );
    assert_eq!(account(&cluster, &op).await.0, at_b1[1].0 + SHARE);
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
    let cluster = Cluster::start_local(&["utah", "toronto"]);
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);
    // A movie for sale and two buyers with plenty of credits.
    const CHEAP: i64 = 10;
    const CHEAP_SHARE: i64 = CHEAP * 70 / 100;
    const FUNDS: i64 = 1_000_000_000;
    let sale = upload_published(&cluster, &input, "For sale").await;
    cluster.set_price(&sale, CHEAP).await;
    let buyers = [
        make_buyer(&cluster, "ann@example.com", FUNDS),
        make_buyer(&cluster, "bob@example.com", FUNDS),
    ];
    // The manager has heard from its nodes: purchases are possible.
    buy(&cluster, &buyers[0], &sale, "warm-up").await;

    // Writers: uploads through the API (assets, replicas, job state),
    // purchases (ledger, balances, grants) and API tokens created by another
    // process, all while backups are taken.
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
    let busy = std::sync::atomic::AtomicBool::new(true);
    let writers = async {
        let r = tokio::join!(uploads, backups);
        busy.store(false, std::sync::atomic::Ordering::Relaxed);
        r
    };
    // Each buyer buys a view every few milliseconds until the uploads and
    // backups are done; returns how many were charged.
    let purchases = |who: usize| {
        let (cluster, busy, token, sale) = (&cluster, &busy, &buyers[who], &sale);
        async move {
            let mut charged = 0i64;
            let mut n = 0;
            while busy.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let (s, v) = cluster
                    .purchase(token, sale, &format!("busy-{who}-{n}"))
                    .await;
                match s {
                    200 => {
                        assert_eq!(v["charged_now"], true, "{v}");
                        charged += 1;
                    }
                    // A health check that timed out on the loaded machine:
                    // refused with nothing charged, which is fine here.
                    503 if v["error"]["code"] == "no_mirror_available" => {}
                    _ => panic!("purchase busy-{who}-{n}: {s} {v}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            charged
        }
    };
    let (((), ids), ann, bob) = tokio::join!(writers, purchases(0), purchases(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let tokens_made = token_writer.join().unwrap();
    assert!(tokens_made > 0);
    assert!(ann > 0 && bob > 0, "purchases went on: {ann} {bob}");
    // The live books: each buyer paid exactly for what was charged, the
    // uploader got exactly the shares.
    assert_eq!(
        account(&cluster, &buyers[0]).await.0,
        FUNDS - (ann + 1) * CHEAP
    );
    assert_eq!(account(&cluster, &buyers[1]).await.0, FUNDS - bob * CHEAP);
    // (The uploader's ledger is longer than the API lists: balance only.)
    let (s, v) = json(
        cluster
            .client()
            .get(format!("{}/api/v1/account", cluster.manager.url))
            .bearer_auth(&cluster.api_token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, v["balance"].as_i64()),
        (200, Some((ann + 1 + bob) * CHEAP_SHARE)),
        "{v}"
    );

    // Each backup, checked by the sqlite3 tool (or restored by pg_restore and
    // read by psql) rather than by our own code:
    // intact, and every table holds exactly the rows its manifest recorded.
    let mut token_counts = std::collections::BTreeSet::new();
    let mut grant_counts = std::collections::BTreeSet::new();
    for id in &ids {
        let dir = cluster.manager_data.join("backups");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{id}.json"))).unwrap())
                .unwrap();
        let db = Db::of_backup(&dir.join(format!("{id}.db")));
        let sql = |q: &str| sql(&db, q);
        if let Db::File(_) = db {
            assert_eq!(sql("PRAGMA integrity_check;"), "ok", "{id}");
        }
        let tables = manifest["tables"].as_object().unwrap();
        for t in [
            "users",
            "api_tokens",
            "assets",
            "replicas",
            "sessions",
            "ledger",
            "play_grants",
        ] {
            assert!(tables.contains_key(t), "{t} missing from {manifest}");
        }
        for (table, count) in tables {
            let n: i64 = sql(&format!("SELECT count(*) FROM \"{table}\";"))
                .parse()
                .unwrap();
            assert_eq!(Some(n), count.as_i64(), "{id}: table {table}");
        }
        token_counts.insert(tables["api_tokens"].as_i64().unwrap());
        grant_counts.insert(tables["play_grants"].as_i64().unwrap());
        // The money in the copy is exact and no purchase is half in it.
        assert_books_exact(&db);
    }
    assert!(
        token_counts.len() >= 2,
        "writes went on between the backups: {token_counts:?}"
    );
    assert!(
        grant_counts.len() >= 2,
        "purchases went on between the backups: {grant_counts:?}"
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
    let mut cluster = Cluster::start_local(&["utah", "toronto"]);
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

/// The state of a grant (`active` or `refunded`) and its bytes served.
async fn grant_state(cluster: &Cluster, token: &str, grant: &str) -> (String, i64) {
    let (s, v) = cluster
        .get_as(token, &format!("/api/v1/grants/{grant}"))
        .await;
    assert_eq!(s, 200, "{v}");
    (
        v["state"].as_str().unwrap().to_string(),
        v["bytes_served"].as_i64().unwrap(),
    )
}

/// What a stalled refund drill needs to be understood from its output
/// alone: each node's watermark as the manager holds it, and the logs
/// without the test's own polling.
async fn refund_diagnostics(cluster: &Cluster) -> String {
    let metrics = cluster.metrics(&cluster.manager.url).await;
    let watermarks: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("manager_node_watermark_seconds"))
        .collect();
    let quiet = |log: String| {
        log.lines()
            .filter(|l| !l.contains("path=\"/api/v1/grants/") && !l.contains("/paid-epochs\""))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut out = format!(
        "watermarks: {watermarks:?}\n--- manager\n{}",
        quiet(cluster.manager.log_text())
    );
    for n in &cluster.nodes {
        out += &format!("\n--- {}\n{}", n.proc.name, quiet(n.proc.log_text()));
    }
    out
}

/// A view bought before the backup and watched after it: the restored books
/// say "nothing served", and the node will not send that event again (it
/// was delivered to the lost manager). It must never be refunded; refunds
/// of grants bought after the restore still happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_watched_between_the_backup_and_the_restore_is_never_refunded() {
    let (recovery, _) = keys();
    let mut o = e2e::ClusterOpts::new(&["utah", "toronto"]);
    o.garage_node = false;
    o.fixed_ports = true;
    o.node_extra = "journal_forward_secs = 1\njournal_flush_secs = 1\n".into();
    o.manager_extra =
        "[credits]\ngrant_window_secs = 60\nrefund_grace_secs = 30\nsweep_interval_secs = 1\n"
            .into();
    let mut cluster = Cluster::start_with(&o);
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);
    let movie = upload_published(&cluster, &input, "Gap").await;
    cluster.set_price(&movie, PRICE).await;
    let buyer = make_buyer(&cluster, "gap@example.com", 5000);
    let v = buy(&cluster, &buyer, &movie, "before-backup").await;
    let watched = v["grant_id"].as_str().unwrap().to_string();
    let media_url = v["media_url"].as_str().unwrap().to_string();
    backup_now(&cluster).await;
    // The books count in whole seconds: a grant bought in the backup's own
    // second counts as possibly in the gap. This drill runs fast enough to
    // buy again within that second; a real restore comes minutes later.
    let backed_up_by = shared::runtime::unix_now();
    // Watched after the backup; the old manager records it.
    let loc = cluster.redirect_location(&media_url).await;
    let r = cluster
        .client()
        .get(&loc)
        .header("range", "bytes=0-9999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    r.bytes().await.unwrap();
    let deadline = std::time::Instant::now() + LIMIT;
    while grant_state(&cluster, &buyer, &watched).await.1 == 0 {
        assert!(std::time::Instant::now() < deadline, "never journalled");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    lose_the_manager(&mut cluster);
    let (out, _) = restore(&cluster, recovery);
    assert!(out.status.success(), "{}", text(&out));
    cluster.restart_manager();
    assert_eq!(
        grant_state(&cluster, &buyer, &watched).await,
        ("active".to_string(), 0),
        "the restored books do not know the view"
    );
    // Bought after the restore and never played: refunded as usual.
    while shared::runtime::unix_now() <= backed_up_by {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = buy(&cluster, &buyer, &movie, "after-restore").await;
    let unplayed = v["grant_id"].as_str().unwrap().to_string();
    let (_, g) = cluster
        .get_as(&buyer, &format!("/api/v1/grants/{unplayed}"))
        .await;
    let expires_at = g["expires_at"].as_i64().unwrap();
    // Due once both nodes' journals pass expiry + grace (30 s) and the
    // sweeper runs (every second). Judged on the wall clock the manager
    // uses, with two minutes of slack, and after at least LIMIT of
    // waiting: a machine whose clocks stall or leap must not fail it.
    let waiting = std::time::Instant::now();
    while grant_state(&cluster, &buyer, &unplayed).await.0 != "refunded" {
        let late = shared::runtime::unix_now() > expires_at + 30 + 120 && waiting.elapsed() > LIMIT;
        assert!(
            !late,
            "refunds never resumed after the restore (expires_at {expires_at}, now {})\n{}",
            shared::runtime::unix_now(),
            refund_diagnostics(&cluster).await
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // By now the watched grant is long past its window and grace.
    assert_eq!(
        grant_state(&cluster, &buyer, &watched).await.0,
        "active",
        "a view served in the gap was refunded"
    );
}
