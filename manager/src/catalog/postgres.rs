//! The PostgreSQL catalog, for sites that outgrow one machine: chosen by
//! `database_url = "postgres://…"`, migrated from `migrations_pg/` (kept in
//! step with SQLite's `migrations/`, see `tests::both_schemas_hold_the_same_tables_and_columns`).
//!
//! Locking. The books' writers (every method SQLite runs under
//! `BEGIN IMMEDIATE`) take one transaction-scoped advisory lock first
//! ([`PgCatalog::begin_write`]), so they serialize exactly as on SQLite,
//! across every manager process on the database, and what a transaction
//! checked still holds when it writes. The guarded debit (`UPDATE … WHERE
//! balance + amount >= 0`), the `CHECK (balance >= 0)` and the unique keys
//! hold on their own as well. Everything else runs at READ COMMITTED, where a
//! conditional `UPDATE` re-checks its `WHERE` on the row it waited for;
//! claiming a job takes its row `FOR UPDATE SKIP LOCKED`, so claimers on
//! several managers never queue behind one another or share a job.
//!
//! Snapshots (backups) are `pg_dump` archives taken inside the snapshot
//! whose row counts they record; a copy is verified by restoring it into a
//! scratch database on the same server ([`inspect`]). The manager's role
//! needs `CREATEDB` for that, and the `postgresql-client` programs
//! (`pg_dump`, `pg_restore`) must be on the manager's `PATH`.

use std::{collections::BTreeMap, path::Path, str::FromStr, sync::OnceLock};

use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    ConnectOptions, Connection, PgConnection, PgPool, Postgres, Transaction,
};

use super::*;
use crate::domain::MAX_BALANCE;

/// The PostgreSQL catalog. Cloning shares the pool.
#[derive(Clone)]
pub struct PgCatalog {
    pool: PgPool,
    url: String,
    /// The connection that asks for [`LEAD_LOCK`], and holds it while
    /// this process leads.
    lead: Arc<tokio::sync::Mutex<Lead>>,
}

#[derive(Default)]
struct Lead {
    conn: Option<PgConnection>,
    held: bool,
}

/// The lead's own connection ([`Catalog::try_lead`]), with keepalives the
/// server uses to end it when its peer vanishes without a word.
async fn lead_connection(url: &str) -> sqlx::Result<PgConnection> {
    let mut c = PgConnectOptions::from_str(url)
        .map_err(|e| sqlx::Error::Configuration(e.into()))?
        .application_name("slmedia-manager-lead")
        .connect()
        .await?;
    for set in [
        "SET tcp_keepalives_idle = 10",
        "SET tcp_keepalives_interval = 5",
        "SET tcp_keepalives_count = 3",
    ] {
        sqlx::query(set).execute(&mut c).await?;
    }
    Ok(c)
}

/// Ends the session that holds the lead in the database at `url`, as a
/// crash would (tests); returns how many sessions it ended. The server
/// shows a 64-bit advisory key as two 32-bit halves.
#[cfg(test)]
pub async fn end_lead_session(url: &str) -> i64 {
    let mut admin = sqlx::PgConnection::connect(url)
        .await
        .expect("the test server");
    let (ended,): (i64,) = sqlx::query_as(&format!(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(l.pid)
           FROM pg_locks l JOIN pg_database d ON d.oid = l.database
           WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()
             AND l.classid = {} AND l.objid = {}) t",
        LEAD_LOCK >> 32,
        LEAD_LOCK & 0xffff_ffff
    ))
    .fetch_one(&mut admin)
    .await
    .expect("ending the lead's session");
    ended
}

/// The session advisory lock the leading manager holds
/// ([`Catalog::try_lead`]).
const LEAD_LOCK: i64 = BOOKS_LOCK + 1;

/// The advisory lock the books' writers hold for their transaction (an
/// arbitrary key, the same in every manager: "slmedia" in ASCII).
const BOOKS_LOCK: i64 = 0x0073_6c6d_6564_6961;

/// The server a snapshot is restored into for its check: the one the
/// catalog opened (backups are verified where they were taken).
static SCRATCH_SERVER: OnceLock<String> = OnceLock::new();

impl PgCatalog {
    /// Connects and applies migrations. Two managers starting at once are
    /// fine: sqlx migrates under an advisory lock of its own.
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        let opts = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| anyhow::anyhow!("the PostgreSQL server does not answer: {e}"))?;
        sqlx::migrate!("./migrations_pg").run(&pool).await?;
        let _ = SCRATCH_SERVER.set(url.to_string());
        Ok(Self {
            pool,
            url: url.to_string(),
            lead: Arc::default(),
        })
    }

    /// The pool, for tests that look at rows directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Begins a books transaction holding [`BOOKS_LOCK`] until it ends.
    async fn begin_write(&self) -> sqlx::Result<((), Transaction<'static, Postgres>)> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(BOOKS_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(((), tx))
    }
}

// What PostgreSQL spells its own way (catalog/portable.rs).
const GREATEST: &str = "GREATEST";
const LEAST: &str = "LEAST";
const STRPOS: &str = "strpos";
const ROW_ID: &str = "ctid";

super::portable::portable_helpers!(Postgres);

// ---- snapshots ------------------------------------------------------------------

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Row counts of every table and the schema version, in `conn`'s current
/// transaction.
async fn count_tables(conn: &mut PgConnection) -> sqlx::Result<SnapshotCounts> {
    let names: Vec<(String,)> = sqlx::query_as(
        "SELECT table_name::TEXT FROM information_schema.tables
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY 1",
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
        let (v,): (i64,) =
            sqlx::query_as("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success")
                .fetch_one(&mut *conn)
                .await?;
        v
    } else {
        0
    };
    Ok(SnapshotCounts { tables, schema })
}

/// Runs a PostgreSQL client program on the database `url` names; its
/// error output is the error. The password goes in the environment
/// (`PGPASSWORD`), not on a command line every local user can read.
async fn run_tool(program: &str, args: &[&str], url: &reqwest::Url) -> anyhow::Result<()> {
    let mut bare = url.clone();
    let password = bare.password().map(str::to_string);
    let _ = bare.set_password(None);
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .arg(format!("--dbname={bare}"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let out = cmd.output().await.map_err(|e| {
        anyhow::anyhow!("{program} could not start ({e}); is postgresql-client installed?")
    })?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
        text.truncate(500);
        anyhow::bail!("{program} failed ({}): {text}", out.status);
    }
    Ok(())
}

/// `pg_dump` of the database into `dest` (a custom-format archive), taken
/// in the same snapshot as the counts it returns: a repeatable-read
/// transaction exports its snapshot and `pg_dump --snapshot` reads in it
/// while the transaction stays open.
async fn snapshot(db: &PgPool, url: &str, dest: &Path) -> anyhow::Result<SnapshotCounts> {
    let mut tx = db.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let (snap,): (String,) = sqlx::query_as("SELECT pg_export_snapshot()")
        .fetch_one(&mut *tx)
        .await?;
    let counts = count_tables(&mut tx).await?;
    let file = dest.to_string_lossy();
    run_tool(
        "pg_dump",
        &[
            "--format=custom",
            "--no-owner",
            "--no-privileges",
            &format!("--snapshot={snap}"),
            &format!("--file={file}"),
        ],
        &reqwest::Url::parse(url)?,
    )
    .await?;
    tx.rollback().await?;
    Ok(counts)
}

/// Names the server backups are checked on where no catalog is open (a
/// restore on a new machine, `manager backup verify`). The first name wins.
pub fn set_scratch_server(url: &str) {
    let _ = SCRATCH_SERVER.set(url.to_string());
}

/// Restores the verified dump `dump` (a backup taken at `backup_at`) into
/// the database `target`, which must hold no tables; with `replace`, its
/// tables are moved aside first into a schema `before_restore_<time>`
/// (never dropped). Atomic for the target: the dump goes to a scratch
/// database, is migrated and has its refunds frozen there by the catalog's
/// own code, and only then is copied into the target in one transaction,
/// so a restore cut short leaves the target as it was.
pub async fn restore_into(
    dump: &Path,
    target: &str,
    backup_at: i64,
    replace: bool,
) -> anyhow::Result<()> {
    let target_opts = PgConnectOptions::from_str(target)?;
    let mut conn = target_opts.connect().await?;
    let (tables,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM information_schema.tables
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
    )
    .fetch_one(&mut conn)
    .await?;
    let (schema,): (String,) = sqlx::query_as("SELECT current_schema()::TEXT")
        .fetch_one(&mut conn)
        .await?;
    if tables > 0 && !replace {
        anyhow::bail!(
            "the target database already holds {tables} tables; pass --replace to move them \
             aside (into a schema before_restore_<time>, never dropped) and restore over them"
        );
    }
    let staged = dump.with_extension("restore.dump");
    let result = in_scratch(
        &mut conn,
        target,
        "slmedia_restore",
        dump,
        async |scratch_url| {
            let db = PgCatalog::open(scratch_url.as_str()).await?;
            let frozen = db.freeze_refunds(backup_at, now()).await;
            db.close().await;
            frozen?;
            let file = staged.to_string_lossy();
            run_tool(
                "pg_dump",
                &[
                    "--format=custom",
                    "--no-owner",
                    "--no-privileges",
                    &format!("--file={file}"),
                ],
                scratch_url,
            )
            .await?;
            // The move aside (with --replace) and the restore in one
            // transaction: psql runs pg_restore's script under --single-transaction.
            let script = dump.with_extension("restore.sql");
            let wrapper = dump.with_extension("restore.psql");
            let sql_file = script.to_string_lossy().to_string();
            let out = tokio::process::Command::new("pg_restore")
                .args(["--no-owner", "--no-privileges", "--file", &sql_file, &file])
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output()
                .await?;
            anyhow::ensure!(
                out.status.success(),
                "pg_restore could not write the restore script: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let mut text = String::from("\\set ON_ERROR_STOP on\n");
            if tables > 0 {
                let aside = format!("before_restore_{}", now());
                text += &format!(
                    "ALTER SCHEMA {} RENAME TO {};\nCREATE SCHEMA {};\n",
                    quote_ident(&schema),
                    quote_ident(&aside),
                    quote_ident(&schema)
                );
                eprintln!("moving the existing tables aside into schema {aside}");
            }
            text += &format!("\\i '{}'\n", sql_file.replace('\'', "''"));
            std::fs::write(&wrapper, text)?;
            let done = run_tool(
                "psql",
                &[
                    "--no-psqlrc",
                    "--quiet",
                    "--single-transaction",
                    &format!("--file={}", wrapper.to_string_lossy()),
                ],
                &reqwest::Url::parse(target)?,
            )
            .await;
            let _ = std::fs::remove_file(&script);
            let _ = std::fs::remove_file(&wrapper);
            done
        },
    )
    .await;
    let _ = std::fs::remove_file(&staged);
    let _ = conn.close().await;
    result
}

/// Restores `dump` into a new database `<prefix>_<uuid>` on the server
/// `admin` is connected to (`server`, its URL), hands that database's URL
/// to `then`, and drops the database afterwards, whatever happened.
async fn in_scratch<T>(
    admin: &mut PgConnection,
    server: &str,
    prefix: &str,
    dump: &Path,
    then: impl AsyncFnOnce(&reqwest::Url) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let scratch = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let mut url = reqwest::Url::parse(server)?;
    url.set_path(&format!("/{scratch}"));
    sqlx::query(&format!("CREATE DATABASE {}", quote_ident(&scratch)))
        .execute(&mut *admin)
        .await?;
    let result = async {
        run_tool(
            "pg_restore",
            &[
                "--exit-on-error",
                "--no-owner",
                "--no-privileges",
                "--single-transaction",
                &dump.to_string_lossy(),
            ],
            &url,
        )
        .await?;
        then(&url).await
    }
    .await;
    let dropped = sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(&scratch)
    ))
    .execute(&mut *admin)
    .await;
    let kept = result?;
    dropped?;
    Ok(kept)
}

/// Whether `path` is a `pg_dump` custom-format archive (its magic).
pub fn is_dump(path: &Path) -> bool {
    let mut magic = [0u8; 5];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"PGDMP"
}

/// Restores a dump into a fresh scratch database on the catalog's server,
/// counts its rows and drops it: what a backup holds, proven by restoring it.
pub async fn inspect(path: &Path) -> Result<SnapshotCounts, String> {
    let Some(server) = SCRATCH_SERVER.get() else {
        return Err(
            "a PostgreSQL dump is checked by restoring it on a server, and none is named \
             (database_url, or --database-url for a restore)"
                .into(),
        );
    };
    inspect_on(server, path).await.map_err(|e| e.to_string())
}

/// [`inspect`] on a given server.
pub async fn inspect_on(server: &str, path: &Path) -> anyhow::Result<SnapshotCounts> {
    let mut admin = PgConnectOptions::from_str(server)?.connect().await?;
    let counts = in_scratch(&mut admin, server, "slmedia_check", path, async |url| {
        let mut conn = PgConnectOptions::from_str(url.as_str())?.connect().await?;
        let counts = count_tables(&mut conn).await;
        let _ = conn.close().await;
        Ok(counts?)
    })
    .await;
    let _ = admin.close().await;
    counts
}

// The catalog: the methods of catalog/portable.rs, then PostgreSQL's own.
super::portable::portable_impl! { PgCatalog;

    async fn claim_next(&self, lease_secs: i64, worker: &str) -> sqlx::Result<Option<Asset>> {
        let db = &self.pool;
        let t = now();
        sqlx::query_as(&format!(
            "UPDATE assets SET state = 'probing', progress = 0, lease_until = $1, updated_at = $2,
                               worker = $3
             WHERE id = (SELECT a.id FROM assets a JOIN (
                           -- Each owner's jobs take turns: a job's turn is its
                           -- place among its owner's waiting and running jobs,
                           -- so one account's fifty uploads do not delay
                           -- another's one.
                           SELECT id, ROW_NUMBER() OVER (PARTITION BY owner_id ORDER BY created_at, id) AS turn
                           FROM assets
                           WHERE state IN ('queued', 'probing', 'transcoding', 'sealing')) q ON q.id = a.id
                         WHERE (a.state = 'queued' AND a.next_try <= $4)
                            OR (a.state IN ('probing', 'transcoding', 'sealing') AND a.lease_until < $5)
                         ORDER BY a.priority DESC, q.turn, a.created_at, a.id LIMIT 1
                         -- Another manager's claimer holding a row skips
                         -- past it instead of waiting; the row it gets is
                         -- re-checked against the WHERE once locked.
                         FOR UPDATE OF a SKIP LOCKED)
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
        let retired = sqlx::query(
            "UPDATE replicas SET state = 'retired', last_error = 'node removed from the configuration',
             updated_at = $1 WHERE state != 'retired' AND node NOT IN (SELECT unnest($2::TEXT[]))",
        )
        .bind(t)
        .bind(nodes)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let added = sqlx::query(
            "INSERT INTO replicas (asset_id, node, state, updated_at)
             SELECT a.id, n.node, 'pending', $1 FROM assets a, unnest($2::TEXT[]) AS n (node)
             WHERE a.blob_id IS NOT NULL AND a.state IN ('replicating', 'published', 'damaged')
             ON CONFLICT (asset_id, node) DO UPDATE SET state = 'pending', attempts = 0, next_try = 0,
                 last_error = NULL, updated_at = excluded.updated_at
             WHERE replicas.state = 'retired'",
        )
        .bind(t)
        .bind(nodes)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok((retired, added))
    }

    async fn checkpoint(&self) -> sqlx::Result<()> {
        // The server keeps its own write-ahead log; nothing lives beside a
        // file of ours that a rename could leave behind.
        Ok(())
    }

    async fn integrity_check(&self) -> Result<(), String> {
        // The server guards its own pages (and checksums them where the
        // cluster was made with them); what the manager can see going
        // wrong is a server that answers but cannot take writes: a standby
        // promoted from nothing, or one this manager was pointed at.
        let (standby,): (bool,) = sqlx::query_as("SELECT pg_is_in_recovery()")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| format!("the database could not be asked: {e}"))?;
        if standby {
            return Err("the database is a read-only standby (in recovery): \
                        point database_url at the primary"
                .into());
        }
        Ok(())
    }

    async fn canary_asset(&self) -> sqlx::Result<Option<Asset>> {
        sqlx::query_as(&format!(
            // `assets_smallest`, a partial index, answers it.
            "SELECT {ASSET_COLS} FROM assets
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
        true
    }

    async fn try_lead(&self) -> sqlx::Result<bool> {
        let mut lead = self.lead.lock().await;
        if lead.held {
            return Ok(true);
        }
        let conn = match lead.conn.as_mut() {
            Some(c) => c,
            None => {
                // A connection of its own, outside the pool, so that
                // nothing but its death lets the lock go; a standby keeps
                // it to ask again. The server's keepalives on it notice a
                // leader whose host vanished (no FIN ever comes) in about
                // 25 s and end its session, freeing the lock.
                // Bounded: a server behind a link that drops packets must
                // not hold this loop (and shutdown) for minutes.
                let c = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    lead_connection(&self.url),
                )
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)??;
                lead.conn.insert(c)
            }
        };
        let asked = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            sqlx::query_as::<_, (bool,)>("SELECT pg_try_advisory_lock($1)")
                .bind(LEAD_LOCK)
                .fetch_one(&mut *conn),
        )
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut));
        match asked {
            Ok((got,)) => {
                lead.held = got;
                Ok(got)
            }
            Err(e) => {
                lead.conn = None;
                Err(e)
            }
        }
    }

    async fn still_leading(&self) -> bool {
        let mut lead = self.lead.lock().await;
        if !lead.held {
            return false;
        }
        let Some(conn) = lead.conn.as_mut() else {
            return false;
        };
        // A server that does not answer within seconds may already have
        // handed the lock on (it ends sessions its keepalives find dead):
        // give the lead up rather than risk two leaders.
        // The lock itself, not just the connection: behind a pooler that
        // hands sessions around (PgBouncer in transaction mode) the two
        // part ways, and this says so rather than lead without it.
        let alive = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            sqlx::query_as::<_, (bool,)>(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() \
                 AND locktype = 'advisory' AND granted AND classid::bigint = $1 AND objid::bigint = $2)",
            )
            .bind(LEAD_LOCK >> 32)
            .bind(LEAD_LOCK & 0xffff_ffff)
            .fetch_one(&mut *conn),
        )
        .await
        .is_ok_and(|r| matches!(r, Ok((true,))));
        if !alive {
            *lead = Lead::default();
        }
        alive
    }

    async fn snapshot(&self, dest: &Path) -> Result<SnapshotCounts, String> {
        snapshot(&self.pool, &self.url, dest)
            .await
            .map_err(|e| e.to_string())
    }
}

/// A fresh, empty catalog in a database of its own on the test server
/// `SLMEDIA_TEST_PG` names (`scripts/test` starts one). Without it the
/// tests fail, saying so: a suite that skips itself would pass unseen.
#[cfg(test)]
pub async fn fresh() -> ((), SharedCatalog) {
    let (url, _) = test_database().await;
    ((), Arc::new(PgCatalog::open(&url).await.unwrap()))
}

/// A new empty database on the test server: its URL and its name.
#[cfg(test)]
pub async fn test_database() -> (String, String) {
    let server = std::env::var("SLMEDIA_TEST_PG").expect(
        "SLMEDIA_TEST_PG must name a PostgreSQL server for the catalog's tests \
         (scripts/test starts a private one: scripts/pg-test-server)",
    );
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnectOptions::from_str(&server)
        .unwrap()
        .connect()
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let _ = admin.close().await;
    let mut url = reqwest::Url::parse(&server).unwrap();
    url.set_path(&format!("/{name}"));
    (url.to_string(), name)
}

#[cfg(test)]
mod tests {
    //! What only PostgreSQL's implementation can show: its triggers and
    //! constraints, its locking across connections, and that its schema
    //! keeps in step with SQLite's. The behaviour every backend shares is
    //! in `conformance`.
    use super::*;

    async fn fresh_pg() -> PgCatalog {
        let (url, _) = test_database().await;
        PgCatalog::open(&url).await.unwrap()
    }

    #[tokio::test]
    async fn the_ledger_and_audit_log_are_append_only_and_no_balance_goes_below_zero_even_by_hand()
    {
        let c = fresh_pg().await;
        let a = c
            .create_account("a@x", "h", Role::Uploader, 10)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO audit_log (at, actor_id, actor, action, target, detail) VALUES (0, $1, 'a', 'x', 'y', 'z')",
        )
        .bind(a)
        .execute(c.pool())
        .await
        .unwrap();
        for sql in [
            "UPDATE ledger SET amount = 1",
            "DELETE FROM ledger",
            "TRUNCATE ledger CASCADE",
            "UPDATE users SET balance = -1",
            "UPDATE audit_log SET detail = ''",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
        ] {
            assert!(sqlx::query(sql).execute(c.pool()).await.is_err(), "{sql}");
        }
        assert_eq!(c.balance(a).await.unwrap(), 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_debits_from_separate_pools_succeed_once() {
        // Two managers are two pools: only the server's locks stand
        // between their writers.
        let (url, _) = test_database().await;
        let first = PgCatalog::open(&url).await.unwrap();
        let a = first
            .create_account("a@x", "h", Role::Uploader, 100)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let c = PgCatalog::open(&url).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let (_w, mut tx) = c.begin_write().await.unwrap();
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
        assert_eq!(first.balance(a).await.unwrap(), 40);
        assert!(first.verify_balances().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn both_schemas_hold_the_same_tables_and_columns() {
        let dir = tempfile::tempdir().unwrap();
        let lite = super::super::sqlite::SqliteCatalog::open(&format!(
            "sqlite://{}",
            dir.path().join("s.db").display()
        ))
        .await
        .unwrap();
        let lite_cols: Vec<(String, String)> = sqlx::query_as(
            "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
             WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
               AND m.name <> '_sqlx_migrations'
             ORDER BY 1, 2",
        )
        .fetch_all(lite.pool())
        .await
        .unwrap();
        let pg = fresh_pg().await;
        let pg_cols: Vec<(String, String)> = sqlx::query_as(
            "SELECT table_name::TEXT, column_name::TEXT FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name <> '_sqlx_migrations'
             ORDER BY 1, 2",
        )
        .fetch_all(pg.pool())
        .await
        .unwrap();
        assert!(lite_cols.len() > 100, "{} columns", lite_cols.len());
        let only = |a: &[(String, String)], b: &[(String, String)]| {
            a.iter()
                .filter(|c| !b.contains(c))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(only(&lite_cols, &pg_cols), vec![], "only in SQLite");
        assert_eq!(only(&pg_cols, &lite_cols), vec![], "only in PostgreSQL");
        // The same schema version, so a backup's manifest reads the same.
        let v = |c: SnapshotCounts| c.schema;
        let d2 = tempfile::tempdir().unwrap();
        let lite_v = v(lite.snapshot(&d2.path().join("a")).await.unwrap());
        let pg_v = v(pg.snapshot(&d2.path().join("b")).await.unwrap());
        assert_eq!(lite_v, pg_v);
        // Every migration number exists in both folders.
        let names = |dir: &str| {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy()[..4].to_string())
                .collect();
            v.sort();
            v
        };
        let pg_names = names(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations_pg"));
        let lite_names = names(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"));
        for n in &pg_names[1..] {
            assert!(
                lite_names.contains(n),
                "migrations_pg/{n}… has no SQLite twin"
            );
        }
        for n in lite_names
            .iter()
            .filter(|n| n.as_str() > pg_names[0].as_str())
        {
            assert!(
                pg_names.contains(n),
                "migrations/{n}… has no PostgreSQL twin"
            );
        }
    }

    #[tokio::test]
    async fn one_process_leads_until_its_connection_dies_then_another_takes_over() {
        let (url, _) = test_database().await;
        let first = PgCatalog::open(&url).await.unwrap();
        let second = PgCatalog::open(&url).await.unwrap();
        assert!(first.shared() && second.shared());
        assert!(!first.still_leading().await, "nobody leads before asking");
        assert!(first.try_lead().await.unwrap());
        assert!(first.try_lead().await.unwrap(), "held stays held");
        assert!(first.still_leading().await);
        assert!(!second.try_lead().await.unwrap());
        assert!(!second.still_leading().await);
        // The leader's session ended from outside, as when its process
        // is killed or the server drops it: the lead is free at once, and
        // the old leader learns it lost it.
        assert_eq!(end_lead_session(&url).await, 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !second.try_lead().await.unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "the lead was not freed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(second.still_leading().await);
        assert!(
            !first.still_leading().await,
            "the old leader must see its lead gone"
        );
        assert!(!first.try_lead().await.unwrap(), "and cannot take it back");
    }

    #[tokio::test]
    async fn a_dump_restores_whole_with_refunds_frozen_and_never_over_tables() {
        let c = fresh_pg().await;
        let a = c
            .create_account("a@x", "h", Role::Uploader, 10)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dump = dir.path().join("d.db");
        let taken = c.snapshot(&dump).await.unwrap();
        let (target, _) = test_database().await;
        restore_into(&dump, &target, 1234, false).await.unwrap();
        let back = PgCatalog::open(&target).await.unwrap();
        assert_eq!(back.balance(a).await.unwrap(), 10);
        assert!(back.verify_balances().await.unwrap().is_empty());
        let d2 = tempfile::tempdir().unwrap();
        let now_counts = back.snapshot(&d2.path().join("e")).await.unwrap();
        let mut expected = taken.tables.clone();
        // The restore froze refunds that could depend on views after 1234.
        *expected.get_mut("refund_freeze").unwrap() += 1;
        assert_eq!(now_counts.tables, expected);
        let (backup_at,): (i64,) = sqlx::query_as("SELECT backup_at FROM refund_freeze")
            .fetch_one(back.pool())
            .await
            .unwrap();
        assert_eq!(backup_at, 1234);
        // A database with tables is not restored over, unless asked; then
        // its tables are moved aside, not dropped.
        back.create_account("later@x", "h", Role::Uploader, 0)
            .await
            .unwrap();
        back.close().await;
        let e = restore_into(&dump, &target, 1234, false).await.unwrap_err();
        assert!(e.to_string().contains("--replace"), "{e}");
        restore_into(&dump, &target, 1234, true).await.unwrap();
        let back = PgCatalog::open(&target).await.unwrap();
        assert!(back.user_by_email("later@x").await.unwrap().is_none());
        let (aside,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema LIKE 'before_restore_%'",
        )
        .fetch_one(back.pool())
        .await
        .unwrap();
        assert!(aside > 20, "{aside} tables kept aside");
    }

    #[tokio::test]
    async fn a_damaged_dump_is_refused_by_its_check() {
        let c = fresh_pg().await;
        c.create_account("a@x", "h", Role::Uploader, 10)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dump = dir.path().join("d");
        c.snapshot(&dump).await.unwrap();
        let mut bytes = std::fs::read(&dump).unwrap();
        let n = bytes.len();
        bytes.truncate(n * 2 / 3);
        std::fs::write(&dump, &bytes).unwrap();
        assert!(inspect(&dump).await.is_err());
    }
}
