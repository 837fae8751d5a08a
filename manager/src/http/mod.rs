//! The HTTP layer: routes, extractors, pages, and the one mapping from
//! errors to status codes (`error.rs`). Handlers parse, call a service with
//! the parts of [`crate::AppState`] it needs, and render; nothing else in the
//! manager knows a status code.

pub mod account;
pub mod admin;
pub mod admin_library;
pub mod api;
pub mod error;
pub mod media;
pub mod nodes;
pub mod runners;
pub mod session;
pub mod status;
pub mod telemetry;
pub mod terminal;
pub mod tus;
pub mod web;

use axum::{
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    routing::{get, post},
    Json, Router,
};

use crate::{app::SharedState, backup};

pub fn build_router(state: SharedState) -> Router {
    Router::new()
        .route("/", get(web::index))
        .route("/login", get(web::login_form).post(web::login))
        .route("/logout", post(web::logout))
        .route("/upload", get(web::upload_form))
        .route("/upload/{id}/discard", post(web::discard_upload))
        .route("/static/tus-js-client-4.3.1.min.js", get(web::tus_client))
        .route("/assets/{id}", get(web::asset_page))
        .route("/posters/{file}", get(web::poster))
        .route("/terminals", get(web::terminals).post(web::create_terminal))
        .route("/terminals/{id}/delete", post(web::delete_terminal))
        .route("/docs/terminal", get(web::terminal_doc))
        .route(
            "/api/v1/terminal/play",
            post(terminal::play).layer(DefaultBodyLimit::max(4096)),
        )
        .route(
            "/api/v1/uploads",
            // The handler enforces `max_upload_bytes` itself while streaming.
            post(api::upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/assets", get(api::list_assets))
        .route("/api/v1/assets/{id}", get(api::get_asset))
        .route("/api/v1/assets/{id}/cancel", post(api::cancel))
        .route("/api/v1/assets/{id}/retry", post(api::retry))
        .route("/assets/{id}/cancel", post(web::cancel))
        .route("/media/{file}", get(media::media_without_token))
        .route("/media/{token}/{file}", get(media::media))
        .route("/media/g/{grant}/{file}", get(media::media_by_grant))
        .route("/signup", get(account::signup_form).post(account::signup))
        .route("/account", get(account::account_page))
        .route("/account/export", get(account::export))
        .route("/account/link-code", post(account::new_link_code))
        .route("/account/avatars/unlink", post(account::unlink_avatar))
        .route(
            "/account/approvals",
            get(account::approvals_page).post(account::approve_form),
        )
        .route("/account/approvals/revoke", post(account::revoke_form))
        .route("/assets/{id}/price", post(account::set_price_form))
        .route("/assets/{id}/buy", post(account::buy_form))
        .route("/api/v1/account", get(account::account_api))
        .route(
            "/api/v1/assets/{id}/price",
            axum::routing::put(account::set_price_api),
        )
        .route("/api/v1/assets/{id}/purchase", post(account::purchase_api))
        .route("/api/v1/grants/{id}", get(account::grant_status))
        .route("/api/v1/admin/grants", post(account::grant_api))
        .route("/admin", get(admin::overview_page))
        .route("/admin/accounts", get(admin::accounts))
        .route("/admin/accounts/grant", post(admin::grant))
        .route("/admin/accounts/{id}", get(admin::account))
        .route("/admin/accounts/{id}/{action}", post(admin::account_action))
        .route("/admin/movies", get(admin_library::movies))
        .route("/admin/movies/{id}", get(admin_library::movie))
        .route(
            "/admin/movies/{id}/{action}",
            post(admin_library::movie_action),
        )
        .route("/admin/backups", get(admin_library::backups))
        .route(
            "/admin/backups/{action}",
            post(admin_library::backup_action),
        )
        .route("/admin/audit", get(admin::audit))
        .route("/admin/jobs", get(admin::jobs))
        .route("/admin/jobs/{id}/{action}", post(admin::job_action))
        .route("/admin/transcoders/token", post(admin::transcoder_token))
        .route(
            "/admin/transcoders/{name}/revoke",
            post(admin::transcoder_revoke),
        )
        .route("/admin/alerts", get(status::admin_alerts))
        .route("/admin/alerts/test", post(status::test_channel))
        .route(
            "/admin/incidents",
            get(status::admin_incidents).post(status::open_incident),
        )
        .route(
            "/admin/incidents/{id}/update",
            post(status::update_incident),
        )
        .route("/admin/nodes", get(status::admin_nodes))
        .route("/admin/nodes/{name}/{action}", post(status::node_action))
        .route("/status", get(status::page))
        .route("/status/feed.atom", get(status::atom))
        .route("/status/feed.json", get(status::json_feed))
        .route("/status/badge.svg", get(status::badge))
        .route("/api/v1/admin/checks", get(status::checks_api))
        .route("/api/v1/admin/alerts/test", post(status::test_channel_api))
        .route("/api/v1/admin/workers", get(admin::workers))
        .route("/api/v1/admin/alerts", get(admin::alerts))
        .route(
            "/api/v1/terminal/buy",
            post(terminal::buy).layer(DefaultBodyLimit::max(4096)),
        )
        .route(
            "/api/v1/terminal/link",
            post(terminal::link).layer(DefaultBodyLimit::max(4096)),
        )
        .merge(nodes::routes(state.clone()))
        .merge(runners::routes())
        .merge(tus::routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(telemetry::metrics))
        .layer(axum::middleware::from_fn(no_framing))
        .layer(axum::middleware::from_fn(telemetry::access_log))
        .with_state(state)
}

/// No page of ours may be shown inside another site's frame: one framed
/// click on a pre-filled form (approving a screen's owner, buying a view)
/// would otherwise be the attacker's click.
async fn no_framing(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        axum::http::header::X_FRAME_OPTIONS,
        axum::http::HeaderValue::from_static("DENY"),
    );
    h.insert(
        axum::http::header::CONTENT_SECURITY_POLICY,
        axum::http::HeaderValue::from_static("frame-ancestors 'none'"),
    );
    resp
}

/// Health means working: the database takes a write, the staging disk takes
/// a file; both are read back and removed.
async fn healthz(State(st): State<SharedState>) -> (StatusCode, Json<serde_json::Value>) {
    let (db2, staging) = (st.db.clone(), st.cfg.staging_dir());
    let (db, disk) = st
        .health
        .get_or(
            async move {
                (
                    db2.health_check().await.map_err(|e| format!("{e:#}")),
                    crate::monitor::staging_check(&staging).await,
                )
            },
            || {
                let slow = "the database and staging checks took over 5 s".to_string();
                (Err(slow.clone()), Err(slow))
            },
        )
        .await;
    let nodes: serde_json::Map<String, serde_json::Value> = st
        .nodes
        .list
        .iter()
        .map(|n| {
            (
                n.cfg.name.clone(),
                serde_json::Value::from(if n.is_healthy() { "ok" } else { "failing" }),
            )
        })
        .collect();
    let ok = db.is_ok() && disk.is_ok();
    let show = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e.clone(),
    };
    if !ok {
        tracing::error!(db = %show(&db), storage = %show(&disk), "health check failed");
    }
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "failing" },
        "version": shared::protocol::build_version(),
        // Whether the background work runs here (crate::leader).
        "role": st.role.name(),
        "checks": { "database": show(&db), "storage": show(&disk) },
        "nodes": nodes,
        // Reported, not failed on: an old backup is an alert, not an outage.
        "backup": backup::health(&st.cfg),
    });
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(body),
    )
}
