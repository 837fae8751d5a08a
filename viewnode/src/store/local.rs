//! The local-folder backend: blobs, quarantined copies and backups as files
//! under `storage_dir`.
//!
//! `object_store`'s `LocalFileSystem` (0.12) writes through a temp file and a
//! rename but never fsyncs, so a power cut can leave a named blob that is
//! empty or partial: exactly the "disk wrote zeroes" failure we must not
//! have. Writes therefore hash while streaming to a temp file, fsync it,
//! refuse a hash mismatch, link it into place with `link(2)` (which fails
//! rather than overwrite) and fsync the directory. Listing and size lookups
//! of blobs go through `object_store`; playback reads the open file with
//! `pread` (`Playable::File`), because every `object_store` ranged read
//! reopens the file, and playback is the node's hot path.
//!
//! Layout: `blobs/<2 hex>/<sha256>`, `tmp/` (pushes in flight, emptied at
//! start), `quarantine/<sha256>.<unix time>`, `backups/<created>-<sha256>`
//! and `backups-tmp/`. If the whole folder disappears while the node runs
//! (a wiped or replaced disk), the sub-folders are made again on the next
//! write, so the manager's reconciliation can refill it without a restart.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use object_store::{local::LocalFileSystem, ObjectStore};
use shared::BlobId;
use tokio::io::AsyncWriteExt;

use super::{
    fsync_dir, link_create_only, receive_hashed, Area, Backend, Body, ByteStream, Meta, Playable,
    PutOutcome, ReceiveError, StoreError, TempGuard,
};

const SUBDIRS: [&str; 5] = ["blobs", "tmp", "quarantine", "backups", "backups-tmp"];

pub struct LocalDisk {
    root: PathBuf,
    blobs: LocalFileSystem,
}

impl LocalDisk {
    /// Opens (creating if needed) the folders under `root`. Temp files left
    /// by a crash are removed: they were never committed, so nothing refers
    /// to them.
    pub fn open(root: &Path) -> io::Result<Self> {
        for sub in SUBDIRS {
            std::fs::create_dir_all(root.join(sub))?;
        }
        for tmp in ["tmp", "backups-tmp"] {
            for entry in std::fs::read_dir(root.join(tmp))? {
                let _ = std::fs::remove_file(entry?.path());
            }
        }
        let blobs = LocalFileSystem::new_with_prefix(root.join("blobs"))
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self {
            root: root.to_path_buf(),
            blobs,
        })
    }

    /// Makes the folders again if they vanished (a wiped disk) so writes work.
    fn ensure_layout(&self) -> io::Result<()> {
        for sub in SUBDIRS {
            std::fs::create_dir_all(self.root.join(sub))?;
        }
        Ok(())
    }

    /// Where a stored object lives. Names come from the store (blob ids,
    /// `<id>.<time>`) or from a checked backup name: never a path.
    pub fn path(&self, area: Area, name: &str) -> PathBuf {
        match area {
            Area::Blobs => self.root.join("blobs").join(&name[..2]).join(name),
            Area::Quarantine => self.root.join("quarantine").join(name),
            Area::Backups => self.root.join("backups").join(name),
        }
    }

    fn tmp_dir(&self, area: Area) -> PathBuf {
        match area {
            Area::Backups => self.root.join("backups-tmp"),
            _ => self.root.join("tmp"),
        }
    }
}

fn not_found(e: io::Error) -> StoreError {
    if e.kind() == io::ErrorKind::NotFound {
        StoreError::NotFound
    } else {
        e.into()
    }
}

#[async_trait]
impl Backend for LocalDisk {
    fn describe(&self) -> String {
        format!("folder {}", self.root.display())
    }

    async fn put_verified(
        &self,
        area: Area,
        name: &str,
        expected: &BlobId,
        body: Body,
        quarantine_displaced: bool,
    ) -> Result<PutOutcome, StoreError> {
        self.ensure_layout()?;
        let tmp = self
            .tmp_dir(area)
            .join(format!("{name}.{}", uuid::Uuid::new_v4()));
        let mut guard = TempGuard(Some(tmp.clone()));
        let (actual, received) = match receive_hashed(&tmp, body).await {
            Ok(r) => r,
            Err(ReceiveError::Io(e)) => return Err(e.into()),
            Err(ReceiveError::Body(e)) => return Err(StoreError::Body(e)),
        };
        if actual != *expected {
            return Err(StoreError::HashMismatch {
                expected: *expected,
                actual,
            });
        }
        let dest = self.path(area, name);
        // A stored copy of another length under the same name cannot hash
        // to it (truncated or grown on disk): it gives way to the verified
        // bytes we hold, and is kept in quarantine, not overwritten.
        if let (true, Ok(meta)) = (quarantine_displaced, tokio::fs::metadata(&dest).await) {
            if meta.len() != received {
                let q = format!("{name}.{}", shared::runtime::unix_now());
                tracing::error!(object = %name, stored = meta.len(), received, "stored copy has the wrong length; replacing it");
                match self.rename(area, name, Area::Quarantine, &q).await {
                    Ok(()) | Err(StoreError::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let outcome = tokio::task::spawn_blocking(move || -> io::Result<PutOutcome> {
            let dir = dest.parent().expect("an object path has a folder");
            if !dir.exists() {
                std::fs::create_dir_all(dir)?;
                fsync_dir(dir.parent().expect("a shard folder has a parent"))?;
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
        Ok(outcome)
    }

    async fn head(&self, area: Area, name: &str) -> Result<Option<Meta>, StoreError> {
        match tokio::fs::metadata(self.path(area, name)).await {
            Ok(m) => Ok(Some(Meta {
                size: m.len(),
                version: m.ino().to_string(),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self, area: Area) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        if area == Area::Blobs {
            if !self.root.join("blobs").is_dir() {
                // The disk was wiped: it holds nothing (until refilled).
                return Ok(out);
            }
            let mut listing = self.blobs.list(None);
            while let Some(meta) = listing.next().await {
                let meta = meta?;
                if let Some(name) = meta.location.filename() {
                    out.push((name.to_string(), meta.size));
                }
            }
            return Ok(out);
        }
        let dir = match area {
            Area::Quarantine => "quarantine",
            _ => "backups",
        };
        let mut rd = match tokio::fs::read_dir(self.root.join(dir)).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        while let Some(entry) = rd.next_entry().await? {
            if let Some(name) = entry.file_name().to_str() {
                let meta = entry.metadata().await?;
                if meta.is_file() {
                    out.push((name.to_string(), meta.len()));
                }
            }
        }
        Ok(out)
    }

    async fn rename(
        &self,
        area: Area,
        name: &str,
        to_area: Area,
        to: &str,
    ) -> Result<(), StoreError> {
        self.ensure_layout()?;
        tokio::fs::rename(self.path(area, name), self.path(to_area, to))
            .await
            .map_err(not_found)
    }

    async fn delete(&self, area: Area, name: &str) -> Result<(), StoreError> {
        let path = self.path(area, name);
        tokio::fs::remove_file(&path).await.map_err(not_found)?;
        let dir = path
            .parent()
            .expect("an object path has a folder")
            .to_owned();
        // The removal is made durable; failing that is no reason to say the
        // delete failed (the name is gone for every reader already).
        let _ = tokio::task::spawn_blocking(move || fsync_dir(&dir)).await;
        Ok(())
    }

    async fn read(
        &self,
        area: Area,
        name: &str,
        chunk: usize,
    ) -> Result<(ByteStream, Meta), StoreError> {
        let file = tokio::fs::File::open(self.path(area, name))
            .await
            .map_err(not_found)?;
        let m = file.metadata().await?;
        let meta = Meta {
            size: m.len(),
            version: m.ino().to_string(),
        };
        let stream = tokio_util::io::ReaderStream::with_capacity(file, chunk).map_err(|e| e);
        Ok((stream.boxed(), meta))
    }

    async fn open_playback(
        &self,
        name: &str,
        warm: bool,
    ) -> Result<Option<(Playable, u64)>, StoreError> {
        let path = self.path(Area::Blobs, name);
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
            Ok((file, len)) => Ok(Some((Playable::File(file), len))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Exercises the disk for real: write, fsync, read back, delete.
    async fn health_check(&self) -> Result<(), StoreError> {
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

    fn local_path(&self, area: Area, name: &str) -> Option<PathBuf> {
        Some(self.path(area, name))
    }
}
