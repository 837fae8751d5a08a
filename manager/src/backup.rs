//! Backups of the manager's database, verified the moment they are made,
//! sealed and kept on the view nodes, and restored by one command
//! (`manager backup now | list | verify | restore`; docs/backup.md).
//!
//! **Taking one.** A read transaction is opened on a pooled connection; the
//! row count of every table is read in it, and SQLite's online-backup API
//! copies the database *from that same connection*, so the copy is exactly
//! the snapshot the counts describe (`sqlite3_backup_step` reuses an open read
//! transaction on its source). Writers are not blocked (WAL). `VACUUM INTO`
//! cannot be used: it refuses to run inside a transaction, so its snapshot
//! and the counts could differ under concurrent writes. The copy is then
//! opened read-only: `PRAGMA integrity_check` must say `ok`, and every
//! table's count and the schema version (latest applied migration) must
//! equal the source's. Only then is it named `<created>-<sha256>.db` and its
//! manifest (`.json`, written last) created; a backup without a manifest
//! never existed. Files are create-only.
//!
//! **Off-machine.** Each verified backup is packed with its manifest and the
//! manager's effective configuration, sealed in the sealed-blob format
//! (`docs/sealed-blob.md`: AES-256-GCM STREAM, so every byte is
//! authenticated), and pushed to the backup nodes, where it is named
//! `<created>-<sha256 of the sealed bytes>` and re-hashed before it is
//! stored. Pushes a node missed are retried every `retry_secs`.
//!
//! **Keys.** A random 32-byte *recovery key*, given to the operator by
//! `init-cluster` (`slmrk1-<64 hex><8 hex checksum>`), is the root of both
//! things a restore on an empty machine needs:
//! - the sealing key: HKDF-SHA256(recovery key, info "slmedia backup seal v1");
//! - the nodes' backup-read credential: HKDF-SHA256(recovery key, info
//!   "slmedia backup read v1"), installed on each node as `backup_read_key`
//!   and used as the HMAC secret of key id `backup-reader`, which may list
//!   and fetch backups but not write or delete them.
//!
//! It is deliberately *not* the master key: nodes hold the master key (to
//! unwrap movie keys), and the bundle carries the token-signing key and the
//! node secrets; a node able to open backups could then mint playback
//! tokens. Nodes get only the one-way read credential. The bundle carries
//! the master key (in the configuration), so recovery key + node addresses
//! are all a restore needs.
//!
//! **Retention** is grandfather-father-son over creation times ([`gfs_keep`]),
//! applied locally and on every node; the newest backup is always kept.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    io::{Read, Write},
    path::{Path, PathBuf},
    str::FromStr,
    time::{Duration, Instant},
};

use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared::{BlobId, DataKey, Opener, SealError, SealReader, Secret};
use tokio::io::AsyncReadExt;
use zeroize::Zeroizing;

use crate::{
    catalog::{self, Catalog, SharedCatalog},
    config::{BackupConfig, BackupNodes, NodeConfig},
    Config,
};

// FROZEN: the backup bundle and key derivation, v1. Backups already on nodes
// are read with these; a change needs a new prefix/magic and readers keep v1.
const RECOVERY_PREFIX: &str = "slmrk1-";
const RECOVERY_CHECK_CONTEXT: &[u8] = b"slmedia recovery key v1";
const SEAL_INFO: &[u8] = b"slmedia backup seal v1";
const READ_INFO: &[u8] = b"slmedia backup read v1";
const BUNDLE_MAGIC: &[u8; 8] = b"SLMBKUP1";
/// The key id written in a sealed backup's header (it is informational;
/// backup keys come from the recovery key, not from a master key).
const BUNDLE_KEY_ID: u32 = 0;
/// Key id of the nodes' read-only backup credential.
pub const READER_KEY_ID: &str = "backup-reader";
// (end of frozen constants)

/// Manifest and configuration inside a bundle are small; a larger length
/// field means the bundle is not ours.
const MAX_BUNDLE_SECTION: u32 = 4 << 20;
const MANIFEST_FORMAT: u32 = 1;

// ---- recovery key ---------------------------------------------------------------

/// The operator's recovery key. Never printed by `Debug`; zeroed on drop.
#[derive(Clone)]
pub struct RecoveryKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoveryKey([redacted])")
    }
}

impl RecoveryKey {
    pub fn generate() -> RecoveryKey {
        use rand::RngCore;
        let mut k = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(k.as_mut());
        RecoveryKey(k)
    }

    fn checksum(key: &[u8; 32]) -> [u8; 4] {
        let mut h = Sha256::new();
        h.update(RECOVERY_CHECK_CONTEXT);
        h.update(key);
        h.finalize()[..4].try_into().expect("4 bytes")
    }

    /// `slmrk1-` + 64 hex of the key + 8 hex of a checksum (a typo is caught
    /// before any node is asked for anything).
    pub fn encode(&self) -> Secret {
        Secret::new(format!(
            "{RECOVERY_PREFIX}{}{}",
            hex::encode(self.0.as_ref()),
            hex::encode(Self::checksum(&self.0))
        ))
    }

    /// Parses [`encode`](RecoveryKey::encode)'s form; whitespace anywhere and
    /// upper case are accepted (people copy keys by hand).
    pub fn parse(text: &str) -> Result<RecoveryKey, BackupError> {
        let s: Zeroizing<String> = Zeroizing::new(
            text.chars()
                .filter(|c| !c.is_whitespace())
                .collect::<String>()
                .to_ascii_lowercase(),
        );
        let bad = |why: &str| BackupError::BadRecoveryKey(why.to_string());
        let body = s
            .strip_prefix(RECOVERY_PREFIX)
            .ok_or_else(|| bad("it does not start with `slmrk1-`"))?;
        if body.len() != 72 {
            return Err(bad("it must be `slmrk1-` followed by 72 hex characters"));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        let mut check = [0u8; 4];
        hex::decode_to_slice(&body[..64], key.as_mut())
            .and_then(|()| hex::decode_to_slice(&body[64..], &mut check))
            .map_err(|_| bad("it contains characters that are not hex"))?;
        if Self::checksum(&key) != check {
            return Err(bad("its checksum does not match (a mistyped character?)"));
        }
        Ok(RecoveryKey(key))
    }

    fn derive(&self, info: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(None, self.0.as_ref())
            .expand(info, out.as_mut())
            .expect("32 bytes is a valid HKDF output length");
        out
    }

    /// The key backups are sealed with.
    pub fn seal_key(&self) -> DataKey {
        DataKey::from_bytes(*self.derive(SEAL_INFO))
    }

    /// The nodes' `backup_read_key`: lets a restore list and fetch backups,
    /// and reveals nothing about the recovery key itself.
    pub fn read_secret(&self) -> Zeroizing<[u8; 32]> {
        self.derive(READ_INFO)
    }

    pub fn read_secret_hex(&self) -> Secret {
        Secret::new(hex::encode(self.read_secret().as_ref()))
    }
}

/// The recovery key for a command: `SLMEDIA_RECOVERY_KEY`, or one line of
/// standard input (prompted for on a terminal). Never a command-line flag:
/// those end up in shell history and `ps`.
pub fn read_recovery_key_from_operator() -> anyhow::Result<RecoveryKey> {
    use std::io::IsTerminal;
    if let Ok(v) = std::env::var("SLMEDIA_RECOVERY_KEY") {
        let v = Zeroizing::new(v);
        return Ok(RecoveryKey::parse(&v)?);
    }
    if std::io::stdin().is_terminal() {
        eprint!("Recovery key (slmrk1-…): ");
        let _ = std::io::stderr().flush();
    }
    let mut line = Zeroizing::new(String::new());
    std::io::stdin().read_line(&mut line)?;
    anyhow::ensure!(
        !line.trim().is_empty(),
        "no recovery key: set SLMEDIA_RECOVERY_KEY or give it on standard input"
    );
    Ok(RecoveryKey::parse(&line)?)
}

// ---- configuration pieces -----------------------------------------------------

impl BackupConfig {
    /// Checked by `Config::validate`; the error names the field under `backup.`.
    pub fn validate(&self, nodes: &[NodeConfig]) -> Result<(), (&'static str, String)> {
        if self.interval_secs < 60 {
            return Err(("interval_secs", "must be at least 60".into()));
        }
        if self.max_age_secs < self.interval_secs {
            return Err((
                "max_age_secs",
                "must be at least `backup.interval_secs`".into(),
            ));
        }
        if !(1..=86_400).contains(&self.retry_secs) {
            return Err(("retry_secs", "must be between 1 and 86400".into()));
        }
        if self.keep_last == 0 {
            return Err(("keep_last", "must be at least 1".into()));
        }
        if let BackupNodes::Named(names) = &self.nodes {
            let mut seen = HashSet::new();
            for n in names {
                if !nodes.iter().any(|c| &c.name == n) || !seen.insert(n) {
                    return Err((
                        "nodes",
                        format!("`{n}` is not a configured node, or is listed twice"),
                    ));
                }
            }
            if names.len() < 2.min(nodes.len()) {
                return Err((
                    "nodes",
                    "must name at least two nodes: one copy off this machine is not enough".into(),
                ));
            }
        }
        if !self.recovery_key.is_empty() {
            RecoveryKey::parse(self.recovery_key.expose())
                .map_err(|e| ("recovery_key", e.to_string()))?;
        }
        Ok(())
    }

    fn retention(&self) -> Retention {
        Retention {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
        }
    }

    pub fn target_nodes<'a>(&self, all: &'a [NodeConfig]) -> Vec<&'a NodeConfig> {
        match &self.nodes {
            BackupNodes::All => all.iter().collect(),
            BackupNodes::Named(names) => all.iter().filter(|n| names.contains(&n.name)).collect(),
        }
    }
}

// ---- errors -----------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("the copy failed its integrity check: {0}")]
    IntegrityFailed(String),
    #[error("table `{table}` has {actual} rows in the copy, {expected} in the source/manifest")]
    CountMismatch {
        table: String,
        expected: i64,
        actual: i64,
    },
    #[error("the copy's schema version is {actual}, the manifest says {expected}")]
    SchemaMismatch { expected: i64, actual: i64 },
    #[error("the bytes hash to {actual}, not to {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("the manifest is missing or invalid: {0}")]
    ManifestInvalid(String),
    #[error("the sealed backup does not open (damaged, or another recovery key): {0}")]
    Sealed(#[from] SealError),
    #[error("the recovery key is not valid: {0}")]
    BadRecoveryKey(String),
    #[error("no recovery key is configured (`backup.recovery_key`): backups stay on this machine")]
    NoRecoveryKey,
    #[error("no backup verified; nothing was restored")]
    NoVerifiedBackup,
    #[error("node {node} answered {status}: {code}: {message}")]
    Node {
        node: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("node {node} is unreachable: {message}")]
    Unreachable { node: String, message: String },
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("database error: {0}")]
    Db(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<sqlx::Error> for BackupError {
    fn from(e: sqlx::Error) -> Self {
        BackupError::Db(e.to_string())
    }
}

impl BackupError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            BackupError::IntegrityFailed(_) => "integrity_check_failed",
            BackupError::CountMismatch { .. } => "row_count_mismatch",
            BackupError::SchemaMismatch { .. } => "schema_version_mismatch",
            BackupError::HashMismatch { .. } => "hash_mismatch",
            BackupError::ManifestInvalid(_) => "manifest_invalid",
            BackupError::Sealed(_) => "backup_unreadable",
            BackupError::BadRecoveryKey(_) => "bad_recovery_key",
            BackupError::NoRecoveryKey => "no_recovery_key",
            BackupError::NoVerifiedBackup => "no_verified_backup",
            BackupError::Node { .. } => "node_refused",
            BackupError::Unreachable { .. } => "node_unreachable",
            BackupError::Exists(_) => "already_exists",
            BackupError::Db(_) => "database_error",
            BackupError::Io(_) => "io_error",
        }
    }
}

// ---- manifests and the local store ---------------------------------------------

/// What a backup is, written next to it as JSON and sealed with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// 1.
    pub format: u32,
    /// `<created_at>-<sha256>`: the local file names.
    pub id: String,
    /// Unix seconds of the snapshot; unique per backup.
    pub created_at: i64,
    pub manager_version: String,
    /// The latest applied migration.
    pub schema_version: i64,
    /// Rows in every table at the snapshot.
    pub tables: BTreeMap<String, i64>,
    /// SHA-256 (hex) and size of the SQLite file.
    pub sha256: String,
    pub size: u64,
}

impl Manifest {
    fn check_shape(&self) -> Result<(), BackupError> {
        let bad = |why: &str| BackupError::ManifestInvalid(why.to_string());
        if self.format != MANIFEST_FORMAT {
            return Err(bad(&format!("unknown format {}", self.format)));
        }
        if self.id != format!("{}-{}", self.created_at, self.sha256) {
            return Err(bad("its id does not match its time and hash"));
        }
        if BlobId::from_str(&self.sha256).is_err() {
            return Err(bad("its hash is not a SHA-256"));
        }
        Ok(())
    }
}

pub fn backups_dir(cfg: &Config) -> PathBuf {
    cfg.data_dir.join("backups")
}

fn ensure_dirs(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("tmp"))
}

/// Verified local backups, newest first. A backup counts once its manifest
/// exists (it is written last) and its database file is there.
pub fn list_local(dir: &Path) -> Vec<Manifest> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            let m = std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok());
            if let Some(m) = m {
                if m.check_shape().is_ok() && dir.join(format!("{}.db", m.id)).exists() {
                    out.push(m);
                }
            }
        }
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.created_at));
    out
}

/// Holds `backups/.lock` so a `manager backup now` and the running
/// manager's scheduler never work on the folder at the same time.
struct FolderLock(#[allow(dead_code)] std::fs::File);

async fn lock_folder(dir: &Path) -> Result<FolderLock, BackupError> {
    let path = dir.join(".lock");
    tokio::task::spawn_blocking(move || -> std::io::Result<FolderLock> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        f.lock()?;
        Ok(FolderLock(f))
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))?
    .map_err(Into::into)
}

/// Removes a file unless disarmed (multi-step work that failed leaves nothing).
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Gives `tmp` the name `dest` without ever replacing an existing file
/// (`link(2)` fails rather than overwrite), then drops the temp name.
fn commit_create_only(tmp: &Path, dest: &Path) -> Result<(), BackupError> {
    std::fs::File::open(tmp)?.sync_all()?;
    match std::fs::hard_link(tmp, dest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(BackupError::Exists(dest.to_path_buf()))
        }
        Err(e) => return Err(e.into()),
    }
    let _ = std::fs::remove_file(tmp);
    fsync_dir(dest.parent().expect("a file has a folder"))?;
    Ok(())
}

fn write_create_only(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
    let tmp = dir
        .join("tmp")
        .join(format!("{name}.{}", uuid::Uuid::new_v4()));
    let mut guard = TempFile(Some(tmp.clone()));
    std::fs::write(&tmp, bytes)?;
    commit_create_only(&tmp, &dir.join(name))?;
    guard.disarm();
    Ok(())
}

fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

// ---- snapshot and verification ------------------------------------------------

/// What a database file holds, read-only: integrity, counts, schema version.
pub async fn inspect(path: &Path) -> Result<(BTreeMap<String, i64>, i64), BackupError> {
    let c = catalog::inspect_snapshot(path)
        .await
        .map_err(BackupError::IntegrityFailed)?;
    Ok((c.tables, c.schema))
}

/// Copies the catalog into `dest` (a new file), consistent at one
/// instant, and returns its counts.
async fn snapshot(
    db: &dyn Catalog,
    dest: &Path,
) -> Result<(BTreeMap<String, i64>, i64), BackupError> {
    let c = db.snapshot(dest).await.map_err(BackupError::Db)?;
    Ok((c.tables, c.schema))
}

fn compare(
    expected: &BTreeMap<String, i64>,
    expected_schema: i64,
    actual: &BTreeMap<String, i64>,
    actual_schema: i64,
) -> Result<(), BackupError> {
    for name in expected.keys().chain(actual.keys()) {
        let (e, a) = (expected.get(name), actual.get(name));
        if e != a {
            return Err(BackupError::CountMismatch {
                table: name.clone(),
                expected: e.copied().unwrap_or(-1),
                actual: a.copied().unwrap_or(-1),
            });
        }
    }
    if expected_schema != actual_schema {
        return Err(BackupError::SchemaMismatch {
            expected: expected_schema,
            actual: actual_schema,
        });
    }
    Ok(())
}

/// Checks a database file against its manifest: hash, size, integrity,
/// every table's count, schema version.
pub async fn verify_db(path: &Path, m: &Manifest) -> Result<(), BackupError> {
    m.check_shape()?;
    let p = path.to_path_buf();
    let (sha, size) = tokio::task::spawn_blocking(move || hash_file(&p))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    if sha != m.sha256 || size != m.size {
        return Err(BackupError::HashMismatch {
            expected: m.sha256.clone(),
            actual: sha,
        });
    }
    let (counts, schema) = inspect(path).await?;
    compare(&m.tables, m.schema_version, &counts, schema)
}

/// Takes a backup of `db` into `dir` and verifies it; returns its manifest.
/// Nothing is left behind if any step fails.
pub async fn take(db: &dyn Catalog, dir: &Path) -> Result<Manifest, BackupError> {
    ensure_dirs(dir)?;
    let _lock = lock_folder(dir).await?;
    // One backup per second at most, so the creation time names it uniquely
    // (on the nodes too) and orders backups.
    let mut created = shared::runtime::unix_now();
    if let Some(newest) = list_local(dir).first().map(|m| m.created_at) {
        if created <= newest {
            tokio::time::sleep(Duration::from_millis(
                1000 * (newest + 1 - created) as u64 + 50,
            ))
            .await;
            created = shared::runtime::unix_now().max(newest + 1);
        }
    }
    let staging = dir
        .join("tmp")
        .join(format!("{created}.{}.db", uuid::Uuid::new_v4()));
    let mut guard = TempFile(Some(staging.clone()));
    let (counts, schema) = snapshot(db, &staging).await?;
    let (sha, size) = hash_file(&staging)?;
    let (copy_counts, copy_schema) = inspect(&staging).await?;
    compare(&counts, schema, &copy_counts, copy_schema)?;
    let id = format!("{created}-{sha}");
    commit_create_only(&staging, &dir.join(format!("{id}.db")))?;
    guard.disarm();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        id: id.clone(),
        created_at: created,
        manager_version: env!("CARGO_PKG_VERSION").to_string(),
        schema_version: schema,
        tables: counts,
        sha256: sha,
        size,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    if let Err(e) = write_create_only(dir, &format!("{id}.json"), &json) {
        let _ = std::fs::remove_file(dir.join(format!("{id}.db")));
        return Err(e);
    }
    metrics::counter!("manager_backups_total", "result" => "verified").increment(1);
    metrics::gauge!("manager_backup_newest_timestamp_seconds").set(created as f64);
    tracing::info!(backup = %id, size, schema, "backup taken and verified");
    Ok(manifest)
}

// ---- sealed bundles ---------------------------------------------------------------

fn bundle_asset_id(created: i64) -> String {
    format!("slmedia-backup/{created}")
}

/// `<created>-<sha256 of the sealed bytes>`, as nodes name a sealed backup.
pub fn parse_remote_name(name: &str) -> Option<(i64, BlobId)> {
    let (t, h) = name.split_once('-')?;
    if t.is_empty() || t.len() > 18 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((t.parse().ok()?, h.parse().ok()?))
}

fn bundle_prefix(m: &Manifest, config_toml: &str) -> Vec<u8> {
    let manifest = serde_json::to_vec(m).expect("a manifest serializes");
    let mut p = Vec::with_capacity(16 + manifest.len() + config_toml.len());
    p.extend_from_slice(BUNDLE_MAGIC);
    p.extend_from_slice(&(manifest.len() as u32).to_be_bytes());
    p.extend_from_slice(&manifest);
    p.extend_from_slice(&(config_toml.len() as u32).to_be_bytes());
    p.extend_from_slice(config_toml.as_bytes());
    p
}

/// The sealed file of a local backup (`<created>-<sealed sha>.sealed`),
/// sealing it first if there is none. Bundle plaintext:
/// `SLMBKUP1 | u32 BE len | manifest JSON | u32 BE len | config TOML | SQLite file`.
async fn ensure_sealed(
    dir: &Path,
    m: &Manifest,
    config_toml: &str,
    key: &RecoveryKey,
) -> Result<(String, PathBuf), BackupError> {
    if let Some(found) = find_sealed(dir, m.created_at) {
        return Ok(found);
    }
    let reader = AsyncReadExt::chain(
        std::io::Cursor::new(bundle_prefix(m, config_toml)),
        tokio::fs::File::open(dir.join(format!("{}.db", m.id))).await?,
    );
    let mut sealer = SealReader::new(
        reader,
        &key.seal_key(),
        &bundle_asset_id(m.created_at),
        BUNDLE_KEY_ID,
        shared::DEFAULT_SEGMENT_SIZE,
    );
    let tmp = dir
        .join("tmp")
        .join(format!("{}.{}.sealed", m.created_at, uuid::Uuid::new_v4()));
    let mut guard = TempFile(Some(tmp.clone()));
    let mut out = tokio::fs::File::create(&tmp).await?;
    tokio::io::copy(&mut sealer, &mut out).await?;
    out.sync_all().await?;
    drop(out);
    let blob = sealer.blob_id().expect("read to the end");
    let name = format!("{}-{blob}", m.created_at);
    let path = dir.join(format!("{name}.sealed"));
    commit_create_only(&tmp, &path)?;
    guard.disarm();
    Ok((name, path))
}

fn find_sealed(dir: &Path, created: i64) -> Option<(String, PathBuf)> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let p = e.path();
        let name = p
            .file_name()?
            .to_str()?
            .strip_suffix(".sealed")?
            .to_string();
        (parse_remote_name(&name)?.0 == created).then_some((name, p))
    })
}

/// Opens a sealed bundle downloaded as `name` (its hash already checked),
/// writing the database to `db_out`; returns the manifest and configuration.
/// Every segment is authenticated; then the database is checked against the
/// manifest (hash, integrity, counts).
pub async fn open_bundle(
    sealed: &Path,
    name: &str,
    key: &RecoveryKey,
    db_out: &Path,
) -> Result<(Manifest, Zeroizing<String>), BackupError> {
    let (created, _) = parse_remote_name(name)
        .ok_or_else(|| BackupError::ManifestInvalid(format!("`{name}` is not a backup name")))?;
    let (sealed, db_out2, key2) = (sealed.to_path_buf(), db_out.to_path_buf(), key.clone());
    let (manifest, config) =
        tokio::task::spawn_blocking(move || decrypt_bundle(&sealed, created, &key2, &db_out2))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
    if manifest.created_at != created {
        return Err(BackupError::ManifestInvalid(
            "the manifest's time differs from the backup's name".into(),
        ));
    }
    verify_db(db_out, &manifest).await?;
    Ok((manifest, config))
}

fn decrypt_bundle(
    sealed: &Path,
    created: i64,
    key: &RecoveryKey,
    db_out: &Path,
) -> Result<(Manifest, Zeroizing<String>), BackupError> {
    let mut f = std::fs::File::open(sealed)?;
    let len = f.metadata()?.len();
    let mut header = [0u8; shared::HEADER_LEN];
    f.read_exact(&mut header)
        .map_err(|_| SealError::Truncated)?;
    let opener = Opener::new(&key.seal_key(), &bundle_asset_id(created), &header, len)?;
    let layout = *opener.layout();
    let mut out = std::fs::File::create(db_out)?;
    let mut guard = TempFile(Some(db_out.to_path_buf()));
    let mut sealed_buf = Vec::new();
    let mut plain = Vec::new();
    // The manifest and configuration are gathered here; the rest is the database.
    let mut head: Vec<u8> = Vec::new();
    let mut parsed: Option<(Manifest, Zeroizing<String>)> = None;
    for i in 0..layout.segment_count() {
        let r = layout.sealed_range(i);
        sealed_buf.resize((r.end - r.start) as usize, 0);
        f.read_exact(&mut sealed_buf)
            .map_err(|_| SealError::Truncated)?;
        opener.open_segment_into(i, &sealed_buf, &mut plain)?;
        if parsed.is_some() {
            out.write_all(&plain)?;
            continue;
        }
        head.extend_from_slice(&plain);
        if let Some((m, c, used)) = parse_head(&head)? {
            out.write_all(&head[used..])?;
            head.clear();
            parsed = Some((m, c));
        }
    }
    let (m, c) =
        parsed.ok_or_else(|| BackupError::ManifestInvalid("the bundle ends early".into()))?;
    out.sync_all()?;
    guard.disarm();
    Ok((m, c))
}

/// Parses the bundle's head once enough bytes are there: `None` = need more.
fn parse_head(b: &[u8]) -> Result<Option<(Manifest, Zeroizing<String>, usize)>, BackupError> {
    let bad = |why: &str| BackupError::ManifestInvalid(why.to_string());
    if b.len() < 8 {
        return Ok(None);
    }
    if &b[..8] != BUNDLE_MAGIC {
        return Err(bad("not a backup bundle"));
    }
    let section = |at: usize| -> Result<Option<(usize, usize)>, BackupError> {
        let Some(l) = b.get(at..at + 4) else {
            return Ok(None);
        };
        let l = u32::from_be_bytes(l.try_into().expect("4 bytes"));
        if l > MAX_BUNDLE_SECTION {
            return Err(bad("a section is implausibly large"));
        }
        let end = at + 4 + l as usize;
        Ok((b.len() >= end).then_some((at + 4, end)))
    };
    let Some((ms, me)) = section(8)? else {
        return Ok(None);
    };
    let Some((cs, ce)) = section(me)? else {
        return Ok(None);
    };
    let m: Manifest =
        serde_json::from_slice(&b[ms..me]).map_err(|e| bad(&format!("manifest: {e}")))?;
    m.check_shape()?;
    let c = String::from_utf8(b[cs..ce].to_vec()).map_err(|_| bad("configuration is not UTF-8"))?;
    Ok(Some((m, Zeroizing::new(c), ce)))
}

// ---- talking to nodes ---------------------------------------------------------------

/// One node's backup endpoints, signed with either the manager's per-node
/// secret (key id `manager`: everything) or the recovery-derived read
/// credential (key id `backup-reader`: list and fetch only).
#[derive(Clone)]
pub struct NodeClient {
    /// Node name (from configuration) or URL (restore, until the node says).
    pub label: String,
    url: String,
    key_id: &'static str,
    secret: Zeroizing<Vec<u8>>,
    http: reqwest::Client,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RemoteBackup {
    pub name: String,
    pub size: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RemoteListing {
    pub node: String,
    pub backups: Vec<RemoteBackup>,
}

impl NodeClient {
    /// `ca_pem`: the manager's `node_ca_cert` (see [`crate::nodecall::client`]).
    pub fn as_manager(node: &NodeConfig, ca_pem: &str) -> Result<NodeClient, BackupError> {
        Ok(NodeClient {
            label: node.name.clone(),
            url: node.url.trim_end_matches('/').to_string(),
            key_id: "manager",
            secret: Zeroizing::new(
                hex::decode(node.secret.expose())
                    .map_err(|_| BackupError::Db("node secret is not hex".into()))?,
            ),
            http: crate::nodecall::client(ca_pem)
                .map_err(|e| BackupError::Db(format!("node_ca_cert: {e}")))?,
        })
    }

    /// With the recovery key's read credential; `http` from
    /// [`crate::nodecall::restore_client`] when the cluster CA is unknown.
    pub fn as_reader(url: &str, key: &RecoveryKey, http: reqwest::Client) -> NodeClient {
        NodeClient {
            label: url.to_string(),
            url: url.trim_end_matches('/').to_string(),
            key_id: READER_KEY_ID,
            secret: Zeroizing::new(key.read_secret().to_vec()),
            http,
        }
    }

    fn signed(
        &self,
        method: reqwest::Method,
        path: &str,
        content_sha256: &str,
    ) -> crate::nodecall::Call {
        crate::nodecall::signed(
            &self.http,
            &self.url,
            &self.secret,
            self.key_id,
            method,
            path,
            content_sha256,
        )
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> BackupError {
        BackupError::Unreachable {
            node: self.label.clone(),
            message: e.to_string(),
        }
    }

    fn refused(&self, status: reqwest::StatusCode, body: &[u8]) -> BackupError {
        let (code, message) = crate::nodecall::refusal(body);
        BackupError::Node {
            node: self.label.clone(),
            status: status.as_u16(),
            code,
            message,
        }
    }

    /// A signed call whose whole answer is read and its MAC checked;
    /// returns the body of a success.
    async fn call_checked(
        &self,
        call: crate::nodecall::Call,
        timeout: Duration,
    ) -> Result<bytes::Bytes, BackupError> {
        let (status, body) = call
            .send_checked(&self.secret, timeout)
            .await
            .map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            return Err(self.refused(status, &body));
        }
        Ok(body)
    }

    pub async fn list(&self) -> Result<RemoteListing, BackupError> {
        let empty = shared::content_sha256_hex(b"");
        let body = self
            .call_checked(
                self.signed(reqwest::Method::GET, "/internal/v1/backups", &empty),
                Duration::from_secs(30),
            )
            .await?;
        serde_json::from_slice(&body).map_err(|e| self.unreachable(e))
    }

    pub async fn put(&self, name: &str, file: &Path) -> Result<(), BackupError> {
        let (_, sha) = parse_remote_name(name).expect("our own names parse");
        let f = tokio::fs::File::open(file).await?;
        let len = f.metadata().await?.len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
        let mut call = self.signed(
            reqwest::Method::PUT,
            &format!("/internal/v1/backups/{name}"),
            &sha.to_string(),
        );
        call.request = call
            .request
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body);
        self.call_checked(call, Duration::from_secs(60 + len / (1 << 20)))
            .await
            .map(drop)
    }

    /// Downloads `name` into `dest`, checking that its bytes hash to the
    /// name (a damaged copy is refused here, before any decryption).
    pub async fn fetch(&self, name: &str, dest: &Path) -> Result<(), BackupError> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let (_, sha) = parse_remote_name(name).ok_or_else(|| {
            BackupError::ManifestInvalid(format!("`{name}` is not a backup name"))
        })?;
        // A success's body is not MACed: it is checked against its name below.
        let empty = shared::content_sha256_hex(b"");
        let resp = self
            .signed(
                reqwest::Method::GET,
                &format!("/internal/v1/backups/{name}"),
                &empty,
            )
            .send_streamed(&self.secret, Duration::from_secs(3600))
            .await
            .map_err(|e| self.unreachable(e))?
            .map_err(|(status, body)| self.refused(status, &body))?;
        let mut guard = TempFile(Some(dest.to_path_buf()));
        let mut out = tokio::fs::File::create(dest).await?;
        let mut h = Sha256::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.unreachable(e))?;
            h.update(&chunk);
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        let actual = BlobId::from_hasher(h);
        if actual != sha {
            return Err(BackupError::HashMismatch {
                expected: sha.to_string(),
                actual: actual.to_string(),
            });
        }
        guard.disarm();
        Ok(())
    }

    pub async fn delete(&self, name: &str) -> Result<(), BackupError> {
        let empty = shared::content_sha256_hex(b"");
        self.call_checked(
            self.signed(
                reqwest::Method::DELETE,
                &format!("/internal/v1/backups/{name}"),
                &empty,
            ),
            Duration::from_secs(30),
        )
        .await
        .map(drop)
    }
}

// ---- retention ------------------------------------------------------------------

/// How many backups each grandfather-father-son tier keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub last: usize,
    pub hourly: usize,
    pub daily: usize,
    pub weekly: usize,
    pub monthly: usize,
}

/// Days since 1970-01-01 to (year, month 1-12, day), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DD HH:MM:SS UTC` for listings.
pub fn format_utc(t: i64) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(86_400));
    let s = t.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Which creation times to keep: the newest; the last `r.last`; and for each
/// tier, the newest backup in each of the `n` most recent hours / days /
/// weeks (Monday-based) / months (UTC) that have one. Everything else may go.
pub fn gfs_keep(times: &[i64], r: &Retention) -> BTreeSet<i64> {
    let mut sorted = times.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    let mut keep = BTreeSet::new();
    keep.extend(sorted.iter().take(r.last.max(1)));
    let day = |t: i64| t.div_euclid(86_400);
    let tiers: [(usize, &dyn Fn(i64) -> i64); 4] = [
        (r.hourly, &|t| t.div_euclid(3600)),
        (r.daily, &day),
        // 1970-01-01 was a Thursday: day -3 is the Monday of that week.
        (r.weekly, &|t| (day(t) + 3).div_euclid(7)),
        (r.monthly, &|t| {
            let (y, m, _) = civil_from_days(day(t));
            y * 12 + i64::from(m)
        }),
    ];
    for (n, bucket) in tiers {
        let mut last = None;
        let mut kept = 0;
        for &t in &sorted {
            let b = bucket(t);
            if last != Some(b) {
                last = Some(b);
                if kept == n {
                    break;
                }
                keep.insert(t);
                kept += 1;
            }
        }
    }
    keep
}

async fn prune_local(dir: &Path, r: &Retention) -> Result<usize, BackupError> {
    let _lock = lock_folder(dir).await?;
    Ok(prune_local_locked(dir, r))
}

fn prune_local_locked(dir: &Path, r: &Retention) -> usize {
    let local = list_local(dir);
    let keep = gfs_keep(&local.iter().map(|m| m.created_at).collect::<Vec<_>>(), r);
    let mut removed = 0;
    for m in local.iter().filter(|m| !keep.contains(&m.created_at)) {
        // Manifest first: without it the backup no longer counts.
        let _ = std::fs::remove_file(dir.join(format!("{}.json", m.id)));
        let _ = std::fs::remove_file(dir.join(format!("{}.db", m.id)));
        if let Some((_, p)) = find_sealed(dir, m.created_at) {
            let _ = std::fs::remove_file(p);
        }
        tracing::info!(backup = %m.id, "backup pruned (retention)");
        removed += 1;
    }
    removed
}

// ---- the off-machine side: push, prune on nodes ----------------------------------

/// The sealed copies' side of backups, when a recovery key is configured.
pub struct Offsite {
    key: RecoveryKey,
    nodes: Vec<NodeClient>,
    config_toml: Zeroizing<String>,
    retention: Retention,
}

impl Offsite {
    pub fn from_config(cfg: &Config) -> Result<Option<Offsite>, BackupError> {
        if cfg.backup.recovery_key.is_empty() {
            return Ok(None);
        }
        let key = RecoveryKey::parse(cfg.backup.recovery_key.expose())?;
        let nodes = cfg
            .backup
            .target_nodes(&cfg.nodes)
            .into_iter()
            .map(|n| NodeClient::as_manager(n, &cfg.node_ca_cert))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Offsite {
            key,
            nodes,
            config_toml: cfg.effective.to_toml().unwrap_or_default(),
            retention: cfg.backup.retention(),
        }))
    }

    /// Brings one node up to date: pushes every local backup it lacks, then
    /// prunes its copies by the same retention (never its newest). Returns
    /// the creation times the node holds afterwards.
    async fn sync_node(&self, dir: &Path, node: &NodeClient) -> Result<BTreeSet<i64>, BackupError> {
        let listing = node.list().await?;
        let mut remote: BTreeMap<i64, String> = listing
            .backups
            .iter()
            .filter_map(|b| parse_remote_name(&b.name).map(|(t, _)| (t, b.name.clone())))
            .collect();
        let local = list_local(dir);
        let mut first_error = None;
        for m in &local {
            if remote.contains_key(&m.created_at) {
                continue;
            }
            let (name, path) = ensure_sealed(dir, m, &self.config_toml, &self.key).await?;
            match node.put(&name, &path).await {
                Ok(()) => {
                    metrics::counter!("manager_backup_pushes_total", "node" => node.label.clone(), "result" => "stored").increment(1);
                    tracing::info!(node = %node.label, backup = %name, "sealed backup stored on node");
                    remote.insert(m.created_at, name);
                }
                Err(e) => {
                    metrics::counter!("manager_backup_pushes_total", "node" => node.label.clone(), "result" => "failed").increment(1);
                    tracing::warn!(node = %node.label, backup = %name, code = e.code(), "backup push failed (retried later): {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        let times: Vec<i64> = remote.keys().copied().collect();
        let mut keep = gfs_keep(&times, &self.retention);
        keep.extend(gfs_keep(
            &local.iter().map(|m| m.created_at).collect::<Vec<_>>(),
            &self.retention,
        ));
        for (t, name) in remote.clone() {
            if !keep.contains(&t) {
                match node.delete(&name).await {
                    Ok(()) => {
                        tracing::info!(node = %node.label, backup = %name, "backup pruned on node (retention)");
                        remote.remove(&t);
                    }
                    Err(e) => {
                        tracing::warn!(node = %node.label, backup = %name, "pruning on node failed: {e}")
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(remote.into_keys().collect()),
        }
    }

    /// Syncs every backup node; returns, per node, what it holds (or why not).
    pub async fn sync_all(&self, dir: &Path) -> Vec<(String, Result<BTreeSet<i64>, BackupError>)> {
        // Under the folder lock: a backup is sealed once (one name on every
        // node) even when `backup now` and the scheduler overlap.
        let _lock = match lock_folder(dir).await {
            Ok(l) => l,
            Err(e) => return vec![("local".into(), Err(e))],
        };
        let mut out = Vec::new();
        for n in &self.nodes {
            out.push((n.label.clone(), self.sync_node(dir, n).await));
        }
        out
    }
}

// ---- health, schedule -----------------------------------------------------------

/// The newest verified backup and whether it is too old; also sets the gauges.
pub fn health(cfg: &Config) -> serde_json::Value {
    let newest = list_local(&backups_dir(cfg)).into_iter().next();
    let age = newest
        .as_ref()
        .map(|m| (shared::runtime::unix_now() - m.created_at).max(0));
    let stale = age.is_none_or(|a| a > cfg.backup.max_age_secs as i64);
    metrics::gauge!("manager_backup_stale").set(if stale { 1.0 } else { 0.0 });
    if let (Some(m), Some(a)) = (&newest, age) {
        metrics::gauge!("manager_backup_newest_age_seconds").set(a as f64);
        metrics::gauge!("manager_backup_newest_timestamp_seconds").set(m.created_at as f64);
    }
    serde_json::json!({
        "newest": newest.as_ref().map(|m| m.id.clone()),
        "newest_age_secs": age,
        "max_age_secs": cfg.backup.max_age_secs,
        "stale": stale,
        "offsite": !cfg.backup.recovery_key.is_empty(),
    })
}

/// The scheduler inside `manager serve`: a backup when the newest is older
/// than `interval_secs` (at once on a fresh start), pushes and prunes every
/// `retry_secs`, and the too-old alert.
pub async fn run(db: SharedCatalog, cfg: Config, mut stop: tokio::sync::watch::Receiver<bool>) {
    let cfg = &cfg;
    let dir = backups_dir(cfg);
    let offsite = match Offsite::from_config(cfg) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("backups disabled: {e}");
            return;
        }
    };
    if offsite.is_none() {
        tracing::warn!("no backup.recovery_key: backups stay on this machine (see docs/backup.md)");
    }
    let mut last_alert: Option<Instant> = None;
    let mut synced: HashMap<String, i64> = HashMap::new();
    let worker = crate::workers::Worker::register("backup");
    loop {
        worker.started();
        let mut failed: Option<String> = None;
        let newest = list_local(&dir).first().map(|m| m.created_at);
        let due = newest
            .is_none_or(|t| shared::runtime::unix_now() - t >= cfg.backup.interval_secs as i64);
        if due {
            worker.progress("taking a backup");
            match take(&*db, &dir).await {
                Ok(_) => {
                    if let Err(e) = prune_local(&dir, &cfg.backup.retention()).await {
                        tracing::warn!("pruning local backups failed: {e}");
                    }
                }
                Err(e) => {
                    metrics::counter!("manager_backups_total", "result" => "failed").increment(1);
                    tracing::error!(code = e.code(), "scheduled backup failed: {e}");
                    failed = Some(format!("{}: {e}", e.code()));
                }
            }
        }
        if let Some(off) = &offsite {
            worker.progress("copying backups to the nodes");
            let newest = list_local(&dir).first().map(|m| m.created_at).unwrap_or(0);
            for (node, r) in off.sync_all(&dir).await {
                match r {
                    Ok(held) => {
                        if synced.insert(node.clone(), newest) != Some(newest) {
                            tracing::debug!(%node, held = held.len(), "backups in sync on node");
                        }
                        metrics::gauge!("manager_backup_node_has_newest", "node" => node)
                            .set(if held.contains(&newest) { 1.0 } else { 0.0 });
                    }
                    Err(e) => {
                        synced.remove(&node);
                        tracing::warn!(%node, code = e.code(), "backup copies on node not up to date: {e}");
                        failed.get_or_insert(format!("node {node}: {}: {e}", e.code()));
                    }
                }
            }
        }
        let h = health(cfg);
        if h["stale"] == true {
            let max_age = Duration::from_secs(cfg.backup.max_age_secs);
            if last_alert.is_none_or(|t| t.elapsed() >= max_age) {
                last_alert = Some(Instant::now());
                crate::alerts::raise(
                    "backup_stale",
                    "the newest verified backup is too old (or there is none)",
                    format!(
                        "newest={} age_secs={} max_age_secs={}",
                        h["newest"], h["newest_age_secs"], cfg.backup.max_age_secs
                    ),
                );
            }
        } else {
            last_alert = None;
        }
        worker.finished(failed.map_or(Ok(()), Err));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(cfg.backup.retry_secs)) => {}
            _ = stop.changed() => {
                worker.stopped();
                return;
            }
        }
    }
}

// ---- commands ---------------------------------------------------------------------

#[derive(Debug, clap::Subcommand)]
pub enum BackupCommand {
    /// Take a verified backup now, push it to the backup nodes and prune.
    Now,
    /// List the backups on this machine and on each backup node.
    List,
    /// Re-check every local backup (hash, integrity, row counts); with
    /// `--remote`, also download and check every copy on the nodes.
    Verify {
        #[arg(long)]
        remote: bool,
    },
    /// Restore the newest backup that verifies, fetched from the nodes. On
    /// an empty machine: `--node URL` (repeat) `--data-dir DIR
    /// --write-config FILE`, recovery key from `SLMEDIA_RECOVERY_KEY` or
    /// standard input.
    Restore {
        /// A node's base URL; repeat. Default: the nodes of `--config`.
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Where the restored database goes. Default: `data_dir` of `--config`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Without `--config`: write the configuration carried by the
        /// backup here (data_dir and node URLs updated), mode 0600.
        #[arg(long)]
        write_config: Option<PathBuf>,
        /// Listen address for the written configuration (default: as backed up).
        #[arg(long)]
        listen: Option<String>,
        /// Move an existing database aside (never deleted) instead of refusing.
        #[arg(long)]
        replace: bool,
        /// A PostgreSQL backup goes into this database (`postgres://…`,
        /// empty, or moved aside with --replace). Default: `database_url`
        /// of `--config`. Its role needs CREATEDB (the backup is checked
        /// in a scratch database first).
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Print a fresh recovery key (stdout) and the `backup_read_key` line
    /// for the nodes' configuration (stderr): for clusters set up before
    /// backups existed.
    Keygen,
}

/// Runs a `manager backup …` command. `config` is `--config` (restore works
/// without one).
pub async fn cli(cmd: BackupCommand, config: Option<&Path>) -> anyhow::Result<()> {
    match cmd {
        BackupCommand::Keygen => {
            let k = RecoveryKey::generate();
            println!("{}", k.encode().expose());
            eprintln!(
                "Keep this recovery key off this machine (password manager, paper in a safe).\n\
                 Add it to the manager's configuration:\n  [backup]\n  recovery_key = \"{}\"\n\
                 and to every view node's configuration:\n  backup_read_key = \"{}\"",
                k.encode().expose(),
                k.read_secret_hex().expose()
            );
            Ok(())
        }
        BackupCommand::Restore {
            nodes,
            data_dir,
            write_config,
            listen,
            replace,
            database_url,
        } => {
            let cfg = match config {
                Some(p) => Some(Config::load(Some(p))?),
                None => None,
            };
            restore(RestoreArgs {
                cfg,
                nodes,
                data_dir,
                write_config,
                listen,
                replace,
                database_url,
            })
            .await
        }
        cmd => {
            let cfg = Config::load(config)?;
            if catalog::is_postgres(&cfg.database_url) {
                // Dumps are checked by restoring them on the catalog's server.
                catalog::postgres::set_scratch_server(&cfg.database_url);
            }
            let dir = backups_dir(&cfg);
            match cmd {
                BackupCommand::Now => now(&cfg, &dir).await,
                BackupCommand::List => list(&cfg, &dir).await,
                BackupCommand::Verify { remote } => verify(&cfg, &dir, remote).await,
                _ => unreachable!("handled above"),
            }
        }
    }
}

async fn now(cfg: &Config, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let db = crate::catalog::open(&cfg.database_url).await?;
    let m = take(&*db, dir)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
    db.close().await;
    prune_local(dir, &cfg.backup.retention())
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
    println!("BACKUP {}", m.id);
    eprintln!(
        "verified: integrity ok, {} tables, {} rows, schema {}, {} bytes",
        m.tables.len(),
        m.tables.values().sum::<i64>(),
        m.schema_version,
        m.size
    );
    let Some(off) = Offsite::from_config(cfg)? else {
        eprintln!("warning: no backup.recovery_key configured: this backup stays on this machine");
        return Ok(());
    };
    // A few quick retries here; the running manager keeps retrying after.
    let mut held = HashMap::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(2 * attempt)).await;
        }
        for (node, r) in off.sync_all(dir).await {
            match r {
                Ok(times) if times.contains(&m.created_at) => {
                    held.insert(node, true);
                }
                Ok(_) => {}
                Err(e) => eprintln!("node {node}: {}: {e}", e.code()),
            }
        }
        if held.len() == off.nodes.len() {
            break;
        }
    }
    for n in &off.nodes {
        println!(
            "NODE {} {}",
            n.label,
            if held.contains_key(&n.label) {
                "stored"
            } else {
                "missing"
            }
        );
    }
    let need = 2.min(off.nodes.len());
    anyhow::ensure!(
        held.len() >= need,
        "backup {} is verified here but stored on only {} of {} backup nodes; the running manager retries every {} s",
        m.id,
        held.len(),
        off.nodes.len(),
        cfg.backup.retry_secs
    );
    Ok(())
}

async fn list(cfg: &Config, dir: &Path) -> anyhow::Result<()> {
    let local = list_local(dir);
    println!("local ({}):", dir.display());
    for m in &local {
        println!(
            "  {}  {}  schema {}  {} rows  {} bytes",
            m.id,
            format_utc(m.created_at),
            m.schema_version,
            m.tables.values().sum::<i64>(),
            m.size
        );
    }
    for n in &cfg.backup.target_nodes(&cfg.nodes) {
        let client = NodeClient::as_manager(n, &cfg.node_ca_cert)?;
        match client.list().await {
            Ok(l) => {
                println!("node {}:", n.name);
                for b in &l.backups {
                    let t = parse_remote_name(&b.name).map(|x| x.0).unwrap_or(0);
                    println!("  {}  {}  {} bytes", b.name, format_utc(t), b.size);
                }
            }
            Err(e) => println!("node {}: {}: {e}", n.name, e.code()),
        }
    }
    Ok(())
}

async fn verify(cfg: &Config, dir: &Path, remote: bool) -> anyhow::Result<()> {
    let checks = verify_copies(cfg, dir, remote).await?;
    let mut failures = 0;
    for c in &checks {
        // The lines scripts (and the drills) read.
        let place = match (c.location.as_str(), c.name.as_str()) {
            ("local", _) => format!("{} local", c.name),
            (node, "(listing)") => format!("node {node}"),
            (node, name) => format!("{name} on {node}"),
        };
        if c.ok {
            match &c.backup {
                Some(id) if c.location != "local" => println!("OK {place} (backup {id})"),
                _ => println!("OK {place}"),
            }
        } else {
            failures += 1;
            println!("FAILED {place}: {}", c.detail);
        }
    }
    anyhow::ensure!(
        failures == 0,
        "{failures} backup copies failed verification"
    );
    Ok(())
}

/// What a verification found of one copy of a backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyCheck {
    /// `local`, or the node's name (`node` when the node itself failed).
    pub location: String,
    /// The local backup id, or the node's name for the sealed copy.
    pub name: String,
    pub at: i64,
    pub ok: bool,
    pub detail: String,
    /// The backup a good copy holds.
    #[serde(default)]
    pub backup: Option<String>,
}

/// Re-checks every local backup (hash, integrity, row counts) and, with
/// `remote`, downloads, authenticates, decrypts and checks every copy on the
/// backup nodes. The results are also kept in `checks.json` beside the
/// backups, for the console's "verified when".
pub async fn verify_copies(
    cfg: &Config,
    dir: &Path,
    remote: bool,
) -> Result<Vec<CopyCheck>, BackupError> {
    let mut out = Vec::new();
    let check = |location: &str, name: &str, r: Result<String, BackupError>| CopyCheck {
        location: location.to_string(),
        name: name.to_string(),
        at: shared::runtime::unix_now(),
        ok: r.is_ok(),
        backup: r.as_ref().ok().cloned(),
        detail: match r {
            Ok(id) => format!("opens and matches its manifest (backup {id})"),
            Err(e) => format!("{}: {e}", e.code()),
        },
    };
    for m in list_local(dir) {
        let r = verify_db(&dir.join(format!("{}.db", m.id)), &m)
            .await
            .map(|()| m.id.clone());
        out.push(check("local", &m.id, r));
    }
    if remote {
        let key = RecoveryKey::parse(cfg.backup.recovery_key.expose())
            .map_err(|_| BackupError::NoRecoveryKey)?;
        let work = dir.join("tmp");
        ensure_dirs(dir)?;
        for n in &cfg.backup.target_nodes(&cfg.nodes) {
            let client = NodeClient::as_manager(n, &cfg.node_ca_cert)?;
            let listing = match client.list().await {
                Ok(l) => l,
                Err(e) => {
                    out.push(check(&n.name, "(listing)", Err(e)));
                    continue;
                }
            };
            for b in listing.backups {
                let r = fetch_and_open(&client, &b.name, &key, &work)
                    .await
                    .map(|(m, _, db)| {
                        let _ = std::fs::remove_file(db);
                        m.id
                    });
                out.push(check(&n.name, &b.name, r));
            }
        }
    }
    let mut kept = read_checks(dir);
    for c in &out {
        kept.insert(format!("{}/{}", c.location, c.name), c.clone());
    }
    if let Err(e) = write_checks(dir, &kept) {
        tracing::warn!("cannot keep the verification results: {e}");
    }
    Ok(out)
}

const CHECKS_FILE: &str = "checks.json";

/// The last verification of each copy, by `location/name`.
pub fn read_checks(dir: &Path) -> BTreeMap<String, CopyCheck> {
    std::fs::read(dir.join(CHECKS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_checks(dir: &Path, checks: &BTreeMap<String, CopyCheck>) -> std::io::Result<()> {
    // Copies no longer listed anywhere are dropped when the file passes a
    // few thousand entries: it is a convenience, not a record.
    let mut checks = checks.clone();
    while checks.len() > 5000 {
        let oldest = checks
            .iter()
            .min_by_key(|(_, c)| c.at)
            .map(|(k, _)| k.clone())
            .expect("not empty");
        checks.remove(&oldest);
    }
    ensure_dirs(dir)?;
    let tmp = dir
        .join("tmp")
        .join(format!("{CHECKS_FILE}.{}", uuid::Uuid::new_v4()));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(
            &mut f,
            &serde_json::to_vec_pretty(&checks).expect("serializes"),
        )?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(CHECKS_FILE))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Every backup node's listing, or why it could not be read. All nodes at
/// once, each given 5 s: a page must not hang on one node.
pub async fn node_listings(cfg: &Config) -> Vec<(String, Result<Vec<RemoteBackup>, String>)> {
    let asks = cfg
        .backup
        .target_nodes(&cfg.nodes)
        .into_iter()
        .map(|n| async move {
            let r = match NodeClient::as_manager(n, &cfg.node_ca_cert) {
                Ok(c) => match tokio::time::timeout(Duration::from_secs(5), c.list()).await {
                    Ok(r) => r
                        .map(|l| l.backups)
                        .map_err(|e| format!("{}: {e}", e.code())),
                    Err(_) => Err("no answer within 5 s".to_string()),
                },
                Err(e) => Err(format!("{}: {e}", e.code())),
            };
            (n.name.clone(), r)
        });
    futures::future::join_all(asks).await
}

/// A backup task an operator started from the console, and how it went.
#[derive(Debug, Clone, Serialize)]
pub struct ManualRun {
    /// `backup` or `verify`.
    pub what: &'static str,
    pub by: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// One line per step or copy; the first says whether it all went well.
    pub lines: Vec<String>,
    pub ok: Option<bool>,
}

static MANUAL: std::sync::Mutex<Option<ManualRun>> = std::sync::Mutex::new(None);

/// The last (or running) console task.
pub fn manual_run() -> Option<ManualRun> {
    MANUAL.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Starts "back up now" (`what = "backup"`: a verified backup, pruned, then
/// pushed to the backup nodes) or "verify copies" (`"verify"`: every local
/// copy and every copy on the nodes) in the background. `Err` with the
/// running task when one is still going: one at a time.
pub fn start_manual(
    db: SharedCatalog,
    cfg: Config,
    what: &'static str,
    by: &crate::catalog::User,
) -> Result<(), ManualRun> {
    {
        let mut m = MANUAL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = m.as_ref().filter(|r| r.finished_at.is_none()) {
            return Err(r.clone());
        }
        *m = Some(ManualRun {
            what,
            by: by.email.clone(),
            started_at: shared::runtime::unix_now(),
            finished_at: None,
            lines: Vec::new(),
            ok: None,
        });
    }
    let who = by.clone();
    tokio::spawn(async move {
        // The work in a task of its own: should it panic, the run is still
        // marked finished (failed), or every later start would be refused.
        let (db2, cfg2) = (db.clone(), cfg.clone());
        let work = tokio::spawn(async move { manual_work(&*db2, &cfg2, what).await });
        let (ok, lines) = match work.await {
            Ok(r) => r,
            Err(e) => (false, vec![format!("the task failed: {e}")]),
        };
        if !ok {
            tracing::warn!(
                what,
                "a backup task started from the console failed: {lines:?}"
            );
        }
        let outcome = format!(
            "{}: {}",
            if ok { "done" } else { "failed" },
            lines.first().map(String::as_str).unwrap_or("")
        );
        {
            let mut m = MANUAL.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = m.as_mut() {
                r.finished_at = Some(shared::runtime::unix_now());
                r.lines = lines;
                r.ok = Some(ok);
            }
        }
        let entry = crate::catalog::AuditEntry {
            actor_id: who.id,
            actor: &who.email,
            action: if what == "backup" {
                "backup_now_finished"
            } else {
                "backup_verify_finished"
            },
            target: "backups",
            detail: &outcome,
        };
        if let Err(e) = db.record_audit(&entry).await {
            tracing::warn!("the end of a console backup task is not in the audit log: {e}");
        }
    });
    Ok(())
}

async fn manual_work(db: &dyn Catalog, cfg: &Config, what: &str) -> (bool, Vec<String>) {
    let dir = backups_dir(cfg);
    if what == "backup" {
        return manual_backup(db, cfg, &dir).await;
    }
    match verify_copies(cfg, &dir, !cfg.backup.recovery_key.is_empty()).await {
        Ok(checks) => (
            checks.iter().all(|c| c.ok),
            checks
                .iter()
                .map(|c| {
                    format!(
                        "{} {} {}: {}",
                        if c.ok { "OK" } else { "FAILED" },
                        c.location,
                        c.name,
                        c.detail
                    )
                })
                .collect(),
        ),
        Err(e) => (false, vec![format!("{}: {e}", e.code())]),
    }
}

async fn manual_backup(db: &dyn Catalog, cfg: &Config, dir: &Path) -> (bool, Vec<String>) {
    let m = match take(db, dir).await {
        Ok(m) => m,
        Err(e) => return (false, vec![format!("backup failed: {}: {e}", e.code())]),
    };
    let mut lines = vec![format!(
        "backup {} taken and verified: {} tables, {} rows, {} bytes",
        m.id,
        m.tables.len(),
        m.tables.values().sum::<i64>(),
        m.size
    )];
    if let Err(e) = prune_local(dir, &cfg.backup.retention()).await {
        lines.push(format!("pruning local backups failed: {e}"));
    }
    let off = match Offsite::from_config(cfg) {
        Ok(Some(o)) => o,
        Ok(None) => {
            lines.push("no backup.recovery_key: this backup stays on this machine".into());
            return (true, lines);
        }
        Err(e) => {
            lines.push(format!("cannot reach the backup nodes: {}: {e}", e.code()));
            return (false, lines);
        }
    };
    let mut ok = true;
    for (node, r) in off.sync_all(dir).await {
        match r {
            Ok(held) if held.contains(&m.created_at) => lines.push(format!("node {node}: stored")),
            Ok(_) => {
                ok = false;
                lines.push(format!(
                    "node {node}: not stored (retried by the scheduler)"
                ))
            }
            Err(e) => {
                ok = false;
                lines.push(format!(
                    "node {node}: {}: {e} (retried by the scheduler)",
                    e.code()
                ))
            }
        }
    }
    (ok, lines)
}

/// Downloads, authenticates, decrypts and checks one remote backup; the
/// database is left at the returned path (in `work`).
async fn fetch_and_open(
    node: &NodeClient,
    name: &str,
    key: &RecoveryKey,
    work: &Path,
) -> Result<(Manifest, Zeroizing<String>, PathBuf), BackupError> {
    let tag = uuid::Uuid::new_v4();
    let sealed = work.join(format!("{name}.{tag}.sealed"));
    let db = work.join(format!("{name}.{tag}.db"));
    let _sealed_guard = TempFile(Some(sealed.clone()));
    node.fetch(name, &sealed).await?;
    let mut db_guard = TempFile(Some(db.clone()));
    let (m, c) = open_bundle(&sealed, name, key, &db).await?;
    db_guard.disarm();
    Ok((m, c, db))
}

pub struct RestoreArgs {
    pub cfg: Option<Config>,
    pub nodes: Vec<String>,
    pub data_dir: Option<PathBuf>,
    pub write_config: Option<PathBuf>,
    pub listen: Option<String>,
    pub replace: bool,
    /// Where a PostgreSQL backup goes ([`BackupCommand::Restore`]).
    pub database_url: Option<String>,
}

/// Restores the newest backup that verifies. Prints `SKIPPED <name> <node>
/// <code> <message>` for every copy that fails, and `RESTORED <id>`.
pub async fn restore(a: RestoreArgs) -> anyhow::Result<()> {
    let key = match &a.cfg {
        Some(c) if !c.backup.recovery_key.is_empty() => {
            RecoveryKey::parse(c.backup.recovery_key.expose())?
        }
        _ => read_recovery_key_from_operator()?,
    };
    let urls: Vec<String> = if a.nodes.is_empty() {
        a.cfg
            .as_ref()
            .map(|c| c.nodes.iter().map(|n| n.url.clone()).collect())
            .unwrap_or_default()
    } else {
        a.nodes.clone()
    };
    anyhow::ensure!(
        !urls.is_empty(),
        "name at least one node: `--node http://host:port`"
    );
    let data_dir = match (&a.data_dir, &a.cfg) {
        (Some(d), _) => d.clone(),
        (None, Some(c)) => c.data_dir.clone(),
        (None, None) => anyhow::bail!("`--data-dir` is needed without `--config`"),
    };
    if a.cfg.is_none() {
        let p = a
            .write_config
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("`--write-config FILE` is needed without `--config`"))?;
        anyhow::ensure!(
            !p.exists(),
            "{} exists; refusing to overwrite it",
            p.display()
        );
    }
    // A PostgreSQL backup goes into a database (checked for room by
    // `restore_into`); an SQLite one into data_dir.
    let pg_target = a.database_url.clone().or_else(|| {
        a.cfg
            .as_ref()
            .map(|c| c.database_url.clone())
            .filter(|u| catalog::is_postgres(u))
    });
    if let Some(url) = &pg_target {
        anyhow::ensure!(
            catalog::is_postgres(url),
            "`--database-url` names a PostgreSQL database (postgres://…)"
        );
        catalog::postgres::set_scratch_server(url);
    }
    let db_path = data_dir.join("manager.db");
    if pg_target.is_none() && db_path.exists() && !a.replace {
        anyhow::bail!(
            "{} exists; pass --replace to move it (and its -wal/-shm) aside and restore over it",
            db_path.display()
        );
    }
    // A manager still running on that file would go on writing to the
    // one moved aside: refused while one holds it, and held until the
    // restore is done so none starts meanwhile.
    let _claim = match &pg_target {
        None => catalog::claim_process(&format!("sqlite://{}", db_path.display()))?,
        Some(_) => None,
    };
    let dir = data_dir.join("backups");
    let work = dir.join("tmp");
    ensure_dirs(&dir)?;

    // Every node's list; a backup is a candidate once, with every node holding it.
    let mut by_time: BTreeMap<i64, Vec<(String, NodeClient)>> = BTreeMap::new();
    let mut node_names: HashMap<String, String> = HashMap::new();
    let http = match &a.cfg {
        Some(c) if !c.node_ca_cert.trim().is_empty() => crate::nodecall::client(&c.node_ca_cert)?,
        _ => crate::nodecall::restore_client(),
    };
    for url in &urls {
        let mut client = NodeClient::as_reader(url, &key, http.clone());
        match client.list().await {
            Ok(l) => {
                eprintln!("node {} ({url}): {} backup(s)", l.node, l.backups.len());
                node_names.insert(l.node.clone(), url.clone());
                client.label = l.node.clone();
                for b in l.backups {
                    if let Some((t, _)) = parse_remote_name(&b.name) {
                        by_time.entry(t).or_default().push((b.name, client.clone()));
                    }
                }
            }
            Err(e) => eprintln!("node {url}: {}: {e}", e.code()),
        }
    }
    let mut chosen = None;
    'outer: for (_, copies) in by_time.iter().rev() {
        for (name, node) in copies {
            match fetch_and_open(node, name, &key, &work).await {
                Ok(found) => {
                    chosen = Some((name.clone(), found));
                    break 'outer;
                }
                Err(e) => {
                    println!("SKIPPED {name} {} {} {e}", node.label, e.code());
                }
            }
        }
    }
    let Some((name, (m, config_toml, restored_db))) = chosen else {
        return Err(anyhow::anyhow!(
            "{}: {}",
            BackupError::NoVerifiedBackup.code(),
            BackupError::NoVerifiedBackup
        ));
    };
    let mut restored_guard = TempFile(Some(restored_db.clone()));

    // The rebuilt configuration is checked before anything is installed.
    let new_config = if a.cfg.is_none() {
        anyhow::ensure!(
            !config_toml.trim().is_empty(),
            "backup {} carries no configuration; pass --config with the manager's configuration",
            m.id
        );
        Some(rebuild_config(
            &config_toml,
            &data_dir,
            &node_names,
            a.listen.as_deref(),
            pg_target.as_deref(),
        )?)
    } else {
        None
    };

    let is_dump = catalog::postgres::is_dump(&restored_db);
    match (&pg_target, is_dump) {
        (None, true) => anyhow::bail!(
            "backup {} is of a PostgreSQL catalog: name the database it goes into with \
             --database-url postgres://… (an empty database; its role needs CREATEDB)",
            m.id
        ),
        (Some(_), false) => anyhow::bail!(
            "backup {} is of an SQLite catalog: restore it without --database-url \
             (and without a PostgreSQL database_url in --config)",
            m.id
        ),
        _ => {}
    }
    if let Some(target) = &pg_target {
        std::fs::create_dir_all(&data_dir)?;
        // Kept as this machine's first local backup, as below.
        let local_db = dir.join(format!("{}.db", m.id));
        if !local_db.exists() {
            commit_create_only(&restored_db, &local_db)?;
            let json = serde_json::to_vec_pretty(&m).expect("a manifest serializes");
            write_create_only(&dir, &format!("{}.json", m.id), &json)?;
        }
        restored_guard.disarm();
        let _ = std::fs::remove_file(&restored_db);
        catalog::postgres::restore_into(&local_db, target, m.created_at, a.replace).await?;
        return finish_restore(&a, new_config, &m, &name);
    }
    // Install: the old database (if any) aside, the new one in by rename.
    if db_path.exists() {
        let aside = data_dir.join(format!(
            "manager.db.before-restore-{}",
            shared::runtime::unix_now()
        ));
        std::fs::rename(&db_path, &aside)?;
        for ext in ["-wal", "-shm"] {
            let p = data_dir.join(format!("manager.db{ext}"));
            if p.exists() {
                std::fs::rename(&p, data_dir.join(format!("{}{ext}", aside.display())))?;
            }
        }
        eprintln!("moved the existing database aside to {}", aside.display());
    }
    // The verified file is kept as this machine's first local backup, and
    // copied into place as the database.
    let local_db = dir.join(format!("{}.db", m.id));
    if !local_db.exists() {
        commit_create_only(&restored_db, &local_db)?;
        let json = serde_json::to_vec_pretty(&m).expect("a manifest serializes");
        write_create_only(&dir, &format!("{}.json", m.id), &json)?;
    }
    restored_guard.disarm();
    let _ = std::fs::remove_file(&restored_db);
    let tmp_db = data_dir.join(format!("manager.db.restore-{}", uuid::Uuid::new_v4()));
    let mut tmp_guard = TempFile(Some(tmp_db.clone()));
    std::fs::copy(&local_db, &tmp_db)?;
    // Frozen before the database is put in place: a restore cut short never
    // leaves a live database that could refund views served in the gap.
    freeze_refunds(&tmp_db, m.created_at).await?;
    commit_create_only(&tmp_db, &db_path)?;
    tmp_guard.disarm();
    finish_restore(&a, new_config, &m, &name)
}

/// Writes the rebuilt configuration (if asked) and says what was restored.
fn finish_restore(
    a: &RestoreArgs,
    new_config: Option<Zeroizing<String>>,
    m: &Manifest,
    name: &str,
) -> anyhow::Result<()> {
    if let (Some(text), Some(path)) = (new_config, &a.write_config) {
        write_private(path, &text)?;
        Config::load(Some(path)).map_err(|e| {
            anyhow::anyhow!(
                "the rebuilt configuration {} does not load: {e:#}",
                path.display()
            )
        })?;
        eprintln!("wrote the manager's configuration to {}", path.display());
    }
    println!("RESTORED {} {name}", m.id);
    eprintln!(
        "restored backup {} of {} (schema {}, {} rows); start the manager now",
        m.id,
        format_utc(m.created_at),
        m.schema_version,
        m.tables.values().sum::<i64>()
    );
    Ok(())
}

/// Views the old manager recorded after the backup are not in the restored
/// books: refunds that could depend on them are frozen
/// (migrations/0007, `refund_freeze`). Opens the database as the manager
/// will, so its migrations run first.
async fn freeze_refunds(db_path: &Path, backup_at: i64) -> anyhow::Result<()> {
    let db = crate::catalog::open(&format!("sqlite://{}", db_path.display())).await?;
    db.freeze_refunds(backup_at, shared::runtime::unix_now())
        .await?;
    // Everything into the main file before it is renamed into place: the
    // WAL beside this temporary name would not follow it.
    db.checkpoint().await?;
    db.close().await;
    let mut wal = db_path.as_os_str().to_owned();
    wal.push("-wal");
    let wal = std::path::PathBuf::from(wal);
    // SQLite may still be removing its own WAL as the pool's last
    // connection closes on its worker thread: a file that vanishes between
    // looking and removing is the good outcome, not an error.
    match std::fs::metadata(&wal) {
        Ok(meta) => {
            anyhow::ensure!(
                meta.len() == 0,
                "{} still holds changes after the checkpoint",
                wal.display()
            );
            match std::fs::remove_file(&wal) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let mut shm = db_path.as_os_str().to_owned();
    shm.push("-shm");
    let _ = std::fs::remove_file(std::path::PathBuf::from(shm));
    eprintln!(
        "refunds of views bought before the backup are frozen until the nodes report past now (docs/backup.md)"
    );
    Ok(())
}

/// The backed-up configuration with this machine's folder and the node
/// addresses the operator gave (matched by the name each node reports).
fn rebuild_config(
    text: &str,
    data_dir: &Path,
    node_urls: &HashMap<String, String>,
    listen: Option<&str>,
    database_url: Option<&str>,
) -> anyhow::Result<Zeroizing<String>> {
    let mut t: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("the backed-up configuration does not parse: {e}"))?;
    let dir = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    t.insert(
        "data_dir".into(),
        toml::Value::String(dir.display().to_string()),
    );
    // The database the backup was restored into, and no other: the old
    // URL would start the manager on some other database.
    t.remove("database_url");
    if let Some(url) = database_url {
        t.insert("database_url".into(), toml::Value::String(url.to_string()));
    }
    if let Some(l) = listen {
        t.insert("listen".into(), toml::Value::String(l.to_string()));
    }
    if let Some(toml::Value::Array(nodes)) = t.get_mut("nodes") {
        for n in nodes.iter_mut() {
            if let Some(tbl) = n.as_table_mut() {
                let name = tbl
                    .get("name")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string();
                if let Some(url) = node_urls.get(&name) {
                    tbl.insert("url".into(), toml::Value::String(url.clone()));
                }
            }
        }
    }
    let body = toml::to_string(&t)?;
    Ok(Zeroizing::new(format!(
        "# Rebuilt by `manager backup restore` from the configuration carried by the backup.\n\
         # Holds secrets: keep it private.\n{body}"
    )))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Role;

    const H: i64 = 3600;
    const D: i64 = 86_400;

    fn r(last: usize, hourly: usize, daily: usize, weekly: usize, monthly: usize) -> Retention {
        Retention {
            last,
            hourly,
            daily,
            weekly,
            monthly,
        }
    }

    #[test]
    fn gfs_keeps_one_per_period_and_always_the_newest() {
        // 2026-03-02 00:00 UTC is a Monday.
        let t0 = 1_772_409_600;
        assert_eq!(format_utc(t0), "2026-03-02 00:00:00 UTC");
        // Every 20 minutes for three days.
        let times: Vec<i64> = (0..(3 * 72)).map(|i| t0 + i * 1200).collect();
        let newest = *times.last().unwrap();
        let keep = gfs_keep(&times, &r(1, 5, 0, 0, 0));
        // The newest, then the newest of each of the 4 hours before it.
        let want: BTreeSet<i64> = (0..5).map(|h| newest - h * H).collect();
        assert_eq!(keep, want);

        let keep = gfs_keep(&times, &r(1, 0, 3, 0, 0));
        let want: BTreeSet<i64> = (0..3).map(|d| newest - d * D).collect();
        assert_eq!(keep, want, "the last backup of each day");

        // Nothing kept by any tier: still the newest.
        assert_eq!(
            gfs_keep(&times, &r(0, 0, 0, 0, 0)),
            BTreeSet::from([newest])
        );
        assert_eq!(gfs_keep(&[], &r(3, 24, 7, 4, 12)), BTreeSet::new());
        // keep_last counts backups, not periods.
        let keep = gfs_keep(&times, &r(3, 0, 0, 0, 0));
        assert_eq!(keep, BTreeSet::from([newest, newest - 1200, newest - 2400]));
    }

    #[test]
    fn gfs_weeks_start_on_monday_and_months_follow_the_calendar() {
        let monday = 1_772_409_600; // 2026-03-02
                                    // Sunday 23:00 and Monday 01:00 are in different weeks.
        let times = [monday - 2 * H + H, monday + H];
        assert_eq!(gfs_keep(&times, &r(1, 0, 0, 2, 0)).len(), 2);
        assert_eq!(gfs_keep(&times, &r(1, 0, 0, 1, 0)).len(), 1);
        // 28 Feb and 1 Mar 2026 are different months; 1 and 31 Mar are not.
        let feb28 = monday - 2 * D;
        let mar1 = monday - D;
        let mar31 = monday + 29 * D;
        assert_eq!(format_utc(mar31), "2026-03-31 00:00:00 UTC");
        let keep = gfs_keep(&[feb28, mar1, mar31], &r(1, 0, 0, 0, 12));
        assert_eq!(keep, BTreeSet::from([feb28, mar31]));
        // Before 1970 too (div_euclid, not truncation).
        assert_eq!(format_utc(-1), "1969-12-31 23:59:59 UTC");
    }

    #[test]
    fn recovery_key_round_trips_and_catches_typos() {
        let k = RecoveryKey::generate();
        let text = k.encode();
        assert!(text.expose().starts_with("slmrk1-") && text.expose().len() == 79);
        let spaced: String = text
            .expose()
            .to_uppercase()
            .chars()
            .enumerate()
            .flat_map(|(i, c)| if i % 8 == 0 { vec![' ', c] } else { vec![c] })
            .collect();
        let back = RecoveryKey::parse(&spaced).unwrap();
        assert_eq!(back.seal_key().as_bytes(), k.seal_key().as_bytes());
        assert_ne!(
            k.seal_key().as_bytes(),
            k.read_secret().as_ref(),
            "independent keys"
        );
        let mut typo = text.expose().to_string().into_bytes();
        typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
        let e = RecoveryKey::parse(std::str::from_utf8(&typo).unwrap()).unwrap_err();
        assert_eq!(e.code(), "bad_recovery_key");
        assert!(e.to_string().contains("checksum"), "{e}");
        assert!(RecoveryKey::parse("hello").is_err());
        assert!(!format!("{k:?}").contains(&text.expose()[7..20]));
    }

    async fn temp_db() -> (tempfile::TempDir, SharedCatalog) {
        let d = tempfile::tempdir().unwrap();
        let db = crate::catalog::open(&format!("sqlite://{}", d.path().join("m.db").display()))
            .await
            .unwrap();
        db.create_account("a@example.com", "h", Role::Uploader, 0)
            .await
            .unwrap();
        (d, db)
    }

    #[tokio::test]
    async fn a_backup_is_verified_and_its_manifest_matches() {
        let (d, db) = temp_db().await;
        let dir = d.path().join("backups");
        let m = take(&*db, &dir).await.unwrap();
        assert_eq!(m.tables["users"], 1);
        assert!(m.tables.contains_key("assets") && m.tables.contains_key("_sqlx_migrations"));
        assert!(m.schema_version >= 3);
        let file = dir.join(format!("{}.db", m.id));
        verify_db(&file, &m).await.unwrap();
        // The copy is a rollback-journal file (header bytes 18/19 = 1), so it
        // opens read-only without -wal/-shm.
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!((bytes[18], bytes[19]), (1, 1));
        assert_eq!(list_local(&dir), vec![m.clone()]);
        // A second one gets a later, distinct time.
        let m2 = take(&*db, &dir).await.unwrap();
        assert!(m2.created_at > m.created_at);
        assert_eq!(list_local(&dir)[0], m2);
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn verify_fails_on_damage_and_on_a_lying_manifest() {
        let (d, db) = temp_db().await;
        let dir = d.path().join("backups");
        let m = take(&*db, &dir).await.unwrap();
        let file = dir.join(format!("{}.db", m.id));

        let mut wrong = m.clone();
        *wrong.tables.get_mut("users").unwrap() = 2;
        let e = verify_db(&file, &wrong).await.unwrap_err();
        assert_eq!(e.code(), "row_count_mismatch", "{e}");
        assert!(e.to_string().contains("users"), "{e}");

        let mut wrong = m.clone();
        wrong.schema_version += 1;
        assert_eq!(
            verify_db(&file, &wrong).await.unwrap_err().code(),
            "schema_version_mismatch"
        );

        let mut wrong = m.clone();
        wrong.id = format!("{}-{}", m.created_at + 1, m.sha256);
        assert_eq!(
            verify_db(&file, &wrong).await.unwrap_err().code(),
            "manifest_invalid"
        );

        // Zeroed 4 KiB: the hash says so.
        let mut bytes = std::fs::read(&file).unwrap();
        let at = bytes.len() / 2 / 4096 * 4096;
        bytes[at..at + 4096].fill(0);
        let damaged = d.path().join("damaged.db");
        std::fs::write(&damaged, &bytes).unwrap();
        assert_eq!(
            verify_db(&damaged, &m).await.unwrap_err().code(),
            "hash_mismatch"
        );
        // And integrity_check (or opening) catches it even with a matching hash.
        let (sha, size) = hash_file(&damaged).unwrap();
        let mut m_damaged = m.clone();
        m_damaged.sha256 = sha.clone();
        m_damaged.size = size;
        m_damaged.id = format!("{}-{sha}", m.created_at);
        let e = verify_db(&damaged, &m_damaged).await.unwrap_err();
        assert!(
            matches!(e.code(), "integrity_check_failed" | "row_count_mismatch"),
            "{}: {e}",
            e.code()
        );

        // A file that is no database at all.
        let junk = d.path().join("junk.db");
        std::fs::write(&junk, vec![0u8; 8192]).unwrap();
        let (sha, size) = hash_file(&junk).unwrap();
        let mut mj = m.clone();
        mj.sha256 = sha.clone();
        mj.size = size;
        mj.id = format!("{}-{sha}", m.created_at);
        assert_eq!(
            verify_db(&junk, &mj).await.unwrap_err().code(),
            "integrity_check_failed"
        );
    }

    #[tokio::test]
    async fn a_sealed_bundle_opens_only_whole_and_with_its_key() {
        let (d, db) = temp_db().await;
        let dir = d.path().join("backups");
        let m = take(&*db, &dir).await.unwrap();
        let key = RecoveryKey::generate();
        let (name, sealed) = ensure_sealed(&dir, &m, "listen = \"127.0.0.1:0\"\n", &key)
            .await
            .unwrap();
        assert_eq!(
            ensure_sealed(&dir, &m, "", &key).await.unwrap().0,
            name,
            "sealed once"
        );
        let (t, sha) = parse_remote_name(&name).unwrap();
        assert_eq!(t, m.created_at);
        assert_eq!(hash_file(&sealed).unwrap().0, sha.to_string());

        let out = d.path().join("out.db");
        let (back, cfg) = open_bundle(&sealed, &name, &key, &out).await.unwrap();
        assert_eq!(back, m);
        assert_eq!(cfg.as_str(), "listen = \"127.0.0.1:0\"\n");
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(dir.join(format!("{}.db", m.id))).unwrap()
        );
        std::fs::remove_file(&out).unwrap();

        // Another recovery key: refused, nothing written.
        let e = open_bundle(&sealed, &name, &RecoveryKey::generate(), &out)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "backup_unreadable", "{e}");
        assert!(!out.exists());
        // Renamed to another time: the asset id in the key derivation differs.
        let other = format!("{}-{sha}", m.created_at + 7);
        assert_eq!(
            open_bundle(&sealed, &other, &key, &out)
                .await
                .unwrap_err()
                .code(),
            "backup_unreadable"
        );
        // Zeroed bytes, truncation.
        let mut bytes = std::fs::read(&sealed).unwrap();
        let at = bytes.len() / 2;
        let end = (at + 4096).min(bytes.len());
        bytes[at..end].fill(0);
        let bad = d.path().join("bad.sealed");
        std::fs::write(&bad, &bytes).unwrap();
        assert_eq!(
            open_bundle(&bad, &name, &key, &out)
                .await
                .unwrap_err()
                .code(),
            "backup_unreadable"
        );
        let bytes = std::fs::read(&sealed).unwrap();
        std::fs::write(&bad, &bytes[..bytes.len() - 100]).unwrap();
        assert_eq!(
            open_bundle(&bad, &name, &key, &out)
                .await
                .unwrap_err()
                .code(),
            "backup_unreadable"
        );
        assert!(!out.exists());
    }

    #[test]
    fn a_bundle_head_that_is_not_ours_is_refused() {
        assert!(matches!(parse_head(b"SLMB"), Ok(None)));
        assert_eq!(
            parse_head(b"NOTABKUP....").unwrap_err().code(),
            "manifest_invalid"
        );
        let mut b = BUNDLE_MAGIC.to_vec();
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_head(&b).unwrap_err().code(), "manifest_invalid");
        let mut b = BUNDLE_MAGIC.to_vec();
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(b"{}");
        b.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(parse_head(&b).unwrap_err().code(), "manifest_invalid");
    }

    #[tokio::test]
    async fn health_reports_the_newest_backup_and_alerts_when_it_is_too_old() {
        let (d, db) = temp_db().await;
        let mut cfg = Config {
            data_dir: d.path().to_path_buf(),
            ..Config::default()
        };
        let h = health(&cfg);
        assert_eq!(
            (h["stale"].clone(), h["newest"].clone()),
            (true.into(), serde_json::Value::Null)
        );
        let m = take(&*db, &backups_dir(&cfg)).await.unwrap();
        let h = health(&cfg);
        assert_eq!(h["newest"], m.id.as_str());
        assert_eq!(h["stale"], false);
        assert!(h["newest_age_secs"].as_i64().unwrap() <= 1);
        cfg.backup.max_age_secs = 0;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(health(&cfg)["stale"], true);
    }

    #[test]
    fn backup_settings_are_checked_and_name_their_field() {
        // Through serde, as the configuration file gives it.
        let node = |name: &str| -> NodeConfig {
            serde_json::from_value(serde_json::json!({
                "name": name, "url": "http://127.0.0.1:1", "lat": 0.0, "lon": 0.0,
                "secret": "00".repeat(16),
            }))
            .unwrap()
        };
        let nodes = [node("utah"), node("toronto")];
        let ok = BackupConfig::default();
        assert!(ok.validate(&nodes).is_ok());
        let field = |c: BackupConfig| c.validate(&nodes).unwrap_err().0;
        assert_eq!(
            field(BackupConfig {
                interval_secs: 5,
                ..ok.clone()
            }),
            "interval_secs"
        );
        assert_eq!(
            field(BackupConfig {
                max_age_secs: 60,
                ..ok.clone()
            }),
            "max_age_secs"
        );
        assert_eq!(
            field(BackupConfig {
                keep_last: 0,
                ..ok.clone()
            }),
            "keep_last"
        );
        let one = BackupNodes::Named(vec!["utah".into()]);
        assert_eq!(
            field(BackupConfig {
                nodes: one,
                ..ok.clone()
            }),
            "nodes"
        );
        let unknown = BackupNodes::Named(vec!["utah".into(), "mars".into()]);
        assert_eq!(
            field(BackupConfig {
                nodes: unknown,
                ..ok.clone()
            }),
            "nodes"
        );
        let bad_key = Secret::new("slmrk1-00");
        assert_eq!(
            field(BackupConfig {
                recovery_key: bad_key,
                ..ok.clone()
            }),
            "recovery_key"
        );
        let nodes_all: BackupNodes = serde_json::from_str("\"all\"").unwrap();
        assert_eq!(nodes_all, BackupNodes::All);
        assert!(serde_json::from_str::<BackupNodes>("\"some\"").is_err());
        assert_eq!(
            serde_json::from_str::<BackupNodes>("[\"utah\",\"toronto\"]").unwrap(),
            BackupNodes::Named(vec!["utah".into(), "toronto".into()])
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backups_taken_during_writes_match_their_counts() {
        let (d, db) = temp_db().await;
        let dir = d.path().join("backups");
        let writer = {
            let db = db.clone();
            tokio::spawn(async move {
                for i in 0..100_000 {
                    let uid = db
                        .create_account(&format!("u{i}@example.com"), "h", Role::Uploader, 0)
                        .await
                        .unwrap();
                    db.insert_api_token(&format!("t{i}"), uid, "x")
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut seen = BTreeSet::new();
        for _ in 0..3 {
            let m = take(&*db, &dir).await.unwrap();
            verify_db(&dir.join(format!("{}.db", m.id)), &m)
                .await
                .unwrap();
            seen.insert(m.tables["users"]);
        }
        writer.abort();
        assert!(seen.len() >= 2, "writes went on between backups: {seen:?}");
    }
}
