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
            RunnerError::Lost => "job_lost",
            RunnerError::BadLease => "bad_lease",
            RunnerError::SourceRejected { .. } => "source_rejected",
            RunnerError::ResultRefused(_) => "result_refused",
            RunnerError::ResultCorrupt => "result_corrupt",
            RunnerError::TooLarge(_) => "result_too_large",
            RunnerError::Bad(_) => "bad_request",
            RunnerError::Db(_) | RunnerError::Internal(_) => "internal",
        }
    }
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
    let secret = shared::DataKey::generate();
    let wrapped = master.wrap(&wrap_context(name), &secret);
    match db
        .register_transcoder(&auth::token_hash(token.trim()), name, &wrapped)
        .await?
    {
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
    st: &Pipeline,
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
    // Sealing a large movie outlasts a lease: renewed while this runs.
    let _lease = pipeline::LeaseKeeper::start(
        st.db.clone(),
        id.to_string(),
        worker.clone(),
        std::time::Duration::from_secs(pipeline::LEASE_SECS as u64 / 6),
    );
    let out = pipeline::result_path(st, id, &worker);
    let received = receive(&out, body, st.cfg.max_upload_bytes, signed_sha256).await;
    if let Err(e) = received {
        let _ = tokio::fs::remove_file(&out).await;
        if matches!(e, RunnerError::ResultCorrupt | RunnerError::TooLarge(_)) {
            tracing::warn!(asset = %id, worker = %worker, "transcode result refused: {e}");
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
    let source = pipeline::source_path(st, id);
    let t = &st.cfg.transcode;
    let (max_width, max_height) = (t.max_width, t.max_height);
    let result = out.clone();
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
            let _ = tokio::fs::remove_file(&out).await;
            tracing::warn!(asset = %id, worker = %worker, "transcode result refused: {why}");
            pipeline::settle(
                st,
                id,
                asset.attempts,
                &worker,
                Err(StepError::Internal(anyhow::anyhow!(
                    "worker {name}'s result was refused: {why}"
                ))),
            )
            .await;
            return Err(RunnerError::ResultRefused(why));
        }
    };
    let video = info.video.as_ref().map(|v| (v.width, v.height));
    let (width, height) = video.unwrap_or((0, 0));
    let outcome =
        pipeline::finish(st, id, &worker, &out, (width, height, info.duration_secs)).await;
    let lost = matches!(&outcome, Err(StepError::Lost))
        || matches!(&outcome, Err(StepError::Internal(e)) if crate::catalog::lost_job(e));
    let ok = outcome.is_ok();
    pipeline::settle(st, id, asset.attempts, &worker, outcome).await;
    if lost {
        return Err(RunnerError::Lost);
    }
    if !ok {
        // Cancelled while sealing started, or an internal failure here:
        // recorded on the job by settle; the worker is done with it.
        tracing::info!(asset = %id, worker = %worker, "a worker's result did not publish; see the job");
    }
    tracing::info!(asset = %id, worker = %worker, "transcode worker's result taken");
    Ok(())
}

/// Streams `body` to `out`, at most `limit` bytes, and checks its SHA-256.
async fn receive<S, E>(
    out: &std::path::Path,
    mut body: S,
    limit: u64,
    signed_sha256: &str,
) -> Result<(), RunnerError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    use sha2::Digest;
    let mut file = tokio::fs::File::create(out)
        .await
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    let mut hash = sha2::Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| RunnerError::Bad(format!("the upload broke off: {e}")))?;
        len += chunk.len() as u64;
        if len > limit {
            return Err(RunnerError::TooLarge(limit));
        }
        hash.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    file.sync_all()
        .await
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    // Not a secret: the sender chose the hash it signed.
    if !hex::encode(hash.finalize()).eq_ignore_ascii_case(signed_sha256.trim()) {
        return Err(RunnerError::ResultCorrupt);
    }
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
    let message: String = message.chars().take(500).collect();
    let code: String = code.chars().take(64).collect();
    tracing::warn!(asset = %id, worker = %worker, code = %code, "transcode worker failed: {message}");
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
        let sha = shared::content_sha256_hex(b"hello world");
        receive(&out, body(&[b"hello ", b"world"]), 100, &sha)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"hello world");

        let e = receive(&out, body(&[b"hello ", b"there"]), 100, &sha)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "result_corrupt");

        let e = receive(&out, body(&[b"hello ", b"world"]), 8, &sha)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "result_too_large");

        let broken = futures::stream::iter(vec![
            Ok(bytes::Bytes::from_static(b"hello")),
            Err("connection reset".to_string()),
        ]);
        let e = receive(&out, broken, 100, &sha).await.unwrap_err();
        assert_eq!(e.code(), "bad_request");
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
