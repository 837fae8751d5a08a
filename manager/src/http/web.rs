//! Server-rendered pages: plain HTML from askama templates, working without
//! script. The only script is progressive enhancement (an upload progress
//! bar; a player status line).

use askama::Template;
use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{Html, IntoResponse, Redirect, Response},
    Form,
};
use serde::Deserialize;

use super::{
    api::{self, AssetView},
    error::ApiError,
    session::{self, Caller, MaybeCaller},
};
use crate::{auth, catalog, SharedState};

/// A failure shown to a person: the same code and sentence as the API, as a page.
pub struct PageError(pub ApiError);

impl<E: Into<ApiError>> From<E> for PageError {
    fn from(e: E) -> Self {
        PageError(e.into())
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    code: &'a str,
    message: String,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let e = self.0;
        if matches!(e, ApiError::Unauthenticated) {
            return Redirect::to("/login").into_response();
        }
        if let ApiError::Internal(inner) = &e {
            tracing::error!("internal error: {inner:#}");
        }
        let page = ErrorPage {
            user: None,
            csrf: "",
            code: e.code(),
            message: e.to_string(),
        };
        (e.status(), render(&page)).into_response()
    }
}

pub(super) fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!("template failed: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

fn who(c: &Option<Caller>) -> (Option<&str>, &str) {
    match c {
        Some(c) => (Some(c.user.email.as_str()), c.csrf.as_deref().unwrap_or("")),
        None => (None, ""),
    }
}

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    published: Vec<catalog::Asset>,
    mine: Vec<catalog::Asset>,
}

pub async fn index(
    State(st): State<SharedState>,
    MaybeCaller(c): MaybeCaller,
) -> Result<Response, PageError> {
    let published = st.db.published_assets(100).await?;
    let mine = match &c {
        Some(c) => st.db.assets_of(c.user.id, 100).await?,
        None => Vec::new(),
    };
    let (user, csrf) = who(&c);
    Ok(render(&IndexPage {
        user,
        csrf,
        published,
        mine,
    }))
}

#[derive(Template)]
#[template(path = "upload.html")]
struct UploadPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    max_mib: u64,
    /// The caller's resumable uploads not finished yet.
    unfinished: Vec<Unfinished>,
    expiry_hours: u64,
}

struct Unfinished {
    id: String,
    name: String,
    percent: u32,
    received_mib: String,
    total_mib: String,
    expires: String,
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1048576.0)
}

pub async fn upload_form(State(st): State<SharedState>, c: Caller) -> Result<Response, PageError> {
    let unfinished = st
        .tus
        .unfinished_of(c.user.id)
        .into_iter()
        .map(|u| Unfinished {
            name: if u.title.is_empty() {
                u.filename.clone()
            } else {
                u.title.clone()
            },
            percent: (u.offset as f64 * 100.0 / u.length.max(1) as f64).floor() as u32,
            received_mib: mib(u.offset),
            total_mib: mib(u.length),
            expires: crate::backup::format_utc(u.expires),
            id: u.id,
        })
        .collect();
    let c = Some(c);
    let (user, csrf) = who(&c);
    Ok(render(&UploadPage {
        user,
        csrf,
        unfinished,
        expiry_hours: st.cfg.upload_expiry_hours,
        max_mib: st.cfg.max_upload_bytes / (1024 * 1024),
    }))
}

#[derive(Template)]
#[template(path = "asset.html")]
struct AssetPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    a: AssetView,
    busy: bool,
    percent: u32,
    watch_url: String,
    /// Whether the caller owns the movie (sets its price) and a fresh
    /// request id for the buy form (a double submit is charged once).
    owner: bool,
    request_id: String,
}

pub async fn asset_page(
    State(st): State<SharedState>,
    MaybeCaller(c): MaybeCaller,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let a = st.db.asset(&id).await?.ok_or(ApiError::NotFound("movie"))?;
    if !api::visible_to(&a, c.as_ref()) {
        return Err(ApiError::NotFound("movie").into());
    }
    let mut view = api::asset_view(&st, &a).await?;
    super::account::gate_media_url(&a, c.as_ref(), &mut view);
    let owner = c
        .as_ref()
        .is_some_and(|c| c.user.id == a.owner_id || c.user.is_operator());
    let busy = !view.state.is_settled();
    let percent = (view.progress.clamp(0.0, 1.0) * 100.0).round() as u32;
    let (user, csrf) = who(&c);
    Ok(render(&AssetPage {
        user,
        csrf,
        busy,
        percent,
        watch_url: view.media_url.clone().unwrap_or_default(),
        a: view,
        owner,
        request_id: uuid::Uuid::new_v4().simple().to_string(),
    }))
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    error: Option<&'a str>,
    email: &'a str,
}

/// Before login there is no session to hold a CSRF token, so the log-in
/// and sign-up forms use a double-submit cookie: the hidden field must equal
/// the cookie. The token already in the browser's cookie, or a new one.
pub fn login_csrf_token(headers: &axum::http::HeaderMap) -> String {
    session::cookie(headers, session::LOGIN_CSRF_COOKIE)
        .map(str::to_owned)
        .unwrap_or_else(auth::random_token)
}

/// `resp` (a pre-login form) with the double-submit cookie for `token`.
pub fn with_login_csrf_cookie(st: &SharedState, mut resp: Response, token: &str) -> Response {
    if let Ok(v) =
        session::set_cookie(session::LOGIN_CSRF_COOKIE, token, 3600, st.secure_cookies).parse()
    {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

pub async fn login_form(State(st): State<SharedState>, headers: axum::http::HeaderMap) -> Response {
    let token = login_csrf_token(&headers);
    let resp = render(&LoginPage {
        user: None,
        csrf: &token,
        error: None,
        email: "",
    });
    with_login_csrf_cookie(&st, resp, &token)
}

#[derive(Deserialize)]
pub struct LoginForm {
    csrf: String,
    email: String,
    password: String,
}

pub async fn login(
    State(st): State<SharedState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    Form(f): Form<LoginForm>,
) -> Result<Response, PageError> {
    let cookie_csrf = session::cookie(&headers, session::LOGIN_CSRF_COOKIE).map(str::to_owned);
    if !cookie_csrf.is_some_and(|c| auth::ct_eq(&c, &f.csrf)) {
        return Err(ApiError::Csrf.into());
    }
    let email = f.email.trim().to_lowercase();
    // Bounded before anything is stored or hashed: RFC 5321's limit.
    if email.len() > 254 || f.password.len() > 1024 {
        return Err(ApiError::bad_request(
            "login_invalid",
            "an email address has at most 254 characters, a password at most 1024",
        )
        .into());
    }
    // Failed attempts per address and per account are limited (429); the
    // attempt counts as failed until the password proves right.
    let ip = super::account::client_ip(&st, peer, &headers);
    let attempt = crate::limits::begin_login(&st.limits, &ip, &email)?;
    let user = st.db.user_by_email(&email).await?;
    // Always run one Argon2 verification so timing does not reveal which
    // emails have accounts.
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| st.dummy_hash.clone());
    let ok = auth::verify_password_bounded(&st.password_checks, &hash, &f.password).await?;
    let Some(user) = user.filter(|_| ok) else {
        tracing::info!("failed login");
        attempt.failed();
        let page = LoginPage {
            user: None,
            csrf: &f.csrf,
            error: Some("Wrong email or password."),
            email: &email,
        };
        return Ok((StatusCode::UNAUTHORIZED, render(&page)).into_response());
    };
    drop(attempt);
    if user.disabled {
        // Said only after the password proved right: it tells nothing to
        // someone guessing.
        tracing::info!(user = user.id, "log-in refused: account disabled");
        let page = LoginPage {
            user: None,
            csrf: &f.csrf,
            error: Some(
                "This account is disabled (account_disabled). Write to the site's operator.",
            ),
            email: &email,
        };
        return Ok((StatusCode::FORBIDDEN, render(&page)).into_response());
    }
    tracing::info!(user = user.id, "logged in");
    Ok(super::account::start_session(&st, user.id, "/").await?)
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

pub async fn logout(
    State(st): State<SharedState>,
    c: Caller,
    headers: axum::http::HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Result<Response, PageError> {
    c.check_csrf(Some(&f.csrf))?;
    if let Some(tok) = session::cookie(&headers, session::SESSION_COOKIE).map(str::to_owned) {
        st.db.delete_session(&auth::token_hash(&tok)).await?;
    }
    let mut resp = Redirect::to("/").into_response();
    let cookie = session::set_cookie(session::SESSION_COOKIE, "", 0, st.secure_cookies);
    resp.headers_mut().append(
        header::SET_COOKIE,
        cookie
            .parse()
            .map_err(|e: header::InvalidHeaderValue| ApiError::Internal(e.into()))?,
    );
    Ok(resp)
}

#[derive(Template)]
#[template(path = "terminals.html")]
struct TerminalsPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    terminals: Vec<catalog::Terminal>,
    movies: Vec<catalog::Asset>,
}

pub async fn terminals(State(st): State<SharedState>, c: Caller) -> Result<Response, PageError> {
    let terminals = st.db.terminals_of(c.user.id).await?;
    let movies = st.db.published_assets(500).await?;
    let c = Some(c);
    let (user, csrf) = who(&c);
    Ok(render(&TerminalsPage {
        user,
        csrf,
        terminals,
        movies,
    }))
}

#[derive(Deserialize)]
pub struct NewTerminal {
    csrf: String,
    name: String,
    asset: String,
}

#[derive(Template)]
#[template(path = "terminal_created.html")]
struct TerminalCreated<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    name: String,
    id: String,
    secret: String,
    script: String,
}

pub async fn create_terminal(
    State(st): State<SharedState>,
    c: Caller,
    Form(f): Form<NewTerminal>,
) -> Result<Response, PageError> {
    c.check_csrf(Some(&f.csrf))?;
    let name: String = f
        .name
        .trim()
        .chars()
        .filter(|ch| !ch.is_control())
        .take(100)
        .collect();
    if name.is_empty() {
        return Err(ApiError::bad_request("name_missing", "give the terminal a name").into());
    }
    let a = st
        .db
        .asset(&f.asset)
        .await?
        .ok_or(ApiError::NotFound("movie"))?;
    if a.state != crate::domain::AssetState::Published {
        return Err(ApiError::NotPublished.into());
    }
    let (id, secret) = super::terminal::register(&st, c.user.id, &name).await?;
    tracing::info!(terminal = %id, user = c.user.id, "terminal registered");
    let script = super::terminal::script_for(&st.public_url, &id, &secret, &a.id);
    let c = Some(c);
    let (user, csrf) = who(&c);
    let mut resp = render(&TerminalCreated {
        user,
        csrf,
        name,
        id,
        secret,
        script,
    });
    // The page holds a secret: no cache may keep it.
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    Ok(resp)
}

pub async fn delete_terminal(
    State(st): State<SharedState>,
    c: Caller,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, PageError> {
    c.check_csrf(Some(&f.csrf))?;
    if !st.db.delete_terminal(&id, c.user.id).await? {
        return Err(ApiError::NotFound("terminal").into());
    }
    Ok(Redirect::to("/terminals").into_response())
}

/// The set-up guide, as plain text (it is Markdown, readable as is).
pub async fn terminal_doc() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        include_str!("../../../docs/terminal.md"),
    )
        .into_response()
}

/// `GET /posters/{id}.jpg`: the still made at transcode time, for pages.
pub async fn poster(
    State(st): State<SharedState>,
    MaybeCaller(c): MaybeCaller,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    let id = file
        .strip_suffix(".jpg")
        .ok_or(ApiError::NotFound("poster"))?;
    let a = st.db.asset(id).await?.ok_or(ApiError::NotFound("poster"))?;
    if !api::visible_to(&a, c.as_ref()) {
        return Err(ApiError::NotFound("poster"));
    }
    let bytes = tokio::fs::read(st.cfg.poster_dir().join(format!("{}.jpg", a.id)))
        .await
        .map_err(|_| ApiError::NotFound("poster"))?;
    let cache = if a.state == crate::domain::AssetState::Published {
        "public, max-age=86400"
    } else {
        "private, no-store"
    };
    Ok((
        [
            (header::CONTENT_TYPE, "image/jpeg"),
            (header::CACHE_CONTROL, cache),
        ],
        bytes,
    )
        .into_response())
}

/// `POST /upload/{id}/discard`: drops an unfinished resumable upload and
/// its bytes (the upload page's button; the API's twin is tus `DELETE`).
pub async fn discard_upload(
    State(st): State<SharedState>,
    c: Caller,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, PageError> {
    c.check_csrf(Some(&f.csrf))?;
    match st.tus.terminate(&c.user, &id).await {
        Ok(()) | Err(crate::tus::TusError::NotFound | crate::tus::TusError::Gone) => {}
        Err(e) => return Err(ApiError::from(e).into()),
    }
    Ok(Redirect::to("/upload").into_response())
}

/// `GET /static/tus-js-client-4.3.1.min.js`: the tus client the upload page
/// uses, vendored from npm with its licence (assets/vendor/tus-js-client).
pub async fn tus_client() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            // The name carries the version: a new one is a new URL.
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        include_str!("../../assets/vendor/tus-js-client/tus.min.js"),
    )
        .into_response()
}

/// The cancel button on a movie's page (the plain-form twin of the API).
pub async fn cancel(
    State(st): State<SharedState>,
    c: Caller,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, PageError> {
    c.check_csrf(Some(&f.csrf))?;
    api::cancel_as(&st, &c, &id).await?;
    Ok(Redirect::to(&format!("/assets/{id}")).into_response())
}
