//! Blob storage on the node: create-only, verified, atomic and durable writes,
//! ranged reads through `object_store`.
//!
//! `object_store`'s `LocalFileSystem` (0.12) writes through a temp file and a
//! rename but never fsyncs, so a power cut can leave a named blob that is
//! empty or partial: exactly the "disk wrote zeroes" failure we must not
//! have. Writes therefore go through [`BlobStore::put_verified`], which hashes
//! while streaming to a temp file, fsyncs it, refuses a hash mismatch, links
//! it into place with `link(2)` (which fails rather than overwrite) and fsyncs
//! the directory. Listing and lookups go through `object_store`; playback
//! reads the open file with `pread` ([`BlobStore::open_for_playback`]),
//! because every `object_store` ranged read reopens the file and copies
//! into a fresh buffer, and playback is the node's hot path. A bucket-backed
//! store would need its own playback reader behind `shared::RangeRead`.
//!
//! Layout under `storage_dir`: `blobs/<2 hex>/<sha256>` (the good copies, the
//! only ones served, copied or listed as held), `tmp/` (pushes in flight,
//! emptied at start), `quarantine/<sha256>.<unix time>` (copies that failed
//! a check, kept for inspection, never served) and `verified.json`: when
//! each good blob was last proven to hash to its name (at receipt, then by
//! every scrub pass), so the inventory can tell the manager how fresh each
//! copy's proof is. If the whole folder disappears while the node runs
//! (a wiped or replaced disk), the sub-folders are made again on the next
//! write, so the manager's reconciliation can refill it without a restart.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use object_store::{local::LocalFileSystem, ObjectStore};
use sha2::{Digest, Sha256};
use shared::BlobId;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the received bytes hash to {actual}, not to the blob name {expected}")]
    HashMismatch { expected: BlobId, actual: BlobId },
    #[error("the upload stream failed: {0}")]
    Body(String),
    #[error("blob not found")]
    NotFound,
    #[error("storage I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("object store error: {0}")]
    Object(#[from] object_store::Error),
}

/// Whether a push stored a new copy or found the same bytes already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    AlreadyPresent,
}

#[derive(Clone)]
pub struct BlobStore {
    root: PathBuf,
    objects: Arc<LocalFileSystem>,
    /// Blob → unix time it was last proven to hash to its name; mirrored
    /// in `verified.json`, rewritten atomically by [`BlobStore::flush_verified`]
    /// (every few seconds, less often as the map grows, at the end of each
    /// scrub pass and at shutdown; see `VERIFIED_FLUSH`), never once per change: a pass
    /// over 100,000 copies would otherwise write the whole map 100,000
    /// times. A crash loses at most the last few seconds of proof times,
    /// which only means those copies count as unproven until the next pass.
    verified: Arc<Mutex<BTreeMap<BlobId, i64>>>,
    verified_dirty: Arc<std::sync::atomic::AtomicBool>,
    verified_flush_failing: Arc<std::sync::atomic::AtomicBool>,
    /// Bumped whenever a copy is stored, quarantined or deleted here, so a
    /// cached listing (`/metrics`) knows it is out of date.
    changes: Arc<std::sync::atomic::AtomicU64>,
}

/// A copy taken out of service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub id: BlobId,
    /// Unix time it was quarantined.
    pub since: i64,
}

const SUBDIRS: [&str; 3] = ["blobs", "tmp", "quarantine"];
const VERIFIED_FILE: &str = "verified.json";

/// Removes a temp file unless the write that made it succeeded.
pub(crate) struct TempGuard(pub(crate) Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Why [`receive_hashed`] stopped.
pub(crate) enum ReceiveError {
    Io(io::Error),
    /// The sender's stream failed (a cut connection).
    Body(String),
}

/// Receives `body` into `tmp` (created new, never reused), hashing as it
/// goes, then flushes and fsyncs it. Returns its SHA-256 and length. The
/// caller holds a [`TempGuard`] on `tmp` and commits with
/// [`link_create_only`] only once the hash is the one expected. The one
/// write path for movie blobs and the manager's backups alike.
pub(crate) async fn receive_hashed<S, E>(tmp: &Path, body: S) -> Result<(BlobId, u64), ReceiveError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .await
        .map_err(ReceiveError::Io)?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ReceiveError::Body(e.to_string()))?;
        hasher.update(&chunk);
        received += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(ReceiveError::Io)?;
    }
    file.flush().await.map_err(ReceiveError::Io)?;
    file.sync_all().await.map_err(ReceiveError::Io)?;
    Ok((BlobId::from_hasher(hasher), received))
}

/// Commits the fsynced `tmp` as `dest`, create-only: a hard link never
/// replaces an existing name, and the folder is fsynced so the name
/// survives a power cut. `false` when `dest` already exists (same name,
/// same SHA-256: the bytes are already there).
pub(crate) fn link_create_only(tmp: &Path, dest: &Path) -> io::Result<bool> {
    match std::fs::hard_link(tmp, dest) {
        Ok(()) => {
            fsync_dir(dest.parent().expect("a file has a folder"))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

impl BlobStore {
    /// Opens (creating if needed) the store under `root`. Temp files left by a
    /// crash are removed: they were never committed, so nothing refers to them.
    pub fn open(root: &Path) -> io::Result<Self> {
        for sub in SUBDIRS {
            std::fs::create_dir_all(root.join(sub))?;
        }
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_file(entry?.path());
        }
        let objects = LocalFileSystem::new_with_prefix(root.join("blobs"))
            .map_err(|e| io::Error::other(e.to_string()))?;
        // A missing or unreadable record only means "not verified since
        // start": the next scrub pass proves every copy again.
        let verified: BTreeMap<BlobId, i64> = std::fs::read(root.join(VERIFIED_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(Self {
            root: root.to_path_buf(),
            objects: Arc::new(objects),
            verified: Arc::new(Mutex::new(verified)),
            verified_dirty: Default::default(),
            verified_flush_failing: Default::default(),
            changes: Default::default(),
        })
    }

    /// How many times copies were stored, quarantined or deleted since start.
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Makes the folders again if they vanished (a wiped disk) so writes work.
    fn ensure_layout(&self) -> io::Result<()> {
        for sub in SUBDIRS {
            std::fs::create_dir_all(self.root.join(sub))?;
        }
        Ok(())
    }

    /// When `id` was last proven to hash to its name, if ever on this disk.
    pub fn verified_at(&self, id: &BlobId) -> Option<i64> {
        self.verified
            .lock()
            .expect("verified map lock")
            .get(id)
            .copied()
    }

    /// [`verified_at`](BlobStore::verified_at) of each of `ids`, under one
    /// lock (an inventory of 100,000 copies).
    pub fn verified_times(&self, ids: &[(BlobId, u64)]) -> Vec<Option<i64>> {
        let m = self.verified.lock().expect("verified map lock");
        ids.iter().map(|(id, _)| m.get(id).copied()).collect()
    }

    /// How many copies have a recorded proof time.
    pub fn verified_count(&self) -> usize {
        self.verified.lock().expect("verified map lock").len()
    }

    /// The oldest proof time among `ids` (a copy never proven counts as 0).
    pub fn oldest_verified(&self, ids: &[(BlobId, u64)]) -> Option<i64> {
        let m = self.verified.lock().expect("verified map lock");
        ids.iter()
            .map(|(id, _)| m.get(id).copied().unwrap_or(0))
            .min()
    }

    /// Records (`Some`) or forgets (`None`) the proof time of `id`, in
    /// memory; [`flush_verified`](BlobStore::flush_verified) makes it durable.
    pub fn set_verified(&self, id: &BlobId, at: Option<i64>) {
        let mut m = self.verified.lock().expect("verified map lock");
        match at {
            Some(t) => m.insert(*id, t),
            None => m.remove(id),
        };
        self.verified_dirty
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Writes `verified.json` if anything changed since the last write.
    /// Blocking (it fsyncs): call it from a blocking thread.
    pub fn flush_verified(&self) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if !self.verified_dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        // A change made after the swap either lands in this snapshot or
        // sets the flag again for the next flush.
        let snapshot = serde_json::to_vec(&*self.verified.lock().expect("verified map lock"))
            .expect("a map of strings and integers serialises");
        self.write_atomic(VERIFIED_FILE, &snapshot)
            .inspect_err(|_| {
                self.verified_dirty.store(true, Ordering::Release);
            })
    }

    /// [`flush_verified`](BlobStore::flush_verified) off the async threads,
    /// logging a failure: only freshness information is at stake, and the
    /// next pass rebuilds it.
    pub async fn flush_verified_logged(&self) {
        let store = self.clone();
        let failing = self.verified_flush_failing.clone();
        let outcome = match tokio::task::spawn_blocking(move || store.flush_verified()).await {
            Ok(r) => r,
            Err(e) => Err(io::Error::other(e)),
        };
        // Once per run of failures: a full disk would say it every 5 s.
        match outcome {
            Ok(()) => {
                if failing.swap(false, std::sync::atomic::Ordering::AcqRel) {
                    tracing::info!("verification times are recorded again");
                }
            }
            Err(e) => {
                if !failing.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    tracing::warn!("cannot record verification times (retrying): {e}");
                }
            }
        }
    }

    fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{name}.{}", uuid::Uuid::new_v4()));
        let mut guard = TempGuard(Some(tmp.clone()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.root.join(name))?;
        guard.0 = None;
        Ok(())
    }

    fn key(id: &BlobId) -> object_store::path::Path {
        let hex = id.to_string();
        object_store::path::Path::from(format!("{}/{}", &hex[..2], hex))
    }

    fn file_path(&self, id: &BlobId) -> PathBuf {
        let hex = id.to_string();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    /// Streams `body` into the store under `id`, committing only when the
    /// SHA-256 of what arrived equals `id`. Never overwrites a stored blob.
    pub async fn put_verified<S, E>(&self, id: &BlobId, body: S) -> Result<PutOutcome, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}.{}", id, uuid::Uuid::new_v4()));
        self.ensure_layout()?;
        let mut guard = TempGuard(Some(tmp.clone()));
        let (actual, received) = match receive_hashed(&tmp, body).await {
            Ok(r) => r,
            Err(ReceiveError::Io(e)) => return Err(e.into()),
            Err(ReceiveError::Body(e)) => return Err(StoreError::Body(e)),
        };
        if actual != *id {
            return Err(StoreError::HashMismatch {
                expected: *id,
                actual,
            });
        }
        let dest = self.file_path(id);
        // A stored copy of another length under the same name cannot hash
        // to it (truncated or grown on disk): it gives way to the verified
        // bytes we hold, and is kept in quarantine, not overwritten.
        if let Ok(meta) = tokio::fs::metadata(&dest).await {
            if meta.len() != received {
                tracing::error!(blob = %id, stored = meta.len(), received, "stored copy has the wrong length; replacing it");
                match self.quarantine(id).await {
                    Ok(()) | Err(StoreError::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let outcome = tokio::task::spawn_blocking(move || -> io::Result<PutOutcome> {
            let dir = dest.parent().expect("blob path has a parent");
            if !dir.exists() {
                std::fs::create_dir_all(dir)?;
                fsync_dir(dir.parent().expect("shard dir has a parent"))?;
            }
            Ok(if link_create_only(&tmp, &dest)? {
                PutOutcome::Stored
            } else {
                PutOutcome::AlreadyPresent
            })
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))??;
        // The temp name is removed whether we linked or found a copy.
        drop(guard.0.take().map(std::fs::remove_file));
        if outcome == PutOutcome::Stored {
            self.changed();
            self.set_verified(id, Some(shared::runtime::unix_now()));
        }
        Ok(outcome)
    }

    /// Size of a stored blob, `None` when this node holds no copy.
    pub async fn size(&self, id: &BlobId) -> Result<Option<u64>, StoreError> {
        match self.objects.head(&Self::key(id)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens a good copy for playback, with its length: one blocking-pool
    /// hop per request, then positional reads on the open file (see
    /// [`shared::open_file_range`]). Playback reads the local file directly
    /// rather than through `object_store`, whose every ranged read reopens
    /// the file: on this path that was a measurable share of the node's
    /// time. A copy quarantined or deleted mid-request stays readable
    /// through the open file until the request ends; its bytes are still
    /// authenticated segment by segment.
    pub async fn open_for_playback(
        &self,
        id: &BlobId,
        warm: bool,
    ) -> Result<Option<(Arc<std::fs::File>, u64)>, StoreError> {
        let path = self.file_path(id);
        let open = move || {
            let file = std::fs::File::open(&path)?;
            let len = file.metadata()?.len();
            Ok::<_, io::Error>((Arc::new(file), len))
        };
        // `warm`: played a moment ago, so nothing here waits on the disk
        // (playcache::warm); otherwise the blocking pool opens it.
        let opened = if warm {
            open()
        } else {
            tokio::task::spawn_blocking(open)
                .await
                .map_err(|e| StoreError::Io(io::Error::other(e)))?
        };
        match opened {
            Ok(found) => Ok(Some(found)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every blob this node holds, with its size.
    pub async fn list(&self) -> Result<Vec<(BlobId, u64)>, StoreError> {
        let mut out = Vec::new();
        if !self.root.join("blobs").is_dir() {
            // The disk was wiped: it holds nothing (until refilled).
            return Ok(out);
        }
        let mut listing = self.objects.list(None);
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            if let Some(Ok(id)) = meta.location.filename().map(str::parse::<BlobId>) {
                out.push((id, meta.size));
            }
        }
        // Byte order is the order of the hex names.
        out.sort_unstable_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// Moves a blob that failed authentication out of the serving path. A
    /// quarantined copy is kept for inspection but never served or copied.
    pub async fn quarantine(&self, id: &BlobId) -> Result<(), StoreError> {
        self.ensure_layout()?;
        let from = self.file_path(id);
        let to =
            self.root
                .join("quarantine")
                .join(format!("{}.{}", id, shared::runtime::unix_now()));
        match tokio::fs::rename(&from, &to).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound),
            Err(e) => return Err(e.into()),
        }
        self.changed();
        self.set_verified(id, None);
        Ok(())
    }

    /// Deletes the quarantined copies set aside before `cutoff` (unix
    /// time), durably; returns them.
    pub async fn purge_quarantine(&self, cutoff: i64) -> Result<Vec<Quarantined>, StoreError> {
        let mut gone = Vec::new();
        for q in self.quarantined().await? {
            if q.since >= cutoff {
                continue;
            }
            let path = self
                .root
                .join("quarantine")
                .join(format!("{}.{}", q.id, q.since));
            match tokio::fs::remove_file(&path).await {
                Ok(()) => gone.push(q),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !gone.is_empty() {
            fsync_dir(&self.root.join("quarantine"))?;
        }
        Ok(gone)
    }

    /// Copies taken out of service, oldest first.
    pub async fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        let mut out = Vec::new();
        let mut rd = match tokio::fs::read_dir(self.root.join("quarantine")).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        while let Some(entry) = rd.next_entry().await? {
            let name = entry.file_name();
            let Some((id, since)) = name.to_str().and_then(|n| n.split_once('.')) else {
                continue;
            };
            if let (Ok(id), Ok(since)) = (id.parse::<BlobId>(), since.parse::<i64>()) {
                out.push(Quarantined { id, since });
            }
        }
        out.sort_by_key(|q| (q.since, q.id));
        Ok(out)
    }

    /// Opens a good copy for streaming out whole (repairs of other nodes).
    pub async fn open_file(&self, id: &BlobId) -> Result<(tokio::fs::File, u64), StoreError> {
        match tokio::fs::File::open(self.file_path(id)).await {
            Ok(f) => {
                let len = f.metadata().await?.len();
                Ok((f, len))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    /// The path of a good copy, for the scrubber's blocking reads.
    pub fn blob_path(&self, id: &BlobId) -> PathBuf {
        self.file_path(id)
    }

    /// Removes a good copy for good (the manager found no asset using it
    /// for longer than its grace period). The removal is made durable.
    pub async fn delete(&self, id: &BlobId) -> Result<(), StoreError> {
        let path = self.file_path(id);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound),
            Err(e) => return Err(e.into()),
        }
        if let Some(dir) = path.parent() {
            let _ = fsync_dir(dir);
        }
        self.changed();
        self.set_verified(id, None);
        Ok(())
    }

    /// Exercises the disk for real: write, fsync, read back, delete.
    pub async fn health_check(&self) -> Result<(), StoreError> {
        self.ensure_layout()?;
        let p = self
            .root
            .join("tmp")
            .join(format!("health.{}", uuid::Uuid::new_v4()));
        let _guard = TempGuard(Some(p.clone()));
        let probe = uuid::Uuid::new_v4().to_string();
        let mut f = tokio::fs::File::create(&p).await?;
        f.write_all(probe.as_bytes()).await?;
        f.sync_all().await?;
        drop(f);
        let back = tokio::fs::read(&p).await?;
        if back != probe.as_bytes() {
            return Err(StoreError::Io(io::Error::other(
                "read back differs from write",
            )));
        }
        tokio::fs::remove_file(&p).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(data: &[u8]) -> impl Stream<Item = Result<Bytes, io::Error>> {
        let parts: Vec<Result<Bytes, io::Error>> = data
            .chunks(7)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(parts)
    }

    #[tokio::test]
    async fn stores_verified_and_refuses_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = b"sealed bytes, pretend".to_vec();
        let id = BlobId::of(&data);
        assert_eq!(
            store.put_verified(&id, chunks(&data)).await.unwrap(),
            PutOutcome::Stored
        );
        assert_eq!(
            store.put_verified(&id, chunks(&data)).await.unwrap(),
            PutOutcome::AlreadyPresent
        );
        assert_eq!(store.size(&id).await.unwrap(), Some(data.len() as u64));
        let (file, len) = store.open_for_playback(&id, false).await.unwrap().unwrap();
        assert_eq!(len, data.len() as u64);
        let mut part = [0u8; 5];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut part, 7).unwrap();
        assert_eq!(&part[..], &data[7..12]);

        let other = BlobId::of(b"something else");
        assert!(store
            .open_for_playback(&other, true)
            .await
            .unwrap()
            .is_none());
        let err = store.put_verified(&other, chunks(&data)).await.unwrap_err();
        assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
        assert_eq!(store.size(&other).await.unwrap(), None);
        // Nothing half-written is left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(store.list().await.unwrap(), vec![(id, data.len() as u64)]);
    }

    #[tokio::test]
    async fn a_broken_body_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let body = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"part")),
            Err(io::Error::other("connection reset")),
        ]);
        let id = BlobId::of(b"part and more");
        let err = store.put_verified(&id, body).await.unwrap_err();
        assert!(matches!(err, StoreError::Body(_)));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert!(store.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn quarantine_takes_the_blob_out_of_service() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = b"to be quarantined".to_vec();
        let id = BlobId::of(&data);
        store.put_verified(&id, chunks(&data)).await.unwrap();
        store.quarantine(&id).await.unwrap();
        assert_eq!(store.size(&id).await.unwrap(), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("quarantine"))
                .unwrap()
                .count(),
            1
        );
        store.health_check().await.unwrap();
    }

    #[tokio::test]
    async fn quarantined_copies_are_purged_only_after_their_keep_period() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let q = dir.path().join("quarantine");
        let (old, new) = (BlobId::of(b"old"), BlobId::of(b"new"));
        // Set aside 40 days ago and an hour ago.
        let now = shared::runtime::unix_now();
        std::fs::write(q.join(format!("{old}.{}", now - 40 * 86_400)), b"old").unwrap();
        std::fs::write(q.join(format!("{new}.{}", now - 3600)), b"new").unwrap();
        std::fs::write(q.join("notes.txt"), b"an operator's file").unwrap();
        let gone = store.purge_quarantine(now - 30 * 86_400).await.unwrap();
        assert_eq!(gone.iter().map(|g| g.id).collect::<Vec<_>>(), vec![old]);
        let left: Vec<BlobId> = store
            .quarantined()
            .await
            .unwrap()
            .into_iter()
            .map(|g| g.id)
            .collect();
        assert_eq!(left, vec![new]);
        assert!(q.join("notes.txt").exists(), "only quarantined copies go");
        assert!(store
            .purge_quarantine(now - 30 * 86_400)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn proofs_persist_a_wrong_length_copy_gives_way_and_a_wiped_disk_refills() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = BlobStore::open(&root).unwrap();
        let data = b"a verified copy".to_vec();
        let id = BlobId::of(&data);
        store.put_verified(&id, chunks(&data)).await.unwrap();
        let t = store.verified_at(&id).expect("recorded at receipt");
        // The record survives a restart once flushed, and the flush is
        // written only when something changed.
        store.flush_verified().unwrap();
        assert_eq!(BlobStore::open(&root).unwrap().verified_at(&id), Some(t));
        std::fs::remove_file(root.join(VERIFIED_FILE)).unwrap();
        store.flush_verified().unwrap();
        assert!(
            !root.join(VERIFIED_FILE).exists(),
            "nothing changed, nothing written"
        );
        store.set_verified(&id, Some(t + 1));
        store.flush_verified().unwrap();
        assert_eq!(
            BlobStore::open(&root).unwrap().verified_at(&id),
            Some(t + 1)
        );

        // A copy truncated on disk is replaced by the verified bytes and
        // kept in quarantine, never overwritten in place.
        std::fs::write(store.blob_path(&id), &data[..4]).unwrap();
        assert_eq!(
            store.put_verified(&id, chunks(&data)).await.unwrap(),
            PutOutcome::Stored
        );
        assert_eq!(std::fs::read(store.blob_path(&id)).unwrap(), data);
        assert_eq!(store.quarantined().await.unwrap().len(), 1);

        // The whole folder vanishes under a running node: it holds nothing,
        // and the next push recreates the layout.
        std::fs::remove_dir_all(&root).unwrap();
        assert!(store.list().await.unwrap().is_empty());
        store.put_verified(&id, chunks(&data)).await.unwrap();
        assert_eq!(store.list().await.unwrap(), vec![(id, data.len() as u64)]);
        store.delete(&id).await.unwrap();
        assert!(matches!(store.delete(&id).await, Err(StoreError::NotFound)));
        assert_eq!(store.verified_at(&id), None);
    }
}
