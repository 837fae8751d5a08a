//! The one way a received file becomes a movie: the multipart form
//! (`POST /api/v1/uploads`) and the resumable tus uploads ([`crate::tus`])
//! both end here once their last byte is on disk and fsynced.
//!
//! The file is probed now (headers only: milliseconds), so one we will never
//! accept is refused while the uploader is still looking, instead of turning
//! into a `rejected` asset later; then it is renamed to the job's source, the
//! rename made durable, and the asset row written with the upload's cost in
//! one transaction. Until that row exists nothing refers to the file, and on
//! any refusal the caller still owns it (and removes it).

use std::path::Path;

use crate::{catalog::User, ledger::LedgerError, pipeline::Pipeline};

pub const MAX_TITLE_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the file is empty")]
    Empty,
    /// The title is missing or too long (`title_missing`, `title_too_long`).
    #[error("{message}")]
    BadTitle { code: &'static str, message: String },
    /// The probe refused the file (its stable code from `media`).
    #[error("{message}")]
    Rejected { code: &'static str, message: String },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// A title as stored: trimmed, control characters removed, the file's
/// name (without its extension) when none was given, bounded.
pub fn clean_title(raw: &str, file_name: &str) -> Result<String, IngestError> {
    let fallback = file_name
        .rsplit_once('.')
        .map(|(stem, _)| stem)
        .unwrap_or(file_name);
    let t: String = raw.trim().chars().filter(|c| !c.is_control()).collect();
    let t = if t.is_empty() {
        fallback
            .trim()
            .chars()
            .filter(|c| !c.is_control())
            .collect()
    } else {
        t
    };
    if t.is_empty() {
        return Err(IngestError::BadTitle {
            code: "title_missing",
            message: "give the movie a title".into(),
        });
    }
    if t.chars().count() > MAX_TITLE_CHARS {
        return Err(IngestError::BadTitle {
            code: "title_too_long",
            message: format!("a title has at most {MAX_TITLE_CHARS} characters"),
        });
    }
    Ok(t)
}

/// A file fully received at `staged` (fsynced, `size` bytes) from `user`.
pub struct Received<'a> {
    /// The new movie's id (the caller's choice, so a resumable upload can
    /// note it before the movie exists).
    pub asset_id: &'a str,
    pub staged: &'a Path,
    pub size: u64,
    /// The name the uploader's file had (at most 255 characters kept).
    pub source_name: &'a str,
    /// The title the uploader gave; empty: the file's name.
    pub title: &'a str,
}

/// Probes, moves and records `r` as the movie `r.asset_id`. On `Err` the
/// staged file is where it was.
pub async fn accept(p: &Pipeline, user: &User, r: Received<'_>) -> Result<(), IngestError> {
    let source_name: String = r.source_name.chars().take(255).collect();
    if r.size == 0 {
        metrics::counter!("manager_uploads_total", "result" => "empty").increment(1);
        return Err(IngestError::Empty);
    }
    let title = clean_title(r.title, &source_name)?;
    let probe_path = r.staged.to_path_buf();
    let limits = p.cfg.media_limits();
    let size = r.size;
    let verdict = tokio::task::spawn_blocking(move || {
        let info = crate::media::probe(&probe_path)?;
        crate::media::validate(&info, size, &limits)
    })
    .await
    .map_err(|e| IngestError::Internal(e.into()))?;
    if let Err(e) = verdict {
        if !e.is_user_error() {
            return Err(IngestError::Internal(anyhow::anyhow!(
                "probe failed: {e} ({})",
                e.detail().unwrap_or_default()
            )));
        }
        metrics::counter!("manager_uploads_total", "result" => "rejected").increment(1);
        tracing::info!(code = e.code(), user = user.id, "upload refused: {e}");
        return Err(IngestError::Rejected {
            code: e.code(),
            message: e.to_string(),
        });
    }

    let asset_id = r.asset_id;
    let src = crate::pipeline::source_path(p, asset_id);
    tokio::fs::rename(r.staged, &src)
        .await
        .map_err(|e| IngestError::Internal(e.into()))?;
    // The rename itself must survive a power cut before the upload is
    // acknowledged: the file's data was fsynced, its new name was not.
    let staging = p.cfg.staging_dir();
    let synced = tokio::task::spawn_blocking(move || crate::pipeline::fsync_dir(&staging))
        .await
        .map_err(|e| IngestError::Internal(e.into()))
        .and_then(|r| r.map_err(|e| IngestError::Internal(e.into())));
    // The row and the upload's cost (docs/credits.md) in one transaction.
    let recorded = match synced {
        Ok(()) => crate::ledger::insert_asset_paid(
            &*p.db,
            p.cfg.credits.upload_cost as i64,
            asset_id,
            user.id,
            &title,
            &source_name,
            size as i64,
        )
        .await
        .map_err(IngestError::from),
        Err(e) => Err(e),
    };
    if let Err(e) = recorded {
        // Back where the caller expects it, so its clean-up (or a retry of
        // the last request, for a resumable upload) still finds it.
        let _ = tokio::fs::rename(&src, r.staged).await;
        return Err(e);
    }
    p.wake.notify_one();
    metrics::counter!("manager_uploads_total", "result" => "accepted").increment(1);
    tracing::info!(asset = %asset_id, user = user.id, bytes = size, "upload accepted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<String, IngestError>) -> &'static str {
        match r {
            Err(IngestError::BadTitle { code, .. }) => code,
            other => panic!("expected a title error, got {other:?}"),
        }
    }

    #[test]
    fn titles_are_cleaned_and_bounded() {
        assert_eq!(clean_title("  My film\u{7} ", "x").unwrap(), "My film");
        assert_eq!(clean_title("", "holiday.mp4").unwrap(), "holiday");
        assert_eq!(clean_title("", "no extension").unwrap(), "no extension");
        assert_eq!(code(clean_title("", "")), "title_missing");
        assert_eq!(code(clean_title(&"a".repeat(201), "x")), "title_too_long");
    }
}
