//! The manager: the control plane of the pipeline.
//!
//! It owns the catalog database ([`db`]), accepts uploads through the JSON
//! API and the web pages ([`api`], [`web`], [`auth`]), runs the ingest
//! pipeline ([`pipeline`]: probe and transcode in-process with ffmpeg-next
//! ([`media`]), seal, push to view nodes ([`nodes`])), and answers media URLs
//! ([`redirect`]) by sending each viewer to a node holding a verified copy.
//! The reconciler ([`reconcile`]) compares the nodes' inventories with the
//! catalog and has lost or quarantined copies repaired (docs/mirrors.md).
//! Viewers' bytes never pass through it: nodes serve them, and keep serving
//! valid tokens while the manager is down.

mod account;
pub mod api;
pub mod auth;
pub mod backup;
pub mod config;
pub mod db;
pub mod domain;
mod error;
pub mod geo;
pub mod ledger;
/// The media crate, as `manager::media` (probe, limits, transcode, poster).
pub use ::media;
pub mod nodecall;
pub mod nodes;
pub mod pipeline;
pub mod prices;
pub mod reconcile;
mod redirect;
mod telemetry;
pub mod terminal;
mod web;

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post},
    Json, Router,
};
use tokio::net::TcpListener;

pub use config::Config;
pub use error::ApiError;
pub use shared::runtime::init_tracing;

pub struct AppState {
    pub cfg: Config,
    pub db: db::Db,
    pub nodes: nodes::Nodes,
    pub master: shared::MasterKey,
    pub signer: shared::TokenSigner,
    /// Wakes the pipeline when an upload lands, instead of waiting for its poll.
    pub wake: tokio::sync::Notify,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// `cfg.public_url`, or `http://<bound address>` when that is empty.
    pub public_url: String,
    pub secure_cookies: bool,
    /// Verified against when a login names no account, so a failed login
    /// costs the same time whether or not the email exists.
    pub dummy_hash: String,
    /// The GeoIP database, when configured.
    pub geo: Option<geo::GeoDb>,
    /// What the media-URL redirector knows of each movie, briefly cached.
    pub playable: redirect::PlayableCache,
    /// Media-URL tokens already verified (see [`redirect::TokenCache`]).
    pub tokens: redirect::TokenCache,
    /// Log-in and sign-up rate limits (see [`account::Limiter`]).
    pub limits: account::Limiter,
    /// Bounds concurrent password hashing ([`auth::MAX_PASSWORD_CHECKS`]).
    pub password_checks: Arc<tokio::sync::Semaphore>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub async fn new(cfg: Config, public_url: String) -> anyhow::Result<Self> {
        for dir in [
            cfg.data_dir.clone(),
            cfg.staging_dir(),
            cfg.outbox_dir(),
            cfg.poster_dir(),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| {
                anyhow::anyhow!(
                    "configuration field `data_dir`: cannot create {}: {e}",
                    dir.display()
                )
            })?;
        }
        // Partial uploads never committed: nothing refers to them.
        for entry in std::fs::read_dir(cfg.staging_dir())?.flatten() {
            if entry
                .path()
                .extension()
                .is_some_and(|e| e == "upload" || e == "part")
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let db = db::open(&cfg.database_url).await.map_err(|e| {
            anyhow::anyhow!("configuration field `database_url`: cannot open the database: {e:#}")
        })?;
        let master = shared::MasterKey::from_hex(cfg.master_key_id, cfg.master_key.expose())?;
        let signer = shared::TokenSigner::from_seed_hex(cfg.token_signing_key.expose())?;
        let nodes = nodes::Nodes::new(&cfg.nodes, &cfg.node_ca_cert)?;
        let geo = if cfg.geoip_db.as_os_str().is_empty() {
            tracing::warn!("no geoip_db configured: every viewer gets the fallback node order");
            None
        } else {
            Some(
                geo::GeoDb::open(&cfg.geoip_db)
                    .map_err(|e| anyhow::anyhow!("configuration field `geoip_db`: {e:#}"))?,
            )
        };
        media::init().map_err(|e| anyhow::anyhow!("cannot initialise ffmpeg: {e}"))?;
        Ok(Self {
            secure_cookies: public_url.starts_with("https://"),
            public_url: public_url.trim_end_matches('/').to_string(),
            dummy_hash: auth::hash_password(&auth::random_token())?,
            cfg,
            db,
            nodes,
            master,
            signer,
            wake: tokio::sync::Notify::new(),
            metrics: shared::runtime::metrics_handle(),
            geo,
            playable: redirect::PlayableCache::default(),
            tokens: redirect::TokenCache::default(),
            limits: account::Limiter::default(),
            password_checks: Arc::new(tokio::sync::Semaphore::new(auth::MAX_PASSWORD_CHECKS)),
        })
    }
}

pub fn build_router(state: SharedState) -> Router {
    Router::new()
        .route("/", get(web::index))
        .route("/login", get(web::login_form).post(web::login))
        .route("/logout", post(web::logout))
        .route("/upload", get(web::upload_form))
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
        .route("/media/{file}", get(redirect::media_without_token))
        .route("/media/{token}/{file}", get(redirect::media))
        .route("/media/g/{grant}/{file}", get(redirect::media_by_grant))
        .route("/signup", get(account::signup_form).post(account::signup))
        .route("/account", get(account::account_page))
        .route("/account/export", get(account::export))
        .route("/account/link-code", post(account::new_link_code))
        .route("/account/grants", post(account::grant_form))
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
        .route(
            "/api/v1/terminal/buy",
            post(terminal::buy).layer(DefaultBodyLimit::max(4096)),
        )
        .route(
            "/api/v1/terminal/link",
            post(terminal::link).layer(DefaultBodyLimit::max(4096)),
        )
        .merge(node_routes(state.clone()))
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

/// What view nodes call, signed by them; our answers carry a MAC over
/// their request, status and body (`shared::nodeauth`), so a node can tell
/// them from ones made up on the path.
fn node_routes(state: SharedState) -> Router<SharedState> {
    Router::new()
        .route(
            "/internal/v1/nodes/{name}/events",
            post(reconcile::node_events).layer(DefaultBodyLimit::max(64 * 1024)),
        )
        .route(
            "/internal/v1/nodes/{name}/paid-epochs",
            get(prices::paid_epochs_for_node),
        )
        .route(
            "/internal/v1/nodes/{name}/journal",
            post(ledger::journal).layer(DefaultBodyLimit::max(1024 * 1024)),
        )
        .layer(axum::middleware::from_fn_with_state(
            state,
            mac_node_answers,
        ))
}

async fn mac_node_answers(
    State(st): State<SharedState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let auth = req
        .headers()
        .get(shared::AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let resp = next.run(req).await;
    let Some(auth) = auth else { return resp };
    // Refusals of the signature itself get no MAC (it was made up).
    if resp.status() == StatusCode::UNAUTHORIZED {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // Our answers here are small JSON (the paid list is the largest).
    let bytes = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::Internal(anyhow::anyhow!("answer to a node unreadable: {e}"))
                .into_response()
        }
    };
    if let Some(mac) = st.nodes.answer_mac(&auth, parts.status.as_u16(), &bytes) {
        if let Ok(v) = axum::http::HeaderValue::from_str(&mac) {
            parts.headers.insert(shared::ANSWER_MAC_HEADER, v);
        }
    }
    axum::response::Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// Health means working: the database takes a write, the staging disk takes
/// a file; both are read back and removed.
async fn healthz(State(st): State<SharedState>) -> (StatusCode, Json<serde_json::Value>) {
    let db = db::health_check(&st.db).await;
    let disk = async {
        let p = st
            .cfg
            .staging_dir()
            .join(format!("health.{}.part", uuid::Uuid::new_v4()));
        let probe = uuid::Uuid::new_v4().to_string();
        tokio::fs::write(&p, &probe).await?;
        let back = tokio::fs::read_to_string(&p).await;
        tokio::fs::remove_file(&p).await?;
        anyhow::ensure!(back? == probe, "read back differs");
        Ok::<(), anyhow::Error>(())
    }
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
    let show = |r: &anyhow::Result<()>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{e:#}"),
    };
    if !ok {
        tracing::error!(db = %show(&db), storage = %show(&disk), "health check failed");
    }
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "failing" },
        "version": env!("CARGO_PKG_VERSION"),
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

/// Serves until `shutdown` resolves; requests in flight then get
/// `shutdown_grace_secs` to finish. The pipeline and node monitor stop too.
pub async fn run(
    listener: TcpListener,
    state: SharedState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(pipeline::run(state.clone(), stop_rx.clone()));
    let monitor = tokio::spawn(
        state
            .nodes
            .clone()
            .monitor(Duration::from_secs(5), stop_rx.clone()),
    );
    let reconciler = tokio::spawn(reconcile::run(state.clone(), stop_rx.clone()));
    let backups = tokio::spawn(backup::run(state.clone(), stop_rx.clone()));
    let refunds = tokio::spawn(ledger::run(state.clone(), stop_rx.clone()));
    let grace = Duration::from_secs(state.cfg.shutdown_grace_secs);
    let app = build_router(state);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = tx.send(());
    });
    let stop_tx2 = stop_tx.clone();
    tokio::select! {
        r = server => r?,
        _ = async {
            let _ = rx.await;
            let _ = stop_tx2.send(true);
            tokio::time::sleep(grace).await;
        } => tracing::warn!("requests still in flight after the grace period; stopping anyway"),
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(grace, worker).await;
    monitor.abort();
    reconciler.abort();
    backups.abort();
    refunds.abort();
    Ok(())
}

/// Binary entry point: bind, announce, serve until SIGTERM or Ctrl-C.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
        anyhow::anyhow!(
            "configuration field `listen`: cannot bind {}: {e}",
            cfg.listen
        )
    })?;
    let addr = listener.local_addr()?;
    let public_url = if cfg.public_url.is_empty() {
        format!("http://{addr}")
    } else {
        cfg.public_url.clone()
    };
    let state = Arc::new(AppState::new(cfg, public_url).await?);
    tracing::info!(%addr, url = %state.public_url, version = env!("CARGO_PKG_VERSION"), "manager listening");
    println!("LISTENING http://{addr}");
    run(listener, state, shared::runtime::shutdown_signal()).await?;
    tracing::info!("manager stopped");
    Ok(())
}
