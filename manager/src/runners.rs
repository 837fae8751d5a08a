//! Transcode workers on other machines (the `transcoder` binary), modelled
//! on PeerTube's runners: a worker asks for a job, accepts it, downloads
//! the source, reports progress (which renews its lease), and sends the
//! result back, or says it failed, or gives the job up.
//!
//! Trust: a worker is registered by an operator (a one-time token made in
//! the admin, good for an hour, stored hashed) and gets a secret of its
//! own, kept wrapped by the master key as terminals' are; it signs every
//! call with it (`shared::nodeauth`, key id = its name). It holds no
//! database access and no keys: the manager probes the source and holds it
//! to the site's limits before handing it out, checks the result
//! ([`media::check_output`]: H.264/AAC, faststart, the bounds, the source's
//! duration) and seals it itself. Revoking a worker refuses its next call.
//!
//! Jobs are the pipeline's own rows: a worker's claim is a lease under the
//! name `runner/{worker}#{lease}`, fenced like the job loops' (a worker
//! whose lease lapsed and whose job was taken over, by another worker or
//! by the manager's own loops, changes nothing), and its end is recorded by
//! [`pipeline::settle`] as a local run's is. The `lease` mark travels in the
//! signed query string, so a worker can act only on its own claims.

use std::path::PathBuf;

use futures::{Stream, StreamExt};
use shared::protocol::{RunnerCredentials, RunnerJob, RunnerOffer};
use tokio::io::AsyncWriteExt;

use crate::{
    auth,
    catalog::{Catalog, RegisterOutcome},
    domain::AssetState,
    pipeline::{self, Pipeline, StepError},
};

/// Jobs one worker may hold at once.
const MAX_JOBS_PER_WORKER: i64 = 2;

/// How long a registration token stays good.
pub const TOKEN_TTL_SECS: i64 = 3600;

/// Why a worker's call was refused.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("{0}")]
    Auth(shared::NodeAuthError),
    #[error("this transcode worker was revoked by an operator")]
    Revoked,
    #[error("the registration token is unknown, used or expired; make a new one in the admin")]
    TokenInvalid,
    #[error("a worker's name is 1 to 64 letters, digits, '.', '_' or '-'")]
    BadName,
    #[error("a worker named {0} is registered already; revoke it first, or pick another name")]
    NameTaken(String),
    #[error("the job is not waiting any more (another worker took it, or it ended)")]
    JobTaken,
    #[error("this worker holds {MAX_JOBS_PER_WORKER} jobs already; finish one first")]
    Busy,
    #[error(
        "this job is no longer this worker's (its lease lapsed and it was taken over, or it ended)"
    )]
    Lost,
    #[error("the `lease` query parameter is missing or malformed")]
    BadLease,
    /// The source was refused at accept (the uploader's file): the job
    /// ended `rejected` with this code.
    #[error("{message}")]
    SourceRejected { code: &'static str, message: String },
    #[error("the result was refused: {0}")]
    ResultRefused(String),
    #[error("a result for this job is being received already")]
    ResultInProgress,
    #[error("the manager's disk is at its reserve; the job will be offered again")]
    NoSpace,
    #[error("the result's bytes do not match the SHA-256 the call was signed with")]
    ResultCorrupt,
    #[error("the result is larger than the {0} bytes this site accepts")]
    TooLarge(u64),
    #[error("{0}")]
    Bad(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl RunnerError {
    pub fn code(&self) -> &'static str {
        match self {
            RunnerError::Auth(e) => e.code(),
            RunnerError::Revoked => "worker_revoked",
            RunnerError::TokenInvalid => "registration_token_invalid",
            RunnerError::BadName => "bad_worker_name",
            RunnerError::NameTaken(_) => "worker_name_taken",
            RunnerError::JobTaken => "job_taken",
            RunnerError::Busy => "worker_busy",
            RunnerError::Lost => "job_lost",
            RunnerError::BadLease => "bad_lease",
            RunnerError::SourceRejected { .. } => "source_rejected",
            RunnerError::ResultRefused(_) => "result_refused",
            RunnerError::ResultCorrupt => "result_corrupt",
            RunnerError::ResultInProgress => "result_in_progress",
            RunnerError::NoSpace => "insufficient_storage",
            RunnerError::TooLarge(_) => "result_too_large",
            RunnerError::Bad(_) => "bad_request",
            RunnerError::Db(_) | RunnerError::Internal(_) => "internal",
        }
    }
}

/// `manager_runner_jobs_total{event}`: accepted, sealed, refused (a
/// result that failed its check), failed (the worker said so), aborted.
fn counted(event: &'static str) {
    metrics::counter!("manager_runner_jobs_total", "event" => event).increment(1);
}

fn wrap_context(name: &str) -> String {
    format!("transcoder:{name}")
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A one-time registration token, good for [`TOKEN_TTL_SECS`]; only its
/// hash is kept.
pub async fn new_registration_token(db: &dyn Catalog, created_by: &str) -> sqlx::Result<String> {
    let token = format!("slmt_{}", auth::random_token());
    db.insert_transcoder_token(
        &auth::token_hash(&token),
        shared::runtime::unix_now() + TOKEN_TTL_SECS,
        created_by,
    )
    .await?;
    Ok(token)
}

/// Redeems a registration token for a worker secret (shown this once).
pub async fn register(
    db: &dyn Catalog,
    master: &shared::MasterKey,
    token: &str,
    name: &str,
) -> Result<RunnerCredentials, RunnerError> {
    if !valid_name(name) {
        return Err(RunnerError::BadName);
    }
    let hash = auth::token_hash(token.trim());
    // Read first: a made-up token never waits for the writers' lock (the
    // books' too).
    if !db.transcoder_token_live(&hash).await? {
        return Err(RunnerError::TokenInvalid);
    }
    let secret = shared::DataKey::generate();
    let wrapped = master.wrap(&wrap_context(name), &secret);
    match db.register_transcoder(&hash, name, &wrapped).await? {
        RegisterOutcome::Registered => {
            tracing::info!(worker = %name, "transcode worker registered");
            Ok(RunnerCredentials {
                name: name.to_string(),
                secret: hex::encode(secret.as_bytes()),
            })
        }
        RegisterOutcome::TokenInvalid => Err(RunnerError::TokenInvalid),
        RegisterOutcome::NameTaken => Err(RunnerError::NameTaken(name.to_string())),
    }
}

/// A signed call as the HTTP layer hands it over.
pub struct SignedCall<'a> {
    pub auth: &'a str,
    pub date: &'a str,
    pub method: &'a str,
    pub path_and_query: &'a str,
    /// SHA-256 of the body in hex (of the result file for `success`,
    /// checked against the bytes as they arrive).
    pub content_sha256: &'a str,
}

/// The worker that signed `call`: refused when unknown, revoked, or the
/// signature or its date is wrong.
pub async fn authenticate(
    db: &dyn Catalog,
    master: &shared::MasterKey,
    call: &SignedCall<'_>,
) -> Result<String, RunnerError> {
    let name = shared::auth_key_id(call.auth)
        .ok_or(RunnerError::Auth(if call.auth.trim().is_empty() {
            shared::NodeAuthError::Missing
        } else {
            shared::NodeAuthError::Malformed
        }))?
        .to_string();
    let row = if valid_name(&name) {
        db.transcoder(&name).await?
    } else {
        None
    };
    let secret = match &row {
        Some(t) => Some(
            master
                .unwrap(&wrap_context(&t.name), &t.wrapped_secret)
                .map_err(|e| anyhow::anyhow!("cannot unwrap worker {}'s secret: {e}", t.name))?,
        ),
        None => None,
    };
    let signer = shared::verify_request(
        |id| {
            (id == name)
                .then(|| secret.as_ref().map(|s| s.as_bytes().to_vec()))
                .flatten()
        },
        call.auth,
        call.method,
        call.path_and_query,
        call.date,
        shared::runtime::unix_now(),
        call.content_sha256,
    )
    .map_err(RunnerError::Auth)?;
    // Only a genuine signature learns that the name was revoked.
    if row.is_some_and(|t| t.revoked_at.is_some()) {
        return Err(RunnerError::Revoked);
    }
    if let Err(e) = db.transcoder_seen(&signer).await {
        tracing::warn!(worker = %signer, "cannot note the worker's call: {e}");
    }
    Ok(signer)
}

/// The job this worker may accept, if one waits and the manager has room
/// to seal its result.
pub async fn request(st: &Pipeline) -> Result<Option<RunnerOffer>, RunnerError> {
    if pipeline::why_no_new_jobs(st).is_some() {
        return Ok(None);
    }
    Ok(st.db.next_job_id().await?.map(|id| RunnerOffer { id }))
}

/// The fencing name of worker `name`'s claim marked `lease`.
fn holder(name: &str, lease: &str) -> Result<String, RunnerError> {
    if lease.is_empty() || lease.len() > 32 || !lease.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RunnerError::BadLease);
    }
    Ok(format!("runner/{name}#{lease}"))
}

/// Claims job `id` for worker `name`; probes its source and holds it to
/// the site's limits (a refusal ends the job `rejected`, as a local run
/// would), then hands out what the transcode needs.
pub async fn accept(st: &Pipeline, name: &str, id: &str) -> Result<RunnerJob, RunnerError> {
    if pipeline::why_no_new_jobs(st).is_some() {
        return Err(RunnerError::JobTaken);
    }
    // A worker does one job at a time; two allow for one restarted while
    // its old job's lease runs out. More is a worker gone wrong (or not
    // ours), hoarding jobs and, with their results, the manager's disk.
    if st.db.jobs_held(&format!("runner/{name}#")).await? >= MAX_JOBS_PER_WORKER {
        return Err(RunnerError::Busy);
    }
    let lease = hex::encode(rand::random::<[u8; 6]>());
    let worker = holder(name, &lease)?;
    let Some(asset) = st.db.claim_job(id, pipeline::LEASE_SECS, &worker).await? else {
        return Err(RunnerError::JobTaken);
    };
    let probed = pipeline::probe_source(st, id, &worker).await;
    let probed = match probed {
        Ok(info) => st
            .db
            .set_state(id, &worker, AssetState::Transcoding)
            .await
            .map(|_| info)
            .map_err(StepError::from),
        Err(e) => Err(e),
    };
    match probed {
        Ok(info) => {
            tracing::info!(asset = %id, worker = %worker, "job handed to a transcode worker");
            counted("accepted");
            let t = &st.cfg.transcode;
            Ok(RunnerJob {
                id: id.to_string(),
                lease,
                lease_secs: pipeline::LEASE_SECS,
                source_bytes: asset.source_bytes.max(0) as u64,
                duration_secs: info.duration_secs,
                max_width: t.max_width,
                max_height: t.max_height,
                crf: t.crf,
                preset: t.preset.clone(),
            })
        }
        Err(StepError::Rejected { code, message }) => {
            pipeline::settle(
                st,
                id,
                asset.attempts,
                &worker,
                Err(StepError::Rejected {
                    code,
                    message: message.clone(),
                }),
            )
            .await;
            Err(RunnerError::SourceRejected { code, message })
        }
        Err(other) => {
            pipeline::settle(st, id, asset.attempts, &worker, Err(other)).await;
            Err(RunnerError::Internal(anyhow::anyhow!(
                "the job could not be prepared; it will be offered again"
            )))
        }
    }
}

/// Checks that job `id` is still held under this lease and transcoding.
async fn held(
    st: &Pipeline,
    name: &str,
    id: &str,
    lease: &str,
) -> Result<(crate::catalog::Asset, String), RunnerError> {
    let worker = holder(name, lease)?;
    let asset = st.db.asset(id).await?.ok_or(RunnerError::Lost)?;
    if asset.worker.as_deref() != Some(worker.as_str()) || asset.state != AssetState::Transcoding {
        return Err(RunnerError::Lost);
    }
    Ok((asset, worker))
}

/// The staged source of a job this worker holds.
pub async fn source(
    st: &Pipeline,
    name: &str,
    id: &str,
    lease: &str,
) -> Result<PathBuf, RunnerError> {
    held(st, name, id, lease).await?;
    Ok(pipeline::source_path(st, id))
}

/// Records progress and renews the lease; `true` when the uploader asked
/// to cancel.
pub async fn progress(
    st: &Pipeline,
    name: &str,
    id: &str,
    lease: &str,
    fraction: f64,
) -> Result<bool, RunnerError> {
    let (_, worker) = held(st, name, id, lease).await?;
    let cancel = match st.db.renew_lease(id, &worker, pipeline::LEASE_SECS).await {
        Ok(c) => c,
        Err(sqlx::Error::RowNotFound) => return Err(RunnerError::Lost),
        Err(e) => return Err(e.into()),
    };
    if fraction.is_finite() {
        let _ = st.db.set_progress(id, fraction.clamp(0.0, 1.0)).await;
    }
    Ok(cancel)
}

/// Takes a worker's result: writes it beside the job's staged files (no
/// bigger than `max_upload_bytes`), checks its hash against the signed
/// one, checks it is the movie asked for, then seals and publishes it as
/// a local run does. A refused result counts as one failed attempt: the
/// job is offered again (to any worker, or the manager's own loops) after
/// its backoff, and given up after the pipeline's attempts.
pub async fn success<S, E>(
    st: &pipeline::Ctx,
    name: &str,
    id: &str,
    lease: &str,
    signed_sha256: &str,
    body: S,
) -> Result<(), RunnerError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let (asset, worker) = held(st, name, id, lease).await?;
    // One result at a time per job: a second call (a worker retrying, a
    // replay) would write the same file and settle the job twice.
    let busy = Receiving::claim(id)?;
    // Sealing a large movie outlasts a lease: renewed while this runs.
    let lease_keeper = pipeline::LeaseKeeper::start(
        st.db.clone(),
        id.to_string(),
        worker.clone(),
        std::time::Duration::from_secs(pipeline::LEASE_SECS as u64 / 6),
    );
    let out = pipeline::result_path(st, id, &worker);
    // An MP4 at the site's bounds is rarely past a few times its source;
    // eight times (and 64 MiB) leaves room for a tiny, very compressed one.
    let limit = (asset.source_bytes.max(0) as u64)
        .saturating_mul(8)
        .saturating_add(64 << 20)
        .min(st.cfg.max_upload_bytes);
    // Results may use the upper half of the disk reserve, as the manager's
    // own transcodes do (`pipeline::why_no_new_jobs`).
    let room = Room {
        dir: st.cfg.staging_dir(),
        reserve_mb: st.cfg.disk_reserve_mb / 2,
    };
    let received = receive(&out, body, limit, &room, signed_sha256).await;
    if let Err(e) = received {
        if matches!(e, RunnerError::ResultCorrupt | RunnerError::TooLarge(_)) {
            tracing::warn!(asset = %id, worker = %worker, "transcode result refused: {e}");
            counted("refused");
            pipeline::settle(
                st,
                id,
                asset.attempts,
                &worker,
                Err(StepError::Internal(anyhow::anyhow!("worker {name}: {e}"))),
            )
            .await;
        }
        return Err(e);
    }
    // The whole result is here: checking and sealing it is the manager's
    // work now, and a worker that hangs up meanwhile must not cut it short
    // (a dropped request drops its handler).
    let (st, name, id) = (st.clone(), name.to_string(), id.to_string());
    tokio::spawn(async move {
        let held = (busy, lease_keeper);
        let sealed = check_and_seal(&st, &name, &id, &worker, asset.attempts, &out).await;
        drop(held);
        if let Ok(true) = sealed {
            // The worker need not wait for the nodes.
            tokio::spawn(async move { pipeline::first_pushes(&st, &id).await });
        }
        sealed.map(|_| ())
    })
    .await
    .map_err(|e| anyhow::anyhow!("sealing a worker's result stopped: {e}"))?
}

/// Jobs whose end (a result received and sealed, an error, an abort) is
/// being recorded in this process: one at a time per job.
struct Receiving(String);

impl Receiving {
    fn jobs() -> &'static std::sync::Mutex<std::collections::HashSet<String>> {
        static JOBS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
            std::sync::OnceLock::new();
        JOBS.get_or_init(Default::default)
    }

    fn claim(id: &str) -> Result<Receiving, RunnerError> {
        if !Self::jobs().lock().unwrap().insert(id.to_string()) {
            return Err(RunnerError::ResultInProgress);
        }
        Ok(Receiving(id.to_string()))
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        Self::jobs().lock().unwrap().remove(&self.0);
    }
}

/// Checks a received result against its source and seals it; `true` when
/// sealed (`false`: cancelled meanwhile, or failed here, as the job says).
async fn check_and_seal(
    st: &Pipeline,
    name: &str,
    id: &str,
    worker: &str,
    attempts: i64,
    out: &std::path::Path,
) -> Result<bool, RunnerError> {
    let source = pipeline::source_path(st, id);
    let t = &st.cfg.transcode;
    let (max_width, max_height) = (t.max_width, t.max_height);
    let result = out.to_path_buf();
    let checked = tokio::task::spawn_blocking(move || {
        let src = media::probe(&source).map_err(|e| format!("the source cannot be probed: {e}"))?;
        media::check_output(
            &result,
            &media::Expected {
                duration_secs: src.duration_secs,
                max_width,
                max_height,
                audio: src.audio.is_some(),
            },
        )
    })
    .await
    .map_err(|e| anyhow::anyhow!("result check panicked: {e}"))?;
    let info = match checked {
        Ok(info) => info,
        Err(why) => {
            let _ = tokio::fs::remove_file(out).await;
            tracing::warn!(asset = %id, worker = %worker, "transcode result refused: {why}");
            counted("refused");
            pipeline::settle(
                st,
                id,
                attempts,
                worker,
                Err(StepError::Internal(anyhow::anyhow!(
                    "worker {name}'s result was refused: {why}"
                ))),
            )
            .await;
            return Err(RunnerError::ResultRefused(why));
        }
    };
    // Revoked while its result was on the way: not sealed; the job goes to
    // another worker once the lease lapses.
    if st
        .db
        .transcoder(name)
        .await?
        .is_none_or(|t| t.revoked_at.is_some())
    {
        let _ = tokio::fs::remove_file(out).await;
        return Err(RunnerError::Revoked);
    }
    let video = info.video.as_ref().map(|v| (v.width, v.height));
    let (width, height) = video.unwrap_or((0, 0));
    let outcome = pipeline::finish(st, id, worker, out, (width, height, info.duration_secs)).await;
    let lost = matches!(&outcome, Err(StepError::Lost))
        || matches!(&outcome, Err(StepError::Internal(e)) if crate::catalog::lost_job(e));
    let ok = outcome.is_ok();
    pipeline::settle(st, id, attempts, worker, outcome).await;
    if lost {
        return Err(RunnerError::Lost);
    }
    if ok {
        tracing::info!(asset = %id, worker = %worker, "transcode worker's result sealed");
        counted("sealed");
    } else {
        let _ = tokio::fs::remove_file(out).await;
        // Cancelled as sealing began, or a failure here: recorded on the
        // job by settle; the worker is done with it either way.
        tracing::info!(asset = %id, worker = %worker, "a worker's result did not publish; see the job");
    }
    Ok(ok)
}

/// Where a result is written and how much room it must leave.
struct Room {
    dir: PathBuf,
    reserve_mb: u64,
}

impl Room {
    fn check(&self, incoming: u64) -> Result<(), RunnerError> {
        crate::quotas::check_space(&self.dir, self.reserve_mb, incoming)
            .map_err(|_| RunnerError::NoSpace)
    }
}

/// Removes a file unless kept: a result cut short (refused, or its request
/// dropped) leaves nothing behind.
struct Partial<'a>(&'a std::path::Path, bool);

impl Drop for Partial<'_> {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_file(self.0);
        }
    }
}

/// Streams `body` to `out`, at most `limit` bytes, leaving the disk's
/// reserve, and checks its SHA-256.
async fn receive<S, E>(
    out: &std::path::Path,
    mut body: S,
    limit: u64,
    room: &Room,
    signed_sha256: &str,
) -> Result<(), RunnerError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    use sha2::Digest;
    room.check(0)?;
    let mut partial = Partial(out, false);
    let mut file = tokio::fs::File::create(out)
        .await
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    let mut hash = sha2::Sha256::new();
    let (mut len, mut checked_at) = (0u64, 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| RunnerError::Bad(format!("the upload broke off: {e}")))?;
        len += chunk.len() as u64;
        if len > limit {
            return Err(RunnerError::TooLarge(limit));
        }
        if len - checked_at >= crate::quotas::SPACE_CHECK_EVERY {
            checked_at = len;
            room.check(0)?;
        }
        hash.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::StorageFull {
                RunnerError::NoSpace
            } else {
                anyhow::anyhow!("cannot write {}: {e}", out.display()).into()
            }
        })?;
    }
    file.sync_all()
        .await
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    // Not a secret: the sender chose the hash it signed.
    if !hex::encode(hash.finalize()).eq_ignore_ascii_case(signed_sha256.trim()) {
        return Err(RunnerError::ResultCorrupt);
    }
    partial.1 = true;
    Ok(())
}

/// The worker could not make the result: one failed attempt, retried after
/// the pipeline's backoff (by any worker), given up after its attempts.
pub async fn failed(
    st: &Pipeline,
    name: &str,
    id: &str,
    lease: &str,
    code: &str,
    message: &str,
) -> Result<(), RunnerError> {
    let (asset, worker) = held(st, name, id, lease).await?;
    let _busy = Receiving::claim(id)?;
    let message: String = message.chars().take(500).collect();
    let code: String = code.chars().take(64).collect();
    tracing::warn!(asset = %id, worker = %worker, code = %code, "transcode worker failed: {message}");
    counted("failed");
    pipeline::settle(
        st,
        id,
        asset.attempts,
        &worker,
        Err(StepError::Internal(anyhow::anyhow!(
            "worker {name} failed ({code}): {message}"
        ))),
    )
    .await;
    Ok(())
}

/// The worker gives the job up (it is stopping, or the uploader
/// cancelled): queued again at once, no attempt counted; a cancelled job
/// ends `cancelled`.
pub async fn abort(st: &Pipeline, name: &str, id: &str, lease: &str) -> Result<(), RunnerError> {
    let (asset, worker) = held(st, name, id, lease).await?;
    let _busy = Receiving::claim(id)?;
    counted("aborted");
    let outcome = pipeline::cancelled_or_interrupted(st, id).await;
    pipeline::settle(st, id, asset.attempts, &worker, Err(outcome)).await;
    Ok(())
}

/// Revokes a worker: its next call is refused (`worker_revoked`), and its
/// job, if any, is taken over once its lease lapses.
pub async fn revoke(db: &dyn Catalog, name: &str) -> sqlx::Result<bool> {
    db.revoke_transcoder(name).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&'static [u8]]) -> impl Stream<Item = Result<bytes::Bytes, String>> + Unpin {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(bytes::Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn a_result_is_kept_only_whole_within_the_bound_and_as_signed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.mp4");
        let room = Room {
            dir: dir.path().to_path_buf(),
            reserve_mb: 0,
        };
        let sha = shared::content_sha256_hex(b"hello world");
        receive(&out, body(&[b"hello ", b"world"]), 100, &room, &sha)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"hello world");

        // Each refusal leaves no file behind.
        let e = receive(&out, body(&[b"hello ", b"there"]), 100, &room, &sha)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "result_corrupt");
        assert!(!out.exists());

        let e = receive(&out, body(&[b"hello ", b"world"]), 8, &room, &sha)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "result_too_large");
        assert!(!out.exists());

        // A disk at its reserve takes nothing.
        let full = Room {
            dir: dir.path().to_path_buf(),
            reserve_mb: u64::MAX >> 21,
        };
        let e = receive(&out, body(&[b"hello ", b"world"]), 100, &full, &sha)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "insufficient_storage");
        assert!(!out.exists());

        let broken = futures::stream::iter(vec![
            Ok(bytes::Bytes::from_static(b"hello")),
            Err("connection reset".to_string()),
        ]);
        let e = receive(&out, broken, 100, &room, &sha).await.unwrap_err();
        assert_eq!(e.code(), "bad_request");
        assert!(!out.exists());
    }

    #[test]
    fn names_and_leases_are_plain() {
        assert!(valid_name("encoder-1.example_b"));
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert_eq!(holder("w", "00ff").unwrap(), "runner/w#00ff");
        for bad in ["", "zz", "0f&x=1", &"a".repeat(33)] {
            assert!(holder("w", bad).is_err(), "{bad:?}");
        }
    }
}
