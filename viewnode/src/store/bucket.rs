//! The S3 backend (`[storage] kind = "s3"`), through `object_store`'s S3
//! client; Garage is the engine it is tested against.
//!
//! Keys: `blobs/<sha256>`, `quarantine/<sha256>.<unix time>`,
//! `backups/<created>-<sha256>`, `tmp/…` (writes in flight) and `health/…`
//! (the `/healthz` probe). One bucket per node: two nodes sharing one would
//! be one copy counted twice.
//!
//! A write streams into a multipart upload of a staging key under `tmp/`,
//! hashing as it goes (memory: two 8 MiB parts in flight), so nothing is
//! visible under the blob's name until its bytes are proven. On a mismatch
//! or a cut body the staging object is removed and nothing else was
//! touched. Proven bytes are committed by a server-side copy to the final
//! key, then the staging key is deleted (Garage copies by reference to the
//! same data blocks, so the copy costs no data transfer):
//! - with `conditional_put = true` the copy is create-only on the store
//!   itself (`object_store`'s copy-if-not-exists: an UploadPartCopy whose
//!   completion carries `If-None-Match: *`; AWS S3, MinIO, Ceph RGW 18+);
//! - otherwise (Garage 2.x ignores `If-None-Match` on writes) the node
//!   looks the name up and copies only if it is absent. The race, stated:
//!   two writes of the same name between one's lookup and its copy both
//!   land, the second replacing the first atomically. Both hold bytes that
//!   hashed to the name, so they are the same bytes; a reader sees one
//!   whole object or the other, never a mix. A copy of another length
//!   found under the name is moved to quarantine first, as on disk.
//!
//! A crash mid-write leaves a staging object (removed at the next start:
//! each run stages under its own `tmp/<run id>/`) or an unfinished
//! multipart upload, which `object_store` cannot list:
//! give the bucket a lifecycle rule that aborts incomplete multipart
//! uploads after a day (docs/operations.md).
//!
//! Reads are ranged GETs: playback fetches only the segments a range
//! touches (`shared::open_range_with`), whole-object reads (scrubbing,
//! repairs of other nodes, backups) go in 8 MiB ranges pinned to the
//! object's ETag, so a long paced read never holds one request open for
//! minutes and an object replaced mid-read is an error, not a mix.

use std::{io, ops::Range, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{
    aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut, S3CopyIfNotExists},
    path::Path as Key,
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, PutPayload, RetryConfig,
    WriteMultipart,
};
use sha2::{Digest, Sha256};
use shared::BlobId;

use super::{Area, Backend, Body, ByteStream, Meta, Playable, PutOutcome, StoreError};
use crate::config::StorageConfig;

/// Multipart part size: S3's minimum is 5 MiB (but for the last part).
const PART: usize = 8 << 20;
/// Parts uploading at once while the next one fills.
const PARTS_IN_FLIGHT: usize = 2;
/// Size of each ranged GET of a whole-object read.
const READ_RANGE: u64 = 8 << 20;

pub struct Bucket {
    store: Arc<AmazonS3>,
    /// This process's staging folder, `tmp/<run>/`: what is under
    /// another run's is a crash's leftover, removed at start without
    /// racing this run's own writes.
    run: uuid::Uuid,
    conditional: bool,
    describe: String,
}

impl Bucket {
    pub fn open(cfg: &StorageConfig) -> Result<Self, StoreError> {
        let mut b = AmazonS3Builder::new()
            .with_endpoint(&cfg.endpoint)
            .with_region(&cfg.region)
            .with_bucket_name(&cfg.bucket)
            .with_access_key_id(&cfg.key_id)
            .with_secret_access_key(cfg.secret_key.expose())
            .with_virtual_hosted_style_request(!cfg.path_style)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(cfg.endpoint.starts_with("http://"))
                    .with_connect_timeout(Duration::from_secs(3))
                    // One request moves at most one part or one 8 MiB range.
                    .with_timeout(Duration::from_secs(60)),
            )
            // A store that is down must show in `/healthz` within seconds,
            // not after the client's default three minutes of retries.
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 3,
                retry_timeout: Duration::from_secs(10),
            });
        if cfg.conditional_put {
            b = b
                .with_conditional_put(S3ConditionalPut::ETagMatch)
                .with_copy_if_not_exists(S3CopyIfNotExists::Multipart);
        }
        let store = b.build()?;
        Ok(Self {
            store: Arc::new(store),
            run: uuid::Uuid::new_v4(),
            conditional: cfg.conditional_put,
            describe: format!("bucket {} at {}", cfg.bucket, cfg.endpoint),
        })
    }

    /// Removes staging objects earlier runs left (never committed, so
    /// nothing refers to them). Called once at start.
    pub async fn clear_staging(&self) -> Result<(), StoreError> {
        let prefix = Key::from("tmp");
        let ours = format!("tmp/{}/", self.run);
        let mut listing = self.store.list(Some(&prefix));
        while let Some(meta) = listing.next().await {
            let key = meta?.location;
            if !key.as_ref().starts_with(&ours) {
                let _ = self.store.delete(&key).await;
            }
        }
        Ok(())
    }

    fn key(area: Area, name: &str) -> Key {
        Key::from(format!("{}/{name}", area.prefix()))
    }

    /// Commits the proven staging object under `dest`, create-only.
    async fn commit(
        &self,
        staging: &Key,
        dest: &Key,
        received: u64,
        area: Area,
        name: &str,
        displaced: Option<String>,
    ) -> Result<PutOutcome, StoreError> {
        // Whatever is under the name now: absent, the same bytes (same
        // length: only proven bytes are ever written under a name), or a
        // damaged copy of another length, which goes to quarantine.
        let existing = match self.store.head(dest).await {
            Ok(m) => Some(m.size),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        match (existing, displaced) {
            (Some(size), _) if size == received => return Ok(PutOutcome::AlreadyPresent),
            (Some(size), Some(q)) => {
                tracing::error!(object = %name, stored = size, received, "stored copy has the wrong length; replacing it");
                match self.rename(area, name, Area::Quarantine, &q).await {
                    Ok(()) | Err(StoreError::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
            (Some(_), None) => return Ok(PutOutcome::AlreadyPresent),
            (None, _) => {}
        }
        if self.conditional {
            match self.store.copy_if_not_exists(staging, dest).await {
                Ok(()) => Ok(PutOutcome::Stored),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(PutOutcome::AlreadyPresent),
                Err(e) => Err(e.into()),
            }
        } else {
            self.store.copy(staging, dest).await?;
            Ok(PutOutcome::Stored)
        }
    }
}

/// Ranged reads of one object, pinned to the version first seen.
#[derive(Clone)]
pub struct ObjectReader {
    store: Arc<AmazonS3>,
    key: Key,
    etag: Option<String>,
}

impl ObjectReader {
    pub async fn get(&self, range: Range<u64>) -> io::Result<Bytes> {
        let want = range.end - range.start;
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range)),
            if_match: self.etag.clone(),
            ..Default::default()
        };
        let got = async { self.store.get_opts(&self.key, opts).await?.bytes().await }
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => {
                    io::Error::new(io::ErrorKind::NotFound, "the object is gone")
                }
                object_store::Error::Precondition { .. } => {
                    io::Error::other("the object was replaced while it was being read")
                }
                e => io::Error::other(e.to_string()),
            })?;
        if got.len() as u64 != want {
            // A short answer is a truncated object: the seal layer calls
            // it that.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("asked for {want} bytes, the store sent {}", got.len()),
            ));
        }
        Ok(got)
    }
}

impl shared::RangeRead for ObjectReader {
    fn read_range(
        &self,
        range: Range<u64>,
    ) -> impl std::future::Future<Output = io::Result<Bytes>> + Send {
        let me = self.clone();
        async move { me.get(range).await }
    }
}

#[async_trait]
impl Backend for Bucket {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn put_verified(
        &self,
        area: Area,
        name: &str,
        expected: &BlobId,
        body: Body,
        displaced: Option<String>,
    ) -> Result<PutOutcome, StoreError> {
        let staging = Key::from(format!("tmp/{}/{name}.{}", self.run, uuid::Uuid::new_v4()));
        let upload = self.store.put_multipart(&staging).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut body = body;
        let fed = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(StoreError::Body)?;
                hasher.update(&chunk);
                received += chunk.len() as u64;
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                writer.put(chunk);
            }
            Ok::<_, StoreError>(())
        }
        .await;
        let actual = BlobId::from_hasher(hasher);
        let fed = fed.and_then(|()| {
            if actual == *expected {
                Ok(())
            } else {
                Err(StoreError::HashMismatch {
                    expected: *expected,
                    actual,
                })
            }
        });
        if let Err(e) = fed {
            // Never completed, so never visible: the parts go with the upload.
            let _ = writer.abort().await;
            return Err(e);
        }
        writer.finish().await?;
        let outcome = self
            .commit(
                &staging,
                &Self::key(area, name),
                received,
                area,
                name,
                displaced,
            )
            .await;
        if let Err(e) = self.store.delete(&staging).await {
            tracing::warn!(%staging, "cannot remove a staging object (removed at the next start): {e}");
        }
        outcome
    }

    async fn head(&self, area: Area, name: &str) -> Result<Option<Meta>, StoreError> {
        match self.store.head(&Self::key(area, name)).await {
            Ok(m) => Ok(Some(Meta {
                size: m.size,
                version: m.e_tag.unwrap_or_default(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self, area: Area) -> Result<Vec<(String, u64)>, StoreError> {
        let prefix = Key::from(area.prefix());
        let found: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        Ok(found
            .into_iter()
            .filter_map(|m| Some((m.location.filename()?.to_string(), m.size)))
            .collect())
    }

    /// A copy then a delete: S3 has no rename. A crash between the two
    /// leaves the object in both places; the next scrub pass finds the one
    /// under its name again (and quarantines it again if it is still bad).
    async fn rename(
        &self,
        area: Area,
        name: &str,
        to_area: Area,
        to: &str,
    ) -> Result<(), StoreError> {
        let from = Self::key(area, name);
        match self.store.copy(&from, &Self::key(to_area, to)).await {
            Ok(()) => {}
            Err(object_store::Error::NotFound { .. }) => return Err(StoreError::NotFound),
            Err(e) => return Err(e.into()),
        }
        self.store.delete(&from).await?;
        Ok(())
    }

    async fn delete(&self, area: Area, name: &str) -> Result<(), StoreError> {
        // S3 deletes answer the same whether or not the object was there.
        if self.head(area, name).await?.is_none() {
            return Err(StoreError::NotFound);
        }
        self.store.delete(&Self::key(area, name)).await?;
        Ok(())
    }

    async fn read(
        &self,
        area: Area,
        name: &str,
        _chunk: usize,
    ) -> Result<(ByteStream, Meta), StoreError> {
        let meta = self.head(area, name).await?.ok_or(StoreError::NotFound)?;
        let reader = ObjectReader {
            store: self.store.clone(),
            key: Self::key(area, name),
            etag: Some(meta.version.clone()).filter(|v| !v.is_empty()),
        };
        let size = meta.size;
        let stream = futures::stream::try_unfold(0u64, move |at| {
            let reader = reader.clone();
            async move {
                if at >= size {
                    return Ok(None);
                }
                let end = (at + READ_RANGE).min(size);
                Ok(Some((reader.get(at..end).await?, end)))
            }
        });
        Ok((stream.boxed(), meta))
    }

    async fn open_playback(
        &self,
        name: &str,
        _warm: bool,
    ) -> Result<Option<(Playable, u64)>, StoreError> {
        let Some(meta) = self.head(Area::Blobs, name).await? else {
            return Ok(None);
        };
        Ok(Some((
            Playable::Object(ObjectReader {
                store: self.store.clone(),
                key: Self::key(Area::Blobs, name),
                etag: Some(meta.version).filter(|v| !v.is_empty()),
            }),
            meta.size,
        )))
    }

    /// Writes, reads back and deletes an object in the bucket.
    async fn health_check(&self) -> Result<(), StoreError> {
        let key = Key::from(format!("health/{}", uuid::Uuid::new_v4()));
        let probe = Bytes::from(uuid::Uuid::new_v4().to_string());
        self.store
            .put(&key, PutPayload::from_bytes(probe.clone()))
            .await?;
        let back = self.store.get(&key).await?.bytes().await;
        let gone = self.store.delete(&key).await;
        if back? != probe {
            return Err(StoreError::Io(io::Error::other(
                "read back differs from write",
            )));
        }
        gone?;
        Ok(())
    }

    fn local_path(&self, _area: Area, _name: &str) -> Option<PathBuf> {
        None
    }
}
