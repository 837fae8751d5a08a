//! A transcode worker: runs on a machine of its own and does the manager's
//! transcodes (docs/operations.md, "Transcode workers"; the manager's side
//! is manager/src/runners.rs).
//!
//! `transcoder register` redeems a one-time token from the admin for this
//! worker's secret and writes it to the state folder (mode 0600);
//! `transcoder run` then asks for jobs, one at a time (a transcode already
//! uses every core: run one per machine), downloads the source, transcodes
//! it with the same media crate the manager uses, and sends the result
//! back. It reports progress every few seconds, which keeps its lease: if
//! it dies, the job goes to another worker (or the manager) once the lease
//! lapses. It holds no database access and no keys; the manager checks
//! and seals the result itself.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use shared::protocol::{
    RunnerCredentials, RunnerFailure, RunnerJob, RunnerOffer, RunnerProgress, RunnerProgressAnswer,
    RunnerRegistration,
};

#[derive(Parser)]
#[command(version, about = "A transcode worker for the manager")]
struct Cli {
    /// Where this worker keeps its credentials (`transcoder.toml`) and its
    /// files while it works.
    #[arg(
        long,
        env = "TRANSCODER_STATE",
        default_value = "/var/lib/slmedia-transcoder"
    )]
    state: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Redeem a registration token made in the admin (jobs page) or with
    /// `manager transcoder-token`.
    Register {
        /// The manager's address, as its uploaders reach it.
        #[arg(long)]
        manager: String,
        /// The one-time registration token.
        #[arg(long, env = "TRANSCODER_TOKEN")]
        token: String,
        /// This worker's name: letters, digits, '.', '_', '-'.
        #[arg(long)]
        name: String,
    },
    /// Take and do jobs until stopped (SIGTERM or Ctrl-C give the job in
    /// hand back to the queue).
    Run {
        /// Seconds between asks while the queue is empty.
        #[arg(long, default_value_t = 2)]
        poll_secs: u64,
    },
}

/// What `register` writes and `run` reads.
#[derive(serde::Serialize, serde::Deserialize)]
struct Credentials {
    manager: String,
    name: String,
    /// Hex; the HMAC key of every call.
    secret: String,
}

fn credentials_path(state: &Path) -> PathBuf {
    state.join("transcoder.toml")
}

fn main() -> std::process::ExitCode {
    if let Err(msg) = shared::runtime::check_build_cpu("transcoder") {
        eprintln!("{msg}");
        return std::process::ExitCode::from(2);
    }
    shared::runtime::init_tracing();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Register {
                manager,
                token,
                name,
            } => register(&cli.state, &manager, &token, &name).await,
            Command::Run { poll_secs } => {
                run(&cli.state, Duration::from_secs(poll_secs.max(1))).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// How long a transfer may go without a byte before it is given up.
const STALL: Duration = Duration::from_secs(60);

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?)
}

/// The manager's refusal as `code: message`, from its JSON error body.
async fn refusal(r: reqwest::Response) -> String {
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    match (v["error"]["code"].as_str(), v["error"]["message"].as_str()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        _ => format!("HTTP {status}"),
    }
}

fn refusal_code(text: &str) -> &str {
    text.split(':').next().unwrap_or("")
}

/// Whether a refusal means this worker may not call at all (revoked, or
/// its secret no longer the manager's): it stops rather than hammer. A
/// stale date (this machine's clock) is not: it is logged and retried.
fn refused_for_good(text: &str) -> bool {
    matches!(
        refusal_code(text),
        "worker_revoked"
            | "auth_bad_signature"
            | "auth_unknown_key"
            | "auth_missing"
            | "auth_malformed"
    )
}

async fn register(state: &Path, manager: &str, token: &str, name: &str) -> anyhow::Result<()> {
    let manager = manager.trim_end_matches('/').to_string();
    let r = client()?
        .post(format!("{manager}/api/v1/runners/register"))
        .timeout(Duration::from_secs(30))
        .json(&RunnerRegistration {
            token: token.trim().to_string(),
            name: name.to_string(),
        })
        .send()
        .await
        .with_context(|| format!("cannot reach the manager at {manager}"))?;
    if !r.status().is_success() {
        anyhow::bail!("registration refused: {}", refusal(r).await);
    }
    let creds: RunnerCredentials = r.json().await.context("unreadable answer")?;
    std::fs::create_dir_all(state).with_context(|| format!("cannot create {}", state.display()))?;
    let text = toml::to_string(&Credentials {
        manager,
        name: creds.name.clone(),
        secret: creds.secret,
    })?;
    write_private(&credentials_path(state), text.as_bytes())?;
    println!(
        "registered as {}; credentials in {}",
        creds.name,
        credentials_path(state).display()
    );
    Ok(())
}

/// Writes a file only its owner may read, replacing any earlier one whole.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Signs and sends calls to the manager as this worker.
struct Manager {
    http: reqwest::Client,
    base: String,
    name: String,
    secret: Vec<u8>,
}

impl Manager {
    fn request(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        content_sha256: &str,
    ) -> reqwest::RequestBuilder {
        let now = shared::runtime::unix_now();
        let auth = shared::sign_request(
            &self.secret,
            &self.name,
            method.as_str(),
            path_and_query,
            now,
            content_sha256,
        );
        self.http
            .request(method, format!("{}{path_and_query}", self.base))
            .header(shared::AUTH_HEADER, auth)
            .header(shared::DATE_HEADER, now.to_string())
    }

    /// A signed POST with a small JSON body.
    async fn post_json<T: serde::Serialize>(
        &self,
        path_and_query: &str,
        body: &T,
    ) -> reqwest::Result<reqwest::Response> {
        let bytes = serde_json::to_vec(body).expect("serializable");
        self.request(
            reqwest::Method::POST,
            path_and_query,
            &shared::content_sha256_hex(&bytes),
        )
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .timeout(Duration::from_secs(60))
        .body(bytes)
        .send()
        .await
    }
}

/// Why a job's run stopped early.
#[derive(Default)]
struct Flags {
    /// Stop asked (a signal), or the uploader cancelled: give the job back.
    cancel: AtomicBool,
    /// The job is no longer ours: drop it without a word.
    lost: AtomicBool,
    /// This worker was revoked or its secret refused: stop altogether.
    refused: AtomicBool,
}

async fn run(state: &Path, poll: Duration) -> anyhow::Result<()> {
    let path = credentials_path(state);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (run `transcoder register` first)",
            path.display()
        )
    })?;
    let creds: Credentials =
        toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
    let secret = hex::decode(creds.secret.trim()).context("the secret is not hex")?;
    let m = Arc::new(Manager {
        http: client()?,
        base: creds.manager.trim_end_matches('/').to_string(),
        name: creds.name,
        secret,
    });
    // One worker per state folder: a second would empty the first one's
    // work folder below. The kernel drops the lock however this ends.
    let lock = std::fs::File::create(state.join("run.lock"))
        .with_context(|| format!("cannot write in {}", state.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "another transcoder is running on {}; give each its own --state",
            state.display()
        );
    }
    let work = state.join("work");
    // Files of a run cut short (this worker killed) are nobody's now.
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    media::init().map_err(|e| anyhow::anyhow!("{e}"))?;
    let stopping = Arc::new(AtomicBool::new(false));
    let current: Arc<std::sync::Mutex<Option<Arc<Flags>>>> = Arc::default();
    {
        let (stopping, current) = (stopping.clone(), current.clone());
        tokio::spawn(async move {
            shared::runtime::shutdown_signal().await;
            tracing::info!("stopping: the job in hand goes back to the queue");
            stopping.store(true, Ordering::SeqCst);
            if let Some(f) = current.lock().unwrap().as_ref() {
                f.cancel.store(true, Ordering::SeqCst);
            }
        });
    }
    tracing::info!(worker = %m.name, manager = %m.base, "transcode worker ready");
    // Calls that failed in a row, and jobs this worker failed in a row: a
    // worker that fails every job (its disk full, a broken FFmpeg) waits
    // longer and longer, so it does not use up every job's attempts.
    let (mut failures, mut failed_jobs) = (0u32, 0u32);
    while !stopping.load(Ordering::SeqCst) {
        let mut wait = poll;
        match next_job(&m).await {
            Ok(Some(job)) => {
                failures = 0;
                let flags = Arc::new(Flags::default());
                *current.lock().unwrap() = Some(flags.clone());
                if stopping.load(Ordering::SeqCst) {
                    flags.cancel.store(true, Ordering::SeqCst);
                }
                let done = do_job(&m, &work, &job, &flags).await;
                *current.lock().unwrap() = None;
                if flags.refused.load(Ordering::SeqCst) {
                    anyhow::bail!("the manager refuses this worker's calls (revoked?)");
                }
                if done {
                    failed_jobs = 0;
                    continue;
                }
                failed_jobs += 1;
                wait = Duration::from_secs(30 * u64::from(failed_jobs.min(20)));
                tracing::warn!(
                    in_a_row = failed_jobs,
                    "waiting {} s before the next job",
                    wait.as_secs()
                );
            }
            Ok(None) => failures = 0,
            Err(e) => {
                if refused_for_good(&e.to_string()) {
                    anyhow::bail!("the manager refuses this worker: {e}");
                }
                failures += 1;
                tracing::warn!("cannot ask for a job: {e:#}");
                // Back off while the manager is unreachable, up to a minute.
                wait = (poll * 2u32.saturating_pow(failures.min(5))).min(Duration::from_secs(60));
            }
        }
        let until = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < until && !stopping.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Asks for a job and accepts it; `None` when there is none (or another
/// worker took the one offered first).
async fn next_job(m: &Manager) -> anyhow::Result<Option<RunnerJob>> {
    let r = m
        .post_json("/api/v1/runners/jobs/request", &serde_json::json!({}))
        .await?;
    if r.status() == reqwest::StatusCode::NO_CONTENT {
        return Ok(None);
    }
    if !r.status().is_success() {
        anyhow::bail!("{}", refusal(r).await);
    }
    let offer: RunnerOffer = r.json().await?;
    let r = m
        .post_json(
            &format!("/api/v1/runners/jobs/{}/accept", offer.id),
            &serde_json::json!({}),
        )
        .await?;
    if r.status() == reqwest::StatusCode::CONFLICT {
        let why = refusal(r).await;
        tracing::info!(job = %offer.id, "not ours: {why}");
        return Ok(None);
    }
    if !r.status().is_success() {
        anyhow::bail!("{}", refusal(r).await);
    }
    Ok(Some(r.json().await?))
}

/// One job from download to result, always ending with one call that says
/// how it ended (success, error or abort), unless the job was lost.
/// `false` when this worker failed it: its transcode failed, or the
/// manager refused its result.
async fn do_job(m: &Arc<Manager>, work: &Path, job: &RunnerJob, flags: &Arc<Flags>) -> bool {
    use tracing::Instrument;
    let span = tracing::info_span!("job", id = %job.id);
    do_job_in_span(m, work, job, flags).instrument(span).await
}

async fn do_job_in_span(
    m: &Arc<Manager>,
    work: &Path,
    job: &RunnerJob,
    flags: &Arc<Flags>,
) -> bool {
    tracing::info!(bytes = job.source_bytes, "accepted");
    let progress = Arc::new(AtomicU32::new(0f32.to_bits()));
    let keeper = tokio::spawn(keep_lease(
        m.clone(),
        job.clone(),
        progress.clone(),
        flags.clone(),
    ));
    let src = work.join(format!("{}.src", job.id));
    let out = work.join(format!("{}.mp4", job.id));
    let outcome = transcode_job(m, job, &src, &out, &progress, flags).await;
    let q = format!("?lease={}", job.lease);
    let base = format!("/api/v1/runners/jobs/{}", job.id);
    let mut failed = outcome.is_err();
    let said = if flags.lost.load(Ordering::SeqCst) || flags.refused.load(Ordering::SeqCst) {
        tracing::warn!("the job is no longer this worker's; dropped");
        Ok(())
    } else if flags.cancel.load(Ordering::SeqCst) {
        tracing::info!("giving the job back");
        say(m
            .post_json(&format!("{base}/abort{q}"), &serde_json::json!({}))
            .await)
        .await
    } else {
        match outcome {
            Ok(()) => match send_result(m, job, &out, flags).await {
                Err(e) if flags.cancel.load(Ordering::SeqCst) => {
                    tracing::info!("{e}; giving the job back");
                    say(m
                        .post_json(&format!("{base}/abort{q}"), &serde_json::json!({}))
                        .await)
                    .await
                }
                other => other,
            },
            Err((code, message)) => {
                tracing::warn!(%code, "transcode failed: {message}");
                say(m
                    .post_json(
                        &format!("{base}/error{q}"),
                        &RunnerFailure { code, message },
                    )
                    .await)
                .await
            }
        }
    };
    keeper.abort();
    if let Err(e) = &said {
        failed |= matches!(refusal_code(e), "result_refused" | "result_corrupt");
    }
    if let Err(e) = said {
        // Nothing more to do: the lease lapses and the job is offered again.
        tracing::warn!("the manager did not take the job's end: {e}");
    }
    let _ = tokio::fs::remove_file(&src).await;
    let _ = tokio::fs::remove_file(&out).await;
    !failed
}

/// Returns once `flags` says stop.
async fn cancelled(flags: &Flags) {
    while !flags.cancel.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn say(r: reqwest::Result<reqwest::Response>) -> Result<(), String> {
    let r = r.map_err(|e| e.to_string())?;
    if r.status().is_success() {
        Ok(())
    } else {
        Err(refusal(r).await)
    }
}

/// Reports progress every sixth of the lease, which renews it; notes a
/// cancel, a lost job or a refused worker in `flags`.
async fn keep_lease(m: Arc<Manager>, job: RunnerJob, progress: Arc<AtomicU32>, flags: Arc<Flags>) {
    let every = Duration::from_secs((job.lease_secs.max(6) / 6) as u64);
    let path = format!(
        "/api/v1/runners/jobs/{}/progress?lease={}",
        job.id, job.lease
    );
    loop {
        tokio::time::sleep(every).await;
        let p = f32::from_bits(progress.load(Ordering::Relaxed)) as f64;
        match m.post_json(&path, &RunnerProgress { progress: p }).await {
            Ok(r) if r.status().is_success() => {
                if let Ok(a) = r.json::<RunnerProgressAnswer>().await {
                    if a.cancel {
                        tracing::info!("the uploader cancelled");
                        flags.cancel.store(true, Ordering::SeqCst);
                    }
                }
            }
            Ok(r) => {
                let status = r.status();
                let why = refusal(r).await;
                if status == reqwest::StatusCode::UNAUTHORIZED && refused_for_good(&why) {
                    tracing::error!("the manager refuses this worker: {why}");
                    flags.refused.store(true, Ordering::SeqCst);
                    flags.cancel.store(true, Ordering::SeqCst);
                    return;
                }
                if refusal_code(&why) == "job_lost" {
                    flags.lost.store(true, Ordering::SeqCst);
                    flags.cancel.store(true, Ordering::SeqCst);
                    return;
                }
                tracing::warn!("progress not taken: {why}");
            }
            Err(e) => tracing::warn!("cannot report progress: {e}"),
        }
    }
}

/// Downloads the source and transcodes it; `Err((code, message))` when it
/// cannot be done (not when stopped: `flags` says that).
async fn transcode_job(
    m: &Manager,
    job: &RunnerJob,
    src: &Path,
    out: &Path,
    progress: &Arc<AtomicU32>,
    flags: &Arc<Flags>,
) -> Result<(), (String, String)> {
    download(m, job, src, flags)
        .await
        .map_err(|e| ("download_failed".to_string(), format!("{e:#}")))?;
    if flags.cancel.load(Ordering::SeqCst) {
        return Ok(());
    }
    let profile = media::Profile {
        max_width: job.max_width,
        max_height: job.max_height,
        crf: job.crf,
        preset: job.preset.clone(),
        ..media::Profile::default()
    };
    // The transcode watches a flag of its own, set from `flags` below.
    let cancel = Arc::new(AtomicBool::new(false));
    let handle = {
        let (src, out, cancel, progress) = (
            src.to_path_buf(),
            out.to_path_buf(),
            cancel.clone(),
            progress.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut report = |p: f32| progress.store(p.to_bits(), Ordering::Relaxed);
            media::transcode(&src, &out, &profile, &mut report, &cancel)
        })
    };
    let mut handle = std::pin::pin!(handle);
    let started = std::time::Instant::now();
    let result = loop {
        tokio::select! {
            r = &mut handle => break r,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                if flags.cancel.load(Ordering::SeqCst) {
                    cancel.store(true, Ordering::SeqCst);
                }
            }
        }
    };
    match result {
        Ok(Ok(o)) => {
            tracing::info!(
                secs = started.elapsed().as_secs_f64(),
                width = o.width,
                height = o.height,
                "transcoded"
            );
            Ok(())
        }
        Ok(Err(_)) if flags.cancel.load(Ordering::SeqCst) => Ok(()),
        Ok(Err(e)) => Err((e.code().to_string(), e.to_string())),
        Err(e) => Err(("transcode_panicked".to_string(), e.to_string())),
    }
}

async fn download(m: &Manager, job: &RunnerJob, to: &Path, flags: &Flags) -> anyhow::Result<()> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let path = format!("/api/v1/runners/jobs/{}/source?lease={}", job.id, job.lease);
    let r = m
        .request(
            reqwest::Method::GET,
            &path,
            &shared::content_sha256_hex(b""),
        )
        .send()
        .await?;
    if !r.status().is_success() {
        anyhow::bail!("source refused: {}", refusal(r).await);
    }
    let mut file = tokio::fs::File::create(to)
        .await
        .with_context(|| format!("cannot write {}", to.display()))?;
    let mut body = r.bytes_stream();
    let mut got = 0u64;
    loop {
        let chunk = tokio::select! {
            c = body.next() => c,
            _ = cancelled(flags) => return Ok(()),
            // A stalled download would hold the job for ever: its lease is
            // renewed for as long as this worker lives.
            _ = tokio::time::sleep(STALL) => anyhow::bail!("the source download stalled for {} s", STALL.as_secs()),
        };
        let Some(chunk) = chunk else { break };
        let chunk = chunk?;
        got += chunk.len() as u64;
        // The manager said how big the source is; more is not it.
        if got > job.source_bytes {
            anyhow::bail!(
                "the source is longer than the {} bytes announced",
                job.source_bytes
            );
        }
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    if got != job.source_bytes {
        anyhow::bail!(
            "the source download stopped at {got} of {} bytes",
            job.source_bytes
        );
    }
    Ok(())
}

/// Sends the result, signed with its SHA-256; the manager checks and seals
/// it before answering, which for a long movie takes a while.
async fn send_result(
    m: &Manager,
    job: &RunnerJob,
    out: &Path,
    flags: &Flags,
) -> Result<(), String> {
    let file = out.to_path_buf();
    let (sha, len) = tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
        use sha2::Digest;
        use std::io::Read;
        let mut f = std::fs::File::open(&file)?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            len += n as u64;
            h.update(&buf[..n]);
        }
        Ok((hex::encode(h.finalize()), len))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot read the result: {e}"))?;
    let f = tokio::fs::File::open(out)
        .await
        .map_err(|e| format!("cannot read the result: {e}"))?;
    let body =
        reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024));
    let path = format!(
        "/api/v1/runners/jobs/{}/success?lease={}",
        job.id, job.lease
    );
    tracing::info!(bytes = len, "sending the result");
    let send = m
        .request(reqwest::Method::POST, &path, &sha)
        .header("x-content-sha256", &sha)
        .header(reqwest::header::CONTENT_LENGTH, len)
        .header(reqwest::header::CONTENT_TYPE, "video/mp4")
        .timeout(Duration::from_secs(3600))
        .body(body)
        .send();
    // Stopping: the upload is dropped (the manager keeps nothing of it) and
    // the job given back; one already whole is sealed by the manager.
    let r = tokio::select! {
        r = send => r,
        _ = cancelled(flags) => return Err("stopped while sending the result".into()),
    };
    let said = say(r).await;
    if said.is_ok() {
        tracing::info!("result taken");
    }
    said
}
