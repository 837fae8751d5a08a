//! Scrubbing: every good blob is re-read and re-hashed on a schedule, at a
//! configured rate, so a copy that rotted on disk (a dying drive writing
//! zeroes, a bit flip) is found within one pass instead of when a viewer
//! or a repair happens to read it.
//!
//! A pass lists the blobs, then reads each one start to end through a token
//! bucket of `scrub_rate_mb_per_sec`; a pass over `B` stored bytes therefore
//! takes about `B / rate` seconds, which is the longest a silent corruption
//! can go unnoticed (plus `scrub_interval_secs` between pass starts). A copy
//! whose SHA-256 is not its name goes to quarantine (never served, never
//! copied, no longer in the inventory's good list) and is reported to the
//! manager, which repairs it from a verified copy elsewhere. A copy that
//! matches gets its last-verified time recorded (see `store`).
//!
//! The bucket is hand-rolled on purpose: one sequential reader pacing itself
//! is the whole job (sleep until `bytes / rate` has elapsed), which general
//! rate-limiter crates solve for many concurrent callers at the price of
//! more dependencies.

use std::{
    io::Read,
    os::unix::fs::MetadataExt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use sha2::{Digest, Sha256};
use shared::BlobId;
use tokio::sync::watch;

use crate::SharedState;

/// Token bucket over bytes: `take(n)` says how long to wait before `n` more
/// bytes may be read. Its capacity is one read, so a pass never bursts
/// (on a bucket a read is an 8 MiB GET, the average rate the same).
#[derive(Debug)]
pub struct Throttle {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Throttle {
    pub fn new(bytes_per_sec: f64, capacity: u64, now: Instant) -> Self {
        Self {
            rate: bytes_per_sec,
            capacity: capacity as f64,
            tokens: capacity as f64,
            last: now,
        }
    }

    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// What `/metrics` and the inventory say about scrubbing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScrubStatus {
    pub rate_bytes_per_sec: f64,
    pub passes_completed: u64,
    pub pass_running: bool,
    pub pass_started_at: Option<i64>,
    pub pass_bytes_done: u64,
    pub pass_bytes_total: u64,
    pub last_pass_completed_at: Option<i64>,
    pub last_pass_secs: Option<f64>,
    pub last_pass_bytes: u64,
    /// Bytes per second the last pass achieved (to compare with the rate).
    pub last_pass_rate_bytes_per_sec: Option<f64>,
    pub mismatches_total: u64,
}

pub type Status = Arc<Mutex<ScrubStatus>>;

fn rate_bytes(st: &SharedState) -> f64 {
    st.cfg.scrub_rate_mb_per_sec * 1e6
}

/// Runs passes every `scrub_interval_secs` until `stop` fires.
pub async fn run(st: SharedState, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_secs(st.cfg.scrub_interval_secs);
    if interval.is_zero() {
        tracing::warn!("scrubbing is disabled (scrub_interval_secs = 0)");
        return;
    }
    metrics::gauge!("viewnode_scrub_rate_configured_bytes_per_second").set(rate_bytes(&st));
    st.scrub.lock().expect("scrub status").rate_bytes_per_sec = rate_bytes(&st);
    let cancel = Arc::new(AtomicBool::new(false));
    loop {
        let started = Instant::now();
        let pass = pass(&st, &cancel);
        tokio::select! {
            _ = pass => {}
            _ = stop.changed() => {
                cancel.store(true, Ordering::Relaxed);
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval.saturating_sub(started.elapsed())) => {}
            _ = stop.changed() => return,
        }
    }
}

enum Verdict {
    Good,
    /// `version`: the copy read (`store::Meta::version`), so only that
    /// copy is quarantined, not a repair that replaced it meanwhile.
    Bad {
        actual: BlobId,
        version: String,
    },
    Gone,
}

/// Reads blob `id` start to end, paced by `throttle` (none: as fast as the
/// storage goes), and says whether it hashes to its name. A local file is
/// read on the blocking pool; a bucket object in ranged GETs.
async fn check(
    st: &SharedState,
    id: BlobId,
    chunk: usize,
    cancel: Arc<AtomicBool>,
    throttle: Option<Arc<Mutex<Throttle>>>,
) -> std::io::Result<Verdict> {
    let count = |n: u64| metrics::counter!("viewnode_scrub_bytes_total").increment(n);
    if let Some(path) = st.store.blob_path(&id) {
        return tokio::task::spawn_blocking(move || {
            check_file(&path, &id, chunk, &cancel, |n| {
                if let Some(t) = &throttle {
                    let wait = t.lock().expect("throttle").take(n, Instant::now());
                    std::thread::sleep(wait);
                    count(n);
                }
            })
        })
        .await
        .map_err(std::io::Error::other)?;
    }
    let (mut stream, meta) = match st.store.read(&id, chunk).await {
        Ok(r) => r,
        Err(crate::store::StoreError::NotFound) => return Ok(Verdict::Gone),
        Err(e) => return Err(std::io::Error::other(e.to_string())),
    };
    let mut hasher = Sha256::new();
    while let Some(bytes) = futures::StreamExt::next(&mut stream).await {
        if cancel.load(Ordering::Relaxed) {
            return Ok(Verdict::Gone);
        }
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Verdict::Gone),
            Err(e) => return Err(e),
        };
        if let Some(t) = &throttle {
            let n = bytes.len() as u64;
            let wait = t.lock().expect("throttle").take(n, Instant::now());
            tokio::time::sleep(wait).await;
            count(n);
        }
        hasher.update(&bytes);
    }
    let actual = BlobId::from_hasher(hasher);
    Ok(if actual == id {
        Verdict::Good
    } else {
        Verdict::Bad {
            actual,
            version: meta.version,
        }
    })
}

/// Whether the copy under `id` now is still the one a check read.
async fn still_the_copy_read(st: &SharedState, id: &BlobId, version: &str) -> bool {
    matches!(st.store.head(id).await, Ok(Some(m)) if m.version == version)
}

/// Reads `path` start to end in `chunk`-byte reads, calling `pace` with
/// each read's length (the scrub's throttle), and says whether it hashes
/// to `id`. `Gone` when it is not there (or `cancel` fires).
fn check_file(
    path: &std::path::Path,
    id: &BlobId,
    chunk: usize,
    cancel: &AtomicBool,
    mut pace: impl FnMut(u64),
) -> std::io::Result<Verdict> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Verdict::Gone),
        Err(e) => return Err(e),
    };
    let version = f.metadata()?.ino().to_string();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; chunk];
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Ok(Verdict::Gone);
        }
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        pace(n as u64);
        hasher.update(&buf[..n]);
    }
    let actual = BlobId::from_hasher(hasher);
    Ok(if actual == *id {
        Verdict::Good
    } else {
        Verdict::Bad { actual, version }
    })
}

/// What an operator's "re-verify now" found (see [`verify_now`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Checked {
    /// It hashes to its name; its last-verified time is now.
    Verified,
    /// It did not: quarantined and reported, like a failed scrub.
    Quarantined,
    /// Not held here.
    Missing,
}

/// Re-hashes one blob at once, at disk speed. One at a time per node:
/// `None` while another re-check runs (the caller answers `busy`). The turn
/// is held by the read itself, so a caller that gives up does not free it
/// while the disk is still being read.
pub async fn verify_now(st: &SharedState, id: BlobId) -> std::io::Result<Option<Checked>> {
    static ONE_AT_A_TIME: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> =
        std::sync::OnceLock::new();
    let Ok(turn) = ONE_AT_A_TIME
        .get_or_init(|| Arc::new(tokio::sync::Semaphore::new(1)))
        .clone()
        .try_acquire_owned()
    else {
        return Ok(None);
    };
    let st2 = st.clone();
    let verdict = tokio::spawn(async move {
        let _turn = turn;
        check(&st2, id, 1 << 20, Arc::new(AtomicBool::new(false)), None).await
    })
    .await
    .map_err(std::io::Error::other)?;
    Ok(Some(match verdict? {
        Verdict::Good => {
            st.store
                .set_verified(&id, Some(shared::runtime::unix_now()));
            Checked::Verified
        }
        Verdict::Gone => Checked::Missing,
        Verdict::Bad { actual, version } => {
            if still_the_copy_read(st, &id, &version).await {
                tracing::error!(blob = %id, %actual, "re-verification: stored copy does not hash to its name; quarantining");
                st.scrub.lock().expect("scrub status").mismatches_total += 1;
                quarantine_and_report(st, id, "verify_mismatch").await;
                Checked::Quarantined
            } else {
                // Replaced while we read it (a repair): check the new one next time.
                Checked::Missing
            }
        }
    }))
}

/// One full pass over the good blobs.
async fn pass(st: &SharedState, cancel: &Arc<AtomicBool>) {
    let blobs = match st.store.list().await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("scrub cannot list the blobs: {e}");
            return;
        }
    };
    let total: u64 = blobs.iter().map(|(_, n)| n).sum();
    let started_at = shared::runtime::unix_now();
    {
        let mut s = st.scrub.lock().expect("scrub status");
        s.pass_running = true;
        s.pass_started_at = Some(started_at);
        s.pass_bytes_done = 0;
        s.pass_bytes_total = total;
    }
    metrics::gauge!("viewnode_scrub_pass_bytes").set(total as f64);
    metrics::gauge!("viewnode_scrub_pass_done_bytes").set(0.0);
    let rate = rate_bytes(st);
    // Reads of at most a quarter second's worth keep the pace smooth.
    let chunk = ((rate / 4.0) as usize).clamp(4096, 1 << 20);
    let throttle = Arc::new(Mutex::new(Throttle::new(
        rate,
        chunk as u64,
        Instant::now(),
    )));
    let clock = Instant::now();
    let mut done = 0u64;
    for (id, size) in blobs {
        if cancel.load(Ordering::Relaxed) {
            return;
        }
        let verdict = check(st, id, chunk, cancel.clone(), Some(throttle.clone())).await;
        done += size;
        match verdict {
            Ok(Verdict::Good) => st
                .store
                .set_verified(&id, Some(shared::runtime::unix_now())),
            Ok(Verdict::Gone) => {}
            Ok(Verdict::Bad { actual, version }) => {
                // Quarantine only the copy we read: a repair may have put a
                // fresh, verified copy under the name meanwhile.
                if still_the_copy_read(st, &id, &version).await {
                    tracing::error!(blob = %id, %actual, "scrub: stored copy does not hash to its name; quarantining");
                    metrics::counter!("viewnode_scrub_mismatches_total").increment(1);
                    st.scrub.lock().expect("scrub status").mismatches_total += 1;
                    quarantine_and_report(st, id, "scrub_mismatch").await;
                }
            }
            Err(e) => {
                // A read error is not proof of corruption; the disk's own
                // health is for /healthz. The next pass tries again.
                metrics::counter!("viewnode_scrub_read_errors_total").increment(1);
                tracing::error!(blob = %id, "scrub cannot read the blob: {e}");
            }
        }
        st.scrub.lock().expect("scrub status").pass_bytes_done = done;
        metrics::gauge!("viewnode_scrub_pass_done_bytes").set(done as f64);
    }
    let secs = clock.elapsed().as_secs_f64();
    let achieved = (secs > 0.0).then(|| total as f64 / secs);
    let now = shared::runtime::unix_now();
    {
        let mut s = st.scrub.lock().expect("scrub status");
        s.pass_running = false;
        s.passes_completed += 1;
        s.last_pass_completed_at = Some(now);
        s.last_pass_secs = Some(secs);
        s.last_pass_bytes = total;
        s.last_pass_rate_bytes_per_sec = achieved;
    }
    metrics::counter!("viewnode_scrub_passes_total").increment(1);
    metrics::gauge!("viewnode_scrub_last_pass_seconds").set(secs);
    metrics::gauge!("viewnode_scrub_last_pass_bytes").set(total as f64);
    metrics::gauge!("viewnode_scrub_last_pass_completed_timestamp_seconds").set(now as f64);
    if let Some(r) = achieved {
        metrics::gauge!("viewnode_scrub_last_pass_rate_bytes_per_second").set(r);
    }
    tracing::info!(bytes = total, secs, "scrub pass complete");
    st.store.flush_verified_logged().await;
    purge_quarantine(st, now).await;
}

/// Deletes quarantined copies older than `quarantine_keep_days`: they were
/// reported and repaired long ago, and only take disk space.
async fn purge_quarantine(st: &SharedState, now: i64) {
    let days = st.cfg.quarantine_keep_days;
    if days == 0 {
        return;
    }
    let cutoff = now.saturating_sub(i64::try_from(days * 86_400).unwrap_or(i64::MAX));
    match st.store.purge_quarantine(cutoff).await {
        Ok(gone) => {
            for q in &gone {
                tracing::info!(blob = %q.id, since = q.since, days, "quarantined copy deleted after its keep period");
            }
            metrics::counter!("viewnode_quarantine_purged_total").increment(gone.len() as u64);
        }
        Err(e) => tracing::error!("cannot purge old quarantined copies: {e}"),
    }
}

/// Takes a bad copy out of service and tells the manager, which then
/// repairs it from a verified copy elsewhere. Used by the scrubber and by
/// playback when a segment fails its AEAD tag.
pub async fn quarantine_and_report(st: &SharedState, blob: BlobId, reason: &'static str) {
    metrics::counter!("viewnode_blobs_quarantined_total").increment(1);
    crate::playcache::forget_blob(&blob);
    match st.store.quarantine(&blob).await {
        Ok(()) => {}
        // Another reader got there first; it reports too.
        Err(crate::store::StoreError::NotFound) => return,
        Err(e) => {
            tracing::error!(%blob, "quarantine failed: {e}");
            return;
        }
    }
    let st = st.clone();
    tokio::spawn(async move { report(&st, "quarantined", blob, reason).await });
}

/// A viewer was sent here for a blob this node does not hold (its disk was
/// wiped or swapped under it). Told to the manager at once, so viewers stop
/// being sent here before the next reconciliation finds it; at most once a
/// minute per blob, however many viewers arrive.
pub fn report_missing(st: &SharedState, blob: BlobId) {
    static RECENT: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<BlobId, Instant>>,
    > = std::sync::OnceLock::new();
    {
        let mut recent = RECENT
            .get_or_init(Default::default)
            .lock()
            .expect("not poisoned");
        recent.retain(|_, at| at.elapsed() < Duration::from_secs(60));
        if recent.contains_key(&blob) {
            return;
        }
        recent.insert(blob, Instant::now());
    }
    metrics::counter!("viewnode_missing_blob_reports_total").increment(1);
    let st = st.clone();
    tokio::spawn(async move { report(&st, "missing", blob, "not_on_disk").await });
}

/// An `events` report to the manager ([`crate::AppState::post_to_manager`]),
/// with a few retries; if the manager
/// stays unreachable its reconciliation finds the quarantine anyway.
async fn report(st: &SharedState, kind: &str, blob: BlobId, reason: &str) {
    if st.cfg.manager_url.is_empty() {
        return;
    }
    let body = serde_json::to_vec(&shared::protocol::NodeReport {
        events: vec![shared::protocol::NodeReportEvent {
            kind: kind.into(),
            blob: blob.to_string(),
            reason: reason.into(),
            at: shared::runtime::unix_now(),
        }],
    })
    .expect("json");
    for attempt in 0..4u32 {
        let sent = st
            .post_to_manager("events", body.clone(), Duration::from_secs(10))
            .await;
        match sent {
            Ok(r) if r.status.is_success() => {
                tracing::info!(%blob, kind, "reported to the manager");
                return;
            }
            Ok(r) => {
                tracing::warn!(%blob, kind, status = %r.status, "manager refused the report")
            }
            Err(e) => tracing::warn!(%blob, kind, "cannot report to the manager: {e:#}"),
        }
        tokio::time::sleep(Duration::from_secs(2u64 << attempt)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_paces_reads_at_the_rate() {
        let t0 = Instant::now();
        let mut t = Throttle::new(1_000_000.0, 100_000, t0);
        // Reading as fast as possible: the waits add up to bytes / rate,
        // less the one bucketful allowed at once.
        let mut clock = t0;
        for _ in 0..100 {
            clock += t.take(100_000, clock);
        }
        let secs = clock.duration_since(t0).as_secs_f64();
        assert!((secs - 9.9).abs() < 0.01, "{secs}");
        // Idle time refills at most one bucketful.
        clock += Duration::from_secs(60);
        assert_eq!(t.take(100_000, clock), Duration::ZERO);
        assert!(t.take(100_000, clock) > Duration::from_millis(99));
    }
}
