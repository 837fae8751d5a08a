//! The manager's one typed configuration: defaults in code, then the TOML
//! file, then `MANAGER_*` environment variables (nested fields with `__`, as
//! in `MANAGER_TRANSCODE__CRF=20`). Validated at start; every message names
//! the field so an operator can fix it without reading code.

use std::{net::SocketAddr, path::PathBuf};

use figment::{
    providers::{Env, Format, Toml},
    Figment,
};
use serde::Deserialize;
use shared::Secret;
use zeroize::Zeroizing;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to bind. Port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Base URL users and viewers reach the manager on; media URLs start
    /// with it. Empty: derived from the bound address.
    pub public_url: String,
    /// Folder for the database, staging and outbox (all on one disk so
    /// renames are atomic).
    pub data_dir: PathBuf,
    /// sqlx database URL. Empty: SQLite at `<data_dir>/manager.db`.
    pub database_url: String,
    /// Largest upload accepted, in bytes.
    pub max_upload_bytes: u64,
    /// Hours an unfinished resumable upload lives after its last byte
    /// arrived; then its bytes are removed (`410 Gone`).
    pub upload_expiry_hours: u64,
    /// Free space, MiB, kept on the data folder's disk for the database,
    /// backups and transcoding: an upload that would cut into it is
    /// refused with `507 insufficient_storage` (before its first byte when
    /// its length is announced, else as soon as it reaches the reserve).
    pub disk_reserve_mb: u64,
    /// MiB of sealed files the outbox may hold. Past it, files of movies
    /// that already have `min_replicas` (and two) verified copies go, oldest
    /// first (a node that still lacks one is refilled from a node that has
    /// it), and new transcode jobs wait until it is under again: a node
    /// that stays down cannot make the outbox grow forever.
    pub outbox_max_mb: u64,
    /// Verified copies needed before a movie is published.
    pub min_replicas: usize,
    /// Lifetime of a playback token handed out by the redirector, seconds.
    pub token_ttl_secs: u64,
    /// Hex of the 32-byte key-encryption key that wraps per-asset data keys.
    pub master_key: Secret,
    /// Id of `master_key` (stored with every wrapped key, for rotation).
    pub master_key_id: u32,
    /// Hex of the 32-byte Ed25519 seed that signs playback tokens. Nodes get
    /// only the public half.
    pub token_signing_key: Secret,
    /// Seconds a request in flight may take to finish after SIGTERM/Ctrl-C.
    pub shutdown_grace_secs: u64,
    /// MaxMind-format city database (`.mmdb`) for sending viewers to the
    /// nearest node. Empty: no GeoIP, every viewer gets the fallback order.
    pub geoip_db: PathBuf,
    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` is
    /// believed. Anyone else's is ignored: the header is trivially forged.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// What uploads are accepted (beyond `max_upload_bytes`).
    pub limits: LimitsConfig,
    /// Output profile for Second Life's media player.
    pub transcode: TranscodeConfig,
    /// The view nodes this manager pushes to and redirects viewers to.
    pub nodes: Vec<NodeConfig>,
    /// The cluster CA's certificate, PEM text (not a path: backups carry
    /// the configuration, so a restore brings it back). When set, calls to
    /// `https://` node URLs trust this CA and nothing else; empty, they
    /// trust the web's public CAs. `manager init-cluster --tls` writes it.
    pub node_ca_cert: String,
    /// How the mirrors are compared with the catalog and repaired.
    pub reconcile: ReconcileConfig,
    /// Scheduled, verified database backups and their off-machine copies
    /// (docs/backup.md).
    pub backup: BackupConfig,
    /// Credits: signup bonus, view prices' split, grant window, refunds
    /// (docs/credits.md).
    pub credits: CreditsConfig,
    /// What one account may upload (docs/operations.md, "Per-account limits").
    pub quotas: QuotasConfig,
    /// The monitor: what it checks and how often (docs/operations.md,
    /// "Monitoring and alerts").
    pub monitor: MonitorConfig,
    /// Where alerts go: webhooks, e-mail, a heartbeat.
    pub alerts: AlertsConfig,
    /// Header and transfer timeouts, the connection cap (`shared::server`).
    pub server: shared::server::ServerConfig,
    /// Addresses (or CIDR ranges) `/metrics` answers; others get `403`.
    /// Empty: everyone.
    pub metrics_allow: Vec<ipnet::IpNet>,
    /// The settings as given (file, then environment), for the backup to
    /// carry so a restore can rebuild this configuration. Not a setting.
    #[serde(skip)]
    pub effective: EffectiveConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// Seconds between scheduled backups (at least 60; default an hour).
    pub interval_secs: u64,
    /// An alert (error log, `manager_backup_stale` gauge, `/healthz`) fires
    /// when the newest verified backup is older than this, seconds.
    pub max_age_secs: u64,
    /// Seconds between attempts to push copies a node has not got yet (and
    /// between checks of the schedule).
    pub retry_secs: u64,
    /// Retention, grandfather-father-son: the newest backup of each of the
    /// last N hours, days, weeks (Monday-based, UTC) and months, plus the
    /// last `keep_last` whatever their age. The newest is always kept.
    pub keep_last: usize,
    pub keep_hourly: usize,
    pub keep_daily: usize,
    pub keep_weekly: usize,
    pub keep_monthly: usize,
    /// Which nodes hold the sealed copies: "all" or a list of node names
    /// (at least two when two or more nodes are configured).
    pub nodes: BackupNodes,
    /// The recovery key (`slmrk1-…`, from `manager init-cluster` or
    /// `manager backup keygen`). Seals the off-machine copies; without it
    /// backups stay on this machine only.
    pub recovery_key: Secret,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            interval_secs: 3600,
            max_age_secs: 3 * 3600,
            retry_secs: 60,
            keep_last: 3,
            keep_hourly: 24,
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 12,
            nodes: BackupNodes::default(),
            recovery_key: Secret::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// Seconds between two runs of every check (5 to 120). Each run also
    /// pushes the status page to the nodes, whose `status_stale_secs`
    /// (300) must stay above twice this.
    pub interval_secs: u64,
    /// The movie the viewer's-path check plays (its id). Empty: the
    /// smallest published movie.
    pub canary_asset: String,
    /// A node whose clock differs from the manager's by more than this,
    /// seconds, is degraded: media URLs and terminal requests carry times.
    pub max_clock_skew_secs: u64,
    /// A disk (the manager's, a node's) with less free space than this
    /// percentage is degraded, under a fifth of it down (1 to 50).
    pub low_disk_percent: u64,
    /// Transcoding is degraded when a job has waited longer than this, seconds.
    pub max_queue_age_secs: u64,
    /// A sealed file waiting in the outbox longer than this, seconds, is a
    /// problem (a node that never takes it).
    pub max_outbox_age_secs: u64,
    /// A node whose journal watermark lags more than this, seconds, holds
    /// refunds back.
    pub max_journal_lag_secs: u64,
    /// Days of check history and deliveries kept (the status page shows 90).
    pub keep_days: u64,
    /// A certificate in use (a node's, the manager's public one, the
    /// cluster CA) that expires within this many days is degraded; within
    /// a fifth of it, or expired, down (1 to 90).
    pub cert_warn_days: u64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            interval_secs: 30,
            canary_asset: String::new(),
            max_clock_skew_secs: 5,
            low_disk_percent: 10,
            max_queue_age_secs: 3600,
            max_outbox_age_secs: 3600,
            max_journal_lag_secs: 900,
            keep_days: 100,
            cert_warn_days: 14,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// A check still failing is announced again after this many seconds
    /// (0: once only).
    pub repeat_secs: u64,
    /// At most one message per check in this many seconds, so a flapping
    /// check does not flood the operator.
    pub min_gap_secs: u64,
    /// Webhooks: a body compatible with Prometheus Alertmanager's webhook
    /// (version 4), signed with Standard Webhooks headers.
    pub webhooks: Vec<WebhookConfig>,
    /// E-mail over SMTP; off while `smtp_host` is empty.
    pub email: EmailConfig,
    /// Fetched every `heartbeat_secs` (a healthchecks.io-style URL), so a
    /// manager that died is noticed from outside. Empty: off.
    pub heartbeat_url: String,
    pub heartbeat_secs: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            repeat_secs: 4 * 3600,
            min_gap_secs: 60,
            webhooks: Vec::new(),
            email: EmailConfig::default(),
            heartbeat_url: String::new(),
            heartbeat_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Shown in the admin and the delivery log.
    pub name: String,
    pub url: String,
    /// The Standard Webhooks signing secret, `whsec_` + base64 of 24 to 64
    /// random bytes. Empty: sent unsigned.
    pub secret: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailConfig {
    pub smtp_host: String,
    pub smtp_port: u16,
    /// `none` (loopback or a trusted network only), `starttls` or `tls`.
    pub tls: String,
    /// Empty: no authentication.
    pub username: String,
    pub password: Secret,
    pub from: String,
    pub to: Vec<String>,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            smtp_host: String::new(),
            smtp_port: 587,
            tls: "starttls".into(),
            username: String::new(),
            password: Secret::default(),
            from: String::new(),
            to: Vec::new(),
        }
    }
}

/// The signing key of a Standard Webhooks secret (`whsec_` + base64 of 24
/// to 64 bytes), or `None` when it is not one.
pub fn webhook_key(secret: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let b64 = secret.strip_prefix("whsec_")?;
    let key = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    (24..=64).contains(&key.len()).then_some(key)
}

fn is_http(u: &str) -> bool {
    u.starts_with("http://") || u.starts_with("https://")
}

impl MonitorConfig {
    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !(5..=120).contains(&self.interval_secs) {
            return Err(("interval_secs", "must be between 5 and 120"));
        }
        if !(1..=50).contains(&self.low_disk_percent) {
            return Err(("low_disk_percent", "must be between 1 and 50"));
        }
        if !(1..=90).contains(&self.cert_warn_days) {
            return Err(("cert_warn_days", "must be between 1 and 90"));
        }
        if self.keep_days < 90 {
            return Err((
                "keep_days",
                "must be at least 90 (the status page shows 90 days)",
            ));
        }
        Ok(())
    }
}

impl AlertsConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let mut names = std::collections::HashSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            let f = |sub: &str| format!("webhooks[{i}].{sub}");
            if w.name.is_empty() || w.name.len() > 64 || !names.insert(w.name.clone()) {
                return Err((
                    f("name"),
                    "must be set, unique and at most 64 characters".into(),
                ));
            }
            if !is_http(&w.url) {
                return Err((f("url"), "must start with http:// or https://".into()));
            }
            if !w.secret.expose().is_empty() && webhook_key(w.secret.expose()).is_none() {
                return Err((
                    f("secret"),
                    "must be whsec_ followed by base64 of 24 to 64 bytes".into(),
                ));
            }
        }
        let e = &self.email;
        if !e.smtp_host.is_empty() {
            if !["none", "starttls", "tls"].contains(&e.tls.as_str()) {
                return Err(("email.tls".into(), "must be none, starttls or tls".into()));
            }
            if e.from.parse::<lettre::message::Mailbox>().is_err() {
                return Err(("email.from".into(), "must be an e-mail address".into()));
            }
            if e.to.is_empty()
                || e.to
                    .iter()
                    .any(|t| t.parse::<lettre::message::Mailbox>().is_err())
            {
                return Err((
                    "email.to".into(),
                    "must list at least one e-mail address".into(),
                ));
            }
        }
        let loopback = ["localhost", "127.0.0.1", "::1", "[::1]"].contains(&e.smtp_host.as_str());
        if !e.smtp_host.is_empty() && e.tls == "none" && !e.username.is_empty() && !loopback {
            return Err((
                "email.tls".into(),
                "must be starttls or tls when a username is set: the password would cross the network in clear".into(),
            ));
        }
        if !self.heartbeat_url.is_empty() && !is_http(&self.heartbeat_url) {
            return Err((
                "heartbeat_url".into(),
                "must start with http:// or https://".into(),
            ));
        }
        if !(10..=3600).contains(&self.heartbeat_secs) {
            return Err((
                "heartbeat_secs".into(),
                "must be between 10 and 3600".into(),
            ));
        }
        if self.min_gap_secs == 0 {
            return Err(("min_gap_secs".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Per-account upload limits, so one account cannot take the service from
/// the others. Operators are not limited.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotasConfig {
    /// Uploads one account may be sending at once (`429 too_many_uploads`).
    pub concurrent_uploads: u32,
    /// Uploads one account may make in 24 hours (`429 too_many_uploads`).
    pub uploads_per_day: u32,
    /// Bytes of uploaded sources one account may keep (every movie not
    /// rejected counts), `413 quota_exceeded`; 0: no limit.
    pub bytes_per_account: u64,
}

impl Default for QuotasConfig {
    fn default() -> Self {
        Self {
            concurrent_uploads: 3,
            uploads_per_day: 100,
            bytes_per_account: 100 * (1 << 30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreditsConfig {
    /// Credits a new account starts with (given in the sign-up transaction).
    pub signup_bonus: u64,
    /// Credits an upload costs, charged when it is accepted and given back
    /// if it ends rejected. 0 = free (a promotion).
    pub upload_cost: u64,
    /// Percent of a view's price credited to the movie's uploader (0–100);
    /// the rest stays with the site.
    pub uploader_share_percent: u8,
    /// Seconds a purchased view may be played for (the playback token
    /// expires with it). At least 60.
    pub grant_window_secs: u64,
    /// A grant under which nothing was served is refunded once it has
    /// expired and every node has delivered its view journal at least this
    /// many seconds after the expiry (responses still running at expiry
    /// report within `journal_flush_secs` on the node). At least 30.
    pub refund_grace_secs: u64,
    /// Seconds between two runs of the refund sweeper.
    pub sweep_interval_secs: u64,
}

impl Default for CreditsConfig {
    fn default() -> Self {
        Self {
            signup_bonus: 1000,
            upload_cost: 0,
            uploader_share_percent: 70,
            grant_window_secs: 4 * 3600,
            refund_grace_secs: 120,
            sweep_interval_secs: 30,
        }
    }
}

impl CreditsConfig {
    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.signup_bonus > crate::domain::MAX_AMOUNT as u64 {
            return Err(("signup_bonus", "must be at most 1000000000000"));
        }
        if self.upload_cost > crate::domain::MAX_AMOUNT as u64 {
            return Err(("upload_cost", "must be at most 1000000000000"));
        }
        if self.uploader_share_percent > 100 {
            return Err(("uploader_share_percent", "must be between 0 and 100"));
        }
        if self.grant_window_secs < 60 {
            return Err(("grant_window_secs", "must be at least 60"));
        }
        if self.refund_grace_secs < 30 {
            return Err(("refund_grace_secs", "must be at least 30"));
        }
        if self.sweep_interval_secs == 0 {
            return Err(("sweep_interval_secs", "must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Seconds between two comparisons of every node's inventory with the
    /// catalog. A copy lost without a report is refilled within about this.
    pub interval_secs: u64,
    /// Seconds a blob no asset references must stay seen on a node before
    /// it is deleted there. Long on purpose: a catalog restored from an
    /// older backup must not cost the movies uploaded since.
    pub unreferenced_grace_secs: u64,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            interval_secs: 60,
            unreferenced_grace_secs: 7 * 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest movie accepted, seconds.
    pub max_duration_secs: f64,
    /// Largest input picture accepted, either orientation (at most 8192).
    pub max_width: u32,
    pub max_height: u32,
    /// Containers accepted, by FFmpeg demuxer name (mp4, mov, matroska,
    /// webm, avi, flv, mpegts, ogg, mpeg, asf, 3gp).
    pub allowed_containers: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = crate::media::Limits::default();
        Self {
            max_duration_secs: d.max_duration_secs,
            max_width: d.max_width,
            max_height: d.max_height,
            allowed_containers: d.allowed_containers,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TranscodeConfig {
    /// Output fits inside this box (never upscaled). At most 2048.
    pub max_width: u32,
    pub max_height: u32,
    /// x264 constant rate factor, 0–51; lower is better and larger.
    pub crf: u8,
    /// x264 preset (ultrafast … veryslow).
    pub preset: String,
    /// Jobs this manager transcodes at once (0–16). Each already uses every
    /// core. 0 leaves every job to transcode workers on other machines
    /// (`crate::runners`): with none registered, uploads wait.
    pub workers: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's own `name` setting.
    pub name: String,
    /// Base URL the manager calls the node on, e.g. `http://127.0.0.1:8081`
    /// or, with TLS inside the cluster, the node's `tls_listen` as
    /// `https://10.0.0.11:8444`.
    pub url: String,
    /// Base URL viewers are sent to. Empty: `url`. Differs from `url` when
    /// the node's manager-facing port is TLS with the cluster CA (players
    /// would not trust it) or the node sits behind a reverse proxy.
    #[serde(default)]
    pub public_url: String,
    /// Where the node is, for picking the closest one.
    pub lat: f64,
    pub lon: f64,
    /// Relative share of viewers among equally close nodes.
    #[serde(default = "one")]
    pub weight: u32,
    /// Where the node runs (data centre, provider, building): two nodes in
    /// one site can fail together. Empty: the node's name.
    #[serde(default)]
    pub site: String,
    /// Hex of the secret shared with this node that signs our calls to it.
    pub secret: Secret,
}

fn one() -> u32 {
    1
}

impl NodeConfig {
    /// Where viewers are sent (`public_url`, else `url`).
    pub fn viewer_url(&self) -> &str {
        if self.public_url.is_empty() {
            &self.url
        } else {
            &self.public_url
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            public_url: String::new(),
            data_dir: PathBuf::from("data/manager"),
            database_url: String::new(),
            max_upload_bytes: 2 * 1024 * 1024 * 1024,
            upload_expiry_hours: 24,
            disk_reserve_mb: 1024,
            outbox_max_mb: 20 * 1024,
            min_replicas: 2,
            token_ttl_secs: 6 * 3600,
            master_key: Secret::default(),
            master_key_id: 1,
            token_signing_key: Secret::default(),
            shutdown_grace_secs: 20,
            geoip_db: PathBuf::new(),
            trusted_proxies: Vec::new(),
            limits: LimitsConfig::default(),
            transcode: TranscodeConfig::default(),
            nodes: Vec::new(),
            node_ca_cert: String::new(),
            reconcile: ReconcileConfig::default(),
            backup: BackupConfig::default(),
            credits: CreditsConfig::default(),
            quotas: QuotasConfig::default(),
            monitor: MonitorConfig::default(),
            server: shared::server::ServerConfig::default(),
            metrics_allow: Vec::new(),
            alerts: AlertsConfig::default(),
            effective: Default::default(),
        }
    }
}

impl Default for TranscodeConfig {
    fn default() -> Self {
        Self {
            max_width: 1280,
            max_height: 720,
            crf: 23,
            preset: "veryfast".into(),
            workers: 1,
        }
    }
}

const PRESETS: &[&str] = &[
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
];

impl Config {
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut fig = Figment::new();
        if let Some(f) = file {
            if !f.exists() {
                anyhow::bail!("config file {} does not exist", f.display());
            }
            fig = fig.merge(Toml::file(f));
        }
        // `MANAGER_CONFIG` names the file itself, not a field.
        Self::from_figment(fig.merge(Env::prefixed("MANAGER_").ignore(&["config"]).split("__")))
    }

    /// A configuration from TOML text alone (no file, no environment),
    /// checked as [`Config::load`] checks it (the fuzz target feeds it).
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        Self::from_figment(Figment::new().merge(Toml::string(text)))
    }

    fn from_figment(fig: Figment) -> anyhow::Result<Self> {
        let mut cfg: Config = fig
            .extract()
            .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        cfg.effective = EffectiveConfig::capture(&fig);
        cfg.validate()?;
        if cfg.database_url.is_empty() {
            cfg.database_url = format!("sqlite://{}", cfg.data_dir.join("manager.db").display());
        }
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let field = |name: &str, why: &str| anyhow::anyhow!("configuration field `{name}`: {why}");
        if shared::MasterKey::from_hex(self.master_key_id, self.master_key.expose()).is_err() {
            return Err(field("master_key", "must be 64 hex characters (32 bytes)"));
        }
        if shared::TokenSigner::from_seed_hex(self.token_signing_key.expose()).is_err() {
            return Err(field(
                "token_signing_key",
                "must be 64 hex characters (32 bytes)",
            ));
        }
        if !self.public_url.is_empty() && !is_http(&self.public_url) {
            return Err(field("public_url", "must start with http:// or https://"));
        }
        if self.public_url.is_empty() && self.listen.ip().is_unspecified() {
            return Err(field(
                "public_url",
                "must be set when `listen` is a wildcard address: media URLs cannot point at 0.0.0.0",
            ));
        }
        if self.min_replicas == 0 {
            return Err(field("min_replicas", "must be at least 1"));
        }
        if self.nodes.len() < self.min_replicas {
            return Err(field(
                "nodes",
                &format!(
                    "{} node(s) configured but min_replicas is {}: nothing could ever be published",
                    self.nodes.len(),
                    self.min_replicas
                ),
            ));
        }
        if self.outbox_max_mb == 0 {
            return Err(field("outbox_max_mb", "must be greater than 0"));
        }
        if self.max_upload_bytes == 0 {
            return Err(field("max_upload_bytes", "must be greater than 0"));
        }
        if !(1..=24 * 30).contains(&self.upload_expiry_hours) {
            return Err(field(
                "upload_expiry_hours",
                "must be between 1 and 720 (30 days)",
            ));
        }
        if self.token_ttl_secs < 60 {
            return Err(field("token_ttl_secs", "must be at least 60"));
        }
        let l = &self.limits;
        if l.max_duration_secs.is_nan() || l.max_duration_secs <= 0.0 {
            return Err(field("limits.max_duration_secs", "must be greater than 0"));
        }
        for (name, v) in [
            ("limits.max_width", l.max_width),
            ("limits.max_height", l.max_height),
        ] {
            if !(16..=crate::media::MAX_INPUT_DIMENSION).contains(&v) {
                return Err(field(
                    name,
                    &format!(
                        "must be between 16 and {}",
                        crate::media::MAX_INPUT_DIMENSION
                    ),
                ));
            }
        }
        if l.allowed_containers.is_empty() {
            return Err(field(
                "limits.allowed_containers",
                "must name at least one container",
            ));
        }
        let t = &self.transcode;
        for (name, v) in [
            ("transcode.max_width", t.max_width),
            ("transcode.max_height", t.max_height),
        ] {
            if !(16..=2048).contains(&v) {
                return Err(field(
                    name,
                    "must be between 16 and 2048 (Second Life's media limit)",
                ));
            }
        }
        if t.workers > 16 {
            return Err(field("transcode.workers", "must be between 0 and 16"));
        }
        if t.crf > 51 {
            return Err(field("transcode.crf", "must be between 0 and 51"));
        }
        if !PRESETS.contains(&t.preset.as_str()) {
            return Err(field(
                "transcode.preset",
                &format!("must be one of {}", PRESETS.join(", ")),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let f = |sub: &str| format!("nodes[{i}].{sub}");
            if n.name.is_empty() || !seen.insert(n.name.clone()) {
                return Err(field(&f("name"), "must be set and unique"));
            }
            if !is_http(&n.url) {
                return Err(field(&f("url"), "must start with http:// or https://"));
            }
            if !n.public_url.is_empty() && !is_http(&n.public_url) {
                return Err(field(
                    &f("public_url"),
                    "must start with http:// or https://",
                ));
            }
            if !(-90.0..=90.0).contains(&n.lat) {
                return Err(field(&f("lat"), "must be between -90 and 90"));
            }
            if !(-180.0..=180.0).contains(&n.lon) {
                return Err(field(&f("lon"), "must be between -180 and 180"));
            }
            match hex::decode(n.secret.expose()) {
                Ok(b) if b.len() >= 16 => {}
                _ => return Err(field(&f("secret"), "must be at least 32 hex characters")),
            }
            if n.site.len() > 64 || n.site.chars().any(char::is_control) {
                return Err(field(&f("site"), "must be at most 64 printable characters"));
            }
        }
        if !self.node_ca_cert.trim().is_empty() {
            reqwest::Certificate::from_pem(self.node_ca_cert.as_bytes())
                .map_err(|e| field("node_ca_cert", &format!("is not a PEM certificate: {e}")))?;
        }
        self.credits
            .validate()
            .map_err(|(name, why)| field(&format!("credits.{name}"), why))?;
        if self.reconcile.interval_secs == 0 {
            return Err(field("reconcile.interval_secs", "must be at least 1"));
        }
        self.backup
            .validate(&self.nodes)
            .map_err(|(name, why)| field(&format!("backup.{name}"), &why))?;
        self.monitor
            .validate()
            .map_err(|(name, why)| field(&format!("monitor.{name}"), why))?;
        self.alerts
            .validate()
            .map_err(|(name, why)| field(&format!("alerts.{name}"), &why))?;
        self.server
            .validate()
            .map_err(|(name, why)| field(&format!("server.{name}"), why))?;
        if self.quotas.concurrent_uploads == 0 || self.quotas.uploads_per_day == 0 {
            return Err(field(
                "quotas",
                "concurrent_uploads and uploads_per_day must be at least 1",
            ));
        }
        Ok(())
    }

    /// The media layer's view of the upload limits.
    pub fn media_limits(&self) -> crate::media::Limits {
        crate::media::Limits {
            max_bytes: self.max_upload_bytes,
            max_duration_secs: self.limits.max_duration_secs,
            max_width: self.limits.max_width,
            max_height: self.limits.max_height,
            allowed_containers: self.limits.allowed_containers.clone(),
        }
    }

    pub fn poster_dir(&self) -> PathBuf {
        self.data_dir.join("posters")
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.data_dir.join("staging")
    }

    pub fn outbox_dir(&self) -> PathBuf {
        self.data_dir.join("outbox")
    }
}

impl NodeConfig {
    /// The node's site, defaulting to its name (a site of its own).
    pub fn site(&self) -> &str {
        if self.site.is_empty() {
            &self.name
        } else {
            &self.site
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        master_key = "0000000000000000000000000000000000000000000000000000000000000001"
        token_signing_key = "0000000000000000000000000000000000000000000000000000000000000002"
        [[nodes]]
        name = "utah"
        url = "http://127.0.0.1:8081"
        lat = 40.76
        lon = -111.89
        secret = "00000000000000000000000000000003"
        [[nodes]]
        name = "toronto"
        url = "http://127.0.0.1:8082"
        lat = 43.65
        lon = -79.38
        secret = "00000000000000000000000000000004"
    "#;

    fn load(text: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(Some(&p))
    }

    fn err(text: &str) -> String {
        format!("{:#}", load(text).unwrap_err())
    }

    #[test]
    fn a_complete_file_loads_with_defaults() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.min_replicas, 2);
        assert_eq!(c.transcode.max_width, 1280);
        assert_eq!(c.nodes[1].weight, 1);
        assert!(c.database_url.starts_with("sqlite://"));
        assert!(
            !format!("{c:?}")
                .contains("0000000000000000000000000000000000000000000000000000000000000001"),
            "secrets never print"
        );
    }

    #[test]
    fn every_bad_value_names_its_field() {
        assert!(err("").contains("`master_key`"));
        assert!(err(&GOOD.replace("lat = 40.76", "lat = 140.76")).contains("`nodes[0].lat`"));
        assert!(
            err(&GOOD.replace("name = \"toronto\"", "name = \"utah\"")).contains("`nodes[1].name`")
        );
        assert!(err(&format!("min_replicas = 3\n{GOOD}")).contains("`nodes`"));
        assert!(err(&format!("listen = \"nowhere\"\n{GOOD}")).contains("listen"));
        assert!(err(&format!("min_replicas = \"two\"\n{GOOD}")).contains("min_replicas"));
        assert!(err(&format!("mystery = 1\n{GOOD}")).contains("mystery"));
        assert!(err(&GOOD.replace(
            "[[nodes]]\n        name = \"utah\"",
            "[transcode]\n        crf = 99\n        [[nodes]]\n        name = \"utah\""
        ))
        .contains("`transcode.crf`"));
        assert!(err(&format!("public_url = \"ftp://x\"\n{GOOD}")).contains("`public_url`"));
        assert!(
            err(&format!("trusted_proxies = [\"not-a-net\"]\n{GOOD}")).contains("trusted_proxies")
        );
    }
}

/// `[backup] nodes`: `"all"` or a list of node names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BackupNodes {
    #[default]
    All,
    Named(Vec<String>),
}

impl<'de> Deserialize<'de> for BackupNodes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::One(s) if s == "all" => Ok(BackupNodes::All),
            Raw::One(s) => Err(serde::de::Error::custom(format!(
                "`{s}`: expected \"all\" or a list of node names"
            ))),
            Raw::Many(v) => Ok(BackupNodes::Named(v)),
        }
    }
}

/// The configuration as the operator gave it (file, then environment), not
/// defaults: what a restore writes back. Holds secrets: `Debug` is redacted.
#[derive(Clone, Default)]
pub struct EffectiveConfig(Option<figment::value::Dict>);

impl std::fmt::Debug for EffectiveConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EffectiveConfig([redacted])")
    }
}

impl EffectiveConfig {
    pub fn capture(fig: &figment::Figment) -> EffectiveConfig {
        EffectiveConfig(fig.extract::<figment::value::Dict>().ok())
    }

    /// TOML text, or `None` when nothing was captured (a config built in code).
    pub fn to_toml(&self) -> Option<Zeroizing<String>> {
        toml::to_string(self.0.as_ref()?).ok().map(Zeroizing::new)
    }
}
