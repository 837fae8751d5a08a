//! The manager: the control plane of the pipeline. Viewers' bytes never
//! pass through it: nodes serve them, and keep serving valid tokens while
//! the manager is down.
//!
//! Its modules in layers (docs/architecture.md); a module uses only those
//! below it, never one above, and `tests/module_graph.rs` fails on a cycle
//! or on a status code outside `http`.
//!
//! | layer | modules |
//! |---|---|
//! | assembly | this file ([`run`], [`serve`]), [`app`] (what handlers share), [`leader`] (which of several managers runs the background work) |
//! | HTTP | [`http`]: routes, pages, the JSON API, node endpoints, sessions, operators' worker and alert lists, and the one error → status mapping ([`http::error`]) |
//! | services | [`ingest`] (a received file becomes a movie), [`tus`] (resumable uploads), [`pipeline`] (processing and replication), [`reconcile`] (mirror repair), [`ledger`] (credits), [`prices`], [`redirect`] (media URLs, choosing a node), [`backup`], [`console`] (what the operators' admin shows and does, audited), [`monitor`] (every check on a schedule, stored, announced), [`status`] (the public status page's content), [`auth`] (passwords, tokens), [`avatars`] (links to in-world avatars), [`limits`] |
//! | foundations | [`catalog`] (the `Catalog` trait and its SQLite backend: every SQL statement), [`domain`] (states, amounts), [`config`], [`nodes`] and [`nodecall`] (the signed node client), [`geo`], [`media`], [`workers`] (background workers' status), [`alerts`] (the one alert sink), [`notify`] (alert channels and their delivery log), `shared` |

// Assembly and HTTP.
pub mod app;
pub mod http;
pub mod leader;

// Services.
pub mod auth;
pub mod avatars;
pub mod backup;
pub mod console;
pub mod ingest;
pub mod ledger;
pub mod limits;
pub mod monitor;
pub mod pipeline;
pub mod prices;
pub mod quotas;
pub mod reconcile;
pub mod redirect;
pub mod runners;
pub mod status;
pub mod tus;

// Foundations.
pub mod alerts;
pub mod catalog;
pub mod config;
pub mod domain;
pub mod geo;
pub use ::media;
pub mod nodecall;
pub mod nodes;
pub mod notify;
pub mod workers;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;

pub use app::{AppState, SharedState};
pub use config::Config;
pub use http::{build_router, error::ApiError};
pub use shared::runtime::init_tracing;

/// Serves until `shutdown` resolves; requests in flight then get
/// `shutdown_grace_secs` to finish. The background work stops too. Every
/// process serves and watches the nodes; the background work runs in the
/// one that leads ([`leader`]).
pub async fn run(
    listener: TcpListener,
    state: SharedState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grace = Duration::from_secs(state.cfg.shutdown_grace_secs);
    let monitor = tokio::spawn(
        state
            .nodes
            .clone()
            .monitor(Duration::from_secs(5), stop_rx.clone()),
    );
    // Every process sweeps the resumable uploads it receives (their
    // folder is its own, or shared with a standby: sweeping twice is safe).
    let tus_sweep = tokio::spawn(tus::expiry_loop(state.tus.clone(), stop_rx.clone()));
    let drains = state.db.shared().then(|| {
        let (db, nodes) = (state.db.clone(), state.nodes.clone());
        tokio::spawn(async move {
            loop {
                if let Err(e) = console::follow_drains(&*db, &nodes).await {
                    tracing::warn!("cannot read the nodes' drains: {e}");
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    });
    let base = state.public_url.clone();
    let checker = Arc::new(monitor::Monitor::new(
        state.db.clone(),
        state.cfg.clone(),
        state.nodes.clone(),
        state.minter.clone(),
        state.notifier.clone(),
        Arc::new(move |p: &status::Page| http::status::render_snapshot(p, &base)),
    )?);
    let forwarder = state.db.shared().then(|| {
        let role = state.role.clone();
        tokio::spawn(
            checker
                .clone()
                .forward_alerts(Arc::new(move || role.leading()), stop_rx.clone()),
        )
    });
    let st = state.clone();
    let work = move |stop: tokio::sync::watch::Receiver<bool>| {
        vec![
            tokio::spawn(pipeline::run(st.pipeline.clone(), stop.clone())),
            tokio::spawn(reconcile::run(st.pipeline.clone(), stop.clone())),
            tokio::spawn(backup::run(st.db.clone(), st.cfg.clone(), stop.clone())),
            tokio::spawn(ledger::run(
                st.db.clone(),
                st.nodes.names(),
                st.cfg.credits.clone(),
                stop.clone(),
            )),
            tokio::spawn(checker.clone().run(stop)),
        ]
    };
    let lead = tokio::spawn(leader::run(
        state.db.clone(),
        state.role.clone(),
        work,
        stop_rx.clone(),
        grace,
    ));
    let server_cfg = state.cfg.server.clone();
    let proxies = state.cfg.trusted_proxies.clone();
    let app = build_router(state);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // Timeouts, transfer pace and the connection cap (shared::server).
    let nofile = shared::server::raise_nofile();
    let serving =
        shared::server::Serving::new(server_cfg, "manager", grace, nofile).exempt(&proxies);
    tracing::info!(
        max_connections = serving.max_connections,
        nofile,
        "connection limits"
    );
    let server = shared::server::serve(listener, app, serving, async move {
        shutdown.await;
        let _ = tx.send(());
    });
    let stop_tx2 = stop_tx.clone();
    tokio::select! {
        () = server => {},
        _ = async {
            let _ = rx.await;
            let _ = stop_tx2.send(true);
            // The server lets requests finish for `grace` itself; this
            // bounds the whole stop should it not return.
            tokio::time::sleep(grace + Duration::from_secs(1)).await;
        } => tracing::warn!("requests still in flight after the grace period; stopping anyway"),
    }
    let _ = stop_tx.send(true);
    // The leader gives its work `grace` and then aborts what is left.
    let _ = tokio::time::timeout(grace + Duration::from_secs(1), lead).await;
    monitor.abort();
    tus_sweep.abort();
    for t in [drains, forwarder].into_iter().flatten() {
        t.abort();
    }
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
