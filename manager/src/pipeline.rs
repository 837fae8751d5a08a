//! The ingest pipeline: probe → transcode → seal → replicate → publish.
//!
//! Jobs are rows in `assets`, not in memory. A worker claims one under a
//! lease it renews every 5 s while any step runs ([`catalog::claim_next`], [`catalog::renew_lease`]); a
//! crash or restart requeues any asset caught mid-step and the step runs
//! again from the staged source, which is deleted only after the sealed blob
//! is recorded. Internal failures back off and give up after
//! `MAX_JOB_ATTEMPTS` (`processing_failed`, source kept for an operator
//! retry); uploader cancels are noticed within a second. ffmpeg work runs on
//! the blocking pool, `transcode.workers` jobs at once (default 1: a
//! transcode already uses every core). Replication retries with backoff for
//! as long as a node lacks a verified copy, so a node that was down gets the
//! blob when it returns, with no operator action.
//!
//! The same loop repairs: a replica reconciliation (or a node's report)
//! found gone or quarantined is `repairing`, and is refilled from the outbox
//! copy while it exists, otherwise from a healthy node holding a verified
//! copy, streamed node → manager → node ([`crate::nodes::Nodes::copy`]). A
//! quarantined copy is never a source: it is not `verified`. With no
//! verified copy and no outbox copy left, the asset is `damaged`.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use shared::{BlobId, DataKey, Sealer};
use tokio::sync::watch;
use tracing::Instrument;

use crate::{
    catalog,
    domain::{AssetState, ReplicaState},
    media,
    nodes::Nodes,
    Config,
};

/// What ingest and replication work with; also the reconciler's, which
/// repairs through [`replicate_asset`].
pub struct Pipeline {
    /// Bytes in the outbox at the last [`trim_outbox`] (new jobs wait while
    /// it is past `outbox_max_mb`).
    pub outbox_bytes: std::sync::atomic::AtomicU64,
    pub db: catalog::SharedCatalog,
    /// Folders, transcode settings, media limits, `min_replicas`.
    pub cfg: Config,
    pub nodes: Nodes,
    pub master: Arc<shared::MasterKey>,
    /// Wakes a job loop when an upload lands, instead of waiting for its poll.
    pub wake: Arc<tokio::sync::Notify>,
}

pub type Ctx = Arc<Pipeline>;

pub fn source_path(st: &Pipeline, asset_id: &str) -> PathBuf {
    st.cfg.staging_dir().join(format!("{asset_id}.src"))
}

/// A job's intermediate files are named for the worker that holds it: a
/// holder fenced out late (a frozen process waking up) may still write a
/// moment before it notices, and must not write into its successor's file.
fn run_tag(worker: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(worker.as_bytes())[..4])
}

fn mp4_path(st: &Pipeline, asset_id: &str, worker: &str) -> PathBuf {
    st.cfg
        .staging_dir()
        .join(format!("{asset_id}.{}.mp4", run_tag(worker)))
}

pub fn outbox_path(st: &Pipeline, blob: &BlobId) -> PathBuf {
    st.cfg.outbox_dir().join(format!("{blob}.sealed"))
}

/// Deletes everything staged for an asset (source, intermediate MP4).
fn clear_staging(st: &Pipeline, asset_id: &str) {
    let _ = std::fs::remove_file(source_path(st, asset_id));
    // Every holder's intermediate files, this one's and any earlier's.
    let prefix = format!("{asset_id}.");
    if let Ok(dir) = std::fs::read_dir(st.cfg.staging_dir()) {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix)
                && (name.ends_with(".mp4") || name.ends_with(".sealed.part"))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Everything kept for an asset that will never play (its poster).
fn clear_rejected(st: &Pipeline, asset_id: &str) {
    clear_staging(st, asset_id);
    let _ = std::fs::remove_file(st.cfg.poster_dir().join(format!("{asset_id}.jpg")));
}

/// Internal failures tolerated before a job is given up (and reported).
const MAX_JOB_ATTEMPTS: i64 = 5;

/// Seconds a worker's claim on a job lasts without renewal (renewed every
/// second while it works).
pub(crate) const LEASE_SECS: i64 = 30;

/// Starts `transcode.workers` job loops and one replication loop; returns
/// when `stop` fires and they have all finished.
pub async fn run(st: Ctx, stop: watch::Receiver<bool>) {
    // The embedded SQLite database belongs to one manager process, so at
    // start every job caught mid-step was left by a process that is gone.
    // Managers sharing a PostgreSQL database rely on the leases instead: a
    // leader that lost its lead may still be finishing a step for a few
    // seconds, and its job is taken over only once its lease lapses.
    if !st.db.shared() {
        match st.db.requeue_interrupted().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "requeued jobs interrupted by the last shutdown"),
            Err(e) => tracing::error!("cannot requeue interrupted jobs: {e}"),
        }
    }
    if let Err(e) = clear_orphaned_outbox(&st).await {
        tracing::error!("cannot check the outbox for orphaned blobs: {e:#}");
    }
    // A JoinSet: when the leader aborts this task (it lost its lead and
    // the grace ran out), dropping the set aborts the loops too.
    let mut tasks = tokio::task::JoinSet::new();
    // Named host/transcode-N, as the console's queue shows the claimer,
    // with a mark of this process: the name fences the job's writes
    // (`Catalog::renew_lease`), and two managers may share a host name.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "manager".into());
    let mark = &uuid::Uuid::new_v4().simple().to_string()[..6];
    for i in 0..st.cfg.transcode.workers {
        let name = format!("{host}/transcode-{}#{mark}", i + 1);
        tasks.spawn(job_loop(st.clone(), stop.clone(), name));
    }
    tasks.spawn(replication_loop(st.clone(), stop));
    while tasks.join_next().await.is_some() {}
}

async fn job_loop(st: Ctx, mut stop: watch::Receiver<bool>, name: String) {
    // The transcode loops are one worker; a job's own failure is the job's
    // (its state and error), not the worker's.
    let worker = crate::workers::Worker::register("transcode");
    loop {
        if *stop.borrow() {
            worker.stopped();
            return;
        }
        let claimed = match why_no_new_jobs(&st) {
            Some(why) => {
                worker.progress(why.to_string());
                Ok(None)
            }
            None => st.db.claim_next(LEASE_SECS, &name).await,
        };
        match claimed {
            Ok(Some(asset)) => {
                worker.started();
                worker.progress(format!("processing {}", asset.id));
                process(&st, asset, &name, &stop).await;
                worker.finished(Ok::<(), String>(()));
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!("cannot read the job queue: {e}");
                worker.started();
                worker.finished(Err(format!("cannot read the job queue: {e}")));
            }
        }
        tokio::select! {
            _ = st.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => {
                worker.stopped();
                return;
            }
        }
    }
}

/// Why no job may start now, if one may not: a job started on a disk with
/// no room would fail for that alone and use up its attempts, so new jobs
/// wait while less than half the reserve is free. Transcodes may use the
/// upper half (uploads stop at the whole reserve), since publishing is what
/// frees sources. Transcode workers' results land here too.
pub(crate) fn why_no_new_jobs(st: &Pipeline) -> Option<&'static str> {
    let room = shared::runtime::disk_space(&st.cfg.staging_dir())
        .map(|d| d.free_bytes >= st.cfg.disk_reserve_mb.saturating_mul(1 << 19))
        .unwrap_or(true);
    let outbox_full = st.outbox_bytes.load(std::sync::atomic::Ordering::Acquire)
        > st.cfg.outbox_max_mb.saturating_mul(1 << 20);
    if !room {
        Some("waiting for free disk space (disk_reserve_mb)")
    } else if outbox_full {
        Some("waiting for the outbox to drain (outbox_max_mb)")
    } else {
        None
    }
}

/// Retries pushes on their own schedule, so busy transcoders never starve
/// a node that is waiting for its copy.
async fn replication_loop(st: Ctx, mut stop: watch::Receiver<bool>) {
    let worker = crate::workers::Worker::register("replication");
    let mut trimmed_at = tokio::time::Instant::now() - OUTBOX_TRIM_EVERY;
    loop {
        worker.started();
        replicate_due(&st).await;
        if trimmed_at.elapsed() >= OUTBOX_TRIM_EVERY {
            trimmed_at = tokio::time::Instant::now();
            if let Err(e) = trim_outbox(&st).await {
                tracing::error!("cannot keep the outbox to its bound: {e:#}");
            }
        }
        worker.finished(Ok::<(), String>(()));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => {
                worker.stopped();
                return;
            }
        }
    }
}

/// Renews a job's lease every few seconds for as long as it lives, so no
/// step (probe, transcode, poster, sealing a large file) outlasts the lease
/// and lets another worker take the same job.
pub(crate) struct LeaseKeeper(tokio::task::JoinHandle<()>);

impl LeaseKeeper {
    /// Renews `id`'s lease (to [`LEASE_SECS`] from now) every `every`.
    pub(crate) fn start(
        db: catalog::SharedCatalog,
        id: String,
        worker: String,
        every: Duration,
    ) -> LeaseKeeper {
        LeaseKeeper(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match db.renew_lease(&id, &worker, LEASE_SECS).await {
                    Ok(_) => {}
                    Err(sqlx::Error::RowNotFound) => {
                        // The job's next write fails the same way and ends it.
                        tracing::warn!(asset = %id, "another worker holds this job now (its lease lapsed)");
                        return;
                    }
                    Err(e) => tracing::warn!(asset = %id, "cannot renew the job's lease: {e}"),
                }
            }
        }))
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn process(st: &Pipeline, asset: catalog::Asset, worker: &str, stop: &watch::Receiver<bool>) {
    let id = asset.id.clone();
    let span = tracing::info_span!("job", asset = %id);
    let lease = LeaseKeeper::start(
        st.db.clone(),
        id.clone(),
        worker.to_string(),
        Duration::from_secs(LEASE_SECS as u64 / 6),
    );
    let outcome = run_steps(st, &asset, worker, stop).instrument(span).await;
    drop(lease);
    settle(st, &id, asset.attempts, worker, outcome).await;
}

/// Records how a job's run ended, whoever ran it (a job loop here or a
/// transcode worker elsewhere, `crate::runners`): `attempts` is the
/// job's count before this run.
pub(crate) async fn settle(
    st: &Pipeline,
    id: &str,
    attempts: i64,
    worker: &str,
    outcome: Result<(), StepError>,
) {
    let id = id.to_string();
    let outcome = match outcome {
        Err(StepError::Internal(e)) if catalog::lost_job(&e) => Err(StepError::Lost),
        other => other,
    };
    match outcome {
        Ok(()) => {}
        Err(StepError::Lost) => {
            // Its new holder works from the same staged source: leave
            // every file as it is.
            tracing::warn!(asset = %id, "job dropped here: another worker took it over after its lease lapsed");
        }
        Err(StepError::Rejected { code, message }) => {
            tracing::info!(code, "upload rejected: {message}");
            // Recorded first: a job that is another worker's now keeps
            // its files.
            match st.db.reject(&id, worker, code, &message).await {
                Ok(()) => clear_rejected(st, &id),
                Err(sqlx::Error::RowNotFound) => {
                    tracing::warn!(asset = %id, "rejection not recorded: another worker holds the job now")
                }
                Err(e) => tracing::error!("cannot record the rejection: {e}"),
            }
            metrics::counter!("manager_assets_total", "outcome" => "rejected").increment(1);
        }
        Err(StepError::Interrupted) => {
            tracing::info!("job interrupted by shutdown; it resumes at next start");
            if let Err(e) = st.db.requeue(&id, worker).await {
                tracing::error!("cannot requeue the job: {e}");
            }
        }
        Err(StepError::Internal(e)) => {
            // Not the uploader's fault: keep the source and retry later, so
            // one job that keeps failing never holds up the others.
            let attempts = attempts + 1;
            if attempts >= MAX_JOB_ATTEMPTS {
                // The source stays in staging so an operator can retry.
                tracing::error!(attempts, "job failed for good: {e:#}");
                let _ = st.db.reject(&id, worker, "processing_failed", "We could not process this file after several tries. The operator has been told; please try again later.").await;
                metrics::counter!("manager_assets_total", "outcome" => "failed").increment(1);
            } else {
                let delay = backoff_secs(attempts);
                tracing::error!(
                    attempts,
                    retry_in_secs = delay,
                    "job failed, will retry: {e:#}"
                );
                if let Err(e) = st.db.retry_later(&id, worker, delay).await {
                    tracing::error!("cannot requeue the job: {e}");
                }
            }
        }
    }
}

pub(crate) enum StepError {
    Rejected {
        code: &'static str,
        message: String,
    },
    Interrupted,
    /// Another worker holds the job now (fenced out: `catalog::lost_job`).
    Lost,
    Internal(anyhow::Error),
}

/// Tells a transcode running on a blocking thread to stop when the job's
/// future is dropped (the leader aborting its work): nothing else would.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl<E: Into<anyhow::Error>> From<E> for StepError {
    fn from(e: E) -> Self {
        StepError::Internal(e.into())
    }
}

async fn run_steps(
    st: &Pipeline,
    asset: &catalog::Asset,
    worker: &str,
    stop: &watch::Receiver<bool>,
) -> Result<(), StepError> {
    let id = asset.id.as_str();
    let src = source_path(st, id);
    probe_source(st, id, worker).await?;
    st.db.set_state(id, worker, AssetState::Transcoding).await?;
    let out = mp4_path(st, id, worker);
    let cancel = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(cancel.clone());
    let mut lost = false;
    let progress = Arc::new(AtomicU32::new(0f32.to_bits()));
    let profile = media::Profile {
        max_width: st.cfg.transcode.max_width,
        max_height: st.cfg.transcode.max_height,
        crf: st.cfg.transcode.crf,
        preset: st.cfg.transcode.preset.clone(),
        ..media::Profile::default()
    };
    let job = {
        let (src, out, cancel, progress) =
            (src.clone(), out.clone(), cancel.clone(), progress.clone());
        tokio::task::spawn_blocking(move || {
            let mut report = |p: f32| progress.store(p.to_bits(), Ordering::Relaxed);
            media::transcode(&src, &out, &profile, &mut report, &cancel)
        })
    };
    let started = std::time::Instant::now();
    let result = {
        let mut job = std::pin::pin!(job);
        let mut stop = stop.clone();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                r = &mut job => break r?,
                _ = tick.tick() => {
                    let p = f32::from_bits(progress.load(Ordering::Relaxed));
                    let _ = st.db.set_progress(id, p as f64).await;
                    match st.db.renew_lease(id, worker, LEASE_SECS).await {
                        Ok(true) => cancel.store(true, Ordering::Relaxed),
                        Err(sqlx::Error::RowNotFound) => {
                            lost = true;
                            cancel.store(true, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                _ = stop.changed() => cancel.store(true, Ordering::Relaxed),
            }
        }
    };
    let output = match result {
        Ok(o) => o,
        Err(_) if lost => return Err(StepError::Lost),
        Err(e) if cancel.load(Ordering::Relaxed) => {
            let _ = std::fs::remove_file(&out);
            tracing::debug!("transcode cancelled: {e}");
            return Err(cancelled_or_interrupted(st, id).await);
        }
        Err(e) => {
            let _ = std::fs::remove_file(&out);
            return Err(media_rejection(e));
        }
    };
    tracing::info!(
        video_copied = output.video_copied,
        audio_copied = output.audio_copied,
        "transcoded"
    );
    metrics::histogram!("manager_transcode_seconds").record(started.elapsed().as_secs_f64());
    finish(
        st,
        id,
        worker,
        &out,
        (output.width, output.height, output.duration_secs),
    )
    .await?;
    first_pushes(st, id).await;
    Ok(())
}

/// Probes a job's staged source and holds it to the site's limits (the
/// job is `probing`): a rejection is the uploader's file.
pub(crate) async fn probe_source(
    st: &Pipeline,
    id: &str,
    worker: &str,
) -> Result<media::ProbeInfo, StepError> {
    let src = source_path(st, id);
    if !src.exists() {
        return Err(StepError::Rejected {
            code: "source_missing",
            message: "the uploaded file was lost before processing; please upload it again".into(),
        });
    }
    st.db.set_state(id, worker, AssetState::Probing).await?;
    let probe_src = src.clone();
    let info = tokio::task::spawn_blocking(move || media::probe(&probe_src)).await?;
    let info = info.map_err(media_rejection)?;
    let file_len = std::fs::metadata(&src)?.len();
    media::validate(&info, file_len, &st.cfg.media_limits()).map_err(media_rejection)?;
    tracing::info!(container = %info.container, duration = info.duration_secs, "probed");
    Ok(info)
}

/// Where a job's transcode result is written before sealing, named for
/// its holder (`worker`).
pub(crate) fn result_path(st: &Pipeline, asset_id: &str, worker: &str) -> PathBuf {
    mp4_path(st, asset_id, worker)
}

/// From a transcoded MP4 at `out` (`size_and_duration` = width, height,
/// seconds) to a sealed movie: poster, sealing, the source removed. Runs
/// for the job loops here and for transcode workers' results alike.
pub(crate) async fn finish(
    st: &Pipeline,
    id: &str,
    worker: &str,
    out: &Path,
    size_and_duration: (u32, u32, f64),
) -> Result<(), StepError> {
    let (width, height, duration_secs) = size_and_duration;
    // A poster for the web pages; a movie without one still plays.
    let poster = st.cfg.poster_dir().join(format!("{id}.jpg"));
    let (mp4, at) = (out.to_path_buf(), media::default_poster_secs(duration_secs));
    match tokio::task::spawn_blocking(move || media::poster(&mp4, &poster, at, 640)).await? {
        Ok(_) => {}
        Err(e) => tracing::warn!(code = e.code(), "no poster: {e}"),
    }
    st.db
        .set_media_info(id, worker, width, height, duration_secs)
        .await?;

    // Last point where a cancel applies: after sealing the job is done.
    // One conditional update, so a cancel racing this line still wins.
    if !st.db.start_sealing(id, worker).await? {
        // Not moved, and still this holder's: cancelled, or moved on by
        // another call of the same holder (a transcode worker's result
        // sent twice), whose run is the job's now.
        return Err(match cancelled_or_interrupted(st, id).await {
            StepError::Interrupted => StepError::Lost,
            cancelled => cancelled,
        });
    }
    let key = DataKey::generate();
    let wrapped = st.master.wrap(id, &key);
    let part = st
        .cfg
        .staging_dir()
        .join(format!("{id}.{}.sealed.part", run_tag(worker)));
    let (blob, sealed_len, plain_len) = {
        let (out, part, id, key_id) = (
            out.to_path_buf(),
            part.clone(),
            id.to_string(),
            st.master.id(),
        );
        tokio::task::spawn_blocking(move || seal_file(&out, &part, &key, &id, key_id)).await??
    };
    let dest = outbox_path(st, &blob);
    std::fs::rename(&part, &dest)?;
    fsync_dir(&st.cfg.outbox_dir())?;
    let recorded = st
        .db
        .record_sealed(
            id,
            worker,
            &blob.to_string(),
            sealed_len,
            plain_len,
            &wrapped,
            &st.nodes.names(),
        )
        .await;
    if let Err(sqlx::Error::RowNotFound) = recorded {
        // Fenced out: the key dies with this job, so the sealed file is
        // nobody's. (Another failure may have committed unseen: its file
        // stays for the orphan check at the next start.)
        let _ = std::fs::remove_file(&dest);
    }
    recorded?;
    // Only now is the source redundant: the sealed blob and its key are recorded.
    clear_staging(st, id);
    tracing::info!(%blob, sealed_len, plain_len, "sealed");
    Ok(())
}

/// The first pushes of a job just sealed. The job is done once sealed: a
/// failed push is retried by `replicate_due`, never by re-running the job
/// (its source is gone).
pub(crate) async fn first_pushes(st: &Pipeline, id: &str) {
    if let Err(e) = replicate_asset(st, id).await {
        tracing::error!(asset = %id, "first replication round failed; retrying later: {e:#}");
    }
}

/// How often the outbox is measured against `outbox_max_mb`.
const OUTBOX_TRIM_EVERY: Duration = Duration::from_secs(30);

/// Keeps the outbox within `outbox_max_mb`: past it, the oldest sealed files
/// of movies that already have `min_replicas` verified copies, and at least
/// two, go (a node still waiting for one is refilled from a node that holds
/// it). A file of a movie short of that is never removed. Records
/// the bytes left, which new jobs look at. Returns them.
pub async fn trim_outbox(st: &Pipeline) -> anyhow::Result<u64> {
    use std::sync::atomic::Ordering;
    let dir = st.cfg.outbox_dir();
    let mut files = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<_>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let Ok(meta) = entry.metadata() else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(blob) = name.strip_suffix(".sealed") else {
                continue;
            };
            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            out.push((modified, blob.to_string(), meta.len(), entry.path()));
        }
        Ok(out)
    })
    .await??;
    let max = st.cfg.outbox_max_mb.saturating_mul(1 << 20);
    let mut total: u64 = files.iter().map(|f| f.2).sum();
    if total > max {
        let copies = st.db.verified_copies_by_blob().await?;
        files.sort();
        let mut removed = 0;
        for (_, blob, len, path) in &files {
            if total <= max {
                break;
            }
            // At least two copies besides this one, whatever min_replicas
            // says: with one, this file would leave a single copy.
            let held = copies.get(blob).copied().unwrap_or(0);
            let needed = st.cfg.min_replicas.max(2) as i64;
            if held >= needed && tokio::fs::remove_file(path).await.is_ok() {
                total -= len;
                removed += 1;
                tracing::info!(%blob, copies = held, "outbox over its bound: removed a sealed file its nodes already hold");
            }
        }
        if removed > 0 {
            fsync_dir(&st.cfg.outbox_dir())?;
        }
        if total > max {
            tracing::warn!(
                bytes = total,
                max,
                "the outbox is over outbox_max_mb with movies not yet on enough nodes; new jobs wait"
            );
        }
    }
    st.outbox_bytes.store(total, Ordering::Release);
    metrics::gauge!("manager_outbox_bytes").set(total as f64);
    Ok(total)
}

/// A crash between moving a sealed blob into the outbox and recording it
/// leaves a file no asset names; its data key died with the process, so it
/// can never be finished: the job was requeued and seals afresh. Such files
/// are removed at start, before any worker runs. Returns how many.
pub async fn clear_orphaned_outbox(st: &Pipeline) -> anyhow::Result<usize> {
    let referenced = st.db.referenced_blobs().await?;
    // With managers sharing the database (and the outbox), a leader that
    // just lost its lead may be between moving its file in and recording
    // it: only files older than two leases are judged.
    let shared = st.db.shared();
    let young = |e: &std::fs::DirEntry| {
        e.metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < Duration::from_secs(2 * LEASE_SECS as u64))
    };
    let mut removed = 0;
    for entry in std::fs::read_dir(st.cfg.outbox_dir())? {
        let entry = entry?;
        if shared && young(&entry) {
            continue;
        }
        let path = entry.path();
        let Some(blob) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".sealed"))
        else {
            continue;
        };
        if !referenced.contains(blob) {
            std::fs::remove_file(&path)?;
            tracing::warn!(%blob, "removed a sealed blob no movie names (left by a crash before it was recorded)");
            removed += 1;
        }
    }
    if removed > 0 {
        fsync_dir(&st.cfg.outbox_dir())?;
    }
    Ok(removed)
}

/// Why a job stopped early: its uploader cancelled it, or we are shutting down.
pub(crate) async fn cancelled_or_interrupted(st: &Pipeline, id: &str) -> StepError {
    match st.db.cancel_requested(id).await {
        Ok(true) => StepError::Rejected {
            code: "cancelled",
            message: "Cancelled by its uploader.".into(),
        },
        _ => StepError::Interrupted,
    }
}

/// Uploaders' mistakes end the job as `rejected`; our own failures (I/O,
/// FFmpeg set-up) are retried instead of blamed on the file.
fn media_rejection(e: media::MediaError) -> StepError {
    if e.is_user_error() {
        StepError::Rejected {
            code: e.code(),
            message: e.to_string(),
        }
    } else {
        StepError::Internal(anyhow::anyhow!("{e} ({})", e.detail().unwrap_or_default()))
    }
}

pub(crate) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Seals `input` into `output` in one streaming pass, hashing as it writes.
/// Returns the blob name, sealed length and plaintext length.
pub fn seal_file(
    input: &Path,
    output: &Path,
    key: &DataKey,
    asset_id: &str,
    key_id: u32,
) -> std::io::Result<(BlobId, u64, u64)> {
    let mut src = std::fs::File::open(input)?;
    let mut dst = std::fs::File::create(output)?;
    let mut sealer = Sealer::new(key, asset_id, key_id, shared::DEFAULT_SEGMENT_SIZE);
    let mut buf = vec![0u8; 1 << 20];
    let mut out = Vec::with_capacity((1 << 20) + 4096);
    let mut plain_len = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        plain_len += n as u64;
        sealer.update(&buf[..n], &mut out);
        dst.write_all(&out)?;
        out.clear();
    }
    let (blob, sealed_len) = sealer.finish(&mut out);
    dst.write_all(&out)?;
    dst.sync_all()?;
    Ok((blob, sealed_len, plain_len))
}

fn backoff_secs(attempts: i64) -> i64 {
    (5i64 << attempts.clamp(0, 6)).min(300)
}

/// Where the bytes of a push or repair come from.
enum Source<'a> {
    /// The sealed file, kept in the outbox until every node verified it.
    Outbox(PathBuf),
    /// A healthy node holding a verified copy.
    Node(&'a crate::nodes::Node),
}

/// How often a copy meant for a drained node is looked at again.
const DRAINED_RETRY_SECS: i64 = 60;

/// Pushes the asset's blob to every node that lacks a verified copy, all at
/// once, then publishes if enough copies are verified. A drained node is
/// left out (its copy waits); it may still be the source of a repair, which
/// only reads from it.
pub async fn replicate_asset(st: &Pipeline, asset_id: &str) -> anyhow::Result<()> {
    let Some(asset) = st.db.asset(asset_id).await? else {
        return Ok(());
    };
    let Some(blob) = asset
        .blob_id
        .as_deref()
        .and_then(|b| b.parse::<BlobId>().ok())
    else {
        return Ok(());
    };
    let file = outbox_path(st, &blob);
    let replicas = st.db.replicas(asset_id).await?;
    let mut pending: Vec<&catalog::Replica> = replicas
        .iter()
        .filter(|r| {
            matches!(
                r.state,
                ReplicaState::Pending | ReplicaState::Failed | ReplicaState::Repairing
            )
        })
        .collect();
    // A drained node takes no new copies until it is brought back; its
    // copy waits (and the outbox keeps the sealed file for it).
    let drained: Vec<&catalog::Replica> = pending
        .extract_if(.., |r| {
            st.nodes.get(&r.node).is_some_and(|n| n.is_drained())
        })
        .collect();
    for r in drained {
        let next = catalog::now() + DRAINED_RETRY_SECS;
        st.db
            .replica_failed(
                asset_id,
                &r.node,
                "the node is drained by an operator",
                next,
            )
            .await?;
    }
    let source = if pending.is_empty() {
        None
    } else if tokio::fs::try_exists(&file).await.unwrap_or(false) {
        Some(Source::Outbox(file.clone()))
    } else {
        let holders: Vec<&crate::nodes::Node> = replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Verified)
            .filter_map(|r| st.nodes.get(&r.node))
            .collect();
        match holders.iter().find(|n| n.is_healthy()) {
            Some(n) => Some(Source::Node(n)),
            None if holders.is_empty() => {
                // No verified copy anywhere and no outbox copy: nothing can
                // repair this movie. Stop serving it and raise the alert.
                if st.db.mark_damaged(asset_id).await? {
                    metrics::counter!("manager_assets_damaged_total").increment(1);
                    crate::alerts::raise(
                        "movie_damaged",
                        "every copy of this movie is lost or corrupt; it is no longer served. \
                         Restore the sealed blob into the outbox (see docs/mirrors.md)",
                        format!("asset={asset_id} blob={blob}"),
                    );
                }
                return Ok(());
            }
            None => {
                // Verified copies exist but their nodes are down: wait.
                for r in &pending {
                    let next = catalog::now() + backoff_secs(r.attempts);
                    st.db
                        .replica_failed(
                            asset_id,
                            &r.node,
                            "no healthy node holds a verified copy to repair from",
                            next,
                        )
                        .await?;
                }
                return Ok(());
            }
        }
    };
    let len = asset.sealed_len.unwrap_or(0).max(0) as u64;
    let source = &source;
    let pushes = pending.iter().map(|r| async move {
        let Some(node) = st.nodes.get(&r.node) else {
            return (*r, Err("node no longer configured".to_string()));
        };
        let res = match source {
            Some(Source::Outbox(file)) => st.nodes.push(node, &blob, file).await,
            Some(Source::Node(from)) => st.nodes.copy(from, node, &blob, len).await,
            None => return (*r, Err("no source".to_string())),
        };
        (*r, res.map_err(|e| e.to_string()))
    });
    let from = match source {
        Some(Source::Node(n)) => n.cfg.name.clone(),
        _ => "outbox".to_string(),
    };
    for (r, res) in futures::future::join_all(pushes).await {
        let kind = if r.state == ReplicaState::Repairing {
            "repair"
        } else {
            "push"
        };
        match res {
            Ok(()) => {
                tracing::info!(asset = asset_id, node = %r.node, from = %from, kind, "replica verified");
                metrics::counter!("manager_replica_pushes_total", "node" => r.node.clone(), "result" => "ok", "kind" => kind).increment(1);
                st.db.replica_verified(asset_id, &r.node).await?;
            }
            Err(e) => {
                tracing::warn!(asset = asset_id, node = %r.node, from = %from, kind, attempt = r.attempts + 1, "push failed: {e}");
                metrics::counter!("manager_replica_pushes_total", "node" => r.node.clone(), "result" => "failed", "kind" => kind).increment(1);
                let next = catalog::now() + backoff_secs(r.attempts);
                st.db.replica_failed(asset_id, &r.node, &e, next).await?;
            }
        }
    }
    if asset.state == AssetState::Replicating
        && st
            .db
            .publish_if_replicated(asset_id, st.cfg.min_replicas)
            .await?
    {
        tracing::info!(asset = asset_id, "published");
        metrics::counter!("manager_assets_total", "outcome" => "published").increment(1);
    }
    if st.db.all_verified(asset_id).await? {
        // Every configured node holds a verified copy; the outbox copy has
        // done its job. Repairs from here on copy from a verified node.
        let _ = tokio::fs::remove_file(&file).await;
    }
    Ok(())
}

async fn replicate_due(st: &Pipeline) {
    let due = match st.db.due_replicas().await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("cannot read pending replicas: {e}");
            return;
        }
    };
    let mut assets: Vec<String> = due.into_iter().map(|r| r.asset_id).collect();
    assets.dedup();
    for a in assets {
        if let Err(e) = replicate_asset(st, &a).await {
            tracing::error!(asset = %a, "replication round failed: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_keeps_its_lease_for_as_long_as_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog::sqlite::SqliteCatalog::open(&format!(
            "sqlite://{}",
            dir.path().join("t.db").display()
        ))
        .await
        .unwrap();
        let db: catalog::SharedCatalog = std::sync::Arc::new(cat.clone());
        let owner = db
            .create_account("o@x", "h", crate::domain::Role::Uploader, 0)
            .await
            .unwrap();
        db.insert_asset("j", owner, "J", "j.mp4", 1).await.unwrap();
        // Claimed with a lease that has already run out, as a long step
        // (sealing a big file) would leave it without renewal.
        db.claim_next(-1, "test").await.unwrap().unwrap();
        let lease = |cat: catalog::sqlite::SqliteCatalog| async move {
            let (t,): (i64,) = sqlx::query_as("SELECT lease_until FROM assets WHERE id = 'j'")
                .fetch_one(cat.pool())
                .await
                .unwrap();
            t
        };
        assert!(lease(cat.clone()).await < catalog::now());
        let keeper = LeaseKeeper::start(
            db.clone(),
            "j".into(),
            "test".into(),
            Duration::from_millis(50),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(lease(cat.clone()).await >= catalog::now() + LEASE_SECS - 2);
        assert!(
            db.claim_next(30, "test").await.unwrap().is_none(),
            "nobody else takes a job whose lease is kept"
        );
        drop(keeper);
    }

    #[tokio::test]
    async fn the_outbox_keeps_to_its_bound_without_losing_an_only_copy() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml(&format!(
            "data_dir = \"{}\"\nmaster_key = \"{}\"\ntoken_signing_key = \"{}\"\n\
             min_replicas = 1\noutbox_max_mb = 1\n\
             [[nodes]]\nname = \"utah\"\nurl = \"http://127.0.0.1:9\"\nlat = 0.0\nlon = 0.0\nsecret = \"{}\"\n\
             [[nodes]]\nname = \"toronto\"\nurl = \"http://127.0.0.1:9\"\nlat = 1.0\nlon = 1.0\nsecret = \"{}\"\n",
            dir.path().display(),
            "11".repeat(32),
            "22".repeat(32),
            "33".repeat(16),
            "44".repeat(16),
        ))
        .unwrap();
        let db: catalog::SharedCatalog = Arc::new(
            catalog::sqlite::SqliteCatalog::open(&cfg.database_url)
                .await
                .unwrap(),
        );
        std::fs::create_dir_all(cfg.outbox_dir()).unwrap();
        let st = Pipeline {
            outbox_bytes: Default::default(),
            db: db.clone(),
            nodes: crate::nodes::Nodes::new(&cfg.nodes, "").unwrap(),
            master: Arc::new(shared::MasterKey::new(1, [1; 32])),
            wake: Default::default(),
            cfg,
        };
        let owner = db
            .create_account("o@x", "h", crate::domain::Role::Uploader, 0)
            .await
            .unwrap();
        let nodes = ["utah".to_string(), "toronto".to_string()];
        // Three sealed movies of 600 KiB each, oldest first: the first on
        // both nodes, the others on none (both nodes were down).
        let mut blobs = Vec::new();
        for (i, copies) in [2, 0, 0].into_iter().enumerate() {
            let id = format!("a{i}");
            let blob = BlobId::of(id.as_bytes());
            db.insert_asset(&id, owner, "T", "t.mp4", 1).await.unwrap();
            db.record_sealed(&id, "seed", &blob.to_string(), 600 << 10, 1, b"k", &nodes)
                .await
                .unwrap();
            for node in &nodes[..copies] {
                db.replica_verified(&id, node).await.unwrap();
            }
            let path = outbox_path(&st, &blob);
            std::fs::write(&path, vec![0u8; 600 << 10]).unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000 + i as u64))
                .unwrap();
            blobs.push(blob);
        }
        // 1,800 KiB against 1,024: the movie both nodes hold goes; the two
        // only copies stay, and new jobs wait.
        let left = trim_outbox(&st).await.unwrap();
        assert!(!outbox_path(&st, &blobs[0]).exists());
        assert!(outbox_path(&st, &blobs[1]).exists() && outbox_path(&st, &blobs[2]).exists());
        assert_eq!(left, 1200 << 10);
        assert_eq!(
            st.outbox_bytes.load(std::sync::atomic::Ordering::Acquire),
            1200 << 10
        );
        // One node takes the oldest: min_replicas is met, but that node's
        // copy would be the only one. The second takes it: it can go.
        db.replica_verified("a1", "toronto").await.unwrap();
        assert_eq!(trim_outbox(&st).await.unwrap(), 1200 << 10);
        db.replica_verified("a1", "utah").await.unwrap();
        assert_eq!(trim_outbox(&st).await.unwrap(), 600 << 10);
        assert!(!outbox_path(&st, &blobs[1]).exists());
        assert!(outbox_path(&st, &blobs[2]).exists());
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff_secs(0), 5);
        assert_eq!(backoff_secs(1), 10);
        assert_eq!(backoff_secs(3), 40);
        assert_eq!(backoff_secs(50), 300);
    }

    #[test]
    fn sealed_file_opens_back_to_the_input() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.mp4");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&input, &data).unwrap();
        let key = DataKey::generate();
        let out = dir.path().join("out.sealed");
        let (blob, sealed_len, plain_len) = seal_file(&input, &out, &key, "asset-1", 1).unwrap();
        let sealed = std::fs::read(&out).unwrap();
        assert_eq!(plain_len, data.len() as u64);
        assert_eq!(sealed_len, sealed.len() as u64);
        assert_eq!(blob, BlobId::of(&sealed));
        assert_eq!(shared::open_all(&key, "asset-1", &sealed).unwrap(), data);
        // Storage alone reveals nothing: no run of the plaintext survives.
        assert!(!sealed.windows(32).any(|w| w == &data[1000..1032]));
    }
}
