//! The public status page (`/status`, its Atom and JSON feeds and an SVG
//! badge, each with an `ETag`) and the operators' pages behind it: checks
//! and alert channels (`/admin/alerts`, with a "send test" per channel),
//! incidents (`/admin/incidents`) and nodes (`/admin/nodes`, drain and
//! return). Content comes from `crate::status`, `crate::monitor`'s stored
//! results and `crate::console`.

use askama::Template;
use axum::{
    extract::{Path, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Form,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{
    error::ApiError,
    session::{Caller, MaybeCaller},
    web::{render, PageError},
};
use crate::{
    backup::format_utc,
    catalog::{self, Incident},
    console::{self, ConsoleError},
    domain::Health,
    notify, status, SharedState,
};

#[derive(Template)]
#[template(path = "status.html")]
pub struct StatusPage<'a> {
    pub page: &'a status::Page,
    /// The manager's public URL: the nodes' copy links back to it.
    pub base: &'a str,
}

impl StatusPage<'_> {
    fn utc(&self, t: impl std::borrow::Borrow<i64>) -> String {
        format_utc(*t.borrow())
    }

    fn window(&self, i: &Incident) -> String {
        window(i)
    }
}

/// ` · from … to …` for announced maintenance, else nothing.
fn window(i: &Incident) -> String {
    match (i.starts_at, i.ends_at) {
        (Some(s), Some(e)) => format!(" · from {} to {}", format_utc(s), format_utc(e)),
        _ => String::new(),
    }
}

/// Renders the page as the nodes' copy must read (links to the manager).
pub fn render_snapshot(page: &status::Page, base: &str) -> String {
    StatusPage { page, base }
        .render()
        .unwrap_or_else(|e| format!("<p>status page could not be rendered: {e}</p>"))
}

/// Answers `body` with an `ETag` made from `body` (or from `about`, the
/// content without its render time: then a weak tag), or `304` when the
/// client has it.
fn with_etag(
    headers: &HeaderMap,
    content_type: &'static str,
    body: String,
    about: Option<&[u8]>,
) -> Response {
    let hash = hex::encode(&Sha256::digest(about.unwrap_or(body.as_bytes()))[..12]);
    let tag = match about {
        Some(_) => format!("W/\"{hash}\""),
        None => format!("\"{hash}\""),
    };
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    let etag = HeaderValue::from_str(&tag).expect("hex");
    let cache = HeaderValue::from_static("public, max-age=30");
    if matches {
        return (
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag), (header::CACHE_CONTROL, cache)],
        )
            .into_response();
    }
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, cache),
        ],
        body,
    )
        .into_response()
}

/// How long one gathering of the page serves every visitor: the page is
/// public, and a crowd arrives exactly when something is wrong.
const PAGE_CACHE_SECS: i64 = 5;

async fn current(st: &SharedState) -> Result<std::sync::Arc<status::Page>, ApiError> {
    let now = catalog::now();
    if let Some((at, p)) = st.status_cache.lock().expect("not poisoned").as_ref() {
        if now - at < PAGE_CACHE_SECS {
            return Ok(p.clone());
        }
    }
    let p = std::sync::Arc::new(
        status::page(&*st.db, &st.cfg, now)
            .await
            .map_err(ApiError::Internal)?,
    );
    *st.status_cache.lock().expect("not poisoned") = Some((now, p.clone()));
    Ok(p)
}

/// What a page's tag is made of: its content without the render time.
fn page_tag(p: &status::Page) -> Vec<u8> {
    let mut v = serde_json::to_value(p).unwrap_or_default();
    v["generated_at"] = 0.into();
    v.to_string().into_bytes()
}

/// `GET /status`.
pub async fn page(
    State(st): State<SharedState>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let p = current(&st).await?;
    Ok(with_etag(
        &headers,
        "text/html; charset=utf-8",
        render_snapshot(&p, &st.public_url),
        Some(&page_tag(&p)),
    ))
}

/// Escaped for XML text and attributes, without the control characters
/// XML 1.0 forbids (one pasted into an incident would break the feed).
fn xml_escape(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r'))
        .collect::<String>()
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn entry_text(i: &Incident) -> String {
    i.updates
        .iter()
        .rev()
        .map(|u| format!("{} ({}): {}", u.status, format_utc(u.at), u.body))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// `GET /status/feed.atom`: incidents of the last 90 days.
pub async fn atom(State(st): State<SharedState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let list = status::feed(&*st.db, catalog::now())
        .await
        .map_err(ApiError::Internal)?;
    let base = &st.public_url;
    let updated = list.iter().map(|i| status::latest(i).2).max().unwrap_or(0);
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<feed xmlns=\"http://www.w3.org/2005/Atom\">\n<title>slmedia status</title>\n<id>{0}/status</id>\n<link rel=\"alternate\" href=\"{0}/status\"/>\n<link rel=\"self\" href=\"{0}/status/feed.atom\"/>\n<updated>{1}</updated>\n",
        xml_escape(base),
        notify::rfc3339(updated)
    );
    for i in &list {
        let (state, _, at) = status::latest(i);
        x.push_str(&format!(
            "<entry>\n<id>{base}/status#incident-{id}</id>\n<title>{title} ({state})</title>\n<link href=\"{base}/status\"/>\n<published>{published}</published>\n<updated>{updated}</updated>\n<author><name>slmedia operators</name></author>\n<content type=\"text\">{content}</content>\n</entry>\n",
            base = xml_escape(base),
            id = i.id,
            title = xml_escape(&i.title),
            state = xml_escape(state),
            published = notify::rfc3339(i.created_at),
            updated = notify::rfc3339(at),
            content = xml_escape(&entry_text(i)),
        ));
    }
    x.push_str("</feed>\n");
    Ok(with_etag(
        &headers,
        "application/atom+xml; charset=utf-8",
        x,
        None,
    ))
}

/// `GET /status/feed.json`: the same as JSON Feed 1.1.
pub async fn json_feed(
    State(st): State<SharedState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let list = status::feed(&*st.db, catalog::now())
        .await
        .map_err(ApiError::Internal)?;
    let base = &st.public_url;
    let items: Vec<serde_json::Value> = list
        .iter()
        .map(|i| {
            let (state, _, at) = status::latest(i);
            serde_json::json!({
                "id": format!("{base}/status#incident-{}", i.id),
                "url": format!("{base}/status"),
                "title": format!("{} ({state})", i.title),
                "content_text": entry_text(i),
                "date_published": notify::rfc3339(i.created_at),
                "date_modified": notify::rfc3339(at),
                "tags": [i.impact.clone()],
            })
        })
        .collect();
    let body = serde_json::json!({
        "version": "https://jsonfeed.org/version/1.1",
        "title": "slmedia status",
        "home_page_url": format!("{base}/status"),
        "feed_url": format!("{base}/status/feed.json"),
        "items": items,
    });
    Ok(with_etag(
        &headers,
        "application/feed+json",
        body.to_string(),
        None,
    ))
}

/// `GET /status/badge.svg`: "status | operational" in the state's colour.
pub async fn badge(
    State(st): State<SharedState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let p = current(&st).await?;
    let (word, colour) = match p.overall {
        Health::Ok => ("operational", "#2da44e"),
        Health::Degraded => ("degraded", "#d4a72c"),
        Health::Down => ("outage", "#cf222e"),
    };
    // Widths from a 7 px average glyph: plenty for these fixed words.
    let (lw, rw) = (50, 12 + 7 * word.len());
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"20\" role=\"img\" aria-label=\"status: {word}\"><title>status: {word}</title><rect width=\"{lw}\" height=\"20\" fill=\"#555\"/><rect x=\"{lw}\" width=\"{rw}\" height=\"20\" fill=\"{colour}\"/><g fill=\"#fff\" font-family=\"Verdana,DejaVu Sans,sans-serif\" font-size=\"11\" text-anchor=\"middle\"><text x=\"{lx}\" y=\"14\">status</text><text x=\"{rx}\" y=\"14\">{word}</text></g></svg>",
        w = lw + rw,
        lx = lw / 2,
        rx = lw + rw / 2,
    );
    Ok(with_etag(&headers, "image/svg+xml", svg, None))
}

// ---- the operators' pages ------------------------------------------------------

fn operator_page(c: MaybeCaller) -> Result<Caller, PageError> {
    super::admin::operator_page(c)
}

struct CheckLine {
    id: String,
    component: String,
    state: Health,
    since: String,
    detail: String,
    told: String,
}

struct DeliveryLine {
    at: String,
    channel: String,
    subject: String,
    kind: String,
    attempt: i64,
    ok: bool,
    answer: String,
}

#[derive(Template)]
#[template(path = "admin_alerts.html")]
struct AlertsPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    checks: Vec<CheckLine>,
    channels: Vec<String>,
    heartbeat: String,
    deliveries: Vec<DeliveryLine>,
    history: Vec<(String, String, Health, String)>,
    message: Option<String>,
    failed: bool,
}

async fn alerts_page(
    st: &SharedState,
    c: &Caller,
    message: Option<(String, bool)>,
) -> Result<Response, PageError> {
    let mut checks: Vec<CheckLine> = st
        .db
        .check_states()
        .await?
        .into_iter()
        .map(|s| CheckLine {
            told: match (s.notified_state, s.notified_at) {
                (Some(h), Some(t)) => format!("{h} at {}", format_utc(t)),
                _ => "never".into(),
            },
            since: format_utc(s.since),
            id: s.check_id,
            component: s.component,
            state: s.state,
            detail: s.detail,
        })
        .collect();
    // The worst first; within a state, by name.
    checks.sort_by(|a, b| b.state.cmp(&a.state).then(a.id.cmp(&b.id)));
    let deliveries = st
        .db
        .deliveries(100)
        .await?
        .into_iter()
        .map(|d| DeliveryLine {
            at: format_utc(d.at),
            channel: d.channel,
            subject: d.subject,
            kind: d.kind,
            attempt: d.attempt,
            ok: d.ok,
            answer: d.answer,
        })
        .collect();
    let history = st
        .db
        .check_history(100)
        .await?
        .into_iter()
        .map(|e| (format_utc(e.at), e.check_id, e.state, e.detail))
        .collect();
    let (message, failed) = message.map_or((None, false), |(m, f)| (Some(m), f));
    Ok(render(&AlertsPage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        checks,
        channels: st.notifier.channels(),
        heartbeat: if st.cfg.alerts.heartbeat_url.is_empty() {
            "off".into()
        } else {
            format!("every {} s", st.cfg.alerts.heartbeat_secs)
        },
        deliveries,
        history,
        message,
        failed,
    }))
}

/// `GET /admin/alerts`: every check's state, the channels, the deliveries.
pub async fn admin_alerts(
    State(st): State<SharedState>,
    c: MaybeCaller,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    alerts_page(&st, &c, None).await
}

#[derive(Deserialize)]
pub struct TestForm {
    csrf: String,
    channel: String,
}

/// `POST /admin/alerts/test`: one test message; the page shows the
/// receiving end's answer.
pub async fn test_channel(
    State(st): State<SharedState>,
    c: MaybeCaller,
    Form(f): Form<TestForm>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    c.check_csrf(Some(&f.csrf))?;
    let r = st
        .notifier
        .test(&f.channel, &c.user.email)
        .await
        .ok_or(PageError(ApiError::NotFound("channel")))?;
    let outcome = match &r {
        Ok(a) => format!("delivered: {a}"),
        Err(e) => format!("failed: {e}"),
    };
    console::audit(&*st.db, &c.user, "alert_test", &f.channel, &outcome).await;
    let message = match r {
        Ok(a) => (
            format!("Test sent through {}. The answer: {a}", f.channel),
            false,
        ),
        Err(e) => (format!("The test through {} failed: {e}", f.channel), true),
    };
    alerts_page(&st, &c, Some(message)).await
}

#[derive(Template)]
#[template(path = "admin_incidents.html")]
struct IncidentsPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    page: std::sync::Arc<status::Page>,
    components: Vec<(String, String)>,
    statuses: &'static [&'static str],
    message: Option<String>,
    failed: bool,
}

impl IncidentsPage<'_> {
    fn utc(&self, t: impl std::borrow::Borrow<i64>) -> String {
        format_utc(*t.borrow())
    }

    fn window(&self, i: &Incident) -> String {
        window(i)
    }
}

async fn incidents_page(
    st: &SharedState,
    c: &Caller,
    message: Option<(String, bool)>,
) -> Result<Response, PageError> {
    // Fresh, not the public cache: the operator just changed it.
    *st.status_cache.lock().expect("not poisoned") = None;
    let page = current(st).await?;
    let (message, failed) = message.map_or((None, false), |(m, f)| (Some(m), f));
    let mut r = render(&IncidentsPage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        page,
        components: status::components(&st.cfg),
        statuses: &console::INCIDENT_STATUSES,
        message,
        failed,
    });
    if failed {
        *r.status_mut() = StatusCode::BAD_REQUEST;
    }
    Ok(r)
}

/// `GET /admin/incidents`.
pub async fn admin_incidents(
    State(st): State<SharedState>,
    c: MaybeCaller,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    incidents_page(&st, &c, None).await
}

/// `2026-11-30T14:00` (a `datetime-local` field, read as UTC).
fn parse_local_utc(s: &str) -> Option<i64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let full = if s.len() == 16 {
        format!("{s}:00Z")
    } else {
        format!("{s}Z")
    };
    humantime::parse_rfc3339(&full)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64)
}

/// `POST /admin/incidents`: the form's fields, components repeated.
pub async fn open_incident(
    State(st): State<SharedState>,
    c: MaybeCaller,
    body: String,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&body).map_err(|_| {
        PageError(ApiError::BadRequest {
            code: "invalid_input",
            message: "an unreadable form".into(),
        })
    })?;
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    c.check_csrf(Some(get("csrf")))?;
    let components: Vec<String> = pairs
        .iter()
        .filter(|(n, _)| n == "component")
        .map(|(_, v)| v.clone())
        .collect();
    let known: Vec<String> = status::components(&st.cfg)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let window = match (
        parse_local_utc(get("starts_at")),
        parse_local_utc(get("ends_at")),
    ) {
        (Some(s), Some(e)) => Some((s, e)),
        _ => None,
    };
    let r = console::open_incident(
        &*st.db,
        &c.user,
        get("title"),
        get("impact"),
        &components,
        &known,
        window,
        get("body"),
    )
    .await;
    let message = match r {
        Ok(id) => (format!("Incident {id} is on the status page."), false),
        Err(ConsoleError::Db(e)) => return Err(PageError(ApiError::Internal(e.into()))),
        Err(e) => (format!("Not opened: {e}"), true),
    };
    incidents_page(&st, &c, Some(message)).await
}

#[derive(Deserialize)]
pub struct UpdateForm {
    csrf: String,
    status: String,
    body: String,
}

/// `POST /admin/incidents/{id}/update`.
pub async fn update_incident(
    State(st): State<SharedState>,
    c: MaybeCaller,
    Path(id): Path<i64>,
    Form(f): Form<UpdateForm>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    c.check_csrf(Some(&f.csrf))?;
    let message = match console::update_incident(&*st.db, &c.user, id, &f.status, &f.body).await {
        Ok(()) => (format!("Incident {id} updated ({}).", f.status), false),
        Err(ConsoleError::Db(e)) => return Err(PageError(ApiError::Internal(e.into()))),
        Err(e) => (format!("Not updated: {e}"), true),
    };
    incidents_page(&st, &c, Some(message)).await
}

struct NodeLine {
    name: String,
    site: String,
    url: String,
    state: &'static str,
    drained: bool,
    detail: String,
    version: String,
    fingerprint: String,
    disk: String,
    skew: String,
    journal: String,
    checked: String,
    checks: Vec<(String, Health, String)>,
    /// Blob count and bytes, quarantined copies, scrub progress, from the
    /// last reconciliation's inventory; empty until one was read.
    blobs: String,
    quarantined: String,
    scrub: String,
    redirects: u64,
    certificate: String,
}

/// The scrub's status as the node reported it, in words.
fn scrub_text(s: &serde_json::Value, now: i64) -> String {
    let n = |k: &str| s.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let t = |k: &str| s.get(k).and_then(|v| v.as_i64());
    let mut out = Vec::new();
    if s.get("pass_running").and_then(|v| v.as_bool()) == Some(true) {
        let total = n("pass_bytes_total");
        let pct = n("pass_bytes_done")
            .saturating_mul(100)
            .checked_div(total)
            .unwrap_or(0);
        out.push(format!(
            "pass {pct} % done ({} of {})",
            media::human_bytes(n("pass_bytes_done")),
            media::human_bytes(total)
        ));
    } else {
        out.push("idle".into());
    }
    match t("last_pass_completed_at") {
        Some(at) => out.push(format!(
            "last full pass {} ago ({} in {:.0} s)",
            console::human_age((now - at).max(0)),
            media::human_bytes(n("last_pass_bytes")),
            s.get("last_pass_secs")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0)
        )),
        None => out.push("no full pass yet".into()),
    }
    out.push(format!("{} passes since start", n("passes_completed")));
    out.join(" · ")
}

#[derive(Template)]
#[template(path = "admin_nodes.html")]
struct NodesPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    nodes: Vec<NodeLine>,
    fingerprint: String,
    version: String,
    message: Option<String>,
    failed: bool,
}

async fn nodes_page(
    st: &SharedState,
    c: &Caller,
    message: Option<(String, bool)>,
) -> Result<Response, PageError> {
    let states = st.db.check_states().await?;
    let marks = st.db.journal_watermarks().await?;
    let now = catalog::now();
    let nodes = st
        .nodes
        .list
        .iter()
        .map(|n| {
            let p = n.last_probe();
            let report = p
                .as_ref()
                .and_then(|p| p.report.clone())
                .unwrap_or_default();
            let text = |k: &str| {
                report
                    .get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            };
            let name = n.cfg.name.clone();
            let checks = states
                .iter()
                .filter(|s| {
                    s.check_id
                        .split_once('.')
                        .is_some_and(|(_, who)| who == name)
                })
                .map(|s| (s.check_id.clone(), s.state, s.detail.clone()))
                .collect();
            NodeLine {
                state: match (&p, n.is_healthy()) {
                    (None, _) => "not probed yet",
                    (Some(_), true) => "ok",
                    (Some(_), false) => "down",
                },
                drained: n.is_drained(),
                detail: p.as_ref().map(|p| p.detail.clone()).unwrap_or_default(),
                version: text("version"),
                fingerprint: text("config_fingerprint"),
                disk: super::admin::disk_text(
                    report
                        .get("disk")
                        .and_then(|d| serde_json::from_value(d.clone()).ok()),
                ),
                skew: p
                    .as_ref()
                    .and_then(|p| p.skew_ms)
                    .map(|s| format!("{:+.1} s", s as f64 / 1000.0))
                    .unwrap_or_default(),
                journal: marks
                    .iter()
                    .find(|(m, _)| *m == name)
                    .map(|(_, w)| format!("{} behind", console::human_age((now - w).max(0))))
                    .unwrap_or_else(|| "nothing delivered yet".into()),
                checked: p.as_ref().map(|p| format_utc(p.at)).unwrap_or_default(),
                blobs: n
                    .last_inventory()
                    .map(|i| {
                        format!(
                            "{} copies, {} · as of {}",
                            i.counts.good,
                            media::human_bytes(i.counts.good_bytes),
                            format_utc(i.at)
                        )
                    })
                    .unwrap_or_else(|| "no inventory read yet".into()),
                quarantined: n
                    .last_inventory()
                    .map(|i| i.counts.quarantined.to_string())
                    .unwrap_or_default(),
                scrub: n
                    .last_inventory()
                    .map(|i| scrub_text(&i.scrub, now))
                    .unwrap_or_default(),
                redirects: n.redirects(),
                certificate: p
                    .as_ref()
                    .and_then(|p| p.cert_expires_at)
                    .map(|t| {
                        format!(
                            "expires {} (in {})",
                            format_utc(t),
                            console::human_age(t - now)
                        )
                    })
                    .unwrap_or_else(|| "none (plain HTTP)".into()),
                site: n.cfg.site().to_string(),
                url: n.cfg.url.clone(),
                checks,
                name,
            }
        })
        .collect();
    let (message, failed) = message.map_or((None, false), |(m, f)| (Some(m), f));
    let mut r = render(&NodesPage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        nodes,
        fingerprint: shared::protocol::config_fingerprint(
            &st.minter.signer.public_hex(),
            st.cfg.master_key_id,
        ),
        version: shared::protocol::build_version(),
        message,
        failed,
    });
    if failed {
        *r.status_mut() = StatusCode::NOT_FOUND;
    }
    Ok(r)
}

/// `GET /admin/nodes`.
pub async fn admin_nodes(
    State(st): State<SharedState>,
    c: MaybeCaller,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    nodes_page(&st, &c, None).await
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    csrf: String,
}

/// `POST /admin/nodes/{name}/drain` and `/return`.
pub async fn node_action(
    State(st): State<SharedState>,
    c: MaybeCaller,
    Path((name, action)): Path<(String, String)>,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    c.check_csrf(Some(&f.csrf))?;
    let drained = match action.as_str() {
        "drain" => true,
        "return" => false,
        _ => return Err(PageError(ApiError::NotFound("page"))),
    };
    let message = match console::drain(&*st.db, &st.nodes, &c.user, &name, drained).await {
        Ok(_) if drained => (
            format!("{name} is drained: no new viewers or copies go to it."),
            false,
        ),
        Ok(_) => (format!("{name} is back in rotation."), false),
        Err(ConsoleError::Db(e)) => return Err(PageError(ApiError::Internal(e.into()))),
        Err(e) => (format!("Not changed: {e}"), true),
    };
    nodes_page(&st, &c, Some(message)).await
}

/// `GET /api/v1/admin/checks`: every check's latest result (operators).
pub async fn checks_api(
    State(st): State<SharedState>,
    c: Caller,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    if !c.user.is_operator() {
        return Err(ApiError::Forbidden);
    }
    Ok(axum::Json(
        serde_json::json!({ "checks": st.db.check_states().await? }),
    ))
}

#[derive(Deserialize)]
pub struct TestRequest {
    channel: String,
}

/// `POST /api/v1/admin/alerts/test {"channel": …}`: one test message,
/// answered with the receiving end's answer (operators).
pub async fn test_channel_api(
    State(st): State<SharedState>,
    c: Caller,
    headers: HeaderMap,
    axum::Json(t): axum::Json<TestRequest>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    if !c.user.is_operator() {
        return Err(ApiError::Forbidden);
    }
    c.check_csrf_header(&headers)?;
    let r = st
        .notifier
        .test(&t.channel, &c.user.email)
        .await
        .ok_or(ApiError::NotFound("channel"))?;
    let (delivered, answer) = match r {
        Ok(a) => (true, a),
        Err(e) => (false, e),
    };
    console::audit(
        &*st.db,
        &c.user,
        "alert_test",
        &t.channel,
        &format!(
            "{}: {answer}",
            if delivered { "delivered" } else { "failed" }
        ),
    )
    .await;
    Ok(axum::Json(
        serde_json::json!({ "channel": t.channel, "delivered": delivered, "answer": answer }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nodes_scrub_reads_as_words() {
        let now = 1_000_000;
        let running = serde_json::json!({
            "pass_running": true,
            "pass_bytes_done": 250 << 20,
            "pass_bytes_total": 1000 << 20,
            "last_pass_completed_at": now - 7200,
            "last_pass_bytes": 900 << 20,
            "last_pass_secs": 60.0,
            "passes_completed": 3,
        });
        let t = scrub_text(&running, now);
        assert!(t.starts_with("pass 25 % done"), "{t}");
        assert!(t.contains("last full pass 2 h ago"), "{t}");
        assert!(t.contains("3 passes since start"), "{t}");
        let fresh = serde_json::json!({"pass_running": true, "pass_bytes_total": 0});
        let t = scrub_text(&fresh, now);
        assert!(
            t.starts_with("pass 0 % done") && t.contains("no full pass yet"),
            "{t}"
        );
        assert!(scrub_text(&serde_json::json!({}), now).starts_with("idle"));
    }
}
