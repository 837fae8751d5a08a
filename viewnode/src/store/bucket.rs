//! The S3 backend (`[storage] kind = "s3"`), through `object_store`'s S3
//! client; Garage is the engine it is tested against.
//!
//! Keys: `blobs/<sha256>`, `quarantine/<sha256>.<unix time>`,
//! `backups/<created>-<sha256>` and `tmp/<run id>/…` (writes in flight and
//! the `/healthz` probe). One bucket per node: two nodes sharing one would
//! be one copy counted twice.
//!
//! A write streams into a multipart upload of a staging key under `tmp/`,
//! hashing as it goes (memory: the 8 MiB part filling and two in flight,
//! about 24 MiB a push), so nothing is
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
//! uploads after a day (docs/mirrors.md, "On S3").
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
/// A ranged GET (at most 8 MiB) or a HEAD that takes longer fails: a store
/// that accepts connections and then stalls must not hold a viewer, or a
/// scrub pass, for the client's whole timeout.
const READ_DEADLINE: Duration = Duration::from_secs(20);

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
                    // The longest request is a server-side copy, which on
                    // stores that copy bytes (AWS: up to 5 GiB in one
                    // request) takes minutes; reads have their own, shorter
                    // deadline (READ_DEADLINE).
                    .with_timeout(Duration::from_secs(600)),
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
        quarantine_displaced: bool,
    ) -> Result<PutOutcome, StoreError> {
        // Whatever is under the name now: absent, the same bytes (same
        // length: only proven bytes are ever written under a name), or a
        // damaged copy of another length, which goes to quarantine.
        let existing = match self.store.head(dest).await {
            Ok(m) => Some(m.size),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        match (existing, quarantine_displaced) {
            (Some(size), _) if size == received => return Ok(PutOutcome::AlreadyPresent),
            (Some(size), true) => {
                let q = format!("{name}.{}", shared::runtime::unix_now());
                tracing::error!(object = %name, stored = size, received, "stored copy has the wrong length; replacing it");
                match self.rename(area, name, Area::Quarantine, &q).await {
                    Ok(()) | Err(StoreError::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
            (Some(_), false) => return Ok(PutOutcome::AlreadyPresent),
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

/// An object's version token: its ETag alone says only what the bytes
/// are (a repair's copy of the same blob has the same ETag, and Garage's
/// copies keep the source's), so the time it was written goes with it.
fn version_of(m: &object_store::ObjectMeta) -> String {
    format!(
        "{}@{}",
        m.e_tag.as_deref().unwrap_or(""),
        m.last_modified.timestamp_millis()
    )
}

fn etag_of(version: &str) -> Option<String> {
    version
        .rsplit_once('@')
        .map(|(etag, _)| etag.to_string())
        .filter(|e| !e.is_empty())
}

/// Ranged reads of one object, pinned to the version first seen.
#[derive(Clone)]
pub struct ObjectReader {
    store: Arc<AmazonS3>,
    key: Key,
    etag: Option<String>,
    /// Playback's open GET: batches are asked for one after another, so
    /// one request covers many of them (up to `WINDOW`, never past
    /// `limit`) and its body is read as they are asked for, while the
    /// rest arrives meanwhile in the socket's buffers.
    window: Arc<tokio::sync::Mutex<Option<Window>>>,
    limit: u64,
}

/// Bytes `next..end` of the object, coming on an open GET.
struct Window {
    next: u64,
    end: u64,
    body: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    buf: bytes::BytesMut,
}

/// Most one playback GET asks for. Every GET costs the store a lookup and
/// (Garage) a read and check of whole 1 MiB data blocks, so 256 KiB
/// requests cost it several times the bytes sent; a window this size
/// amortises that, and even a viewer at 20 KB/s reads it within the
/// client's request timeout.
const WINDOW: u64 = 8 << 20;

impl ObjectReader {
    /// Asks the store for nothing at or past `end`, the end of the last
    /// segment a response needs: nothing is fetched that is not sent.
    pub fn read_ahead_until(mut self, end: u64) -> Self {
        self.limit = end;
        self
    }

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

impl ObjectReader {
    /// Bytes `range` through the playback window, opening a new GET when
    /// the range does not follow the last one (or the window is spent).
    async fn read_windowed(&self, range: Range<u64>) -> io::Result<Bytes> {
        let mut slot = self.window.lock().await;
        let follows = slot
            .as_ref()
            .is_some_and(|w| w.next == range.start && range.end <= w.end);
        if !follows {
            let end = (range.start + WINDOW).min(self.limit).max(range.end);
            let opts = GetOptions {
                range: Some(GetRange::Bounded(range.start..end)),
                if_match: self.etag.clone(),
                ..Default::default()
            };
            let got = tokio::time::timeout(READ_DEADLINE, self.store.get_opts(&self.key, opts))
                .await
                .map_err(|_| timed_out())?
                .map_err(read_error)?;
            *slot = Some(Window {
                next: range.start,
                end,
                body: got.into_stream(),
                buf: bytes::BytesMut::new(),
            });
        }
        let w = slot.as_mut().expect("a window was just opened");
        let want = (range.end - range.start) as usize;
        while w.buf.len() < want {
            match tokio::time::timeout(READ_DEADLINE, w.body.next()).await {
                Err(_) => {
                    *slot = None;
                    return Err(timed_out());
                }
                Ok(Some(Ok(b))) => w.buf.extend_from_slice(&b),
                Ok(Some(Err(e))) => {
                    *slot = None;
                    return Err(read_error(e));
                }
                Ok(None) => {
                    *slot = None;
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the store ended the object early",
                    ));
                }
            }
        }
        let out = w.buf.split_to(want).freeze();
        w.next = range.end;
        Ok(out)
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the store did not answer in time")
}

fn read_error(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => {
            io::Error::new(io::ErrorKind::NotFound, "the object is gone")
        }
        object_store::Error::Precondition { .. } => {
            io::Error::other("the object was replaced while it was being read")
        }
        e => io::Error::other(e.to_string()),
    }
}

/// Playback reads consecutive batches of segments: through one open GET
/// per window (`read_windowed`).
impl shared::RangeRead for ObjectReader {
    fn read_range(
        &self,
        range: Range<u64>,
    ) -> impl std::future::Future<Output = io::Result<Bytes>> + Send {
        let me = self.clone();
        async move { me.read_windowed(range).await }
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
        quarantine_displaced: bool,
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
                quarantine_displaced,
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
                version: version_of(&m),
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
    /// Should the name be written again during the copy (a repair), the
    /// new object stays: only the version copied is deleted, as far as a
    /// look just before the delete can tell.
    async fn rename(
        &self,
        area: Area,
        name: &str,
        to_area: Area,
        to: &str,
    ) -> Result<(), StoreError> {
        let from = Self::key(area, name);
        let before = self.head(area, name).await?.ok_or(StoreError::NotFound)?;
        match self.store.copy(&from, &Self::key(to_area, to)).await {
            Ok(()) => {}
            Err(object_store::Error::NotFound { .. }) => return Err(StoreError::NotFound),
            Err(e) => return Err(e.into()),
        }
        if self.head(area, name).await?.as_ref() == Some(&before) {
            self.store.delete(&from).await?;
        }
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
            etag: etag_of(&meta.version),
            window: Default::default(),
            limit: 0,
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
        let meta = tokio::time::timeout(READ_DEADLINE, self.head(Area::Blobs, name))
            .await
            .map_err(|_| {
                StoreError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the store did not answer in time",
                ))
            })??;
        let Some(meta) = meta else {
            return Ok(None);
        };
        Ok(Some((
            Playable::Object(ObjectReader {
                store: self.store.clone(),
                key: Self::key(Area::Blobs, name),
                etag: etag_of(&meta.version),
                window: Default::default(),
                limit: 0,
            }),
            meta.size,
        )))
    }

    /// Writes, reads back and deletes an object in the bucket.
    async fn health_check(&self) -> Result<(), StoreError> {
        // Under this run's staging folder: a probe cut off by a crash is
        // swept with the rest at the next start.
        let key = Key::from(format!("tmp/{}/health-{}", self.run, uuid::Uuid::new_v4()));
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
