//! The catalog: everything the manager keeps about accounts, movies, their
//! copies, terminals and credits, behind one trait.
//!
//! [`Catalog`] has one method per operation the services need, and a
//! compound operation (a purchase, a refund, a journal delivery, claiming
//! a job) is one method, so each backend takes its own locks the way its
//! engine wants: SQLite's `BEGIN IMMEDIATE` ([`sqlite`], the embedded
//! default), PostgreSQL's advisory locks and `FOR UPDATE … SKIP LOCKED`
//! ([`postgres`]). Every SQL statement of the manager is in a backend; the
//! rest of the manager sees typed rows and outcomes.
//!
//! Errors are `sqlx::Error`: both backends are sqlx's, and a
//! refusal the books make (a balance too small, an email taken) is never
//! an error of the engine but a [`Refused`] inside [`TxError`].
//!
//! Both backends pass [`conformance`] (the same tests, each given its own
//! fresh catalog); `scripts/test` starts a private PostgreSQL server for
//! them (`SLMEDIA_TEST_PG`).

use std::{collections::BTreeMap, path::Path, sync::Arc};

use serde::Serialize;
use sqlx::FromRow;

use crate::domain::{AssetState, Health, ReplicaState, Role};

mod portable;
pub mod postgres;
pub mod sqlite;

#[cfg(test)]
pub mod conformance;

pub use shared::runtime::unix_now as now;

/// The catalog as the services hold it.
pub type SharedCatalog = Arc<dyn Catalog>;

/// Opens the catalog `url` names, creating and migrating it as needed.
pub async fn open(url: &str) -> anyhow::Result<SharedCatalog> {
    if is_sqlite(url) {
        return Ok(Arc::new(sqlite::SqliteCatalog::open(url).await?));
    }
    if is_postgres(url) {
        return Ok(Arc::new(postgres::PgCatalog::open(url).await?));
    }
    anyhow::bail!(
        "database_url {:?} names an engine this manager does not support (sqlite: and postgres: are)",
        url.split(':').next().unwrap_or("")
    )
}

/// Checks an existing database for damage before anything migrates or
/// writes to it (at start). A missing database is a fresh start.
pub async fn quick_check(url: &str) -> anyhow::Result<()> {
    if is_sqlite(url) {
        return sqlite::quick_check(url).await;
    }
    Ok(())
}

/// A fenced write's outcome ([`lost_job`]): a row changed, or the job is
/// another worker's now.
fn held(rows: u64) -> sqlx::Result<()> {
    if rows == 0 {
        return Err(sqlx::Error::RowNotFound);
    }
    Ok(())
}

/// Whether a job holder's write was refused because another worker holds
/// the job now (its lease lapsed and the job was claimed again).
pub fn lost_job(e: &anyhow::Error) -> bool {
    e.downcast_ref::<sqlx::Error>()
        .is_some_and(|e| matches!(e, sqlx::Error::RowNotFound))
}

/// Claims an embedded (SQLite) database for this process for as long as
/// the returned file stays open: a second manager started on the same
/// file is refused before it reads or changes anything. `None` for a
/// database server, which several managers may share (one leads:
/// [`Catalog::try_lead`]).
pub fn claim_process(url: &str) -> anyhow::Result<Option<std::fs::File>> {
    if is_sqlite(url) {
        return sqlite::claim_process(url);
    }
    Ok(None)
}

fn is_sqlite(url: &str) -> bool {
    url.starts_with("sqlite:")
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// What a snapshot (a backup's database copy) holds: the row count of
/// every table and the schema version, to compare a copy against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotCounts {
    pub tables: BTreeMap<String, i64>,
    pub schema: i64,
}

/// Reads a snapshot file read-only: its integrity, then its counts. An
/// `Err` says what is wrong with it in words. A PostgreSQL dump is
/// restored into a scratch database on the open catalog's server.
pub async fn inspect_snapshot(path: &Path) -> Result<SnapshotCounts, String> {
    if postgres::is_dump(path) {
        return postgres::inspect(path).await;
    }
    sqlite::inspect(path).await
}

// ---- rows ---------------------------------------------------------------------

#[derive(Debug, Clone, FromRow)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub password_hash: String,
    pub role: Role,
    /// Disabled by an operator: cannot log in (sessions and tokens of a
    /// disabled account are never read back at all).
    #[sqlx(default)]
    pub disabled: bool,
}

impl User {
    pub fn is_operator(&self) -> bool {
        self.role == Role::Operator
    }
}

#[derive(Debug, Clone, FromRow)]
pub struct Asset {
    pub id: String,
    pub owner_id: i64,
    pub title: String,
    pub state: AssetState,
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
    /// The last worker to claim the job (kept after it ends).
    pub worker: Option<String>,
}

#[derive(Debug, Clone, FromRow)]
pub struct Replica {
    pub asset_id: String,
    pub node: String,
    /// What the copy is (migrations/0004_mirrors.sql says what each means).
    pub state: ReplicaState,
    pub attempts: i64,
    pub last_error: Option<String>,
    /// Last time this copy was proven intact (push or the node's scrub).
    pub verified_at: Option<i64>,
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

/// An asset whose sealed blob should be on the nodes.
#[derive(Debug, Clone, FromRow)]
pub struct MirroredAsset {
    pub id: String,
    pub state: String,
    pub blob_id: String,
    pub sealed_len: i64,
}

#[derive(Debug, Clone, FromRow)]
pub struct Terminal {
    pub id: String,
    pub owner_id: i64,
    pub name: String,
    pub wrapped_secret: Vec<u8>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

/// A transcode worker on another machine (migrations/0012,
/// [`crate::runners`]).
#[derive(Debug, Clone, FromRow)]
pub struct Transcoder {
    pub name: String,
    pub wrapped_secret: Vec<u8>,
    pub registered_at: i64,
    /// The operator whose token it redeemed.
    pub registered_by: String,
    pub last_seen_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// What [`Catalog::register_transcoder`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum RegisterOutcome {
    Registered,
    /// No unused, unexpired token with this hash.
    TokenInvalid,
    /// A worker that is not revoked holds the name; the token stays usable.
    NameTaken,
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

// ---- the books ----------------------------------------------------------------

/// Why the books refused a compound operation. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    EmailTaken,
    NoAccount,
    /// The debit would take the balance below zero.
    Insufficient {
        balance: i64,
        needed: i64,
    },
    /// The credit would take the balance past `domain::MAX_BALANCE`.
    TooRich,
    NoMovie,
    NotPublished,
    /// The buyer has not approved the terminal's owner.
    NotApproved,
    /// The purchase would pass the buyer's daily cap for the terminal's owner.
    CapReached {
        cap: i64,
    },
    /// A concurrent request with the same request key was recorded first.
    Duplicate,
}

/// A compound operation's failure: refused by the books, or the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error("refused: {0:?}")]
    Refused(Refused),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// One movement of credits: a ledger row and the balance update, always
/// together. `idem_key` is unique across the ledger.
#[derive(Debug)]
pub struct Entry<'a> {
    pub account: i64,
    pub amount: i64,
    pub kind: &'a str,
    pub reference: &'a str,
    pub idem_key: &'a str,
    pub actor: &'a str,
    pub reason: &'a str,
}

/// Who is granted credits by an operator.
#[derive(Debug, Clone)]
pub enum Recipients {
    Account(i64),
    /// Every account created before this unix time (e.g. everyone who had
    /// an account when an outage began).
    CreatedBefore(i64),
}

/// An operator's grant as the books record it.
#[derive(Debug)]
pub struct GrantOrder<'a> {
    pub to: &'a Recipients,
    pub amount: i64,
    pub actor: &'a str,
    pub reason: &'a str,
    /// Grants once per account and key: an interrupted rule grant run
    /// again credits only the accounts it missed.
    pub key: &'a str,
}

/// A purchase as the books record it; the ledger service has checked the
/// input and that the movie is playable.
#[derive(Debug)]
pub struct PurchaseOrder<'a> {
    pub buyer: i64,
    pub asset_id: &'a str,
    /// `<buyer>:<request id>`: a retried request is charged once.
    pub request_key: &'a str,
    /// A fresh id for the grant this purchase creates.
    pub grant_id: &'a str,
    /// `web`, `api` or `terminal`.
    pub source: &'a str,
    /// The terminal's owner when bought in-world from someone else's screen:
    /// the buyer's approval and its daily cap are checked in the transaction.
    pub terminal_owner: Option<i64>,
    pub uploader_share_percent: i64,
    pub window_secs: i64,
    pub cap_window_secs: i64,
    pub now: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurchaseOutcome {
    /// Free, or the buyer's own movie: nothing charged, no grant.
    Free { balance: i64 },
    Charged {
        price: i64,
        expires_at: i64,
        balance: i64,
    },
}

/// A grant found by its request key (a retried purchase).
#[derive(Debug, Clone, FromRow)]
pub struct GrantByKey {
    pub id: String,
    pub asset_id: String,
    pub price: i64,
    pub expires_at: i64,
    pub source: String,
    pub terminal_owner_id: Option<i64>,
}

/// An account's consent to purchases through one owner's terminals.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Approval {
    pub owner_id: i64,
    pub daily_cap: i64,
    pub via_terminal: String,
    pub created_at: i64,
    /// Credits spent through this owner's terminals in the cap's window.
    pub spent_24h: i64,
}

/// A movie to record as queued, with what its upload costs.
#[derive(Debug)]
pub struct NewAsset<'a> {
    pub id: &'a str,
    pub owner: i64,
    pub title: &'a str,
    pub source_name: &'a str,
    pub source_bytes: i64,
}

/// A rejected upload whose cost has not been given back yet.
#[derive(Debug, Clone, FromRow)]
pub struct UnrefundedUpload {
    pub id: String,
    pub owner_id: i64,
    pub cost: i64,
}

/// An unplayed grant given back.
#[derive(Debug, Clone)]
pub struct Refunded {
    pub buyer: i64,
    pub price: i64,
    /// Credits of the uploader's share the uploader's balance could not
    /// give back (the site absorbed them).
    pub absorbed: i64,
}

/// What one journal delivery changed.
#[derive(Debug, Default)]
pub struct JournalApplied {
    /// Events new to the books (the rest were delivered before).
    pub applied: u64,
    /// Views of grants already refunded, as `(grant, bytes)`: kept apart,
    /// never added (the money went back), and raised for the operator.
    pub after_refund: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct LedgerRow {
    pub id: i64,
    pub amount: i64,
    pub kind: String,
    pub reference: String,
    pub actor: String,
    pub reason: String,
    pub balance_after: i64,
    pub created_at: i64,
}

/// One of an uploader's movies as "my movies" lists it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct OwnerMovie {
    pub id: String,
    pub title: String,
    pub state: AssetState,
    pub created_at: i64,
    pub price: i64,
    /// Copies proven intact.
    pub copies: i64,
    /// Views sold (purchases not refunded) and the owner's share of them.
    pub views: i64,
    pub earned: i64,
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct GrantRowView {
    pub id: String,
    pub asset_id: String,
    pub price: i64,
    pub state: String,
    pub expires_at: i64,
    pub bytes_served: i64,
}

// ---- the operators' audit log --------------------------------------------------

/// One operator action, as the admin records it before answering.
#[derive(Debug)]
pub struct AuditEntry<'a> {
    pub actor_id: i64,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub detail: &'a str,
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

/// An account as the admin lists it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct AccountRow {
    pub id: i64,
    pub email: String,
    pub role: Role,
    pub balance: i64,
    pub created_at: i64,
    /// When an operator disabled it; `None`: it may log in.
    #[sqlx(default)]
    pub disabled_at: Option<i64>,
}

/// A movie as the console's list shows it, with its copies counted.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct AssetLine {
    pub id: String,
    pub title: String,
    pub owner_id: i64,
    pub owner_email: String,
    pub state: AssetState,
    pub created_at: i64,
    pub sealed_len: Option<i64>,
    pub verified_copies: i64,
    /// Copies it should have (every configured node: not retired).
    pub copies: i64,
    pub withdrawn_at: Option<i64>,
    pub withdrawn_reason: Option<String>,
}

/// Which movies the console lists.
#[derive(Debug, Clone, Default)]
pub struct AssetFilter<'a> {
    /// Part of the title or the owner's email, or a whole movie id; "" for all.
    pub search: &'a str,
    pub state: Option<AssetState>,
    /// Only published movies with fewer verified copies than this.
    pub under_replicated_below: Option<i64>,
}

/// A job as the admin's queue shows it: a movie on its way (queued or in
/// a step) or one that gave up for an internal reason.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct JobRow {
    pub id: String,
    pub title: String,
    pub owner_email: String,
    pub state: AssetState,
    pub progress: f64,
    pub attempts: i64,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub created_at: i64,
    /// When a queued job is due again (after a failed attempt's back-off).
    pub next_try: i64,
    pub cancel_requested: bool,
    /// Claimed highest first (an operator raises it).
    pub priority: i64,
    /// The worker that holds (or last held) it.
    pub worker: Option<String>,
}

/// Movies the console counts on its overview.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicationSummary {
    /// Published, with fewer verified copies than the site wants.
    pub under_replicated: i64,
    pub damaged: i64,
    /// Copies waiting for a push or a repair.
    pub copies_pending: i64,
    /// Jobs queued or in a step, and the oldest one's age.
    pub jobs_waiting: i64,
    pub oldest_job_secs: i64,
    /// Jobs that gave up for an internal reason (an operator may retry).
    pub jobs_failed: i64,
}

// ---- the monitor, alert deliveries, incidents, drains ----

/// One check's result as the monitor hands it to the catalog.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// Stable id: `manager.database`, `node.utah`, `playback.utah`, …
    pub check_id: String,
    /// The status page's component it counts towards (`web`, `playback:eu`).
    pub component: String,
    pub state: Health,
    /// What was found, in words (what failed and how).
    pub detail: String,
}

/// A check's latest result and what the channels were last told.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct CheckState {
    pub check_id: String,
    pub component: String,
    pub state: Health,
    pub detail: String,
    pub since: i64,
    pub checked_at: i64,
    pub notified_state: Option<Health>,
    pub notified_at: Option<i64>,
}

/// Seconds a check spent in each state on one UTC day (`day` = unix
/// seconds / 86400).
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct CheckDay {
    pub check_id: String,
    pub component: String,
    pub day: i64,
    pub ok_secs: i64,
    pub degraded_secs: i64,
    pub down_secs: i64,
}

/// A change of a check's state.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct CheckEvent {
    pub check_id: String,
    pub component: String,
    pub at: i64,
    pub state: Health,
    pub detail: String,
}

/// One attempt to reach an operator through a channel.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Delivery {
    pub at: i64,
    pub channel: String,
    /// The check or alert code, `test` or `heartbeat`.
    pub subject: String,
    /// `firing`, `resolved`, `test`, `heartbeat`.
    pub kind: String,
    pub attempt: i64,
    pub ok: bool,
    /// The receiving end's answer, or the error.
    pub answer: String,
}

/// An incident or a maintenance window as the status page shows it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Incident {
    pub id: i64,
    pub title: String,
    /// `minor`, `major`, `maintenance`.
    pub impact: String,
    /// Comma-separated component ids.
    pub components: String,
    pub created_at: i64,
    pub starts_at: Option<i64>,
    pub ends_at: Option<i64>,
    pub resolved_at: Option<i64>,
    pub created_by: String,
    #[sqlx(skip)]
    pub updates: Vec<IncidentUpdate>,
}

/// One entry of an incident's timeline.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct IncidentUpdate {
    pub incident_id: i64,
    pub at: i64,
    pub status: String,
    pub body: String,
    pub author: String,
}

/// What an operator writes to open an incident (its first update included).
#[derive(Debug, Clone)]
pub struct NewIncident<'a> {
    pub title: &'a str,
    pub impact: &'a str,
    pub components: &'a str,
    pub starts_at: Option<i64>,
    pub ends_at: Option<i64>,
    pub status: &'a str,
    pub body: &'a str,
    pub author: &'a str,
    pub at: i64,
}

// ---- the trait ------------------------------------------------------------------

/// Everything the manager keeps, one method per operation (module docs).
#[async_trait::async_trait]
pub trait Catalog: Send + Sync + 'static {
    // ---- accounts, sessions, movies, copies, terminals ----

    async fn set_password(&self, email: &str, password_hash: &str) -> sqlx::Result<bool>;

    async fn user_by_email(&self, email: &str) -> sqlx::Result<Option<User>>;

    async fn insert_session(
        &self,
        token_hash: &str,
        user_id: i64,
        csrf: &str,
        expires_at: i64,
    ) -> sqlx::Result<()>;

    async fn delete_session(&self, token_hash: &str) -> sqlx::Result<()>;

    /// The user behind a live session, with the session's CSRF token.
    async fn session_user(&self, token_hash: &str) -> sqlx::Result<Option<(User, String)>>;

    async fn insert_api_token(
        &self,
        token_hash: &str,
        user_id: i64,
        label: &str,
    ) -> sqlx::Result<()>;

    async fn api_token_user(&self, token_hash: &str) -> sqlx::Result<Option<User>>;

    async fn insert_asset(
        &self,
        id: &str,
        owner_id: i64,
        title: &str,
        source_name: &str,
        source_bytes: i64,
    ) -> sqlx::Result<()>;

    async fn asset(&self, id: &str) -> sqlx::Result<Option<Asset>>;

    async fn published_assets(&self, limit: i64) -> sqlx::Result<Vec<Asset>>;

    /// A page of published movies, newest first: those after `after` (the
    /// `(created_at, id)` of the last one on the page before), whose title
    /// contains `search` (any case), at most `limit`. A keyset query: a deep
    /// page costs what the first one does.
    async fn published_page(
        &self,
        after: Option<(i64, String)>,
        search: Option<&str>,
        limit: i64,
    ) -> sqlx::Result<Vec<Asset>>;

    async fn assets_of(&self, owner_id: i64, limit: i64) -> sqlx::Result<Vec<Asset>>;

    /// `owner_id`'s movies, newest first, after `after` (`(created_at, id)`
    /// of the last one on the page before), with their verified copies,
    /// views sold and earnings; at most `limit`.
    async fn owner_movies(
        &self,
        owner_id: i64,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> sqlx::Result<Vec<OwnerMovie>>;

    /// `account`'s ledger, newest first, entries older than `before` (an
    /// entry id), at most `limit`.
    async fn history_page(
        &self,
        account: i64,
        before: Option<i64>,
        limit: i64,
    ) -> sqlx::Result<Vec<LedgerRow>>;

    /// Takes the oldest due job under a lease of `lease_secs`, in one statement
    /// so two workers (or two managers on one database) never take the same
    /// job. A job whose lease ran out (its worker died) is taken up again.
    /// `worker` names the claimer for the console's queue.
    async fn claim_next(&self, lease_secs: i64, worker: &str) -> sqlx::Result<Option<Asset>>;

    // The writes of a job's holder below take the `worker` name it claimed
    // the job with, and are fenced by it: once a lease lapsed and another
    // worker claimed the job, the old holder's writes change nothing and
    // fail with `sqlx::Error::RowNotFound` ([`lost_job`]), however late
    // they come (a frozen process that wakes up, a leader cut off from
    // its database). A row never claimed (`worker` NULL) takes any.

    /// Extends a job's lease; returns whether its cancel was requested.
    async fn renew_lease(&self, id: &str, worker: &str, lease_secs: i64) -> sqlx::Result<bool>;

    /// Moves a transcoded job to `sealing` unless its cancel was requested, in
    /// one statement: a cancel that arrives at any moment before is honoured
    /// (`false`), one after finds the job past cancelling (`TooLate`).
    async fn start_sealing(&self, id: &str, worker: &str) -> sqlx::Result<bool>;

    async fn cancel_requested(&self, id: &str) -> sqlx::Result<bool>;

    /// Puts a job back in the queue at once, without counting an attempt
    /// (graceful shutdown interrupted it).
    async fn requeue(&self, id: &str, worker: &str) -> sqlx::Result<()>;

    async fn request_cancel(&self, id: &str) -> sqlx::Result<CancelOutcome>;

    /// Operator retry of a job that failed for an internal reason (its source
    /// is kept for this). Returns whether it was requeued.
    async fn retry_failed(&self, id: &str) -> sqlx::Result<bool>;

    /// Puts a job that failed for an internal reason back in the queue after
    /// `delay_secs`; returns how many attempts it has now had.
    async fn retry_later(&self, id: &str, worker: &str, delay_secs: i64) -> sqlx::Result<i64>;

    /// Work interrupted by a crash or shutdown restarts from the top: staging
    /// keeps the source until sealing commits, so nothing is lost. Jobs
    /// held by transcode workers (`runner/…`) are left to their leases:
    /// the worker lives on through the manager's restart.
    async fn requeue_interrupted(&self) -> sqlx::Result<u64>;

    /// Moves a job to its next step.
    async fn set_state(
        &self,
        id: &str,
        worker: &str,
        state: crate::domain::AssetState,
    ) -> sqlx::Result<()>;

    async fn set_progress(&self, id: &str, progress: f64) -> sqlx::Result<()>;

    async fn reject(&self, id: &str, worker: &str, code: &str, message: &str) -> sqlx::Result<()>;

    async fn set_media_info(
        &self,
        id: &str,
        worker: &str,
        width: u32,
        height: u32,
        duration: f64,
    ) -> sqlx::Result<()>;

    /// Records the sealed blob and creates one pending replica per node, in one
    /// transaction: either the asset is ready to replicate or nothing changed.
    // The job, its holder, what was sealed and where it goes: one
    // transaction's worth, each named at the one call site.
    #[allow(clippy::too_many_arguments)]
    async fn record_sealed(
        &self,
        id: &str,
        worker: &str,
        blob_id: &str,
        sealed_len: u64,
        plain_len: u64,
        wrapped_key: &[u8],
        nodes: &[String],
    ) -> sqlx::Result<()>;

    async fn replicas(&self, asset_id: &str) -> sqlx::Result<Vec<Replica>>;

    /// Replicas not yet verified whose retry time has come, for assets that
    /// still have their sealed blob in the outbox.
    async fn due_replicas(&self) -> sqlx::Result<Vec<Replica>>;

    async fn replica_verified(&self, asset_id: &str, node: &str) -> sqlx::Result<()>;

    async fn replica_failed(
        &self,
        asset_id: &str,
        node: &str,
        error: &str,
        next_try: i64,
    ) -> sqlx::Result<()>;

    /// Publishes the asset if enough verified copies exist. Returns whether
    /// *this* call published it (so it is logged and counted once). The count
    /// and the state change happen in one statement, so "published" can never
    /// be observed with too few copies.
    async fn publish_if_replicated(
        &self,
        asset_id: &str,
        min_replicas: usize,
    ) -> sqlx::Result<bool>;

    async fn all_verified(&self, asset_id: &str) -> sqlx::Result<bool>;

    async fn mirrored_assets(&self) -> sqlx::Result<Vec<MirroredAsset>>;

    /// Every blob name any asset refers to (whatever its state).
    async fn referenced_blobs(&self) -> sqlx::Result<std::collections::HashSet<String>>;

    /// Verified copies on the nodes of every blob an asset refers to.
    async fn verified_copies_by_blob(&self)
        -> sqlx::Result<std::collections::HashMap<String, i64>>;

    /// Replicas of the assets in [`mirrored_assets`].
    async fn mirrored_replicas(&self) -> sqlx::Result<Vec<Replica>>;

    /// Replicas on nodes no longer configured stop being retried or counted;
    /// every configured node gets a replica row for every mirrored asset (a
    /// node added later, or one that comes back, is filled like any other).
    /// Returns (retired, created or revived).
    async fn sync_replica_nodes(&self, nodes: &[String]) -> sqlx::Result<(u64, u64)>;

    /// A verified copy turned out gone or quarantined: it is to be refilled at
    /// once. Only a copy last verified before `observed_before` (when the
    /// evidence was gathered) is downgraded, so a push that completed while an
    /// inventory was in flight is not undone. Returns whether it changed.
    async fn replica_lost(
        &self,
        asset_id: &str,
        node: &str,
        reason: &str,
        observed_before: i64,
    ) -> sqlx::Result<bool>;

    /// A node reports it quarantined `blob`: every replica of it there goes to
    /// `repairing`. Returns the assets concerned.
    async fn replicas_quarantined(
        &self,
        node: &str,
        blob_id: &str,
        reason: &str,
    ) -> sqlx::Result<Vec<String>>;

    /// The node's inventory lists a good copy: the replica is verified, and its
    /// proof time is the later of ours and the node's. Returns whether the state
    /// changed (a copy found again, e.g. restored by an operator).
    async fn replica_seen_good(
        &self,
        asset_id: &str,
        node: &str,
        node_verified_at: Option<i64>,
    ) -> sqlx::Result<bool>;

    /// Later proof times from a node's inventory for copies already
    /// verified: `seen` holds (asset id, the node's last check). Only raises
    /// `verified_at`, only on verified replicas; returns the rows changed.
    /// One commit per thousand copies: a reconcile pass of 100,000 movies
    /// would otherwise commit (and fsync) once per copy.
    async fn refresh_verified_at(&self, node: &str, seen: &[(String, i64)]) -> sqlx::Result<u64>;

    /// Deletes view events whose last byte was served before `before`,
    /// except those that arrived after their grant's refund (kept as the
    /// evidence of it). The bytes are already in the grant's totals; a row
    /// only recognises the same event resent, and events that old are
    /// refused on arrival (`ledger::VIEW_EVENT_KEEP_SECS`). Returns how many.
    async fn prune_view_events(&self, before: i64) -> sqlx::Result<u64>;

    /// A node is reachable again: its waiting replicas are due now instead of
    /// at the end of their backoff.
    async fn replicas_due_now(&self, node: &str) -> sqlx::Result<u64>;

    /// Marks the asset `damaged` if no node holds a verified copy. The caller
    /// has checked that no other source (the outbox) exists. Returns whether
    /// this call changed it (so the alert is raised once).
    async fn mark_damaged(&self, asset_id: &str) -> sqlx::Result<bool>;

    /// A damaged asset has a good source again (a node's copy, or a sealed file
    /// an operator put back in the outbox): it replicates, and is published
    /// once `min_replicas` copies are verified.
    async fn undamage(&self, asset_id: &str) -> sqlx::Result<bool>;

    /// Records that `node` holds `blob_id` although no asset refers to it;
    /// returns when it was first seen so.
    async fn note_unreferenced(&self, node: &str, blob_id: &str, size: i64) -> sqlx::Result<i64>;

    /// Forgets unreferenced blobs of `node` not seen since `before` (deleted,
    /// or referenced again).
    async fn forget_unreferenced(&self, node: &str, before: i64) -> sqlx::Result<()>;

    async fn drop_unreferenced(&self, node: &str, blob_id: &str) -> sqlx::Result<()>;

    /// Asset counts by state, for the alert gauges.
    async fn asset_state_counts(&self) -> sqlx::Result<Vec<(String, i64)>>;

    /// Health means working: write, read back and delete a row.
    async fn health_check(&self) -> anyhow::Result<()>;

    async fn insert_terminal(
        &self,
        id: &str,
        owner_id: i64,
        name: &str,
        wrapped_secret: &[u8],
    ) -> sqlx::Result<()>;

    async fn terminal(&self, id: &str) -> sqlx::Result<Option<Terminal>>;

    async fn terminals_of(&self, owner_id: i64) -> sqlx::Result<Vec<Terminal>>;

    async fn delete_terminal(&self, id: &str, owner_id: i64) -> sqlx::Result<bool>;

    // ---- transcode workers (crate::runners) ----

    /// Keeps a registration token's hash, good once until `expires_at`.
    async fn insert_transcoder_token(
        &self,
        token_hash: &str,
        expires_at: i64,
        created_by: &str,
    ) -> sqlx::Result<()>;

    /// Whether an unused, unexpired registration token has this hash.
    async fn transcoder_token_live(&self, token_hash: &str) -> sqlx::Result<bool>;

    /// Uses up the token and records the worker, in one transaction: a
    /// refused registration leaves the token as it was.
    async fn register_transcoder(
        &self,
        token_hash: &str,
        name: &str,
        wrapped_secret: &[u8],
    ) -> sqlx::Result<RegisterOutcome>;

    async fn transcoder(&self, name: &str) -> sqlx::Result<Option<Transcoder>>;

    /// Every worker ever registered, revoked ones last.
    async fn transcoders(&self) -> sqlx::Result<Vec<Transcoder>>;

    /// Notes that a worker called (at most a write every few seconds per
    /// worker: it calls every 5 s while it works).
    async fn transcoder_seen(&self, name: &str) -> sqlx::Result<()>;

    /// `false` when no live worker has this name.
    async fn revoke_transcoder(&self, name: &str) -> sqlx::Result<bool>;

    /// Jobs under a live lease whose holder's name starts with `prefix`.
    async fn jobs_held(&self, prefix: &str) -> sqlx::Result<i64>;

    /// The job [`Catalog::claim_next`] would take now, without taking it.
    async fn next_job_id(&self) -> sqlx::Result<Option<String>>;

    /// Claims this job for `worker` if it waits (queued and due, or its
    /// holder's lease lapsed); `None` when it is not to be had, e.g.
    /// another worker took it first.
    async fn claim_job(
        &self,
        id: &str,
        lease_secs: i64,
        worker: &str,
    ) -> sqlx::Result<Option<Asset>>;

    /// Records a nonce; `false` when this terminal already used it (a replay).
    /// Nonces older than `window_secs` are forgotten in the same transaction.
    async fn use_terminal_nonce(
        &self,
        terminal_id: &str,
        nonce: &str,
        window_secs: i64,
    ) -> sqlx::Result<bool>;

    /// Records a restore from a backup taken at `backup_at`: refunds that could
    /// depend on views delivered after the backup are frozen
    /// (`ledger::refund_due`, migrations/0007).
    async fn freeze_refunds(&self, backup_at: i64, restored_at: i64) -> sqlx::Result<()>;

    /// Moves everything in the write-ahead log into the main file.
    async fn checkpoint(&self) -> sqlx::Result<()>;

    /// Sets a view price (0 = free). A free movie turning paid enters a new
    /// price epoch (`crate::prices`).
    async fn set_price(&self, asset_id: &str, price: i64) -> sqlx::Result<()>;

    /// Every movie with a price and its epoch: what a node needs to refuse
    /// grant-less tokens minted before the movie became paid.
    async fn paid_epochs(&self) -> sqlx::Result<Vec<(String, i64)>>;

    /// Replaces `user_id`'s link code (one live code per account) and sweeps
    /// expired ones.
    async fn replace_link_code(
        &self,
        user_id: i64,
        code_hash: &str,
        expires_at: i64,
    ) -> sqlx::Result<()>;

    /// Links `avatar` to the account that made the code, through terminal
    /// `via_name` of `via_owner`, and consumes the code: one transaction.
    async fn link_avatar(
        &self,
        code_hash: &str,
        avatar: &str,
        via_name: &str,
        via_owner: i64,
    ) -> sqlx::Result<LinkOutcome>;

    /// The account `avatar` is linked to.
    async fn avatar_account(&self, avatar: &str) -> sqlx::Result<Option<i64>>;

    /// Lets `avatar` go, if `user_id` holds its link.
    async fn unlink_avatar(&self, avatar: &str, user_id: i64) -> sqlx::Result<()>;

    async fn avatar_links(&self, user_id: i64) -> sqlx::Result<Vec<AvatarLink>>;

    /// Who bought grant `id`.
    async fn grant_buyer(&self, id: &str) -> sqlx::Result<Option<i64>>;

    // ---- the books (docs/credits.md) ----

    async fn balance(&self, account: i64) -> sqlx::Result<i64>;

    /// Accounts whose cached balance differs from their ledger sum, as
    /// `(account, balance, ledger sum)`. Empty when the books are exact.
    async fn verify_balances(&self) -> sqlx::Result<Vec<(i64, i64, i64)>>;

    /// Creates an account with its signup bonus (0: none), in one
    /// transaction. `Refused::EmailTaken` when the email has an account.
    async fn create_account(
        &self,
        email: &str,
        password_hash: &str,
        role: Role,
        bonus: i64,
    ) -> Result<i64, TxError>;

    /// Credits each recipient once per key; returns the accounts credited now.
    async fn grant_credits(&self, order: &GrantOrder<'_>) -> Result<Vec<i64>, TxError>;

    /// Charges the buyer, credits the uploader's share and creates the
    /// grant `order.grant_id`, all or nothing. A concurrent retry that won
    /// is `Refused::Duplicate` (read it with [`Catalog::grant_by_request`]).
    async fn purchase(&self, order: &PurchaseOrder<'_>) -> Result<PurchaseOutcome, TxError>;

    async fn grant_by_request(&self, request_key: &str) -> sqlx::Result<Option<GrantByKey>>;

    /// The approval of `owner`'s terminals by `user`, with what was spent
    /// through them since `since`.
    async fn approval(&self, user: i64, owner: i64, since: i64) -> sqlx::Result<Option<Approval>>;

    async fn approvals(&self, user: i64, since: i64) -> sqlx::Result<Vec<Approval>>;

    /// Approves (or changes the cap of) purchases by `user` through the
    /// terminals of `owner`.
    async fn approve(
        &self,
        user: i64,
        owner: i64,
        daily_cap: i64,
        via_terminal: &str,
    ) -> sqlx::Result<()>;

    /// Withdraws consent; `false` when there was none.
    async fn revoke(&self, user: i64, owner: i64) -> sqlx::Result<bool>;

    /// A movie's price per view (0 for free or unknown).
    async fn price(&self, asset_id: &str) -> sqlx::Result<i64>;

    /// Records an accepted upload as queued and charges `cost` (0: free)
    /// in one transaction: either the movie is queued and paid for, or
    /// neither (`Refused::Insufficient`).
    async fn insert_asset_paid(&self, asset: &NewAsset<'_>, cost: i64) -> Result<(), TxError>;

    /// Rejected movies whose upload cost was charged and not given back.
    async fn unrefunded_rejected_uploads(&self, limit: i64) -> sqlx::Result<Vec<UnrefundedUpload>>;

    /// Gives back one rejected upload's cost, once (`false`: done before).
    async fn refund_upload(&self, upload: &UnrefundedUpload, reason: &str)
        -> Result<bool, TxError>;

    /// Each node's journal watermark as last delivered, `(node, watermark)`.
    async fn journal_watermarks(&self) -> sqlx::Result<Vec<(String, i64)>>;

    /// How many restores happened after `t` (refunds wait until every node
    /// has reported past the last one).
    async fn restores_after(&self, t: i64) -> sqlx::Result<i64>;

    /// Active grants nothing was served under whose window ended at or
    /// before `expired_by`, oldest first, leaving out those a restore froze
    /// (`grace_secs`: the refund grace, see migrations/0007).
    async fn unserved_grants_due(
        &self,
        expired_by: i64,
        grace_secs: i64,
        limit: i64,
    ) -> sqlx::Result<Vec<String>>;

    /// Refunds one unplayed grant: the buyer gets the price back and the
    /// uploader's share is reversed as far as the uploader's balance allows.
    /// `None` when the grant is not (or no longer) refundable.
    async fn refund_grant(&self, grant_id: &str) -> Result<Option<Refunded>, TxError>;

    /// Applies a node's journal batch exactly once per `(node, event id)`
    /// and raises the node's watermark, in one transaction.
    async fn apply_journal(
        &self,
        node: &str,
        events: &[shared::protocol::JournalEvent],
        watermark: i64,
        now: i64,
    ) -> sqlx::Result<JournalApplied>;

    async fn history(&self, account: i64, limit: i64) -> sqlx::Result<Vec<LedgerRow>>;

    async fn grant_view(&self, id: &str) -> sqlx::Result<Option<GrantRowView>>;

    // ---- the operators' console ----

    /// Appends to the audit log; the log is append-only.
    async fn record_audit(&self, e: &AuditEntry<'_>) -> sqlx::Result<()>;

    /// The newest `limit` audit entries, newest first.
    async fn audit_entries(&self, limit: i64) -> sqlx::Result<Vec<AuditRow>>;

    /// Accounts whose email contains `search` (all for ""), newest first.
    async fn accounts(&self, search: &str, limit: i64) -> sqlx::Result<Vec<AccountRow>>;

    /// The queue, oldest first: jobs queued or in a step, then those that
    /// failed with `processing_failed` (an operator may retry them).
    async fn jobs(&self, limit: i64) -> sqlx::Result<Vec<JobRow>>;

    /// What `owner` keeps and made: bytes of uploaded sources of movies not
    /// rejected, and uploads since `since`.
    async fn upload_usage(&self, owner: i64, since: i64) -> sqlx::Result<(i64, i64)>;

    /// Moves a queued job ahead of every other job, and due now if it was
    /// waiting out a back-off; returns its new priority, `None` when it is
    /// not queued.
    async fn raise_priority(&self, asset_id: &str) -> sqlx::Result<Option<i64>>;

    /// Movies matching `f`, newest first.
    async fn search_assets(&self, f: &AssetFilter<'_>, limit: i64) -> sqlx::Result<Vec<AssetLine>>;

    /// One movie as [`Catalog::search_assets`] lists it.
    async fn asset_line(&self, asset_id: &str) -> sqlx::Result<Option<AssetLine>>;

    /// Withdraws (`Some(reason)`) a movie that finished processing, or
    /// reinstates (`None`) a withdrawn one. Returns whether it changed.
    async fn set_withdrawn(
        &self,
        asset_id: &str,
        reason: Option<&str>,
        at: i64,
    ) -> sqlx::Result<bool>;

    /// Every copy of `asset_id` still waiting (pending, failed, repairing)
    /// is due now instead of at the end of its back-off.
    async fn asset_replicas_due_now(&self, asset_id: &str) -> sqlx::Result<u64>;

    async fn account(&self, id: i64) -> sqlx::Result<Option<AccountRow>>;

    /// Disables (its sessions end at once) or enables an account. Returns
    /// whether it changed.
    async fn set_disabled(&self, user_id: i64, disabled: bool, at: i64) -> sqlx::Result<bool>;

    /// What the overview counts about movies, copies and jobs.
    async fn replication_summary(
        &self,
        min_replicas: i64,
        now: i64,
    ) -> sqlx::Result<ReplicationSummary>;

    // ---- the monitor, alert deliveries, incidents, drains ----

    /// Stores one result at `at`: the check's latest state, a history row
    /// when its state changed, and the seconds since its previous result
    /// (at most `max_gap`: a manager that was down observed nothing) added
    /// to that day's count of the state it was in. Returns the check's row
    /// as it was before, `None` for a check never seen.
    async fn record_check(
        &self,
        r: &CheckResult,
        at: i64,
        max_gap: i64,
    ) -> sqlx::Result<Option<CheckState>>;

    /// Every check's latest result, by id.
    async fn check_states(&self) -> sqlx::Result<Vec<CheckState>>;

    /// Records that `state` was announced for `check_id` at `at`.
    async fn mark_notified(&self, check_id: &str, state: Health, at: i64) -> sqlx::Result<()>;

    /// Per-check daily seconds from `from_day` on.
    async fn check_days(&self, from_day: i64) -> sqlx::Result<Vec<CheckDay>>;

    /// The newest `limit` changes of state, newest first.
    async fn check_history(&self, limit: i64) -> sqlx::Result<Vec<CheckEvent>>;

    /// Forgets history, daily counts and deliveries older than `before`.
    async fn prune_monitor(&self, before: i64) -> sqlx::Result<()>;

    async fn record_delivery(&self, d: &Delivery) -> sqlx::Result<()>;

    /// The newest `limit` deliveries, newest first.
    async fn deliveries(&self, limit: i64) -> sqlx::Result<Vec<Delivery>>;

    /// Opens an incident with its first update; returns its id.
    async fn create_incident(&self, i: &NewIncident<'_>) -> sqlx::Result<i64>;

    /// Adds to an incident's timeline; `resolves` closes it at `at`.
    /// `false` when there is no such incident or it is closed.
    async fn add_incident_update(&self, u: &IncidentUpdate, resolves: bool) -> sqlx::Result<bool>;

    /// Incidents open now, or closed or created since `since`, newest
    /// first, each with its timeline (oldest update first).
    async fn incidents(&self, since: i64) -> sqlx::Result<Vec<Incident>>;

    /// Takes `node` out of rotation (`drained`) or brings it back; `false`
    /// when it already was so.
    async fn set_drained(&self, node: &str, drained: bool, by: &str, at: i64)
        -> sqlx::Result<bool>;

    /// Nodes out of rotation.
    async fn drained_nodes(&self) -> sqlx::Result<Vec<String>>;

    /// The live database's own integrity check (SQLite's `quick_check`).
    async fn integrity_check(&self) -> Result<(), String>;

    /// The monitor's canary: the smallest published movie.
    async fn canary_asset(&self) -> sqlx::Result<Option<Asset>>;

    // ---- backups ----

    /// Closes every connection (a restore replaces the files after this).
    async fn close(&self);

    /// Whether other manager processes may use this database at the same
    /// time (PostgreSQL). SQLite's file belongs to one process: the
    /// manager refuses to start beside another on it ([`claim_process`]).
    fn shared(&self) -> bool;

    /// Takes the lead of the managers on this database if no other
    /// process holds it: `true` while this process leads. Only the leader
    /// runs background work (docs/operations.md, "A standby manager").
    /// PostgreSQL holds a session advisory lock on a connection of its
    /// own, which the server lets go the moment that connection dies (the
    /// process killed, its host gone once keepalives give up). Without
    /// other processes (SQLite) this process always leads.
    async fn try_lead(&self) -> sqlx::Result<bool>;

    /// Whether the lead taken by [`Catalog::try_lead`] still holds: its
    /// connection answers within seconds. `false` gives it up (another
    /// process may have it by now).
    async fn still_leading(&self) -> bool;

    /// Copies the whole catalog, consistent at one instant, into `dest` (a
    /// new file), and returns what the copy holds.
    async fn snapshot(&self, dest: &Path) -> Result<SnapshotCounts, String>;
}
