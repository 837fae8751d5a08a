//! Blob storage on the node: create-only, verified writes and ranged reads,
//! behind one seam ([`Backend`]) with two implementations chosen by
//! `[storage] kind`: a local folder (`local.rs`, the default) and an
//! S3-compatible bucket (`bucket.rs`). Movies' blobs, quarantined copies
//! and the manager's backups all go through it; the node's own state
//! (`verified.json`, the view journal, temp files of the local backend)
//! stays in `storage_dir` either way.
//!
//! What every backend guarantees, and the rest of the node relies on:
//! - a write is hashed while it arrives and committed under its name only
//!   when the SHA-256 matches; a mismatch or a cut body leaves nothing;
//! - a name is never overwritten by other bytes: only proven bytes are
//!   written under a name, and a copy of another length found there is
//!   moved to quarantine first;
//! - `head` gives a version token (an inode, an ETag) so the scrubber
//!   quarantines only the copy it read, not a repair that replaced it;
//! - `health_check` writes, reads back and deletes something real.
//!
//! `verified.json` records when each good blob was last proven to hash to
//! its name (at receipt, then by every scrub pass), so the inventory can
//! tell the manager how fresh each copy's proof is.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{stream::BoxStream, Stream, StreamExt};
use sha2::{Digest, Sha256};
use shared::BlobId;
use tokio::io::AsyncWriteExt;

pub mod bucket;
pub mod local;

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
    /// The node's own state folder (`storage_dir`).
    root: PathBuf,
    backend: Arc<dyn Backend>,
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

/// Which kind of object: movie blobs (served, scrubbed, listed as held),
/// copies taken out of service, or the manager's sealed backups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    Blobs,
    Quarantine,
    Backups,
}

impl Area {
    /// Its key prefix in a bucket.
    pub fn prefix(self) -> &'static str {
        match self {
            Area::Blobs => "blobs",
            Area::Quarantine => "quarantine",
            Area::Backups => "backups",
        }
    }
}

/// A stored object's size and version token (an inode number, an ETag):
/// the same name holding other bytes has another token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub size: u64,
    pub version: String,
}

/// What a write reads from: the sender's bytes, its failure as text.
pub type Body = BoxStream<'static, Result<Bytes, String>>;
/// A whole stored object, read front to back.
pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// Where blobs, quarantined copies and backups are kept. Names are the
/// store's own (blob ids, `<id>.<time>`, checked backup names), never a
/// caller's path.
#[async_trait]
pub trait Backend: Send + Sync {
    /// For logs and `/healthz`: which folder or bucket.
    fn describe(&self) -> String;
    /// Streams `body` under `name`, committing only when its SHA-256 is
    /// `expected`, never over other bytes. A copy of another length under
    /// the name moves to `Area::Quarantine` as `<name>.<now>` first when
    /// `quarantine_displaced` (blobs; otherwise it stays and the answer is
    /// `AlreadyPresent`).
    async fn put_verified(
        &self,
        area: Area,
        name: &str,
        expected: &BlobId,
        body: Body,
        quarantine_displaced: bool,
    ) -> Result<PutOutcome, StoreError>;
    async fn head(&self, area: Area, name: &str) -> Result<Option<Meta>, StoreError>;
    /// Every object of `area` (names and sizes), in no particular order.
    async fn list(&self, area: Area) -> Result<Vec<(String, u64)>, StoreError>;
    /// Moves an object (`NotFound` when it is not there).
    async fn rename(
        &self,
        area: Area,
        name: &str,
        to_area: Area,
        to: &str,
    ) -> Result<(), StoreError>;
    /// Removes an object for good (`NotFound` when it is not there).
    async fn delete(&self, area: Area, name: &str) -> Result<(), StoreError>;
    /// The whole object as a stream of about `chunk` bytes at a time (a
    /// bucket reads in larger ranges), with its size and version.
    async fn read(
        &self,
        area: Area,
        name: &str,
        chunk: usize,
    ) -> Result<(ByteStream, Meta), StoreError>;
    /// A blob opened for ranged playback, with its length; `None` when not
    /// held. `warm`: it was played a moment ago.
    async fn open_playback(
        &self,
        name: &str,
        warm: bool,
    ) -> Result<Option<(Playable, u64)>, StoreError>;
    /// Exercises the storage for real: write, read back, delete.
    async fn health_check(&self) -> Result<(), StoreError>;
    /// The object's file when it is one on this machine (the scrubber's
    /// blocking reads); `None` for a bucket.
    fn local_path(&self, area: Area, name: &str) -> Option<PathBuf>;
}

/// A blob opened for playback.
pub enum Playable {
    /// A local file: positional reads, decrypted in place
    /// ([`shared::open_file_range`]).
    File(Arc<std::fs::File>),
    /// An object in a bucket: ranged GETs of up to 8 MiB of touched
    /// segments, each read as the batches are asked for.
    Object(bucket::ObjectReader),
}

/// Plaintext of a range, segment by segment.
pub type PlainStream = BoxStream<'static, Result<Bytes, shared::SealError>>;

impl Playable {
    /// The first `len` bytes (the sealed header).
    pub async fn read_header(&self, len: usize) -> io::Result<Vec<u8>> {
        match self {
            Playable::File(file) => {
                let file = file.clone();
                tokio::task::spawn_blocking(move || {
                    let mut header = vec![0; len];
                    std::os::unix::fs::FileExt::read_exact_at(&*file, &mut header, 0)
                        .map(|()| header)
                })
                .await
                .map_err(io::Error::other)?
            }
            // An empty range is no request; the opener refuses the blob.
            Playable::Object(_) if len == 0 => Ok(Vec::new()),
            Playable::Object(o) => Ok(o.get(0..len as u64).await?.to_vec()),
        }
    }

    /// Plaintext bytes `start..end`, authenticated segment by segment.
    pub fn stream(
        self,
        opener: shared::Opener,
        start: u64,
        end: u64,
    ) -> Result<PlainStream, shared::SealError> {
        Ok(match self {
            Playable::File(file) => shared::open_file_range(file, opener, start, end)?.boxed(),
            Playable::Object(o) => {
                let layout = *opener.layout();
                let segments = layout.segments_for(start, end.min(layout.plaintext_len()));
                let last = segments.end.max(segments.start + 1) - 1;
                let o = o.read_ahead_until(layout.sealed_range(last).end.min(layout.sealed_len()));
                shared::open_range_with(o, opener, start, end)?.boxed()
            }
        })
    }
}

fn body_of<S, E>(body: S) -> Body
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display,
{
    body.map(|r| r.map_err(|e| e.to_string())).boxed()
}

impl BlobStore {
    /// Opens the store: the state under `root` and the blob backend
    /// `storage` names. A bucket's leftover staging objects are removed in
    /// the background (they were never committed).
    pub fn open(root: &Path, storage: &crate::config::StorageConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root.join("tmp"))?;
        let backend: Arc<dyn Backend> = match storage.kind {
            crate::config::StorageKind::Local => Arc::new(local::LocalDisk::open(root)?),
            crate::config::StorageKind::S3 => {
                let bucket = Arc::new(bucket::Bucket::open(storage)?);
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        let b = bucket.clone();
                        rt.spawn(async move {
                            if let Err(e) = b.clear_staging().await {
                                tracing::warn!("cannot clear the bucket's staging objects: {e}");
                            }
                        });
                    }
                    Err(_) => tracing::warn!(
                        "no runtime yet: the bucket's staging objects of earlier runs stay"
                    ),
                }
                bucket
            }
        };
        // A missing or unreadable record only means "not verified since
        // start": the next scrub pass proves every copy again.
        let verified: BTreeMap<BlobId, i64> = std::fs::read(root.join(VERIFIED_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(Self {
            root: root.to_path_buf(),
            backend,
            verified: Arc::new(Mutex::new(verified)),
            verified_dirty: Default::default(),
            verified_flush_failing: Default::default(),
            changes: Default::default(),
        })
    }

    /// Which folder or bucket holds the blobs.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// How many times copies were stored, quarantined or deleted since start.
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
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
        // The folder goes with a wiped disk; the record is written anyway.
        std::fs::create_dir_all(tmp.parent().expect("a temp file has a folder"))?;
        let mut guard = TempGuard(Some(tmp.clone()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.root.join(name))?;
        guard.0 = None;
        Ok(())
    }

    /// Streams `body` into the store under `id`, committing only when the
    /// SHA-256 of what arrived equals `id`. Never overwrites a stored blob.
    pub async fn put_verified<S, E>(&self, id: &BlobId, body: S) -> Result<PutOutcome, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let outcome = self
            .backend
            .put_verified(Area::Blobs, &id.to_string(), id, body_of(body), true)
            .await?;
        if outcome == PutOutcome::Stored {
            self.changed();
            self.set_verified(id, Some(shared::runtime::unix_now()));
        }
        Ok(outcome)
    }

    /// Size of a stored blob, `None` when this node holds no copy.
    pub async fn size(&self, id: &BlobId) -> Result<Option<u64>, StoreError> {
        Ok(self.head(id).await?.map(|m| m.size))
    }

    /// Size and version of a stored blob, `None` when this node holds no copy.
    pub async fn head(&self, id: &BlobId) -> Result<Option<Meta>, StoreError> {
        self.backend.head(Area::Blobs, &id.to_string()).await
    }

    /// Opens a good copy for playback, with its length. A copy quarantined
    /// or deleted mid-request may stay readable until the request ends
    /// (an open file; a bucket read pinned to its ETag fails instead); its
    /// bytes are still authenticated segment by segment.
    pub async fn open_for_playback(
        &self,
        id: &BlobId,
        warm: bool,
    ) -> Result<Option<(Playable, u64)>, StoreError> {
        self.backend.open_playback(&id.to_string(), warm).await
    }

    /// Every blob this node holds, with its size, in the order of their ids.
    pub async fn list(&self) -> Result<Vec<(BlobId, u64)>, StoreError> {
        let mut out: Vec<(BlobId, u64)> = self
            .backend
            .list(Area::Blobs)
            .await?
            .into_iter()
            .filter_map(|(name, size)| Some((name.parse().ok()?, size)))
            .collect();
        out.sort_unstable_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// Moves a blob that failed authentication out of the serving path. A
    /// quarantined copy is kept for inspection but never served or copied.
    pub async fn quarantine(&self, id: &BlobId) -> Result<(), StoreError> {
        let to = format!("{id}.{}", shared::runtime::unix_now());
        self.backend
            .rename(Area::Blobs, &id.to_string(), Area::Quarantine, &to)
            .await?;
        self.changed();
        self.set_verified(id, None);
        Ok(())
    }

    /// Deletes the quarantined copies set aside before `cutoff` (unix
    /// time); returns them.
    pub async fn purge_quarantine(&self, cutoff: i64) -> Result<Vec<Quarantined>, StoreError> {
        let mut gone = Vec::new();
        for q in self.quarantined().await? {
            if q.since >= cutoff {
                continue;
            }
            match self
                .backend
                .delete(Area::Quarantine, &format!("{}.{}", q.id, q.since))
                .await
            {
                Ok(()) => gone.push(q),
                Err(StoreError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(gone)
    }

    /// Copies taken out of service, oldest first.
    pub async fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        let mut out: Vec<Quarantined> = self
            .backend
            .list(Area::Quarantine)
            .await?
            .into_iter()
            .filter_map(|(name, _)| {
                let (id, since) = name.split_once('.')?;
                Some(Quarantined {
                    id: id.parse().ok()?,
                    since: since.parse().ok()?,
                })
            })
            .collect();
        out.sort_by_key(|q| (q.since, q.id));
        Ok(out)
    }

    /// A good copy, whole, `chunk` bytes at a time (repairs of other nodes,
    /// scrubbing), with its size and version.
    pub async fn read(&self, id: &BlobId, chunk: usize) -> Result<(ByteStream, Meta), StoreError> {
        self.backend.read(Area::Blobs, &id.to_string(), chunk).await
    }

    /// The file of a good copy when blobs are local files (the scrubber's
    /// blocking reads); `None` on a bucket.
    pub fn blob_path(&self, id: &BlobId) -> Option<PathBuf> {
        self.backend.local_path(Area::Blobs, &id.to_string())
    }

    /// Removes a good copy for good (the manager found no asset using it
    /// for longer than its grace period).
    pub async fn delete(&self, id: &BlobId) -> Result<(), StoreError> {
        self.backend.delete(Area::Blobs, &id.to_string()).await?;
        self.changed();
        self.set_verified(id, None);
        Ok(())
    }

    /// Exercises the storage for real: write, read back, delete.
    pub async fn health_check(&self) -> Result<(), StoreError> {
        self.backend.health_check().await
    }

    /// Keeps a manager's backup under `name` when its bytes hash to
    /// `expected` (create-only, like a blob).
    pub async fn put_backup<S, E>(
        &self,
        name: &str,
        expected: &BlobId,
        body: S,
    ) -> Result<PutOutcome, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.backend
            .put_verified(Area::Backups, name, expected, body_of(body), false)
            .await
    }

    /// The backups kept here (names and sizes).
    pub async fn backups(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.backend.list(Area::Backups).await
    }

    pub async fn backup_meta(&self, name: &str) -> Result<Option<Meta>, StoreError> {
        self.backend.head(Area::Backups, name).await
    }

    /// One backup, whole.
    pub async fn read_backup(&self, name: &str) -> Result<(ByteStream, Meta), StoreError> {
        self.backend.read(Area::Backups, name, 256 * 1024).await
    }

    pub async fn delete_backup(&self, name: &str) -> Result<(), StoreError> {
        self.backend.delete(Area::Backups, name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_local(root: &Path) -> Result<BlobStore, StoreError> {
        BlobStore::open(root, &crate::config::StorageConfig::default())
    }

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
        let store = open_local(dir.path()).unwrap();
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
        assert_eq!(file.read_header(5).await.unwrap(), &data[..5]);

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
        let store = open_local(dir.path()).unwrap();
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
        let store = open_local(dir.path()).unwrap();
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
        let store = open_local(dir.path()).unwrap();
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
        let store = open_local(&root).unwrap();
        let data = b"a verified copy".to_vec();
        let id = BlobId::of(&data);
        store.put_verified(&id, chunks(&data)).await.unwrap();
        let t = store.verified_at(&id).expect("recorded at receipt");
        // The record survives a restart once flushed, and the flush is
        // written only when something changed.
        store.flush_verified().unwrap();
        assert_eq!(open_local(&root).unwrap().verified_at(&id), Some(t));
        std::fs::remove_file(root.join(VERIFIED_FILE)).unwrap();
        store.flush_verified().unwrap();
        assert!(
            !root.join(VERIFIED_FILE).exists(),
            "nothing changed, nothing written"
        );
        store.set_verified(&id, Some(t + 1));
        store.flush_verified().unwrap();
        assert_eq!(open_local(&root).unwrap().verified_at(&id), Some(t + 1));

        // A copy truncated on disk is replaced by the verified bytes and
        // kept in quarantine, never overwritten in place.
        std::fs::write(store.blob_path(&id).unwrap(), &data[..4]).unwrap();
        assert_eq!(
            store.put_verified(&id, chunks(&data)).await.unwrap(),
            PutOutcome::Stored
        );
        assert_eq!(std::fs::read(store.blob_path(&id).unwrap()).unwrap(), data);
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
