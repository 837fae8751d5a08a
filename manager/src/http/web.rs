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
    movies: Vec<Card>,
    /// The search as typed (empty: none).
    q: String,
    /// The link to the next (older) page, when there is one.
    older: Option<String>,
    /// Whether this is a later page (a link back to the newest).
    later_page: bool,
    newest: String,
}

/// A movie as the home page shows it.
struct Card {
    id: String,
    title: String,
    duration: String,
    price: i64,
}

/// Movies on a page of the home page.
const CARDS_PER_PAGE: i64 = 24;

#[derive(Deserialize, Default)]
pub struct IndexQuery {
    #[serde(default)]
    q: String,
    /// `<created_at>.<id>` of the last movie on the page before.
    #[serde(default)]
    after: String,
}

/// A page's keyset cursor, `<created_at>.<id>` of the last row on the page
/// before (the home page's and "my movies"' "older" links). Anything that
/// is not one of ours is `None`: the first page.
pub(super) fn keyset_cursor(raw: &str) -> Option<(i64, String)> {
    let (at, id) = raw.split_once('.')?;
    let ok = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric());
    Some((at.parse::<i64>().ok()?, id.to_string())).filter(|_| ok)
}

/// `m:ss` or `h:mm:ss`.
fn clock(secs: Option<f64>) -> String {
    let Some(s) = secs else {
        return String::new();
    };
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

pub async fn index(
    State(st): State<SharedState>,
    MaybeCaller(c): MaybeCaller,
    query: Result<axum::extract::Query<IndexQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, PageError> {
    // A query string that is not ours (a field twice, garbage) is the
    // first page, not an error.
    let query = query.map(|q| q.0).unwrap_or_default();
    let q: String = query.q.trim().chars().take(100).collect();
    // A cursor that is not one of ours is the first page.
    let after = keyset_cursor(&query.after);
    let later_page = after.is_some();
    let search = (!q.is_empty()).then_some(q.as_str());
    let mut page = st
        .db
        .published_page(after, search, CARDS_PER_PAGE + 1)
        .await?;
    let older = if page.len() as i64 > CARDS_PER_PAGE {
        page.truncate(CARDS_PER_PAGE as usize);
        page.last().map(|a| {
            let mut url = format!("/?after={}.{}", a.created_at, a.id);
            if !q.is_empty() {
                url += "&q=";
                url += &url_encode(&q);
            }
            url
        })
    } else {
        None
    };
    let movies = page
        .into_iter()
        .map(|a| Card {
            duration: clock(a.duration_secs),
            price: a.price,
            id: a.id,
            title: a.title,
        })
        .collect();
    let (user, csrf) = who(&c);
    Ok(render(&IndexPage {
        user,
        csrf,
        movies,
        newest: if q.is_empty() {
            "/".into()
        } else {
            format!("/?q={}", url_encode(&q))
        },
        q,
        older,
        later_page,
    }))
}

/// Percent-encodes `s` for a query string.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
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
    /// The file's name and size, which the page matches a chosen file
    /// against to carry on.
    filename: String,
    length: u64,
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
            filename: u.filename,
            length: u.length,
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
    /// Where processing stands, step by step (empty once settled).
    steps: Vec<Step>,
    /// For a refused movie: what the uploader can do about it.
    advice: Option<&'static str>,
    duration: String,
    size_mib: String,
    token_hours: u64,
}

/// One step of processing as the movie page shows it.
struct Step {
    label: &'static str,
    /// `done`, `now` or `next`.
    state: &'static str,
    detail: String,
}

/// The steps from upload to publication, and where `a` is on them.
fn steps(a: &AssetView, source_bytes: i64, percent: u32) -> Vec<Step> {
    use crate::domain::{AssetState as S, ReplicaState as R};
    let at = match a.state {
        S::Queued => 1,
        S::Probing => 1,
        S::Transcoding => 2,
        S::Sealing => 3,
        S::Replicating => 4,
        _ => return Vec::new(),
    };
    let state = |i: usize| match i.cmp(&at) {
        std::cmp::Ordering::Less => "done",
        std::cmp::Ordering::Equal => "now",
        std::cmp::Ordering::Greater => "next",
    };
    let copies = a
        .replicas
        .iter()
        .map(|r| {
            let what = match r.state {
                R::Verified => "copied",
                R::Pending | R::Repairing => "copying",
                R::Failed => "retrying",
                R::Retired => "retired",
            };
            format!(
                "{}: {what}",
                if r.site.is_empty() { &r.node } else { &r.site }
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        Step {
            label: "Received",
            state: "done",
            detail: format!("{} MiB", mib(source_bytes.max(0) as u64)),
        },
        Step {
            label: "Checking the file",
            state: state(1),
            detail: if a.state == S::Queued {
                "waiting for a free converter".into()
            } else {
                String::new()
            },
        },
        Step {
            label: "Converting for Second Life's player",
            state: state(2),
            detail: if at == 2 {
                format!("{percent}%")
            } else {
                String::new()
            },
        },
        Step {
            label: "Encrypting",
            state: state(3),
            detail: String::new(),
        },
        Step {
            label: "Copying to the mirrors",
            state: state(4),
            detail: if at == 4 { copies } else { String::new() },
        },
    ]
}

/// What an uploader can do about a refusal, by its code.
fn advice(code: &str) -> &'static str {
    match code {
        "not_media" | "no_streams" | "no_video" | "still_image" => {
            "This file is not a movie we can read. Export it again from your video editor as MP4 (H.264 video, AAC sound) and upload that."
        }
        "corrupt_media" | "truncated" => {
            "The file looks damaged or incomplete, perhaps a copy or download that did not finish. Play it on your computer to check, then upload a complete copy."
        }
        "unsupported_codec" | "container_not_allowed" => {
            "Its video or sound is in a format we cannot convert. Export it as MP4 (H.264 video, AAC sound) and upload that."
        }
        "too_large" => "The file is larger than this site accepts. Export it at a lower quality or cut it shorter, then upload again.",
        "too_long" => "The movie is longer than this site accepts. Cut it into parts and upload each one.",
        "too_wide" => "The picture is larger than this site accepts. Export it at 1920×1080 or smaller and upload again.",
        "empty_file" => "The file was empty. Choose the movie file itself and upload again.",
        "cancelled" => "This upload was cancelled. Upload the movie again whenever you like.",
        "transcode_failed" | "processing_failed" => {
            "Converting it failed on our side, not because of anything you did. The operator has been told; try uploading it again later."
        }
        _ => "Upload the movie again, or ask the operator for help and quote the code.",
    }
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
    let advice = match (&view.error, view.state) {
        (Some(e), crate::domain::AssetState::Rejected) => Some(advice(&e.code)),
        _ => None,
    };
    Ok(render(&AssetPage {
        steps: steps(&view, a.source_bytes, percent),
        advice,
        duration: clock(a.duration_secs),
        size_mib: mib(a.plain_len.unwrap_or(a.source_bytes).max(0) as u64),
        token_hours: st.cfg.token_ttl_secs / 3600,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_cursors_are_taken() {
        assert_eq!(
            keyset_cursor("1700000000.0a1b"),
            Some((1700000000, "0a1b".to_string()))
        );
        for bad in [
            "",
            "1700000000",
            "1700000000.",
            "x.0a1b",
            "1.a'b",
            "1.../etc",
        ] {
            assert_eq!(keyset_cursor(bad), None, "{bad:?}");
        }
        assert_eq!(keyset_cursor(&format!("1.{}", "a".repeat(65))), None);
    }
}
