//! `scripts/bench scale`: how the background work grows with the catalog
//! (docs/scale.md, "Measured").
//!
//! For each size N (default 1,000, 10,000 and 100,000) it starts a real
//! cluster (release binaries, two nodes, both holding every movie), then:
//!
//! - seeds N published movies straight into the catalog through the
//!   catalog's own functions (on a tmpfs copy of the database, so seeding
//!   takes seconds; the database goes back to disk before anything is
//!   measured), and N small blobs (512 bytes: the count is what matters)
//!   into each node's storage;
//! - **scrub**: the first pass each node makes at start over N copies: its
//!   time, and the bytes the node wrote meanwhile (its proof-time
//!   bookkeeping, `verified.json`);
//! - **inventory**: a node's signed answer listing its N copies (best of 3);
//! - **reconcile**: the manager's first pass at start (every copy's proof
//!   time is newer than the catalog's, so each is written) and a later
//!   pass with nothing to change;
//! - **pages**: the public home page, "my movies" (`/account`), the API's
//!   listing and the admin's movies and overview pages, for an owner of all
//!   N movies (median of 5);
//! - **journal**: N paid-view events waiting in a node's journal while the
//!   manager was away, delivered when the node starts again: the time
//!   until the manager has counted all N;
//! - the manager's peak RSS over all of it.
//!
//! It prints a table and, per measure, the growth from each size to the
//! next (10x the work: linear is about 10x; much more is reported as worse
//! than linear). Speeds are shared-machine figures: compare the ratios.
//!
//! Run: `scripts/bench scale [sizes...]` (it builds the release binaries
//! and this example first).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use e2e::{metric_sum, no_redirects, Cluster, ClusterOpts};
use sha2::{Digest, Sha256};

#[derive(Debug, Default, Clone)]
struct Figures {
    n: usize,
    seed_secs: f64,
    scrub_secs: f64,
    scrub_written_mb: f64,
    inventory_ms: f64,
    reconcile_first_secs: f64,
    reconcile_next_secs: f64,
    pages_ms: Vec<(&'static str, f64)>,
    journal_secs: f64,
    manager_peak_mib: f64,
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("sizes are whole numbers"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000, 100_000]
    } else {
        sizes
    };
    let mut all = Vec::new();
    for n in sizes {
        eprintln!("== {n} movies");
        let f = measure(n).await;
        eprintln!("{f:?}");
        all.push(f);
    }
    report(&all);
}

fn report(all: &[Figures]) {
    let mut rows: Vec<(String, Vec<f64>)> = vec![
        (
            "scrub pass, s".into(),
            all.iter().map(|f| f.scrub_secs).collect(),
        ),
        (
            "  written meanwhile, MB".into(),
            all.iter().map(|f| f.scrub_written_mb).collect(),
        ),
        (
            "inventory answer, ms".into(),
            all.iter().map(|f| f.inventory_ms).collect(),
        ),
        (
            "reconcile, first pass, s".into(),
            all.iter().map(|f| f.reconcile_first_secs).collect(),
        ),
        (
            "reconcile, next pass, s".into(),
            all.iter().map(|f| f.reconcile_next_secs).collect(),
        ),
        (
            "journal catch-up, s".into(),
            all.iter().map(|f| f.journal_secs).collect(),
        ),
    ];
    for (i, (page, _)) in all[0].pages_ms.iter().enumerate() {
        rows.push((
            format!("page {page}, ms"),
            all.iter().map(|f| f.pages_ms[i].1).collect(),
        ));
    }
    rows.push((
        "manager peak RSS, MiB".into(),
        all.iter().map(|f| f.manager_peak_mib).collect(),
    ));
    let mut out = String::new();
    out += &format!("{:<28}", "movies (and copies per node)");
    for f in all {
        out += &format!("{:>12}", f.n);
    }
    out += "   growth per step (work x10 per step)\n";
    for (name, v) in &rows {
        out += &format!("{name:<28}");
        for x in v {
            out += &format!("{:>12}", fmt(*x));
        }
        let mut verdict = Vec::new();
        for w in v.windows(2).zip(all.windows(2)) {
            let ((a, b), (fa, fb)) = ((w.0[0], w.0[1]), (&w.1[0], &w.1[1]));
            let work = fb.n as f64 / fa.n as f64;
            let growth = if a > 0.0 { b / a } else { 0.0 };
            // Linear is `work`; allow for noise and fixed costs at small sizes.
            let tag = if growth <= work * 1.5 {
                "ok"
            } else {
                "WORSE THAN LINEAR"
            };
            verdict.push(format!("{growth:.1}x {tag}"));
        }
        out += &format!("   {}\n", verdict.join(", "));
    }
    println!("{out}");
    let seeds: Vec<String> = all
        .iter()
        .map(|f| format!("{}: {:.0} s", f.n, f.seed_secs))
        .collect();
    println!("(seeding, not measured work: {})", seeds.join(", "));
}

fn fmt(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn blob_bytes(i: usize) -> Vec<u8> {
    let mut b = format!("scale benchmark blob {i}\n").into_bytes();
    b.resize(512, b'.');
    b
}

fn blob_path(storage: &Path, hex: &str) -> PathBuf {
    storage.join("blobs").join(&hex[..2]).join(hex)
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn written_bytes(pid: u32) -> f64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn measure(n: usize) -> Figures {
    let mut opts = ClusterOpts::new(&["utah", "toronto"]);
    opts.fixed_ports = true;
    // Fast enough that the pass measures the bookkeeping, not the disk.
    opts.scrub_rate_mb_per_sec = 100_000.0;
    opts.reconcile_interval_secs = 3;
    opts.node_extra = "journal_forward_secs = 1\n".into();
    let mut c = Cluster::start_with(&opts);
    let mut f = Figures {
        n,
        ..Figures::default()
    };

    // Seed with everything stopped.
    assert!(c.manager.stop(), "manager stopped");
    for node in &mut c.nodes {
        assert!(node.proc.stop(), "node stopped");
    }
    let began = Instant::now();
    seed(&c, n).await;
    f.seed_secs = began.elapsed().as_secs_f64();

    // Scrub: both nodes start, each makes a pass over its n copies.
    for i in 0..c.nodes.len() {
        c.restart_node(i);
    }
    let utah = c.nodes[0].proc.url.clone();
    let pid = c.nodes[0].proc.pid();
    let before = written_bytes(pid);
    let t = Instant::now();
    wait_for("the scrub pass", Duration::from_secs(3600), || async {
        metric_sum(&c.metrics(&utah).await, "viewnode_scrub_passes_total") >= 1.0
    })
    .await;
    f.scrub_secs = metric_sum(&c.metrics(&utah).await, "viewnode_scrub_last_pass_seconds");
    f.scrub_written_mb = (written_bytes(pid) - before) / 1e6;
    eprintln!(
        "scrub {:.2} s (waited {:.1} s)",
        f.scrub_secs,
        t.elapsed().as_secs_f64()
    );
    let toronto = c.nodes[1].proc.url.clone();
    wait_for(
        "toronto's scrub pass",
        Duration::from_secs(3600),
        || async { metric_sum(&c.metrics(&toronto).await, "viewnode_scrub_passes_total") >= 1.0 },
    )
    .await;

    // Inventory: best of three.
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let inv = c.node_inventory(0).await;
        best = best.min(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(
            inv["blobs"].as_array().map(Vec::len),
            Some(n),
            "inventory size"
        );
    }
    f.inventory_ms = best;

    // Reconcile: the first pass at start, then a quiet one.
    c.restart_manager();
    let m = c.manager.url.clone();
    wait_for(
        "the first reconcile pass",
        Duration::from_secs(3600),
        || async { metric_sum(&c.metrics(&m).await, "manager_reconcile_passes_total") >= 1.0 },
    )
    .await;
    f.reconcile_first_secs =
        metric_sum(&c.metrics(&m).await, "manager_reconcile_last_pass_seconds");
    wait_for(
        "a second reconcile pass",
        Duration::from_secs(3600),
        || async { metric_sum(&c.metrics(&m).await, "manager_reconcile_passes_total") >= 2.0 },
    )
    .await;
    f.reconcile_next_secs = metric_sum(&c.metrics(&m).await, "manager_reconcile_last_pass_seconds");
    let lost = metric_sum(&c.metrics(&m).await, "manager_replicas_lost_total");
    assert_eq!(lost, 0.0, "no copy may be counted lost");

    // Pages, as the owner of every movie (the operator) sees them.
    let (_, session) = e2e::form_login(&m, "/login", &c.operator_email, &c.operator_password).await;
    let session = session.expect("the operator's session");
    let client = no_redirects();
    // The home page's second page, by the cursor its "Older movies" link
    // carries (a keyset: any page costs what the first does), and its
    // search, for a title near the oldest (the scan goes deepest) and for a
    // word every title has.
    let home = client
        .get(format!("{m}/"))
        .send()
        .await
        .expect("home")
        .text()
        .await
        .expect("home body");
    let page2 = home
        .split("href=\"")
        .filter_map(|s| s.split('"').next())
        .find(|h| h.starts_with("/?after="))
        .map(|h| h.replace("&amp;", "&"))
        .expect("an older-movies link on the home page");
    let rare = format!("/?q=Scale+movie+{}", n / 100);
    for (name, path, auth) in [
        ("/", "/", true),
        ("/ page 2", page2.as_str(), false),
        ("/?q= (few titles)", rare.as_str(), false),
        ("/?q=movie (all)", "/?q=movie", false),
        ("/account", "/account", true),
        ("/api/v1/assets", "/api/v1/assets", false),
        ("/admin/movies", "/admin/movies", true),
        ("/admin", "/admin", true),
    ] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let req = client.get(format!("{m}{path}"));
            let req = if auth {
                req.header("cookie", &session)
            } else {
                req.bearer_auth(&c.api_token)
            };
            let t = Instant::now();
            let r = req.send().await.expect("page");
            let status = r.status();
            let body = r.bytes().await.expect("page body");
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            assert!(status.is_success(), "{path}: {status}");
            assert!(!body.is_empty());
        }
        times.sort_by(f64::total_cmp);
        f.pages_ms.push((name, times[2]));
    }

    // Journal: n events wait on utah while it is stopped; it delivers them
    // when it starts again.
    assert!(c.nodes[0].proc.stop(), "utah stopped");
    let counted = metric_sum(&c.metrics(&m).await, "manager_view_events_total");
    write_journal(&c.nodes[0].storage, n);
    let t = Instant::now();
    c.restart_node(0);
    wait_for(
        "the journal's catch-up",
        Duration::from_secs(3600),
        || async {
            metric_sum(&c.metrics(&m).await, "manager_view_events_total") >= counted + n as f64
        },
    )
    .await;
    f.journal_secs = t.elapsed().as_secs_f64();
    assert_eq!(
        metric_sum(&c.metrics(&m).await, "manager_view_events_total"),
        counted + n as f64,
        "every event counted once"
    );

    f.manager_peak_mib = peak_rss_mib(c.manager.pid());
    f
}

/// N movies in the catalog, owned by the operator, each on both nodes.
async fn seed(c: &Cluster, n: usize) {
    use manager::catalog::{sqlite::SqliteCatalog, Catalog};
    let db = c.manager_data.join("manager.db");
    let scratch = tempfile::Builder::new()
        .prefix("slmedia-scale")
        .tempdir_in("/dev/shm")
        .expect("a folder on /dev/shm");
    let names = ["manager.db", "manager.db-wal", "manager.db-shm"];
    for name in names {
        let from = c.manager_data.join(name);
        if from.exists() {
            std::fs::copy(&from, scratch.path().join(name)).unwrap();
        }
    }
    let nodes: Vec<String> = vec!["utah".into(), "toronto".into()];
    {
        let cat = SqliteCatalog::open(&format!(
            "sqlite://{}",
            scratch.path().join("manager.db").display()
        ))
        .await
        .expect("the catalog");
        let owner = cat
            .user_by_email(&c.operator_email)
            .await
            .unwrap()
            .expect("the operator")
            .id;
        for i in 0..n {
            let bytes = blob_bytes(i);
            let hex = hex::encode(Sha256::digest(&bytes));
            let id = format!("{:032x}", 0x5ca1e_u128 << 64 | i as u128);
            cat.insert_asset(&id, owner, &format!("Scale movie {i}"), "m.mp4", 1000)
                .await
                .unwrap();
            cat.record_sealed(&id, "seed", &hex, 512, 400, b"k", &nodes)
                .await
                .unwrap();
            for node in &nodes {
                cat.replica_verified(&id, node).await.unwrap();
            }
            assert!(cat.publish_if_replicated(&id, 2).await.unwrap());
            for node in &c.nodes {
                let path = blob_path(&node.storage, &hex);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            if i % 10_000 == 9_999 {
                eprintln!("seeded {}", i + 1);
            }
        }
        // Every connection closed (the last one folds the WAL back into
        // the database) before the files are copied.
        cat.pool().close().await;
    }
    for name in names {
        let _ = std::fs::remove_file(c.manager_data.join(name));
        let from = scratch.path().join(name);
        if from.exists() {
            std::fs::copy(&from, c.manager_data.join(name)).unwrap();
        }
    }
    // The copies go to disk before the nodes start: the scrub must read
    // them from the page cache or the disk, not from a writeback queue.
    let _ = std::process::Command::new("sync").status();
    assert!(db.exists());
}

/// N paid-view events in the node's journal, as its writer would have left
/// them (one JSON line each, nothing forwarded yet).
fn write_journal(storage: &Path, n: usize) {
    use std::io::Write;
    let dir = storage.join("journal");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("views.jsonl"))
            .unwrap(),
    );
    let now = shared::runtime::unix_now();
    for i in 0..n {
        let e = shared::protocol::JournalEvent {
            id: uuid_like(i),
            grant: Some(format!("scale-grant-{}", i % 1000)),
            asset: format!("{:032x}", 0x5ca1e_u128 << 64 | i as u128),
            bytes: 1 << 20,
            first_at: now - 60,
            last_at: now - 30,
        };
        serde_json::to_writer(&mut f, &e).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
}

fn uuid_like(i: usize) -> String {
    let mut r = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut r);
    format!("{}-{i}", hex::encode(r))
}
