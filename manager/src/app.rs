//! The app assembled: what the HTTP layer's handlers share. Services never
//! see this; each handler hands a service only the parts it needs.

use std::sync::Arc;

use crate::{auth, catalog, geo, nodes, redirect, Config};

pub struct AppState {
    pub cfg: Config,
    pub db: catalog::SharedCatalog,
    pub nodes: nodes::Nodes,
    pub master: Arc<shared::MasterKey>,
    /// Mints media URLs and their playback tokens.
    pub minter: Arc<redirect::Minter>,
    /// Alert channels (webhooks, e-mail) and their delivery log.
    pub notifier: crate::notify::Notifier,
    /// The public status page as last gathered, and when.
    pub status_cache: std::sync::Mutex<Option<(i64, Arc<crate::status::Page>)>>,
    /// What ingest, replication and repair work with; its `wake` is what an
    /// upload pokes so a job loop starts at once.
    pub pipeline: crate::pipeline::Ctx,
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
    /// Log-in and sign-up rate limits (see [`crate::limits::Limiter`]).
    pub limits: Arc<crate::limits::Limiter>,
    /// Bounds concurrent password hashing ([`auth::MAX_PASSWORD_CHECKS`]).
    pub password_checks: Arc<tokio::sync::Semaphore>,
    /// `/healthz`'s database and staging checks (both write), done at most
    /// every 2 s however often it is asked: no free amplifier.
    pub health: shared::server::Recent<(Result<(), String>, Result<(), String>)>,
    /// Uploads being received, per account (`crate::quotas`).
    pub uploads: Arc<crate::quotas::InFlight>,
    /// Resumable (tus) uploads under way and lately finished.
    pub tus: Arc<crate::tus::Uploads>,
    /// Whether this process runs the background work ([`crate::leader`]).
    pub role: Arc<crate::leader::Role>,
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
        // Partial uploads never committed, and sealing cut short: nothing
        // refers to them. Managers sharing a database share `data_dir` too
        // (docs/operations.md, "A standby manager"), so there another
        // process may be writing one now: only files left untouched for
        // an hour go (a live upload or seal writes every few seconds).
        let shared_dir = catalog::is_postgres(&cfg.database_url);
        for entry in std::fs::read_dir(cfg.staging_dir())?.flatten() {
            let partial = entry
                .path()
                .extension()
                .is_some_and(|e| e == "upload" || e == "part");
            let stale = !shared_dir
                || entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(3600));
            if partial && stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let db = catalog::open(&cfg.database_url).await.map_err(|e| {
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
        let master = Arc::new(master);
        let pipeline = Arc::new(crate::pipeline::Pipeline {
            db: db.clone(),
            cfg: cfg.clone(),
            nodes: nodes.clone(),
            master: master.clone(),
            wake: Arc::new(tokio::sync::Notify::new()),
            outbox_bytes: Default::default(),
        });
        let public_url = public_url.trim_end_matches('/').to_string();
        let minter = Arc::new(redirect::Minter {
            signer,
            public_url: public_url.clone(),
            token_ttl_secs: cfg.token_ttl_secs,
        });
        let notifier =
            crate::notify::Notifier::new(cfg.alerts.clone(), db.clone(), public_url.clone())?;
        crate::console::load_drains(&*db, &nodes).await?;
        let tus = crate::tus::Uploads::open(
            cfg.staging_dir().join("tus"),
            cfg.upload_expiry_hours * 3600,
        )
        .map_err(|e| anyhow::anyhow!("cannot open the resumable uploads' folder: {e}"))?;
        tus.recover(&*db, &cfg.staging_dir()).await.map_err(|e| {
            anyhow::anyhow!("cannot check unfinished uploads against the database: {e}")
        })?;
        Ok(Self {
            uploads: Default::default(),
            tus: Arc::new(tus),
            role: Default::default(),
            health: shared::server::Recent::new(
                std::time::Duration::from_secs(2),
                // A check that takes longer fails: hung is unhealthy.
                std::time::Duration::from_secs(5),
            ),
            secure_cookies: public_url.starts_with("https://"),
            public_url,
            dummy_hash: auth::hash_password(&auth::random_token())?,
            cfg,
            db,
            nodes,
            master,
            minter,
            notifier,
            status_cache: Default::default(),
            pipeline,
            metrics: shared::runtime::metrics_handle(),
            geo,
            playable: redirect::PlayableCache::default(),
            tokens: redirect::TokenCache::default(),
            limits: Arc::default(),
            password_checks: Arc::new(tokio::sync::Semaphore::new(auth::MAX_PASSWORD_CHECKS)),
        })
    }

    /// What a purchase needs ([`crate::ledger::Shop`]).
    pub fn shop(&self) -> crate::ledger::Shop<'_> {
        crate::ledger::Shop {
            db: &*self.db,
            nodes: &self.nodes,
            playable: &self.playable,
            credits: &self.cfg.credits,
            token_ttl_secs: self.cfg.token_ttl_secs,
        }
    }
}
