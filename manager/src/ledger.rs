//! The credits ledger (docs/credits.md).
//!
//! Every movement is a row in `ledger` (append-only: triggers refuse UPDATE
//! and DELETE) and, in the same transaction, an update of the account's
//! cached `users.balance`. Writers serialize on SQLite's write lock taken
//! up front (`BEGIN IMMEDIATE`), and the debit itself is a guarded
//! `UPDATE … WHERE balance + amount >= 0`, so two purchases racing for a
//! balance that covers one cannot both pass, and the `CHECK (balance >= 0)`
//! on the column refuses a negative balance even from a buggy caller.
//! [`verify_balances`] proves the cache equals the ledger sum.
//!
//! A purchase charges the buyer, credits the uploader's share and creates
//! the play grant in one transaction, keyed by `<buyer>:<request id>` so a
//! retried request is charged once. Nodes journal what they served per
//! grant and forward it ([`record_journal`]); a grant under which nothing was
//! served is refunded by [`run`] once every node has reported past its
//! expiry (plus `credits.refund_grace_secs`).

use serde::Serialize;
use sqlx::{Sqlite, Transaction};
use tokio::sync::watch;

use crate::{
    config::CreditsConfig,
    db,
    domain::AssetState,
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
    pub db: &'a db::Db,
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
pub fn parse_amount(v: &serde_json::Value) -> Result<i64, LedgerError> {
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
pub fn parse_amount_text(s: &str) -> Result<i64, LedgerError> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return Err(bad_amount("the amount must be a whole number of credits"));
    }
    let i: i64 = s
        .parse()
        .map_err(|_| bad_amount(format!("the amount must be at most {MAX_AMOUNT}")))?;
    check_amount(i)
}

fn check_amount(i: i64) -> Result<i64, LedgerError> {
    if i <= 0 {
        return Err(bad_amount("the amount must be greater than zero"));
    }
    if i > MAX_AMOUNT {
        return Err(bad_amount(format!(
            "the amount must be at most {MAX_AMOUNT}"
        )));
    }
    Ok(i)
}

/// A view price: 0 (free) to [`MAX_AMOUNT`].
pub fn parse_price(v: &serde_json::Value) -> Result<i64, LedgerError> {
    if v.as_i64() == Some(0) {
        return Ok(0);
    }
    parse_amount(v)
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

/// Ledger writers of this process queue here before asking SQLite for its
/// write lock: waiting on a mutex wakes the next writer at once, where
/// SQLite's busy handler sleeps and retries (tail latency under load).
static WRITERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes SQLite's write lock at once (`BEGIN IMMEDIATE`), so the checks
/// made inside the transaction still hold when it writes; that alone is
/// what makes writers from several processes safe. Hold the guard as long
/// as the transaction.
async fn begin(
    db: &db::Db,
) -> sqlx::Result<(
    tokio::sync::MutexGuard<'static, ()>,
    Transaction<'static, Sqlite>,
)> {
    let guard = WRITERS.lock().await;
    let tx = db.begin_with("BEGIN IMMEDIATE").await?;
    Ok((guard, tx))
}

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

/// Why [`post`] did not move anything.
#[derive(Debug)]
enum PostError {
    Insufficient { balance: i64 },
    NoAccount,
    TooRich,
    Db(sqlx::Error),
}

impl From<sqlx::Error> for PostError {
    fn from(e: sqlx::Error) -> Self {
        PostError::Db(e)
    }
}

impl From<PostError> for LedgerError {
    fn from(e: PostError) -> Self {
        match e {
            PostError::Insufficient { balance } => LedgerError::Conflict {
                code: "insufficient_credits",
                message: format!("the account holds only {balance} credits"),
            },
            PostError::NoAccount => LedgerError::NotFound("account"),
            PostError::TooRich => LedgerError::Conflict {
                code: "balance_limit",
                message: format!("an account may hold at most {MAX_BALANCE} credits"),
            },
            PostError::Db(e) => LedgerError::Db(e),
        }
    }
}

/// One movement inside the caller's transaction: the guarded balance
/// update, then the ledger row. Returns the balance after.
async fn post(tx: &mut Transaction<'static, Sqlite>, e: &Entry<'_>) -> Result<i64, PostError> {
    let row: Option<(i64,)> = sqlx::query_as(
        "UPDATE users SET balance = balance + ?1
         WHERE id = ?2 AND balance + ?1 >= 0 AND balance + ?1 <= ?3 RETURNING balance",
    )
    .bind(e.amount)
    .bind(e.account)
    .bind(MAX_BALANCE)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((after,)) = row else {
        let bal: Option<(i64,)> = sqlx::query_as("SELECT balance FROM users WHERE id = ?")
            .bind(e.account)
            .fetch_optional(&mut **tx)
            .await?;
        return Err(match bal {
            None => PostError::NoAccount,
            Some(_) if e.amount > 0 => PostError::TooRich,
            Some((balance,)) => PostError::Insufficient { balance },
        });
    };
    sqlx::query(
        "INSERT INTO ledger (account_id, amount, kind, reference, idem_key, actor, reason, balance_after, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(e.account)
    .bind(e.amount)
    .bind(e.kind)
    .bind(e.reference)
    .bind(e.idem_key)
    .bind(e.actor)
    .bind(e.reason)
    .bind(after)
    .bind(db::now())
    .execute(&mut **tx)
    .await?;
    Ok(after)
}

async fn entry_exists(tx: &mut Transaction<'static, Sqlite>, key: &str) -> sqlx::Result<bool> {
    let r: Option<(i64,)> = sqlx::query_as("SELECT id FROM ledger WHERE idem_key = ?")
        .bind(key)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(r.is_some())
}

pub async fn balance(db: &db::Db, account: i64) -> sqlx::Result<i64> {
    let (b,): (i64,) = sqlx::query_as("SELECT balance FROM users WHERE id = ?")
        .bind(account)
        .fetch_one(db)
        .await?;
    Ok(b)
}

/// Accounts whose cached balance differs from their ledger sum, as
/// `(account, balance, ledger sum)`. Empty when the books are exact.
pub async fn verify_balances(db: &db::Db) -> sqlx::Result<Vec<(i64, i64, i64)>> {
    sqlx::query_as(
        "SELECT u.id, u.balance, COALESCE(SUM(l.amount), 0) AS s FROM users u
         LEFT JOIN ledger l ON l.account_id = u.id GROUP BY u.id HAVING u.balance <> s",
    )
    .fetch_all(db)
    .await
}

/// Creates an account with its signup bonus, in one transaction.
pub async fn create_account(
    db: &db::Db,
    email: &str,
    password_hash: &str,
    role: &str,
    bonus: i64,
) -> Result<i64, LedgerError> {
    let (_writer, mut tx) = begin(db).await?;
    let r = sqlx::query(
        "INSERT INTO users (email, password_hash, role, created_at) VALUES (?, ?, ?, ?)",
    )
    .bind(email)
    .bind(password_hash)
    .bind(role)
    .bind(db::now())
    .execute(&mut *tx)
    .await;
    let id = match r {
        Ok(r) => r.last_insert_rowid(),
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            return Err(LedgerError::Conflict {
                code: "email_taken",
                message: "an account with this email exists; log in instead".into(),
            })
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

/// Who is granted credits by an operator.
#[derive(Debug, Clone)]
pub enum Recipients {
    Account(i64),
    /// Every account created before this unix time (e.g. everyone who had
    /// an account when an outage began).
    CreatedBefore(i64),
}

/// An operator grant, recorded with who and why. `key` makes it
/// idempotent: the same key grants once per account, so a rule grant that
/// was interrupted can simply be run again. Returns the accounts credited now.
pub async fn grant(
    db: &db::Db,
    to: &Recipients,
    amount: i64,
    actor: &str,
    reason: &str,
    key: &str,
) -> Result<Vec<i64>, LedgerError> {
    check_amount(amount)?;
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
    let (_writer, mut tx) = begin(db).await?;
    let accounts: Vec<(i64,)> = match to {
        Recipients::Account(id) => vec![(*id,)],
        Recipients::CreatedBefore(t) => {
            sqlx::query_as("SELECT id FROM users WHERE created_at < ? ORDER BY id")
                .bind(t)
                .fetch_all(&mut *tx)
                .await?
        }
    };
    let reference = match to {
        Recipients::Account(_) => String::new(),
        Recipients::CreatedBefore(t) => format!("rule:created_before:{t}"),
    };
    let mut done = Vec::new();
    for (id,) in accounts {
        let idem = format!("grant:{key}:{id}");
        if entry_exists(&mut tx, &idem).await? {
            continue;
        }
        post(
            &mut tx,
            &Entry {
                account: id,
                amount,
                kind: "grant",
                reference: &reference,
                idem_key: &idem,
                actor,
                reason,
            },
        )
        .await?;
        done.push(id);
    }
    tx.commit().await?;
    Ok(done)
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
            return Err(match db::asset(shop.db, asset_id).await? {
                None => LedgerError::NotFound("movie"),
                Some(a) if a.state == AssetState::Rejected => LedgerError::Conflict {
                    code: "movie_rejected",
                    message: "this movie was rejected and cannot be bought".into(),
                },
                Some(_) => LedgerError::NotPublished,
            })
        }
    }
    let t = db::now();
    let (_writer, mut tx) = begin(shop.db).await?;
    // A concurrent retry of the same request may win the race to here: the
    // grant's UNIQUE request key then refuses our insert below and the
    // whole transaction rolls back (see the end of this function).
    let Some((price, seller, state)): Option<(i64, i64, String)> =
        sqlx::query_as("SELECT price, owner_id, state FROM assets WHERE id = ?")
            .bind(asset_id)
            .fetch_optional(&mut *tx)
            .await?
    else {
        return Err(LedgerError::NotFound("movie"));
    };
    if state != "published" {
        return Err(LedgerError::NotPublished);
    }
    let window = shop.credits.grant_window_secs as i64;
    if price == 0 || seller == buyer {
        let (balance,): (i64,) = sqlx::query_as("SELECT balance FROM users WHERE id = ?")
            .bind(buyer)
            .fetch_one(&mut *tx)
            .await?;
        return Ok(Purchase {
            grant_id: None,
            asset_id: asset_id.into(),
            price: 0,
            expires_at: t + shop.token_ttl_secs as i64,
            charged_now: false,
            balance,
        });
    }
    if let Some(owner) = terminal_owner.filter(|o| *o != buyer) {
        // Inside the write transaction: two purchases racing for the last
        // of the cap cannot both see room for themselves.
        let cap: Option<(i64,)> = sqlx::query_as(
            "SELECT daily_cap FROM terminal_approvals WHERE user_id = ? AND owner_id = ?",
        )
        .bind(buyer)
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((cap,)) = cap else {
            return Err(LedgerError::TerminalNotApproved);
        };
        let (spent,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(SUM(price), 0) FROM play_grants
             WHERE buyer_id = ? AND terminal_owner_id = ? AND created_at > ? AND state = 'active'",
        )
        .bind(buyer)
        .bind(owner)
        .bind(t - CAP_WINDOW_SECS)
        .fetch_one(&mut *tx)
        .await?;
        if spent + price > cap {
            return Err(LedgerError::PaymentRequired {
                code: "daily_cap_reached",
                message: format!(
                    "this purchase would pass the daily cap you set for this screen's owner \
                     ({cap} credits in 24 hours); raise it on your account page"
                ),
            });
        }
    }
    let share = price * shop.credits.uploader_share_percent as i64 / 100;
    let grant_id = uuid::Uuid::new_v4().simple().to_string();
    let actor = format!("{source}:{buyer}");
    let balance = match post(
        &mut tx,
        &Entry {
            account: buyer,
            amount: -price,
            kind: "purchase",
            reference: &grant_id,
            idem_key: &format!("purchase:{grant_id}"),
            actor: &actor,
            reason: asset_id,
        },
    )
    .await
    {
        Ok(b) => b,
        Err(PostError::Insufficient { balance }) => {
            return Err(LedgerError::InsufficientCredits { balance, price })
        }
        Err(e) => return Err(e.into()),
    };
    if share > 0 {
        post(
            &mut tx,
            &Entry {
                account: seller,
                amount: share,
                kind: "sale",
                reference: &grant_id,
                idem_key: &format!("sale:{grant_id}"),
                actor: &actor,
                reason: asset_id,
            },
        )
        .await?;
    }
    let inserted = sqlx::query(
        "INSERT INTO play_grants (id, asset_id, buyer_id, seller_id, price, seller_share, request_key,
         source, created_at, expires_at, terminal_owner_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&grant_id)
    .bind(asset_id)
    .bind(buyer)
    .bind(seller)
    .bind(price)
    .bind(share)
    .bind(&request_key)
    .bind(source)
    .bind(t)
    .bind(t + window)
    .bind(terminal_owner)
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => {}
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            drop(tx); // rolls back the charge
            drop(_writer);
            return existing_purchase(shop.db, &request_key, asset_id, origin, buyer)
                .await?
                .ok_or_else(|| {
                    LedgerError::Internal(anyhow::anyhow!("grant for {request_key} vanished"))
                });
        }
        Err(e) => return Err(e.into()),
    }
    tx.commit().await?;
    metrics::counter!("manager_purchases_total").increment(1);
    tracing::info!(grant = log_id(&grant_id), asset = %asset_id, buyer, price, "view purchased");
    Ok(Purchase {
        grant_id: Some(grant_id),
        asset_id: asset_id.into(),
        price,
        expires_at: t + window,
        charged_now: true,
        balance,
    })
}

// ---- consent to in-world purchases ------------------------------------------

/// The window of a terminal approval's cap: a rolling day, so the cap
/// cannot be spent twice around midnight.
pub const CAP_WINDOW_SECS: i64 = 24 * 3600;

/// An account's consent to purchases through one owner's terminals.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Approval {
    pub owner_id: i64,
    pub daily_cap: i64,
    pub via_terminal: String,
    pub created_at: i64,
    /// Credits spent through this owner's terminals in the last 24 hours.
    pub spent_24h: i64,
}

const APPROVALS: &str = "SELECT a.owner_id, a.daily_cap, a.via_terminal, a.created_at,
     (SELECT COALESCE(SUM(g.price), 0) FROM play_grants g
      WHERE g.buyer_id = a.user_id AND g.terminal_owner_id = a.owner_id
        AND g.created_at > ? AND g.state = 'active') AS spent_24h
     FROM terminal_approvals a WHERE a.user_id = ?";

pub async fn approval(db: &db::Db, user: i64, owner: i64) -> sqlx::Result<Option<Approval>> {
    sqlx::query_as(&format!("{APPROVALS} AND a.owner_id = ?"))
        .bind(db::now() - CAP_WINDOW_SECS)
        .bind(user)
        .bind(owner)
        .fetch_optional(db)
        .await
}

pub async fn approvals(db: &db::Db, user: i64) -> sqlx::Result<Vec<Approval>> {
    sqlx::query_as(&format!("{APPROVALS} ORDER BY a.created_at DESC"))
        .bind(db::now() - CAP_WINDOW_SECS)
        .bind(user)
        .fetch_all(db)
        .await
}

/// Approves (or changes the cap of) purchases by `user` through the
/// terminals of `owner`.
pub async fn approve(
    db: &db::Db,
    user: i64,
    owner: i64,
    daily_cap: i64,
    via_terminal: &str,
) -> Result<(), LedgerError> {
    check_amount(daily_cap).map_err(|_| {
        LedgerError::invalid(
            "daily_cap_invalid",
            format!("the daily cap is a whole number of credits, 1 to {MAX_AMOUNT}"),
        )
    })?;
    sqlx::query(
        "INSERT INTO terminal_approvals (user_id, owner_id, daily_cap, via_terminal, created_at)
         VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (user_id, owner_id) DO UPDATE SET daily_cap = excluded.daily_cap",
    )
    .bind(user)
    .bind(owner)
    .bind(daily_cap)
    .bind(via_terminal)
    .bind(db::now())
    .execute(db)
    .await?;
    Ok(())
}

/// Withdraws consent at once; `false` when there was none.
pub async fn revoke(db: &db::Db, user: i64, owner: i64) -> sqlx::Result<bool> {
    let r = sqlx::query("DELETE FROM terminal_approvals WHERE user_id = ? AND owner_id = ?")
        .bind(user)
        .bind(owner)
        .execute(db)
        .await?;
    Ok(r.rows_affected() > 0)
}

type GrantRow = (String, String, i64, i64, String, Option<i64>);

/// Where a purchase was asked from: a retry must come from the same place.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// `web`, `api` or `terminal`.
    pub source: &'a str,
    /// The terminal's owner, for terminal purchases.
    pub terminal_owner: Option<i64>,
}

fn purchase_from(
    row: GrantRow,
    asset_id: &str,
    origin: Origin<'_>,
    balance: i64,
) -> Result<Purchase, LedgerError> {
    let (id, asset, price, expires_at, source, terminal_owner) = row;
    // Request ids are the client's choice ("1" will do): a retry that
    // names another movie, or comes through another source or another
    // owner's screen, is a different purchase, never the old grant.
    if asset != asset_id || source != origin.source || terminal_owner != origin.terminal_owner {
        return Err(LedgerError::Conflict {
            code: "request_id_reused",
            message: "this request id was already used for another purchase".into(),
        });
    }
    Ok(Purchase {
        grant_id: Some(id),
        asset_id: asset,
        price,
        expires_at,
        charged_now: false,
        balance,
    })
}

const GRANT_BY_KEY: &str = "SELECT id, asset_id, price, expires_at, source, terminal_owner_id
     FROM play_grants WHERE request_key = ?";

async fn existing_purchase(
    db: &db::Db,
    key: &str,
    asset_id: &str,
    origin: Origin<'_>,
    buyer: i64,
) -> Result<Option<Purchase>, LedgerError> {
    let row: Option<GrantRow> = sqlx::query_as(GRANT_BY_KEY)
        .bind(key)
        .fetch_optional(db)
        .await?;
    match row {
        None => Ok(None),
        Some(r) => Ok(Some(purchase_from(
            r,
            asset_id,
            origin,
            balance(db, buyer).await?,
        )?)),
    }
}

pub async fn price(db: &db::Db, asset_id: &str) -> sqlx::Result<i64> {
    let r: Option<(i64,)> = sqlx::query_as("SELECT price FROM assets WHERE id = ?")
        .bind(asset_id)
        .fetch_optional(db)
        .await?;
    Ok(r.map(|r| r.0).unwrap_or(0))
}

// ---- upload costs -----------------------------------------------------------

/// Records an accepted upload and charges its cost (`credits.upload_cost`;
/// 0 = free) in one transaction: either the movie is queued and paid for,
/// or neither (`insufficient_credits`, and the caller's staging guard
/// removes the file).
pub async fn insert_asset_paid(
    db: &db::Db,
    cost: i64,
    id: &str,
    owner: i64,
    title: &str,
    source_name: &str,
    source_bytes: i64,
) -> Result<(), LedgerError> {
    let (_writer, mut tx) = begin(db).await?;
    let t = db::now();
    sqlx::query(
        "INSERT INTO assets (id, owner_id, title, state, source_name, source_bytes, created_at, updated_at)
         VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
    )
    .bind(id)
    .bind(owner)
    .bind(title)
    .bind(source_name)
    .bind(source_bytes)
    .bind(t)
    .bind(t)
    .execute(&mut *tx)
    .await?;
    if cost > 0 {
        let r = post(
            &mut tx,
            &Entry {
                account: owner,
                amount: -cost,
                kind: "upload",
                reference: id,
                idem_key: &format!("upload:{id}"),
                actor: &format!("user:{owner}"),
                reason: title,
            },
        )
        .await;
        match r {
            Ok(_) => {}
            Err(PostError::Insufficient { balance }) => {
                return Err(LedgerError::InsufficientCredits {
                    balance,
                    price: cost,
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Gives back the upload cost of every movie that ended `rejected`
/// (nothing is hosted for it): once per movie, by idempotency key.
pub async fn refund_rejected_uploads(db: &db::Db) -> anyhow::Result<usize> {
    let due: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT a.id, a.owner_id, -l.amount FROM assets a
         JOIN ledger l ON l.idem_key = 'upload:' || a.id
         WHERE a.state = 'rejected'
           AND NOT EXISTS (SELECT 1 FROM ledger r WHERE r.idem_key = 'upload-refund:' || a.id)
         LIMIT 500",
    )
    .fetch_all(db)
    .await?;
    let mut n = 0;
    for (id, owner, cost) in due {
        let (_writer, mut tx) = begin(db).await?;
        let key = format!("upload-refund:{id}");
        if entry_exists(&mut tx, &key).await? {
            continue;
        }
        post(
            &mut tx,
            &Entry {
                account: owner,
                amount: cost,
                kind: "refund",
                reference: &id,
                idem_key: &key,
                actor: "system",
                reason: "the upload was rejected; nothing is hosted",
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("upload refund of {id}: {e:?}"))?;
        tx.commit().await?;
        n += 1;
    }
    Ok(n)
}

// ---- refunds --------------------------------------------------------------

/// Refunds every grant under which nothing was served, once every
/// configured node has delivered its journal `refund_grace_secs` past the
/// grant's expiry. Returns how many were refunded.
pub async fn refund_due(
    db: &db::Db,
    nodes: &[String],
    credits: &CreditsConfig,
) -> anyhow::Result<usize> {
    let contacts: Vec<(String, i64)> =
        sqlx::query_as("SELECT node, watermark FROM journal_contacts")
            .fetch_all(db)
            .await?;
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
    let (not_restored,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM refund_freeze WHERE restored_at > ?")
            .bind(horizon)
            .fetch_one(db)
            .await?;
    if not_restored > 0 {
        return Ok(0);
    }
    let grace = credits.refund_grace_secs as i64;
    // Grants a restore froze are left out here, in the query, so however
    // many there are they never crowd the due ones out of the batch. Times
    // are whole seconds: a grant bought in the backup's own second counts
    // as frozen (it may have been in the gap; erring towards no refund).
    let due: Vec<(String,)> = sqlx::query_as(
        "SELECT g.id FROM play_grants g
         WHERE g.state = 'active' AND g.bytes_served = 0 AND g.expires_at <= ?1
           AND NOT EXISTS (SELECT 1 FROM refund_freeze f
                           WHERE g.created_at <= f.backup_at AND g.expires_at + ?2 > f.safe_until)
         ORDER BY g.expires_at LIMIT 500",
    )
    .bind(horizon - grace)
    .bind(grace)
    .fetch_all(db)
    .await?;
    let mut n = 0;
    for (id,) in due {
        if refund(db, &id).await? {
            n += 1;
        }
    }
    Ok(n)
}

/// Refunds one unplayed grant: the buyer gets the price back and the
/// uploader's share is reversed, as far as the uploader's balance allows
/// (balances never go negative; the site absorbs a shortfall, and the
/// entry's reason says so).
async fn refund(db: &db::Db, grant_id: &str) -> anyhow::Result<bool> {
    let (_writer, mut tx) = begin(db).await?;
    let row: Option<(i64, i64, i64, i64, String)> = sqlx::query_as(
        "UPDATE play_grants SET state = 'refunded' WHERE id = ? AND state = 'active' AND bytes_served = 0
         RETURNING buyer_id, seller_id, price, seller_share, asset_id",
    )
    .bind(grant_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((buyer, seller, price, share, asset)) = row else {
        return Ok(false);
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
    .await
    .map_err(|e| anyhow::anyhow!("refund of {grant_id}: {e:?}"))?;
    if share > 0 {
        let (seller_balance,): (i64,) = sqlx::query_as("SELECT balance FROM users WHERE id = ?")
            .bind(seller)
            .fetch_one(&mut *tx)
            .await?;
        let take = share.min(seller_balance);
        if take > 0 {
            let reason = if take < share {
                format!(
                    "sale not delivered; {} credits absorbed by the site",
                    share - take
                )
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
            .await
            .map_err(|e| anyhow::anyhow!("reversal of {grant_id}: {e:?}"))?;
        }
    }
    tx.commit().await?;
    metrics::counter!("manager_grants_refunded_total").increment(1);
    tracing::info!(
        grant = log_id(grant_id),
        buyer,
        price,
        "unplayed grant refunded"
    );
    Ok(true)
}

/// The refund sweeper: every `credits.sweep_interval_secs` until `stop`.
pub async fn run(
    db: db::Db,
    nodes: Vec<String>,
    credits: CreditsConfig,
    mut stop: watch::Receiver<bool>,
) {
    let every = std::time::Duration::from_secs(credits.sweep_interval_secs);
    let worker = crate::workers::Worker::register("refunds");
    loop {
        worker.started();
        let mut failed = None;
        if let Err(e) = refund_due(&db, &nodes, &credits).await {
            tracing::error!("refund sweep failed: {e:#}");
            failed = Some(format!("refund sweep: {e:#}"));
        }
        if let Err(e) = refund_rejected_uploads(&db).await {
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

/// A node's journal delivery (`POST /internal/v1/nodes/{name}/journal`,
/// signed by it; the HTTP layer checks the signature). Applies each event
/// exactly once (`(node, id)` is unique) and records the node's watermark,
/// in one transaction. Answers how many were new.
pub async fn record_journal(
    db: &db::Db,
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
    let now = db::now();
    let (_writer, mut tx) = begin(db).await?;
    let mut applied = 0u64;
    for e in &batch.events {
        let r = sqlx::query(
            "INSERT INTO view_events (node, event_id, grant_id, asset_id, bytes, first_at, last_at, received_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node, event_id) DO NOTHING",
        )
        .bind(&name)
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
        applied += 1;
        if let Some(g) = &e.grant {
            let refunded: Option<(String,)> =
                sqlx::query_as("SELECT state FROM play_grants WHERE id = ? AND state = 'refunded'")
                    .bind(g)
                    .fetch_optional(&mut *tx)
                    .await?;
            if refunded.is_some() {
                // A view we refunded was served after all: the refund
                // rule failed somewhere. Kept apart, never added (the
                // money already went back), and raised for the operator.
                sqlx::query(
                    "UPDATE view_events SET after_refund = 1 WHERE node = ? AND event_id = ?",
                )
                .bind(&name)
                .bind(&e.id)
                .execute(&mut *tx)
                .await?;
                metrics::counter!("manager_bytes_after_refund_total", "node" => name.clone())
                    .increment(e.bytes);
                crate::alerts::raise(
                    "served_after_refund",
                    "a node served a grant that was already refunded",
                    format!("node={name} grant={} bytes={}", log_id(g), e.bytes),
                );
                continue;
            }
            sqlx::query(
                "UPDATE play_grants SET bytes_served = bytes_served + ?,
                 first_served_at = MIN(COALESCE(first_served_at, ?), ?),
                 last_served_at = MAX(COALESCE(last_served_at, ?), ?)
                 WHERE id = ? AND asset_id = ?",
            )
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
    }
    // The node's watermark on our clock: moved back by as far as its clock
    // runs ahead of ours (never forward for one that runs behind), and
    // never past our own now.
    let ahead = (batch.now - now).max(0);
    let watermark = (batch.watermark - ahead).min(now).max(0);
    sqlx::query(
        "INSERT INTO journal_contacts (node, seen_at, watermark) VALUES (?, ?, ?)
         ON CONFLICT (node) DO UPDATE SET seen_at = MAX(seen_at, excluded.seen_at),
         watermark = MAX(watermark, excluded.watermark)",
    )
    .bind(&name)
    .bind(now)
    .bind(watermark)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    metrics::counter!("manager_view_events_total", "node" => name.clone()).increment(applied);
    // How far behind each node's journal is: now minus this (operators'
    // "journal lag"; refunds wait for the lowest).
    metrics::gauge!("manager_node_watermark_seconds", "node" => name.clone()).set(watermark as f64);
    Ok(shared::protocol::JournalReceipt {
        node: name,
        applied,
        duplicates: batch.events.len() as u64 - applied,
    })
}

// ---- reading ----------------------------------------------------------------

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
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

pub async fn history(db: &db::Db, account: i64, limit: i64) -> sqlx::Result<Vec<LedgerRow>> {
    sqlx::query_as(
        "SELECT id, amount, kind, reference, actor, reason, balance_after, created_at FROM ledger
         WHERE account_id = ? ORDER BY id DESC LIMIT ?",
    )
    .bind(account)
    .bind(limit)
    .fetch_all(db)
    .await
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct GrantRowView {
    pub id: String,
    pub asset_id: String,
    pub price: i64,
    pub state: String,
    pub expires_at: i64,
    pub bytes_served: i64,
}

pub async fn grant_view(db: &db::Db, id: &str) -> sqlx::Result<Option<GrantRowView>> {
    sqlx::query_as(
        "SELECT id, asset_id, price, state, expires_at, bytes_served FROM play_grants WHERE id = ?",
    )
    .bind(id)
    .fetch_optional(db)
    .await
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

    async fn fresh() -> (tempfile::TempDir, db::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = db::open(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
        (dir, db)
    }

    #[test]
    fn amounts_are_whole_positive_and_bounded() {
        use serde_json::json;
        assert_eq!(parse_amount(&json!(5)).unwrap(), 5);
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
        assert_eq!(parse_price(&json!(0)).unwrap(), 0);
        assert_eq!(parse_amount_text("12").unwrap(), 12);
        for bad in ["", "0", "-1", "1.5", "1e3", "99999999999999999999", " "] {
            assert_eq!(
                parse_amount_text(bad).unwrap_err().code(),
                "amount_invalid",
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn signup_bonus_grants_and_the_append_only_ledger() {
        let (_d, db) = fresh().await;
        let a = create_account(&db, "a@x", "h", "uploader", 1000)
            .await
            .unwrap();
        let b = create_account(&db, "b@x", "h", "uploader", 0)
            .await
            .unwrap();
        assert_eq!(balance(&db, a).await.unwrap(), 1000);
        assert_eq!(balance(&db, b).await.unwrap(), 0);
        let e = create_account(&db, "a@x", "h", "uploader", 1000)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "email_taken");
        // A rule grant reaches everyone created before the cut-off, once per key.
        let everyone = Recipients::CreatedBefore(db::now() + 10);
        let got = grant(&db, &everyone, 50, "operator:o", "outage", "k1")
            .await
            .unwrap();
        assert_eq!(got, vec![a, b]);
        let again = grant(&db, &everyone, 50, "operator:o", "outage", "k1")
            .await
            .unwrap();
        assert!(again.is_empty(), "the same key grants once");
        assert_eq!(balance(&db, a).await.unwrap(), 1050);
        assert_eq!(
            grant(&db, &Recipients::Account(a), 0, "o", "x", "k2")
                .await
                .unwrap_err()
                .code(),
            "amount_invalid"
        );
        assert_eq!(
            grant(&db, &Recipients::Account(a), 5, "o", " ", "k3")
                .await
                .unwrap_err()
                .code(),
            "reason_missing"
        );
        assert!(verify_balances(&db).await.unwrap().is_empty());
        // Append-only, and no balance below zero even by hand.
        assert!(sqlx::query("UPDATE ledger SET amount = 1")
            .execute(&db)
            .await
            .is_err());
        assert!(sqlx::query("DELETE FROM ledger")
            .execute(&db)
            .await
            .is_err());
        assert!(sqlx::query("UPDATE users SET balance = -1 WHERE id = ?")
            .bind(b)
            .execute(&db)
            .await
            .is_err());
        let h = history(&db, a, 10).await.unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].kind, "grant");
        assert_eq!(h[0].balance_after, 1050);
    }

    #[tokio::test]
    async fn uploads_are_charged_with_their_row_and_refunded_when_rejected() {
        let (_d, db) = fresh().await;
        let a = create_account(&db, "a@x", "h", "uploader", 25)
            .await
            .unwrap();
        insert_asset_paid(&db, 10, "m1", a, "M1", "m1.mp4", 1)
            .await
            .unwrap();
        insert_asset_paid(&db, 10, "m2", a, "M2", "m2.mp4", 1)
            .await
            .unwrap();
        let e = insert_asset_paid(&db, 10, "m3", a, "M3", "m3.mp4", 1)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "insufficient_credits");
        assert!(
            db::asset(&db, "m3").await.unwrap().is_none(),
            "no unpaid row"
        );
        assert_eq!(balance(&db, a).await.unwrap(), 5);
        db::reject(&db, "m1", "not_media", "x").await.unwrap();
        assert_eq!(refund_rejected_uploads(&db).await.unwrap(), 1);
        assert_eq!(refund_rejected_uploads(&db).await.unwrap(), 0, "once");
        assert_eq!(balance(&db, a).await.unwrap(), 15);
        insert_asset_paid(&db, 0, "m4", a, "Free", "m4.mp4", 1)
            .await
            .unwrap();
        assert_eq!(balance(&db, a).await.unwrap(), 15);
        assert!(verify_balances(&db).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn racing_debits_for_one_balance_succeed_once() {
        let (_d, db) = fresh().await;
        let a = create_account(&db, "a@x", "h", "uploader", 100)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                // Without the in-process queue, as writers in two
                // processes would race: SQLite's lock and the guard decide.
                let mut tx = db.begin_with("BEGIN IMMEDIATE").await.unwrap();
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
        assert_eq!(balance(&db, a).await.unwrap(), 40);
        assert!(verify_balances(&db).await.unwrap().is_empty());
    }
}
