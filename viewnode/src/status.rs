//! The public status page, served by the node itself so that it stays up
//! when the manager is down (docs/operations.md, "The status page"). The
//! manager pushes its rendered page here (`PUT /internal/v1/status`, signed
//! like every manager call) about once a minute; the node keeps the newest
//! on disk and answers `GET /status` with it, stamped with its age, and
//! with a banner once no copy has arrived for `status_stale_secs`: then
//! the manager cannot reach us, or is down, and the page says so rather
//! than show a stale "all operational".

use std::{path::PathBuf, sync::RwLock};

use axum::{
    body::Bytes,
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{Html, IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};

use crate::{error::NodeError, SharedState};

/// Largest page taken (a page with 90 days of bars is ~60 KiB).
pub const MAX_PAGE: usize = 1 << 20;
/// Where the manager's rendered page leaves room for our stamp.
const STAMP_MARK: &str = "<!--node-stamp-->";

#[derive(Clone, Serialize, Deserialize)]
struct Copy {
    /// When the manager rendered it (its clock).
    generated_at: i64,
    /// When we took it (ours).
    received_at: i64,
    html: String,
}

/// The newest copy, in memory and in `<storage_dir>/status-page.json`.
pub struct StatusCopy {
    path: PathBuf,
    copy: RwLock<Option<Copy>>,
    /// One push at a time: the file and memory then hold the same copy.
    write: tokio::sync::Mutex<()>,
}

impl StatusCopy {
    /// Loads the kept copy; none (or an unreadable one) is "no copy yet".
    pub fn open(storage_dir: &std::path::Path) -> StatusCopy {
        let path = storage_dir.join("status-page.json");
        let copy = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        StatusCopy {
            path,
            copy: RwLock::new(copy),
            write: tokio::sync::Mutex::new(()),
        }
    }
}

#[derive(Deserialize)]
struct Pushed {
    generated_at: i64,
    html: String,
}

/// `PUT /internal/v1/status`: the manager's rendered page.
pub async fn put(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, NodeError> {
    crate::internal::authenticate(
        &st,
        &headers,
        "PUT",
        "/internal/v1/status",
        &shared::content_sha256_hex(&body),
    )?;
    let p: Pushed = serde_json::from_slice(&body)
        .map_err(|e| NodeError::BadRequest(format!("not a status page: {e}")))?;
    let copy = Copy {
        generated_at: p.generated_at,
        received_at: shared::runtime::unix_now(),
        html: p.html,
    };
    // The newest push wins, whatever its render time says: the manager's
    // clock may step back (NTP, a restore on another machine), and each
    // push is also what tells us the manager reaches us.
    let _one = st.status.write.lock().await;
    let bytes = serde_json::to_vec(&copy).map_err(|e| NodeError::Storage(e.to_string()))?;
    let path = st.status.path.clone();
    tokio::task::spawn_blocking(move || shared::runtime::write_file_durably(&path, &bytes))
        .await
        .map_err(|e| NodeError::Storage(e.to_string()))?
        .map_err(|e| NodeError::Storage(format!("status page not kept: {e}")))?;
    *st.status.copy.write().expect("not poisoned") = Some(copy);
    Ok(Json(serde_json::json!({ "kept": "this" })))
}

/// `GET /status`: the newest copy with its age, and a banner when the
/// manager has been silent too long.
pub async fn get(State(st): State<SharedState>) -> Response {
    let copy = st.status.copy.read().expect("not poisoned").clone();
    let Some(c) = copy else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "60")],
            Html("<!doctype html><title>Status</title><p>This node has no copy of the status page yet; try the manager's site.</p>"),
        )
            .into_response();
    };
    let now = shared::runtime::unix_now();
    let silent = now - c.received_at;
    let mut stamp = format!(
        "<p class=\"stamp\" id=\"node-stamp\" data-age=\"{age}\">This copy is served by node {node}; the manager made it {age_words} ago.</p>",
        age = (now - c.generated_at).max(0),
        node = html_escape(&st.cfg.name),
        age_words = words((now - c.generated_at).max(0)),
    );
    if silent > st.cfg.status_stale_secs as i64 {
        stamp = format!(
            "<p class=\"stale\" id=\"manager-unreachable\">The manager has not been reachable for {} (as seen from node {}). Movies already playing keep playing; uploads, purchases and new media URLs may fail. The states below are from before.</p>{stamp}",
            words(silent),
            html_escape(&st.cfg.name),
        );
    }
    let html = c.html.replacen(STAMP_MARK, &stamp, 1);
    ([(header::CACHE_CONTROL, "no-cache")], Html(html)).into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn words(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} seconds"),
        s if s < 7200 => format!("{} minutes", s / 60),
        s if s < 172_800 => format!("{} hours", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}
