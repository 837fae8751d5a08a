//! The credits ledger (docs/credits.md): the rules of money. The books
//! themselves (rows, balances, locking) are the catalog's
//! ([`crate::catalog::Catalog`]): every movement is an append-only ledger
//! row and, in the same transaction, an update of the account's cached
//! balance, which can never go below zero; `Catalog::verify_balances`
//! proves the cache equals the ledger sum.
//!
//! This module checks what comes in (amounts, request ids, who may buy),
//! decides whether a movie is playable before charging for it, maps the
//! books' refusals to [`LedgerError`], and counts and logs what happened.
//!
//! A purchase charges the buyer, credits the uploader's share and creates
//! the play grant in one catalog operation, keyed by `<buyer>:<request id>`
//! so a retried request is charged once. Nodes journal what they served per
//! grant and forward it ([`record_journal`]); a grant under which nothing was
//! served is refunded by [`run`] once every node has reported past its
//! expiry (plus `credits.refund_grace_secs`).

use serde::Serialize;
use tokio::sync::watch;

pub use crate::catalog::{Approval, GrantRowView, LedgerRow, Recipients};
use crate::{
    catalog::{
        self, Catalog, GrantByKey, GrantOrder, NewAsset, PurchaseOrder, PurchaseOutcome, Refused,
        SharedCatalog, TxError,
    },
    config::CreditsConfig,
    domain::{AssetState, Credits, Price, Role},
    nodes::Nodes,
    redirect::{Lookup, PlayableCache, RedirectError},
};

/// Why the ledger refused, or failed. The HTTP layer gives each its status.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Bad input (`amount_invalid`, `request_id_invalid`, …).
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// The request conflicts with the books (`insufficient_credits` for a
    /// transfer, `balance_limit`, a reused request id, …).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("no such {0}")]
    NotFound(&'static str),
    /// A terminal purchase the buyer has not approved; says nothing more.
    #[error("purchases through this screen need your approval first: approve its owner on your account page on the web site")]
    TerminalNotApproved,
    /// Refused for a reason other than the balance (`daily_cap_reached`).
    #[error("{message}")]
    PaymentRequired { code: &'static str, message: String },
    #[error("your balance ({balance} credits) does not cover the price ({price} credits)")]
    InsufficientCredits { balance: i64, price: i64 },
    #[error("this movie is not published yet")]
    NotPublished,
    #[error("no mirror holding this movie is reachable right now; try again in a minute")]
    NoMirror,
    #[error("every stored copy of this movie is lost or corrupt; it cannot be played until an operator restores it")]
    Damaged,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl LedgerError {
    fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        LedgerError::Invalid {
            code,
            message: message.into(),
        }
    }
}

impl From<RedirectError> for LedgerError {
    fn from(e: RedirectError) -> Self {
        match e {
            RedirectError::NoMirror => LedgerError::NoMirror,
            RedirectError::Db(e) => LedgerError::Db(e),
            other => LedgerError::Internal(other.into()),
        }
    }
}

/// What a purchase needs besides its request: the books, which movies are
/// playable where, and the credits rules.
pub struct Shop<'a> {
    pub db: &'a dyn Catalog,
    pub nodes: &'a Nodes,
    pub playable: &'a PlayableCache,
    pub credits: &'a CreditsConfig,
    /// How long a free view's media URL lasts.
    pub token_ttl_secs: u64,
}

/// A grant id as logs show it: its first 8 characters. The whole id is a
/// bearer credential (the short media URL `/media/g/{grant}/…`), and 8 are
/// plenty to find the row (`WHERE id LIKE 'abcd1234%'`).
pub fn log_id(grant: &str) -> &str {
    grant.get(..8).unwrap_or(grant)
}

pub use crate::domain::{MAX_AMOUNT, MAX_BALANCE};
/// Longest request id a client may send (terminals use a UUID).
const MAX_REQUEST_ID: usize = 64;

fn bad_amount(message: impl Into<String>) -> LedgerError {
    LedgerError::invalid("amount_invalid", message)
}

/// Checks an amount given as JSON: a whole number, 1 to [`MAX_AMOUNT`].
/// Zero, negative, fractional, textual and overflowing values are refused
/// with `amount_invalid`.
pub fn parse_amount(v: &serde_json::Value) -> Result<Credits, LedgerError> {
    let n = match v {
        serde_json::Value::Number(n) => n,
        _ => return Err(bad_amount("the amount must be a number of credits")),
    };
    let Some(i) = n.as_i64() else {
        if n.is_u64() {
            return Err(bad_amount(format!(
                "the amount must be at most {MAX_AMOUNT}"
            )));
        }
        return Err(bad_amount("the amount must be a whole number of credits"));
    };
    check_amount(i)
}

/// Checks an amount given as text (forms, command line).
pub fn parse_amount_text(s: &str) -> Result<Credits, LedgerError> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return Err(bad_amount("the amount must be a whole number of credits"));
    }
    let i: i64 = s
        .parse()
        .map_err(|_| bad_amount(format!("the amount must be at most {MAX_AMOUNT}")))?;
    check_amount(i)
}

fn check_amount(i: i64) -> Result<Credits, LedgerError> {
    if i <= 0 {
        return Err(bad_amount("the amount must be greater than zero"));
    }
    Credits::new(i).ok_or_else(|| bad_amount(format!("the amount must be at most {MAX_AMOUNT}")))
}

/// A view price: 0 (free) to [`MAX_AMOUNT`].
pub fn parse_price(v: &serde_json::Value) -> Result<Price, LedgerError> {
    if v.as_i64() == Some(0) {
        return Ok(Price::Free);
    }
    parse_amount(v).map(Price::Paid)
}

/// A view price given as text (the price form): `0` is free.
pub fn parse_price_text(s: &str) -> Result<Price, LedgerError> {
    if s.trim() == "0" {
        return Ok(Price::Free);
    }
    parse_amount_text(s).map(Price::Paid)
}

fn check_request_id(id: &str) -> Result<(), LedgerError> {
    if id.is_empty()
        || id.len() > MAX_REQUEST_ID
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err(LedgerError::invalid(
            "request_id_invalid",
            format!(
                "`request_id` must be 1–{MAX_REQUEST_ID} letters, digits, '-', '_', '.' or ':'"
            ),
        ));
    }
    Ok(())
}

impl From<TxError> for LedgerError {
    fn from(e: TxError) -> Self {
        match e {
            TxError::Db(e) => LedgerError::Db(e),
            TxError::Refused(r) => match r {
                Refused::Insufficient { balance, .. } => LedgerError::Conflict {
                    code: "insufficient_credits",
                    message: format!("the account holds only {balance} credits"),
                },
                Refused::NoAccount => LedgerError::NotFound("account"),
                Refused::TooRich => LedgerError::Conflict {
                    code: "balance_limit",
                    message: format!("an account may hold at most {MAX_BALANCE} credits"),
                },
                Refused::EmailTaken => LedgerError::Conflict {
                    code: "email_taken",
                    message: "an account with this email exists; log in instead".into(),
                },
                Refused::NoMovie => LedgerError::NotFound("movie"),
                Refused::NotPublished => LedgerError::NotPublished,
                Refused::NotApproved => LedgerError::TerminalNotApproved,
                Refused::CapReached { cap } => LedgerError::PaymentRequired {
                    code: "daily_cap_reached",
                    message: format!(
                        "this purchase would pass the daily cap you set for this screen's owner \
                         ({cap} credits in 24 hours); raise it on your account page"
                    ),
                },
                Refused::Duplicate => request_id_reused(),
            },
        }
    }
}

fn request_id_reused() -> LedgerError {
    LedgerError::Conflict {
        code: "request_id_reused",
        message: "this request id was already used for another purchase".into(),
    }
}

/// A debit refused for the balance, said as "does not cover the price".
fn as_price(e: TxError) -> LedgerError {
    match e {
        TxError::Refused(Refused::Insufficient { balance, needed }) => {
            LedgerError::InsufficientCredits {
                balance,
                price: needed,
            }
        }
        e => e.into(),
    }
}

/// Creates an account with its signup bonus, in one transaction.
pub async fn create_account(
    db: &dyn Catalog,
    email: &str,
    password_hash: &str,
    role: Role,
    bonus: i64,
) -> Result<i64, LedgerError> {
    Ok(db.create_account(email, password_hash, role, bonus).await?)
}

/// An operator grant, recorded with who and why. `key` makes it
/// idempotent: the same key grants once per account, so a rule grant that
/// was interrupted can simply be run again. Returns the accounts credited now.
pub async fn grant(
    db: &dyn Catalog,
    to: &Recipients,
    amount: Credits,
    actor: &str,
    reason: &str,
    key: &str,
) -> Result<Vec<i64>, LedgerError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 500 {
        return Err(LedgerError::invalid(
            "reason_missing",
            "say why the credits are granted (1–500 characters)",
        ));
    }
    if key.is_empty() || key.len() > 100 {
        return Err(LedgerError::invalid(
            "grant_key_invalid",
            "the grant key must be 1–100 characters",
        ));
    }
    Ok(db
        .grant_credits(&GrantOrder {
            to,
            amount: amount.get(),
            actor,
            reason,
            key,
        })
        .await?)
}

#[derive(Debug, Clone, Serialize)]
pub struct Purchase {
    /// `None` for a free movie or the buyer's own: nothing was charged.
    pub grant_id: Option<String>,
    pub asset_id: String,
    pub price: i64,
    pub expires_at: i64,
    /// False when this answers a request already charged (a retry).
    pub charged_now: bool,
    pub balance: i64,
}

/// A purchase of one view of `asset_id` by `buyer`, idempotent on
/// `request_id` (per buyer). Refused, with nothing charged, when the movie
/// is not playable now (not published, damaged, or no healthy node holds a
/// verified copy).
pub async fn purchase(
    shop: &Shop<'_>,
    buyer: i64,
    asset_id: &str,
    request_id: &str,
    source: &str,
    terminal_owner: Option<i64>,
) -> Result<Purchase, LedgerError> {
    check_request_id(request_id)?;
    // Before anything else, so a refused terminal learns nothing (not even
    // whether a request id was used) about an account that never consented.
    if let Some(owner) = terminal_owner {
        if owner != buyer && approval(shop.db, buyer, owner).await?.is_none() {
            return Err(LedgerError::TerminalNotApproved);
        }
    }
    let request_key = format!("{buyer}:{request_id}");
    // A retry of a purchase already made answers as before, even if the
    // movie became unplayable since (the grant is refunded if unused).
    let origin = Origin {
        source,
        terminal_owner,
    };
    if let Some(p) = existing_purchase(shop.db, &request_key, asset_id, origin, buyer).await? {
        return Ok(p);
    }
    match shop.playable.get(shop.db, asset_id).await? {
        Lookup::Playable(p) => {
            if !shop
                .nodes
                .list
                .iter()
                .any(|n| p.verified.contains(&n.cfg.name) && n.is_healthy())
            {
                return Err(LedgerError::NoMirror);
            }
        }
        Lookup::Damaged => return Err(LedgerError::Damaged),
        Lookup::Gone => {
            return Err(match shop.db.asset(asset_id).await? {
                None => LedgerError::NotFound("movie"),
                Some(a) if a.state == AssetState::Rejected => LedgerError::Conflict {
                    code: "movie_rejected",
                    message: "this movie was rejected and cannot be bought".into(),
                },
                Some(_) => LedgerError::NotPublished,
            })
        }
    }
    let t = catalog::now();
    let grant_id = uuid::Uuid::new_v4().simple().to_string();
    let order = PurchaseOrder {
        buyer,
        asset_id,
        request_key: &request_key,
        grant_id: &grant_id,
        source,
        terminal_owner,
        uploader_share_percent: shop.credits.uploader_share_percent as i64,
        window_secs: shop.credits.grant_window_secs as i64,
        cap_window_secs: CAP_WINDOW_SECS,
        now: t,
    };
    match shop.db.purchase(&order).await {
        Ok(PurchaseOutcome::Free { balance }) => Ok(Purchase {
            grant_id: None,
            asset_id: asset_id.into(),
            price: 0,
            expires_at: t + shop.token_ttl_secs as i64,
            charged_now: false,
            balance,
        }),
        Ok(PurchaseOutcome::Charged {
            price,
            expires_at,
            balance,
        }) => {
            metrics::counter!("manager_purchases_total").increment(1);
            tracing::info!(grant = log_id(&grant_id), asset = %asset_id, buyer, price, "view purchased");
            Ok(Purchase {
                grant_id: Some(grant_id),
                asset_id: asset_id.into(),
                price,
                expires_at,
                charged_now: true,
                balance,
            })
        }
        // A concurrent retry of the same request was recorded first:
        // answer as that one did.
        Err(TxError::Refused(Refused::Duplicate)) => {
            existing_purchase(shop.db, &request_key, asset_id, origin, buyer)
                .await?
                .ok_or_else(|| {
                    LedgerError::Internal(anyhow::anyhow!("grant for {request_key} vanished"))
                })
        }
        Err(e) => Err(as_price(e)),
    }
}

// ---- consent to in-world purchases ------------------------------------------

/// The window of a terminal approval's cap: a rolling day, so the cap
/// cannot be spent twice around midnight.
pub const CAP_WINDOW_SECS: i64 = 24 * 3600;

pub async fn approval(db: &dyn Catalog, user: i64, owner: i64) -> sqlx::Result<Option<Approval>> {
    db.approval(user, owner, catalog::now() - CAP_WINDOW_SECS)
        .await
}

pub async fn approvals(db: &dyn Catalog, user: i64) -> sqlx::Result<Vec<Approval>> {
    db.approvals(user, catalog::now() - CAP_WINDOW_SECS).await
}

/// Approves (or changes the cap of) purchases by `user` through the
/// terminals of `owner`.
pub async fn approve(
    db: &dyn Catalog,
    user: i64,
    owner: i64,
    daily_cap: Credits,
    via_terminal: &str,
) -> Result<(), LedgerError> {
    db.approve(user, owner, daily_cap.get(), via_terminal)
        .await?;
    Ok(())
}

/// Where a purchase was asked from: a retry must come from the same place.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// `web`, `api` or `terminal`.
    pub source: &'a str,
    /// The terminal's owner, for terminal purchases.
    pub terminal_owner: Option<i64>,
}

fn purchase_from(
    row: GrantByKey,
    asset_id: &str,
    origin: Origin<'_>,
    balance: i64,
) -> Result<Purchase, LedgerError> {
    // Request ids are the client's choice ("1" will do): a retry that
    // names another movie, or comes through another source or another
    // owner's screen, is a different purchase, never the old grant.
    if row.asset_id != asset_id
        || row.source != origin.source
        || row.terminal_owner_id != origin.terminal_owner
    {
        return Err(request_id_reused());
    }
    Ok(Purchase {
        grant_id: Some(row.id),
        asset_id: row.asset_id,
        price: row.price,
        expires_at: row.expires_at,
        charged_now: false,
        balance,
    })
}

async fn existing_purchase(
    db: &dyn Catalog,
    key: &str,
    asset_id: &str,
    origin: Origin<'_>,
    buyer: i64,
) -> Result<Option<Purchase>, LedgerError> {
    match db.grant_by_request(key).await? {
        None => Ok(None),
        Some(r) => Ok(Some(purchase_from(
            r,
            asset_id,
            origin,
            db.balance(buyer).await?,
        )?)),
    }
}

// ---- upload costs -----------------------------------------------------------

/// Records an accepted upload and charges its cost (`credits.upload_cost`;
/// 0 = free) in one transaction: either the movie is queued and paid for,
/// or neither (`insufficient_credits`, and the caller's staging guard
/// removes the file).
pub async fn insert_asset_paid(
    db: &dyn Catalog,
    cost: i64,
    id: &str,
    owner: i64,
    title: &str,
    source_name: &str,
    source_bytes: i64,
) -> Result<(), LedgerError> {
    let asset = NewAsset {
        id,
        owner,
        title,
        source_name,
        source_bytes,
    };
    db.insert_asset_paid(&asset, cost).await.map_err(as_price)
}

/// Gives back the upload cost of every movie that ended `rejected`
/// (nothing is hosted for it): once per movie, by idempotency key.
pub async fn refund_rejected_uploads(db: &dyn Catalog) -> anyhow::Result<usize> {
    let mut n = 0;
    for u in db.unrefunded_rejected_uploads(500).await? {
        let done = db
            .refund_upload(&u, "the upload was rejected; nothing is hosted")
            .await
            .map_err(|e| anyhow::anyhow!("upload refund of {}: {e}", u.id))?;
        if done {
            n += 1;
        }
    }
    Ok(n)
}

// ---- refunds --------------------------------------------------------------

/// Refunds every grant under which nothing was served, once every
/// configured node has delivered its journal `refund_grace_secs` past the
/// grant's expiry. Returns how many were refunded.
pub async fn refund_due(
    db: &dyn Catalog,
    nodes: &[String],
    credits: &CreditsConfig,
) -> anyhow::Result<usize> {
    let contacts = db.journal_watermarks().await?;
    let mut horizon = i64::MAX;
    for n in nodes {
        match contacts.iter().find(|(name, _)| name == n) {
            Some((_, watermark)) => horizon = horizon.min(*watermark),
            // A node never heard from may hold unreported views: wait.
            None => return Ok(0),
        }
    }
    // After a restore, views delivered between the backup and the restore
    // are gone from our books: grants whose window reached into that gap
    // are never refunded automatically, and nothing is refunded until
    // every node's watermark has passed the restore (docs/backup.md).
    if db.restores_after(horizon).await? > 0 {
        return Ok(0);
    }
    let grace = credits.refund_grace_secs as i64;
    // Times are whole seconds: a grant bought in the backup's own second
    // counts as frozen (it may have been in the gap; erring towards no
    // refund).
    let mut n = 0;
    for id in db.unserved_grants_due(horizon - grace, grace, 500).await? {
        let refunded = db
            .refund_grant(&id)
            .await
            .map_err(|e| anyhow::anyhow!("refund of {}: {e}", log_id(&id)))?;
        if let Some(r) = refunded {
            metrics::counter!("manager_grants_refunded_total").increment(1);
            tracing::info!(
                grant = log_id(&id),
                buyer = r.buyer,
                price = r.price,
                absorbed = r.absorbed,
                "unplayed grant refunded"
            );
            n += 1;
        }
    }
    Ok(n)
}

/// The refund sweeper: every `credits.sweep_interval_secs` until `stop`.
pub async fn run(
    db: SharedCatalog,
    nodes: Vec<String>,
    credits: CreditsConfig,
    mut stop: watch::Receiver<bool>,
) {
    let every = std::time::Duration::from_secs(credits.sweep_interval_secs);
    let worker = crate::workers::Worker::register("refunds");
    loop {
        worker.started();
        let mut failed = None;
        if let Err(e) = refund_due(&*db, &nodes, &credits).await {
            tracing::error!("refund sweep failed: {e:#}");
            failed = Some(format!("refund sweep: {e:#}"));
        }
        if let Err(e) = refund_rejected_uploads(&*db).await {
            tracing::error!("upload refund sweep failed: {e:#}");
            failed = Some(format!("upload refund sweep: {e:#}"));
        }
        worker.finished(failed.map_or(Ok(()), Err));
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => {
                worker.stopped();
                return;
            }
        }
    }
}

// ---- the view journal -------------------------------------------------------

const MAX_EVENTS_PER_BATCH: usize = 1000;

/// How long a view event's record is kept (by its last byte's time). Its
/// bytes go into the grant's totals (`play_grants`) when it arrives; the
/// record only recognises the same event resent (a node that lost its
/// delivery cursor sends its journal again), so it is deleted after this
/// (`prune_view_events`, daily) and events older than this are ignored on
/// arrival. A node's journal normally reaches the manager within seconds,
/// within days after an outage; half a year leaves a wide margin while the
/// table stops growing with every view ever served.
pub const VIEW_EVENT_KEEP_SECS: i64 = 183 * 86_400;

/// A node's journal delivery (`POST /internal/v1/nodes/{name}/journal`,
/// signed by it; the HTTP layer checks the signature). Applies each event
/// exactly once (`(node, id)` is unique) and records the node's watermark,
/// in one transaction. Answers how many were new.
pub async fn record_journal(
    db: &dyn Catalog,
    name: String,
    body: &[u8],
) -> Result<shared::protocol::JournalReceipt, LedgerError> {
    let batch: shared::protocol::JournalBatch = serde_json::from_slice(body).map_err(|e| {
        LedgerError::invalid(
            "bad_journal_event",
            format!("the journal batch is not valid: {e}"),
        )
    })?;
    if batch.events.len() > MAX_EVENTS_PER_BATCH {
        return Err(LedgerError::invalid(
            "bad_journal_event",
            format!("at most {MAX_EVENTS_PER_BATCH} events per batch"),
        ));
    }
    for e in &batch.events {
        if e.id.is_empty()
            || e.id.len() > 64
            || e.asset.len() > 64
            || e.grant.as_ref().is_some_and(|g| g.len() > 64)
            || e.bytes > 1 << 45
            || e.last_at < e.first_at
        {
            return Err(LedgerError::invalid(
                "bad_journal_event",
                format!("event {:?} is malformed", e.id),
            ));
        }
    }
    let now = catalog::now();
    // The node's watermark on our clock: moved back by as far as its clock
    // runs ahead of ours (never forward for one that runs behind), and
    // never past our own now.
    let ahead = (batch.now - now).max(0);
    let watermark = (batch.watermark - ahead).min(now).max(0);
    // Too old to tell from a resend: its record may be gone (retention),
    // and counting it again would add its bytes twice.
    let sent = batch.events.len() as u64;
    let (events, too_old): (Vec<_>, Vec<_>) = batch
        .events
        .into_iter()
        // On our clock, as the watermark is (a node running ahead would
        // otherwise keep events past their time).
        .partition(|e| e.last_at - ahead >= now - VIEW_EVENT_KEEP_SECS);
    if !too_old.is_empty() {
        metrics::counter!("manager_view_events_too_old_total", "node" => name.clone())
            .increment(too_old.len() as u64);
        tracing::warn!(node = %name, count = too_old.len(),
            "view events older than the retention period ignored");
    }
    let done = db.apply_journal(&name, &events, watermark, now).await?;
    for (grant, bytes) in &done.after_refund {
        // A view we refunded was served after all: the refund rule failed
        // somewhere. Kept apart by the books, and raised for the operator.
        metrics::counter!("manager_bytes_after_refund_total", "node" => name.clone())
            .increment(*bytes);
        crate::alerts::raise(
            "served_after_refund",
            "a node served a grant that was already refunded",
            format!("node={name} grant={} bytes={bytes}", log_id(grant)),
        );
    }
    metrics::counter!("manager_view_events_total", "node" => name.clone()).increment(done.applied);
    // How far behind each node's journal is: now minus this (operators'
    // "journal lag"; refunds wait for the lowest).
    metrics::gauge!("manager_node_watermark_seconds", "node" => name.clone()).set(watermark as f64);
    Ok(shared::protocol::JournalReceipt {
        node: name,
        applied: done.applied,
        duplicates: sent - done.applied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The code a refusal carries, to assert on (the HTTP layer maps the
    /// rest; only these tests need it here).
    trait Code {
        fn code(&self) -> &'static str;
    }

    impl Code for LedgerError {
        fn code(&self) -> &'static str {
            match self {
                LedgerError::Invalid { code, .. }
                | LedgerError::Conflict { code, .. }
                | LedgerError::PaymentRequired { code, .. } => code,
                LedgerError::InsufficientCredits { .. } => "insufficient_credits",
                LedgerError::NotFound(_) => "not_found",
                _ => "other",
            }
        }
    }

    async fn fresh() -> (tempfile::TempDir, catalog::SharedCatalog) {
        let dir = tempfile::tempdir().unwrap();
        let db = catalog::open(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
        (dir, db)
    }

    #[test]
    fn amounts_are_whole_positive_and_bounded() {
        use serde_json::json;
        assert_eq!(parse_amount(&json!(5)).unwrap().get(), 5);
        for bad in [
            json!(0),
            json!(-5),
            json!(1.5),
            json!("5"),
            json!(u64::MAX),
            json!(MAX_AMOUNT + 1),
            json!(null),
        ] {
            let e = parse_amount(&bad).unwrap_err();
            assert_eq!(e.code(), "amount_invalid", "{bad}");
        }
        assert_eq!(parse_price(&json!(0)).unwrap(), Price::Free);
        assert_eq!(parse_price_text("0").unwrap(), Price::Free);
        assert_eq!(parse_price_text("3").unwrap().get(), 3);
        assert!(parse_price_text("-3").is_err());
        assert_eq!(parse_amount_text("12").unwrap().get(), 12);
        for bad in ["", "0", "-1", "1.5", "1e3", "99999999999999999999", " "] {
            assert_eq!(
                parse_amount_text(bad).unwrap_err().code(),
                "amount_invalid",
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn view_events_older_than_their_retention_are_not_counted() {
        let (_dir, db) = fresh().await;
        let now = catalog::now();
        let event = |id: &str, at: i64| shared::protocol::JournalEvent {
            id: id.into(),
            grant: None,
            asset: "a".into(),
            bytes: 10,
            first_at: at,
            last_at: at,
        };
        let batch = shared::protocol::JournalBatch {
            events: vec![
                event("fresh", now - 60),
                event("ancient", now - VIEW_EVENT_KEEP_SECS - 60),
            ],
            ..Default::default()
        };
        let body = serde_json::to_vec(&batch).unwrap();
        let r = record_journal(&*db, "utah".into(), &body).await.unwrap();
        assert_eq!((r.applied, r.duplicates), (1, 1));
        let r = record_journal(&*db, "utah".into(), &body).await.unwrap();
        assert_eq!((r.applied, r.duplicates), (0, 2));
    }

    #[tokio::test]
    async fn signup_bonus_grants_and_the_append_only_ledger() {
        let (_d, db) = fresh().await;
        let a = create_account(&*db, "a@x", "h", Role::Uploader, 1000)
            .await
            .unwrap();
        let b = create_account(&*db, "b@x", "h", Role::Uploader, 0)
            .await
            .unwrap();
        assert_eq!(db.balance(a).await.unwrap(), 1000);
        assert_eq!(db.balance(b).await.unwrap(), 0);
        let e = create_account(&*db, "a@x", "h", Role::Uploader, 1000)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "email_taken");
        // A rule grant reaches everyone created before the cut-off, once per key.
        let everyone = Recipients::CreatedBefore(catalog::now() + 10);
        let fifty = Credits::new(50).unwrap();
        let got = grant(&*db, &everyone, fifty, "operator:o", "outage", "k1")
            .await
            .unwrap();
        assert_eq!(got, vec![a, b]);
        let again = grant(&*db, &everyone, fifty, "operator:o", "outage", "k1")
            .await
            .unwrap();
        assert!(again.is_empty(), "the same key grants once");
        assert_eq!(db.balance(a).await.unwrap(), 1050);
        assert_eq!(
            grant(&*db, &Recipients::Account(a), fifty, "o", " ", "k3")
                .await
                .unwrap_err()
                .code(),
            "reason_missing"
        );
        assert!(db.verify_balances().await.unwrap().is_empty());
        let h = db.history(a, 10).await.unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].kind, "grant");
        assert_eq!(h[0].balance_after, 1050);
    }

    #[tokio::test]
    async fn uploads_are_charged_with_their_row_and_refunded_when_rejected() {
        let (_d, db) = fresh().await;
        let a = create_account(&*db, "a@x", "h", Role::Uploader, 25)
            .await
            .unwrap();
        insert_asset_paid(&*db, 10, "m1", a, "M1", "m1.mp4", 1)
            .await
            .unwrap();
        insert_asset_paid(&*db, 10, "m2", a, "M2", "m2.mp4", 1)
            .await
            .unwrap();
        let e = insert_asset_paid(&*db, 10, "m3", a, "M3", "m3.mp4", 1)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "insufficient_credits");
        assert!(db.asset("m3").await.unwrap().is_none(), "no unpaid row");
        assert_eq!(db.balance(a).await.unwrap(), 5);
        db.reject("m1", "seed", "not_media", "x").await.unwrap();
        assert_eq!(refund_rejected_uploads(&*db).await.unwrap(), 1);
        assert_eq!(refund_rejected_uploads(&*db).await.unwrap(), 0, "once");
        assert_eq!(db.balance(a).await.unwrap(), 15);
        insert_asset_paid(&*db, 0, "m4", a, "Free", "m4.mp4", 1)
            .await
            .unwrap();
        assert_eq!(db.balance(a).await.unwrap(), 15);
        assert!(db.verify_balances().await.unwrap().is_empty());
    }
}
