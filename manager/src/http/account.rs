//! Accounts and credits on the web site and the JSON API (docs/credits.md):
//! sign-up, the log-in rate limit, view prices, purchases, the account page
//! and data export, operator grants, avatar linking codes. The money
//! itself moves only in [`crate::ledger`].

use std::net::SocketAddr;

use askama::Template;
use axum::{
    extract::{ConnectInfo, Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Redirect, Response},
    Form, Json,
};
use serde::Deserialize;

use super::{
    api,
    error::ApiError,
    session::{self, Caller},
};
use crate::{
    auth, catalog,
    domain::{ReplicaState, Role},
    ledger, SharedState,
};

/// The client's address as a rate-limit key: IPv4 as is, IPv6 as its /64
/// (one home or server usually holds a whole /64).
pub fn client_ip(st: &SharedState, peer: SocketAddr, headers: &HeaderMap) -> String {
    crate::limits::limit_key(crate::geo::client_ip(
        peer.ip(),
        headers,
        &st.cfg.trusted_proxies,
    ))
}

// ---- pages -------------------------------------------------------------------

use super::web::render;

fn page_error(e: ApiError) -> Response {
    super::web::PageError(e).into_response()
}

#[derive(Template)]
#[template(path = "signup.html")]
struct SignupPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    error: Option<&'a str>,
    email: &'a str,
    bonus: u64,
}

pub const MIN_PASSWORD_CHARS: usize = 10;

/// `GET /signup`. Like the log-in form, a double-submit cookie stands in
/// for the CSRF token a session would hold.
pub async fn signup_form(State(st): State<SharedState>, headers: HeaderMap) -> Response {
    let token = super::web::login_csrf_token(&headers);
    let resp = render(&SignupPage {
        user: None,
        csrf: &token,
        error: None,
        email: "",
        bonus: st.cfg.credits.signup_bonus,
    });
    super::web::with_login_csrf_cookie(&st, resp, &token)
}

#[derive(Deserialize)]
pub struct SignupForm {
    csrf: String,
    email: String,
    password: String,
}

/// `POST /signup`: creates an uploader account with the signup bonus (one
/// transaction) and logs it in.
pub async fn signup(
    State(st): State<SharedState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<SignupForm>,
) -> Response {
    let cookie_csrf = session::cookie(&headers, session::LOGIN_CSRF_COOKIE).map(str::to_owned);
    if !cookie_csrf.is_some_and(|c| auth::ct_eq(&c, &f.csrf)) {
        return page_error(ApiError::Csrf);
    }
    let ip = client_ip(&st, peer, &headers);
    let key = format!("signup-ip:{ip}");
    // Every attempt counts, in one step with the check: concurrent
    // sign-ups cannot all see the last free slot (and farm the bonus).
    if !st
        .limits
        .try_take(&[(&key, crate::limits::MAX_SIGNUPS_PER_ADDRESS)])
    {
        return page_error(ApiError::RateLimited);
    }
    let email = f.email.trim().to_lowercase();
    let again = |code: &'static str, msg: &str| {
        let page = SignupPage {
            user: None,
            csrf: &f.csrf,
            error: Some(msg),
            email: &email,
            bonus: st.cfg.credits.signup_bonus,
        };
        let mut r = (StatusCode::BAD_REQUEST, render(&page)).into_response();
        if let Ok(v) = code.parse() {
            r.headers_mut().insert("x-error-code", v);
        }
        r
    };
    let at = email.find('@');
    if email.len() > 254
        || !at.is_some_and(|i| i > 0 && i + 1 < email.len())
        || email.contains(char::is_whitespace)
    {
        return again("email_invalid", "Enter a valid email address.");
    }
    if f.password.chars().count() < MIN_PASSWORD_CHARS || f.password.len() > 1024 {
        return again(
            "password_too_short",
            "Choose a password of at least 10 characters.",
        );
    }
    let hash = match auth::hash_password_bounded(&st.password_checks, &f.password).await {
        Ok(h) => h,
        Err(e) => return page_error(e.into()),
    };
    let bonus = st.cfg.credits.signup_bonus as i64;
    let id = match ledger::create_account(&*st.db, &email, &hash, Role::Uploader, bonus).await {
        Ok(id) => id,
        Err(ledger::LedgerError::Conflict {
            code: "email_taken",
            ..
        }) => {
            return again(
                "email_taken",
                "An account with this email exists; log in instead.",
            )
        }
        Err(e) => return page_error(e.into()),
    };
    tracing::info!(user = id, "account created");
    match start_session(&st, id, "/account").await {
        Ok(r) => r,
        Err(e) => page_error(e),
    }
}

/// Logs `user_id` in: a new session and its cookie, then a redirect.
pub async fn start_session(st: &SharedState, user_id: i64, to: &str) -> Result<Response, ApiError> {
    let token = auth::random_token();
    let csrf = auth::random_token();
    st.db
        .insert_session(
            &auth::token_hash(&token),
            user_id,
            &csrf,
            catalog::now() + auth::SESSION_SECS,
        )
        .await?;
    let mut resp = Redirect::to(to).into_response();
    let cookie = session::set_cookie(
        session::SESSION_COOKIE,
        &token,
        auth::SESSION_SECS,
        st.secure_cookies,
    );
    resp.headers_mut().append(
        header::SET_COOKIE,
        cookie
            .parse()
            .map_err(|e: header::InvalidHeaderValue| ApiError::Internal(e.into()))?,
    );
    Ok(resp)
}

// ---- prices --------------------------------------------------------------------

async fn owned_asset(st: &SharedState, c: &Caller, id: &str) -> Result<catalog::Asset, ApiError> {
    let a = st.db.asset(id).await?.ok_or(ApiError::NotFound("movie"))?;
    if !api::visible_to(&a, Some(c)) {
        return Err(ApiError::NotFound("movie"));
    }
    if a.owner_id != c.user.id && !c.user.is_operator() {
        return Err(ApiError::Forbidden);
    }
    Ok(a)
}

/// `PUT /api/v1/assets/{id}/price` `{"price": n}` (0 = free): owner or operator.
pub async fn set_price_api(
    State(st): State<SharedState>,
    c: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Result<Json<serde_json::Value>, ApiError> {
    c.check_csrf_header(&headers)?;
    let a = owned_asset(&st, &c, &id).await?;
    let price = ledger::parse_price(body.get("price").unwrap_or(&serde_json::Value::Null))?;
    crate::prices::set_price(&*st.db, &a.id, price).await?;
    st.playable.forget(&a.id);
    tracing::info!(asset = %a.id, price = price.get(), user = c.user.id, "price set");
    Ok(Json(
        serde_json::json!({ "asset_id": a.id, "price": price }),
    ))
}

#[derive(Deserialize)]
pub struct PriceForm {
    csrf: String,
    price: String,
}

/// The price form on a movie's page.
pub async fn set_price_form(
    State(st): State<SharedState>,
    c: Caller,
    Path(id): Path<String>,
    Form(f): Form<PriceForm>,
) -> Response {
    let r = async {
        c.check_csrf(Some(&f.csrf))?;
        let a = owned_asset(&st, &c, &id).await?;
        let price = ledger::parse_price_text(&f.price)?;
        crate::prices::set_price(&*st.db, &a.id, price).await?;
        st.playable.forget(&a.id);
        Ok::<_, ApiError>(Redirect::to(&format!("/assets/{}", a.id)).into_response())
    }
    .await;
    r.unwrap_or_else(page_error)
}

/// Paid movies hand out no grant-less media URL except to their owner and
/// operators; the asset JSON and page call this after [`api::asset_view`].
pub fn gate_media_url(a: &catalog::Asset, caller: Option<&Caller>, view: &mut api::AssetView) {
    if view.price > 0 && !caller.is_some_and(|c| c.user.id == a.owner_id || c.user.is_operator()) {
        view.media_url = None;
    }
}

// ---- purchases -----------------------------------------------------------------

async fn purchase_answer(
    st: &SharedState,
    buyer: i64,
    asset_id: &str,
    request_id: &str,
    source: &str,
) -> Result<serde_json::Value, ApiError> {
    let p = ledger::purchase(&st.shop(), buyer, asset_id, request_id, source, None).await?;
    let a = st
        .db
        .asset(asset_id)
        .await?
        .ok_or(ApiError::NotFound("movie"))?;
    let media_url = st
        .minter
        .media_url_until(&a, p.grant_id.clone(), p.expires_at)
        .ok_or(ApiError::NotPublished)?;
    Ok(serde_json::json!({
        "grant_id": p.grant_id,
        "asset_id": p.asset_id,
        "title": a.title,
        "price": p.price,
        "charged_now": p.charged_now,
        "balance": p.balance,
        "expires_at": p.expires_at,
        "media_url": media_url,
    }))
}

/// `POST /api/v1/assets/{id}/purchase` `{"request_id": "…"}`.
pub async fn purchase_api(
    State(st): State<SharedState>,
    c: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Result<Json<serde_json::Value>, ApiError> {
    c.check_csrf_header(&headers)?;
    let request_id = body
        .get("request_id")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    Ok(Json(
        purchase_answer(&st, c.user.id, &id, request_id, "api").await?,
    ))
}

#[derive(Deserialize)]
pub struct BuyForm {
    csrf: String,
    request_id: String,
}

#[derive(Template)]
#[template(path = "purchased.html")]
struct PurchasedPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    title: String,
    asset_id: String,
    media_url: String,
    price: i64,
    balance: i64,
    expires_at: i64,
}

/// The "buy a view" form on a movie's page. The form carries a request id
/// made when the page was rendered, so a double-click is charged once.
pub async fn buy_form(
    State(st): State<SharedState>,
    c: Caller,
    Path(id): Path<String>,
    Form(f): Form<BuyForm>,
) -> Response {
    let r = async {
        c.check_csrf(Some(&f.csrf))?;
        let v = purchase_answer(&st, c.user.id, &id, &f.request_id, "web").await?;
        let mut resp = render(&PurchasedPage {
            user: Some(&c.user.email),
            csrf: c.csrf.as_deref().unwrap_or(""),
            title: v["title"].as_str().unwrap_or("").into(),
            asset_id: id.clone(),
            media_url: v["media_url"].as_str().unwrap_or("").into(),
            price: v["price"].as_i64().unwrap_or(0),
            balance: v["balance"].as_i64().unwrap_or(0),
            expires_at: v["expires_at"].as_i64().unwrap_or(0),
        });
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        Ok::<_, ApiError>(resp)
    }
    .await;
    r.unwrap_or_else(page_error)
}

// ---- the account -----------------------------------------------------------------

/// The movies the API and the export list (the page has its own pages).
const MOVIES_LISTED: i64 = 10_000;

async fn account_json(
    st: &SharedState,
    c: &Caller,
    limit: i64,
    movie_limit: i64,
) -> Result<serde_json::Value, ApiError> {
    let balance = st.db.balance(c.user.id).await?;
    let entries = st.db.history(c.user.id, limit).await?;
    let mut movies = Vec::new();
    for a in st.db.assets_of(c.user.id, movie_limit).await? {
        let replicas = st.db.replicas(&a.id).await?;
        movies.push(serde_json::json!({
            "id": a.id,
            "title": a.title,
            "state": a.state,
            "price": a.price,
            "verified_replicas": replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Verified)
                .count(),
            "created_at": a.created_at,
        }));
    }
    Ok(serde_json::json!({
        "account": { "id": c.user.id, "email": c.user.email, "role": c.user.role },
        "balance": balance,
        "ledger": entries,
        "movies": movies,
    }))
}

/// `GET /api/v1/account`: balance, the latest ledger entries, my movies.
pub async fn account_api(
    State(st): State<SharedState>,
    c: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(account_json(&st, &c, 200, MOVIES_LISTED).await?))
}

/// `GET /account/export`: everything we hold about the account's money and
/// movies, as a JSON download.
pub async fn export(State(st): State<SharedState>, c: Caller) -> Result<Response, ApiError> {
    let v = account_json(&st, &c, i64::MAX, MOVIES_LISTED).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"slmedia-account.json\"",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        serde_json::to_vec_pretty(&v).map_err(|e| ApiError::Internal(e.into()))?,
    )
        .into_response())
}

/// A linked avatar and where the link was made.
struct AvatarLine {
    key: String,
    linked_at: String,
    /// The screen's name, and whose it is.
    via: String,
    owner: Option<String>,
}

/// Movies and ledger entries on a page of the account page.
const MOVIES_PER_PAGE: i64 = 50;
const ENTRIES_PER_PAGE: i64 = 50;

/// Where the account page's two lists start (keyset cursors from the
/// "older" links).
#[derive(Deserialize, Default)]
pub struct AccountQuery {
    /// `<created_at>.<id>` of the last movie on the page before.
    #[serde(default)]
    movies_after: String,
    /// The id of the last ledger entry on the page before (anything else:
    /// the newest).
    #[serde(default)]
    ledger_before: String,
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    balance: i64,
    entries: Vec<EntryLine>,
    movies: Vec<crate::catalog::OwnerMovie>,
    /// Links to the next (older) page of each list, and whether this is a
    /// later page of it (a link back to the newest).
    movies_older: Option<String>,
    movies_later: bool,
    ledger_older: Option<String>,
    ledger_later: bool,
    link_code: Option<String>,
    avatars: Vec<AvatarLine>,
    /// Operators get a link to the admin.
    operator: bool,
}

async fn account_page_with(
    st: &SharedState,
    c: &Caller,
    link_code: Option<String>,
    q: &AccountQuery,
) -> Result<Response, ApiError> {
    let balance = st.db.balance(c.user.id).await?;
    let after = super::web::keyset_cursor(&q.movies_after);
    let movies_later = after.is_some();
    // One more than shown, to know whether there is a next page.
    let mut movies = st
        .db
        .owner_movies(c.user.id, after, MOVIES_PER_PAGE + 1)
        .await?;
    let movies_older = (movies.len() as i64 > MOVIES_PER_PAGE).then(|| {
        movies.truncate(MOVIES_PER_PAGE as usize);
        let last = movies.last().expect("a full page");
        format!(
            "/account?movies_after={}.{}#movies",
            last.created_at, last.id
        )
    });
    let ledger_before = q.ledger_before.parse::<i64>().ok();
    let mut entries = st
        .db
        .history_page(c.user.id, ledger_before, ENTRIES_PER_PAGE + 1)
        .await?;
    let ledger_older = (entries.len() as i64 > ENTRIES_PER_PAGE).then(|| {
        entries.truncate(ENTRIES_PER_PAGE as usize);
        let last = entries.last().expect("a full page");
        format!("/account?ledger_before={}#ledger", last.id)
    });
    let avatars = st.db.avatar_links(c.user.id).await?;
    let mut resp = render(&AccountPage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        balance,
        entries: entries
            .into_iter()
            .map(|e| EntryLine {
                when: crate::backup::format_utc(e.created_at),
                e,
            })
            .collect(),
        movies,
        movies_older,
        movies_later,
        ledger_older,
        ledger_later: ledger_before.is_some(),
        link_code,
        avatars: avatars
            .into_iter()
            .map(|l| AvatarLine {
                key: l.avatar_key,
                linked_at: crate::backup::format_utc(l.linked_at),
                via: l.via_terminal,
                owner: l.via_owner_id.map(|o| {
                    if o == c.user.id {
                        "your own".to_string()
                    } else {
                        format!("account #{o}'s")
                    }
                }),
            })
            .collect(),
        operator: c.user.is_operator(),
    });
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    Ok(resp)
}

/// A ledger entry and its time as people read it.
struct EntryLine {
    e: ledger::LedgerRow,
    when: String,
}

/// `GET /account`.
pub async fn account_page(
    State(st): State<SharedState>,
    c: Caller,
    q: Result<axum::extract::Query<AccountQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = q.map(|q| q.0).unwrap_or_default();
    account_page_with(&st, &c, None, &q)
        .await
        .unwrap_or_else(page_error)
}

// ---- avatar linking ------------------------------------------------------------

#[derive(Deserialize)]
pub struct CsrfOnly {
    csrf: String,
}

/// `POST /account/link-code`: a fresh one-time code (only its hash is
/// stored) for linking an avatar at an in-world terminal.
pub async fn new_link_code(
    State(st): State<SharedState>,
    c: Caller,
    Form(f): Form<CsrfOnly>,
) -> Response {
    let r = async {
        c.check_csrf(Some(&f.csrf))?;
        let code = crate::avatars::new_code(&*st.db, c.user.id).await?;
        account_page_with(&st, &c, Some(code), &AccountQuery::default()).await
    }
    .await;
    r.unwrap_or_else(page_error)
}

/// A purchase for the account linked to `avatar`, through a terminal of
/// `terminal_owner`. Charged only with the account's approval of that
/// owner (`terminal_not_approved`) and within its daily cap. The answer
/// and every refusal leave out the account's balance: whoever holds a
/// terminal's secret can put any avatar key in a request.
pub async fn terminal_purchase(
    st: &SharedState,
    terminal_owner: i64,
    avatar: &str,
    asset_id: &str,
    request_id: &str,
) -> Result<serde_json::Value, ApiError> {
    let Some(buyer) = st.db.avatar_account(avatar).await? else {
        return Err(ApiError::Conflict {
            code: "avatar_not_linked",
            message: "this avatar is not linked to an account: get a code on your account page and say it to the terminal".into(),
        });
    };
    let p = ledger::purchase(
        &st.shop(),
        buyer,
        asset_id,
        request_id,
        "terminal",
        Some(terminal_owner),
    )
    .await
    .map_err(|e| match e {
        ledger::LedgerError::InsufficientCredits { price, .. } => ApiError::PaymentRequired {
            code: "insufficient_credits",
            message: format!(
                "the account's credits do not cover the price ({price} credits); add credits on the web site"
            ),
        },
        e => e.into(),
    })?;
    let a = st
        .db
        .asset(asset_id)
        .await?
        .ok_or(ApiError::NotFound("movie"))?;
    // A paid view gets the short URL per-agent parcel media can take.
    let media_url = match &p.grant_id {
        Some(g) => st.minter.grant_media_url(&a.id, g),
        None => st
            .minter
            .media_url_until(&a, p.grant_id.clone(), p.expires_at)
            .ok_or(ApiError::NotPublished)?,
    };
    Ok(serde_json::json!({
        "grant_id": p.grant_id,
        "asset_id": p.asset_id,
        "title": a.title,
        "price": p.price,
        "charged_now": p.charged_now,
        "expires_at": p.expires_at,
        "media_url": media_url,
    }))
}

/// `POST /account/avatars/unlink`: the account holding an avatar's link
/// lets it go, so the avatar can be linked elsewhere.
pub async fn unlink_avatar(
    State(st): State<SharedState>,
    c: Caller,
    Form(f): Form<AvatarForm>,
) -> Response {
    let r = async {
        c.check_csrf(Some(&f.csrf))?;
        st.db.unlink_avatar(&f.avatar, c.user.id).await?;
        tracing::info!(user = c.user.id, avatar = %f.avatar, "avatar unlinked");
        Ok::<_, ApiError>(Redirect::to("/account").into_response())
    }
    .await;
    r.unwrap_or_else(page_error)
}

#[derive(Deserialize)]
pub struct AvatarForm {
    csrf: String,
    avatar: String,
}

// ---- approvals of terminal owners --------------------------------------------

/// The cap offered when a buyer first approves a screen's owner.
const DEFAULT_DAILY_CAP: i64 = 100;

/// The terminal a screen sent its buyer to approve.
struct Pending {
    id: String,
    name: String,
    owner_id: i64,
    current_cap: Option<i64>,
}

#[derive(Template)]
#[template(path = "approvals.html")]
struct ApprovalsPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    approvals: Vec<ledger::Approval>,
    pending: Option<Pending>,
    default_cap: i64,
    done: Option<&'a str>,
}

#[derive(Deserialize)]
pub struct ApprovalsQuery {
    terminal: Option<String>,
}

async fn approvals_page_with(
    st: &SharedState,
    c: &Caller,
    terminal: Option<&str>,
    done: Option<&str>,
) -> Result<Response, ApiError> {
    let mut pending = None;
    if let Some(id) = terminal.filter(|t| !t.is_empty() && t.len() <= 64) {
        if let Some(t) = st.db.terminal(id).await? {
            if t.owner_id != c.user.id {
                pending = Some(Pending {
                    current_cap: ledger::approval(&*st.db, c.user.id, t.owner_id)
                        .await?
                        .map(|a| a.daily_cap),
                    id: t.id,
                    name: t.name,
                    owner_id: t.owner_id,
                });
            }
        }
    }
    let approvals = ledger::approvals(&*st.db, c.user.id).await?;
    let mut resp = render(&ApprovalsPage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        approvals,
        pending,
        default_cap: DEFAULT_DAILY_CAP,
        done,
    });
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    Ok(resp)
}

/// `GET /account/approvals[?terminal=ID]`: the owners whose screens may
/// charge this account, and (from a screen's link) a form to approve one.
pub async fn approvals_page(
    State(st): State<SharedState>,
    c: Caller,
    axum::extract::Query(q): axum::extract::Query<ApprovalsQuery>,
) -> Response {
    approvals_page_with(&st, &c, q.terminal.as_deref(), None)
        .await
        .unwrap_or_else(page_error)
}

#[derive(Deserialize)]
pub struct ApproveForm {
    csrf: String,
    terminal: String,
    daily_cap: String,
}

/// `POST /account/approvals`: approve the owner of `terminal`, with a cap.
pub async fn approve_form(
    State(st): State<SharedState>,
    c: Caller,
    Form(f): Form<ApproveForm>,
) -> Response {
    let r = async {
        c.check_csrf(Some(&f.csrf))?;
        let t = st
            .db
            .terminal(f.terminal.trim())
            .await?
            .ok_or(ApiError::NotFound("terminal"))?;
        if t.owner_id == c.user.id {
            return Err(ApiError::bad_request(
                "approval_own_terminal",
                "your own screens need no approval",
            ));
        }
        let cap = ledger::parse_amount_text(&f.daily_cap).map_err(|_| {
            ApiError::bad_request(
                "daily_cap_invalid",
                format!(
                    "the daily cap is a whole number of credits, 1 to {}",
                    ledger::MAX_AMOUNT
                ),
            )
        })?;
        ledger::approve(&*st.db, c.user.id, t.owner_id, cap, &t.name).await?;
        tracing::info!(
            user = c.user.id,
            owner = t.owner_id,
            cap = cap.get(),
            "terminal owner approved"
        );
        approvals_page_with(&st, &c, None, Some("Approved.")).await
    }
    .await;
    r.unwrap_or_else(page_error)
}

#[derive(Deserialize)]
pub struct RevokeForm {
    csrf: String,
    owner: i64,
}

/// `POST /account/approvals/revoke`: no more purchases through that
/// owner's screens, from now on.
pub async fn revoke_form(
    State(st): State<SharedState>,
    c: Caller,
    Form(f): Form<RevokeForm>,
) -> Response {
    let r = async {
        c.check_csrf(Some(&f.csrf))?;
        st.db.revoke(c.user.id, f.owner).await?;
        tracing::info!(
            user = c.user.id,
            owner = f.owner,
            "terminal owner approval revoked"
        );
        approvals_page_with(&st, &c, None, Some("Revoked.")).await
    }
    .await;
    r.unwrap_or_else(page_error)
}

// ---- operator grants ---------------------------------------------------------------

/// `POST /api/v1/admin/grants` (operators):
/// `{"email": …}` or `{"created_before": unix}`, with `amount`, `reason`
/// and an idempotency `key`.
pub async fn grant_api(
    State(st): State<SharedState>,
    c: Caller,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Result<Json<serde_json::Value>, ApiError> {
    c.check_csrf_header(&headers)?;
    if !c.user.is_operator() {
        return Err(ApiError::Forbidden);
    }
    let amount = ledger::parse_amount(body.get("amount").unwrap_or(&serde_json::Value::Null))?;
    let to = match (
        body.get("email").and_then(|v| v.as_str()),
        body.get("created_before"),
    ) {
        (Some(email), None) => {
            let u = st
                .db
                .user_by_email(&email.trim().to_lowercase())
                .await?
                .ok_or(ApiError::NotFound("account"))?;
            ledger::Recipients::Account(u.id)
        }
        (None, Some(t)) => ledger::Recipients::CreatedBefore(t.as_i64().ok_or_else(|| {
            ApiError::bad_request("rule_invalid", "`created_before` is a unix time")
        })?),
        _ => {
            return Err(ApiError::bad_request(
                "rule_invalid",
                "give exactly one of `email` or `created_before`",
            ))
        }
    };
    let reason = body.get("reason").and_then(|v| v.as_str()).unwrap_or("");
    let key = body.get("key").and_then(|v| v.as_str()).unwrap_or("");
    let accounts = crate::console::grant(&*st.db, &c.user, &to, amount, reason, key).await?;
    Ok(Json(
        serde_json::json!({ "granted": accounts.len(), "accounts": accounts, "amount": amount }),
    ))
}

/// Whom a grant form names: one account by email, or everyone created
/// before a day (`YYYY-MM-DD`, UTC); exactly one of the two.
pub(super) async fn recipients(
    st: &SharedState,
    email: &str,
    created_before: &str,
) -> Result<ledger::Recipients, ApiError> {
    match (email.trim(), created_before.trim()) {
        (e, "") if !e.is_empty() => {
            let u = st
                .db
                .user_by_email(&e.to_lowercase())
                .await?
                .ok_or(ApiError::NotFound("account"))?;
            Ok(ledger::Recipients::Account(u.id))
        }
        ("", d) if !d.is_empty() => Ok(ledger::Recipients::CreatedBefore(parse_date(d)?)),
        _ => Err(ApiError::bad_request(
            "rule_invalid",
            "give either an email or a date, not both",
        )),
    }
}

/// `YYYY-MM-DD` → unix time of that day's start, UTC.
fn parse_date(d: &str) -> Result<i64, ApiError> {
    let bad = || ApiError::bad_request("rule_invalid", "the date is YYYY-MM-DD");
    let parts: Vec<i64> = d
        .split('-')
        .map(|p| p.parse::<i64>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let [y, m, day] = parts[..] else {
        return Err(bad());
    };
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok((era * 146097 + doe - 719468) * 86400)
}

/// `GET /api/v1/grants/{id}` (the buyer, or operators): a grant's state.
pub async fn grant_status(
    State(st): State<SharedState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Json<ledger::GrantRowView>, ApiError> {
    let g = st
        .db
        .grant_view(&id)
        .await?
        .ok_or(ApiError::NotFound("grant"))?;
    let buyer = st.db.grant_buyer(&id).await?;
    if buyer != Some(c.user.id) && !c.user.is_operator() {
        return Err(ApiError::NotFound("grant"));
    }
    Ok(Json(g))
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_utc_day_starts() {
        assert_eq!(super::parse_date("1970-01-01").unwrap(), 0);
        assert_eq!(super::parse_date("2026-11-24").unwrap(), 1_795_478_400);
        assert_eq!(super::parse_date("2000-03-01").unwrap(), 951_868_800);
        for bad in ["2026-13-01", "2026-11", "x", "1969-12-31"] {
            assert!(super::parse_date(bad).is_err(), "{bad}");
        }
    }
}
