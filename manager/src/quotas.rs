//! Per-account upload limits (`[quotas]`, docs/operations.md "Per-account
//! limits"): uploads sent at once, uploads per 24 hours, and bytes kept. One
//! account cannot fill the disk or the transcode queue for everyone else.
//! Operators are not limited. The transcode queue's fairness between
//! accounts is the catalog's claim order (each owner's jobs take turns).
//!
//! The slot for an upload in flight is taken before a byte is written and
//! given back when the request ends, however it ends (its guard drops).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::{catalog::Catalog, catalog::User, config::QuotasConfig};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuotaError {
    #[error("this account is already sending {limit} uploads; wait for one to finish")]
    TooManyAtOnce { limit: u32 },
    #[error("this account made {limit} uploads in the last 24 hours; try again later")]
    TooManyToday { limit: u32 },
    #[error(
        "this account keeps {used} bytes of {limit} allowed; delete a movie or ask the operator"
    )]
    Exceeded { used: u64, limit: u64 },
    #[error("the site's disk is nearly full, so uploads are paused; try again later (the operator has been told)")]
    NoSpace,
}

/// How often (bytes received) a streaming upload looks at the disk again.
pub const SPACE_CHECK_EVERY: u64 = 4 << 20;

/// `Err(NoSpace)` when writing `incoming` more bytes into `dir` would leave
/// less than `reserve_mb` free. A disk that cannot be asked is not refused
/// on: the write itself then says whether there is room.
pub fn check_space(
    dir: &std::path::Path,
    reserve_mb: u64,
    incoming: u64,
) -> Result<(), QuotaError> {
    let Ok(space) = shared::runtime::disk_space(dir) else {
        return Ok(());
    };
    let reserve = reserve_mb.saturating_mul(1 << 20);
    if space.free_bytes.saturating_sub(incoming) < reserve {
        // Throttled: a full disk refuses every upload attempt.
        static LAST: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
        let now = shared::runtime::unix_now();
        if now - LAST.swap(now, std::sync::atomic::Ordering::Relaxed) >= 60 {
            tracing::error!(
                code = "insufficient_storage",
                free = space.free_bytes,
                reserve,
                incoming,
                dir = %dir.display(),
                "uploads refused: the data disk is at its free-space reserve (disk_reserve_mb)"
            );
        }
        return Err(QuotaError::NoSpace);
    }
    Ok(())
}

/// Uploads being received, per account.
#[derive(Default)]
pub struct InFlight(Mutex<HashMap<i64, u32>>);

/// One upload's place: given back on drop. `remaining` is how many bytes
/// this upload may still bring before the account's quota is exceeded.
pub struct UploadSlot {
    inflight: Option<(Arc<InFlight>, i64)>,
    pub remaining: u64,
    used: u64,
    limit: u64,
}

impl UploadSlot {
    /// `Err` once `size` bytes of this upload pass the account's quota.
    pub fn check(&self, size: u64) -> Result<(), QuotaError> {
        if size > self.remaining {
            return Err(QuotaError::Exceeded {
                used: self.used,
                limit: self.limit,
            });
        }
        Ok(())
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        if let Some((inflight, user)) = self.inflight.take() {
            let mut m = inflight.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(&user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&user);
                }
            }
        }
    }
}

/// Resumable uploads an account has begun and not finished
/// ([`crate::tus`]): each counts as an upload at once and one of the day's,
/// and its declared length as bytes kept, for as long as it lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    pub count: u32,
    pub bytes: u64,
}

/// Takes an upload slot for `user`, or says which limit stands in the way.
/// `pending` is asked under the same lock as the slots are counted, after
/// the database was read: a resumable upload created meanwhile is seen
/// either as its creator's slot or as pending, never as neither.
pub async fn begin_upload(
    db: &dyn Catalog,
    q: &QuotasConfig,
    inflight: &Arc<InFlight>,
    user: &User,
    pending: &(dyn Fn() -> Pending + Send + Sync),
) -> Result<UploadSlot, BeginError> {
    if user.is_operator() {
        return Ok(UploadSlot {
            inflight: None,
            remaining: u64::MAX,
            used: 0,
            limit: 0,
        });
    }
    let (used, today) = db
        .upload_usage(user.id, crate::catalog::now() - 86_400)
        .await?;
    let mut m = inflight.0.lock().unwrap_or_else(|e| e.into_inner());
    let pending = pending();
    let used = (used.max(0) as u64).saturating_add(pending.bytes);
    if today + pending.count as i64 >= q.uploads_per_day as i64 {
        return Err(QuotaError::TooManyToday {
            limit: q.uploads_per_day,
        }
        .into());
    }
    let remaining = match q.bytes_per_account {
        0 => u64::MAX,
        limit if used >= limit => return Err(QuotaError::Exceeded { used, limit }.into()),
        limit => limit - used,
    };
    let n = m.entry(user.id).or_insert(0);
    if *n + pending.count >= q.concurrent_uploads {
        return Err(QuotaError::TooManyAtOnce {
            limit: q.concurrent_uploads,
        }
        .into());
    }
    *n += 1;
    drop(m);
    Ok(UploadSlot {
        inflight: Some((inflight.clone(), user.id)),
        remaining,
        used,
        limit: q.bytes_per_account,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum BeginError {
    #[error(transparent)]
    Quota(#[from] QuotaError),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_given_back_however_the_upload_ends() {
        let inflight = Arc::new(InFlight::default());
        inflight.0.lock().unwrap().insert(7, 2);
        let slot = UploadSlot {
            inflight: Some((inflight.clone(), 7)),
            remaining: 10,
            used: 90,
            limit: 100,
        };
        assert!(slot.check(10).is_ok());
        assert_eq!(
            slot.check(11),
            Err(QuotaError::Exceeded {
                used: 90,
                limit: 100
            })
        );
        drop(slot);
        assert_eq!(inflight.0.lock().unwrap().get(&7), Some(&1));
    }
}
