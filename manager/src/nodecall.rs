//! The manager's signed calls to view nodes, and the check of their
//! answers (`shared::nodeauth`): every request carries the HMAC of the
//! secret shared with that node, and every answer a node computed must
//! carry its MAC over that very request, the status and the body. Without
//! the second half, anyone on the path could answer "201 verified" to a
//! push (and the outbox copy would be deleted) or make up an inventory.
//! Streamed blob and backup bodies are not MACed: they are named by their
//! SHA-256 and re-hashed by whoever receives them.

use std::time::Duration;

/// The HTTP client for calls to nodes. With the cluster CA (`node_ca_cert`,
/// PEM) it trusts that CA alone for `https://` node URLs: a certificate
/// from any other CA, public ones included, is refused. Without it, the
/// web's public CAs (a node behind the operator's own certificate).
pub fn client(ca_pem: &str) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(30))
        // The monitor reads each node's certificate expiry off its answers.
        .tls_info(true);
    if !ca_pem.trim().is_empty() {
        b = b
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?);
    }
    Ok(b.build()?)
}

/// When the certificate the server answered `resp` with expires (unix
/// seconds); `None` over plain HTTP or from a client without `tls_info`.
pub fn cert_expiry(resp: &reqwest::Response) -> Option<i64> {
    let der = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()?
        .peer_certificate()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// When the first certificate in `pem` expires (unix seconds).
pub fn pem_expiry(pem: &str) -> Option<i64> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = p.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// For `manager backup restore` on an empty machine without the old
/// configuration: the cluster CA is not at hand yet, so any certificate is
/// taken. Safe for what it carries: listings are MACed with the recovery
/// key's read credential and backups are sealed with the recovery key, so
/// an impostor can refuse service but not forge or read a backup.
pub fn restore_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .danger_accept_invalid_certs(true)
        .build()
        .expect("a plain HTTP client builds")
}

/// Why a call failed, in words an operator can act on: a refused
/// certificate says so (the node's certificate is not from the cluster
/// CA, or the URL's host is not in it) instead of reqwest's nested error.
pub fn explain(e: &reqwest::Error) -> String {
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    if chain.contains("certificate") || chain.contains("UnknownIssuer") {
        format!("TLS refused (code node_tls_refused): the node's certificate is not one the cluster CA (node_ca_cert) issued for this address: {chain}")
    } else {
        chain
    }
}

/// A signed request, with the signature its answer must be bound to.
pub struct Call {
    pub request: reqwest::RequestBuilder,
    auth: String,
}

/// Signs `method path` (body hash `content_sha256`) to the node at `base`.
pub fn signed(
    http: &reqwest::Client,
    base: &str,
    secret: &[u8],
    key_id: &str,
    method: reqwest::Method,
    path: &str,
    content_sha256: &str,
) -> Call {
    let now = shared::runtime::unix_now();
    let auth = shared::sign_request(secret, key_id, method.as_str(), path, now, content_sha256);
    let request = http
        .request(method, format!("{}{path}", base.trim_end_matches('/')))
        .header(shared::AUTH_HEADER, &auth)
        .header(shared::DATE_HEADER, now.to_string());
    Call { request, auth }
}

/// Why an answer could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("{0}")]
    Unreachable(String),
    #[error("the answer does not carry the node's MAC for this request: someone on the path, or a node with another secret")]
    Unauthentic,
}

impl Call {
    /// Sends, reads the whole answer and checks its MAC. Returns the status
    /// and body of an authentic answer, success or refusal alike.
    pub async fn send_checked(
        self,
        secret: &[u8],
        timeout: Duration,
    ) -> Result<(reqwest::StatusCode, bytes::Bytes), AnswerError> {
        let resp = self
            .request
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| AnswerError::Unreachable(explain(&e)))?;
        check(resp, secret, &self.auth).await
    }

    /// Sends without reading the body: a success is a streamed blob or
    /// backup (checked against its name by the caller); a refusal is read
    /// and its MAC checked like any answer.
    pub async fn send_streamed(
        self,
        secret: &[u8],
        timeout: Duration,
    ) -> Result<Result<reqwest::Response, (reqwest::StatusCode, bytes::Bytes)>, AnswerError> {
        let resp = self
            .request
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| AnswerError::Unreachable(explain(&e)))?;
        if resp.status().is_success() {
            return Ok(Ok(resp));
        }
        Ok(Err(check(resp, secret, &self.auth).await?))
    }
}

/// Reads `resp` whole and checks the MAC a node put on it for the request
/// signed `auth`.
pub async fn check(
    resp: reqwest::Response,
    secret: &[u8],
    auth: &str,
) -> Result<(reqwest::StatusCode, bytes::Bytes), AnswerError> {
    let status = resp.status();
    let mac = resp
        .headers()
        .get(shared::ANSWER_MAC_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp
        .bytes()
        .await
        .map_err(|e| AnswerError::Unreachable(format!("answer cut off: {e}")))?;
    if !shared::verify_answer_mac(secret, auth, status.as_u16(), &body, &mac) {
        metrics::counter!("manager_node_answers_unauthentic_total").increment(1);
        tracing::warn!(
            code = "answer_unauthentic",
            %status,
            "a node's answer is not authenticated; ignoring it"
        );
        return Err(AnswerError::Unauthentic);
    }
    Ok((status, body))
}

/// The `{"error": {"code", "message"}}` of a refusal, or placeholders.
pub fn refusal(body: &[u8]) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    (
        v["error"]["code"].as_str().unwrap_or("unknown").into(),
        v["error"]["message"].as_str().unwrap_or("").into(),
    )
}
