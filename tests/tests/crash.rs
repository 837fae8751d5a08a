//! A job survives a crash: the manager is killed with SIGKILL in the middle
//! of a transcode, started again, and the movie is published exactly once,
//! with one verified copy per node and nothing left in staging.

use std::time::{Duration, Instant};

use e2e::{ffmpeg, files_under, Cluster, ClusterOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_killed_mid_transcode_finishes_the_job_once_after_restart() {
    // A slow preset and a longer, larger input keep the transcode running
    // long enough to be interrupted.
    let mut opts = ClusterOpts::new(&["utah", "toronto"]);
    opts.transcode_extra = "preset = \"slow\"\n".into();
    let mut cluster = Cluster::start_with(&opts);

    let input = cluster.dir.path().join("long.mp4");
    e2e::make_long_movie(&input);
    let (status, body) = cluster.upload(&input, "Crash course").await.unwrap();
    assert_eq!(status, 202, "{body}");
    let id = body["asset_id"].as_str().unwrap().to_string();

    // Wait until the transcode is under way, then pull the plug.
    let client = cluster.client();
    cluster.wait_transcoding(&id).await;
    cluster.manager.kill9();
    let staged: Vec<_> = files_under(&cluster.manager_data.join("staging"));
    assert!(
        staged.iter().any(|p| p.to_string_lossy().ends_with(".src")),
        "source kept for the retry: {staged:?}"
    );

    cluster.restart_manager();
    let asset = cluster.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(asset["state"], "published", "{asset}");
    assert!(
        asset["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "verified"),
        "{asset}"
    );
    // SQLite's one process requeues at start; on PostgreSQL, where a
    // standby may share the database, the job waits for its lease to
    // lapse (tests/tests/standby.rs).
    assert!(
        e2e::on_postgres()
            || cluster
                .manager
                .log_text()
                .contains("requeued jobs interrupted"),
        "{}",
        cluster.manager.log_text()
    );

    // Exactly once: one asset, one blob per node, nothing left over.
    let mine = cluster.my_assets().await;
    assert_eq!(mine.len(), 1);
    for node in &cluster.nodes {
        assert_eq!(node.held_blobs().await.len(), 1, "{}", node.proc.name);
    }
    assert!(files_under(&cluster.manager_data.join("staging")).is_empty());
    assert!(files_under(&cluster.manager_data.join("outbox")).is_empty());
    let media_url = asset["media_url"].as_str().unwrap();
    let head = client.head(media_url).send().await.unwrap();
    assert_eq!(head.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploader_cancels_a_running_transcode() {
    let cluster = Cluster::start(&["utah", "toronto"]);
    let input = cluster.dir.path().join("long.avi");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=1280x720:rate=30",
        "-t",
        "30",
        "-c:v",
        "mpeg4",
        "-q:v",
        "5",
        input.to_str().unwrap(),
    ]);
    let (_, body) = cluster.upload(&input, "Never mind").await.unwrap();
    let id = body["asset_id"].as_str().unwrap().to_string();
    let client = cluster.client();
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster.asset(&id).await["state"] != "transcoding" {
        assert!(Instant::now() < deadline, "never started transcoding");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = client
        .post(format!("{}/api/v1/assets/{id}/cancel", cluster.manager.url))
        .bearer_auth(&cluster.api_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let asset = cluster.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(asset["state"], "rejected", "{asset}");
    assert_eq!(asset["error"]["code"], "cancelled", "{asset}");
    assert!(files_under(&cluster.manager_data.join("staging")).is_empty());
    for node in &cluster.nodes {
        assert!(node.held_blobs().await.is_empty());
    }
    // Too late now, with a code.
    let r = client
        .post(format!("{}/api/v1/assets/{id}/cancel", cluster.manager.url))
        .bearer_auth(&cluster.api_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    // Retry is for operators' use on processing_failed only.
    let r = client
        .post(format!("{}/api/v1/assets/{id}/retry", cluster.manager.url))
        .bearer_auth(&cluster.api_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
}

/// A crash between moving a sealed blob into the outbox and recording it
/// leaves a file no movie names (its data key died with the process): it
/// is removed at the next start, and a sealed blob a movie does name stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_file_no_movie_names_is_removed_at_start() {
    let mut cluster = Cluster::start(&["utah", "toronto"]);
    let input = cluster.dir.path().join("in.webm");
    e2e::make_webm(&input);
    let (s, v) = cluster.upload(&input, "Kept").await.unwrap();
    assert_eq!(s, 202, "{v}");
    let id = v["asset_id"].as_str().unwrap().to_string();
    let v = cluster.wait_terminal(&id, Duration::from_secs(240)).await;
    assert_eq!(v["state"], "published", "{v}");
    cluster.manager.kill9();
    let outbox = cluster.manager_data.join("outbox");
    let kept: Vec<_> = files_under(&outbox);
    let orphan = outbox.join(format!("{}.sealed", "ab".repeat(32)));
    std::fs::write(&orphan, b"sealed bytes whose key is gone").unwrap();
    // Left by the crash minutes ago. On PostgreSQL, where another manager
    // may share the outbox, a file younger than two job leases may be
    // one a leader is just recording: it is left for a later start.
    std::fs::File::options()
        .write(true)
        .open(&orphan)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(180))
        .unwrap();
    let young = outbox.join(format!("{}.sealed", "cd".repeat(32)));
    if e2e::on_postgres() {
        std::fs::write(&young, b"sealed a moment ago").unwrap();
    }
    cluster.restart_manager();
    let deadline = Instant::now() + Duration::from_secs(60);
    while orphan.exists() {
        assert!(
            Instant::now() < deadline,
            "the orphan is still there\n{}",
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cluster
        .manager
        .log_text()
        .contains("removed a sealed blob no movie names"));
    for f in kept {
        assert!(f.exists(), "{} was a movie's", f.display());
    }
    assert_eq!(young.exists(), e2e::on_postgres());
}

/// An upload is acknowledged only once its staged file's new name is on
/// disk: after the rename into staging, the staging folder is fsynced
/// before the `202` (a power cut right after the answer must not lose the
/// movie the uploader was told we have). Watched with strace on the real
/// manager process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_acknowledged_after_its_name_is_durable() {
    let cluster = Cluster::start(&["utah", "toronto"]);
    let trace = cluster.dir.path().join("strace.txt");
    let mut strace = std::process::Command::new("strace")
        .args([
            "-f",
            "-y",
            "-e",
            "trace=rename,renameat,renameat2,fsync,fdatasync",
        ])
        .arg("-o")
        .arg(&trace)
        .args(["-p", &cluster.manager.pid().to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("strace (installed by scripts/setup test)");
    // strace announces nothing on stdout; give it a moment to attach.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let input = cluster.dir.path().join("in.webm");
    e2e::make_webm(&input);
    let (s, v) = cluster.upload(&input, "Durable").await.unwrap();
    assert_eq!(s, 202, "{v}");
    let id = v["asset_id"].as_str().unwrap().to_string();
    // SIGINT: strace detaches and flushes its output.
    let _ = std::process::Command::new("kill")
        .args(["-INT", &strace.id().to_string()])
        .status();
    let _ = strace.wait();
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let renamed = lines
        .iter()
        .position(|l| l.contains("rename") && l.contains(&format!("{id}.src")))
        .unwrap_or_else(|| panic!("no rename to {id}.src in:\n{text}"));
    let staging = cluster.manager_data.join("staging");
    let staging = staging.to_str().unwrap();
    assert!(
        lines[renamed..]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains(&format!("<{staging}>"))),
        "the staging folder is not fsynced after the rename:\n{text}"
    );
}
