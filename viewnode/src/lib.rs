//! The view node: the data plane of the pipeline.
//!
//! A node stores sealed blobs pushed by the manager ([`store`]), re-hashing
//! every byte before it commits, and serves viewers decrypted byte ranges of
//! a movie when they present a playback token the manager signed ([`play`]).
//! It holds only the manager's *public* token key, so it can check tokens
//! without calling the manager (playback survives a manager outage) but can
//! never mint one. Manager-to-node calls ([`internal`]) are HMAC-signed with a
//! per-node secret.
//!
//! Layout: `config` (typed config), `store` (durable create-only blob store),
//! `play` (viewer-facing ranges), `internal` (manager-facing push, fetch,
//! delete, inventory), `scrub` (scheduled re-hashing, quarantine reports),
//! `error` (the one HTTP error mapping), `telemetry` (logs, metrics),
//! `backups` (the manager's sealed database backups, kept apart from blobs).

mod backups;
mod config;
mod error;
mod internal;
mod journal;
mod play;
mod playcache;
mod scrub;
pub mod store;
mod telemetry;

use std::{sync::Arc, time::Duration};

use axum::{routing::get, Router};
use tokio::net::TcpListener;

pub use config::Config;
pub use error::NodeError;
pub use shared::runtime::init_tracing;

/// Everything a request handler needs, built once at start.
pub struct AppState {
    pub cfg: Config,
    pub store: store::BlobStore,
    pub master: shared::MasterKey,
    pub verifier: shared::TokenVerifier,
    pub manager_secret: Vec<u8>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Scrub progress, for `/metrics` and the inventory.
    pub scrub: scrub::Status,
    /// For the node's own calls to the manager (quarantine reports).
    pub http: reqwest::Client,
    /// What was served under paid grants, for the manager ([`journal`]).
    pub journal: Arc<journal::Journal>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// `POST {manager_url}/internal/v1/nodes/{name}/{what}` with a JSON
    /// body, signed with this node's shared secret under key id = its name
    /// (how the manager knows which node speaks). Quarantine reports and
    /// the view journal both travel this way.
    pub async fn post_to_manager(
        &self,
        what: &str,
        body: Vec<u8>,
        timeout: std::time::Duration,
    ) -> reqwest::Result<reqwest::Response> {
        let path = format!("/internal/v1/nodes/{}/{what}", self.cfg.name);
        let now = shared::runtime::unix_now();
        let auth = shared::sign_request(
            &self.manager_secret,
            &self.cfg.name,
            "POST",
            &path,
            now,
            &shared::content_sha256_hex(&body),
        );
        self.http
            .post(format!(
                "{}{path}",
                self.cfg.manager_url.trim_end_matches('/')
            ))
            .header(shared::AUTH_HEADER, auth)
            .header(shared::DATE_HEADER, now.to_string())
            .header("content-type", "application/json")
            .timeout(timeout)
            .body(body)
            .send()
            .await
    }

    pub fn new(cfg: Config) -> anyhow::Result<Self> {
        // The manager's sealed database backups: beside the blobs, never among them.
        backups::init(&cfg.storage_dir).map_err(|e| {
            anyhow::anyhow!(
                "configuration field `storage_dir`: cannot open {}/backups: {e}",
                cfg.storage_dir.display()
            )
        })?;
        let store = store::BlobStore::open(&cfg.storage_dir).map_err(|e| {
            anyhow::anyhow!(
                "configuration field `storage_dir`: cannot open {}: {e}",
                cfg.storage_dir.display()
            )
        })?;
        let master = shared::MasterKey::from_hex(cfg.master_key_id, cfg.master_key.expose())
            .map_err(|e| anyhow::anyhow!("configuration field `master_key`: {e}"))?;
        let verifier = shared::TokenVerifier::from_public_hex(&cfg.token_public_key)
            .map_err(|e| anyhow::anyhow!("configuration field `token_public_key`: {e}"))?;
        let journal = journal::Journal::open(&cfg.storage_dir).map_err(|e| {
            anyhow::anyhow!(
                "configuration field `storage_dir`: cannot open {}/journal: {e}",
                cfg.storage_dir.display()
            )
        })?;
        let manager_secret = hex::decode(cfg.manager_secret.expose())
            .map_err(|e| anyhow::anyhow!("configuration field `manager_secret`: {e}"))?;
        Ok(Self {
            cfg,
            store,
            master,
            verifier,
            manager_secret,
            metrics: shared::runtime::metrics_handle(),
            scrub: Default::default(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()?,
            journal: Arc::new(journal),
        })
    }
}

pub fn build_router(state: SharedState) -> Router {
    Router::new()
        .route("/healthz", get(internal::healthz))
        .route("/metrics", get(telemetry::metrics))
        .route("/play/{token}/{name}", get(play::play))
        .merge(internal::router())
        .merge(backups::router())
        .layer(axum::middleware::from_fn(telemetry::access_log))
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves, then lets requests in
/// flight finish (bounded by `shutdown_grace_secs`).
pub async fn run(
    listener: TcpListener,
    state: SharedState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = Duration::from_secs(state.cfg.shutdown_grace_secs);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let scrubber = tokio::spawn(scrub::run(state.clone(), stop_rx.clone()));
    let forwarder = tokio::spawn(journal::forward(state.clone(), stop_rx));
    let app = build_router(state);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = tx.send(());
    });
    tokio::select! {
        r = server => r?,
        _ = async {
            let _ = rx.await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!("requests still in flight after the grace period; stopping anyway"),
    }
    let _ = stop_tx.send(true);
    scrubber.abort();
    forwarder.abort();
    Ok(())
}

/// Binary entry point: bind, announce, serve until SIGTERM or Ctrl-C.
pub async fn serve(mut cfg: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
        anyhow::anyhow!(
            "configuration field `listen`: cannot bind {}: {e}",
            cfg.listen
        )
    })?;
    let addr = listener.local_addr()?;
    if cfg.public_url.is_empty() {
        cfg.public_url = format!("http://{addr}");
    }
    let state = Arc::new(AppState::new(cfg)?);
    tracing::info!(node = %state.cfg.name, %addr, version = env!("CARGO_PKG_VERSION"), "view node listening");
    // One machine-readable line on stdout so scripts and tests can find a
    // port-0 listener without parsing logs.
    println!("LISTENING http://{addr}");
    run(listener, state, shared::runtime::shutdown_signal()).await?;
    tracing::info!("view node stopped");
    Ok(())
}
