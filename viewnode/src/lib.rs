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
//! `backups` (the manager's sealed database backups, kept apart from blobs),
//! `prices` (paid movies' price epochs, so stale free tokens stop playing),
//! `tls` (the manager-facing TLS listener).

mod backups;
mod config;
mod error;
mod internal;
mod journal;
pub mod play;
mod playcache;
mod prices;
mod scrub;
mod status;
pub mod store;
mod telemetry;

use std::{sync::Arc, time::Duration};

use axum::{routing::get, Router};
use tokio::net::TcpListener;

pub use config::{Config, StorageConfig, StorageKind};
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
    /// Paid movies' price epochs, from the manager ([`prices`]).
    pub prices: prices::PaidEpochs,
    /// The manager's status page, served while the manager is down.
    pub status: status::StatusCopy,
    /// The store's listing as `/metrics` last took it.
    pub inventory: telemetry::InventoryCache,
    /// `/healthz`'s storage check, done at most every few seconds.
    pub health: shared::server::Recent<Result<(), String>>,
}

pub type SharedState = Arc<AppState>;

/// `/healthz` writes to the disk: concurrent and repeated calls within this
/// time share one check, so it is no free amplifier.
const HEALTH_TTL: Duration = Duration::from_secs(2);
/// A storage check that takes longer fails (a hung disk is unhealthy).
const HEALTH_LIMIT: Duration = Duration::from_secs(5);

/// An authenticated answer from the manager ([`AppState::call_manager`]).
pub struct ManagerAnswer {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
}

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
    ) -> anyhow::Result<ManagerAnswer> {
        self.call_manager("POST", what, body, timeout).await
    }

    /// [`post_to_manager`](Self::post_to_manager) with any method. The
    /// answer counts only if the manager MACed it for this very request
    /// (`shared::nodeauth`): otherwise someone on the path could answer
    /// "200" to a journal delivery and the events would be dropped here.
    pub async fn call_manager(
        &self,
        method: &str,
        what: &str,
        body: Vec<u8>,
        timeout: std::time::Duration,
    ) -> anyhow::Result<ManagerAnswer> {
        let path = format!("/internal/v1/nodes/{}/{what}", self.cfg.name);
        let now = shared::runtime::unix_now();
        let auth = shared::sign_request(
            &self.manager_secret,
            &self.cfg.name,
            method,
            &path,
            now,
            &shared::content_sha256_hex(&body),
        );
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let resp = self
            .http
            .request(
                method,
                format!("{}{path}", self.cfg.manager_url.trim_end_matches('/')),
            )
            .header(shared::AUTH_HEADER, &auth)
            .header(shared::DATE_HEADER, now.to_string())
            .header("content-type", "application/json")
            .timeout(timeout)
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await?;
        let mac = headers
            .get(shared::ANSWER_MAC_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !shared::verify_answer_mac(&self.manager_secret, &auth, status.as_u16(), &body, mac) {
            metrics::counter!("viewnode_manager_answers_unauthentic_total").increment(1);
            anyhow::bail!(
                "the answer ({status}) does not carry the manager's MAC for this request \
                 (code answer_unauthentic): someone on the path, or a manager with another secret"
            );
        }
        Ok(ManagerAnswer {
            status,
            headers,
            body,
        })
    }

    pub fn new(cfg: Config) -> anyhow::Result<Self> {
        let store = store::BlobStore::open(&cfg.storage_dir, &cfg.storage).map_err(|e| {
            anyhow::anyhow!(
                "configuration field `storage_dir`/`[storage]`: cannot open {} ({}): {e}",
                cfg.storage_dir.display(),
                match cfg.storage.kind {
                    config::StorageKind::Local => "blobs in this folder",
                    config::StorageKind::S3 => "blobs in a bucket",
                }
            )
        })?;
        let master = shared::MasterKey::from_hex(cfg.master_key_id, cfg.master_key.expose())
            .map_err(|e| anyhow::anyhow!("configuration field `master_key`: {e}"))?;
        let verifier = shared::TokenVerifier::from_public_hex(&cfg.token_public_key)
            .map_err(|e| anyhow::anyhow!("configuration field `token_public_key`: {e}"))?;
        let journal = journal::Journal::open(&cfg.storage_dir)
            .map_err(|e| {
                anyhow::anyhow!(
                    "configuration field `storage_dir`: cannot open {}/journal: {e}",
                    cfg.storage_dir.display()
                )
            })?
            .limit_unwritten(cfg.journal_max_unwritten);
        let manager_secret = hex::decode(cfg.manager_secret.expose())
            .map_err(|e| anyhow::anyhow!("configuration field `manager_secret`: {e}"))?;
        let prices = prices::PaidEpochs::open(&cfg.storage_dir);
        let status = status::StatusCopy::open(&cfg.storage_dir);
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
            prices,
            status,
            journal: Arc::new(journal),
            inventory: Default::default(),
            health: shared::server::Recent::new(HEALTH_TTL, HEALTH_LIMIT),
        })
    }
}

/// Every route: playback, health, metrics and the manager's signed calls.
pub fn build_router(state: SharedState) -> Router {
    let signed =
        internal::router()
            .merge(backups::router())
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                internal::mac_answers,
            ));
    viewer_routes()
        .merge(signed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            telemetry::access_log,
        ))
        .with_state(state)
}

/// What viewers (and probes) need; with `tls_listen` set, the only routes
/// on the plain listener.
fn viewer_router(state: SharedState) -> Router {
    viewer_routes()
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            telemetry::access_log,
        ))
        .with_state(state)
}

fn viewer_routes() -> Router<SharedState> {
    Router::new()
        .route("/healthz", get(internal::healthz))
        .route("/metrics", get(telemetry::metrics))
        .route("/play/{token}/{name}", get(play::play))
        .route("/status", get(status::get))
}

/// The TLS listener for the manager's calls and its rustls configuration.
pub type TlsListener = (TcpListener, Arc<rustls::ServerConfig>);

/// Serves on `listener` until `shutdown` resolves, then lets requests in
/// flight finish (bounded by `shutdown_grace_secs`).
pub async fn run(
    listener: TcpListener,
    state: SharedState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with_tls(listener, None, state, shutdown).await
}

/// How often changed verification times go to `verified.json`, at most.
/// The file is the whole map, so past 10,000 copies the interval grows
/// with the map (one second per 2,000 copies, [`verified_flush_every`]): at
/// a fixed interval a scrub pass would rewrite it a number of times that
/// grows with the copies held, each rewrite as large as the copies held,
/// and its writes would grow with their square. This way they stay near
/// 2,000 entries (~160 KB) a second whatever the count. A crash loses at
/// most one interval of proof times, which only leaves those copies
/// unproven until the next pass.
const VERIFIED_FLUSH: Duration = Duration::from_secs(5);

fn verified_flush_every(copies: usize) -> Duration {
    VERIFIED_FLUSH.max(Duration::from_millis(copies as u64 / 2))
}

/// [`run`], with the manager's calls on a TLS listener when `tls` is set
/// (the plain one then serves viewers only).
pub async fn run_with_tls(
    listener: TcpListener,
    tls: Option<TlsListener>,
    state: SharedState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = Duration::from_secs(state.cfg.shutdown_grace_secs);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Timeouts, transfer pace and the connection cap (shared::server).
    let nofile = shared::server::raise_nofile();
    // One connection cap for both listeners.
    let serving = shared::server::Serving::new(state.cfg.server.clone(), "viewnode", grace, nofile)
        .exempt(&state.cfg.trusted_proxies);
    let tls_server = tls.map(|(l, config)| {
        let mut stop = stop_rx.clone();
        tokio::spawn(shared::server::serve(
            l,
            build_router(state.clone()),
            serving.with_tls(tokio_rustls::TlsAcceptor::from(config)),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ))
    });
    let scrubber = tokio::spawn(scrub::run(state.clone(), stop_rx.clone()));
    let forwarder = tokio::spawn(journal::forward(state.clone(), stop_rx.clone()));
    let price_poll = tokio::spawn(prices::poll(state.clone(), stop_rx.clone()));
    let flusher = tokio::spawn(journal::flush_ticker(state.clone(), stop_rx));
    let proofs = state.store.clone();
    let proof_flusher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(VERIFIED_FLUSH);
        let mut last = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if last.elapsed() >= verified_flush_every(proofs.verified_count()) {
                proofs.flush_verified_logged().await;
                last = tokio::time::Instant::now();
            }
        }
    });
    let journal_state = state.clone();
    let app = if tls_server.is_some() {
        viewer_router(state)
    } else {
        build_router(state)
    };
    let stop_tls = stop_tx.clone();
    tracing::info!(
        max_connections = serving.max_connections,
        nofile,
        "connection limits"
    );
    shared::server::serve(listener, app, serving, async move {
        shutdown.await;
        let _ = stop_tls.send(true);
    })
    .await;
    let _ = stop_tx.send(true);
    if let Some(t) = tls_server {
        let _ = tokio::time::timeout(grace, t).await;
    }
    scrubber.abort();
    forwarder.abort();
    price_poll.abort();
    flusher.abort();
    proof_flusher.abort();
    journal_state.store.flush_verified_logged().await;
    // Shutdown drains the journal: what open responses counted is written
    // and fsynced, then delivered once more if the manager answers (else
    // it goes at the next start, from disk).
    journal_state.journal.flush_open();
    if !journal_state.journal.wait_durable(grace).await {
        tracing::error!("the view journal could not be written before stopping; what is on disk is delivered at the next start");
    } else if !journal_state.cfg.manager_url.is_empty() {
        match tokio::time::timeout(grace, journal::deliver(&journal_state)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("no last journal delivery before stopping: {e:#}"),
            Err(_) => tracing::warn!("no last journal delivery before stopping: timed out"),
        }
    }
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
    let tls = if cfg.tls_listen.is_empty() {
        None
    } else {
        let config = shared::tls::server_config(&cfg.tls_cert, &cfg.tls_key)
            .map_err(|e| anyhow::anyhow!("configuration fields `tls_cert`/`tls_key`: {e}"))?;
        let l = TcpListener::bind(&cfg.tls_listen).await.map_err(|e| {
            anyhow::anyhow!(
                "configuration field `tls_listen`: cannot bind {}: {e}",
                cfg.tls_listen
            )
        })?;
        Some((l, config))
    };
    let state = Arc::new(AppState::new(cfg)?);
    tracing::info!(node = %state.cfg.name, %addr, version = env!("CARGO_PKG_VERSION"), "view node listening");
    // One machine-readable line on stdout so scripts and tests can find a
    // port-0 listener without parsing logs.
    if let Some((l, _)) = &tls {
        let tls_addr = l.local_addr()?;
        tracing::info!(%tls_addr, "manager calls over TLS only");
        println!("LISTENING_TLS https://{tls_addr}");
    }
    println!("LISTENING http://{addr}");
    run_with_tls(listener, tls, state, shared::runtime::shutdown_signal()).await?;
    tracing::info!("view node stopped");
    Ok(())
}
