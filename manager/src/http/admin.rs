//! The operators' side of the site. The JSON endpoints (`/api/v1/admin/…`:
//! workers, alerts) answer others `401`/`403`. The admin area's pages
//! (`/admin`: the overview, accounts and credits, the audit log) show what
//! `crate::console` gathers and act through it, every action audited;
//! they send someone not logged in to log in and answer anyone else the
//! site's plain 404. Every action is a POST with the session's CSRF token.

use askama::Template;
use axum::{
    extract::{Query, State},
    response::Response,
    Form, Json,
};
use serde::Deserialize;

use super::{
    error::ApiError,
    session::{Caller, MaybeCaller},
    web::{render, PageError},
};
use crate::{alerts, backup::format_utc, console, workers, SharedState};

fn operator(c: &Caller) -> Result<(), ApiError> {
    if c.user.is_operator() {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

/// `GET /api/v1/admin/workers`: every background worker's status.
pub async fn workers(c: Caller) -> Result<Json<serde_json::Value>, ApiError> {
    operator(&c)?;
    Ok(Json(serde_json::json!({ "workers": workers::statuses() })))
}

/// `GET /api/v1/admin/alerts`: the alerts raised since start, newest last.
pub async fn alerts(c: Caller) -> Result<Json<serde_json::Value>, ApiError> {
    operator(&c)?;
    Ok(Json(serde_json::json!({ "alerts": alerts::recent() })))
}

// ---- the admin area (`/admin`): server-rendered pages -------------------------

/// Admin pages exist for operators only. Someone not logged in is sent to
/// log in; a logged-in non-operator gets the site's plain 404, so the area
/// is not even confirmed to exist.
pub(super) fn operator_page(c: MaybeCaller) -> Result<Caller, PageError> {
    match c.0 {
        None => Err(PageError(ApiError::Unauthenticated)),
        Some(c) if c.user.is_operator() => Ok(c),
        Some(_) => Err(PageError(ApiError::NotFound("page"))),
    }
}

pub(super) fn disk_text(d: Option<shared::runtime::DiskSpace>) -> String {
    d.map_or_else(
        || "unknown".into(),
        |d| {
            format!(
                "{} of {} ({} %)",
                media::human_bytes(d.free_bytes),
                media::human_bytes(d.total_bytes),
                d.free_percent()
            )
        },
    )
}

struct NodeRow {
    name: String,
    site: String,
    state: &'static str,
    detail: String,
    disk: String,
}

struct WorkerRow {
    name: &'static str,
    state: &'static str,
    runs: u64,
    failures: u64,
    failing: bool,
    last_run: String,
    last_error: String,
}

struct AlertRow {
    at: String,
    alert: &'static str,
    count: u64,
    message: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "admin.html")]
struct OverviewPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    o: console::Overview,
    at: String,
    manager_disk: String,
    nodes: Vec<NodeRow>,
    workers: Vec<WorkerRow>,
    alerts: Vec<AlertRow>,
    oldest_job: String,
    backup_age: String,
}

/// `GET /admin`: one screen that answers "is everything fine?".
pub async fn overview_page(
    State(st): State<SharedState>,
    c: MaybeCaller,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    let o = console::overview(&*st.db, &st.nodes, &st.cfg).await;
    let nodes = o
        .nodes
        .iter()
        .map(|n| NodeRow {
            name: n.name.clone(),
            site: n.site.clone(),
            state: match (&n.probe, n.healthy) {
                (None, _) => "not probed yet",
                (Some(_), true) => "ok",
                (Some(_), false) => "down",
            },
            detail: match &n.probe {
                None => String::new(),
                Some(p) => format!(
                    "{}{} · checked {}",
                    p.detail,
                    n.version
                        .as_ref()
                        .map(|v| format!(" · version {v}"))
                        .unwrap_or_default(),
                    format_utc(p.at)
                ),
            },
            disk: disk_text(n.disk),
        })
        .collect();
    let workers = o
        .workers
        .iter()
        .map(|w| WorkerRow {
            name: w.name,
            state: w.state,
            runs: w.runs,
            failures: w.failures,
            failing: w.last_run_failed,
            last_run: w.last_finished_at.map(format_utc).unwrap_or_default(),
            last_error: w.last_error.clone().unwrap_or_default(),
        })
        .collect();
    let alerts = o
        .alerts
        .iter()
        .rev()
        .map(|a| AlertRow {
            at: format_utc(a.at),
            alert: a.alert,
            count: a.count,
            message: a.message.clone(),
            detail: a.detail.clone(),
        })
        .collect();
    Ok(render(&OverviewPage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        at: format_utc(o.at),
        manager_disk: disk_text(o.manager_disk),
        oldest_job: console::human_age(o.movies.oldest_job_secs),
        backup_age: o
            .last_backup
            .as_ref()
            .map(|b| console::human_age(b.age_secs))
            .unwrap_or_default(),
        nodes,
        workers,
        alerts,
        o,
    }))
}

struct AccountLine {
    id: i64,
    email: String,
    role: crate::domain::Role,
    balance: i64,
    since: String,
    disabled: bool,
}

#[derive(Template)]
#[template(path = "admin_accounts.html")]
struct AccountsPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    q: String,
    accounts: Vec<AccountLine>,
    grant_key: String,
    message: Option<String>,
    failed: bool,
}

#[derive(Deserialize)]
pub struct AccountSearch {
    #[serde(default)]
    q: String,
}

/// Longest search an operator types; longer is cut, not refused.
const MAX_SEARCH: usize = 254;

async fn accounts_page(
    st: &SharedState,
    c: &Caller,
    q: &str,
    message: Option<(String, bool)>,
) -> Result<Response, PageError> {
    let q: String = q.trim().chars().take(MAX_SEARCH).collect();
    let accounts = st
        .db
        .accounts(&q.to_lowercase(), 200)
        .await?
        .into_iter()
        .map(|a| AccountLine {
            id: a.id,
            email: a.email,
            role: a.role,
            balance: a.balance,
            since: format_utc(a.created_at),
            disabled: a.disabled_at.is_some(),
        })
        .collect();
    let (message, failed) = message.map_or((None, false), |(m, f)| (Some(m), f));
    let mut r = render(&AccountsPage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        q,
        accounts,
        grant_key: uuid::Uuid::new_v4().simple().to_string(),
        message,
        failed,
    });
    if failed {
        *r.status_mut() = axum::http::StatusCode::BAD_REQUEST;
    }
    Ok(r)
}

/// `GET /admin/accounts?q=`: accounts with their balances.
pub async fn accounts(
    State(st): State<SharedState>,
    c: MaybeCaller,
    Query(s): Query<AccountSearch>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    accounts_page(&st, &c, &s.q, None).await
}

#[derive(Deserialize)]
pub struct GrantForm {
    csrf: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    created_before: String,
    amount: String,
    reason: String,
    key: String,
}

/// `POST /admin/accounts/grant`: credits to one account or by rule,
/// audited. A refusal is shown on the page with its reason.
pub async fn grant(
    State(st): State<SharedState>,
    c: MaybeCaller,
    Form(f): Form<GrantForm>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    c.check_csrf(Some(&f.csrf))?;
    let r = async {
        let amount = crate::ledger::parse_amount_text(&f.amount)?;
        let to = super::account::recipients(&st, &f.email, &f.created_before).await?;
        let done = console::grant(&*st.db, &c.user, &to, amount, &f.reason, &f.key).await?;
        Ok::<_, ApiError>(format!(
            "{amount} credits granted to {} account(s).",
            done.len()
        ))
    }
    .await;
    let message = match r {
        Ok(m) => (m, false),
        Err(ApiError::Internal(e)) => return Err(PageError(ApiError::Internal(e))),
        Err(e) => (format!("Not granted ({}): {e}", e.code()), true),
    };
    accounts_page(&st, &c, "", Some(message)).await
}

struct LedgerLine {
    when: String,
    kind: String,
    amount: i64,
    balance: i64,
    reference: String,
    actor: String,
    reason: String,
}

struct OwnMovie {
    id: String,
    title: String,
    state: crate::domain::AssetState,
}

#[derive(Template)]
#[template(path = "admin_account.html")]
struct AccountPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    a: crate::catalog::AccountRow,
    since: String,
    disabled: String,
    /// `None` when the balance equals the ledger's sum.
    books: Option<i64>,
    ledger: Vec<LedgerLine>,
    movies: Vec<OwnMovie>,
    grant_key: String,
    message: Option<String>,
    failed: bool,
}

/// Ledger entries and movies an account page shows; the API export has all.
const ACCOUNT_ROWS: i64 = 200;

async fn account_page(
    st: &SharedState,
    c: &Caller,
    id: i64,
    message: Option<(String, bool)>,
) -> Result<Response, PageError> {
    let Some(a) = st.db.account(id).await? else {
        return Err(PageError(ApiError::NotFound("account")));
    };
    let ledger = st
        .db
        .history(id, ACCOUNT_ROWS)
        .await?
        .into_iter()
        .map(|e| LedgerLine {
            when: format_utc(e.created_at),
            kind: e.kind,
            amount: e.amount,
            balance: e.balance_after,
            reference: e.reference,
            actor: e.actor,
            reason: e.reason,
        })
        .collect();
    let movies = st
        .db
        .assets_of(id, ACCOUNT_ROWS)
        .await?
        .into_iter()
        .map(|m| OwnMovie {
            id: m.id,
            title: m.title,
            state: m.state,
        })
        .collect();
    let books = st
        .db
        .verify_balances()
        .await?
        .into_iter()
        .find(|(acct, _, _)| *acct == id)
        .map(|(_, _, sum)| sum);
    let (message, failed) = message.map_or((None, false), |(m, f)| (Some(m), f));
    let mut r = render(&AccountPage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        since: format_utc(a.created_at),
        disabled: a.disabled_at.map(format_utc).unwrap_or_default(),
        a,
        books,
        ledger,
        movies,
        grant_key: uuid::Uuid::new_v4().simple().to_string(),
        message,
        failed,
    });
    if failed {
        *r.status_mut() = axum::http::StatusCode::CONFLICT;
    }
    Ok(r)
}

/// `GET /admin/accounts/{id}`: balance, ledger, movies; disable or enable.
pub async fn account(
    State(st): State<SharedState>,
    c: MaybeCaller,
    axum::extract::Path(id): axum::extract::Path<i64>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    account_page(&st, &c, id, None).await
}

/// `POST /admin/accounts/{id}/disable` and `/enable`, audited.
pub async fn account_action(
    State(st): State<SharedState>,
    c: MaybeCaller,
    axum::extract::Path((id, action)): axum::extract::Path<(i64, String)>,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    c.check_csrf(Some(&f.csrf))?;
    let disabled = match action.as_str() {
        "disable" => true,
        "enable" => false,
        _ => return Err(PageError(ApiError::NotFound("page"))),
    };
    let r = console::set_disabled(&*st.db, &c.user, id, disabled).await;
    let invalid = matches!(r, Err(console::ConsoleError::Invalid(_)));
    let message = match r {
        Ok(()) if disabled => (
            "Disabled: it cannot log in, and its sessions and API tokens stopped working."
                .to_string(),
            false,
        ),
        Ok(()) => ("Enabled: it may log in again.".to_string(), false),
        Err(console::ConsoleError::Db(e)) => return Err(PageError(ApiError::Internal(e.into()))),
        Err(console::ConsoleError::NoSuchAccount(_)) => {
            return Err(PageError(ApiError::NotFound("account")))
        }
        Err(e) => (format!("Not changed: {e}"), true),
    };
    let mut page = account_page(&st, &c, id, Some(message)).await?;
    if invalid {
        *page.status_mut() = axum::http::StatusCode::BAD_REQUEST;
    }
    Ok(page)
}

struct AuditLine {
    when: String,
    actor: String,
    action: String,
    target: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "admin_audit.html")]
struct AuditPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    entries: Vec<AuditLine>,
}

/// `GET /admin/audit`: what operators did, newest first.
pub async fn audit(State(st): State<SharedState>, c: MaybeCaller) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    let entries = st
        .db
        .audit_entries(500)
        .await?
        .into_iter()
        .map(|e| AuditLine {
            when: format_utc(e.at),
            actor: e.actor,
            action: e.action,
            target: e.target,
            detail: e.detail,
        })
        .collect();
    Ok(render(&AuditPage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        entries,
    }))
}

struct JobLine {
    id: String,
    title: String,
    owner: String,
    state: crate::domain::AssetState,
    percent: u32,
    attempts: i64,
    age: String,
    error: String,
    cancel_requested: bool,
    retryable: bool,
    queued: bool,
    priority: i64,
    worker: String,
}

#[derive(Template)]
#[template(path = "admin_jobs.html")]
struct JobsPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    jobs: Vec<JobLine>,
    workers: Vec<WorkerLine>,
    /// A registration token just made, shown this once.
    new_token: Option<String>,
    public_url: &'a str,
    message: Option<String>,
    failed: bool,
}

/// A transcode worker on another machine, as the jobs page lists it.
struct WorkerLine {
    name: String,
    registered: String,
    registered_by: String,
    last_seen: String,
    revoked: bool,
}

async fn jobs_page(
    st: &SharedState,
    c: &Caller,
    message: Option<(String, bool)>,
) -> Result<Response, PageError> {
    jobs_page_with(st, c, message, None).await
}

async fn jobs_page_with(
    st: &SharedState,
    c: &Caller,
    message: Option<(String, bool)>,
    new_token: Option<String>,
) -> Result<Response, PageError> {
    let now = crate::catalog::now();
    let ago = |t: i64| format!("{} ago", console::human_age((now - t).max(0)));
    let workers = st
        .db
        .transcoders()
        .await?
        .into_iter()
        .map(|w| WorkerLine {
            registered: ago(w.registered_at),
            last_seen: w.last_seen_at.map_or_else(|| "never".into(), ago),
            revoked: w.revoked_at.is_some(),
            registered_by: w.registered_by,
            name: w.name,
        })
        .collect();
    let jobs = st
        .db
        .jobs(500)
        .await?
        .into_iter()
        .map(|j| JobLine {
            retryable: j.state == crate::domain::AssetState::Rejected,
            queued: j.state == crate::domain::AssetState::Queued,
            priority: j.priority,
            worker: j.worker.unwrap_or_default(),
            percent: (j.progress.clamp(0.0, 1.0) * 100.0) as u32,
            age: console::human_age((now - j.created_at).max(0)),
            error: match (j.error_code, j.error_message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c,
                _ => String::new(),
            },
            id: j.id,
            title: j.title,
            owner: j.owner_email,
            state: j.state,
            attempts: j.attempts,
            cancel_requested: j.cancel_requested,
        })
        .collect();
    let (message, failed) = message.map_or((None, false), |(m, f)| (Some(m), f));
    let mut r = render(&JobsPage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        jobs,
        workers,
        new_token,
        public_url: &st.public_url,
        message,
        failed,
    });
    if failed {
        *r.status_mut() = axum::http::StatusCode::CONFLICT;
    }
    Ok(r)
}

/// `GET /admin/jobs`: the queue with progress, attempts and last error.
pub async fn jobs(State(st): State<SharedState>, c: MaybeCaller) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    jobs_page(&st, &c, None).await
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    csrf: String,
}

/// `POST /admin/transcoders/token`: a one-time registration token for a
/// transcode worker, shown once on the jobs page (`crate::runners`).
pub async fn transcoder_token(
    State(st): State<SharedState>,
    c: MaybeCaller,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    c.check_csrf(Some(&f.csrf))?;
    let token = crate::runners::new_registration_token(&*st.db, &c.user.email).await?;
    console::audit(&*st.db, &c.user, "transcoder_token", "transcoders", "made").await;
    jobs_page_with(&st, &c, None, Some(token)).await
}

/// `POST /admin/transcoders/{name}/revoke`: the worker's next call is refused.
pub async fn transcoder_revoke(
    State(st): State<SharedState>,
    c: MaybeCaller,
    axum::extract::Path(name): axum::extract::Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    c.check_csrf(Some(&f.csrf))?;
    let done = crate::runners::revoke(&*st.db, &name).await?;
    let outcome = if done { "done" } else { "refused: not_found" };
    console::audit(
        &*st.db,
        &c.user,
        "transcoder_revoke",
        &format!("transcoder:{name}"),
        outcome,
    )
    .await;
    let message = if done {
        (format!("Transcode worker {name} revoked: its next call is refused, and its job goes to another worker within a lease."), false)
    } else {
        (format!("No live transcode worker is named {name}."), true)
    };
    jobs_page(&st, &c, Some(message)).await
}

/// `POST /admin/jobs/{id}/retry` and `/cancel`: the same paths as the API's
/// retry and the owner's cancel, audited; a refusal shows on the page.
pub async fn job_action(
    State(st): State<SharedState>,
    c: MaybeCaller,
    axum::extract::Path((id, action)): axum::extract::Path<(String, String)>,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    c.check_csrf(Some(&f.csrf))?;
    let (verb, r) = match action.as_str() {
        "retry" => ("job_retry", super::api::retry_as(&st, &c, &id).await),
        "cancel" => ("job_cancel", super::api::cancel_as(&st, &c, &id).await),
        "raise" => {
            // Audited by the console itself.
            let message = match console::raise_priority(&*st.db, &c.user, &id).await {
                Ok(p) => (format!("{id} is next in the queue (priority {p})."), false),
                Err(console::ConsoleError::Db(e)) => {
                    return Err(PageError(ApiError::Internal(e.into())))
                }
                Err(e) => (format!("{id}: not moved: {e}"), true),
            };
            return jobs_page(&st, &c, Some(message)).await;
        }
        _ => return Err(PageError(ApiError::NotFound("page"))),
    };
    let outcome = match &r {
        Ok(()) => "done".to_string(),
        Err(e) => format!("refused: {}", e.code()),
    };
    console::audit(&*st.db, &c.user, verb, &format!("movie:{id}"), &outcome).await;
    let message = match r {
        Ok(()) if verb == "job_retry" => (format!("{id} is queued again."), false),
        Ok(()) => (format!("{id}: cancelled, or asked to stop."), false),
        Err(ApiError::Internal(e)) => return Err(PageError(ApiError::Internal(e))),
        Err(e) => (format!("{id} ({}): {e}", e.code()), true),
    };
    jobs_page(&st, &c, Some(message)).await
}
