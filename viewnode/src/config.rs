//! The view node's one typed configuration: defaults in code, then the TOML
//! file, then `VIEWNODE_*` environment variables (`VIEWNODE_LISTEN=...`).
//! Every field is checked at start so a typo fails loudly with the field's
//! name instead of surfacing later as a confusing runtime error.

use std::{net::SocketAddr, path::PathBuf};

use figment::{
    providers::{Env, Format, Toml},
    Figment,
};
use serde::Deserialize;
use shared::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's name, as the manager knows it (`utah`, `toronto`).
    pub name: String,
    /// Address to bind. Port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Base URL viewers reach this node on. Empty: derived from the bound address.
    pub public_url: String,
    /// Address for the manager's calls over TLS (`manager init-cluster
    /// --tls`), e.g. `0.0.0.0:8444`. When set, `listen` serves viewers only
    /// (playback, `/healthz`, `/metrics`) and every `/internal` call must
    /// come over TLS. Empty: everything on `listen`.
    pub tls_listen: String,
    /// PEM certificate chain for `tls_listen`, issued by the cluster CA.
    pub tls_cert: PathBuf,
    /// PEM private key of `tls_cert`; keep it readable by this node only.
    pub tls_key: PathBuf,
    /// Reverse proxies (addresses or CIDR ranges) in front of `listen`
    /// whose `X-Forwarded-For` is believed for the viewer's address in the
    /// access log. Anyone else's is ignored.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Folder holding the node's own state (view journal, proof times,
    /// temp files) and, with `[storage] kind = "local"`, the sealed blobs
    /// (ciphertext only), quarantined copies and the manager's backups.
    pub storage_dir: PathBuf,
    /// Where blobs, quarantined copies and backups are kept: this folder
    /// (the default) or an S3-compatible bucket (`store/bucket.rs`).
    pub storage: StorageConfig,
    /// Hex of the 32-byte key-encryption key that unwraps per-asset data keys.
    /// It must never live in `storage_dir`: the disk alone must reveal nothing.
    pub master_key: Secret,
    /// Id of `master_key`, so keys can rotate without re-encrypting blobs.
    pub master_key_id: u32,
    /// Hex of the manager's Ed25519 public key that signs playback tokens.
    pub token_public_key: String,
    /// Hex of the secret shared with the manager that signs its calls to us.
    pub manager_secret: Secret,
    /// Seconds a request in flight may take to finish after SIGTERM/Ctrl-C.
    pub shutdown_grace_secs: u64,
    /// Hex of the read-only backup credential derived from the operator's
    /// recovery key (written by `manager init-cluster`): lets a restore on
    /// an empty machine list and fetch the manager's sealed backups (HMAC key
    /// id `backup-reader`). Empty: only the manager (`manager_secret`) can.
    pub backup_read_key: Secret,
    /// The manager's base URL, where this node reports a copy it took out of
    /// service (signed with `manager_secret`, key id = `name`). Empty: no
    /// report is sent and the manager finds out at its next reconciliation.
    pub manager_url: String,
    /// Scrubbing: how fast a pass re-reads the stored blobs, in MB/s
    /// (10^6 bytes). A full pass takes stored bytes / this rate, so the
    /// operator knows how long a silent corruption can stay unnoticed.
    pub scrub_rate_mb_per_sec: f64,
    /// Seconds from the start of one scrub pass to the start of the next (a
    /// pass that takes longer is followed at once by the next). 0 disables
    /// scrubbing.
    pub scrub_interval_secs: u64,
    /// Seconds between two deliveries of the view journal to `manager_url`
    /// (an empty delivery still tells the manager we are alive, which lets
    /// it refund unplayed grants). Between 1 and 300.
    pub journal_forward_secs: u64,
    /// A paid response still streaming journals what it served at least
    /// this often, seconds, not only when it ends. Between 1 and 60.
    pub journal_flush_secs: u64,
    /// Paid-view events held in memory while the journal's disk cannot be
    /// written (about 200 bytes each); past this, new paid views are
    /// refused (`503 journal_full`) rather than served unrecorded.
    pub journal_max_unwritten: u64,
    /// Seconds between two fetches of the paid movies' price epochs from
    /// `manager_url`: a free movie's media URL handed out before a price
    /// was set stops playing here within this time. Between 1 and 60.
    pub price_poll_secs: u64,
    /// Days a copy set aside in `quarantine/` is kept for inspection
    /// before it is deleted, checked after each scrub pass. 0 keeps them
    /// until an operator removes them. At most 3650.
    pub quarantine_keep_days: u64,
    /// The status page this node serves says the manager is unreachable
    /// once no copy of it has arrived for this many seconds (the manager
    /// pushes one at least every minute). Between 5 and 86400.
    pub status_stale_secs: u64,
    /// Header and transfer timeouts, the connection cap (`shared::server`).
    pub server: shared::server::ServerConfig,
    /// Addresses (or CIDR ranges) `/metrics` answers; others get `403`.
    /// Empty: everyone, as before (put the node's metrics behind your
    /// firewall, or list your Prometheus here).
    pub metrics_allow: Vec<ipnet::IpNet>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: String::new(),
            listen: "127.0.0.1:8081".parse().expect("literal address"),
            public_url: String::new(),
            tls_listen: String::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            trusted_proxies: Vec::new(),
            storage_dir: PathBuf::from("data/viewnode"),
            storage: StorageConfig::default(),
            master_key: Secret::default(),
            master_key_id: 1,
            token_public_key: String::new(),
            manager_secret: Secret::default(),
            shutdown_grace_secs: 20,
            backup_read_key: Secret::default(),
            manager_url: String::new(),
            // 25 MB/s re-reads 1 TB in about 11 hours, a small share of
            // one disk's bandwidth, leaving the rest to viewers.
            scrub_rate_mb_per_sec: 25.0,
            scrub_interval_secs: 24 * 3600,
            journal_forward_secs: 5,
            journal_flush_secs: 10,
            journal_max_unwritten: crate::journal::MAX_UNWRITTEN,
            price_poll_secs: 15,
            // A month to look at what went wrong; a disk that keeps
            // corrupting copies does not fill up with their carcasses.
            quarantine_keep_days: 30,
            status_stale_secs: 300,
            server: shared::server::ServerConfig::default(),
            metrics_allow: Vec::new(),
        }
    }
}

/// `[storage]`: the blob backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `local` (under `storage_dir`) or `s3`.
    pub kind: StorageKind,
    /// The S3 endpoint, e.g. `http://127.0.0.1:3900` (Garage) or
    /// `https://s3.eu-west-1.amazonaws.com`.
    pub endpoint: String,
    /// The region the store signs for (`garage` for Garage's default).
    pub region: String,
    /// The bucket; one per node (two nodes sharing one bucket would be one
    /// copy, not two).
    pub bucket: String,
    /// Access key id with read, write and delete on the bucket.
    pub key_id: String,
    /// Its secret key.
    pub secret_key: Secret,
    /// Path-style URLs (`endpoint/bucket/key`), as Garage and MinIO expect
    /// unless their virtual-host domains are set up.
    pub path_style: bool,
    /// The store refuses a write over an existing name when asked with
    /// `If-None-Match: *` (AWS S3, MinIO, Ceph RGW 18+). Garage 2.x ignores
    /// the header: leave this off and the node checks for the name
    /// itself before committing (see `store/bucket.rs` for the race).
    pub conditional_put: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            kind: StorageKind::Local,
            endpoint: String::new(),
            region: "garage".into(),
            bucket: String::new(),
            key_id: String::new(),
            secret_key: Secret::default(),
            path_style: true,
            conditional_put: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Local,
    S3,
}

impl Config {
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut fig = Figment::new();
        if let Some(f) = file {
            if !f.exists() {
                anyhow::bail!("config file {} does not exist", f.display());
            }
            fig = fig.merge(Toml::file(f));
        }
        // `VIEWNODE_CONFIG` names the file itself, not a field.
        // `__` reaches into tables: VIEWNODE_STORAGE__SECRET_KEY=… keeps the
        // bucket's secret out of the file.
        Self::from_figment(fig.merge(Env::prefixed("VIEWNODE_").ignore(&["config"]).split("__")))
    }

    /// A configuration from TOML text alone (no file, no environment),
    /// checked as [`Config::load`] checks it (the fuzz target feeds it).
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        Self::from_figment(Figment::new().merge(Toml::string(text)))
    }

    fn from_figment(fig: Figment) -> anyhow::Result<Self> {
        let cfg: Config = fig
            .extract()
            .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let field = |name: &str, why: &str| anyhow::anyhow!("configuration field `{name}`: {why}");
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(field("name", "must be set to letters, digits, '-' or '_'"));
        }
        if shared::MasterKey::from_hex(self.master_key_id, self.master_key.expose()).is_err() {
            return Err(field("master_key", "must be 64 hex characters (32 bytes)"));
        }
        if shared::TokenVerifier::from_public_hex(&self.token_public_key).is_err() {
            return Err(field(
                "token_public_key",
                "must be the manager's Ed25519 public key, 64 hex characters",
            ));
        }
        match hex::decode(self.manager_secret.expose()) {
            Ok(b) if b.len() >= 16 => {}
            _ => {
                return Err(field(
                    "manager_secret",
                    "must be at least 32 hex characters",
                ))
            }
        }
        if !self.backup_read_key.is_empty()
            && !matches!(hex::decode(self.backup_read_key.expose()), Ok(b) if b.len() == 32)
        {
            return Err(field(
                "backup_read_key",
                "must be 64 hex characters (32 bytes)",
            ));
        }
        let is_http = |u: &str| u.starts_with("http://") || u.starts_with("https://");
        if !self.public_url.is_empty() && !is_http(&self.public_url) {
            return Err(field("public_url", "must start with http:// or https://"));
        }
        if !self.manager_url.is_empty() && !is_http(&self.manager_url) {
            return Err(field("manager_url", "must start with http:// or https://"));
        }
        if !(self.scrub_rate_mb_per_sec.is_finite()
            && (0.01..=100_000.0).contains(&self.scrub_rate_mb_per_sec))
        {
            return Err(field(
                "scrub_rate_mb_per_sec",
                "must be between 0.01 and 100000 (MB/s)",
            ));
        }
        if !(1..=300).contains(&self.journal_forward_secs) {
            return Err(field("journal_forward_secs", "must be between 1 and 300"));
        }
        if !(1..=10_000_000).contains(&self.journal_max_unwritten) {
            return Err(field(
                "journal_max_unwritten",
                "must be between 1 and 10000000",
            ));
        }
        if !(1..=60).contains(&self.journal_flush_secs) {
            return Err(field("journal_flush_secs", "must be between 1 and 60"));
        }
        if !self.tls_listen.is_empty() {
            if self.tls_listen.parse::<SocketAddr>().is_err() {
                return Err(field(
                    "tls_listen",
                    "must be an address such as 0.0.0.0:8444",
                ));
            }
            if self.tls_cert.as_os_str().is_empty() || self.tls_key.as_os_str().is_empty() {
                return Err(field(
                    "tls_cert",
                    "tls_listen needs tls_cert and tls_key (PEM files from `manager init-cluster --tls`)",
                ));
            }
        }
        if !(1..=60).contains(&self.price_poll_secs) {
            return Err(field("price_poll_secs", "must be between 1 and 60"));
        }
        if !(5..=86_400).contains(&self.status_stale_secs) {
            return Err(field("status_stale_secs", "must be between 5 and 86400"));
        }
        if let Err((name, why)) = self.server.validate() {
            return Err(field(&format!("server.{name}"), why));
        }
        if self.storage.kind == StorageKind::S3 {
            let s = &self.storage;
            if !is_http(&s.endpoint) {
                return Err(field(
                    "storage.endpoint",
                    "must be the S3 endpoint's http:// or https:// URL",
                ));
            }
            // S3's own rule: 3-63 lower-case letters, digits, '-' and '.'.
            if !(3..=63).contains(&s.bucket.len())
                || !s
                    .bucket
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            {
                return Err(field(
                    "storage.bucket",
                    "must be a bucket name: 3-63 lower-case letters, digits, '-' or '.'",
                ));
            }
            if s.key_id.is_empty() || s.secret_key.is_empty() {
                return Err(field(
                    "storage.key_id",
                    "kind = \"s3\" needs key_id and secret_key",
                ));
            }
            if s.region.is_empty() {
                return Err(field("storage.region", "must be set (Garage: `garage`)"));
            }
        }
        if self.quarantine_keep_days > 3650 {
            return Err(field(
                "quarantine_keep_days",
                "must be at most 3650 (0 keeps them until removed by hand)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name = \"toronto\"\nmaster_key = \"1111111111111111111111111111111111111111111111111111111111111111\"\n\
        token_public_key = \"3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29\"\n\
        manager_secret = \"00112233445566778899aabbccddeeff\"\n";

    fn with_storage(table: &str) -> anyhow::Result<Config> {
        Config::from_toml(&format!("{BASE}[storage]\n{table}"))
    }

    #[test]
    fn a_bucket_is_checked_field_by_field_and_its_secret_never_printed() {
        let good =
            "kind = \"s3\"\nendpoint = \"http://127.0.0.1:3900\"\nbucket = \"slmedia-toronto\"\n\
                    key_id = \"GK31c2f218a2e44f485b94239e\"\nsecret_key = \"s3cr3t-value-9f1b\"\n";
        let cfg = with_storage(good).unwrap();
        assert_eq!(cfg.storage.kind, StorageKind::S3);
        assert!(cfg.storage.path_style && !cfg.storage.conditional_put);
        assert!(!format!("{cfg:?}").contains("s3cr3t-value-9f1b"));
        for (bad, field) in [
            (
                good.replace("http://127.0.0.1:3900", "127.0.0.1:3900"),
                "storage.endpoint",
            ),
            (
                good.replace("slmedia-toronto", "Slmedia_Toronto"),
                "storage.bucket",
            ),
            (good.replace("slmedia-toronto", "ab"), "storage.bucket"),
            (good.replace("s3cr3t-value-9f1b", ""), "storage.key_id"),
            (good.replace("kind = \"s3\"", "kind = \"ftp\""), "kind"),
        ] {
            let err = with_storage(&bad).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        // A local node needs none of it.
        assert_eq!(with_storage("").unwrap().storage.kind, StorageKind::Local);
    }
}
