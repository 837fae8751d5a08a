//! The admin area's movies-and-copies and backups pages: what is stored
//! where, in what state, and the operator's actions on it (repair now,
//! re-verify, withdraw and reinstate; back up now, verify copies). Every
//! action goes through `crate::console` or `crate::backup` and is audited.

use std::time::Duration;

use askama::Template;
use axum::{
    extract::{Path, Query, State},
    response::Response,
    Form,
};
use serde::Deserialize;

use super::{
    admin::operator_page,
    error::ApiError,
    session::{Caller, MaybeCaller},
    web::{render, PageError},
};
use crate::{
    backup::{self, format_utc},
    catalog::{self, AssetFilter},
    console::{self, ConsoleError},
    domain::AssetState,
    SharedState,
};

/// Longest search an operator types; longer is cut, not refused.
const MAX_SEARCH: usize = 254;
/// Rows a list shows; a narrower search finds the rest.
const LIST_LIMIT: i64 = 200;

struct MovieLine {
    id: String,
    title: String,
    owner: String,
    state: AssetState,
    copies: String,
    short: bool,
    size: String,
    since: String,
}

#[derive(Template)]
#[template(path = "admin_movies.html")]
struct MoviesPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    q: String,
    only: String,
    /// Every state, and whether it is the one filtered on.
    states: Vec<(&'static str, bool)>,
    movies: Vec<MovieLine>,
    limit: usize,
}

#[derive(Deserialize)]
pub struct MovieSearch {
    #[serde(default)]
    q: String,
    #[serde(default)]
    state: String,
    /// `under_replicated` or empty.
    #[serde(default)]
    only: String,
}

fn parse_state(s: &str) -> Option<AssetState> {
    AssetState::ALL.into_iter().find(|x| x.as_str() == s)
}

/// `GET /admin/movies?q=&state=&only=under_replicated`: search and filter.
pub async fn movies(
    State(st): State<SharedState>,
    c: MaybeCaller,
    Query(s): Query<MovieSearch>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    let q: String = s.q.trim().chars().take(MAX_SEARCH).collect();
    let state = parse_state(&s.state);
    let under = s.only == "under_replicated";
    let min = st.cfg.min_replicas as i64;
    let movies = st
        .db
        .search_assets(
            &AssetFilter {
                search: &q,
                state,
                under_replicated_below: under.then_some(min),
            },
            LIST_LIMIT,
        )
        .await?
        .into_iter()
        .map(|a| MovieLine {
            short: a.state == AssetState::Published && a.verified_copies < min,
            copies: format!("{} of {} verified", a.verified_copies, a.copies),
            size: a
                .sealed_len
                .map(|n| media::human_bytes(n.max(0) as u64))
                .unwrap_or_default(),
            since: format_utc(a.created_at),
            id: a.id,
            title: a.title,
            owner: a.owner_email,
            state: a.state,
        })
        .collect();
    Ok(render(&MoviesPage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        q,
        only: if under {
            "under_replicated".into()
        } else {
            String::new()
        },
        states: AssetState::ALL
            .iter()
            .map(|s| (s.as_str(), Some(*s) == state))
            .collect(),
        movies,
        limit: LIST_LIMIT as usize,
    }))
}

struct CopyLine {
    node: String,
    state: String,
    attempts: i64,
    verified: String,
    error: String,
}

#[derive(Template)]
#[template(path = "admin_movie.html")]
struct MoviePage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    m: catalog::AssetLine,
    size: String,
    withdrawn: String,
    copies: Vec<CopyLine>,
    error: String,
    message: Option<String>,
    failed: bool,
}

async fn movie_page(
    st: &SharedState,
    c: &Caller,
    id: &str,
    message: Option<(String, bool)>,
) -> Result<Response, PageError> {
    let Some(m) = st.db.asset_line(id).await? else {
        return Err(PageError(ApiError::NotFound("asset")));
    };
    let a = st.db.asset(id).await?;
    let now = catalog::now();
    let copies = st
        .db
        .replicas(id)
        .await?
        .into_iter()
        .map(|r| CopyLine {
            node: r.node,
            state: r.state.to_string(),
            attempts: r.attempts,
            verified: r
                .verified_at
                .map(|t| {
                    format!(
                        "{} ({} ago)",
                        format_utc(t),
                        console::human_age((now - t).max(0))
                    )
                })
                .unwrap_or_else(|| "never".into()),
            error: r.last_error.unwrap_or_default(),
        })
        .collect();
    let (message, failed) = message.map_or((None, false), |(m, f)| (Some(m), f));
    let mut r = render(&MoviePage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        size: m
            .sealed_len
            .map(|n| media::human_bytes(n.max(0) as u64))
            .unwrap_or_default(),
        withdrawn: match (m.withdrawn_at, &m.withdrawn_reason) {
            (Some(t), Some(why)) => format!("since {}: {why}", format_utc(t)),
            _ => String::new(),
        },
        error: a
            .and_then(|a| match (a.error_code, a.error_message) {
                (Some(c), Some(m)) => Some(format!("{c}: {m}")),
                (Some(c), None) => Some(c),
                _ => None,
            })
            .unwrap_or_default(),
        m,
        copies,
        message,
        failed,
    });
    if failed {
        *r.status_mut() = axum::http::StatusCode::CONFLICT;
    }
    Ok(r)
}

/// `GET /admin/movies/{id}`: every copy's state, proof time and last error.
pub async fn movie(
    State(st): State<SharedState>,
    c: MaybeCaller,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    movie_page(&st, &c, &id, None).await
}

#[derive(Deserialize)]
pub struct MovieActionForm {
    csrf: String,
    #[serde(default)]
    reason: String,
}

/// How long the page waits for a re-verification before answering that it
/// goes on in the background (a big movie on a slow disk).
const REVERIFY_WAIT: Duration = Duration::from_secs(20);

/// `POST /admin/movies/{id}/{repair|reverify|withdraw|reinstate}`.
pub async fn movie_action(
    State(st): State<SharedState>,
    c: MaybeCaller,
    Path((id, action)): Path<(String, String)>,
    Form(f): Form<MovieActionForm>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    c.check_csrf(Some(&f.csrf))?;
    let r: Result<String, ConsoleError> = match action.as_str() {
        "repair" => console::repair_now(&*st.db, &c.user, &id).await.map(|n| {
            format!(
                "{n} waiting copies are due now; the replication loop takes them within seconds."
            )
        }),
        "reverify" => {
            let (db, nodes, user, id2) =
                (st.db.clone(), st.nodes.clone(), c.user.clone(), id.clone());
            let task =
                tokio::spawn(async move { console::reverify(&*db, &nodes, &user, &id2).await });
            match tokio::time::timeout(REVERIFY_WAIT, task).await {
                Ok(Ok(r)) => r.map(|v| {
                    let found: Vec<String> = v.iter().map(|x| format!("{}: {}", x.node, x.outcome)).collect();
                    format!("Re-verified: {}.", found.join("; "))
                }),
                Ok(Err(e)) => Err(ConsoleError::NotNow(format!("the re-verification failed: {e}"))),
                Err(_) => Ok("Still re-verifying (a big movie); the result goes to the audit log and the copies below.".into()),
            }
        }
        "withdraw" => console::withdraw(&*st.db, &c.user, &id, Some(&f.reason))
            .await
            .map(|()| {
                "Withdrawn: media URLs, purchases and listings refuse it now; its copies are kept."
                    .into()
            }),
        "reinstate" => console::withdraw(&*st.db, &c.user, &id, None)
            .await
            .map(|()| "Reinstated.".into()),
        _ => return Err(PageError(ApiError::NotFound("page"))),
    };
    if matches!(action.as_str(), "withdraw" | "reinstate") {
        // Media URLs read the movie afresh from here on.
        st.playable.forget(&id);
        if action == "reinstate" {
            // Withdrawn while still replicating, its copies may all have
            // landed meanwhile: nothing else would publish it now.
            let _ = st.db.publish_if_replicated(&id, st.cfg.min_replicas).await;
        }
    }
    let invalid = matches!(r, Err(ConsoleError::Invalid(_)));
    let message = match r {
        Ok(m) => (m, false),
        Err(ConsoleError::Db(e)) => return Err(PageError(ApiError::Internal(e.into()))),
        Err(ConsoleError::NoSuchMovie(_)) => return Err(PageError(ApiError::NotFound("asset"))),
        Err(e) => (format!("Not done: {e}"), true),
    };
    let mut page = movie_page(&st, &c, &id, Some(message)).await?;
    if invalid {
        *page.status_mut() = axum::http::StatusCode::BAD_REQUEST;
    }
    Ok(page)
}

// ---- backups -----------------------------------------------------------------------

struct BackupLine {
    name: String,
    when: String,
    age: String,
    size: String,
    verified: String,
    bad: bool,
}

struct NodeBackups {
    node: String,
    error: String,
    backups: Vec<BackupLine>,
}

#[derive(Template)]
#[template(path = "admin_backups.html")]
struct BackupsPage<'a> {
    user: Option<&'a str>,
    csrf: &'a str,
    local: Vec<BackupLine>,
    nodes: Vec<NodeBackups>,
    offsite: bool,
    run: Option<backup::ManualRun>,
    run_started: String,
    restore: String,
    message: Option<String>,
    failed: bool,
}

fn verified_text(
    checks: &std::collections::BTreeMap<String, backup::CopyCheck>,
    key: &str,
    fallback: Option<i64>,
    now: i64,
) -> (String, bool) {
    match checks.get(key) {
        Some(c) if c.ok => (
            format!("{} ago", console::human_age((now - c.at).max(0))),
            false,
        ),
        Some(c) => (
            format!(
                "FAILED {} ago: {}",
                console::human_age((now - c.at).max(0)),
                c.detail
            ),
            true,
        ),
        None => (
            fallback
                .map(|t| format!("when taken, {} ago", console::human_age((now - t).max(0))))
                .unwrap_or_else(|| "not yet".into()),
            false,
        ),
    }
}

async fn backups_page(
    st: &SharedState,
    c: &Caller,
    message: Option<(String, bool)>,
) -> Result<Response, PageError> {
    let dir = backup::backups_dir(&st.cfg);
    let now = catalog::now();
    let (local, checks) = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || (backup::list_local(&dir), backup::read_checks(&dir)))
            .await
            .map_err(|e| PageError(ApiError::Internal(e.into())))?
    };
    let local = local
        .into_iter()
        .map(|m| {
            let (verified, bad) =
                verified_text(&checks, &format!("local/{}", m.id), Some(m.created_at), now);
            BackupLine {
                when: format_utc(m.created_at),
                age: console::human_age((now - m.created_at).max(0)),
                size: media::human_bytes(m.size),
                name: m.id,
                verified,
                bad,
            }
        })
        .collect();
    let nodes = backup::node_listings(&st.cfg)
        .await
        .into_iter()
        .map(|(node, r)| match r {
            Ok(list) => NodeBackups {
                backups: list
                    .into_iter()
                    .map(|b| {
                        let t = backup::parse_remote_name(&b.name).map(|x| x.0).unwrap_or(0);
                        let (verified, bad) =
                            verified_text(&checks, &format!("{node}/{}", b.name), None, now);
                        BackupLine {
                            when: format_utc(t),
                            age: console::human_age((now - t).max(0)),
                            size: media::human_bytes(b.size),
                            name: b.name,
                            verified,
                            bad,
                        }
                    })
                    .collect(),
                node,
                error: String::new(),
            },
            Err(e) => NodeBackups {
                node,
                error: e,
                backups: Vec::new(),
            },
        })
        .collect();
    let urls: Vec<String> = st
        .cfg
        .backup
        .target_nodes(&st.cfg.nodes)
        .iter()
        .map(|n| format!("--node {}", n.url))
        .collect();
    let restore = format!(
        "SLMEDIA_RECOVERY_KEY=… manager backup restore {} --data-dir {} --write-config manager.toml",
        urls.join(" "),
        st.cfg.data_dir.display()
    );
    let run = backup::manual_run();
    let (message, failed) = message.map_or((None, false), |(m, f)| (Some(m), f));
    let mut r = render(&BackupsPage {
        user: Some(&c.user.email),
        csrf: c.csrf.as_deref().unwrap_or(""),
        local,
        nodes,
        offsite: !st.cfg.backup.recovery_key.is_empty(),
        run_started: run
            .as_ref()
            .map(|r| format_utc(r.started_at))
            .unwrap_or_default(),
        run,
        restore,
        message,
        failed,
    });
    if failed {
        *r.status_mut() = axum::http::StatusCode::CONFLICT;
    }
    Ok(r)
}

/// `GET /admin/backups`: local and node copies, verified when, the task
/// started from here, the restore command.
pub async fn backups(State(st): State<SharedState>, c: MaybeCaller) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    backups_page(&st, &c, None).await
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    csrf: String,
}

/// `POST /admin/backups/{now|verify}`: starts the task in the background
/// (one at a time), audited; the page shows how it goes.
pub async fn backup_action(
    State(st): State<SharedState>,
    c: MaybeCaller,
    Path(action): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, PageError> {
    let c = operator_page(c)?;
    c.check_csrf(Some(&f.csrf))?;
    let what = match action.as_str() {
        "now" => "backup",
        "verify" => "verify",
        _ => return Err(PageError(ApiError::NotFound("page"))),
    };
    let r = backup::start_manual(st.db.clone(), st.cfg.clone(), what, &c.user);
    let detail = match &r {
        Ok(()) => "started".to_string(),
        Err(running) => format!("refused: a {} task is running", running.what),
    };
    console::audit(
        &*st.db,
        &c.user,
        &format!("backup_{action}"),
        "backups",
        &detail,
    )
    .await;
    let message = match r {
        Ok(()) => (
            format!(
                "{} started; reload this page to follow it.",
                if what == "backup" {
                    "A backup"
                } else {
                    "Verification of every copy"
                }
            ),
            false,
        ),
        Err(running) => (
            format!(
                "Not started: the {} task started at {} is still running.",
                running.what,
                format_utc(running.started_at)
            ),
            true,
        ),
    };
    backups_page(&st, &c, Some(message)).await
}
