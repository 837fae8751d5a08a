//! Talking to view nodes: signed pushes of sealed blobs, and a health monitor
//! whose view the redirector trusts when it picks a mirror.

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
}

impl Node {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
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
}

impl Nodes {
    pub fn new(cfgs: &[NodeConfig]) -> anyhow::Result<Self> {
        let list = cfgs
            .iter()
            .map(|c| {
                Ok(Node {
                    secret: hex::decode(c.secret.expose())?,
                    cfg: c.clone(),
                    // Optimistic until the first probe says otherwise, so a
                    // fresh manager can redirect at once.
                    healthy: AtomicBool::new(true),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            list: Arc::new(list),
            http,
        })
    }

    pub fn get(&self, name: &str) -> Option<&Node> {
        self.list.iter().find(|n| n.cfg.name == name)
    }

    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|n| n.cfg.name.clone()).collect()
    }

    /// Streams the sealed file to `node` in constant memory. The node
    /// re-hashes what it receives and commits only if it equals `blob`; a
    /// 2xx answer therefore means "a verified copy is stored".
    pub async fn push(&self, node: &Node, blob: &BlobId, file: &Path) -> Result<(), PushError> {
        let f = tokio::fs::File::open(file).await?;
        let len = f.metadata().await?.len();
        let path = format!("/internal/v1/blobs/{blob}");
        let now = shared::runtime::unix_now();
        let auth = shared::sign_request(
            &node.secret,
            "manager",
            "PUT",
            &path,
            now,
            &blob.to_string(),
        );
        let body =
            reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024));
        let resp = self
            .http
            .put(format!("{}{}", node.cfg.url.trim_end_matches('/'), path))
            .header(shared::AUTH_HEADER, auth)
            .header(shared::DATE_HEADER, now.to_string())
            .header(reqwest::header::CONTENT_LENGTH, len)
            // A node that accepts and then stalls must not hang the pipeline:
            // a minute plus one second per MiB (a floor of 1 MiB/s).
            .timeout(Duration::from_secs(60 + len / (1 << 20)))
            .body(body)
            .send()
            .await
            .map_err(|e| PushError::Unreachable(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        Err(PushError::Refused {
            status: status.as_u16(),
            code: v["error"]["code"].as_str().unwrap_or("unknown").into(),
            message: v["error"]["message"].as_str().unwrap_or("").into(),
        })
    }

    async fn probe(&self, node: &Node) -> bool {
        let url = format!("{}/healthz", node.cfg.url.trim_end_matches('/'));
        matches!(
            self.http.get(url).timeout(Duration::from_secs(3)).send().await,
            Ok(r) if r.status().is_success()
        )
    }

    /// Probes every node every `every`, until `stop` fires.
    pub async fn monitor(self, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut last: HashMap<String, bool> = HashMap::new();
        loop {
            for node in self.list.iter() {
                let ok = self.probe(node).await;
                node.healthy.store(ok, Ordering::Relaxed);
                metrics::gauge!("manager_node_healthy", "node" => node.cfg.name.clone())
                    .set(if ok { 1.0 } else { 0.0 });
                if last.insert(node.cfg.name.clone(), ok) != Some(ok) {
                    if ok {
                        tracing::info!(node = %node.cfg.name, "node healthy");
                    } else {
                        tracing::warn!(node = %node.cfg.name, "node failed its health check");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
