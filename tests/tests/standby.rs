//! Two managers, one database: the failover drill. Two manager processes
//! share one PostgreSQL database and one data folder; both serve, one
//! leads the background work. Uploads and purchases go through both; the
//! leader is killed with SIGKILL mid-transcode; the standby must take the
//! work over within 30 s, finish the interrupted job once, and the books
//! must come out exact. On SQLite a second manager is refused outright.
//!
//! The drill makes its own PostgreSQL database whatever the run's engine,
//! so `scripts/test` runs it in the SQLite pass only.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{bin, files_under, status_json, Cluster, ClusterOpts, Proc};

/// `{base}/healthz`'s `role`, or `None` when the process does not answer.
async fn role(client: &reqwest::Client, base: &str) -> Option<String> {
    let r = client
        .get(format!("{base}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    v["role"].as_str().map(str::to_string)
}

/// The manager configuration at `from` with its own listening port.
fn second_config(from: &Path, to: &Path) {
    let text = std::fs::read_to_string(from).unwrap();
    let listen = text
        .lines()
        .find(|l| l.starts_with("listen = "))
        .expect("a listen line")
        .to_string();
    std::fs::write(to, text.replace(&listen, "listen = \"127.0.0.1:0\"")).unwrap();
}

async fn balance(client: &reqwest::Client, base: &str, token: &str) -> i64 {
    let (s, v) = status_json(
        client
            .get(format!("{base}/api/v1/account"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["balance"].as_i64().unwrap()
}

/// A cluster whose manager (A) leads on a new PostgreSQL database, with
/// a slow preset (transcodes long enough to cut short), and a second
/// manager (B) on the same configuration and data folder, standing by.
async fn two_managers() -> (Cluster, Proc, String) {
    let db_url = e2e::new_pg_database();
    let mut opts = ClusterOpts::new(&["utah", "toronto"]);
    opts.database = Some(format!("database_url = \"{db_url}\"\n"));
    opts.transcode_extra = "preset = \"slow\"\n".into();
    let cluster = Cluster::start_with(&opts);
    let client = cluster.client();
    let a_url = cluster.manager.url.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while role(&client, &a_url).await.as_deref() != Some("leader") {
        assert!(Instant::now() < deadline, "the first manager never led");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b_config = cluster.dir.path().join("manager-b.toml");
    second_config(&cluster.manager_config, &b_config);
    let b = Proc::spawn(
        "manager-b",
        &bin("manager"),
        &b_config,
        cluster.dir.path().join("manager-b.log"),
    );
    // Both serve; one leads. B stands by through several of its ticks.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(role(&client, &b.url).await.as_deref(), Some("standby"));
    assert_eq!(role(&client, &a_url).await.as_deref(), Some("leader"));
    (cluster, b, db_url)
}

fn long_movie(dir: &Path) -> std::path::PathBuf {
    let long = dir.join("long.mp4");
    e2e::make_long_movie(&long);
    long
}

/// What is left in the shared staging folder (but `/healthz`'s probes).
fn staged(cluster: &Cluster) -> Vec<std::path::PathBuf> {
    files_under(&cluster.manager_data.join("staging"))
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains("/health."))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_within_30_s_when_the_leader_is_killed_and_nothing_is_lost_or_doubled(
) {
    let (mut cluster, mut b, _) = two_managers().await;
    let client = cluster.client();
    let (a_url, b_url) = (cluster.manager.url.clone(), b.url.clone());

    // A movie uploaded through each; both publish (the leader does the
    // work for an upload the standby took: they share the data folder).
    let short = cluster.dir.path().join("short.webm");
    e2e::make_webm(&short);
    let first = cluster
        .publish(&short, "Through A", Duration::from_secs(240))
        .await;
    std::mem::swap(&mut cluster.manager, &mut b);
    let second = cluster
        .publish(&short, "Through B", Duration::from_secs(240))
        .await;
    std::mem::swap(&mut cluster.manager, &mut b);
    const PRICE: i64 = 7;
    cluster.set_price(&first, PRICE).await;
    let buyer = cluster.buyer("buyer@example.com", 100_000);
    // One purchase through A, sent again with the same request id through
    // B: the same answer, charged once (the request ids live in the
    // database, not in a process).
    let before = balance(&client, &b_url, &buyer).await;
    let at_a = cluster.purchase(&buyer, &first, "cross-manager").await;
    assert_eq!(at_a.0, 200, "{}", at_a.1);
    std::mem::swap(&mut cluster.manager, &mut b);
    let at_b = cluster.purchase(&buyer, &first, "cross-manager").await;
    std::mem::swap(&mut cluster.manager, &mut b);
    assert_eq!(at_b.0, 200, "{}", at_b.1);
    assert_eq!(at_a.1["grant_id"], at_b.1["grant_id"], "the same grant");
    assert_eq!(
        (
            at_a.1["charged_now"].as_bool(),
            at_b.1["charged_now"].as_bool()
        ),
        (Some(true), Some(false)),
        "{} {}",
        at_a.1,
        at_b.1
    );
    let start_balance = balance(&client, &b_url, &buyer).await;
    assert_eq!(start_balance, before - PRICE);

    // Purchases through both managers, alternately, all through the drill.
    // A request cut off by the kill is sent again, with the same request
    // id, to the other manager: it must count once.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let buying = {
        let (client, buyer, first) = (client.clone(), buyer.clone(), first.clone());
        let urls = [a_url.clone(), b_url.clone()];
        tokio::spawn(async move {
            let (mut bought, mut retried_elsewhere) = (0i64, 0u32);
            for i in 0.. {
                if *stop_rx.borrow() {
                    break;
                }
                let request = format!("drill-{i}");
                let mut at = i % 2;
                let mut tries = 0;
                loop {
                    let r = client
                        .post(format!("{}/api/v1/assets/{first}/purchase", urls[at]))
                        .bearer_auth(&buyer)
                        .json(&serde_json::json!({ "request_id": request }))
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    match r {
                        Ok(r) => {
                            let (s, v) = status_json(r).await;
                            assert_eq!(s, 200, "purchase {request}: {v}");
                            bought += 1;
                            break;
                        }
                        Err(_) => {
                            tries += 1;
                            assert!(tries < 20, "purchase {request} never went through");
                            retried_elsewhere += 1;
                            at = 1 - at;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(150)) => {}
                    _ = stop_rx.changed() => {}
                }
            }
            (bought, retried_elsewhere)
        })
    };

    // A long movie, uploaded through the standby, transcoding on the leader.
    let long = long_movie(cluster.dir.path());
    std::mem::swap(&mut cluster.manager, &mut b);
    let (s, v) = cluster.upload(&long, "Cut short").await.unwrap();
    assert_eq!(s, 202, "{v}");
    let long_id = v["asset_id"].as_str().unwrap().to_string();
    cluster.wait_transcoding(&long_id).await;
    // Now `cluster.manager` is B and `b` is A, the leader.
    b.kill9();
    let killed = Instant::now();
    while role(&client, &b_url).await.as_deref() != Some("leader") {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the standby did not take over within 30 s\n{}",
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let takeover = killed.elapsed();

    // The cut-short job finishes on the new leader, and new work flows.
    let v = cluster
        .wait_terminal(&long_id, Duration::from_secs(300))
        .await;
    assert_eq!(v["state"], "published", "{v}");
    let after = cluster
        .publish(&short, "After", Duration::from_secs(240))
        .await;
    stop_tx.send(true).unwrap();
    let (bought, retried_elsewhere) = buying.await.unwrap();
    assert!(bought >= 10, "purchases kept flowing: {bought}");

    // The books: every purchase counted exactly once.
    assert_eq!(
        balance(&client, &b_url, &buyer).await,
        start_balance - bought * PRICE,
        "{bought} purchases ({retried_elsewhere} sent again to the other manager)"
    );
    // Each one asked again gives the same answer and costs nothing more.
    let again = cluster
        .purchase(&buyer, &first, &format!("drill-{}", bought - 1))
        .await;
    assert_eq!(again.0, 200, "{}", again.1);
    assert_eq!(
        balance(&client, &b_url, &buyer).await,
        start_balance - bought * PRICE
    );

    // Every movie once: four assets, one verified copy of each on each
    // node, nothing left in the shared staging folder, the outbox emptied.
    let mine = cluster.my_assets().await;
    assert_eq!(mine.len(), 4, "{mine:?}");
    for id in [&first, &second, &long_id, &after] {
        let v = cluster.asset(id).await;
        assert_eq!(v["state"], "published", "{v}");
        let replicas = v["replicas"].as_array().unwrap();
        assert_eq!(replicas.len(), 2, "{v}");
        assert!(replicas.iter().all(|r| r["state"] == "verified"), "{v}");
        let head = client
            .head(v["media_url"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 200, "{id} plays");
    }
    for node in &cluster.nodes {
        assert_eq!(node.held_blobs().await.len(), 4, "{}", node.proc.name);
    }
    let staging = staged(&cluster);
    assert!(staging.is_empty(), "{staging:?}");
    // The outbox lets a file go once every node holds a verified copy.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !files_under(&cluster.manager_data.join("outbox")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left in the outbox: {:?}",
            files_under(&cluster.manager_data.join("outbox"))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = cluster.manager.log_text();
    assert!(log.contains("this manager now leads"), "{log}");
    eprintln!(
        "takeover after {:.1} s; {bought} purchases, {retried_elsewhere} sent again elsewhere",
        takeover.as_secs_f64()
    );
}

/// The leader's lead connection ended by the server while the process
/// lives on (a network cut between it and the database, a server-side
/// kill): it must give its work up, the standby take it over, and the
/// job it was transcoding be done once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_lead_gives_its_work_up_and_the_job_is_done_once() {
    let (cluster, b, db_url) = two_managers().await;
    let client = cluster.client();
    let long = long_movie(cluster.dir.path());
    let (s, v) = cluster.upload(&long, "Cut off").await.unwrap();
    assert_eq!(s, 202, "{v}");
    let id = v["asset_id"].as_str().unwrap().to_string();
    cluster.wait_transcoding(&id).await;
    // The server ends the leader's lock session; its pool stays alive.
    let ended = e2e::psql(
        &db_url,
        "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l \
         JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted \
         AND a.application_name = 'slmedia-manager-lead' AND a.datname = current_database()",
    );
    assert_eq!(ended, "1");
    let cut = Instant::now();
    while role(&client, &b.url).await.as_deref() != Some("leader") {
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "the standby did not take over within 30 s\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A knows it lost the lead, says so, and stands by.
    while role(&client, &cluster.manager.url).await.as_deref() != Some("standby") {
        assert!(cut.elapsed() < Duration::from_secs(30), "A still leads");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = cluster.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(v["state"], "published", "{v}");
    assert!(cluster.manager.log_text().contains("lead_lost"));
    // Done once: one asset, one copy per node, no intermediate file of
    // either holder left behind.
    assert_eq!(cluster.my_assets().await.len(), 1);
    for node in &cluster.nodes {
        assert_eq!(node.held_blobs().await.len(), 1, "{}", node.proc.name);
    }
    let staging = staged(&cluster);
    assert!(staging.is_empty(), "{staging:?}");
    // And A, a standby now, does not lead again while B holds it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        role(&client, &cluster.manager.url).await.as_deref(),
        Some("standby")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_manager_on_the_same_sqlite_database_is_refused_before_it_touches_anything() {
    let mut opts = ClusterOpts::new(&["utah"]);
    opts.min_replicas = 1;
    opts.database = Some(String::new());
    let cluster = Cluster::start_with(&opts);
    let client = cluster.client();
    let deadline = Instant::now() + Duration::from_secs(30);
    while role(&client, &cluster.manager.url).await.as_deref() != Some("leader") {
        assert!(Instant::now() < deadline, "the manager never led");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Something in staging the second process would clear at its start.
    let partial = cluster.manager_data.join("staging").join("someone.upload");
    std::fs::write(&partial, b"bytes of an upload in progress").unwrap();
    let b_config = cluster.dir.path().join("manager-b.toml");
    second_config(&cluster.manager_config, &b_config);
    let out = Command::new(bin("manager"))
        .arg("--config")
        .arg(&b_config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("another manager is already running on the database"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("LISTENING"));
    assert!(partial.exists(), "the refused process touched staging");
    // The first goes on serving.
    assert_eq!(
        role(&client, &cluster.manager.url).await.as_deref(),
        Some("leader")
    );
}
