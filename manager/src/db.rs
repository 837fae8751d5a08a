//! The catalog database. Every query lives here so the SQL is in one place
//! when PostgreSQL support arrives; callers see typed rows.

use std::str::FromStr;

use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    FromRow, SqlitePool,
};

pub type Db = SqlitePool;

pub use shared::runtime::unix_now as now;

/// Opens the database and applies migrations. WAL with `synchronous=FULL`:
/// an acknowledged upload or payment survives a power cut.
pub async fn open(url: &str) -> anyhow::Result<Db> {
    let opts = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(std::time::Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(opts)
        .await?;
    sqlx::migrate!("./migrations").run(&pool).await?;
    Ok(pool)
}

/// `PRAGMA quick_check` on an existing database before anything migrates
/// or writes to it. A missing file is a fresh start, not damage.
pub async fn quick_check(url: &str) -> anyhow::Result<()> {
    use sqlx::{ConnectOptions, Connection};
    let opts = SqliteConnectOptions::from_str(url)?;
    if !opts.get_filename().exists() {
        return Ok(());
    }
    let mut conn = opts
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("the database does not open: {e}"))?;
    let rows: Result<Vec<(String,)>, _> = sqlx::query_as("PRAGMA quick_check")
        .fetch_all(&mut conn)
        .await;
    let _ = conn.close().await;
    let rows = rows.map_err(|e| anyhow::anyhow!("quick_check could not run: {e}"))?;
    if rows.len() == 1 && rows[0].0 == "ok" {
        return Ok(());
    }
    let mut text = rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("; ");
    text.truncate(400);
    anyhow::bail!("quick_check found damage: {text}")
}

#[derive(Debug, Clone, FromRow)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub password_hash: String,
    pub role: String,
}

impl User {
    pub fn is_operator(&self) -> bool {
        self.role == "operator"
    }
}

#[derive(Debug, Clone, FromRow)]
pub struct Asset {
    pub id: String,
    pub owner_id: i64,
    pub title: String,
    pub state: crate::domain::AssetState,
    pub progress: f64,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub source_name: String,
    pub source_bytes: i64,
    pub blob_id: Option<String>,
    pub sealed_len: Option<i64>,
    pub plain_len: Option<i64>,
    pub wrapped_key: Option<Vec<u8>>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub duration_secs: Option<f64>,
    pub created_at: i64,
    pub attempts: i64,
    /// Credits per view; 0 = free.
    pub price: i64,
    /// See migrations/0007: grant-less tokens older than this are refused
    /// while the movie has a price.
    pub price_epoch: i64,
}

#[derive(Debug, Clone, FromRow)]
pub struct Replica {
    pub asset_id: String,
    pub node: String,
    /// What the copy is (migrations/0004_mirrors.sql says what each means).
    pub state: crate::domain::ReplicaState,
    pub attempts: i64,
    pub last_error: Option<String>,
    /// Last time this copy was proven intact (push or the node's scrub).
    pub verified_at: Option<i64>,
}

// ---- users, sessions, tokens ----------------------------------------------

pub async fn create_user(
    db: &Db,
    email: &str,
    password_hash: &str,
    role: &str,
) -> sqlx::Result<i64> {
    let r = sqlx::query(
        "INSERT INTO users (email, password_hash, role, created_at) VALUES (?, ?, ?, ?)",
    )
    .bind(email)
    .bind(password_hash)
    .bind(role)
    .bind(now())
    .execute(db)
    .await?;
    Ok(r.last_insert_rowid())
}

pub async fn set_password(db: &Db, email: &str, password_hash: &str) -> sqlx::Result<bool> {
    let r = sqlx::query("UPDATE users SET password_hash = ? WHERE email = ?")
        .bind(password_hash)
        .bind(email)
        .execute(db)
        .await?;
    Ok(r.rows_affected() == 1)
}

pub async fn user_by_email(db: &Db, email: &str) -> sqlx::Result<Option<User>> {
    sqlx::query_as("SELECT id, email, password_hash, role FROM users WHERE email = ?")
        .bind(email)
        .fetch_optional(db)
        .await
}

pub async fn insert_session(
    db: &Db,
    token_hash: &str,
    user_id: i64,
    csrf: &str,
    expires_at: i64,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO sessions (token_hash, user_id, csrf, expires_at) VALUES (?, ?, ?, ?)")
        .bind(token_hash)
        .bind(user_id)
        .bind(csrf)
        .bind(expires_at)
        .execute(db)
        .await?;
    Ok(())
}

pub async fn delete_session(db: &Db, token_hash: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM sessions WHERE token_hash = ?")
        .bind(token_hash)
        .execute(db)
        .await?;
    Ok(())
}

/// The user behind a live session, with the session's CSRF token.
pub async fn session_user(db: &Db, token_hash: &str) -> sqlx::Result<Option<(User, String)>> {
    let row: Option<(i64, String, String, String, String)> = sqlx::query_as(
        "SELECT u.id, u.email, u.password_hash, u.role, s.csrf FROM sessions s
         JOIN users u ON u.id = s.user_id WHERE s.token_hash = ? AND s.expires_at > ?",
    )
    .bind(token_hash)
    .bind(now())
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(id, email, password_hash, role, csrf)| {
        (
            User {
                id,
                email,
                password_hash,
                role,
            },
            csrf,
        )
    }))
}

pub async fn insert_api_token(
    db: &Db,
    token_hash: &str,
    user_id: i64,
    label: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO api_tokens (token_hash, user_id, label, created_at) VALUES (?, ?, ?, ?)",
    )
    .bind(token_hash)
    .bind(user_id)
    .bind(label)
    .bind(now())
    .execute(db)
    .await?;
    Ok(())
}

pub async fn api_token_user(db: &Db, token_hash: &str) -> sqlx::Result<Option<User>> {
    sqlx::query_as(
        "SELECT u.id, u.email, u.password_hash, u.role FROM api_tokens t
         JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?",
    )
    .bind(token_hash)
    .fetch_optional(db)
    .await
}

// ---- assets ------------------------------------------------------------------

const ASSET_COLS: &str = "id, owner_id, title, state, progress, error_code, error_message, source_name,
    source_bytes, blob_id, sealed_len, plain_len, wrapped_key, width, height, duration_secs, created_at, attempts,
    price, price_epoch";

pub async fn insert_asset(
    db: &Db,
    id: &str,
    owner_id: i64,
    title: &str,
    source_name: &str,
    source_bytes: i64,
) -> sqlx::Result<()> {
    let t = now();
    sqlx::query(
        "INSERT INTO assets (id, owner_id, title, state, source_name, source_bytes, created_at, updated_at)
         VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
    )
    .bind(id)
    .bind(owner_id)
    .bind(title)
    .bind(source_name)
    .bind(source_bytes)
    .bind(t)
    .bind(t)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn asset(db: &Db, id: &str) -> sqlx::Result<Option<Asset>> {
    sqlx::query_as(&format!("SELECT {ASSET_COLS} FROM assets WHERE id = ?"))
        .bind(id)
        .fetch_optional(db)
        .await
}

pub async fn published_assets(db: &Db, limit: i64) -> sqlx::Result<Vec<Asset>> {
    sqlx::query_as(&format!(
        "SELECT {ASSET_COLS} FROM assets WHERE state = 'published' ORDER BY created_at DESC LIMIT ?"
    ))
    .bind(limit)
    .fetch_all(db)
    .await
}

pub async fn assets_of(db: &Db, owner_id: i64, limit: i64) -> sqlx::Result<Vec<Asset>> {
    sqlx::query_as(&format!(
        "SELECT {ASSET_COLS} FROM assets WHERE owner_id = ? ORDER BY created_at DESC LIMIT ?"
    ))
    .bind(owner_id)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Takes the oldest due job under a lease of `lease_secs`, in one statement
/// so two workers (or two managers on one database) never take the same
/// job. A job whose lease ran out (its worker died) is taken up again.
pub async fn claim_next(db: &Db, lease_secs: i64) -> sqlx::Result<Option<Asset>> {
    let t = now();
    sqlx::query_as(&format!(
        "UPDATE assets SET state = 'probing', progress = 0, lease_until = ?, updated_at = ?
         WHERE id = (SELECT id FROM assets
                     WHERE (state = 'queued' AND next_try <= ?)
                        OR (state IN ('probing', 'transcoding', 'sealing') AND lease_until < ?)
                     ORDER BY created_at, id LIMIT 1)
         RETURNING {ASSET_COLS}"
    ))
    .bind(t + lease_secs)
    .bind(t)
    .bind(t)
    .bind(t)
    .fetch_optional(db)
    .await
}

/// Extends a job's lease; returns whether its cancel was requested.
pub async fn renew_lease(db: &Db, id: &str, lease_secs: i64) -> sqlx::Result<bool> {
    let row: Option<(i64,)> =
        sqlx::query_as("UPDATE assets SET lease_until = ? WHERE id = ? RETURNING cancel_requested")
            .bind(now() + lease_secs)
            .bind(id)
            .fetch_optional(db)
            .await?;
    Ok(matches!(row, Some((1,))))
}

/// Moves a transcoded job to `sealing` unless its cancel was requested, in
/// one statement: a cancel that arrives at any moment before is honoured
/// (`false`), one after finds the job past cancelling (`TooLate`).
pub async fn start_sealing(db: &Db, id: &str) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE assets SET state = 'sealing', progress = 0, updated_at = ?
         WHERE id = ? AND state = 'transcoding' AND cancel_requested = 0",
    )
    .bind(now())
    .bind(id)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

pub async fn cancel_requested(db: &Db, id: &str) -> sqlx::Result<bool> {
    let row: Option<(i64,)> = sqlx::query_as("SELECT cancel_requested FROM assets WHERE id = ?")
        .bind(id)
        .fetch_optional(db)
        .await?;
    Ok(matches!(row, Some((1,))))
}

/// Puts a job back in the queue at once, without counting an attempt
/// (graceful shutdown interrupted it).
pub async fn requeue(db: &Db, id: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE assets SET state = 'queued', progress = 0, lease_until = 0, updated_at = ? WHERE id = ?")
        .bind(now())
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It had not started: it is now `rejected` with code `cancelled`.
    Cancelled,
    /// A worker has it; it stops within a second or two.
    Requested,
    /// Sealed already (replicating, published) or finished.
    TooLate,
}

pub async fn request_cancel(db: &Db, id: &str) -> sqlx::Result<CancelOutcome> {
    let r = sqlx::query(
        "UPDATE assets SET state = 'rejected', error_code = 'cancelled', error_message = 'Cancelled by its uploader.',
         updated_at = ? WHERE id = ? AND state = 'queued'",
    )
    .bind(now())
    .bind(id)
    .execute(db)
    .await?;
    if r.rows_affected() == 1 {
        return Ok(CancelOutcome::Cancelled);
    }
    let r = sqlx::query(
        "UPDATE assets SET cancel_requested = 1, updated_at = ? WHERE id = ? AND state IN ('probing', 'transcoding')",
    )
    .bind(now())
    .bind(id)
    .execute(db)
    .await?;
    Ok(if r.rows_affected() == 1 {
        CancelOutcome::Requested
    } else {
        CancelOutcome::TooLate
    })
}

/// Operator retry of a job that failed for an internal reason (its source
/// is kept for this). Returns whether it was requeued.
pub async fn retry_failed(db: &Db, id: &str) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE assets SET state = 'queued', attempts = 0, next_try = 0, lease_until = 0, progress = 0,
         error_code = NULL, error_message = NULL, cancel_requested = 0, updated_at = ?
         WHERE id = ? AND state = 'rejected' AND error_code = 'processing_failed'",
    )
    .bind(now())
    .bind(id)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Puts a job that failed for an internal reason back in the queue after
/// `delay_secs`; returns how many attempts it has now had.
pub async fn retry_later(db: &Db, id: &str, delay_secs: i64) -> sqlx::Result<i64> {
    let t = now();
    let (attempts,): (i64,) = sqlx::query_as(
        "UPDATE assets SET state = 'queued', progress = 0, attempts = attempts + 1, next_try = ?, updated_at = ?
         WHERE id = ? RETURNING attempts",
    )
    .bind(t + delay_secs)
    .bind(t)
    .bind(id)
    .fetch_one(db)
    .await?;
    Ok(attempts)
}

/// Work interrupted by a crash or shutdown restarts from the top: staging
/// keeps the source until sealing commits, so nothing is lost.
pub async fn requeue_interrupted(db: &Db) -> sqlx::Result<u64> {
    let r = sqlx::query(
        "UPDATE assets SET state = 'queued', progress = 0, lease_until = 0, updated_at = ?
         WHERE state IN ('probing', 'transcoding', 'sealing')",
    )
    .bind(now())
    .execute(db)
    .await?;
    Ok(r.rows_affected())
}

/// Moves a job to its next step. Only a worker holding the job calls it.
pub async fn set_state(db: &Db, id: &str, state: crate::domain::AssetState) -> sqlx::Result<()> {
    sqlx::query("UPDATE assets SET state = ?, progress = 0, updated_at = ? WHERE id = ?")
        .bind(state)
        .bind(now())
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

pub async fn set_progress(db: &Db, id: &str, progress: f64) -> sqlx::Result<()> {
    sqlx::query("UPDATE assets SET progress = ?, updated_at = ? WHERE id = ?")
        .bind(progress)
        .bind(now())
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

pub async fn reject(db: &Db, id: &str, code: &str, message: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE assets SET state = 'rejected', error_code = ?, error_message = ?, progress = 0, updated_at = ?
         WHERE id = ?",
    )
    .bind(code)
    .bind(message)
    .bind(now())
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn set_media_info(
    db: &Db,
    id: &str,
    width: u32,
    height: u32,
    duration: f64,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE assets SET width = ?, height = ?, duration_secs = ?, updated_at = ? WHERE id = ?",
    )
    .bind(width as i64)
    .bind(height as i64)
    .bind(duration)
    .bind(now())
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// Records the sealed blob and creates one pending replica per node, in one
/// transaction: either the asset is ready to replicate or nothing changed.
pub async fn record_sealed(
    db: &Db,
    id: &str,
    blob_id: &str,
    sealed_len: u64,
    plain_len: u64,
    wrapped_key: &[u8],
    nodes: &[String],
) -> sqlx::Result<()> {
    let t = now();
    let mut tx = db.begin().await?;
    sqlx::query(
        "UPDATE assets SET state = 'replicating', progress = 0, blob_id = ?, sealed_len = ?, plain_len = ?,
         wrapped_key = ?, updated_at = ? WHERE id = ?",
    )
    .bind(blob_id)
    .bind(sealed_len as i64)
    .bind(plain_len as i64)
    .bind(wrapped_key)
    .bind(t)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    for n in nodes {
        sqlx::query(
            "INSERT INTO replicas (asset_id, node, state, updated_at) VALUES (?, ?, 'pending', ?)
             ON CONFLICT (asset_id, node) DO NOTHING",
        )
        .bind(id)
        .bind(n)
        .bind(t)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

pub async fn replicas(db: &Db, asset_id: &str) -> sqlx::Result<Vec<Replica>> {
    sqlx::query_as(
        "SELECT asset_id, node, state, attempts, last_error, verified_at FROM replicas WHERE asset_id = ? ORDER BY node",
    )
    .bind(asset_id)
    .fetch_all(db)
    .await
}

/// Replicas not yet verified whose retry time has come, for assets that
/// still have their sealed blob in the outbox.
pub async fn due_replicas(db: &Db) -> sqlx::Result<Vec<Replica>> {
    sqlx::query_as(
        "SELECT r.asset_id, r.node, r.state, r.attempts, r.last_error, r.verified_at FROM replicas r
         JOIN assets a ON a.id = r.asset_id
         WHERE r.state IN ('pending', 'failed', 'repairing') AND r.next_try <= ?
           AND a.state IN ('replicating', 'published')
         ORDER BY r.next_try LIMIT 100",
    )
    .bind(now())
    .fetch_all(db)
    .await
}

pub async fn replica_verified(db: &Db, asset_id: &str, node: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE replicas SET state = 'verified', last_error = NULL, attempts = attempts + 1, updated_at = ?,
         verified_at = ? WHERE asset_id = ? AND node = ?",
    )
    .bind(now())
    .bind(now())
    .bind(asset_id)
    .bind(node)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn replica_failed(
    db: &Db,
    asset_id: &str,
    node: &str,
    error: &str,
    next_try: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE replicas SET state = CASE WHEN state = 'repairing' THEN 'repairing' ELSE 'failed' END,
         last_error = ?, attempts = attempts + 1, next_try = ?, updated_at = ?
         WHERE asset_id = ? AND node = ?",
    )
    .bind(error)
    .bind(next_try)
    .bind(now())
    .bind(asset_id)
    .bind(node)
    .execute(db)
    .await?;
    Ok(())
}

/// Publishes the asset if enough verified copies exist. Returns whether
/// *this* call published it (so it is logged and counted once). The count
/// and the state change happen in one statement, so "published" can never
/// be observed with too few copies.
pub async fn publish_if_replicated(
    db: &Db,
    asset_id: &str,
    min_replicas: usize,
) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE assets SET state = 'published', updated_at = ?
         WHERE id = ? AND state = 'replicating'
           AND (SELECT COUNT(*) FROM replicas WHERE asset_id = ? AND state = 'verified') >= ?",
    )
    .bind(now())
    .bind(asset_id)
    .bind(asset_id)
    .bind(min_replicas as i64)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

pub async fn all_verified(db: &Db, asset_id: &str) -> sqlx::Result<bool> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM replicas WHERE asset_id = ? AND state NOT IN ('verified', 'retired')",
    )
    .bind(asset_id)
    .fetch_one(db)
    .await?;
    Ok(n == 0)
}

// ---- mirrors: reconciliation and repair (issue 5) --------------------------

/// An asset whose sealed blob should be on the nodes.
#[derive(Debug, Clone, FromRow)]
pub struct MirroredAsset {
    pub id: String,
    pub state: String,
    pub blob_id: String,
    pub sealed_len: i64,
}

pub async fn mirrored_assets(db: &Db) -> sqlx::Result<Vec<MirroredAsset>> {
    sqlx::query_as(
        "SELECT id, state, blob_id, COALESCE(sealed_len, 0) AS sealed_len FROM assets
         WHERE blob_id IS NOT NULL AND state IN ('replicating', 'published', 'damaged')",
    )
    .fetch_all(db)
    .await
}

/// Every blob name any asset refers to (whatever its state).
pub async fn referenced_blobs(db: &Db) -> sqlx::Result<std::collections::HashSet<String>> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT blob_id FROM assets WHERE blob_id IS NOT NULL")
            .fetch_all(db)
            .await?;
    Ok(rows.into_iter().map(|(b,)| b).collect())
}

/// Replicas of the assets in [`mirrored_assets`].
pub async fn mirrored_replicas(db: &Db) -> sqlx::Result<Vec<Replica>> {
    sqlx::query_as(
        "SELECT r.asset_id, r.node, r.state, r.attempts, r.last_error, r.verified_at FROM replicas r
         JOIN assets a ON a.id = r.asset_id
         WHERE a.blob_id IS NOT NULL AND a.state IN ('replicating', 'published', 'damaged')",
    )
    .fetch_all(db)
    .await
}

/// Replicas on nodes no longer configured stop being retried or counted;
/// every configured node gets a replica row for every mirrored asset (a
/// node added later, or one that comes back, is filled like any other).
/// Returns (retired, created or revived).
pub async fn sync_replica_nodes(db: &Db, nodes: &[String]) -> sqlx::Result<(u64, u64)> {
    let t = now();
    let mut tx = db.begin().await?;
    let list = serde_json::to_string(nodes).expect("names serialise");
    let retired = sqlx::query(
        "UPDATE replicas SET state = 'retired', last_error = 'node removed from the configuration',
         updated_at = ? WHERE state != 'retired' AND node NOT IN (SELECT value FROM json_each(?))",
    )
    .bind(t)
    .bind(&list)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let added = sqlx::query(
        "INSERT INTO replicas (asset_id, node, state, updated_at)
         SELECT a.id, n.value, 'pending', ? FROM assets a, json_each(?) n
         WHERE a.blob_id IS NOT NULL AND a.state IN ('replicating', 'published', 'damaged')
         ON CONFLICT (asset_id, node) DO UPDATE SET state = 'pending', attempts = 0, next_try = 0,
             last_error = NULL, updated_at = excluded.updated_at
         WHERE replicas.state = 'retired'",
    )
    .bind(t)
    .bind(&list)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok((retired, added))
}

/// A verified copy turned out gone or quarantined: it is to be refilled at
/// once. Only a copy last verified before `observed_before` (when the
/// evidence was gathered) is downgraded, so a push that completed while an
/// inventory was in flight is not undone. Returns whether it changed.
pub async fn replica_lost(
    db: &Db,
    asset_id: &str,
    node: &str,
    reason: &str,
    observed_before: i64,
) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE replicas SET state = 'repairing', last_error = ?, attempts = 0, next_try = 0, updated_at = ?
         WHERE asset_id = ? AND node = ? AND state = 'verified' AND COALESCE(verified_at, 0) < ?",
    )
    .bind(reason)
    .bind(now())
    .bind(asset_id)
    .bind(node)
    .bind(observed_before)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A node reports it quarantined `blob`: every replica of it there goes to
/// `repairing`. Returns the assets concerned.
pub async fn replicas_quarantined(
    db: &Db,
    node: &str,
    blob_id: &str,
    reason: &str,
) -> sqlx::Result<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "UPDATE replicas SET state = 'repairing', last_error = ?, attempts = 0, next_try = 0, updated_at = ?
         WHERE node = ? AND state IN ('verified', 'pending', 'failed')
           AND asset_id IN (SELECT id FROM assets WHERE blob_id = ?)
         RETURNING asset_id",
    )
    .bind(reason)
    .bind(now())
    .bind(node)
    .bind(blob_id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|(a,)| a).collect())
}

/// The node's inventory lists a good copy: the replica is verified, and its
/// proof time is the later of ours and the node's. Returns whether the state
/// changed (a copy found again, e.g. restored by an operator).
pub async fn replica_seen_good(
    db: &Db,
    asset_id: &str,
    node: &str,
    node_verified_at: Option<i64>,
) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE replicas SET state = 'verified', last_error = NULL, updated_at = ?,
         verified_at = MAX(COALESCE(verified_at, 0), COALESCE(?, 0))
         WHERE asset_id = ? AND node = ? AND state IN ('pending', 'failed', 'repairing')",
    )
    .bind(now())
    .bind(node_verified_at)
    .bind(asset_id)
    .bind(node)
    .execute(db)
    .await?;
    if r.rows_affected() == 1 {
        return Ok(true);
    }
    sqlx::query(
        "UPDATE replicas SET verified_at = MAX(COALESCE(verified_at, 0), COALESCE(?, 0))
         WHERE asset_id = ? AND node = ? AND state = 'verified'",
    )
    .bind(node_verified_at)
    .bind(asset_id)
    .bind(node)
    .execute(db)
    .await?;
    Ok(false)
}

/// A node is reachable again: its waiting replicas are due now instead of
/// at the end of their backoff.
pub async fn replicas_due_now(db: &Db, node: &str) -> sqlx::Result<u64> {
    let r = sqlx::query(
        "UPDATE replicas SET next_try = 0 WHERE node = ? AND state IN ('pending', 'failed', 'repairing')
         AND next_try > 0",
    )
    .bind(node)
    .execute(db)
    .await?;
    Ok(r.rows_affected())
}

/// Marks the asset `damaged` if no node holds a verified copy. The caller
/// has checked that no other source (the outbox) exists. Returns whether
/// this call changed it (so the alert is raised once).
pub async fn mark_damaged(db: &Db, asset_id: &str) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE assets SET state = 'damaged', error_code = 'movie_damaged',
         error_message = 'Every stored copy of this movie is lost or corrupt; an operator must restore it.',
         updated_at = ?
         WHERE id = ? AND state IN ('replicating', 'published')
           AND NOT EXISTS (SELECT 1 FROM replicas WHERE asset_id = ? AND state = 'verified')",
    )
    .bind(now())
    .bind(asset_id)
    .bind(asset_id)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A damaged asset has a good source again (a node's copy, or a sealed file
/// an operator put back in the outbox): it replicates, and is published
/// once `min_replicas` copies are verified.
pub async fn undamage(db: &Db, asset_id: &str) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE assets SET state = 'replicating', error_code = NULL, error_message = NULL, updated_at = ?
         WHERE id = ? AND state = 'damaged'",
    )
    .bind(now())
    .bind(asset_id)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Records that `node` holds `blob_id` although no asset refers to it;
/// returns when it was first seen so.
pub async fn note_unreferenced(db: &Db, node: &str, blob_id: &str, size: i64) -> sqlx::Result<i64> {
    let t = now();
    let (first,): (i64,) = sqlx::query_as(
        "INSERT INTO unreferenced_blobs (node, blob_id, size, first_seen_at, last_seen_at)
         VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (node, blob_id) DO UPDATE SET size = excluded.size, last_seen_at = excluded.last_seen_at
         RETURNING first_seen_at",
    )
    .bind(node)
    .bind(blob_id)
    .bind(size)
    .bind(t)
    .bind(t)
    .fetch_one(db)
    .await?;
    Ok(first)
}

/// Forgets unreferenced blobs of `node` not seen since `before` (deleted,
/// or referenced again).
pub async fn forget_unreferenced(db: &Db, node: &str, before: i64) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM unreferenced_blobs WHERE node = ? AND last_seen_at < ?")
        .bind(node)
        .bind(before)
        .execute(db)
        .await?;
    Ok(())
}

pub async fn drop_unreferenced(db: &Db, node: &str, blob_id: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM unreferenced_blobs WHERE node = ? AND blob_id = ?")
        .bind(node)
        .bind(blob_id)
        .execute(db)
        .await?;
    Ok(())
}

/// Asset counts by state, for the alert gauges.
pub async fn asset_state_counts(db: &Db) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("SELECT state, COUNT(*) FROM assets GROUP BY state")
        .fetch_all(db)
        .await
}

/// Health means working: write, read back and delete a row.
pub async fn health_check(db: &Db) -> anyhow::Result<()> {
    let id = uuid::Uuid::new_v4().to_string();
    let mut tx = db.begin().await?;
    sqlx::query("INSERT INTO health_probe (id, at) VALUES (?, ?)")
        .bind(&id)
        .bind(now())
        .execute(&mut *tx)
        .await?;
    let (back,): (String,) = sqlx::query_as("SELECT id FROM health_probe WHERE id = ?")
        .bind(&id)
        .fetch_one(&mut *tx)
        .await?;
    anyhow::ensure!(back == id, "read back a different row");
    sqlx::query("DELETE FROM health_probe WHERE id = ?")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

// ---- terminals -------------------------------------------------------------

#[derive(Debug, Clone, FromRow)]
pub struct Terminal {
    pub id: String,
    pub owner_id: i64,
    pub name: String,
    pub wrapped_secret: Vec<u8>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

pub async fn insert_terminal(
    db: &Db,
    id: &str,
    owner_id: i64,
    name: &str,
    wrapped_secret: &[u8],
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO terminals (id, owner_id, name, wrapped_secret, created_at) VALUES (?, ?, ?, ?, ?)")
        .bind(id)
        .bind(owner_id)
        .bind(name)
        .bind(wrapped_secret)
        .bind(now())
        .execute(db)
        .await?;
    Ok(())
}

pub async fn terminal(db: &Db, id: &str) -> sqlx::Result<Option<Terminal>> {
    sqlx::query_as("SELECT id, owner_id, name, wrapped_secret, created_at, last_used_at FROM terminals WHERE id = ?")
        .bind(id)
        .fetch_optional(db)
        .await
}

pub async fn terminals_of(db: &Db, owner_id: i64) -> sqlx::Result<Vec<Terminal>> {
    sqlx::query_as(
        "SELECT id, owner_id, name, wrapped_secret, created_at, last_used_at FROM terminals
         WHERE owner_id = ? ORDER BY created_at DESC",
    )
    .bind(owner_id)
    .fetch_all(db)
    .await
}

pub async fn delete_terminal(db: &Db, id: &str, owner_id: i64) -> sqlx::Result<bool> {
    let r = sqlx::query("DELETE FROM terminals WHERE id = ? AND owner_id = ?")
        .bind(id)
        .bind(owner_id)
        .execute(db)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Records a nonce; `false` when this terminal already used it (a replay).
/// Nonces older than `window_secs` are forgotten in the same transaction.
pub async fn use_terminal_nonce(
    db: &Db,
    terminal_id: &str,
    nonce: &str,
    window_secs: i64,
) -> sqlx::Result<bool> {
    let t = now();
    let mut tx = db.begin().await?;
    sqlx::query("DELETE FROM terminal_nonces WHERE seen_at < ?")
        .bind(t - window_secs)
        .execute(&mut *tx)
        .await?;
    let r = sqlx::query(
        "INSERT INTO terminal_nonces (terminal_id, nonce, seen_at) VALUES (?, ?, ?)
         ON CONFLICT (terminal_id, nonce) DO NOTHING",
    )
    .bind(terminal_id)
    .bind(nonce)
    .bind(t)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE terminals SET last_used_at = ? WHERE id = ?")
        .bind(t)
        .bind(terminal_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(r.rows_affected() == 1)
}

// ---- restores ---------------------------------------------------------------------

/// Records a restore from a backup taken at `backup_at`: refunds that could
/// depend on views delivered after the backup are frozen
/// (`ledger::refund_due`, migrations/0007).
pub async fn freeze_refunds(db: &Db, backup_at: i64, restored_at: i64) -> sqlx::Result<()> {
    let (safe_until,): (i64,) =
        sqlx::query_as("SELECT COALESCE(MIN(watermark), 0) FROM journal_contacts")
            .fetch_one(db)
            .await?;
    sqlx::query("INSERT INTO refund_freeze (backup_at, safe_until, restored_at) VALUES (?, ?, ?)")
        .bind(backup_at)
        .bind(safe_until.min(backup_at))
        .bind(restored_at)
        .execute(db)
        .await?;
    Ok(())
}

/// Moves everything in the write-ahead log into the main file.
pub async fn checkpoint(db: &Db) -> sqlx::Result<()> {
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(db)
        .await?;
    Ok(())
}

// ---- prices ---------------------------------------------------------------------

/// Sets a view price (0 = free). A free movie turning paid enters a new
/// price epoch (`crate::prices`).
pub async fn set_price(db: &Db, asset_id: &str, price: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE assets SET price_epoch = price_epoch + (price = 0 AND ?1 > 0), price = ?1
         WHERE id = ?2",
    )
    .bind(price)
    .bind(asset_id)
    .execute(db)
    .await?;
    Ok(())
}

/// Every movie with a price and its epoch: what a node needs to refuse
/// grant-less tokens minted before the movie became paid.
pub async fn paid_epochs(db: &Db) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("SELECT id, price_epoch FROM assets WHERE price > 0 ORDER BY id")
        .fetch_all(db)
        .await
}

// ---- avatar links ---------------------------------------------------------------

/// Replaces `user_id`'s link code (one live code per account) and sweeps
/// expired ones.
pub async fn replace_link_code(
    db: &Db,
    user_id: i64,
    code_hash: &str,
    expires_at: i64,
) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM link_codes WHERE user_id = ? OR expires_at < ?")
        .bind(user_id)
        .bind(now())
        .execute(db)
        .await?;
    sqlx::query("INSERT INTO link_codes (code_hash, user_id, expires_at) VALUES (?, ?, ?)")
        .bind(code_hash)
        .bind(user_id)
        .bind(expires_at)
        .execute(db)
        .await?;
    Ok(())
}

/// What [`link_avatar`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkOutcome {
    /// Linked (or re-linked) to this account; the code is used up.
    Linked(i64),
    /// No live code with this hash.
    CodeInvalid,
    /// Another account holds the avatar's link; nothing changed and the
    /// code stays usable.
    LinkedElsewhere,
}

/// Links `avatar` to the account that made the code, through terminal
/// `via_name` of `via_owner`, and consumes the code: one transaction.
pub async fn link_avatar(
    db: &Db,
    code_hash: &str,
    avatar: &str,
    via_name: &str,
    via_owner: i64,
) -> sqlx::Result<LinkOutcome> {
    // The write lock up front: two links racing must queue, not fail on a
    // lock upgrade (SQLITE_BUSY) half-way.
    let mut tx = db.begin_with("BEGIN IMMEDIATE").await?;
    let row: Option<(i64,)> =
        sqlx::query_as("SELECT user_id FROM link_codes WHERE code_hash = ? AND expires_at >= ?")
            .bind(code_hash)
            .bind(now())
            .fetch_optional(&mut *tx)
            .await?;
    let Some((user,)) = row else {
        return Ok(LinkOutcome::CodeInvalid);
    };
    // Re-linking to the same account only refreshes the time; a link held
    // by another account is left alone.
    let linked = sqlx::query(
        "INSERT INTO avatar_links (avatar_key, user_id, linked_at, via_terminal, via_owner_id)
         VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (avatar_key) DO UPDATE SET linked_at = excluded.linked_at,
           via_terminal = excluded.via_terminal, via_owner_id = excluded.via_owner_id
         WHERE avatar_links.user_id = excluded.user_id",
    )
    .bind(avatar)
    .bind(user)
    .bind(now())
    .bind(via_name)
    .bind(via_owner)
    .execute(&mut *tx)
    .await?;
    if linked.rows_affected() == 0 {
        return Ok(LinkOutcome::LinkedElsewhere);
    }
    sqlx::query("DELETE FROM link_codes WHERE code_hash = ?")
        .bind(code_hash)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(LinkOutcome::Linked(user))
}

/// The account `avatar` is linked to.
pub async fn avatar_account(db: &Db, avatar: &str) -> sqlx::Result<Option<i64>> {
    let r: Option<(i64,)> = sqlx::query_as("SELECT user_id FROM avatar_links WHERE avatar_key = ?")
        .bind(avatar)
        .fetch_optional(db)
        .await?;
    Ok(r.map(|r| r.0))
}

/// Lets `avatar` go, if `user_id` holds its link.
pub async fn unlink_avatar(db: &Db, avatar: &str, user_id: i64) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM avatar_links WHERE avatar_key = ? AND user_id = ?")
        .bind(avatar)
        .bind(user_id)
        .execute(db)
        .await?;
    Ok(())
}

/// One avatar linked to an account, with where the link was made.
#[derive(Debug, Clone, FromRow)]
pub struct AvatarLink {
    pub avatar_key: String,
    pub linked_at: i64,
    /// The screen's name.
    pub via_terminal: String,
    /// The screen owner's account (`None` for links made before it was kept).
    pub via_owner_id: Option<i64>,
}

pub async fn avatar_links(db: &Db, user_id: i64) -> sqlx::Result<Vec<AvatarLink>> {
    sqlx::query_as(
        "SELECT avatar_key, linked_at, via_terminal, via_owner_id FROM avatar_links
         WHERE user_id = ? ORDER BY linked_at",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

/// Who bought grant `id`.
pub async fn grant_buyer(db: &Db, id: &str) -> sqlx::Result<Option<i64>> {
    let r: Option<(i64,)> = sqlx::query_as("SELECT buyer_id FROM play_grants WHERE id = ?")
        .bind(id)
        .fetch_optional(db)
        .await?;
    Ok(r.map(|r| r.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AssetState;

    async fn fresh() -> (tempfile::TempDir, Db, i64) {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
        let owner = create_user(&db, "a@example.com", "x", "uploader")
            .await
            .unwrap();
        (dir, db, owner)
    }

    #[tokio::test]
    async fn a_job_is_claimed_once_and_again_only_after_its_lease_runs_out() {
        let (_d, db, owner) = fresh().await;
        insert_asset(&db, "one", owner, "One", "one.mp4", 10)
            .await
            .unwrap();
        insert_asset(&db, "two", owner, "Two", "two.mp4", 10)
            .await
            .unwrap();
        let a = claim_next(&db, 30).await.unwrap().unwrap();
        let b = claim_next(&db, 30).await.unwrap().unwrap();
        assert_ne!(a.id, b.id, "two workers never get the same job");
        assert!(claim_next(&db, 30).await.unwrap().is_none());
        // A worker that died: its lease lapses and the job is taken again.
        sqlx::query("UPDATE assets SET lease_until = 0 WHERE id = ?")
            .bind(&a.id)
            .execute(&db)
            .await
            .unwrap();
        assert_eq!(claim_next(&db, 30).await.unwrap().unwrap().id, a.id);
        assert!(!renew_lease(&db, &a.id, 30).await.unwrap());
    }

    #[tokio::test]
    async fn a_cancel_racing_the_move_to_sealing_wins() {
        let (_d, db, owner) = fresh().await;
        insert_asset(&db, "s", owner, "S", "s.mp4", 10)
            .await
            .unwrap();
        claim_next(&db, 30).await.unwrap().unwrap();
        set_state(&db, "s", AssetState::Transcoding).await.unwrap();
        // The worker's last look finds no cancel; the uploader's cancel
        // lands right after and is told "requested".
        assert!(!cancel_requested(&db, "s").await.unwrap());
        assert_eq!(
            request_cancel(&db, "s").await.unwrap(),
            CancelOutcome::Requested
        );
        // So the move to sealing must not happen.
        assert!(!start_sealing(&db, "s").await.unwrap());
        assert_eq!(
            asset(&db, "s").await.unwrap().unwrap().state.as_str(),
            "transcoding"
        );
        // Without a cancel it does, and a cancel after it is too late.
        insert_asset(&db, "t", owner, "T", "t.mp4", 10)
            .await
            .unwrap();
        assert_eq!(claim_next(&db, 30).await.unwrap().unwrap().id, "t");
        set_state(&db, "t", AssetState::Transcoding).await.unwrap();
        assert!(start_sealing(&db, "t").await.unwrap());
        assert_eq!(
            request_cancel(&db, "t").await.unwrap(),
            CancelOutcome::TooLate
        );
    }

    #[tokio::test]
    async fn failed_jobs_back_off_and_cancel_and_retry_follow_the_state() {
        let (_d, db, owner) = fresh().await;
        insert_asset(&db, "j", owner, "J", "j.mp4", 10)
            .await
            .unwrap();
        claim_next(&db, 30).await.unwrap().unwrap();
        assert_eq!(retry_later(&db, "j", 60).await.unwrap(), 1);
        assert!(
            claim_next(&db, 30).await.unwrap().is_none(),
            "not due for a minute"
        );

        // Queued: cancelled at once. Running: a request the worker sees.
        insert_asset(&db, "q", owner, "Q", "q.mp4", 10)
            .await
            .unwrap();
        assert_eq!(
            request_cancel(&db, "q").await.unwrap(),
            CancelOutcome::Cancelled
        );
        assert_eq!(
            asset(&db, "q")
                .await
                .unwrap()
                .unwrap()
                .error_code
                .as_deref(),
            Some("cancelled")
        );
        insert_asset(&db, "r", owner, "R", "r.mp4", 10)
            .await
            .unwrap();
        assert_eq!(claim_next(&db, 30).await.unwrap().unwrap().id, "r");
        assert_eq!(
            request_cancel(&db, "r").await.unwrap(),
            CancelOutcome::Requested
        );
        assert!(renew_lease(&db, "r", 30).await.unwrap());
        set_state(&db, "r", AssetState::Replicating).await.unwrap();
        assert_eq!(
            request_cancel(&db, "q").await.unwrap(),
            CancelOutcome::TooLate
        );

        // Only processing_failed is retried by an operator.
        assert!(!retry_failed(&db, "q").await.unwrap());
        reject(&db, "j", "processing_failed", "x").await.unwrap();
        assert!(retry_failed(&db, "j").await.unwrap());
        let j = asset(&db, "j").await.unwrap().unwrap();
        assert_eq!(
            (j.state.as_str(), j.attempts, j.error_code),
            ("queued", 0, None)
        );
    }
}
