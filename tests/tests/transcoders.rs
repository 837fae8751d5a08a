//! Transcode workers on other machines (manager/src/runners.rs, the
//! `transcoder` binary). The manager runs no transcode loops of its own
//! here (`transcode.workers = 0`): every job goes through workers.
//!
//! Drills: two workers racing for one job (one gets it); two real workers
//! sharing a queue (each job done once, by one of them); a worker killed
//! with SIGKILL mid-transcode (its lease lapses, another finishes the job,
//! once, nothing left behind); broken and wrong results (refused, the job
//! offered again); forged, unknown and revoked workers and used tokens
//! (`401`). Some calls are made by hand ([`Raw`]), signed as the
//! `transcoder` binary signs them, to send what a real worker never would.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{error_code, files_under, status_json, Cluster, ClusterOpts};

/// A worker whose calls the test makes itself.
struct Raw {
    base: String,
    name: String,
    secret: Vec<u8>,
    http: reqwest::Client,
}

impl Raw {
    /// Registers `name` with a fresh token from `manager transcoder-token`.
    async fn register(cluster: &Cluster, name: &str) -> Raw {
        let token = cluster.manager_cli(&["transcoder-token"]);
        Raw::register_with(cluster, name, &token).await.unwrap()
    }

    async fn register_with(
        cluster: &Cluster,
        name: &str,
        token: &str,
    ) -> Result<Raw, (u16, serde_json::Value)> {
        let http = cluster.client();
        let (s, v) = status_json(
            http.post(format!("{}/api/v1/runners/register", cluster.manager.url))
                .json(&serde_json::json!({ "token": token, "name": name }))
                .send()
                .await
                .unwrap(),
        )
        .await;
        if s != 200 {
            return Err((s, v));
        }
        Ok(Raw {
            base: cluster.manager.url.clone(),
            name: v["name"].as_str().unwrap().to_string(),
            secret: hex::decode(v["secret"].as_str().unwrap()).unwrap(),
            http,
        })
    }

    /// A call signed with `content_sha256` for `body`.
    async fn send(
        &self,
        method: reqwest::Method,
        pq: &str,
        content_sha256: &str,
        body: Vec<u8>,
    ) -> reqwest::Response {
        let now = shared::runtime::unix_now();
        let auth = shared::sign_request(
            &self.secret,
            &self.name,
            method.as_str(),
            pq,
            now,
            content_sha256,
        );
        self.http
            .request(method, format!("{}{pq}", self.base))
            .header(shared::AUTH_HEADER, auth)
            .header(shared::DATE_HEADER, now.to_string())
            .header("x-content-sha256", content_sha256)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// A signed POST of a JSON body.
    async fn post(&self, pq: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let bytes = serde_json::to_vec(&body).unwrap();
        let sha = shared::content_sha256_hex(&bytes);
        let r = self.send(reqwest::Method::POST, pq, &sha, bytes).await;
        if r.status() == reqwest::StatusCode::NO_CONTENT {
            return (204, serde_json::Value::Null);
        }
        status_json(r).await
    }

    async fn request(&self) -> (u16, serde_json::Value) {
        self.post("/api/v1/runners/jobs/request", serde_json::json!({}))
            .await
    }

    async fn accept(&self, id: &str) -> (u16, serde_json::Value) {
        self.post(
            &format!("/api/v1/runners/jobs/{id}/accept"),
            serde_json::json!({}),
        )
        .await
    }

    /// Sends `result` as the job's result, signed with its SHA-256.
    async fn success(&self, job: &serde_json::Value, result: Vec<u8>) -> (u16, serde_json::Value) {
        let pq = format!(
            "/api/v1/runners/jobs/{}/success?lease={}",
            job["id"].as_str().unwrap(),
            job["lease"].as_str().unwrap()
        );
        let sha = shared::content_sha256_hex(&result);
        let r = self.send(reqwest::Method::POST, &pq, &sha, result).await;
        if r.status() == reqwest::StatusCode::NO_CONTENT {
            return (204, serde_json::Value::Null);
        }
        status_json(r).await
    }

    /// Asks until a job is offered (up to `limit`), then accepts it.
    async fn take(&self, limit: Duration) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let (s, v) = self.request().await;
            if s == 200 {
                let (s, job) = self.accept(v["id"].as_str().unwrap()).await;
                assert_eq!(s, 200, "{job}");
                return job;
            }
            assert_eq!(s, 204, "{v}");
            assert!(Instant::now() < deadline, "no job offered");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn remote_only() -> ClusterOpts {
    let mut opts = ClusterOpts::new(&["utah", "toronto"]);
    opts.transcode_extra = "workers = 0\n".into();
    opts
}

/// The job ids a `transcoder` log says it accepted.
fn accepted(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("accepted"))
        .filter_map(|l| {
            let at = l.find("job{id=")? + 7;
            let end = l[at..].find('}')? + at;
            Some(l[at..end].to_string())
        })
        .collect()
}

/// What is left in the manager's staging folder (but `/healthz`'s probes).
fn staged(cluster: &Cluster) -> Vec<std::path::PathBuf> {
    files_under(&cluster.manager_data.join("staging"))
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains("/health."))
        .collect()
}

fn short_movie(path: &Path, secs: &str) {
    e2e::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-t",
        secs,
        "-c:v",
        "mpeg4",
        "-c:a",
        "mp3",
        path.to_str().unwrap(),
    ]);
}

async fn upload(cluster: &Cluster, file: &Path, title: &str) -> String {
    let (s, v) = cluster.upload(file, title).await.unwrap();
    assert_eq!(s, 202, "{v}");
    v["asset_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_the_queue_each_job_goes_to_one_and_bad_credentials_get_401() {
    let cluster = Cluster::start_with(&remote_only());
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for i in 0..4 {
        let f = dir.path().join(format!("m{i}.avi"));
        short_movie(&f, "3");
        files.push(f);
    }

    // Two workers race for one job: one gets it, the other hears so.
    let (r1, r2) = (
        Raw::register(&cluster, "race-1").await,
        Raw::register(&cluster, "race-2").await,
    );
    let first = upload(&cluster, &files[0], "first").await;
    let (s, offer) = r1.request().await;
    assert_eq!((s, offer["id"].as_str()), (200, Some(first.as_str())));
    let ((s1, j1), (s2, j2)) = tokio::join!(r1.accept(&first), r2.accept(&first));
    let mut statuses = [s1, s2];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{j1} {j2}");
    let (winner, loser, job, refusal) = if s1 == 200 {
        (&r1, &r2, j1, j2)
    } else {
        (&r2, &r1, j2, j1)
    };
    assert_eq!(error_code(&refusal), Some("job_taken"), "{refusal}");
    assert_eq!(job["id"].as_str(), Some(first.as_str()));
    // Nothing else waits; the taken job is not offered again.
    assert_eq!(loser.request().await.0, 204);
    // The other worker cannot act on the winner's claim, even with its lease.
    let (s, v) = loser
        .post(
            &format!(
                "/api/v1/runners/jobs/{first}/progress?lease={}",
                job["lease"].as_str().unwrap()
            ),
            serde_json::json!({ "progress": 0.5 }),
        )
        .await;
    assert_eq!((s, error_code(&v)), (409, Some("job_lost")), "{v}");
    // The winner can: the lease is renewed, nobody asked to cancel.
    let (s, v) = winner
        .post(
            &format!(
                "/api/v1/runners/jobs/{first}/progress?lease={}",
                job["lease"].as_str().unwrap()
            ),
            serde_json::json!({ "progress": 0.25 }),
        )
        .await;
    assert_eq!(
        (s, &v["cancel"]),
        (200, &serde_json::Value::Bool(false)),
        "{v}"
    );
    assert_eq!(cluster.asset(&first).await["state"], "transcoding");
    // Gives it back: queued again at once, for the real workers below.
    let (s, v) = winner
        .post(
            &format!(
                "/api/v1/runners/jobs/{first}/abort?lease={}",
                job["lease"].as_str().unwrap()
            ),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(s, 204, "{v}");
    assert_eq!(cluster.asset(&first).await["state"], "queued");

    // Two real workers take the whole queue between them.
    let mut t1 = cluster.start_transcoder("t1");
    let mut t2 = cluster.start_transcoder("t2");
    let mut ids = vec![first];
    for (i, f) in files.iter().enumerate().skip(1) {
        ids.push(upload(&cluster, f, &format!("movie {i}")).await);
    }
    for id in &ids {
        let v = cluster.wait_terminal(id, Duration::from_secs(240)).await;
        assert_eq!(v["state"], "published", "{v}");
        assert_eq!(
            (v["width"].as_i64(), v["height"].as_i64()),
            (Some(320), Some(240)),
            "{v}"
        );
    }
    let (a1, a2) = (accepted(&t1.log_text()), accepted(&t2.log_text()));
    let (s1, s2): (BTreeSet<_>, BTreeSet<_>) =
        (a1.iter().cloned().collect(), a2.iter().cloned().collect());
    assert_eq!(
        a1.len() + a2.len(),
        ids.len(),
        "each job accepted once: {a1:?} {a2:?}"
    );
    assert!(s1.is_disjoint(&s2), "{a1:?} {a2:?}");
    assert_eq!(
        s1.union(&s2).cloned().collect::<BTreeSet<_>>(),
        ids.iter().cloned().collect::<BTreeSet<_>>()
    );
    // Each movie plays from both mirrors; nothing is left on the way.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let inv = cluster.node_inventory(i).await;
        assert_eq!(
            inv["blobs"].as_array().map(Vec::len),
            Some(ids.len()),
            "{}: {inv}",
            node.proc.name
        );
    }
    for id in &ids {
        let loc = cluster
            .redirect_location(cluster.asset(id).await["media_url"].as_str().unwrap())
            .await;
        let r = cluster.client().get(&loc).send().await.unwrap();
        assert_eq!(r.status(), 200, "{loc}");
        assert!(e2e::mp4_top_level_boxes(&r.bytes().await.unwrap()).contains(&"moov".to_string()));
    }
    assert_eq!(staged(&cluster), Vec::<std::path::PathBuf>::new());
    let metrics = cluster.metrics(&cluster.manager.url).await;
    let count = |event: &str| {
        let line = format!("manager_runner_jobs_total{{event=\"{event}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    // The raced job's accept and abort, then each movie accepted and sealed once.
    assert_eq!(
        (
            count("accepted"),
            count("aborted"),
            count("sealed"),
            count("refused")
        ),
        (1.0 + ids.len() as f64, 1.0, ids.len() as f64, 0.0),
        "{metrics}"
    );
    for t in [&t1, &t2] {
        assert_eq!(
            files_under(&t.state.join("work")),
            Vec::<std::path::PathBuf>::new(),
            "{}",
            t.name
        );
    }
    assert!(t1.stop() && t2.stop(), "workers stop cleanly on SIGTERM");

    // The admin lists the workers, makes one-time tokens and revokes.
    let base = &cluster.manager.url;
    let (s, cookie) = e2e::form_login(
        base,
        "/login",
        &cluster.operator_email,
        &cluster.operator_password,
    )
    .await;
    assert_eq!(s, 303);
    let cookie = cookie.expect("a session cookie");
    let page = cluster
        .client()
        .get(format!("{base}/admin/jobs"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("data-worker=\"t1\"") && page.contains("data-worker=\"t2\""),
        "{page}"
    );
    let csrf = {
        let at = page.find("name=\"csrf\" value=\"").unwrap() + 19;
        page[at..at + page[at..].find('"').unwrap()].to_string()
    };
    let page = cluster
        .client()
        .post(format!("{base}/admin/transcoders/token"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = page.find("id=\"new-token\"").expect("the token shown");
    let at = page[at..].find("<code>slmt_").unwrap() + at + 6;
    let token = page[at..at + page[at..].find('<').unwrap()].to_string();
    assert!(
        !page[..page.find("</title>").unwrap()].contains("slmt_"),
        "the token stays out of the title (history, synced tabs)"
    );
    let r3 = Raw::register_with(&cluster, "r3", &token).await.unwrap();
    assert_eq!(r3.request().await.0, 204);
    // Used once; a made-up one is as good.
    for t in [token.as_str(), "slmt_made-up"] {
        let (s, v) = Raw::register_with(&cluster, "r4", t).await.err().unwrap();
        assert_eq!(
            (s, error_code(&v)),
            (401, Some("registration_token_invalid")),
            "{v}"
        );
    }
    // A live name is not taken over with a new token.
    let fresh = cluster.manager_cli(&["transcoder-token"]);
    let (s, v) = Raw::register_with(&cluster, "r3", &fresh)
        .await
        .err()
        .unwrap();
    assert_eq!((s, error_code(&v)), (409, Some("worker_name_taken")), "{v}");
    // Forged: a known name with a made-up secret, an unknown name.
    let forged = Raw {
        secret: vec![7u8; 32],
        base: r3.base.clone(),
        name: "r3".into(),
        http: cluster.client(),
    };
    let (s, v) = forged.request().await;
    assert_eq!(
        (s, error_code(&v)),
        (401, Some("auth_bad_signature")),
        "{v}"
    );
    let unknown = Raw {
        name: "nobody".into(),
        ..forged
    };
    let (s, v) = unknown.request().await;
    assert_eq!((s, error_code(&v)), (401, Some("auth_unknown_key")), "{v}");
    let r = cluster
        .client()
        .post(format!("{base}/api/v1/runners/jobs/request"))
        .send()
        .await
        .unwrap();
    let (s, v) = status_json(r).await;
    assert_eq!((s, error_code(&v)), (401, Some("auth_missing")), "{v}");
    // Revoked in the admin: its next call is refused.
    let r = cluster
        .client()
        .post(format!("{base}/admin/transcoders/r3/revoke"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, v) = r3.request().await;
    assert_eq!((s, error_code(&v)), (401, Some("worker_revoked")), "{v}");
    // The fresh token registers the revoked name again, with a new secret.
    let again = Raw::register_with(&cluster, "r3", &fresh).await.unwrap();
    assert_ne!(again.secret, r3.secret);
    assert_eq!(again.request().await.0, 204);
    assert_eq!(r3.request().await.0, 401, "the old secret stays refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_results_are_refused_and_a_killed_worker_s_job_is_finished_by_another_once() {
    let mut opts = remote_only();
    // Long enough a transcode to kill a worker in the middle of it.
    opts.transcode_extra = "workers = 0\npreset = \"medium\"\n".into();
    let cluster = Cluster::start_with(&opts);
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("long.avi");
    e2e::make_long_movie(&long);
    let id = upload(&cluster, &long, "long").await;

    // 1. A broken result (not an MP4): refused, the job queued again.
    let raw = Raw::register(&cluster, "raw").await;
    let job = raw.take(Duration::from_secs(30)).await;
    assert_eq!(job["id"].as_str(), Some(id.as_str()));
    assert_eq!(
        job["source_bytes"].as_u64(),
        Some(std::fs::metadata(&long).unwrap().len())
    );
    assert!(
        (job["duration_secs"].as_f64().unwrap() - 20.0).abs() < 0.5,
        "{job}"
    );
    let source = raw
        .send(
            reqwest::Method::GET,
            &format!(
                "/api/v1/runners/jobs/{id}/source?lease={}",
                job["lease"].as_str().unwrap()
            ),
            &shared::content_sha256_hex(b""),
            Vec::new(),
        )
        .await;
    assert_eq!(source.status(), 200);
    assert_eq!(source.bytes().await.unwrap(), std::fs::read(&long).unwrap());
    let (s, v) = raw.success(&job, vec![0x42; 100_000]).await;
    assert_eq!((s, error_code(&v)), (422, Some("result_refused")), "{v}");
    assert_eq!(cluster.asset(&id).await["state"], "queued");
    // Its lease is spent: the same result again is not its to send.
    let (s, v) = raw.success(&job, vec![0x42; 10]).await;
    assert_eq!((s, error_code(&v)), (409, Some("job_lost")), "{v}");
    assert_eq!(
        staged(&cluster).len(),
        1,
        "only the source stays: {:?}",
        staged(&cluster)
    );

    // 2. A well-made MP4 of another movie (4 s, not 20): refused too.
    let other = dir.path().join("other.mp4");
    e2e::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-t",
        "4",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-movflags",
        "+faststart",
        other.to_str().unwrap(),
    ]);
    let job = raw.take(Duration::from_secs(60)).await;
    let (s, v) = raw.success(&job, std::fs::read(&other).unwrap()).await;
    assert_eq!((s, error_code(&v)), (422, Some("result_refused")), "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("lasts"),
        "{v}"
    );
    assert_eq!(cluster.asset(&id).await["state"], "queued");

    // 3. A real worker takes it and is killed mid-transcode.
    let mut t1 = cluster.start_transcoder("t1");
    cluster.wait_transcoding(&id).await;
    assert_eq!(accepted(&t1.log_text()), vec![id.clone()]);
    t1.kill9();
    let killed = Instant::now();

    // Another worker gets it once the lease lapses, and finishes it.
    let t2 = cluster.start_transcoder("t2");
    let deadline = Instant::now() + Duration::from_secs(90);
    while accepted(&t2.log_text()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "t2 never got the job: {}",
            t2.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let takeover = killed.elapsed();
    // A second worker on the same state folder refuses to start.
    let mut twin = e2e::Transcoder::run("t2", t2.state.clone(), dir.path().join("twin.log"));
    let status = twin
        .wait_exit(Duration::from_secs(30))
        .expect("the twin exits");
    assert!(!status.success());
    assert!(
        twin.log_text().contains("another transcoder is running"),
        "{}",
        twin.log_text()
    );
    assert!(
        takeover <= Duration::from_secs(45),
        "taken over after {takeover:?}"
    );
    eprintln!(
        "the job went to t2 {:.1} s after t1 was killed",
        takeover.as_secs_f64()
    );
    let v = cluster.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(v["state"], "published", "{v}");
    assert_eq!(accepted(&t2.log_text()), vec![id.clone()]);
    for (i, node) in cluster.nodes.iter().enumerate() {
        let inv = cluster.node_inventory(i).await;
        assert_eq!(
            inv["blobs"].as_array().map(Vec::len),
            Some(1),
            "{}: {inv}",
            node.proc.name
        );
    }
    assert_eq!(staged(&cluster), Vec::<std::path::PathBuf>::new());
    // The killed worker's leftovers go when it runs again.
    let mut t1 = e2e::Transcoder::run("t1", t1.state.clone(), dir.path().join("t1-again.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !files_under(&t1.state.join("work")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            files_under(&t1.state.join("work"))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t1.stop());

    // 4. Revoked: the running worker's next call is refused and it stops.
    let mut t2 = t2;
    cluster.manager_cli(&["transcoder-revoke", "--name", "t2"]);
    let status = t2
        .wait_exit(Duration::from_secs(30))
        .expect("t2 stops when revoked");
    assert!(!status.success());
    assert!(
        t2.log_text().contains("worker_revoked"),
        "{}",
        t2.log_text()
    );
}
