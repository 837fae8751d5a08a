//! Talking to view nodes: signed pushes of sealed blobs, node-to-node copies
//! (streamed through the manager) for repairs, inventories and deletions for
//! reconciliation, the check of a node's own signed reports, and a health
//! monitor whose view the redirector trusts when it picks a mirror.
//!
//! Every call carries an HMAC signature with the secret shared with that
//! node (`shared::nodeauth`); the key id is `manager` one way and the node's
//! name the other way. Answers are checked the same way ([`crate::nodecall`]).

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use shared::BlobId;

use crate::config::NodeConfig;

pub struct Node {
    pub cfg: NodeConfig,
    secret: Vec<u8>,
    healthy: AtomicBool,
    /// Out of rotation by an operator: no new viewers sent, no new copies
    /// pushed (see [`crate::console::drain`]).
    drained: AtomicBool,
    last_probe: std::sync::Mutex<Option<Probe>>,
    /// What the last reconciliation's inventory said, for the console.
    last_inventory: std::sync::Mutex<Option<InventorySeen>>,
    /// Viewers sent here since the manager started.
    redirects: std::sync::atomic::AtomicU64,
}

/// The counts and scrub status of a node's last inventory, and when.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InventorySeen {
    pub at: i64,
    pub counts: shared::protocol::InventoryCounts,
    pub scrub: serde_json::Value,
}

/// The monitor's last look at a node, for the operator's console.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    pub at: i64,
    pub ok: bool,
    /// `ok`, or why not (the answer's status or the connection error).
    pub detail: String,
    /// The node's `/healthz` body when it sent one (version, checks, disk).
    pub report: Option<serde_json::Value>,
    /// The node's clock minus ours, milliseconds (from its report's
    /// `time_ms` against the middle of the request).
    pub skew_ms: Option<i64>,
    /// When the certificate the node answered with expires (unix seconds);
    /// `None` over plain HTTP.
    pub cert_expires_at: Option<i64>,
}

impl Node {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    pub fn set_drained(&self, drained: bool) {
        self.drained.store(drained, Ordering::Relaxed)
    }

    pub fn last_inventory(&self) -> Option<InventorySeen> {
        self.last_inventory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_last_inventory(&self, inv: &Inventory, at: i64) {
        *self
            .last_inventory
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(InventorySeen {
            at,
            counts: inv.counts.clone(),
            scrub: inv.scrub.clone(),
        });
    }

    /// Counts a viewer sent here.
    pub fn count_redirect(&self) {
        self.redirects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn redirects(&self) -> u64 {
        self.redirects.load(Ordering::Relaxed)
    }

    /// `None` until the monitor's first probe.
    pub fn last_probe(&self) -> Option<Probe> {
        self.last_probe
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Largest `/healthz` body kept: a node's report is a few hundred bytes.
const MAX_HEALTH_REPORT: usize = 16 * 1024;

/// The body, or `None` once it passes `max` bytes (read no further).
async fn read_bounded(mut r: reqwest::Response, max: usize) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = r.chunk().await {
        if body.len() + chunk.len() > max {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body)
}

#[derive(Clone)]
pub struct Nodes {
    pub list: Arc<Vec<Node>>,
    http: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("node unreachable: {0}")]
    Unreachable(String),
    #[error("node refused the blob ({status}): {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot read the sealed blob: {0}")]
    Local(#[from] std::io::Error),
    #[error("{0}")]
    Unauthentic(String),
}

impl From<crate::nodecall::AnswerError> for PushError {
    fn from(e: crate::nodecall::AnswerError) -> Self {
        match e {
            crate::nodecall::AnswerError::Unreachable(m) => PushError::Unreachable(m),
            e @ crate::nodecall::AnswerError::Unauthentic => PushError::Unauthentic(e.to_string()),
        }
    }
}

/// A node's answer to `GET /internal/v1/blobs` (wire types in `shared`).
pub use shared::protocol::{HeldBlob, Inventory, QuarantinedBlob};

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

impl Nodes {
    pub fn new(cfgs: &[NodeConfig], ca_pem: &str) -> anyhow::Result<Self> {
        let list = cfgs
            .iter()
            .map(|c| {
                Ok(Node {
                    secret: hex::decode(c.secret.expose())?,
                    cfg: c.clone(),
                    // Optimistic until the first probe says otherwise, so a
                    // fresh manager can redirect at once.
                    healthy: AtomicBool::new(true),
                    drained: AtomicBool::new(false),
                    last_probe: std::sync::Mutex::new(None),
                    last_inventory: std::sync::Mutex::new(None),
                    redirects: std::sync::atomic::AtomicU64::new(0),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let http = crate::nodecall::client(ca_pem)?;
        Ok(Self {
            list: Arc::new(list),
            http,
        })
    }

    /// The MAC for our answer to a request a node signed with `auth`
    /// (key id = its name); `None` for an unknown key id.
    pub fn answer_mac(&self, auth: &str, status: u16, body: &[u8]) -> Option<String> {
        let node = self.get(shared::auth_key_id(auth)?)?;
        Some(shared::answer_mac(&node.secret, auth, status, body))
    }

    pub fn get(&self, name: &str) -> Option<&Node> {
        self.list.iter().find(|n| n.cfg.name == name)
    }

    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|n| n.cfg.name.clone()).collect()
    }

    /// Checks a request a node signed with its own secret (key id = its
    /// name) and returns that name. An unknown name, or a signature made
    /// for another node than `claimed`, is refused.
    pub fn verify_from_node(
        &self,
        claimed: &str,
        headers: &axum::http::HeaderMap,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<String, shared::NodeAuthError> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        shared::verify_request(
            |key_id| {
                (key_id == claimed)
                    .then(|| self.get(key_id).map(|n| n.secret.clone()))
                    .flatten()
            },
            header(shared::AUTH_HEADER),
            method,
            path,
            header(shared::DATE_HEADER),
            shared::runtime::unix_now(),
            &shared::content_sha256_hex(body),
        )
    }

    fn signed(
        &self,
        node: &Node,
        method: reqwest::Method,
        path: &str,
        content_sha256: &str,
    ) -> crate::nodecall::Call {
        crate::nodecall::signed(
            &self.http,
            &node.cfg.url,
            &node.secret,
            "manager",
            method,
            path,
            content_sha256,
        )
    }

    fn refused(status: reqwest::StatusCode, body: &[u8]) -> PushError {
        let (code, message) = crate::nodecall::refusal(body);
        PushError::Refused {
            status: status.as_u16(),
            code,
            message,
        }
    }

    /// What `node` holds: good copies, quarantined ones, proof times.
    pub async fn inventory(&self, node: &Node) -> Result<Inventory, PushError> {
        let (status, body) = self
            .signed(
                node,
                reqwest::Method::GET,
                "/internal/v1/blobs",
                EMPTY_SHA256,
            )
            .send_checked(&node.secret, Duration::from_secs(30))
            .await?;
        if !status.is_success() {
            return Err(Self::refused(status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| PushError::Unreachable(format!("unreadable inventory: {e}")))
    }

    /// Copies `blob` from `source` to `target`, streamed through the manager
    /// in constant memory. The source re-hashes what it sends (and cuts the
    /// body off if its copy went bad); the target re-hashes what it gets and
    /// commits only a match, create-only, as for any push.
    pub async fn copy(
        &self,
        source: &Node,
        target: &Node,
        blob: &BlobId,
        len: u64,
    ) -> Result<(), PushError> {
        let path = format!("/internal/v1/blobs/{blob}");
        // The body is not MACed: the target re-hashes it against `blob`.
        let from = self
            .signed(source, reqwest::Method::GET, &path, EMPTY_SHA256)
            .send_streamed(&source.secret, Duration::from_secs(60 + len / (1 << 20)))
            .await
            .map_err(|e| match e {
                crate::nodecall::AnswerError::Unreachable(m) => {
                    PushError::Unreachable(format!("source {} unreachable: {m}", source.cfg.name))
                }
                e => e.into(),
            })?;
        let from = match from {
            Ok(resp) => resp,
            Err((status, body)) => {
                return Err(match Self::refused(status, &body) {
                    PushError::Refused {
                        status,
                        code,
                        message,
                    } => PushError::Refused {
                        status,
                        code: format!("source_{code}"),
                        message: format!("source {}: {message}", source.cfg.name),
                    },
                    other => other,
                })
            }
        };
        self.put(
            target,
            blob,
            reqwest::Body::wrap_stream(from.bytes_stream()),
            len,
        )
        .await
    }

    /// Asks `node` to re-hash its copy of `blob` now: `verified`,
    /// `quarantined` (it did not match; reported and repaired like a failed
    /// scrub) or `missing`, with the node's last-verified time.
    pub async fn verify_blob(
        &self,
        node: &Node,
        blob: &BlobId,
    ) -> Result<(String, Option<i64>), PushError> {
        let path = format!("/internal/v1/blobs/{blob}/verify");
        let (status, body) = self
            .signed(node, reqwest::Method::POST, &path, EMPTY_SHA256)
            // A whole movie read at disk speed, behind any other re-check.
            .send_checked(&node.secret, Duration::from_secs(600))
            .await?;
        // Only a 200's `state` is acted on: a 404 is a node without this
        // call (older code) or a proxy in the way, not a missing copy.
        if status != reqwest::StatusCode::OK {
            return Err(Self::refused(status, &body));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            state: String,
            verified_at: Option<i64>,
        }
        let a: Answer = serde_json::from_slice(&body)
            .map_err(|e| PushError::Unreachable(format!("unreadable answer: {e}")))?;
        Ok((a.state, a.verified_at))
    }

    /// Deletes `blob` from `node` (unreferenced past its grace period).
    pub async fn delete_blob(&self, node: &Node, blob: &BlobId) -> Result<(), PushError> {
        let path = format!("/internal/v1/blobs/{blob}");
        let (status, body) = self
            .signed(node, reqwest::Method::DELETE, &path, EMPTY_SHA256)
            .send_checked(&node.secret, Duration::from_secs(30))
            .await?;
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(Self::refused(status, &body))
    }

    /// Streams the sealed file to `node` in constant memory. The node
    /// re-hashes what it receives and commits only if it equals `blob`; a
    /// 2xx answer therefore means "a verified copy is stored".
    pub async fn push(&self, node: &Node, blob: &BlobId, file: &Path) -> Result<(), PushError> {
        let f = tokio::fs::File::open(file).await?;
        let len = f.metadata().await?.len();
        let body =
            reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024));
        self.put(node, blob, body, len).await
    }

    /// The signed, verified PUT behind [`Nodes::push`] and [`Nodes::copy`].
    async fn put(
        &self,
        node: &Node,
        blob: &BlobId,
        body: reqwest::Body,
        len: u64,
    ) -> Result<(), PushError> {
        let path = format!("/internal/v1/blobs/{blob}");
        let mut call = self.signed(node, reqwest::Method::PUT, &path, &blob.to_string());
        call.request = call
            .request
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body);
        // A node that accepts and then stalls must not hang the pipeline:
        // a minute plus one second per MiB (a floor of 1 MiB/s). Only an
        // answer the node MACed counts as "a verified copy is stored".
        let (status, body) = call
            .send_checked(&node.secret, Duration::from_secs(60 + len / (1 << 20)))
            .await?;
        if status.is_success() {
            return Ok(());
        }
        Err(Self::refused(status, &body))
    }

    /// Gives `node` the rendered status page to serve while the manager
    /// is down (signed like every call; the node keeps the newest).
    pub async fn put_status(&self, node: &Node, body: Vec<u8>) -> Result<(), PushError> {
        let sha = shared::content_sha256_hex(&body);
        let mut call = self.signed(node, reqwest::Method::PUT, "/internal/v1/status", &sha);
        call.request = call
            .request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let (status, body) = call
            .send_checked(&node.secret, Duration::from_secs(10))
            .await?;
        if status.is_success() {
            return Ok(());
        }
        Err(Self::refused(status, &body))
    }

    /// One `GET /healthz`: `Ok` on a success status, with the node's
    /// report when its body is JSON of a sane size.
    async fn probe(
        &self,
        node: &Node,
    ) -> (
        Result<(), String>,
        Option<serde_json::Value>,
        Option<i64>,
        Option<i64>,
    ) {
        let url = format!("{}/healthz", node.cfg.url.trim_end_matches('/'));
        let sent_ms = shared::runtime::unix_now_ms();
        let r = match self
            .http
            .get(url)
            .timeout(Duration::from_secs(3))
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return (Err(crate::nodecall::explain(&e)), None, None, None),
        };
        let status = r.status();
        let cert = crate::nodecall::cert_expiry(&r);
        let report: Option<serde_json::Value> = read_bounded(r, MAX_HEALTH_REPORT)
            .await
            .and_then(|b| serde_json::from_slice(&b).ok());
        let middle = (sent_ms + shared::runtime::unix_now_ms()) / 2;
        let skew = report
            .as_ref()
            .and_then(|r| r.get("time_ms"))
            .and_then(|t| t.as_i64())
            .map(|t| t - middle);
        if status.is_success() {
            (Ok(()), report, skew, cert)
        } else {
            (
                Err(format!("/healthz answered {status}")),
                report,
                skew,
                cert,
            )
        }
    }

    /// Probes every node every `every`, until `stop` fires.
    pub async fn monitor(self, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut last: HashMap<String, bool> = HashMap::new();
        // A node failing its check is the node's state, not the worker's.
        let worker = crate::workers::Worker::register("node-monitor");
        loop {
            worker.started();
            for node in self.list.iter() {
                let (probed, report, skew_ms, cert_expires_at) = self.probe(node).await;
                let ok = probed.is_ok();
                node.healthy.store(ok, Ordering::Relaxed);
                *node.last_probe.lock().unwrap_or_else(|e| e.into_inner()) = Some(Probe {
                    at: shared::runtime::unix_now(),
                    ok,
                    detail: probed
                        .as_ref()
                        .err()
                        .cloned()
                        .unwrap_or_else(|| "ok".into()),
                    report,
                    skew_ms,
                    cert_expires_at,
                });
                metrics::gauge!("manager_node_healthy", "node" => node.cfg.name.clone(), "site" => node.cfg.site().to_string())
                    .set(if ok { 1.0 } else { 0.0 });
                if last.insert(node.cfg.name.clone(), ok) != Some(ok) {
                    if ok {
                        tracing::info!(node = %node.cfg.name, "node healthy");
                    } else {
                        tracing::warn!(
                            node = %node.cfg.name,
                            "node failed its health check: {}",
                            probed.as_ref().err().map(String::as_str).unwrap_or("")
                        );
                    }
                }
            }
            worker.finished(Ok::<(), String>(()));
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => {
                    worker.stopped();
                    return;
                }
            }
        }
    }
}
