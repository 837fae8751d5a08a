//! Resumable uploads by the tus 1.0 protocol (core, creation,
//! creation-with-upload, expiration, checksum with sha1 and sha256,
//! termination; https://tus.io/protocols/resumable-upload), served under
//! `/api/v1/tus/` (docs/api.md, "Resumable uploads").
//!
//! An upload is two files in `<staging>/tus/`: `<id>.json`, its record
//! (owner, length, file name, title; written once at creation and again
//! when it finishes or expires, each time to a temporary name, fsynced and
//! renamed) and `<id>.bin`, the bytes received so far. The offset is the
//! `.bin`'s length, fsynced before a request that wrote to it answers, so
//! what a client is told it may skip is on disk; a restart (or a `kill -9`)
//! reads both back. Ids are 128 random bits, and an upload answers only its
//! owner (anyone else gets the same 404 as for an id that never existed).
//!
//! One writer at a time per upload. A new request (a PATCH, or the HEAD a
//! client sends to resume) first stops the one in flight: after a dropped
//! connection the server may not notice for minutes that the old request
//! is dead, and the client must not wait for it. The bytes the old request
//! wrote stay (without a checksum; with one, a chunk not received whole is
//! discarded, as the protocol asks) and the offset is read after it stopped.
//!
//! When the last byte is on disk the upload goes through the same door as
//! the multipart form ([`crate::ingest::accept`]): probed, moved, recorded.
//! A refusal (not a movie, too long…) removes the bytes and is the final
//! request's answer; an internal failure (the database away) keeps them,
//! and the next request for the upload (the client's retry) tries again.
//! A finished upload keeps its record, with the asset's id, for
//! `upload_expiry_hours`, so a client that lost the final answer learns it
//! from a HEAD.
//!
//! An unfinished upload counts against its owner's limits while it lives
//! (one upload at once, one of the day's, its whole declared length) and
//! expires `upload_expiry_hours` after its last byte arrived: its bytes are
//! removed, and for as long again it answers `410 Gone` before it is
//! forgotten. Managers sharing a data folder (a standby) find each other's
//! uploads on disk; each counts limits by what it has seen.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::{
    catalog::User,
    ingest::{self, IngestError},
    pipeline::{Ctx, Pipeline},
    quotas::{self, InFlight, Pending, QuotaError},
};

pub const VERSION: &str = "1.0.0";
pub const EXTENSIONS: &str = "creation,creation-with-upload,expiration,checksum,termination";
pub const CHECKSUM_ALGORITHMS: &str = "sha1,sha256";
const MAX_METADATA_BYTES: usize = 4096;

/// How long a new request waits for the one it interrupted to let go.
const TAKEOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TusError {
    #[error("no such upload")]
    NotFound,
    #[error("this upload expired and its bytes were removed; start it again")]
    Gone,
    #[error("the upload is at offset {expected}; send the bytes from there")]
    OffsetMismatch { expected: u64 },
    #[error("the chunk's checksum does not match its bytes; it was discarded, send it again")]
    ChecksumMismatch,
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("the file is larger than the {limit} bytes this site accepts")]
    TooLarge { limit: u64 },
    #[error(
        "the chunk goes past the upload's declared length of {length} bytes; it was discarded"
    )]
    PastLength { length: u64 },
    #[error("another request is still writing this upload; try again in a few seconds")]
    Busy,
    #[error("an upload costs {cost} credits and this account holds {balance}; top it up first")]
    CannotPay { balance: i64, cost: i64 },
    /// Every byte is here but the movie could not be recorded yet.
    #[error("the upload is complete but could not be finished yet ({0}); try again in a minute")]
    FinishLater(String),
    #[error("the chunk was cut off before it ended; the server kept {offset} bytes")]
    Cut { offset: u64 },
    #[error(transparent)]
    Quota(#[from] QuotaError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<quotas::BeginError> for TusError {
    fn from(e: quotas::BeginError) -> Self {
        match e {
            quotas::BeginError::Quota(q) => TusError::Quota(q),
            quotas::BeginError::Db(e) => TusError::Db(e),
        }
    }
}

/// A write that failed: a full disk is the uploader's "no space", not an
/// internal error.
fn io_error(e: std::io::Error) -> TusError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        return TusError::Quota(QuotaError::NoSpace);
    }
    TusError::Internal(e.into())
}

/// What an `Upload-Checksum` header asks for.
pub struct Checksum {
    algorithm: Algorithm,
    expected: Vec<u8>,
}

#[derive(Clone, Copy)]
enum Algorithm {
    Sha1,
    Sha256,
}

enum Hasher {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
}

impl Hasher {
    fn update(&mut self, data: &[u8]) {
        use sha2::Digest;
        match self {
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
        }
    }

    fn finish(self) -> Vec<u8> {
        use sha2::Digest;
        match self {
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        }
    }
}

impl Checksum {
    /// `"<algorithm> <base64 digest>"`.
    pub fn parse(header: &str) -> Result<Checksum, TusError> {
        use base64::Engine;
        let (name, digest) = header.trim().split_once(' ').ok_or(TusError::Invalid {
            code: "checksum_malformed",
            message: "Upload-Checksum is `<algorithm> <base64 digest>`".into(),
        })?;
        let (algorithm, len) = match name.to_ascii_lowercase().as_str() {
            "sha1" => (Algorithm::Sha1, 20),
            "sha256" => (Algorithm::Sha256, 32),
            other => {
                return Err(TusError::Invalid {
                    code: "checksum_algorithm_unsupported",
                    message: format!(
                    "checksum algorithm `{}` is not supported; use one of {CHECKSUM_ALGORITHMS}",
                    other.chars().take(20).collect::<String>()
                ),
                })
            }
        };
        let expected = base64::engine::general_purpose::STANDARD
            .decode(digest.trim())
            .ok()
            .filter(|d| d.len() == len)
            .ok_or(TusError::Invalid {
                code: "checksum_malformed",
                message: format!("the {name} digest is not {len} bytes in base64"),
            })?;
        Ok(Checksum {
            algorithm,
            expected,
        })
    }

    fn hasher(&self) -> Hasher {
        use sha2::Digest;
        match self.algorithm {
            Algorithm::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
        }
    }
}

/// A PATCH's (or a creation's) chunk as its headers describe it.
pub struct Chunk {
    /// `Upload-Offset`: where the client believes the upload stands.
    pub offset: u64,
    /// `Content-Length`, when sent.
    pub announced: Option<u64>,
    pub checksum: Option<Checksum>,
}

/// `Upload-Metadata`: comma-separated `key base64(value)` pairs. Only
/// `filename` and `title` are used; other keys are allowed and ignored.
pub fn parse_metadata(header: &str) -> Result<(String, String), TusError> {
    use base64::Engine;
    let bad = |why: &str| TusError::Invalid {
        code: "metadata_malformed",
        message: format!("Upload-Metadata: {why}"),
    };
    // A file name and a title, in base64, fit many times over.
    if header.len() > MAX_METADATA_BYTES {
        return Err(bad(&format!("longer than {MAX_METADATA_BYTES} bytes")));
    }
    let (mut filename, mut title) = (String::new(), String::new());
    for pair in header.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once(' ').unwrap_or((pair, ""));
        let value = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .map_err(|_| bad("a value is not base64"))?;
        let value = String::from_utf8(value).map_err(|_| bad("a value is not UTF-8 text"))?;
        match key {
            "filename" => filename = value.chars().take(255).collect(),
            "title" => title = value,
            _ => {}
        }
    }
    Ok((filename, title))
}

/// `Upload-Metadata` as a HEAD answers it.
pub fn encode_metadata(info: &Info) -> String {
    use base64::Engine;
    let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v.as_bytes());
    format!(
        "filename {},title {}",
        b64(&info.filename),
        b64(&info.title)
    )
}

#[derive(Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    owner: i64,
    length: u64,
    filename: String,
    title: String,
    created: i64,
    /// The movie it became, once finished.
    #[serde(default)]
    asset: Option<String>,
    /// When it finished or expired.
    #[serde(default)]
    closed_at: Option<i64>,
    #[serde(default)]
    expired: bool,
    /// The movie id chosen for it while it is being finished.
    #[serde(default)]
    ingesting: Option<String>,
    /// Where the checksummed chunk being written started: set (and saved)
    /// before its first byte, cleared once it is checked.
    #[serde(default)]
    verifying_from: Option<u64>,
}

struct Upload {
    rec: Mutex<Record>,
    /// Bytes on disk (and fsynced) as of the last write.
    offset: Mutex<u64>,
    /// Unix time of the last byte received (or creation): expiry counts
    /// from it.
    touched: Mutex<i64>,
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Cancels the request writing now, when another takes over.
    stop: Mutex<CancellationToken>,
    /// Terminated or refused: a request that waited for it finds nothing.
    gone: std::sync::atomic::AtomicBool,
}

/// The right to write an upload, held for one request: this process's
/// lock, the cancel token other requests use to take over, and the open,
/// `flock`ed `.bin` (none once its bytes are gone: finished or expired).
///
/// The file comes first so that it closes before the lock is let go: a
/// request waiting for the lock then never finds the `flock` still held.
struct Writer {
    file: Option<std::fs::File>,
    token: CancellationToken,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

/// What a client is told about an upload.
#[derive(Clone, Debug, Serialize)]
pub struct Info {
    pub id: String,
    pub length: u64,
    pub offset: u64,
    pub filename: String,
    pub title: String,
    /// Unix time it expires (unfinished) or is forgotten (finished).
    pub expires: i64,
    pub asset: Option<String>,
}

/// Cheap to clone: clones share the uploads.
#[derive(Clone)]
pub struct Uploads {
    dir: PathBuf,
    ttl: i64,
    map: Arc<Mutex<HashMap<String, Arc<Upload>>>>,
}

/// Writes `rec` whole or not at all: a temporary file, fsynced, renamed,
/// the folder fsynced.
fn save_record(dir: &Path, rec: &Record) -> std::io::Result<()> {
    let tmp = dir.join(format!("{}.json.tmp", rec.id));
    let body = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(format!("{}.json", rec.id)))?;
    crate::pipeline::fsync_dir(dir)
}

fn up_id(up: &Upload) -> String {
    up.rec.lock().unwrap_or_else(|e| e.into_inner()).id.clone()
}

fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Uploads {
    /// Opens `dir` (created if missing) and reads back every upload in it.
    pub fn open(dir: PathBuf, ttl_secs: u64) -> std::io::Result<Uploads> {
        std::fs::create_dir_all(&dir)?;
        let up = Uploads {
            dir,
            ttl: ttl_secs as i64,
            map: Default::default(),
        };
        let mut loaded = 0;
        for entry in std::fs::read_dir(&up.dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                if up.load(id).is_some() {
                    loaded += 1;
                }
            } else if name.ends_with(".tmp") {
                // Another manager sharing the folder may be saving it now.
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 60);
                if old {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        if loaded > 0 {
            tracing::info!(count = loaded, "resumable uploads read back");
        }
        Ok(up)
    }

    fn json_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn bin_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.bin"))
    }

    /// Reads one upload from disk into the map (another manager sharing
    /// the folder may have created it). A record that cannot be read, or an
    /// unfinished one whose bytes are gone, is removed.
    fn load(&self, id: &str) -> Option<Arc<Upload>> {
        if !valid_id(id) {
            return None;
        }
        let json = self.json_path(id);
        let bin = self.bin_path(id);
        let rec: Record = match std::fs::read(&json)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(r) => r,
            None => {
                if json.exists() {
                    tracing::warn!(upload = id, "unreadable resumable-upload record removed");
                    let _ = std::fs::remove_file(&json);
                    let _ = std::fs::remove_file(&bin);
                }
                return None;
            }
        };
        let meta = std::fs::metadata(&bin);
        let open = rec.asset.is_none() && !rec.expired;
        // Without its bytes and not being finished (those wait for
        // `recover`, which knows the database).
        if open && meta.is_err() && rec.ingesting.is_none() {
            tracing::warn!(upload = id, "resumable upload without its bytes removed");
            let _ = std::fs::remove_file(&json);
            return None;
        }
        let (offset, touched) = match &meta {
            Ok(m) => (
                rec.verifying_from
                    .unwrap_or(m.len())
                    .min(m.len())
                    .min(rec.length),
                m.modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(rec.created)
                    .max(rec.created),
            ),
            Err(_) => (
                if rec.asset.is_some() { rec.length } else { 0 },
                rec.created,
            ),
        };
        let up = Arc::new(Upload {
            rec: Mutex::new(rec),
            offset: Mutex::new(offset),
            touched: Mutex::new(touched),
            writer: Default::default(),
            stop: Mutex::new(CancellationToken::new()),
            gone: Default::default(),
        });
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        Some(map.entry(id.to_string()).or_insert(up).clone())
    }

    fn save(&self, rec: &Record) -> std::io::Result<()> {
        save_record(&self.dir, rec)
    }

    /// [`Uploads::save`] off the async threads (two fsyncs).
    async fn save_async(&self, rec: Record) -> std::io::Result<()> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || save_record(&dir, &rec))
            .await
            .map_err(std::io::Error::other)?
    }

    fn info(&self, up: &Upload) -> Info {
        let rec = up.rec.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let offset = *up.offset.lock().unwrap_or_else(|e| e.into_inner());
        let touched = *up.touched.lock().unwrap_or_else(|e| e.into_inner());
        Info {
            expires: rec.closed_at.unwrap_or(touched) + self.ttl,
            id: rec.id,
            length: rec.length,
            offset,
            filename: rec.filename,
            title: rec.title,
            asset: rec.asset,
        }
    }

    /// Unfinished, unexpired uploads of `owner`: what they hold against the
    /// account's limits.
    pub fn pending_of(&self, owner: i64) -> Pending {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut p = Pending::default();
        for up in map.values() {
            let rec = up.rec.lock().unwrap_or_else(|e| e.into_inner());
            // Finished a moment ago, it still counts: the caller may have
            // read the database's usage just before its row was written.
            let just_finished = rec.asset.is_some()
                && rec
                    .closed_at
                    .is_some_and(|t| t >= crate::catalog::now() - 10);
            if rec.owner == owner && !rec.expired && (rec.asset.is_none() || just_finished) {
                p.count += 1;
                p.bytes = p.bytes.saturating_add(rec.length);
            }
        }
        p
    }

    /// `owner`'s unfinished uploads, newest first (the upload page lists
    /// them, to be resumed or discarded).
    pub fn unfinished_of(&self, owner: i64) -> Vec<Info> {
        let ups: Vec<Arc<Upload>> = {
            let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.values().cloned().collect()
        };
        let mut out: Vec<(i64, Info)> = ups
            .iter()
            .filter_map(|up| {
                let created = {
                    let rec = up.rec.lock().unwrap_or_else(|e| e.into_inner());
                    (rec.owner == owner && rec.asset.is_none() && !rec.expired)
                        .then_some(rec.created)?
                };
                Some((created, self.info(up)))
            })
            .collect();
        out.sort_by_key(|(created, _)| -created);
        out.into_iter().map(|(_, i)| i).collect()
    }

    /// The upload `id` if `owner` may see it.
    fn lookup(&self, id: &str, owner: i64) -> Result<Arc<Upload>, TusError> {
        let found = {
            let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.get(id).cloned()
        };
        let up = found.or_else(|| self.load(id)).ok_or(TusError::NotFound)?;
        let rec = up.rec.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if rec.owner != owner {
            return Err(TusError::NotFound);
        }
        let idle = up.writer.try_lock().is_ok();
        if rec.expired
            || (idle && rec.asset.is_none() && crate::catalog::now() >= self.info(&up).expires)
        {
            return Err(TusError::Gone);
        }
        Ok(up)
    }

    /// Stops the request writing `up` now, if any, and takes its place:
    /// this process's lock, then the `.bin`'s `flock` (another manager
    /// sharing the folder may hold it: then `Busy`, which clients retry),
    /// then the record and offset read again from disk, where another
    /// process may have moved them on.
    async fn take_over(&self, up: &Upload) -> Result<Writer, TusError> {
        // Ours is installed as the old one is cancelled, in one step: a
        // third request arriving while we wait cancels ours, not a dead one.
        let token = CancellationToken::new();
        std::mem::replace(
            &mut *up.stop.lock().unwrap_or_else(|e| e.into_inner()),
            token.clone(),
        )
        .cancel();
        let guard = tokio::time::timeout(TAKEOVER_WAIT, up.writer.clone().lock_owned())
            .await
            .map_err(|_| TusError::Busy)?;
        if token.is_cancelled() {
            // A newer request wants it; it gets it.
            return Err(TusError::Busy);
        }
        // Removed or expired while we waited for the lock?
        if up.gone.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(TusError::NotFound);
        }
        if up.rec.lock().unwrap_or_else(|e| e.into_inner()).expired {
            return Err(TusError::Gone);
        }
        let id = up.rec.lock().unwrap_or_else(|e| e.into_inner()).id.clone();
        let this = self.clone();
        let (file, rec, len) = tokio::task::spawn_blocking(move || -> Result<_, TusError> {
            let bin = this.bin_path(&id);
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&bin)
            {
                Ok(f) => Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_error(e)),
            };
            if let Some(f) = &file {
                match f.try_lock() {
                    Ok(()) => {}
                    Err(std::fs::TryLockError::WouldBlock) => return Err(TusError::Busy),
                    Err(std::fs::TryLockError::Error(e)) => return Err(io_error(e)),
                }
            }
            let Some(mut rec) = std::fs::read(this.json_path(&id))
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            else {
                return Ok((file, None, 0));
            };
            let mut len = 0;
            if let Some(f) = &file {
                if let Some(from) = rec.verifying_from.take() {
                    // A checksummed chunk was being written when its
                    // writer stopped (a kill -9): never checked, it goes.
                    f.set_len(from).map_err(io_error)?;
                    this.save(&rec).map_err(io_error)?;
                }
                // What is reported must be on disk, whoever wrote it.
                f.sync_all().map_err(io_error)?;
                len = f.metadata().map_err(io_error)?.len();
            }
            Ok((file, Some(rec), len))
        })
        .await
        .map_err(|e| TusError::Internal(e.into()))??;
        let Some(rec) = rec else {
            // Removed by another process meanwhile.
            self.map
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&up_id(up));
            return Err(TusError::NotFound);
        };
        *up.offset.lock().unwrap_or_else(|e| e.into_inner()) = if rec.asset.is_some() {
            rec.length
        } else {
            len.min(rec.length)
        };
        let expired = rec.expired;
        *up.rec.lock().unwrap_or_else(|e| e.into_inner()) = rec;
        if expired {
            return Err(TusError::Gone);
        }
        Ok(Writer {
            file,
            token,
            _guard: guard,
        })
    }

    /// A new upload of `length` bytes for `user`, checked against the
    /// site's and the account's limits before a byte is sent.
    pub async fn create(
        &self,
        p: &Pipeline,
        inflight: &Arc<InFlight>,
        user: &User,
        length: u64,
        filename: &str,
        title: &str,
    ) -> Result<Info, TusError> {
        if length > p.cfg.max_upload_bytes {
            metrics::counter!("manager_uploads_total", "result" => "too_large").increment(1);
            return Err(TusError::TooLarge {
                limit: p.cfg.max_upload_bytes,
            });
        }
        if length == 0 {
            return Err(IngestError::Empty.into());
        }
        // The title is checked now, so the uploader hears of it before
        // sending hundreds of megabytes; it is checked again at the end.
        let title = ingest::clean_title(title, filename)?;
        let owner = user.id;
        let slot = quotas::begin_upload(&*p.db, &p.cfg.quotas, inflight, user, &|| {
            self.pending_of(owner)
        })
        .await?;
        if let Err(e) = slot.check(length) {
            metrics::counter!("manager_uploads_total", "result" => "quota_exceeded").increment(1);
            return Err(e.into());
        }
        quotas::check_space(&p.cfg.staging_dir(), p.cfg.disk_reserve_mb, length)?;
        // The upload's cost is charged when it finishes; an account that
        // cannot pay it hears so now, not after sending the whole file.
        let cost = p.cfg.credits.upload_cost as i64;
        if cost > 0 && !user.is_operator() {
            let balance = p.db.balance(user.id).await?;
            if balance < cost {
                return Err(TusError::CannotPay { balance, cost });
            }
        }
        let now = crate::catalog::now();
        let rec = Record {
            id: uuid::Uuid::new_v4().simple().to_string(),
            owner: user.id,
            length,
            filename: filename.to_string(),
            title,
            created: now,
            asset: None,
            closed_at: None,
            expired: false,
            ingesting: None,
            verifying_from: None,
        };
        let bin = self.bin_path(&rec.id);
        let json = self.json_path(&rec.id);
        let dir = self.dir.clone();
        let saved = {
            let rec = rec.clone();
            tokio::task::spawn_blocking(move || {
                std::fs::File::create(&bin)?.sync_all()?;
                save_record(&dir, &rec).inspect_err(|_| {
                    let _ = std::fs::remove_file(&bin);
                    let _ = std::fs::remove_file(&json);
                })
            })
            .await
            .map_err(|e| TusError::Internal(e.into()))?
        };
        saved.map_err(io_error)?;
        let up = Arc::new(Upload {
            rec: Mutex::new(rec.clone()),
            offset: Mutex::new(0),
            touched: Mutex::new(now),
            writer: Default::default(),
            stop: Mutex::new(CancellationToken::new()),
            gone: Default::default(),
        });
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rec.id.clone(), up.clone());
        drop(slot);
        tracing::info!(upload = %rec.id, user = user.id, length, "resumable upload created");
        Ok(self.info(&up))
    }

    /// Where `id` stands, once any request writing it has stopped; finishes
    /// it if all its bytes are there but the last step failed before.
    pub async fn head(&self, p: &Ctx, user: &User, id: &str) -> Result<Info, TusError> {
        let up = self.lookup(id, user.id)?;
        let writer = self.take_over(&up).await?;
        match self.finish_if_complete(p, user, &up, writer).await {
            Ok(()) => {}
            // Refused for what the file is: said as it is.
            Err(
                e @ TusError::Ingest(
                    IngestError::Empty
                    | IngestError::BadTitle { .. }
                    | IngestError::Rejected { .. },
                ),
            ) => return Err(e),
            // Every byte is kept: a client that asks again later finishes
            // it (the browser's client retries only a 423 on a HEAD;
            // anything else makes it start the whole file again).
            Err(e) => {
                tracing::warn!(upload = id, "finishing a complete upload failed: {e}");
                return Err(TusError::FinishLater(e.to_string()));
            }
        }
        Ok(self.info(&up))
    }

    /// Appends `body` at `offset` (which must be where the upload stands),
    /// checked against `checksum` when given; finishes the upload when its
    /// last byte arrives.
    pub async fn patch<S, E>(
        &self,
        p: &Ctx,
        user: &User,
        id: &str,
        chunk: Chunk,
        mut body: S,
    ) -> Result<Info, TusError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let Chunk {
            offset,
            announced,
            checksum,
        } = chunk;
        let up = self.lookup(id, user.id)?;
        let mut writer = self.take_over(&up).await?;
        let token = writer.token.clone();
        let start = *up.offset.lock().unwrap_or_else(|e| e.into_inner());
        if offset != start {
            return Err(TusError::OffsetMismatch { expected: start });
        }
        let length = up.rec.lock().unwrap_or_else(|e| e.into_inner()).length;
        // The reserve, before a byte of this chunk is written (small chunks
        // never reach the in-loop check).
        let incoming = announced.unwrap_or(0).min(length - start);
        quotas::check_space(&p.cfg.staging_dir(), p.cfg.disk_reserve_mb, incoming)?;
        let bin = self.bin_path(id);
        let Some(locked) = writer.file.take() else {
            // Every byte is there (a finished upload): nothing to append.
            return Err(TusError::OffsetMismatch { expected: start });
        };
        // The one descriptor that holds the lock writes too: on NFS,
        // closing any other descriptor of the file would let the lock go.
        let mut file = tokio::fs::File::from_std(locked);
        if checksum.is_some() {
            // Noted durably before a byte is written: a stop before the
            // chunk is checked makes the next writer cut it off.
            let mut rec = up.rec.lock().unwrap_or_else(|e| e.into_inner()).clone();
            rec.verifying_from = Some(start);
            self.save_async(rec).await.map_err(io_error)?;
        }
        file.set_len(start).await.map_err(io_error)?;
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(io_error)?;
        // Bodies arrive in frames of a few KiB; each write is a trip to
        // the blocking pool, so they are gathered a MiB at a time.
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = checksum.as_ref().map(Checksum::hasher);
        let mut at = start;
        let mut space_checked_at = start;
        let staging = p.cfg.staging_dir();
        // How the body ended: Ok(()) whole, Err(what to answer) otherwise,
        // and whether the bytes written are kept.
        let outcome: Result<(), (TusError, bool)> = loop {
            let next = tokio::select! {
                next = body.next() => next,
                _ = token.cancelled() => break Err((TusError::Cut { offset: at }, true)),
            };
            match next {
                None => break Ok(()),
                Some(Err(e)) => {
                    tracing::debug!(upload = id, "chunk cut off: {e}");
                    break Err((TusError::Cut { offset: at }, true));
                }
                Some(Ok(chunk)) => {
                    if at + chunk.len() as u64 > length {
                        break Err((TusError::PastLength { length }, false));
                    }
                    if at - space_checked_at >= quotas::SPACE_CHECK_EVERY {
                        space_checked_at = at;
                        // Bytes arriving keep it alive, however long the request.
                        *up.touched.lock().unwrap_or_else(|e| e.into_inner()) =
                            crate::catalog::now();
                        if let Err(e) = quotas::check_space(&staging, p.cfg.disk_reserve_mb, 0) {
                            break Err((e.into(), true));
                        }
                    }
                    if let Some(h) = hasher.as_mut() {
                        h.update(&chunk);
                    }
                    if let Err(e) = out.write_all(&chunk).await {
                        break Err((io_error(e), false));
                    }
                    at += chunk.len() as u64;
                }
            }
        };
        let matches = hasher
            .zip(checksum.as_ref())
            .map(|(h, c)| h.finish() == c.expected);
        let outcome = match (outcome, matches) {
            (Ok(()), Some(false)) => Err((TusError::ChecksumMismatch, false)),
            // With a checksum, a chunk not received whole cannot be
            // checked, so none of it is kept.
            (Err((e, _)), Some(_)) => Err((e, false)),
            (o, _) => o,
        };
        let keep = match &outcome {
            Ok(()) => at,
            Err((_, true)) => at,
            Err((_, false)) => start,
        };
        let flushed = out.flush().await;
        let mut file = out.into_inner();
        let synced = async {
            flushed?;
            file.flush().await?;
            if keep != at {
                file.set_len(keep).await?;
            }
            file.sync_all().await
        }
        .await;
        if let Err(e) = synced {
            // What reached the disk is unknown (and after a failed fsync
            // a later one may succeed without it): this chunk goes.
            let _ = file.set_len(start).await;
            *up.offset.lock().unwrap_or_else(|e| e.into_inner()) = start;
            tracing::warn!(upload = id, path = %bin.display(), "a chunk could not be made durable: {e}");
            return Err(io_error(e));
        }
        writer.file = Some(file.into_std().await);
        if checksum.is_some() {
            let rec = up.rec.lock().unwrap_or_else(|e| e.into_inner()).clone();
            self.save_async(rec).await.map_err(io_error)?;
        }
        *up.offset.lock().unwrap_or_else(|e| e.into_inner()) = keep;
        if keep > start {
            *up.touched.lock().unwrap_or_else(|e| e.into_inner()) = crate::catalog::now();
        }
        if let Err((e, _)) = outcome {
            return Err(match e {
                TusError::Cut { .. } => TusError::Cut { offset: keep },
                e => e,
            });
        }
        self.finish_if_complete(p, user, &up, writer).await?;
        Ok(self.info(&up))
    }

    /// Ingests `up` if every byte is there and it is not finished yet,
    /// holding `writer` until done. The work runs as a task of its own: a
    /// client that hangs up mid-way must not stop it between the move of
    /// the bytes and the database's row.
    async fn finish_if_complete(
        &self,
        p: &Ctx,
        user: &User,
        up: &Arc<Upload>,
        writer: Writer,
    ) -> Result<(), TusError> {
        {
            let rec = up.rec.lock().unwrap_or_else(|e| e.into_inner());
            let offset = *up.offset.lock().unwrap_or_else(|e| e.into_inner());
            if rec.asset.is_some() || offset < rec.length {
                return Ok(());
            }
        }
        let (this, p, user, up) = (self.clone(), p.clone(), user.clone(), up.clone());
        tokio::spawn(async move {
            let _writer = writer;
            this.finish(&p, &user, &up).await
        })
        .await
        .map_err(|e| TusError::Internal(e.into()))?
    }

    async fn finish(&self, p: &Pipeline, user: &User, up: &Upload) -> Result<(), TusError> {
        let mut rec = up.rec.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let offset = *up.offset.lock().unwrap_or_else(|e| e.into_inner());
        let bin = self.bin_path(&rec.id);
        // An earlier attempt that did not end cleanly: the movie recorded
        // (its answer lost, or this record not saved), or the bytes left
        // under the job's source name without a row.
        if let Some(asset) = rec.ingesting.clone() {
            let src = crate::pipeline::source_path(p, &asset);
            if p.db.asset(&asset).await?.is_some() {
                if !src.exists() && bin.exists() {
                    tokio::fs::rename(&bin, &src).await.map_err(io_error)?;
                }
                return self.finished(up, rec, asset).await;
            }
            if src.exists() {
                tokio::fs::rename(&src, &bin).await.map_err(io_error)?;
            }
        }
        // The movie's id is chosen and saved first, so whatever stops this
        // (a kill -9 between the database's commit and the record's save)
        // a restart can tell whether the movie exists ([`Uploads::recover`]):
        // one upload never becomes two movies.
        let asset = uuid::Uuid::new_v4().simple().to_string();
        rec.ingesting = Some(asset.clone());
        self.save_async(rec.clone()).await.map_err(io_error)?;
        *up.rec.lock().unwrap_or_else(|e| e.into_inner()) = rec.clone();
        let result = ingest::accept(
            p,
            user,
            ingest::Received {
                asset_id: &asset,
                staged: &bin,
                size: offset,
                source_name: &rec.filename,
                title: &rec.title,
            },
        )
        .await;
        match result {
            Ok(()) => self.finished(up, rec, asset).await,
            Err(e @ (IngestError::Internal(_) | IngestError::Ledger(_))) => Err(e.into()),
            Err(e) => {
                // Refused for what the file is: sending it again changes
                // nothing, so nothing is kept.
                self.forget_async(rec.id.clone()).await;
                Err(e.into())
            }
        }
    }

    /// Marks `up` finished as the movie `asset`. The movie exists whatever
    /// happens to the record; one not saved is finished again at the next
    /// start ([`Uploads::recover`]).
    async fn finished(&self, up: &Upload, mut rec: Record, asset: String) -> Result<(), TusError> {
        rec.asset = Some(asset.clone());
        rec.ingesting = None;
        rec.closed_at = Some(crate::catalog::now());
        *up.rec.lock().unwrap_or_else(|e| e.into_inner()) = rec.clone();
        *up.offset.lock().unwrap_or_else(|e| e.into_inner()) = rec.length;
        if let Err(e) = self.save_async(rec.clone()).await {
            tracing::warn!(upload = %rec.id, "cannot save the finished upload's record: {e}");
        }
        tracing::info!(upload = %rec.id, asset = %asset, "resumable upload finished");
        Ok(())
    }

    /// At start, for uploads a stop caught while becoming a movie: finished
    /// if the movie was recorded, else its bytes are put back (from the
    /// job's source name, where the stop may have left them) to be
    /// finished by the client's next request.
    pub async fn recover(
        &self,
        db: &dyn crate::catalog::Catalog,
        staging: &Path,
    ) -> sqlx::Result<()> {
        let ups: Vec<Arc<Upload>> = {
            let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.values().cloned().collect()
        };
        for up in ups {
            let rec = up.rec.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let Some(asset) = rec.ingesting.clone() else {
                continue;
            };
            if db.asset(&asset).await?.is_some() {
                let _ = self.finished(&up, rec, asset).await;
                continue;
            }
            let src = staging.join(format!("{asset}.src"));
            let bin = self.bin_path(&rec.id);
            // Another manager sharing the folder may be finishing it right
            // now: its lock on those bytes says so.
            let busy = std::fs::File::open(&src)
                .or_else(|_| std::fs::File::open(&bin))
                .map(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
                .unwrap_or(false);
            if busy {
                continue;
            }
            if src.exists() {
                if let Err(e) = std::fs::rename(&src, &bin) {
                    tracing::warn!(upload = %rec.id, "cannot put an unfinished upload's bytes back: {e}");
                    continue;
                }
            }
            let mut rec = rec;
            rec.ingesting = None;
            match std::fs::metadata(&bin) {
                Ok(m) => {
                    *up.offset.lock().unwrap_or_else(|e| e.into_inner()) = m.len().min(rec.length);
                    let _ = self.save(&rec);
                    *up.rec.lock().unwrap_or_else(|e| e.into_inner()) = rec;
                }
                Err(_) => self.forget(&rec.id),
            }
        }
        Ok(())
    }

    fn forget(&self, id: &str) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(up) = map.remove(id) {
            up.gone.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let _ = std::fs::remove_file(self.bin_path(id));
        let _ = std::fs::remove_file(self.json_path(id));
    }

    /// [`Uploads::forget`] off the async threads.
    async fn forget_async(&self, id: String) {
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.forget(&id)).await;
    }

    /// Termination: the upload and its bytes are removed (a finished one's
    /// movie stays; only the record goes).
    pub async fn terminate(&self, user: &User, id: &str) -> Result<(), TusError> {
        let up = self.lookup(id, user.id)?;
        let _writer = self.take_over(&up).await?;
        self.forget_async(id.to_string()).await;
        tracing::info!(upload = id, user = user.id, "resumable upload terminated");
        Ok(())
    }

    /// Removes the bytes of uploads idle past their expiry (their record
    /// answers 410 for as long again, then goes) and forgets finished
    /// uploads past theirs. Returns how many expired now.
    pub fn sweep(&self, now: i64) -> usize {
        let ups: Vec<Arc<Upload>> = {
            let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.values().cloned().collect()
        };
        let mut expired = 0;
        for up in ups {
            // One being written is alive, whatever its clock says, here or
            // in another process sharing the folder (its `flock`).
            let Ok(_guard) = up.writer.try_lock() else {
                continue;
            };
            let id = up.rec.lock().unwrap_or_else(|e| e.into_inner()).id.clone();
            let bin = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.bin_path(&id));
            if let Ok(f) = &bin {
                if f.try_lock().is_err() {
                    continue;
                }
                // Bytes another process received count as activity too.
                if let Some(t) = f
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                {
                    let mut touched = up.touched.lock().unwrap_or_else(|e| e.into_inner());
                    *touched = (*touched).max(t.as_secs() as i64);
                }
            }
            // The record as it is on disk now: another process sharing the
            // folder may have finished or removed it.
            match std::fs::read(self.json_path(&id))
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            {
                Some(on_disk) => *up.rec.lock().unwrap_or_else(|e| e.into_inner()) = on_disk,
                None => {
                    self.map
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    continue;
                }
            }
            let info = self.info(&up);
            if now < info.expires {
                continue;
            }
            let mut rec = up.rec.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if rec.asset.is_some() || rec.expired {
                self.forget(&rec.id);
                continue;
            }
            let _ = std::fs::remove_file(self.bin_path(&rec.id));
            rec.expired = true;
            rec.closed_at = Some(now);
            if let Err(e) = self.save(&rec) {
                tracing::warn!(upload = %rec.id, "cannot save the expired upload's record: {e}");
            }
            *up.offset.lock().unwrap_or_else(|e| e.into_inner()) = 0;
            *up.rec.lock().unwrap_or_else(|e| e.into_inner()) = rec.clone();
            tracing::info!(upload = %rec.id, user = rec.owner, "resumable upload expired; its bytes were removed");
            expired += 1;
        }
        expired
    }
}

/// Sweeps expired uploads every minute until `stop` fires.
pub async fn expiry_loop(ups: Arc<Uploads>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let ups2 = ups.clone();
        let _ = tokio::task::spawn_blocking(move || ups2.sweep(crate::catalog::now())).await;
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_headers_are_parsed_or_refused_with_a_code() {
        let code = |h: &str| match Checksum::parse(h) {
            Err(TusError::Invalid { code, .. }) => code,
            Err(e) => panic!("{h}: {e}"),
            Ok(_) => "ok",
        };
        // sha1("abc") and sha256("abc") in base64.
        assert_eq!(code("sha1 qZk+NkcGgWq6PiVxeFDCbJzQ2J0="), "ok");
        assert_eq!(
            code("sha256 ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="),
            "ok"
        );
        assert_eq!(
            code("md5 kAFQmDzST7DWlj99KOF/cg=="),
            "checksum_algorithm_unsupported"
        );
        assert_eq!(code("sha1 qZk+NkcGgWq6PiVxeFDCbJzQ"), "checksum_malformed");
        assert_eq!(code("sha256"), "checksum_malformed");
        assert_eq!(code("sha1 !!!"), "checksum_malformed");
    }

    #[test]
    fn metadata_keeps_the_file_name_and_title_and_refuses_garbage() {
        // "filename" = "a.mp4", "title" = "Été", an unknown key without value.
        let (f, t) = parse_metadata("filename YS5tcDQ=,title w4l0w6k=,is_confidential").unwrap();
        assert_eq!((f.as_str(), t.as_str()), ("a.mp4", "Été"));
        assert!(matches!(
            parse_metadata("filename ***"),
            Err(TusError::Invalid {
                code: "metadata_malformed",
                ..
            })
        ));
        assert!(matches!(
            parse_metadata("title //79"),
            Err(TusError::Invalid {
                code: "metadata_malformed",
                ..
            })
        ));
    }

    #[test]
    fn ids_are_only_what_we_mint() {
        assert!(valid_id(&uuid::Uuid::new_v4().simple().to_string()));
        assert!(!valid_id("../../etc/passwd"));
        assert!(!valid_id(&"A".repeat(32)));
        assert!(!valid_id(""));
    }
}
