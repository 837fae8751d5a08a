//! The SQLite catalog, the embedded default: one file in WAL mode with
//! `synchronous=FULL`, so an acknowledged upload or payment survives a
//! power cut.
//!
//! Writers of the books serialize on SQLite's write lock taken up front
//! (`BEGIN IMMEDIATE`, [`SqliteCatalog::begin_write`]), so what a
//! transaction checked still holds when it writes, also across processes.
//! A debit is a guarded `UPDATE … WHERE balance + amount >= 0`, and the
//! `CHECK (balance >= 0)` on the column refuses a negative balance even
//! from a buggy caller.

use std::{collections::BTreeMap, path::Path, str::FromStr};

use sqlx::{
    sqlite::{
        SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions,
        SqliteSynchronous,
    },
    ConnectOptions, Connection, Sqlite, SqlitePool, Transaction,
};

use super::*;
use crate::domain::MAX_BALANCE;

/// The SQLite catalog. Cloning shares the pool.
#[derive(Clone)]
pub struct SqliteCatalog {
    pool: SqlitePool,
}

/// Book writers of this process queue here before asking SQLite for its
/// write lock: waiting on a mutex wakes the next writer at once, where
/// SQLite's busy handler sleeps and retries (tail latency under load).
static WRITERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl SqliteCatalog {
    /// Opens the database and applies migrations.
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            // A COMMIT that fails (the disk full: SQLITE_FULL) leaves its
            // connection inside the transaction, holding the write lock;
            // back in the pool it would answer every writer "database is
            // locked" until the process restarts. Such a connection is
            // closed on release instead (closing rolls back).
            .after_release(|conn, _| Box::pin(async move { Ok(!in_transaction(conn).await) }))
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// The pool, for tests that look at rows directly.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Takes SQLite's write lock at once (`BEGIN IMMEDIATE`). Hold the
    /// guard as long as the transaction.
    async fn begin_write(
        &self,
    ) -> sqlx::Result<(
        tokio::sync::MutexGuard<'static, ()>,
        Transaction<'static, Sqlite>,
    )> {
        let guard = WRITERS.lock().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok((guard, tx))
    }
}

/// Whether `conn` is inside a transaction: SQLite's autocommit is off, or
/// sqlx still counts one open (SQLite rolled it back by itself on
/// SQLITE_FULL and sqlx's own ROLLBACK then failed).
async fn in_transaction(conn: &mut SqliteConnection) -> bool {
    use sqlx::{Database, TransactionManager};
    if <Sqlite as Database>::TransactionManager::get_transaction_depth(conn) > 0 {
        tracing::warn!("a database connection left inside a transaction is closed");
        return true;
    }
    match conn.lock_handle().await {
        // SAFETY: the handle is locked for this call, so no statement runs
        // on it meanwhile; sqlite3_get_autocommit only reads a flag.
        Ok(mut h) => unsafe {
            libsqlite3_sys::sqlite3_get_autocommit(h.as_raw_handle().as_ptr()) == 0
        },
        // A connection we cannot look at is not worth keeping.
        Err(_) => true,
    }
}

// What SQLite spells its own way (catalog/portable.rs).
const GREATEST: &str = "MAX";
const LEAST: &str = "MIN";
const STRPOS: &str = "instr";
const ROW_ID: &str = "rowid";

super::portable::portable_helpers!(Sqlite);

/// [`super::claim_process`] for SQLite: an advisory lock on `<file>.lock`
/// beside the database, which the kernel lets go when the process ends,
/// however it ends.
pub fn claim_process(url: &str) -> anyhow::Result<Option<std::fs::File>> {
    let opts = SqliteConnectOptions::from_str(url)?;
    let db = opts.get_filename();
    if db.as_os_str().is_empty() || db.as_os_str() == ":memory:" {
        return Ok(None);
    }
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = std::path::PathBuf::from(name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another manager is already running on the database {} (it holds {}); \
             an embedded SQLite database serves one manager process: stop the other first, \
             or move the catalog to PostgreSQL to run a standby manager (docs/operations.md)",
            db.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("cannot lock {}: {e}", path.display())
        }
    }
}

/// `PRAGMA quick_check` on an existing database before anything migrates
/// or writes to it. A missing file is a fresh start, not damage.
pub async fn quick_check(url: &str) -> anyhow::Result<()> {
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

// ---- snapshots ------------------------------------------------------------------

/// Runs `f` where blocking is allowed: `block_in_place` on a multi-thread
/// runtime; inline on a current-thread one (tests, where it cannot starve
/// other tasks for long: snapshots of a metadata database take milliseconds).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Row counts of every table and the schema version, on `conn`'s current
/// transaction (or a fresh implicit one).
async fn count_tables(conn: &mut SqliteConnection) -> sqlx::Result<SnapshotCounts> {
    let names: Vec<(String,)> = sqlx::query_as(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut tables = BTreeMap::new();
    for (name,) in names {
        let (n,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {}", quote_ident(&name)))
            .fetch_one(&mut *conn)
            .await?;
        tables.insert(name, n);
    }
    let schema = if tables.contains_key("_sqlx_migrations") {
        let (v,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success = 1",
        )
        .fetch_one(&mut *conn)
        .await?;
        v
    } else {
        0
    };
    Ok(SnapshotCounts { tables, schema })
}

/// Copies the database into `dest` (a new file) with the online-backup API,
/// inside one read transaction whose counts it returns.
async fn snapshot(db: &SqlitePool, dest: &Path) -> anyhow::Result<SnapshotCounts> {
    let mut tx = db.begin().await?;
    // The first read starts the snapshot; it lasts until the transaction ends.
    let counts = count_tables(&mut tx).await?;
    let mut target = SqliteConnectOptions::new()
        .filename(dest)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Delete)
        .connect()
        .await?;
    {
        let mut src = tx.lock_handle().await?;
        let mut dst = target.lock_handle().await?;
        let (s, d) = (src.as_raw_handle().as_ptr(), dst.as_raw_handle().as_ptr());
        // SAFETY: both handles are open connections, locked against their
        // sqlx workers for the duration; the backup object is finished
        // before the locks are released.
        blocking(|| unsafe { online_backup(s, d) }).map_err(anyhow::Error::msg)?;
    }
    tx.rollback().await?;
    // The copied header says WAL (the source's mode); make the copy a
    // self-contained rollback-journal file that opens read-only anywhere.
    sqlx::query("PRAGMA journal_mode = DELETE")
        .execute(&mut target)
        .await?;
    target.close().await?;
    Ok(counts)
}

/// # Safety
/// `src` and `dst` must be open SQLite connections not used elsewhere meanwhile.
unsafe fn online_backup(
    src: *mut libsqlite3_sys::sqlite3,
    dst: *mut libsqlite3_sys::sqlite3,
) -> Result<(), String> {
    use libsqlite3_sys as ffi;
    let main = c"main";
    let errmsg = |db: *mut ffi::sqlite3| {
        std::ffi::CStr::from_ptr(ffi::sqlite3_errmsg(db))
            .to_string_lossy()
            .into_owned()
    };
    let b = ffi::sqlite3_backup_init(dst, main.as_ptr(), src, main.as_ptr());
    if b.is_null() {
        return Err(format!("backup_init: {}", errmsg(dst)));
    }
    // -1: every page in one step, so the source's open read transaction is
    // the only snapshot copied.
    let step = ffi::sqlite3_backup_step(b, -1);
    let finish = ffi::sqlite3_backup_finish(b);
    if step != ffi::SQLITE_DONE {
        return Err(format!(
            "backup_step: {}",
            std::ffi::CStr::from_ptr(ffi::sqlite3_errstr(step)).to_string_lossy()
        ));
    }
    if finish != ffi::SQLITE_OK {
        return Err(format!("backup_finish: {}", errmsg(dst)));
    }
    Ok(())
}

/// What a snapshot file holds, read-only: integrity, counts, schema version.
pub async fn inspect(path: &Path) -> Result<SnapshotCounts, String> {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .immutable(true)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let rows: Vec<(String,)> = sqlx::query_as("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    if rows.len() != 1 || rows[0].0 != "ok" {
        let mut text: String = rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("; ");
        text.truncate(500);
        return Err(text);
    }
    let r = count_tables(&mut conn).await.map_err(|e| e.to_string());
    let _ = conn.close().await;
    r
}

// The catalog: the methods of catalog/portable.rs, then SQLite's own.
super::portable::portable_impl! { SqliteCatalog;

    async fn claim_next(&self, lease_secs: i64, worker: &str) -> sqlx::Result<Option<Asset>> {
        let db = &self.pool;
        let t = now();
        sqlx::query_as(&format!(
            "UPDATE assets SET state = 'probing', progress = 0, lease_until = $1, updated_at = $2,
                               worker = $3
             WHERE id = (SELECT id FROM (
                           -- Each owner's jobs take turns: a job's turn is its
                           -- place among its owner's waiting and running jobs,
                           -- so one account's fifty uploads do not delay
                           -- another's one.
                           SELECT id, state, next_try, lease_until, priority, created_at,
                                  ROW_NUMBER() OVER (PARTITION BY owner_id ORDER BY created_at, id) AS turn
                           FROM assets
                           WHERE state IN ('queued', 'probing', 'transcoding', 'sealing'))
                         WHERE (state = 'queued' AND next_try <= $4)
                            OR (state IN ('probing', 'transcoding', 'sealing') AND lease_until < $5)
                         ORDER BY priority DESC, turn, created_at, id LIMIT 1)
             RETURNING {ASSET_COLS}"
        ))
        .bind(t + lease_secs)
        .bind(t)
        .bind(worker)
        .bind(t)
        .bind(t)
        .fetch_optional(db)
        .await
    }

    async fn sync_replica_nodes(&self, nodes: &[String]) -> sqlx::Result<(u64, u64)> {
        let db = &self.pool;
        let t = now();
        let mut tx = db.begin().await?;
        let list = serde_json::to_string(nodes).expect("names serialise");
        let retired = sqlx::query(
            "UPDATE replicas SET state = 'retired', last_error = 'node removed from the configuration',
             updated_at = $1 WHERE state != 'retired' AND node NOT IN (SELECT value FROM json_each($2))",
        )
        .bind(t)
        .bind(&list)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let added = sqlx::query(
            "INSERT INTO replicas (asset_id, node, state, updated_at)
             SELECT a.id, n.value, 'pending', $1 FROM assets a, json_each($2) n
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

    async fn checkpoint(&self) -> sqlx::Result<()> {
        let db = &self.pool;
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(db)
            .await?;
        Ok(())
    }

    async fn integrity_check(&self) -> Result<(), String> {
        let rows: Vec<(String,)> = sqlx::query_as("PRAGMA quick_check")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| format!("the quick check could not run: {e}"))?;
        match rows.as_slice() {
            [(ok,)] if ok == "ok" => Ok(()),
            rows => Err(format!(
                "the quick check found damage: {}",
                rows.iter()
                    .take(3)
                    .map(|(r,)| r.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        }
    }

    async fn canary_asset(&self) -> sqlx::Result<Option<Asset>> {
        sqlx::query_as(&format!(
            // Named: without statistics SQLite prefers `assets_state` and
            // sorts every published movie each monitor cycle.
            "SELECT {ASSET_COLS} FROM assets INDEXED BY assets_smallest
             WHERE state = 'published' AND withdrawn_at IS NULL AND plain_len IS NOT NULL
             ORDER BY plain_len, id LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await
    }

    // ---- backups ----

    async fn close(&self) {
        self.pool.close().await
    }

    fn shared(&self) -> bool {
        false
    }

    async fn try_lead(&self) -> sqlx::Result<bool> {
        Ok(true)
    }

    async fn still_leading(&self) -> bool {
        true
    }

    async fn snapshot(&self, dest: &Path) -> Result<SnapshotCounts, String> {
        snapshot(&self.pool, dest).await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    //! What only SQLite's implementation can show: its triggers and
    //! constraints, and its locking without this process's queue. The
    //! behaviour every backend shares is in `conformance`.
    use super::*;

    async fn fresh() -> (tempfile::TempDir, SqliteCatalog) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        (dir, SqliteCatalog::open(&url).await.unwrap())
    }

    #[test]
    fn one_process_claims_the_database_file_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("m.db").display());
        let first = claim_process(&url).unwrap();
        assert!(first.is_some());
        let refused = claim_process(&url).unwrap_err().to_string();
        assert!(
            refused.contains("another manager is already running") && refused.contains("m.db"),
            "{refused}"
        );
        drop(first);
        assert!(claim_process(&url).unwrap().is_some());
    }

    #[tokio::test]
    async fn the_ledger_and_audit_log_are_append_only_and_no_balance_goes_below_zero_even_by_hand()
    {
        let (_d, c) = fresh().await;
        let a = c
            .create_account("a@x", "h", Role::Uploader, 10)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO audit_log (at, actor_id, actor, action, target, detail) VALUES (0, ?, 'a', 'x', 'y', 'z')",
        )
        .bind(a)
        .execute(c.pool())
        .await
        .unwrap();
        for sql in [
            "UPDATE ledger SET amount = 1",
            "DELETE FROM ledger",
            "UPDATE users SET balance = -1",
            "UPDATE audit_log SET detail = ''",
            "DELETE FROM audit_log",
        ] {
            assert!(sqlx::query(sql).execute(c.pool()).await.is_err(), "{sql}");
        }
        assert_eq!(c.balance(a).await.unwrap(), 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_debits_for_one_balance_succeed_once_without_the_queue() {
        let (_d, c) = fresh().await;
        let a = c
            .create_account("a@x", "h", Role::Uploader, 100)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let pool = c.pool().clone();
            tasks.push(tokio::spawn(async move {
                // Without the in-process queue, as writers in two
                // processes would race: SQLite's lock and the guard decide.
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
                let key = format!("t{i}");
                let r = post(
                    &mut tx,
                    &Entry {
                        account: a,
                        amount: -60,
                        kind: "purchase",
                        reference: "",
                        idem_key: &key,
                        actor: "t",
                        reason: "",
                    },
                )
                .await;
                tx.commit().await.unwrap();
                r.is_ok()
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += t.await.unwrap() as usize;
        }
        assert_eq!(ok, 1);
        assert_eq!(c.balance(a).await.unwrap(), 40);
        assert!(c.verify_balances().await.unwrap().is_empty());
    }
}
