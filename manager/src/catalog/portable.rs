//! The catalog as both engines run it: every method whose SQL SQLite and
//! PostgreSQL take as written, and the helpers the books' methods share,
//! kept once so that a fix to a query or to the books is made once.
//!
//! Each backend expands [`portable_helpers!`] at the top of its module and
//! [`portable_impl!`] with the methods only it has (claiming a job,
//! syncing the node list, snapshots, its checks). The expansion relies on
//! what the backend's module holds:
//!
//! - `self.pool` and `self.begin_write()`, which opens a transaction
//!   holding the engine's writer lock (SQLite's `BEGIN IMMEDIATE`,
//!   PostgreSQL's advisory lock) and returns `(guard, transaction)`;
//! - four names for what the engines spell differently: `GREATEST` and
//!   `LEAST` (SQLite's two-argument `MAX`, `MIN`), `STRPOS` (`instr`) and
//!   `ROW_ID` (`rowid`, `ctid`).
//!
//! Placeholders are `$N`: PostgreSQL's own, and sqlx binds them by number
//! on SQLite too. Integers that sums return are `CAST … AS BIGINT`
//! (PostgreSQL's `SUM` of a `BIGINT` is a `NUMERIC`).

/// The books' shared helpers and the column lists, for engine `$db`.
macro_rules! portable_helpers {
    ($db:ty) => {
        /// One entry of an incident's timeline, inside the caller's transaction.
        async fn insert_incident_update(
            tx: &mut Transaction<'static, $db>,
            id: i64,
            at: i64,
            status: &str,
            body: &str,
            author: &str,
        ) -> sqlx::Result<()> {
            sqlx::query(
                "INSERT INTO incident_updates (incident_id, at, status, body, author) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(at)
            .bind(status)
            .bind(body)
            .bind(author)
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        /// One movement inside the caller's transaction: the guarded balance
        /// update, then the ledger row. Returns the balance after.
        async fn post(tx: &mut Transaction<'static, $db>, e: &Entry<'_>) -> Result<i64, TxError> {
            let row: Option<(i64,)> = sqlx::query_as(
                "UPDATE users SET balance = balance + $1
                 WHERE id = $2 AND balance + $1 >= 0 AND balance + $1 <= $3 RETURNING balance",
            )
            .bind(e.amount)
            .bind(e.account)
            .bind(MAX_BALANCE)
            .fetch_optional(&mut **tx)
            .await?;
            let Some((after,)) = row else {
                let bal: Option<(i64,)> = sqlx::query_as("SELECT balance FROM users WHERE id = $1")
                    .bind(e.account)
                    .fetch_optional(&mut **tx)
                    .await?;
                return Err(TxError::Refused(match bal {
                    None => Refused::NoAccount,
                    Some(_) if e.amount > 0 => Refused::TooRich,
                    Some((balance,)) => Refused::Insufficient {
                        balance,
                        needed: -e.amount,
                    },
                }));
            };
            sqlx::query(
                "INSERT INTO ledger (account_id, amount, kind, reference, idem_key, actor, reason, balance_after, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(e.account)
            .bind(e.amount)
            .bind(e.kind)
            .bind(e.reference)
            .bind(e.idem_key)
            .bind(e.actor)
            .bind(e.reason)
            .bind(after)
            .bind(now())
            .execute(&mut **tx)
            .await?;
            Ok(after)
        }

        async fn entry_exists(tx: &mut Transaction<'static, $db>, key: &str) -> sqlx::Result<bool> {
            let r: Option<(i64,)> = sqlx::query_as("SELECT id FROM ledger WHERE idem_key = $1")
                .bind(key)
                .fetch_optional(&mut **tx)
                .await?;
            Ok(r.is_some())
        }

        const APPROVALS: &str = "SELECT a.owner_id, a.daily_cap, a.via_terminal, a.created_at,
             (SELECT CAST(COALESCE(SUM(g.price), 0) AS BIGINT) FROM play_grants g
              WHERE g.buyer_id = a.user_id AND g.terminal_owner_id = a.owner_id
                AND g.created_at > $1 AND g.state = 'active') AS spent_24h
             FROM terminal_approvals a WHERE a.user_id = $2";

        /// `state` reads `withdrawn` while an operator has the movie withdrawn
        /// (migrations/0010_console.sql), so every check of "published" refuses it.
        const ASSET_COLS: &str = "id, owner_id, title,
            CASE WHEN withdrawn_at IS NULL THEN state ELSE 'withdrawn' END AS state, progress, error_code, error_message, source_name,
            source_bytes, blob_id, sealed_len, plain_len, wrapped_key, width, height, duration_secs, created_at, attempts,
            price, price_epoch, worker";

        const ASSET_LINE_COLS: &str = "a.id, a.title, a.owner_id, u.email AS owner_email,
            CASE WHEN a.withdrawn_at IS NULL THEN a.state ELSE 'withdrawn' END AS state, a.created_at, a.sealed_len,
            (SELECT count(*) FROM replicas r WHERE r.asset_id = a.id AND r.state = 'verified') AS verified_copies,
            (SELECT count(*) FROM replicas r WHERE r.asset_id = a.id AND r.state <> 'retired') AS copies,
            a.withdrawn_at, a.withdrawn_reason";
    };
}
pub(super) use portable_helpers;

/// `impl Catalog for $t`: the methods both engines run as written, then
/// the backend's own (`async_trait` must see them all in one impl).
macro_rules! portable_impl {
    ($t:ty; $($own:tt)*) => {
        #[async_trait::async_trait]
        impl Catalog for $t {
        async fn set_password(&self, email: &str, password_hash: &str) -> sqlx::Result<bool> {
            let db = &self.pool;
            let r = sqlx::query("UPDATE users SET password_hash = $1 WHERE email = $2")
                .bind(password_hash)
                .bind(email)
                .execute(db)
                .await?;
            Ok(r.rows_affected() == 1)
        }

        async fn user_by_email(&self, email: &str) -> sqlx::Result<Option<User>> {
            let db = &self.pool;
            sqlx::query_as(
                "SELECT id, email, password_hash, role, disabled_at IS NOT NULL AS disabled
                 FROM users WHERE email = $1",
            )
            .bind(email)
            .fetch_optional(db)
            .await
        }

        async fn insert_session(
            &self,
            token_hash: &str,
            user_id: i64,
            csrf: &str,
            expires_at: i64,
        ) -> sqlx::Result<()> {
            let db = &self.pool;
            sqlx::query(
                "INSERT INTO sessions (token_hash, user_id, csrf, expires_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(token_hash)
            .bind(user_id)
            .bind(csrf)
            .bind(expires_at)
            .execute(db)
            .await?;
            Ok(())
        }

        async fn delete_session(&self, token_hash: &str) -> sqlx::Result<()> {
            let db = &self.pool;
            sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
                .bind(token_hash)
                .execute(db)
                .await?;
            Ok(())
        }

        async fn session_user(&self, token_hash: &str) -> sqlx::Result<Option<(User, String)>> {
            let db = &self.pool;
            let row: Option<(i64, String, String, Role, String)> = sqlx::query_as(
                "SELECT u.id, u.email, u.password_hash, u.role, s.csrf FROM sessions s
                 JOIN users u ON u.id = s.user_id
                 WHERE s.token_hash = $1 AND s.expires_at > $2 AND u.disabled_at IS NULL",
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
                        disabled: false,
                    },
                    csrf,
                )
            }))
        }

        async fn insert_api_token(
            &self,
            token_hash: &str,
            user_id: i64,
            label: &str,
        ) -> sqlx::Result<()> {
            let db = &self.pool;
            sqlx::query(
                "INSERT INTO api_tokens (token_hash, user_id, label, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(token_hash)
            .bind(user_id)
            .bind(label)
            .bind(now())
            .execute(db)
            .await?;
            Ok(())
        }

        async fn api_token_user(&self, token_hash: &str) -> sqlx::Result<Option<User>> {
            let db = &self.pool;
            sqlx::query_as(
                "SELECT u.id, u.email, u.password_hash, u.role FROM api_tokens t
                 JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1 AND u.disabled_at IS NULL",
            )
            .bind(token_hash)
            .fetch_optional(db)
            .await
        }

        async fn insert_asset(
            &self,
            id: &str,
            owner_id: i64,
            title: &str,
            source_name: &str,
            source_bytes: i64,
        ) -> sqlx::Result<()> {
            let db = &self.pool;
            let t = now();
            sqlx::query(
                "INSERT INTO assets (id, owner_id, title, state, source_name, source_bytes, created_at, updated_at)
                 VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7)",
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

        async fn asset(&self, id: &str) -> sqlx::Result<Option<Asset>> {
            let db = &self.pool;
            sqlx::query_as(&format!("SELECT {ASSET_COLS} FROM assets WHERE id = $1"))
                .bind(id)
                .fetch_optional(db)
                .await
        }

        async fn published_assets(&self, limit: i64) -> sqlx::Result<Vec<Asset>> {
            let db = &self.pool;
            sqlx::query_as(&format!(
                "SELECT {ASSET_COLS} FROM assets WHERE state = 'published' AND withdrawn_at IS NULL
                 ORDER BY created_at DESC LIMIT $1"
            ))
            .bind(limit)
            .fetch_all(db)
            .await
        }

        async fn published_page(
            &self,
            after: Option<(i64, String)>,
            search: Option<&str>,
            limit: i64,
        ) -> sqlx::Result<Vec<Asset>> {
            let db = &self.pool;
            // One statement per shape, so each plans on the index
            // (`assets_published`) rather than around an `$n IS NULL`.
            let mut sql = format!(
                "SELECT {ASSET_COLS} FROM assets WHERE state = 'published' AND withdrawn_at IS NULL"
            );
            let mut n = 1;
            if after.is_some() {
                // The first condition bounds the index scan; the second
                // breaks ties in time by id.
                sql += &format!(
                    " AND created_at <= ${n} AND (created_at < ${n} OR id < ${})",
                    n + 1
                );
                n += 2;
            }
            // Both sides go through the engine's own LOWER, so whatever it
            // folds (SQLite: ASCII; PostgreSQL: the database's locale) it
            // folds alike.
            let pattern = search.map(|s| {
                let escaped: String = s
                    .chars()
                    .flat_map(|c| match c {
                        '%' | '_' | '\\' => vec!['\\', c],
                        c => vec![c],
                    })
                    .collect();
                format!("%{escaped}%")
            });
            if pattern.is_some() {
                sql += &format!(" AND LOWER(title) LIKE LOWER(${n}) ESCAPE '\\'");
                n += 1;
            }
            sql += &format!(" ORDER BY created_at DESC, id DESC LIMIT ${n}");
            let mut q = sqlx::query_as(&sql);
            if let Some((at, id)) = after {
                q = q.bind(at).bind(id);
            }
            if let Some(p) = pattern {
                q = q.bind(p);
            }
            q.bind(limit).fetch_all(db).await
        }

        async fn owner_movies(
            &self,
            owner_id: i64,
            after: Option<(i64, String)>,
            limit: i64,
        ) -> sqlx::Result<Vec<OwnerMovie>> {
            let (at, id) = after.unwrap_or((i64::MAX, String::new()));
            sqlx::query_as(
                "SELECT a.id, a.title,
                   CASE WHEN a.withdrawn_at IS NULL THEN a.state ELSE 'withdrawn' END AS state,
                   a.created_at, a.price,
                   (SELECT CAST(COUNT(*) AS BIGINT) FROM replicas r
                     WHERE r.asset_id = a.id AND r.state = 'verified') AS copies,
                   (SELECT CAST(COUNT(*) AS BIGINT) FROM play_grants g
                     WHERE g.asset_id = a.id AND g.state = 'active') AS views,
                   (SELECT CAST(COALESCE(SUM(g.seller_share), 0) AS BIGINT) FROM play_grants g
                     WHERE g.asset_id = a.id AND g.state = 'active') AS earned
                 FROM assets a
                 WHERE a.owner_id = $1
                   AND (a.created_at < $2 OR (a.created_at = $2 AND a.id < $3) OR $3 = '')
                 ORDER BY a.created_at DESC, a.id DESC LIMIT $4",
            )
            .bind(owner_id)
            .bind(at)
            .bind(id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
        }

        async fn history_page(
            &self,
            account: i64,
            before: Option<i64>,
            limit: i64,
        ) -> sqlx::Result<Vec<LedgerRow>> {
            sqlx::query_as(
                "SELECT id, amount, kind, reference, actor, reason, balance_after, created_at FROM ledger
                 WHERE account_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
            )
            .bind(account)
            .bind(before.unwrap_or(i64::MAX))
            .bind(limit)
            .fetch_all(&self.pool)
            .await
        }

        async fn assets_of(&self, owner_id: i64, limit: i64) -> sqlx::Result<Vec<Asset>> {
            let db = &self.pool;
            sqlx::query_as(&format!(
                "SELECT {ASSET_COLS} FROM assets WHERE owner_id = $1 ORDER BY created_at DESC LIMIT $2"
            ))
            .bind(owner_id)
            .bind(limit)
            .fetch_all(db)
            .await
        }

        async fn renew_lease(&self, id: &str, worker: &str, lease_secs: i64) -> sqlx::Result<bool> {
            let db = &self.pool;
            let (cancel,): (i64,) = sqlx::query_as(
                "UPDATE assets SET lease_until = $1
                 WHERE id = $2 AND (worker IS NULL OR worker = $3) RETURNING cancel_requested",
            )
            .bind(now() + lease_secs)
            .bind(id)
            .bind(worker)
            .fetch_one(db)
            .await?;
            Ok(cancel == 1)
        }

        async fn start_sealing(&self, id: &str, worker: &str) -> sqlx::Result<bool> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE assets SET state = 'sealing', progress = 0, updated_at = $1
                 WHERE id = $2 AND state = 'transcoding' AND cancel_requested = 0
                 AND (worker IS NULL OR worker = $3)",
            )
            .bind(now())
            .bind(id)
            .bind(worker)
            .execute(db)
            .await?;
            if r.rows_affected() == 1 {
                return Ok(true);
            }
            // Not moved: cancelled (`false`), or no longer this worker's.
            let (holder,): (Option<String>,) =
                sqlx::query_as("SELECT worker FROM assets WHERE id = $1")
                    .bind(id)
                    .fetch_one(db)
                    .await?;
            match holder {
                Some(h) if h != worker => Err(sqlx::Error::RowNotFound),
                _ => Ok(false),
            }
        }

        async fn cancel_requested(&self, id: &str) -> sqlx::Result<bool> {
            let db = &self.pool;
            let row: Option<(i64,)> =
                sqlx::query_as("SELECT cancel_requested FROM assets WHERE id = $1")
                    .bind(id)
                    .fetch_optional(db)
                    .await?;
            Ok(matches!(row, Some((1,))))
        }

        async fn requeue(&self, id: &str, worker: &str) -> sqlx::Result<()> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE assets SET state = 'queued', progress = 0, lease_until = 0, updated_at = $1
                 WHERE id = $2 AND (worker IS NULL OR worker = $3)",
            )
            .bind(now())
            .bind(id)
            .bind(worker)
            .execute(db)
            .await?;
            held(r.rows_affected())
        }

        async fn request_cancel(&self, id: &str) -> sqlx::Result<CancelOutcome> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE assets SET state = 'rejected', error_code = 'cancelled', error_message = 'Cancelled by its uploader.',
                 updated_at = $1 WHERE id = $2 AND state = 'queued'",
            )
            .bind(now())
            .bind(id)
            .execute(db)
            .await?;
            if r.rows_affected() == 1 {
                return Ok(CancelOutcome::Cancelled);
            }
            let r = sqlx::query(
                "UPDATE assets SET cancel_requested = 1, updated_at = $1 WHERE id = $2 AND state IN ('probing', 'transcoding')",
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

        async fn retry_failed(&self, id: &str) -> sqlx::Result<bool> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE assets SET state = 'queued', attempts = 0, next_try = 0, lease_until = 0, progress = 0,
                 error_code = NULL, error_message = NULL, cancel_requested = 0, updated_at = $1
                 WHERE id = $2 AND state = 'rejected' AND error_code = 'processing_failed'",
            )
            .bind(now())
            .bind(id)
            .execute(db)
            .await?;
            Ok(r.rows_affected() == 1)
        }

        async fn retry_later(&self, id: &str, worker: &str, delay_secs: i64) -> sqlx::Result<i64> {
            let db = &self.pool;
            let t = now();
            let (attempts,): (i64,) = sqlx::query_as(
                "UPDATE assets SET state = 'queued', progress = 0, attempts = attempts + 1, next_try = $1, updated_at = $2
                 WHERE id = $3 AND (worker IS NULL OR worker = $4) RETURNING attempts",
            )
            .bind(t + delay_secs)
            .bind(t)
            .bind(id)
            .bind(worker)
            .fetch_one(db)
            .await?;
            Ok(attempts)
        }

        async fn requeue_interrupted(&self) -> sqlx::Result<u64> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE assets SET state = 'queued', progress = 0, lease_until = 0, updated_at = $1
                 WHERE state IN ('probing', 'transcoding', 'sealing')
                   AND (worker IS NULL OR substr(worker, 1, 7) <> 'runner/')",
            )
            .bind(now())
            .execute(db)
            .await?;
            Ok(r.rows_affected())
        }

        async fn set_state(
            &self,
            id: &str,
            worker: &str,
            state: crate::domain::AssetState,
        ) -> sqlx::Result<()> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE assets SET state = $1, progress = 0, updated_at = $2
                 WHERE id = $3 AND (worker IS NULL OR worker = $4)",
            )
            .bind(state)
            .bind(now())
            .bind(id)
            .bind(worker)
            .execute(db)
            .await?;
            held(r.rows_affected())
        }

        async fn set_progress(&self, id: &str, progress: f64) -> sqlx::Result<()> {
            let db = &self.pool;
            sqlx::query("UPDATE assets SET progress = $1, updated_at = $2 WHERE id = $3")
                .bind(progress)
                .bind(now())
                .bind(id)
                .execute(db)
                .await?;
            Ok(())
        }

        async fn reject(&self, id: &str, worker: &str, code: &str, message: &str) -> sqlx::Result<()> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE assets SET state = 'rejected', error_code = $1, error_message = $2, progress = 0, updated_at = $3
                 WHERE id = $4 AND (worker IS NULL OR worker = $5)",
            )
            .bind(code)
            .bind(message)
            .bind(now())
            .bind(id)
            .bind(worker)
            .execute(db)
            .await?;
            held(r.rows_affected())
        }

        async fn set_media_info(
            &self,
            id: &str,
            worker: &str,
            width: u32,
            height: u32,
            duration: f64,
        ) -> sqlx::Result<()> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE assets SET width = $1, height = $2, duration_secs = $3, updated_at = $4
                 WHERE id = $5 AND (worker IS NULL OR worker = $6)",
            )
            .bind(width as i64)
            .bind(height as i64)
            .bind(duration)
            .bind(now())
            .bind(id)
            .bind(worker)
            .execute(db)
            .await?;
            held(r.rows_affected())
        }

        async fn record_sealed(
            &self,
            id: &str,
            worker: &str,
            blob_id: &str,
            sealed_len: u64,
            plain_len: u64,
            wrapped_key: &[u8],
            nodes: &[String],
        ) -> sqlx::Result<()> {
            let db = &self.pool;
            let t = now();
            let mut tx = db.begin().await?;
            let r = sqlx::query(
                "UPDATE assets SET state = 'replicating', progress = 0, blob_id = $1, sealed_len = $2, plain_len = $3,
                 wrapped_key = $4, updated_at = $5 WHERE id = $6 AND (worker IS NULL OR worker = $7)",
            )
            .bind(blob_id)
            .bind(sealed_len as i64)
            .bind(plain_len as i64)
            .bind(wrapped_key)
            .bind(t)
            .bind(id)
            .bind(worker)
            .execute(&mut *tx)
            .await?;
            held(r.rows_affected())?;
            for n in nodes {
                sqlx::query(
                    "INSERT INTO replicas (asset_id, node, state, updated_at) VALUES ($1, $2, 'pending', $3)
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

        async fn replicas(&self, asset_id: &str) -> sqlx::Result<Vec<Replica>> {
            let db = &self.pool;
            sqlx::query_as(
                "SELECT asset_id, node, state, attempts, last_error, verified_at FROM replicas WHERE asset_id = $1 ORDER BY node",
            )
            .bind(asset_id)
            .fetch_all(db)
            .await
        }

        async fn due_replicas(&self) -> sqlx::Result<Vec<Replica>> {
            let db = &self.pool;
            sqlx::query_as(
                "SELECT r.asset_id, r.node, r.state, r.attempts, r.last_error, r.verified_at FROM replicas r
                 JOIN assets a ON a.id = r.asset_id
                 WHERE r.state IN ('pending', 'failed', 'repairing') AND r.next_try <= $1
                   AND a.state IN ('replicating', 'published')
                 ORDER BY r.next_try LIMIT 100",
            )
            .bind(now())
            .fetch_all(db)
            .await
        }

        async fn replica_verified(&self, asset_id: &str, node: &str) -> sqlx::Result<()> {
            let db = &self.pool;
            sqlx::query(
                "UPDATE replicas SET state = 'verified', last_error = NULL, attempts = attempts + 1, updated_at = $1,
                 verified_at = $2 WHERE asset_id = $3 AND node = $4",
            )
            .bind(now())
            .bind(now())
            .bind(asset_id)
            .bind(node)
            .execute(db)
            .await?;
            Ok(())
        }

        async fn replica_failed(
            &self,
            asset_id: &str,
            node: &str,
            error: &str,
            next_try: i64,
        ) -> sqlx::Result<()> {
            let db = &self.pool;
            sqlx::query(
                "UPDATE replicas SET state = CASE WHEN state = 'repairing' THEN 'repairing' ELSE 'failed' END,
                 last_error = $1, attempts = attempts + 1, next_try = $2, updated_at = $3
                 WHERE asset_id = $4 AND node = $5",
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

        async fn publish_if_replicated(
            &self,
            asset_id: &str,
            min_replicas: usize,
        ) -> sqlx::Result<bool> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE assets SET state = 'published', updated_at = $1
                 WHERE id = $2 AND state = 'replicating'
                   AND (SELECT COUNT(*) FROM replicas WHERE asset_id = $3 AND state = 'verified') >= $4",
            )
            .bind(now())
            .bind(asset_id)
            .bind(asset_id)
            .bind(min_replicas as i64)
            .execute(db)
            .await?;
            Ok(r.rows_affected() == 1)
        }

        async fn all_verified(&self, asset_id: &str) -> sqlx::Result<bool> {
            let db = &self.pool;
            let (n,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM replicas WHERE asset_id = $1 AND state NOT IN ('verified', 'retired')",
            )
            .bind(asset_id)
            .fetch_one(db)
            .await?;
            Ok(n == 0)
        }

        async fn mirrored_assets(&self) -> sqlx::Result<Vec<MirroredAsset>> {
            let db = &self.pool;
            sqlx::query_as(
                "SELECT id, state, blob_id, COALESCE(sealed_len, 0) AS sealed_len FROM assets
                 WHERE blob_id IS NOT NULL AND state IN ('replicating', 'published', 'damaged')",
            )
            .fetch_all(db)
            .await
        }

        async fn referenced_blobs(&self) -> sqlx::Result<std::collections::HashSet<String>> {
            let db = &self.pool;
            let rows: Vec<(String,)> =
                sqlx::query_as("SELECT DISTINCT blob_id FROM assets WHERE blob_id IS NOT NULL")
                    .fetch_all(db)
                    .await?;
            Ok(rows.into_iter().map(|(b,)| b).collect())
        }

        async fn verified_copies_by_blob(
            &self,
        ) -> sqlx::Result<std::collections::HashMap<String, i64>> {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT a.blob_id, COUNT(DISTINCT r.node) FROM assets a
                 LEFT JOIN replicas r ON r.asset_id = a.id AND r.state = 'verified'
                 WHERE a.blob_id IS NOT NULL GROUP BY a.blob_id",
            )
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.into_iter().collect())
        }

        async fn mirrored_replicas(&self) -> sqlx::Result<Vec<Replica>> {
            let db = &self.pool;
            sqlx::query_as(
                "SELECT r.asset_id, r.node, r.state, r.attempts, r.last_error, r.verified_at FROM replicas r
                 JOIN assets a ON a.id = r.asset_id
                 WHERE a.blob_id IS NOT NULL AND a.state IN ('replicating', 'published', 'damaged')",
            )
            .fetch_all(db)
            .await
        }

        async fn replica_lost(
            &self,
            asset_id: &str,
            node: &str,
            reason: &str,
            observed_before: i64,
        ) -> sqlx::Result<bool> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE replicas SET state = 'repairing', last_error = $1, attempts = 0, next_try = 0, updated_at = $2
                 WHERE asset_id = $3 AND node = $4 AND state = 'verified' AND COALESCE(verified_at, 0) < $5",
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

        async fn replicas_quarantined(
            &self,
            node: &str,
            blob_id: &str,
            reason: &str,
        ) -> sqlx::Result<Vec<String>> {
            let db = &self.pool;
            let rows: Vec<(String,)> = sqlx::query_as(
                "UPDATE replicas SET state = 'repairing', last_error = $1, attempts = 0, next_try = 0, updated_at = $2
                 WHERE node = $3 AND state IN ('verified', 'pending', 'failed')
                   AND asset_id IN (SELECT id FROM assets WHERE blob_id = $4)
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

        async fn replica_seen_good(
            &self,
            asset_id: &str,
            node: &str,
            node_verified_at: Option<i64>,
        ) -> sqlx::Result<bool> {
            let db = &self.pool;
            let r = sqlx::query(&format!(
                "UPDATE replicas SET state = 'verified', last_error = NULL, updated_at = $1,
                 verified_at = {GREATEST}(COALESCE(verified_at, 0), COALESCE($2, 0))
                 WHERE asset_id = $3 AND node = $4 AND state IN ('pending', 'failed', 'repairing')"
            ))
            .bind(now())
            .bind(node_verified_at)
            .bind(asset_id)
            .bind(node)
            .execute(db)
            .await?;
            if r.rows_affected() == 1 {
                return Ok(true);
            }
            sqlx::query(&format!(
                "UPDATE replicas SET verified_at = {GREATEST}(COALESCE(verified_at, 0), COALESCE($1, 0))
                 WHERE asset_id = $2 AND node = $3 AND state = 'verified'"
            ))
            .bind(node_verified_at)
            .bind(asset_id)
            .bind(node)
            .execute(db)
            .await?;
            Ok(false)
        }

        async fn refresh_verified_at(&self, node: &str, seen: &[(String, i64)]) -> sqlx::Result<u64> {
            let mut changed = 0;
            // A thousand primary-key updates per commit: one fsync each, and
            // the write lock is never held long enough to stall a purchase.
            for chunk in seen.chunks(1000) {
                let (_writer, mut tx) = self.begin_write().await?;
                for (asset, at) in chunk {
                    changed += sqlx::query(
                        "UPDATE replicas SET verified_at = $1
                         WHERE asset_id = $2 AND node = $3 AND state = 'verified'
                           AND COALESCE(verified_at, 0) < $1",
                    )
                    .bind(at)
                    .bind(asset)
                    .bind(node)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
                tx.commit().await?;
            }
            Ok(changed)
        }

        async fn prune_view_events(&self, before: i64) -> sqlx::Result<u64> {
            let mut gone = 0;
            // In slices, each its own transaction: a year of views deleted at
            // once would hold the write lock for seconds.
            loop {
                let (_writer, mut tx) = self.begin_write().await?;
                let n = sqlx::query(&format!(
                    "DELETE FROM view_events WHERE {ROW_ID} IN
                       (SELECT {ROW_ID} FROM view_events WHERE last_at < $1 AND after_refund = 0 LIMIT 5000)"
                ))
                .bind(before)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                tx.commit().await?;
                gone += n;
                if n < 5000 {
                    return Ok(gone);
                }
            }
        }

        async fn replicas_due_now(&self, node: &str) -> sqlx::Result<u64> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE replicas SET next_try = 0 WHERE node = $1 AND state IN ('pending', 'failed', 'repairing')
                 AND next_try > 0",
            )
            .bind(node)
            .execute(db)
            .await?;
            Ok(r.rows_affected())
        }

        async fn mark_damaged(&self, asset_id: &str) -> sqlx::Result<bool> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE assets SET state = 'damaged', error_code = 'movie_damaged',
                 error_message = 'Every stored copy of this movie is lost or corrupt; an operator must restore it.',
                 updated_at = $1
                 WHERE id = $2 AND state IN ('replicating', 'published')
                   AND NOT EXISTS (SELECT 1 FROM replicas WHERE asset_id = $3 AND state = 'verified')",
            )
            .bind(now())
            .bind(asset_id)
            .bind(asset_id)
            .execute(db)
            .await?;
            Ok(r.rows_affected() == 1)
        }

        async fn undamage(&self, asset_id: &str) -> sqlx::Result<bool> {
            let db = &self.pool;
            let r = sqlx::query(
                "UPDATE assets SET state = 'replicating', error_code = NULL, error_message = NULL, updated_at = $1
                 WHERE id = $2 AND state = 'damaged'",
            )
            .bind(now())
            .bind(asset_id)
            .execute(db)
            .await?;
            Ok(r.rows_affected() == 1)
        }

        async fn note_unreferenced(&self, node: &str, blob_id: &str, size: i64) -> sqlx::Result<i64> {
            let db = &self.pool;
            let t = now();
            let (first,): (i64,) = sqlx::query_as(
                "INSERT INTO unreferenced_blobs (node, blob_id, size, first_seen_at, last_seen_at)
                 VALUES ($1, $2, $3, $4, $5)
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

        async fn forget_unreferenced(&self, node: &str, before: i64) -> sqlx::Result<()> {
            let db = &self.pool;
            sqlx::query("DELETE FROM unreferenced_blobs WHERE node = $1 AND last_seen_at < $2")
                .bind(node)
                .bind(before)
                .execute(db)
                .await?;
            Ok(())
        }

        async fn drop_unreferenced(&self, node: &str, blob_id: &str) -> sqlx::Result<()> {
            let db = &self.pool;
            sqlx::query("DELETE FROM unreferenced_blobs WHERE node = $1 AND blob_id = $2")
                .bind(node)
                .bind(blob_id)
                .execute(db)
                .await?;
            Ok(())
        }

        async fn asset_state_counts(&self) -> sqlx::Result<Vec<(String, i64)>> {
            let db = &self.pool;
            sqlx::query_as(
                "SELECT CASE WHEN withdrawn_at IS NULL THEN state ELSE 'withdrawn' END AS s, COUNT(*)
                 FROM assets GROUP BY s",
            )
            .fetch_all(db)
            .await
        }

        async fn health_check(&self) -> anyhow::Result<()> {
            let db = &self.pool;
            let id = uuid::Uuid::new_v4().to_string();
            let mut tx = db.begin().await?;
            sqlx::query("INSERT INTO health_probe (id, at) VALUES ($1, $2)")
                .bind(&id)
                .bind(now())
                .execute(&mut *tx)
                .await?;
            let (back,): (String,) = sqlx::query_as("SELECT id FROM health_probe WHERE id = $1")
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?;
            anyhow::ensure!(back == id, "read back a different row");
            sqlx::query("DELETE FROM health_probe WHERE id = $1")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        }

        async fn insert_terminal(
            &self,
            id: &str,
            owner_id: i64,
            name: &str,
            wrapped_secret: &[u8],
        ) -> sqlx::Result<()> {
            let db = &self.pool;
            sqlx::query("INSERT INTO terminals (id, owner_id, name, wrapped_secret, created_at) VALUES ($1, $2, $3, $4, $5)")
                .bind(id)
                .bind(owner_id)
                .bind(name)
                .bind(wrapped_secret)
                .bind(now())
                .execute(db)
                .await?;
            Ok(())
        }

        async fn terminal(&self, id: &str) -> sqlx::Result<Option<Terminal>> {
            let db = &self.pool;
            // A disabled owner's terminals stop selling (migrations/0010).
            sqlx::query_as(
                "SELECT t.id, t.owner_id, t.name, t.wrapped_secret, t.created_at, t.last_used_at
                 FROM terminals t JOIN users u ON u.id = t.owner_id
                 WHERE t.id = $1 AND u.disabled_at IS NULL",
            )
            .bind(id)
            .fetch_optional(db)
            .await
        }

        async fn terminals_of(&self, owner_id: i64) -> sqlx::Result<Vec<Terminal>> {
            let db = &self.pool;
            sqlx::query_as(
                "SELECT id, owner_id, name, wrapped_secret, created_at, last_used_at FROM terminals
                 WHERE owner_id = $1 ORDER BY created_at DESC",
            )
            .bind(owner_id)
            .fetch_all(db)
            .await
        }

        async fn delete_terminal(&self, id: &str, owner_id: i64) -> sqlx::Result<bool> {
            let db = &self.pool;
            let r = sqlx::query("DELETE FROM terminals WHERE id = $1 AND owner_id = $2")
                .bind(id)
                .bind(owner_id)
                .execute(db)
                .await?;
            Ok(r.rows_affected() == 1)
        }

        // ---- transcode workers ----

        async fn insert_transcoder_token(
            &self,
            token_hash: &str,
            expires_at: i64,
            created_by: &str,
        ) -> sqlx::Result<()> {
            sqlx::query(
                "INSERT INTO transcoder_tokens (token_hash, created_at, expires_at, created_by) VALUES ($1, $2, $3, $4)",
            )
            .bind(token_hash)
            .bind(now())
            .bind(expires_at)
            .bind(created_by)
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn transcoder_token_live(&self, token_hash: &str) -> sqlx::Result<bool> {
            let row: Option<(i64,)> = sqlx::query_as(
                "SELECT expires_at FROM transcoder_tokens
                 WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2",
            )
            .bind(token_hash)
            .bind(now())
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.is_some())
        }

        async fn register_transcoder(
            &self,
            token_hash: &str,
            name: &str,
            wrapped_secret: &[u8],
        ) -> sqlx::Result<RegisterOutcome> {
            let t = now();
            let (_writer, mut tx) = self.begin_write().await?;
            let by: Option<(String,)> = sqlx::query_as(
                "UPDATE transcoder_tokens SET used_at = $1, used_by = $2
                 WHERE token_hash = $3 AND used_at IS NULL AND expires_at > $4 RETURNING created_by",
            )
            .bind(t)
            .bind(name)
            .bind(token_hash)
            .bind(t)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((by,)) = by else {
                return Ok(RegisterOutcome::TokenInvalid);
            };
            // A revoked name may come back with a new secret; a live one
            // is never replaced.
            let r = sqlx::query(
                "INSERT INTO transcoders (name, wrapped_secret, registered_at, registered_by)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET wrapped_secret = excluded.wrapped_secret,
                     registered_at = excluded.registered_at, registered_by = excluded.registered_by,
                     last_seen_at = NULL, revoked_at = NULL
                 WHERE transcoders.revoked_at IS NOT NULL",
            )
            .bind(name)
            .bind(wrapped_secret)
            .bind(t)
            .bind(&by)
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() == 0 {
                // Dropped unfinished: the token's use rolls back.
                return Ok(RegisterOutcome::NameTaken);
            }
            tx.commit().await?;
            Ok(RegisterOutcome::Registered)
        }

        async fn transcoder(&self, name: &str) -> sqlx::Result<Option<Transcoder>> {
            sqlx::query_as(
                "SELECT name, wrapped_secret, registered_at, registered_by, last_seen_at, revoked_at
                 FROM transcoders WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(&self.pool)
            .await
        }

        async fn transcoders(&self) -> sqlx::Result<Vec<Transcoder>> {
            sqlx::query_as(
                "SELECT name, wrapped_secret, registered_at, registered_by, last_seen_at, revoked_at
                 FROM transcoders ORDER BY revoked_at IS NOT NULL, name",
            )
            .fetch_all(&self.pool)
            .await
        }

        async fn transcoder_seen(&self, name: &str) -> sqlx::Result<()> {
            let t = now();
            sqlx::query(
                "UPDATE transcoders SET last_seen_at = $1
                 WHERE name = $2 AND (last_seen_at IS NULL OR last_seen_at < $3)",
            )
            .bind(t)
            .bind(name)
            .bind(t - 2)
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn revoke_transcoder(&self, name: &str) -> sqlx::Result<bool> {
            let r = sqlx::query(
                "UPDATE transcoders SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
            )
            .bind(now())
            .bind(name)
            .execute(&self.pool)
            .await?;
            Ok(r.rows_affected() == 1)
        }

        async fn jobs_held(&self, prefix: &str) -> sqlx::Result<i64> {
            // A prefix compared as text: LIKE would read `_` in a name as
            // a wildcard.
            let (n,): (i64,) = sqlx::query_as(
                "SELECT CAST(count(*) AS BIGINT) FROM assets
                 WHERE state IN ('probing', 'transcoding', 'sealing') AND lease_until >= $1
                   AND substr(worker, 1, CAST($2 AS INTEGER)) = $3",
            )
            .bind(now())
            .bind(prefix.chars().count() as i64)
            .bind(prefix)
            .fetch_one(&self.pool)
            .await?;
            Ok(n)
        }

        async fn next_job_id(&self) -> sqlx::Result<Option<String>> {
            let t = now();
            // claim_next's order (each owner's jobs take turns).
            let row: Option<(String,)> = sqlx::query_as(
                "SELECT id FROM (
                   SELECT id, state, next_try, lease_until, priority, created_at,
                          ROW_NUMBER() OVER (PARTITION BY owner_id ORDER BY created_at, id) AS turn
                   FROM assets
                   WHERE state IN ('queued', 'probing', 'transcoding', 'sealing')) waiting
                 WHERE (state = 'queued' AND next_try <= $1)
                    OR (state IN ('probing', 'transcoding', 'sealing') AND lease_until < $2)
                 ORDER BY priority DESC, turn, created_at, id LIMIT 1",
            )
            .bind(t)
            .bind(t)
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.map(|r| r.0))
        }

        async fn claim_job(
            &self,
            id: &str,
            lease_secs: i64,
            worker: &str,
        ) -> sqlx::Result<Option<Asset>> {
            let t = now();
            // One statement: of two workers racing for the job, the second
            // finds the first one's fresh lease (PostgreSQL re-reads the
            // row it waited for) and claims nothing.
            sqlx::query_as(&format!(
                "UPDATE assets SET state = 'probing', progress = 0, lease_until = $1, updated_at = $2,
                                   worker = $3
                 WHERE id = $4
                   AND ((state = 'queued' AND next_try <= $5)
                        OR (state IN ('probing', 'transcoding', 'sealing') AND lease_until < $6))
                 RETURNING {ASSET_COLS}"
            ))
            .bind(t + lease_secs)
            .bind(t)
            .bind(worker)
            .bind(id)
            .bind(t)
            .bind(t)
            .fetch_optional(&self.pool)
            .await
        }

        async fn use_terminal_nonce(
            &self,
            terminal_id: &str,
            nonce: &str,
            window_secs: i64,
        ) -> sqlx::Result<bool> {
            let db = &self.pool;
            let t = now();
            let mut tx = db.begin().await?;
            sqlx::query("DELETE FROM terminal_nonces WHERE seen_at < $1")
                .bind(t - window_secs)
                .execute(&mut *tx)
                .await?;
            let r = sqlx::query(
                "INSERT INTO terminal_nonces (terminal_id, nonce, seen_at) VALUES ($1, $2, $3)
                 ON CONFLICT (terminal_id, nonce) DO NOTHING",
            )
            .bind(terminal_id)
            .bind(nonce)
            .bind(t)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE terminals SET last_used_at = $1 WHERE id = $2")
                .bind(t)
                .bind(terminal_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(r.rows_affected() == 1)
        }

        async fn freeze_refunds(&self, backup_at: i64, restored_at: i64) -> sqlx::Result<()> {
            let db = &self.pool;
            let (safe_until,): (i64,) =
                sqlx::query_as("SELECT COALESCE(MIN(watermark), 0) FROM journal_contacts")
                    .fetch_one(db)
                    .await?;
            sqlx::query(
                "INSERT INTO refund_freeze (backup_at, safe_until, restored_at) VALUES ($1, $2, $3)",
            )
            .bind(backup_at)
            .bind(safe_until.min(backup_at))
            .bind(restored_at)
            .execute(db)
            .await?;
            Ok(())
        }

        async fn set_price(&self, asset_id: &str, price: i64) -> sqlx::Result<()> {
            let db = &self.pool;
            sqlx::query(
                "UPDATE assets SET price_epoch = price_epoch + CASE WHEN price = 0 AND $1 > 0 THEN 1 ELSE 0 END, price = $1
                 WHERE id = $2",
            )
            .bind(price)
            .bind(asset_id)
            .execute(db)
            .await?;
            Ok(())
        }

        async fn paid_epochs(&self) -> sqlx::Result<Vec<(String, i64)>> {
            let db = &self.pool;
            sqlx::query_as("SELECT id, price_epoch FROM assets WHERE price > 0 ORDER BY id")
                .fetch_all(db)
                .await
        }

        async fn replace_link_code(
            &self,
            user_id: i64,
            code_hash: &str,
            expires_at: i64,
        ) -> sqlx::Result<()> {
            let db = &self.pool;
            sqlx::query("DELETE FROM link_codes WHERE user_id = $1 OR expires_at < $2")
                .bind(user_id)
                .bind(now())
                .execute(db)
                .await?;
            sqlx::query("INSERT INTO link_codes (code_hash, user_id, expires_at) VALUES ($1, $2, $3)")
                .bind(code_hash)
                .bind(user_id)
                .bind(expires_at)
                .execute(db)
                .await?;
            Ok(())
        }

        async fn link_avatar(
            &self,
            code_hash: &str,
            avatar: &str,
            via_name: &str,
            via_owner: i64,
        ) -> sqlx::Result<LinkOutcome> {
            // Under the books' lock: two links of one code racing must not
            // both read it live.
            let (_writer, mut tx) = self.begin_write().await?;
            let row: Option<(i64,)> = sqlx::query_as(
                "SELECT user_id FROM link_codes WHERE code_hash = $1 AND expires_at >= $2",
            )
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
                 VALUES ($1, $2, $3, $4, $5)
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
            sqlx::query("DELETE FROM link_codes WHERE code_hash = $1")
                .bind(code_hash)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(LinkOutcome::Linked(user))
        }

        async fn avatar_account(&self, avatar: &str) -> sqlx::Result<Option<i64>> {
            let db = &self.pool;
            let r: Option<(i64,)> =
                // A disabled account's avatar buys nothing (migrations/0010).
                sqlx::query_as(
                    "SELECT l.user_id FROM avatar_links l JOIN users u ON u.id = l.user_id
                     WHERE l.avatar_key = $1 AND u.disabled_at IS NULL",
                )
                    .bind(avatar)
                    .fetch_optional(db)
                    .await?;
            Ok(r.map(|r| r.0))
        }

        async fn unlink_avatar(&self, avatar: &str, user_id: i64) -> sqlx::Result<()> {
            let db = &self.pool;
            sqlx::query("DELETE FROM avatar_links WHERE avatar_key = $1 AND user_id = $2")
                .bind(avatar)
                .bind(user_id)
                .execute(db)
                .await?;
            Ok(())
        }

        async fn avatar_links(&self, user_id: i64) -> sqlx::Result<Vec<AvatarLink>> {
            let db = &self.pool;
            sqlx::query_as(
                "SELECT avatar_key, linked_at, via_terminal, via_owner_id FROM avatar_links
                 WHERE user_id = $1 ORDER BY linked_at",
            )
            .bind(user_id)
            .fetch_all(db)
            .await
        }

        async fn grant_buyer(&self, id: &str) -> sqlx::Result<Option<i64>> {
            let db = &self.pool;
            let r: Option<(i64,)> = sqlx::query_as("SELECT buyer_id FROM play_grants WHERE id = $1")
                .bind(id)
                .fetch_optional(db)
                .await?;
            Ok(r.map(|r| r.0))
        }

        // ---- the books ----

        async fn balance(&self, account: i64) -> sqlx::Result<i64> {
            let (b,): (i64,) = sqlx::query_as("SELECT balance FROM users WHERE id = $1")
                .bind(account)
                .fetch_one(&self.pool)
                .await?;
            Ok(b)
        }

        async fn verify_balances(&self) -> sqlx::Result<Vec<(i64, i64, i64)>> {
            sqlx::query_as(
                "SELECT u.id, u.balance, CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) AS s FROM users u
                 LEFT JOIN ledger l ON l.account_id = u.id GROUP BY u.id HAVING u.balance <> COALESCE(SUM(l.amount), 0)",
            )
            .fetch_all(&self.pool)
            .await
        }

        async fn create_account(
            &self,
            email: &str,
            password_hash: &str,
            role: Role,
            bonus: i64,
        ) -> Result<i64, TxError> {
            let (_writer, mut tx) = self.begin_write().await?;
            let r: sqlx::Result<(i64,)> = sqlx::query_as(
                "INSERT INTO users (email, password_hash, role, created_at) VALUES ($1, $2, $3, $4)
                 RETURNING id",
            )
            .bind(email)
            .bind(password_hash)
            .bind(role)
            .bind(now())
            .fetch_one(&mut *tx)
            .await;
            let id = match r {
                Ok((id,)) => id,
                Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                    return Err(TxError::Refused(Refused::EmailTaken))
                }
                Err(e) => return Err(e.into()),
            };
            if bonus > 0 {
                post(
                    &mut tx,
                    &Entry {
                        account: id,
                        amount: bonus,
                        kind: "signup_bonus",
                        reference: "",
                        idem_key: &format!("signup:{id}"),
                        actor: "system",
                        reason: "signup bonus",
                    },
                )
                .await?;
            }
            tx.commit().await?;
            Ok(id)
        }

        async fn grant_credits(&self, o: &GrantOrder<'_>) -> Result<Vec<i64>, TxError> {
            let (_writer, mut tx) = self.begin_write().await?;
            let accounts: Vec<(i64,)> = match o.to {
                Recipients::Account(id) => vec![(*id,)],
                Recipients::CreatedBefore(t) => {
                    sqlx::query_as("SELECT id FROM users WHERE created_at < $1 ORDER BY id")
                        .bind(t)
                        .fetch_all(&mut *tx)
                        .await?
                }
            };
            let reference = match o.to {
                Recipients::Account(_) => String::new(),
                Recipients::CreatedBefore(t) => format!("rule:created_before:{t}"),
            };
            let mut done = Vec::new();
            for (id,) in accounts {
                let idem = format!("grant:{}:{id}", o.key);
                if entry_exists(&mut tx, &idem).await? {
                    continue;
                }
                post(
                    &mut tx,
                    &Entry {
                        account: id,
                        amount: o.amount,
                        kind: "grant",
                        reference: &reference,
                        idem_key: &idem,
                        actor: o.actor,
                        reason: o.reason,
                    },
                )
                .await?;
                done.push(id);
            }
            tx.commit().await?;
            Ok(done)
        }

        async fn purchase(&self, o: &PurchaseOrder<'_>) -> Result<PurchaseOutcome, TxError> {
            let (_writer, mut tx) = self.begin_write().await?;
            // A concurrent retry of the same request may win the race to here:
            // the grant's UNIQUE request key then refuses our insert below and
            // the whole transaction rolls back.
            let Some((price, seller, state)): Option<(i64, i64, AssetState)> = sqlx::query_as(
                "SELECT price, owner_id,
                            CASE WHEN withdrawn_at IS NULL THEN state ELSE 'withdrawn' END
                     FROM assets WHERE id = $1",
            )
            .bind(o.asset_id)
            .fetch_optional(&mut *tx)
            .await?
            else {
                return Err(TxError::Refused(Refused::NoMovie));
            };
            if state != AssetState::Published {
                return Err(TxError::Refused(Refused::NotPublished));
            }
            if price == 0 || seller == o.buyer {
                let (balance,): (i64,) = sqlx::query_as("SELECT balance FROM users WHERE id = $1")
                    .bind(o.buyer)
                    .fetch_one(&mut *tx)
                    .await?;
                return Ok(PurchaseOutcome::Free { balance });
            }
            if let Some(owner) = o.terminal_owner.filter(|t| *t != o.buyer) {
                // Inside the write transaction: two purchases racing for the
                // last of the cap cannot both see room for themselves.
                let cap: Option<(i64,)> = sqlx::query_as(
                    "SELECT daily_cap FROM terminal_approvals WHERE user_id = $1 AND owner_id = $2",
                )
                .bind(o.buyer)
                .bind(owner)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((cap,)) = cap else {
                    return Err(TxError::Refused(Refused::NotApproved));
                };
                let (spent,): (i64,) = sqlx::query_as(
                    "SELECT CAST(COALESCE(SUM(price), 0) AS BIGINT) FROM play_grants
                     WHERE buyer_id = $1 AND terminal_owner_id = $2 AND created_at > $3 AND state = 'active'",
                )
                .bind(o.buyer)
                .bind(owner)
                .bind(o.now - o.cap_window_secs)
                .fetch_one(&mut *tx)
                .await?;
                if spent + price > cap {
                    return Err(TxError::Refused(Refused::CapReached { cap }));
                }
            }
            let share = price * o.uploader_share_percent / 100;
            let actor = format!("{}:{}", o.source, o.buyer);
            let balance = post(
                &mut tx,
                &Entry {
                    account: o.buyer,
                    amount: -price,
                    kind: "purchase",
                    reference: o.grant_id,
                    idem_key: &format!("purchase:{}", o.grant_id),
                    actor: &actor,
                    reason: o.asset_id,
                },
            )
            .await?;
            if share > 0 {
                post(
                    &mut tx,
                    &Entry {
                        account: seller,
                        amount: share,
                        kind: "sale",
                        reference: o.grant_id,
                        idem_key: &format!("sale:{}", o.grant_id),
                        actor: &actor,
                        reason: o.asset_id,
                    },
                )
                .await?;
            }
            let expires_at = o.now + o.window_secs;
            let inserted = sqlx::query(
                "INSERT INTO play_grants (id, asset_id, buyer_id, seller_id, price, seller_share, request_key,
                 source, created_at, expires_at, terminal_owner_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(o.grant_id)
            .bind(o.asset_id)
            .bind(o.buyer)
            .bind(seller)
            .bind(price)
            .bind(share)
            .bind(o.request_key)
            .bind(o.source)
            .bind(o.now)
            .bind(expires_at)
            .bind(o.terminal_owner)
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => {}
                // Dropping the transaction rolls back the charge.
                Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                    return Err(TxError::Refused(Refused::Duplicate))
                }
                Err(e) => return Err(e.into()),
            }
            tx.commit().await?;
            Ok(PurchaseOutcome::Charged {
                price,
                expires_at,
                balance,
            })
        }

        async fn grant_by_request(&self, request_key: &str) -> sqlx::Result<Option<GrantByKey>> {
            sqlx::query_as(
                "SELECT id, asset_id, price, expires_at, source, terminal_owner_id
                 FROM play_grants WHERE request_key = $1",
            )
            .bind(request_key)
            .fetch_optional(&self.pool)
            .await
        }

        async fn approval(&self, user: i64, owner: i64, since: i64) -> sqlx::Result<Option<Approval>> {
            sqlx::query_as(&format!("{APPROVALS} AND a.owner_id = $3"))
                .bind(since)
                .bind(user)
                .bind(owner)
                .fetch_optional(&self.pool)
                .await
        }

        async fn approvals(&self, user: i64, since: i64) -> sqlx::Result<Vec<Approval>> {
            sqlx::query_as(&format!("{APPROVALS} ORDER BY a.created_at DESC"))
                .bind(since)
                .bind(user)
                .fetch_all(&self.pool)
                .await
        }

        async fn approve(
            &self,
            user: i64,
            owner: i64,
            daily_cap: i64,
            via_terminal: &str,
        ) -> sqlx::Result<()> {
            sqlx::query(
                "INSERT INTO terminal_approvals (user_id, owner_id, daily_cap, via_terminal, created_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (user_id, owner_id) DO UPDATE SET daily_cap = excluded.daily_cap",
            )
            .bind(user)
            .bind(owner)
            .bind(daily_cap)
            .bind(via_terminal)
            .bind(now())
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn revoke(&self, user: i64, owner: i64) -> sqlx::Result<bool> {
            let r = sqlx::query("DELETE FROM terminal_approvals WHERE user_id = $1 AND owner_id = $2")
                .bind(user)
                .bind(owner)
                .execute(&self.pool)
                .await?;
            Ok(r.rows_affected() > 0)
        }

        async fn price(&self, asset_id: &str) -> sqlx::Result<i64> {
            let r: Option<(i64,)> = sqlx::query_as("SELECT price FROM assets WHERE id = $1")
                .bind(asset_id)
                .fetch_optional(&self.pool)
                .await?;
            Ok(r.map(|r| r.0).unwrap_or(0))
        }

        async fn insert_asset_paid(&self, a: &NewAsset<'_>, cost: i64) -> Result<(), TxError> {
            let (_writer, mut tx) = self.begin_write().await?;
            let t = now();
            sqlx::query(
                "INSERT INTO assets (id, owner_id, title, state, source_name, source_bytes, created_at, updated_at)
                 VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7)",
            )
            .bind(a.id)
            .bind(a.owner)
            .bind(a.title)
            .bind(a.source_name)
            .bind(a.source_bytes)
            .bind(t)
            .bind(t)
            .execute(&mut *tx)
            .await?;
            if cost > 0 {
                post(
                    &mut tx,
                    &Entry {
                        account: a.owner,
                        amount: -cost,
                        kind: "upload",
                        reference: a.id,
                        idem_key: &format!("upload:{}", a.id),
                        actor: &format!("user:{}", a.owner),
                        reason: a.title,
                    },
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        }

        async fn unrefunded_rejected_uploads(&self, limit: i64) -> sqlx::Result<Vec<UnrefundedUpload>> {
            sqlx::query_as(
                "SELECT a.id, a.owner_id, -l.amount AS cost FROM assets a
                 JOIN ledger l ON l.idem_key = 'upload:' || a.id
                 WHERE a.state = 'rejected'
                   AND NOT EXISTS (SELECT 1 FROM ledger r WHERE r.idem_key = 'upload-refund:' || a.id)
                 LIMIT $1",
            )
            .bind(limit)
            .fetch_all(&self.pool)
            .await
        }

        async fn refund_upload(&self, u: &UnrefundedUpload, reason: &str) -> Result<bool, TxError> {
            let (_writer, mut tx) = self.begin_write().await?;
            let key = format!("upload-refund:{}", u.id);
            if entry_exists(&mut tx, &key).await? {
                return Ok(false);
            }
            post(
                &mut tx,
                &Entry {
                    account: u.owner_id,
                    amount: u.cost,
                    kind: "refund",
                    reference: &u.id,
                    idem_key: &key,
                    actor: "system",
                    reason,
                },
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        }

        async fn journal_watermarks(&self) -> sqlx::Result<Vec<(String, i64)>> {
            sqlx::query_as("SELECT node, watermark FROM journal_contacts")
                .fetch_all(&self.pool)
                .await
        }

        async fn restores_after(&self, t: i64) -> sqlx::Result<i64> {
            let (n,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM refund_freeze WHERE restored_at > $1")
                    .bind(t)
                    .fetch_one(&self.pool)
                    .await?;
            Ok(n)
        }

        async fn unserved_grants_due(
            &self,
            expired_by: i64,
            grace_secs: i64,
            limit: i64,
        ) -> sqlx::Result<Vec<String>> {
            // Frozen grants are left out here, in the query, so however many
            // there are they never crowd the due ones out of the batch.
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT g.id FROM play_grants g
                 WHERE g.state = 'active' AND g.bytes_served = 0 AND g.expires_at <= $1
                   AND NOT EXISTS (SELECT 1 FROM refund_freeze f
                                   WHERE g.created_at <= f.backup_at AND g.expires_at + $2 > f.safe_until)
                 ORDER BY g.expires_at LIMIT $3",
            )
            .bind(expired_by)
            .bind(grace_secs)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.into_iter().map(|r| r.0).collect())
        }

        async fn refund_grant(&self, grant_id: &str) -> Result<Option<Refunded>, TxError> {
            let (_writer, mut tx) = self.begin_write().await?;
            let row: Option<(i64, i64, i64, i64, String)> = sqlx::query_as(
                "UPDATE play_grants SET state = 'refunded' WHERE id = $1 AND state = 'active' AND bytes_served = 0
                 RETURNING buyer_id, seller_id, price, seller_share, asset_id",
            )
            .bind(grant_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((buyer, seller, price, share, asset)) = row else {
                return Ok(None);
            };
            post(
                &mut tx,
                &Entry {
                    account: buyer,
                    amount: price,
                    kind: "refund",
                    reference: grant_id,
                    idem_key: &format!("refund:{grant_id}"),
                    actor: "system",
                    reason: &format!("nothing of {asset} was served within the grant's window"),
                },
            )
            .await?;
            let mut absorbed = 0;
            if share > 0 {
                let (seller_balance,): (i64,) =
                    sqlx::query_as("SELECT balance FROM users WHERE id = $1")
                        .bind(seller)
                        .fetch_one(&mut *tx)
                        .await?;
                // Balances never go negative: the site absorbs a shortfall,
                // and the entry's reason says so.
                let take = share.min(seller_balance);
                absorbed = share - take.max(0);
                if take > 0 {
                    let reason = if take < share {
                        format!("sale not delivered; {absorbed} credits absorbed by the site")
                    } else {
                        "sale not delivered".to_string()
                    };
                    post(
                        &mut tx,
                        &Entry {
                            account: seller,
                            amount: -take,
                            kind: "sale_reversal",
                            reference: grant_id,
                            idem_key: &format!("reversal:{grant_id}"),
                            actor: "system",
                            reason: &reason,
                        },
                    )
                    .await?;
                }
            }
            tx.commit().await?;
            Ok(Some(Refunded {
                buyer,
                price,
                absorbed,
            }))
        }

        async fn apply_journal(
            &self,
            node: &str,
            events: &[shared::protocol::JournalEvent],
            watermark: i64,
            now: i64,
        ) -> sqlx::Result<JournalApplied> {
            let (_writer, mut tx) = self.begin_write().await?;
            let mut done = JournalApplied::default();
            for e in events {
                let r = sqlx::query(
                    "INSERT INTO view_events (node, event_id, grant_id, asset_id, bytes, first_at, last_at, received_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (node, event_id) DO NOTHING",
                )
                .bind(node)
                .bind(&e.id)
                .bind(&e.grant)
                .bind(&e.asset)
                .bind(e.bytes as i64)
                .bind(e.first_at)
                .bind(e.last_at)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                if r.rows_affected() == 0 {
                    continue;
                }
                done.applied += 1;
                let Some(g) = &e.grant else { continue };
                let refunded: Option<(String,)> = sqlx::query_as(
                    "SELECT state FROM play_grants WHERE id = $1 AND state = 'refunded'",
                )
                .bind(g)
                .fetch_optional(&mut *tx)
                .await?;
                if refunded.is_some() {
                    sqlx::query(
                        "UPDATE view_events SET after_refund = 1 WHERE node = $1 AND event_id = $2",
                    )
                    .bind(node)
                    .bind(&e.id)
                    .execute(&mut *tx)
                    .await?;
                    done.after_refund.push((g.clone(), e.bytes));
                    continue;
                }
                sqlx::query(&format!(
                    "UPDATE play_grants SET bytes_served = bytes_served + $1,
                     first_served_at = {LEAST}(COALESCE(first_served_at, $2), $3),
                     last_served_at = {GREATEST}(COALESCE(last_served_at, $4), $5)
                     WHERE id = $6 AND asset_id = $7"
                ))
                .bind(e.bytes as i64)
                .bind(e.first_at)
                .bind(e.first_at)
                .bind(e.last_at)
                .bind(e.last_at)
                .bind(g)
                .bind(&e.asset)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(&format!(
                "INSERT INTO journal_contacts (node, seen_at, watermark) VALUES ($1, $2, $3)
                 ON CONFLICT (node) DO UPDATE SET seen_at = {GREATEST}(journal_contacts.seen_at, excluded.seen_at),
                 watermark = {GREATEST}(journal_contacts.watermark, excluded.watermark)"
            ))
            .bind(node)
            .bind(now)
            .bind(watermark)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(done)
        }

        async fn history(&self, account: i64, limit: i64) -> sqlx::Result<Vec<LedgerRow>> {
            sqlx::query_as(
                "SELECT id, amount, kind, reference, actor, reason, balance_after, created_at FROM ledger
                 WHERE account_id = $1 ORDER BY id DESC LIMIT $2",
            )
            .bind(account)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
        }

        async fn grant_view(&self, id: &str) -> sqlx::Result<Option<GrantRowView>> {
            sqlx::query_as(
                "SELECT id, asset_id, price, state, expires_at, bytes_served FROM play_grants WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await
        }

        // ---- the operators' console ----

        async fn record_audit(&self, e: &AuditEntry<'_>) -> sqlx::Result<()> {
            sqlx::query(
                "INSERT INTO audit_log (at, actor_id, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(now())
            .bind(e.actor_id)
            .bind(e.actor)
            .bind(e.action)
            .bind(e.target)
            .bind(e.detail)
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn audit_entries(&self, limit: i64) -> sqlx::Result<Vec<AuditRow>> {
            sqlx::query_as(
                "SELECT id, at, actor, action, target, detail FROM audit_log ORDER BY id DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(&self.pool)
            .await
        }

        async fn accounts(&self, search: &str, limit: i64) -> sqlx::Result<Vec<AccountRow>> {
            // A position, not LIKE: a search for "%" or "_" means those characters.
            sqlx::query_as(&format!(
                "SELECT id, email, role, balance, created_at, disabled_at FROM users
                 WHERE $1 = '' OR {STRPOS}(email, lower($1)) > 0 ORDER BY id DESC LIMIT $2"
            ))
            .bind(search)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
        }

        async fn jobs(&self, limit: i64) -> sqlx::Result<Vec<JobRow>> {
            sqlx::query_as(
                "SELECT a.id, a.title, u.email AS owner_email, a.state, a.progress, a.attempts,
                        a.error_code, a.error_message, a.created_at, a.next_try,
                        a.cancel_requested <> 0 AS cancel_requested, a.priority, a.worker
                 FROM assets a JOIN users u ON u.id = a.owner_id
                 WHERE a.state IN ('queued', 'probing', 'transcoding', 'sealing')
                    OR (a.state = 'rejected' AND a.error_code = 'processing_failed')
                 ORDER BY a.state = 'rejected', a.priority DESC, a.created_at, a.id LIMIT $1",
            )
            .bind(limit)
            .fetch_all(&self.pool)
            .await
        }

        async fn upload_usage(&self, owner: i64, since: i64) -> sqlx::Result<(i64, i64)> {
            sqlx::query_as(
                "SELECT
                   (SELECT CAST(COALESCE(SUM(source_bytes), 0) AS BIGINT) FROM assets WHERE owner_id = $1 AND state <> 'rejected'),
                   (SELECT count(*) FROM assets WHERE owner_id = $1 AND created_at >= $2)",
            )
            .bind(owner)
            .bind(since)
            .fetch_one(&self.pool)
            .await
        }

        async fn raise_priority(&self, asset_id: &str) -> sqlx::Result<Option<i64>> {
            let r: Option<(i64,)> = sqlx::query_as(&format!(
                "UPDATE assets SET priority = 1 + (SELECT COALESCE(MAX(priority), 0) FROM assets
                                                   WHERE state IN ('queued', 'probing', 'transcoding', 'sealing')),
                                   next_try = {LEAST}(next_try, $1)
                 WHERE id = $2 AND state = 'queued' RETURNING priority"
            ))
            .bind(now())
            .bind(asset_id)
            .fetch_optional(&self.pool)
            .await?;
            Ok(r.map(|(p,)| p))
        }

        async fn search_assets(&self, f: &AssetFilter<'_>, limit: i64) -> sqlx::Result<Vec<AssetLine>> {
            // A position, not LIKE: a search for "%" or "_" means those characters.
            sqlx::query_as(&format!(
                "SELECT {ASSET_LINE_COLS} FROM assets a JOIN users u ON u.id = a.owner_id
                 WHERE ($1 = '' OR a.id = $1 OR {STRPOS}(lower(a.title), lower($1)) > 0
                        OR {STRPOS}(u.email, lower($1)) > 0)
                   AND ($2 IS NULL OR CASE WHEN a.withdrawn_at IS NULL THEN a.state ELSE 'withdrawn' END = $2)
                   AND ($3 IS NULL OR (a.state = 'published' AND a.withdrawn_at IS NULL AND
                        (SELECT count(*) FROM replicas r WHERE r.asset_id = a.id AND r.state = 'verified') < $3))
                 ORDER BY a.created_at DESC, a.id LIMIT $4"
            ))
            .bind(f.search)
            .bind(f.state.map(|s| s.as_str()))
            .bind(f.under_replicated_below)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
        }

        async fn asset_line(&self, asset_id: &str) -> sqlx::Result<Option<AssetLine>> {
            sqlx::query_as(&format!(
                "SELECT {ASSET_LINE_COLS} FROM assets a JOIN users u ON u.id = a.owner_id WHERE a.id = $1"
            ))
            .bind(asset_id)
            .fetch_optional(&self.pool)
            .await
        }

        async fn set_withdrawn(
            &self,
            asset_id: &str,
            reason: Option<&str>,
            at: i64,
        ) -> sqlx::Result<bool> {
            let r = match reason {
                Some(reason) => {
                    sqlx::query(
                        "UPDATE assets SET withdrawn_at = $1, withdrawn_reason = $2, updated_at = $3
                         WHERE id = $4 AND withdrawn_at IS NULL
                           AND state IN ('replicating', 'published', 'damaged')",
                    )
                    .bind(at)
                    .bind(reason)
                    .bind(at)
                    .bind(asset_id)
                    .execute(&self.pool)
                    .await?
                }
                None => sqlx::query(
                    "UPDATE assets SET withdrawn_at = NULL, withdrawn_reason = NULL, updated_at = $1
                         WHERE id = $2 AND withdrawn_at IS NOT NULL",
                )
                .bind(at)
                .bind(asset_id)
                .execute(&self.pool)
                .await?,
            };
            Ok(r.rows_affected() == 1)
        }

        async fn asset_replicas_due_now(&self, asset_id: &str) -> sqlx::Result<u64> {
            let r = sqlx::query(
                "UPDATE replicas SET next_try = 0
                 WHERE asset_id = $1 AND state IN ('pending', 'failed', 'repairing') AND next_try > 0",
            )
            .bind(asset_id)
            .execute(&self.pool)
            .await?;
            Ok(r.rows_affected())
        }

        async fn account(&self, id: i64) -> sqlx::Result<Option<AccountRow>> {
            sqlx::query_as(
                "SELECT id, email, role, balance, created_at, disabled_at FROM users WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await
        }

        async fn set_disabled(&self, user_id: i64, disabled: bool, at: i64) -> sqlx::Result<bool> {
            let (_writer, mut tx) = self.begin_write().await?;
            let r = if disabled {
                sqlx::query("UPDATE users SET disabled_at = $1 WHERE id = $2 AND disabled_at IS NULL")
                    .bind(at)
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?
            } else {
                sqlx::query(
                    "UPDATE users SET disabled_at = NULL WHERE id = $1 AND disabled_at IS NOT NULL",
                )
                .bind(user_id)
                .execute(&mut *tx)
                .await?
            };
            // Both ways: a log-in whose password check was under way while the
            // account was disabled may have added a session since; enabling
            // must not bring it back.
            sqlx::query("DELETE FROM sessions WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(r.rows_affected() == 1)
        }

        async fn replication_summary(
            &self,
            min_replicas: i64,
            now: i64,
        ) -> sqlx::Result<ReplicationSummary> {
            let (under_replicated, damaged, copies_pending): (i64, i64, i64) = sqlx::query_as(
                "SELECT
                   (SELECT count(*) FROM assets a WHERE a.state = 'published' AND a.withdrawn_at IS NULL AND
                      (SELECT count(*) FROM replicas r WHERE r.asset_id = a.id AND r.state = 'verified') < $1),
                   (SELECT count(*) FROM assets WHERE state = 'damaged' AND withdrawn_at IS NULL),
                   (SELECT count(*) FROM replicas WHERE state <> 'verified')",
            )
            .bind(min_replicas)
            .fetch_one(&self.pool)
            .await?;
            let (jobs_waiting, oldest, jobs_failed): (i64, Option<i64>, i64) = sqlx::query_as(
                "SELECT
                   (SELECT count(*) FROM assets WHERE state IN ('queued', 'probing', 'transcoding', 'sealing')),
                   (SELECT min(created_at) FROM assets WHERE state IN ('queued', 'probing', 'transcoding', 'sealing')),
                   (SELECT count(*) FROM assets WHERE state = 'rejected' AND error_code = 'processing_failed')",
            )
            .fetch_one(&self.pool)
            .await?;
            Ok(ReplicationSummary {
                under_replicated,
                damaged,
                copies_pending,
                jobs_waiting,
                oldest_job_secs: oldest.map_or(0, |t| (now - t).max(0)),
                jobs_failed,
            })
        }

        // ---- the monitor, alert deliveries, incidents, drains ----

        async fn record_check(
            &self,
            r: &CheckResult,
            at: i64,
            max_gap: i64,
        ) -> sqlx::Result<Option<CheckState>> {
            let (_writer, mut tx) = self.begin_write().await?;
            let before: Option<CheckState> = sqlx::query_as(
                "SELECT check_id, component, state, detail, since, checked_at, notified_state, notified_at
                 FROM check_state WHERE check_id = $1",
            )
            .bind(&r.check_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(b) = &before {
                // The time since the last look counts for the state it was in.
                let secs = (at - b.checked_at).clamp(0, max_gap.max(0));
                let column = match b.state {
                    Health::Ok => "ok_secs",
                    Health::Degraded => "degraded_secs",
                    Health::Down => "down_secs",
                };
                sqlx::query(&format!(
                    "INSERT INTO check_days (check_id, component, day, {column}) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (check_id, day) DO UPDATE SET {column} = check_days.{column} + $4, component = $2"
                ))
                .bind(&r.check_id)
                .bind(&r.component)
                .bind(at.div_euclid(86_400))
                .bind(secs)
                .execute(&mut *tx)
                .await?;
            }
            let changed = before.as_ref().is_none_or(|b| b.state != r.state);
            if changed {
                sqlx::query(
                    "INSERT INTO check_history (check_id, component, at, state, detail) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&r.check_id)
                .bind(&r.component)
                .bind(at)
                .bind(r.state)
                .bind(&r.detail)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO check_state (check_id, component, state, detail, since, checked_at)
                 VALUES ($1, $2, $3, $4, $5, $5)
                 ON CONFLICT (check_id) DO UPDATE SET component = $2, state = $3, detail = $4,
                   since = CASE WHEN check_state.state = $3 THEN check_state.since ELSE $5 END, checked_at = $5",
            )
            .bind(&r.check_id)
            .bind(&r.component)
            .bind(r.state)
            .bind(&r.detail)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(before)
        }

        async fn check_states(&self) -> sqlx::Result<Vec<CheckState>> {
            sqlx::query_as(
                "SELECT check_id, component, state, detail, since, checked_at, notified_state, notified_at
                 FROM check_state ORDER BY check_id",
            )
            .fetch_all(&self.pool)
            .await
        }

        async fn mark_notified(&self, check_id: &str, state: Health, at: i64) -> sqlx::Result<()> {
            sqlx::query(
                "UPDATE check_state SET notified_state = $1, notified_at = $2 WHERE check_id = $3",
            )
            .bind(state)
            .bind(at)
            .bind(check_id)
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn check_days(&self, from_day: i64) -> sqlx::Result<Vec<CheckDay>> {
            sqlx::query_as(
                "SELECT check_id, component, day, ok_secs, degraded_secs, down_secs
                 FROM check_days WHERE day >= $1 ORDER BY day, check_id",
            )
            .bind(from_day)
            .fetch_all(&self.pool)
            .await
        }

        async fn check_history(&self, limit: i64) -> sqlx::Result<Vec<CheckEvent>> {
            sqlx::query_as(
                "SELECT check_id, component, at, state, detail FROM check_history ORDER BY id DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(&self.pool)
            .await
        }

        async fn prune_monitor(&self, before: i64) -> sqlx::Result<()> {
            let (_writer, mut tx) = self.begin_write().await?;
            sqlx::query("DELETE FROM check_history WHERE at < $1")
                .bind(before)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM check_days WHERE day < $1")
                .bind(before.div_euclid(86_400))
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM alert_deliveries WHERE at < $1")
                .bind(before)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }

        async fn record_delivery(&self, d: &Delivery) -> sqlx::Result<()> {
            sqlx::query(
                "INSERT INTO alert_deliveries (at, channel, subject, kind, attempt, ok, answer)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(d.at)
            .bind(&d.channel)
            .bind(&d.subject)
            .bind(&d.kind)
            .bind(d.attempt)
            .bind(d.ok)
            .bind(&d.answer)
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn deliveries(&self, limit: i64) -> sqlx::Result<Vec<Delivery>> {
            sqlx::query_as(
                "SELECT at, channel, subject, kind, attempt, ok, answer FROM alert_deliveries
                 ORDER BY id DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(&self.pool)
            .await
        }

        async fn create_incident(&self, i: &NewIncident<'_>) -> sqlx::Result<i64> {
            let (_writer, mut tx) = self.begin_write().await?;
            let (id,): (i64,) = sqlx::query_as(
                "INSERT INTO incidents (title, impact, components, created_at, starts_at, ends_at, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            )
            .bind(i.title)
            .bind(i.impact)
            .bind(i.components)
            .bind(i.at)
            .bind(i.starts_at)
            .bind(i.ends_at)
            .bind(i.author)
            .fetch_one(&mut *tx)
            .await?;
            insert_incident_update(&mut tx, id, i.at, i.status, i.body, i.author).await?;
            tx.commit().await?;
            Ok(id)
        }

        async fn add_incident_update(&self, u: &IncidentUpdate, resolves: bool) -> sqlx::Result<bool> {
            let (_writer, mut tx) = self.begin_write().await?;
            let open: Option<(i64,)> =
                sqlx::query_as("SELECT id FROM incidents WHERE id = $1 AND resolved_at IS NULL")
                    .bind(u.incident_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if open.is_none() {
                return Ok(false);
            }
            insert_incident_update(&mut tx, u.incident_id, u.at, &u.status, &u.body, &u.author).await?;
            if resolves {
                sqlx::query("UPDATE incidents SET resolved_at = $1 WHERE id = $2")
                    .bind(u.at)
                    .bind(u.incident_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(true)
        }

        async fn incidents(&self, since: i64) -> sqlx::Result<Vec<Incident>> {
            let mut list: Vec<Incident> = sqlx::query_as(
                "SELECT id, title, impact, components, created_at, starts_at, ends_at, resolved_at, created_by
                 FROM incidents
                 WHERE resolved_at IS NULL OR resolved_at >= $1 OR created_at >= $1
                 ORDER BY created_at DESC, id DESC LIMIT 200",
            )
            .bind(since)
            .fetch_all(&self.pool)
            .await?;
            let updates: Vec<IncidentUpdate> = sqlx::query_as(
                "SELECT u.incident_id, u.at, u.status, u.body, u.author FROM incident_updates u
                 JOIN incidents i ON i.id = u.incident_id
                 WHERE i.resolved_at IS NULL OR i.resolved_at >= $1 OR i.created_at >= $1
                 ORDER BY u.at, u.id",
            )
            .bind(since)
            .fetch_all(&self.pool)
            .await?;
            for u in updates {
                if let Some(i) = list.iter_mut().find(|i| i.id == u.incident_id) {
                    i.updates.push(u);
                }
            }
            Ok(list)
        }

        async fn set_drained(
            &self,
            node: &str,
            drained: bool,
            by: &str,
            at: i64,
        ) -> sqlx::Result<bool> {
            let r = if drained {
                sqlx::query("INSERT INTO node_drains (node, at, by_whom) VALUES ($1, $2, $3) ON CONFLICT (node) DO NOTHING")
                    .bind(node)
                    .bind(at)
                    .bind(by)
                    .execute(&self.pool)
                    .await?
            } else {
                sqlx::query("DELETE FROM node_drains WHERE node = $1")
                    .bind(node)
                    .execute(&self.pool)
                    .await?
            };
            Ok(r.rows_affected() > 0)
        }

        async fn drained_nodes(&self) -> sqlx::Result<Vec<String>> {
            let rows: Vec<(String,)> = sqlx::query_as("SELECT node FROM node_drains ORDER BY node")
                .fetch_all(&self.pool)
                .await?;
            Ok(rows.into_iter().map(|(n,)| n).collect())
        }

            $($own)*
        }
    };
}
pub(super) use portable_impl;
