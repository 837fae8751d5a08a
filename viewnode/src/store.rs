//! Blob storage on the node: create-only, verified, atomic and durable writes,
//! ranged reads through `object_store`.
//!
//! `object_store`'s `LocalFileSystem` (0.12) writes through a temp file and a
//! rename but never fsyncs, so a power cut can leave a named blob that is
//! empty or partial: exactly the "disk wrote zeroes" failure we must not
//! have. Writes therefore go through [`BlobStore::put_verified`], which hashes
//! while streaming to a temp file, fsyncs it, refuses a hash mismatch, links
//! it into place with `link(2)` (which fails rather than overwrite) and fsyncs
//! the directory. Reads go through `object_store` so that the same code path
//! later serves an S3 bucket.

use std::{
    io,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
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
}

/// Removes a temp file unless the write that made it succeeded.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl BlobStore {
    /// Opens (creating if needed) the store under `root`. Temp files left by a
    /// crash are removed: they were never committed, so nothing refers to them.
    pub fn open(root: &Path) -> io::Result<Self> {
        for sub in ["blobs", "tmp", "quarantine"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_file(entry?.path());
        }
        let objects = LocalFileSystem::new_with_prefix(root.join("blobs"))
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self {
            root: root.to_path_buf(),
            objects: Arc::new(objects),
        })
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
        let mut guard = TempGuard(Some(tmp.clone()));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await?;
        let mut hasher = Sha256::new();
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StoreError::Body(e.to_string()))?;
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        let actual = BlobId::from_hasher(hasher);
        if actual != *id {
            return Err(StoreError::HashMismatch {
                expected: *id,
                actual,
            });
        }
        let dest = self.file_path(id);
        let outcome = tokio::task::spawn_blocking(move || -> io::Result<PutOutcome> {
            let dir = dest.parent().expect("blob path has a parent");
            if !dir.exists() {
                std::fs::create_dir_all(dir)?;
                fsync_dir(dir.parent().expect("shard dir has a parent"))?;
            }
            match std::fs::hard_link(&tmp, &dest) {
                Ok(()) => {
                    fsync_dir(dir)?;
                    Ok(PutOutcome::Stored)
                }
                // Same name means same SHA-256: the bytes are already here.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    Ok(PutOutcome::AlreadyPresent)
                }
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))??;
        // The temp name is removed whether we linked or found a copy.
        drop(guard.0.take().map(std::fs::remove_file));
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

    pub async fn read_range(&self, id: &BlobId, range: Range<u64>) -> Result<Bytes, StoreError> {
        match self.objects.get_range(&Self::key(id), range).await {
            Ok(b) => Ok(b),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    /// Every blob this node holds, with its size.
    pub async fn list(&self) -> Result<Vec<(BlobId, u64)>, StoreError> {
        let mut out = Vec::new();
        let mut listing = self.objects.list(None);
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            if let Some(Ok(id)) = meta.location.filename().map(str::parse::<BlobId>) {
                out.push((id, meta.size));
            }
        }
        out.sort_by_key(|(id, _)| id.to_string());
        Ok(out)
    }

    /// Moves a blob that failed authentication out of the serving path. A
    /// quarantined copy is kept for inspection but never served or copied.
    pub async fn quarantine(&self, id: &BlobId) -> Result<(), StoreError> {
        let from = self.file_path(id);
        let to =
            self.root
                .join("quarantine")
                .join(format!("{}.{}", id, shared::runtime::unix_now()));
        tokio::fs::rename(&from, &to).await?;
        Ok(())
    }

    /// Exercises the disk for real: write, fsync, read back, delete.
    pub async fn health_check(&self) -> Result<(), StoreError> {
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

/// Adapts one stored blob to the range-reading seam the sealed-blob opener uses.
pub struct StoredBlob {
    pub store: BlobStore,
    pub id: BlobId,
}

impl shared::RangeRead for StoredBlob {
    fn read_range(
        &self,
        range: Range<u64>,
    ) -> impl std::future::Future<Output = io::Result<Bytes>> + Send {
        let store = self.store.clone();
        let id = self.id;
        async move {
            store
                .read_range(&id, range)
                .await
                .map_err(|e| io::Error::other(e.to_string()))
        }
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
        assert_eq!(
            &store.read_range(&id, 7..12).await.unwrap()[..],
            &data[7..12]
        );

        let other = BlobId::of(b"something else");
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
}
