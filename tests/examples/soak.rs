//! `scripts/bench soak`: the whole service under load for a long time
//! (docs/scale.md, "Soak").
//!
//! A real cluster (release binaries, two nodes, TLS off) serves, for
//! `minutes` (default 20):
//! - `viewers` (default 200) concurrent viewers, each in a loop: half buy
//!   a view of the priced movie (`POST .../purchase`) and half play a free
//!   one; the media URL's redirect, then one to four random 256 KiB ranges.
//!   One viewer in ten reads slowly (about 100 KB/s), one in ten stalls
//!   after the first bytes for 30 s before reading on;
//! - an upload every 5 s (a short clip), each of which must publish;
//! - node `utah` restarted twice (at 25 % and 70 % of the run), the manager
//!   once (at 45 %), each by SIGTERM and a fresh start.
//!
//! Reported: errors by kind, each marked explained when it fell within a
//! restart of what it talked to (a refused connection while that process
//! was down), viewers served, time to first byte (p50, p99) of the ranges,
//! each process's RSS and open files at the start, middle and end, and at
//! the end the books (every balance equals its ledger sum, read from the
//! stopped manager's database), every node's journal delivered in full
//! and every upload published. It exits non-zero on an unexplained error
//! or a broken end check.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use e2e::{ffmpeg, no_redirects, Cluster, ClusterOpts};
use rand::{Rng, SeedableRng};

const RANGE: u64 = 256 * 1024;

/// What went wrong, by kind, and when (seconds into the run).
#[derive(Default)]
struct Stats {
    errors: Mutex<Vec<(f64, String)>>,
    ttfb_us: Mutex<Vec<u64>>,
    ranges: AtomicU64,
    bytes: AtomicU64,
    purchases: AtomicU64,
    views: AtomicU64,
}

impl Stats {
    fn error(&self, at: f64, kind: impl Into<String>) {
        self.errors.lock().unwrap().push((at, kind.into()));
    }
}

/// Who was down when: (what, from, to) in seconds into the run.
type Outages = Mutex<Vec<(&'static str, f64, f64)>>;

struct Shared {
    manager: String,
    buyer: String,
    paid: String,
    free: Vec<String>,
    started: Instant,
    stop: AtomicBool,
    stats: Stats,
}

impl Shared {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let minutes: f64 = args.next().map_or(20.0, |a| a.parse().expect("minutes"));
    let viewers: usize = args.next().map_or(200, |a| a.parse().expect("viewers"));
    let run = Duration::from_secs_f64(minutes * 60.0);

    let mut opts = ClusterOpts::new(&["utah", "toronto"]);
    opts.fixed_ports = true;
    // Every viewer here comes from 127.0.0.1; in-world they come from
    // their own addresses.
    opts.node_extra =
        "journal_forward_secs = 1\n[server]\nmax_connections_per_address = 4096\n".into();
    opts.manager_extra = "[server]\nmax_connections_per_address = 4096\n".into();
    let mut c = Cluster::start_with(&opts);
    let work = tempfile::tempdir().unwrap();

    eprintln!("== movies");
    let mut movies = Vec::new();
    for (i, freq) in [330, 440, 550].iter().enumerate() {
        let path = work.path().join(format!("movie-{i}.mp4"));
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=640x360:rate=25",
            "-f",
            "lavfi",
            "-i",
            &format!("sine=frequency={freq}:sample_rate=48000"),
            "-t",
            "40",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "50",
            "-b:v",
            "2M",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-movflags",
            "+faststart",
            path.to_str().unwrap(),
        ]);
        movies.push(
            c.publish(&path, &format!("Soak {i}"), Duration::from_secs(300))
                .await,
        );
    }
    c.set_price(&movies[0], 1).await;
    let clip = work.path().join("clip.mp4");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=25",
        "-t",
        "2",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        clip.to_str().unwrap(),
    ]);
    let credits = 10_000_000;
    let buyer = c.buyer("soak-buyer@example.com", credits);
    let mut free = Vec::new();
    for m in &movies[1..] {
        free.push(c.asset(m).await["media_url"].as_str().unwrap().to_string());
    }
    let sh = Arc::new(Shared {
        manager: c.manager.url.clone(),
        buyer,
        paid: movies[0].clone(),
        free,
        started: Instant::now(),
        stop: AtomicBool::new(false),
        stats: Stats::default(),
    });
    let outages: Arc<Outages> = Arc::default();

    let mut samples = vec![("start", sample(&c))];
    eprintln!("== load: {viewers} viewers for {minutes} min");
    let mut tasks = Vec::new();
    for v in 0..viewers {
        tasks.push(tokio::spawn(viewer(sh.clone(), v)));
    }
    let uploads = Arc::new(Mutex::new(Vec::<String>::new()));
    let uploader = {
        let (sh, uploads, clip) = (sh.clone(), uploads.clone(), clip.clone());
        let (m, token) = (c.manager.url.clone(), c.api_token.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            let bytes = std::fs::read(&clip).unwrap();
            let mut n = 0;
            while !sh.stop.load(Ordering::Relaxed) {
                n += 1;
                let form = reqwest::multipart::Form::new()
                    .text("title", format!("Soak upload {n}"))
                    .part(
                        "file",
                        reqwest::multipart::Part::bytes(bytes.clone()).file_name("clip.mp4"),
                    );
                let r = client
                    .post(format!("{m}/api/v1/uploads"))
                    .bearer_auth(&token)
                    .multipart(form)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 202 => {
                        let v: serde_json::Value = r.json().await.unwrap_or_default();
                        if let Some(id) = v["asset_id"].as_str() {
                            uploads.lock().unwrap().push(id.to_string());
                        }
                    }
                    Ok(r) => sh
                        .stats
                        .error(sh.now(), format!("upload_manager_{}", r.status().as_u16())),
                    Err(e) => sh
                        .stats
                        .error(sh.now(), format!("upload_manager_{}", kind(&e))),
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };

    // The restarts, at fixed points of the run.
    let at = |f: f64| sh.started + run.mul_f64(f);
    for (when, what) in [
        (0.25, "utah"),
        (0.45, "manager"),
        (0.5, "sample"),
        (0.70, "utah"),
    ] {
        tokio::time::sleep_until(tokio::time::Instant::from_std(at(when))).await;
        if what == "sample" {
            samples.push(("middle", sample(&c)));
            continue;
        }
        eprintln!("== restarting {what} at {:.0} s", sh.now());
        let from = sh.now();
        if what == "manager" {
            assert!(c.manager.stop(), "the manager stops on SIGTERM");
            c.restart_manager();
        } else {
            assert!(c.nodes[0].proc.stop(), "utah stops on SIGTERM");
            c.restart_node(0);
        }
        outages.lock().unwrap().push((what, from, sh.now()));
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(at(1.0))).await;
    sh.stop.store(true, Ordering::Relaxed);
    let load_secs = sh.now();
    for t in tasks {
        t.await.unwrap();
    }
    uploader.await.unwrap();
    samples.push(("end", sample(&c)));
    let ended = sh.now();

    // End checks.
    let mut broken = Vec::new();
    let ids = uploads.lock().unwrap().clone();
    let mut published = 0;
    for id in &ids {
        let v = c.wait_terminal(id, Duration::from_secs(600)).await;
        if v["state"] == "published" {
            published += 1;
        } else {
            broken.push(format!("upload {id} ended {}", v["state"]));
        }
    }
    // Every node's journal delivered in full (what it wrote is at the manager).
    let deadline = Instant::now() + Duration::from_secs(60);
    for node in &c.nodes {
        let dir = node.storage.join("journal");
        loop {
            let len = std::fs::metadata(dir.join("views.jsonl")).map_or(0, |m| m.len());
            let fwd: u64 = std::fs::read_to_string(dir.join("forwarded"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            if fwd == len {
                break;
            }
            if Instant::now() > deadline {
                broken.push(format!(
                    "{}'s journal: {fwd} of {len} bytes delivered",
                    node.proc.name
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The books, from the database itself with the manager stopped.
    assert!(c.manager.stop(), "the manager stops");
    let lost = errors_of(&sh, "purchase_");
    let books = books(&c, sh.stats.purchases.load(Ordering::Relaxed), lost).await;
    if let Err(e) = &books {
        broken.push(e.clone());
    }

    // The report.
    let outages = outages.lock().unwrap().clone();
    let errors = sh.stats.errors.lock().unwrap().clone();
    let mut by_kind: BTreeMap<(String, bool), u64> = BTreeMap::new();
    for (t, k) in &errors {
        let explained = outages.iter().any(|(what, from, to)| {
            *t >= from - 1.0
                && *t <= to + 15.0
                && k.contains(if *what == "manager" {
                    "manager"
                } else {
                    "node"
                })
        }) || k.starts_with("stalled_");
        *by_kind.entry((k.clone(), explained)).or_default() += 1;
    }
    let mut ttfb = sh.stats.ttfb_us.lock().unwrap().clone();
    ttfb.sort_unstable();
    let pct = |p: f64| {
        ttfb.get(((ttfb.len() as f64 * p) as usize).min(ttfb.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "== soak: {minutes} min, {viewers} viewers: {:.0} s of load, then {:.0} s for the last viewers to finish",
        load_secs,
        ended - load_secs
    );
    println!(
        "restarts: {}",
        outages
            .iter()
            .map(|(w, f, t)| format!("{w} at {f:.0} s (back after {:.1} s)", t - f))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "served: {} views, {} ranges, {:.1} GB; {} purchases; {} of {} uploads published",
        sh.stats.views.load(Ordering::Relaxed),
        sh.stats.ranges.load(Ordering::Relaxed),
        sh.stats.bytes.load(Ordering::Relaxed) as f64 / 1e9,
        sh.stats.purchases.load(Ordering::Relaxed),
        published,
        ids.len()
    );
    println!(
        "time to first byte of a range: p50 {:.2} ms, p99 {:.2} ms ({} ranges)",
        pct(0.5),
        pct(0.99),
        ttfb.len()
    );
    println!("errors by kind:");
    if by_kind.is_empty() {
        println!("  none");
    }
    let mut unexplained = 0;
    for ((k, explained), n) in &by_kind {
        println!(
            "  {k}: {n} ({})",
            if *explained {
                "explained: during a restart of what it called, or a stall the server cut"
            } else {
                "UNEXPLAINED"
            }
        );
        if !explained {
            unexplained += n;
        }
    }
    println!("{:<10}{:>14}{:>14}{:>14}", "", "manager", "utah", "toronto");
    for (when, s) in &samples {
        println!(
            "{when:<10}{}",
            s.iter()
                .map(|(rss, fds)| format!("{:>7.0} MiB {fds:>3}", rss))
                .collect::<String>()
        );
    }
    println!("(RSS and open files per process; utah and the manager are new processes after their restarts)");
    if let Ok(s) = &books {
        println!("end: {s}");
    }
    for b in &broken {
        println!("BROKEN: {b}");
    }
    if unexplained > 0 || !broken.is_empty() {
        std::process::exit(1);
    }
}

/// RSS (MiB) and open files of the manager, utah and toronto.
fn sample(c: &Cluster) -> Vec<(f64, usize)> {
    let pids = [
        c.manager.pid(),
        c.nodes[0].proc.pid(),
        c.nodes[1].proc.pid(),
    ];
    pids.iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let rss = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0;
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
            (rss, fds)
        })
        .collect()
}

fn kind(e: &reqwest::Error) -> &'static str {
    if e.is_connect() {
        "connect"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    }
}

async fn viewer(sh: Arc<Shared>, v: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(v as u64);
    let client = no_redirects();
    let slow = v.is_multiple_of(10);
    let stall = v % 10 == 1;
    while !sh.stop.load(Ordering::Relaxed) {
        let media_url = if rng.gen_bool(0.5) {
            let r = client
                .post(format!("{}/api/v1/assets/{}/purchase", sh.manager, sh.paid))
                .bearer_auth(&sh.buyer)
                .json(
                    &serde_json::json!({ "request_id": format!("soak-{v}-{}", rng.gen::<u64>()) }),
                )
                .send()
                .await;
            match r {
                Ok(r) if r.status() == 200 => {
                    sh.stats.purchases.fetch_add(1, Ordering::Relaxed);
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    body["media_url"].as_str().unwrap_or_default().to_string()
                }
                Ok(r) => {
                    sh.stats.error(
                        sh.now(),
                        format!("purchase_manager_{}", r.status().as_u16()),
                    );
                    pause(&mut rng).await;
                    continue;
                }
                Err(e) => {
                    sh.stats
                        .error(sh.now(), format!("purchase_manager_{}", kind(&e)));
                    pause(&mut rng).await;
                    continue;
                }
            }
        } else {
            sh.free[rng.gen_range(0..sh.free.len())].clone()
        };
        let play = match client.get(&media_url).send().await {
            Ok(r) if r.status() == 302 => r.headers()["location"]
                .to_str()
                .unwrap_or_default()
                .to_string(),
            Ok(r) => {
                sh.stats.error(
                    sh.now(),
                    format!("redirect_manager_{}", r.status().as_u16()),
                );
                pause(&mut rng).await;
                continue;
            }
            Err(e) => {
                sh.stats
                    .error(sh.now(), format!("redirect_manager_{}", kind(&e)));
                pause(&mut rng).await;
                continue;
            }
        };
        sh.stats.views.fetch_add(1, Ordering::Relaxed);
        let len = 9_000_000u64; // the movies are ~10 MB; ranges stay inside
        for _ in 0..rng.gen_range(1..=4) {
            let start = rng.gen_range(0..len - RANGE);
            let t = Instant::now();
            let r = client
                .get(&play)
                .header("range", format!("bytes={start}-{}", start + RANGE - 1))
                .send()
                .await;
            let mut r = match r {
                Ok(r) if r.status() == 206 => r,
                Ok(r) => {
                    sh.stats
                        .error(sh.now(), format!("range_node_{}", r.status().as_u16()));
                    break;
                }
                Err(e) => {
                    sh.stats.error(sh.now(), format!("range_node_{}", kind(&e)));
                    break;
                }
            };
            let mut got = 0u64;
            let mut first = true;
            let outcome: Result<(), reqwest::Error> = async {
                while let Some(chunk) = r.chunk().await? {
                    if first {
                        sh.stats
                            .ttfb_us
                            .lock()
                            .unwrap()
                            .push(t.elapsed().as_micros() as u64);
                        first = false;
                        if stall {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                    }
                    got += chunk.len() as u64;
                    if slow {
                        // ~100 KB/s
                        tokio::time::sleep(Duration::from_micros(chunk.len() as u64 * 10)).await;
                    }
                }
                Ok(())
            }
            .await;
            sh.stats.bytes.fetch_add(got, Ordering::Relaxed);
            match outcome {
                Ok(()) if got == RANGE => {
                    sh.stats.ranges.fetch_add(1, Ordering::Relaxed);
                }
                Ok(()) => sh.stats.error(sh.now(), format!("range_node_short_{got}")),
                Err(e) if stall => sh.stats.error(sh.now(), format!("stalled_{}", kind(&e))),
                Err(e) => sh.stats.error(sh.now(), format!("range_node_{}", kind(&e))),
            }
        }
        pause(&mut rng).await;
    }
}

async fn pause(rng: &mut rand::rngs::StdRng) {
    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..500))).await;
}

fn errors_of(sh: &Shared, prefix: &str) -> u64 {
    let errors = sh.stats.errors.lock().unwrap();
    errors.iter().filter(|(_, k)| k.starts_with(prefix)).count() as u64
}

/// The books, read from the stopped manager's database: every balance
/// equals its ledger sum, and there is a grant for every purchase answered
/// (and at most one more for each purchase whose answer was lost).
async fn books(c: &Cluster, answered: u64, lost: u64) -> Result<String, String> {
    use manager::catalog::{sqlite::SqliteCatalog, Catalog};
    let cat = SqliteCatalog::open(&format!(
        "sqlite://{}",
        c.manager_data.join("manager.db").display()
    ))
    .await
    .map_err(|e| format!("the catalog: {e}"))?;
    let off = cat.verify_balances().await.map_err(|e| e.to_string())?;
    // Closed first: the last connection folds the WAL into the file the
    // count reads.
    cat.pool().close().await;
    let counts = manager::catalog::inspect_snapshot(&c.manager_data.join("manager.db")).await;
    if !off.is_empty() {
        return Err(format!("balances differ from their ledger sums: {off:?}"));
    }
    let counts = counts.map_err(|e| format!("counting rows: {e}"))?;
    let grants = counts.tables.get("play_grants").copied().unwrap_or(0) as u64;
    if grants < answered || grants > answered + lost {
        return Err(format!(
            "{grants} grants for {answered} purchases answered and {lost} whose answer was lost"
        ));
    }
    Ok(format!(
        "books exact (every balance equals its ledger sum); {} ledger entries, {} grants, {} view events",
        counts.tables.get("ledger").copied().unwrap_or(0),
        counts.tables.get("play_grants").copied().unwrap_or(0),
        counts.tables.get("view_events").copied().unwrap_or(0),
    ))
}
