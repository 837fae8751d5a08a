//! Telling the operator: alert messages to every configured channel, each
//! attempt written to the delivery log with the receiving end's answer,
//! retried with back-off; and a heartbeat to an outside URL so a manager
//! that died is noticed by something that is not the manager.
//!
//! Channels (docs/operations.md, "Monitoring and alerts"):
//! - webhooks: the body is Prometheus Alertmanager's webhook payload
//!   (version 4), so anything that takes Alertmanager's (a chat bridge, an
//!   on-call service) takes ours; it is signed as Standard Webhooks says
//!   (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
//!   HMAC-SHA256 of "id.timestamp.body">`), so the receiver can tell it
//!   from a forgery and a replay.
//! - e-mail over SMTP (`lettre`), plain text.
//!
//! Which messages to send, and when, is the monitor's business.

use std::{sync::Arc, time::Duration};

use base64::Engine;
use hmac::{Hmac, Mac};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{
    catalog::{Delivery, SharedCatalog},
    config::{webhook_key, AlertsConfig, EmailConfig, WebhookConfig},
    domain::Health,
};

/// Waits before the second, third and fourth attempt of a delivery.
const RETRY_AFTER: [Duration; 3] = [
    Duration::from_secs(10),
    Duration::from_secs(60),
    Duration::from_secs(300),
];
/// Longest wait for a receiving end's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// What is kept of a receiving end's answer in the delivery log.
const ANSWER_KEEP: usize = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Firing,
    Resolved,
    Test,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Firing => "firing",
            Kind::Resolved => "resolved",
            Kind::Test => "test",
        }
    }
}

/// One thing to tell the operator.
#[derive(Debug, Clone)]
pub struct Message {
    /// The check id or alert code (`node.utah`, `movie_damaged`).
    pub subject: String,
    pub kind: Kind,
    /// How bad it is when firing.
    pub state: Health,
    pub component: String,
    /// One line for a person.
    pub summary: String,
    /// What was found.
    pub detail: String,
    pub starts_at: i64,
    /// When it ended (resolved), or when a one-off event stops counting.
    pub ends_at: Option<i64>,
}

impl Message {
    fn severity(&self) -> &'static str {
        match (self.kind, self.state) {
            (Kind::Test, _) => "info",
            (_, Health::Down) => "critical",
            _ => "warning",
        }
    }

    fn title(&self) -> String {
        match self.kind {
            Kind::Firing => format!("[FIRING] {}: {}", self.subject, self.summary),
            Kind::Resolved => format!("[RESOLVED] {}: {}", self.subject, self.summary),
            Kind::Test => format!("[TEST] {}", self.summary),
        }
    }
}

/// `webhook-signature`'s value for `body` sent as message `id` at `ts`.
pub fn webhook_signature(key: &[u8], id: &str, ts: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// RFC 3339 in UTC, as Alertmanager and Atom write times.
pub fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The body Alertmanager's webhook receiver would get for `m` (version 4).
pub fn alertmanager_body(receiver: &str, m: &Message, public_url: &str) -> serde_json::Value {
    let status = if m.kind == Kind::Resolved {
        "resolved"
    } else {
        "firing"
    };
    let labels = json!({
        "alertname": m.subject,
        "check": m.subject,
        "component": m.component,
        "severity": m.severity(),
        "service": "slmedia",
        "instance": public_url,
    });
    let annotations = json!({
        "summary": m.summary,
        "description": m.detail,
        "runbook": format!("docs/operations.md, runbook \"{}\"", runbook_name(&m.subject)),
    });
    let fingerprint = hex::encode(&Sha256::digest(format!("{public_url}\n{}", m.subject))[..8]);
    json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{}\"}}", m.subject),
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": { "alertname": m.subject },
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": format!("{public_url}/admin/alerts"),
        "alerts": [{
            "status": status,
            "labels": labels,
            "annotations": annotations,
            "startsAt": rfc3339(m.starts_at),
            "endsAt": m.ends_at.map(rfc3339).unwrap_or_else(|| "0001-01-01T00:00:00Z".into()),
            "generatorURL": format!("{public_url}/admin"),
            "fingerprint": fingerprint,
        }],
    })
}

/// The runbook section for a check (`node.utah` → `node`).
pub fn runbook_name(subject: &str) -> &str {
    subject.split('.').next().unwrap_or(subject)
}

/// Sends messages to every channel and keeps the delivery log.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: AlertsConfig,
    db: SharedCatalog,
    http: reqwest::Client,
    public_url: String,
    /// Per subject, the newest message's number: a retry of an older one
    /// (a late "firing" after its "resolved") is dropped.
    newest: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    heartbeat_failing: std::sync::atomic::AtomicBool,
}

impl Notifier {
    pub fn new(cfg: AlertsConfig, db: SharedCatalog, public_url: String) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(ATTEMPT_TIMEOUT)
            .build()?;
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                db,
                http,
                public_url,
                newest: Default::default(),
                heartbeat_failing: Default::default(),
            }),
        })
    }

    /// Every channel by name: `webhook:<name>`, `email`.
    pub fn channels(&self) -> Vec<String> {
        let mut c: Vec<String> = self
            .inner
            .cfg
            .webhooks
            .iter()
            .map(|w| format!("webhook:{}", w.name))
            .collect();
        if !self.inner.cfg.email.smtp_host.is_empty() {
            c.push("email".into());
        }
        c
    }

    /// Sends `m` to every channel in the background, each with its retries.
    pub fn send(&self, m: Message) {
        let seq = {
            let mut newest = self.inner.newest.lock().unwrap_or_else(|e| e.into_inner());
            let n = newest.entry(m.subject.clone()).or_insert(0);
            *n += 1;
            *n
        };
        for channel in self.channels() {
            let me = self.clone();
            let m = m.clone();
            tokio::spawn(async move {
                for attempt in 1..=RETRY_AFTER.len() + 1 {
                    if attempt > 1 && !me.is_newest(&m.subject, seq) {
                        return;
                    }
                    if me.attempt(&channel, &m, attempt).await.is_ok() {
                        return;
                    }
                    if let Some(wait) = RETRY_AFTER.get(attempt - 1) {
                        tokio::time::sleep(*wait).await;
                    }
                }
                tracing::error!(%channel, subject = %m.subject, "an alert could not be delivered after every retry");
            });
        }
    }

    fn is_newest(&self, subject: &str, seq: u64) -> bool {
        self.inner
            .newest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(subject)
            .is_none_or(|n| *n == seq)
    }

    /// One test message to `channel`, answered with the receiving end's
    /// answer (the admin's "send test" button). `None`: no such channel.
    pub async fn test(&self, channel: &str, who: &str) -> Option<Result<String, String>> {
        if !self.channels().iter().any(|c| c == channel) {
            return None;
        }
        let at = crate::catalog::now();
        let m = Message {
            subject: "test".into(),
            kind: Kind::Test,
            state: Health::Ok,
            component: "internal".into(),
            summary: format!(
                "a test message from the manager at {}, sent by {who}",
                self.inner.public_url
            ),
            detail: "If you read this, alerts reach you through this channel.".into(),
            starts_at: at,
            ends_at: Some(at),
        };
        Some(self.attempt(channel, &m, 1).await)
    }

    /// One attempt, logged with its answer.
    async fn attempt(&self, channel: &str, m: &Message, attempt: usize) -> Result<String, String> {
        let r = match channel.strip_prefix("webhook:") {
            Some(name) => match self.inner.cfg.webhooks.iter().find(|w| w.name == name) {
                Some(w) => self.webhook(w, m).await,
                None => Err("no such webhook".into()),
            },
            None => email(&self.inner.cfg.email, m).await,
        };
        let answer = match &r {
            Ok(a) | Err(a) => a.chars().take(ANSWER_KEEP).collect::<String>(),
        };
        if r.is_err() {
            tracing::warn!(%channel, subject = %m.subject, attempt, %answer, "alert delivery failed");
        }
        self.log(Delivery {
            at: crate::catalog::now(),
            channel: channel.to_string(),
            subject: m.subject.clone(),
            kind: m.kind.as_str().into(),
            attempt: attempt as i64,
            ok: r.is_ok(),
            answer,
        })
        .await;
        r
    }

    async fn log(&self, d: Delivery) {
        if let Err(e) = self.inner.db.record_delivery(&d).await {
            // The database may be what is failing; the log line stays.
            tracing::warn!(channel = %d.channel, ok = d.ok, answer = %d.answer, "delivery not recorded: {e}");
        }
    }

    async fn webhook(&self, w: &WebhookConfig, m: &Message) -> Result<String, String> {
        let body = serde_json::to_vec(&alertmanager_body(&w.name, m, &self.inner.public_url))
            .expect("JSON values serialise");
        let mut req = self
            .inner
            .http
            .post(&w.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(key) = webhook_key(w.secret.expose()) {
            let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
            let ts = crate::catalog::now();
            req = req
                .header("webhook-signature", webhook_signature(&key, &id, ts, &body))
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string());
        }
        // Without the URL: webhook URLs often carry their token.
        let mut resp = req
            .body(body)
            .send()
            .await
            .map_err(|e| crate::nodecall::explain(&e.without_url()))?;
        let status = resp.status();
        // Read no more of the answer than the log keeps.
        let cap = ANSWER_KEEP * 4;
        let mut text = Vec::new();
        while text.len() < cap {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = cap - text.len();
                    text.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                _ => break,
            }
        }
        let text = String::from_utf8_lossy(&text);
        let answer = format!("HTTP {}: {}", status.as_u16(), text.trim());
        if status.is_success() {
            Ok(answer)
        } else {
            Err(answer)
        }
    }

    /// Pings the heartbeat URL (in the background). The monitor calls it
    /// after each run, so the pings stop when the monitor does, not only
    /// when the process dies. Only failures, and the first success after
    /// one, go to the delivery log: a minute's "ok" would bury the rest.
    pub fn heartbeat(&self) {
        if self.inner.cfg.heartbeat_url.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let r = match me.inner.http.get(&me.inner.cfg.heartbeat_url).send().await {
                Ok(r) if r.status().is_success() => Ok(format!("HTTP {}", r.status().as_u16())),
                Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
                Err(e) => Err(crate::nodecall::explain(&e.without_url())),
            };
            let was_failing = me
                .inner
                .heartbeat_failing
                .swap(r.is_err(), std::sync::atomic::Ordering::Relaxed);
            if r.is_err() || was_failing {
                me.log(Delivery {
                    at: crate::catalog::now(),
                    channel: "heartbeat".into(),
                    subject: "heartbeat".into(),
                    kind: "heartbeat".into(),
                    attempt: 1,
                    ok: r.is_ok(),
                    answer: match &r {
                        Ok(a) | Err(a) => a.clone(),
                    },
                })
                .await;
            }
        });
    }
}

async fn email(cfg: &EmailConfig, m: &Message) -> Result<String, String> {
    use lettre::message::{header::ContentType, Mailbox};
    let from: Mailbox = cfg.from.parse().map_err(|e| format!("from: {e}"))?;
    let mut b = lettre::Message::builder()
        .from(from)
        .subject(m.title())
        .header(ContentType::TEXT_PLAIN);
    for to in &cfg.to {
        b = b.to(to.parse().map_err(|e| format!("to {to}: {e}"))?);
    }
    let text = format!(
        "{}\n\nCheck: {}\nComponent: {}\nState: {}\nSince: {}\n\n{}\n\nRunbook: docs/operations.md, \"{}\".\n",
        m.title(),
        m.subject,
        m.component,
        if m.kind == Kind::Resolved { "resolved" } else { m.state.as_str() },
        rfc3339(m.starts_at),
        m.detail,
        runbook_name(&m.subject),
    );
    let msg = b.body(text).map_err(|e| e.to_string())?;
    let builder = match cfg.tls.as_str() {
        "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(&cfg.smtp_host),
        "starttls" => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&cfg.smtp_host),
        _ => Ok(AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(
            &cfg.smtp_host,
        )),
    }
    .map_err(|e| e.to_string())?;
    let mut builder = builder.port(cfg.smtp_port).timeout(Some(ATTEMPT_TIMEOUT));
    if !cfg.username.is_empty() {
        builder = builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
            cfg.username.clone(),
            cfg.password.expose().to_string(),
        ));
    }
    let resp = builder.build().send(msg).await.map_err(|e| e.to_string())?;
    Ok(format!(
        "SMTP {}: {}",
        resp.code(),
        resp.message().collect::<Vec<_>>().join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_standard_webhooks_example() {
        // The example in the Standard Webhooks specification.
        let key = webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            webhook_signature(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(webhook_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_none());
        assert!(
            webhook_key("whsec_c2hvcnQ=").is_none(),
            "5 bytes is too short"
        );
    }

    #[test]
    fn bodies_have_alertmanagers_shape() {
        let m = Message {
            subject: "node.utah".into(),
            kind: Kind::Firing,
            state: Health::Down,
            component: "playback:utah".into(),
            summary: "node utah is down".into(),
            detail: "connection refused".into(),
            starts_at: 1_796_000_000,
            ends_at: None,
        };
        let b = alertmanager_body("ops", &m, "https://m.example");
        assert_eq!(b["version"], "4");
        assert_eq!(b["status"], "firing");
        assert_eq!(b["receiver"], "ops");
        let a = &b["alerts"][0];
        assert_eq!(a["labels"]["alertname"], "node.utah");
        assert_eq!(a["labels"]["severity"], "critical");
        assert_eq!(a["startsAt"], "2026-11-30T00:53:20Z");
        assert_eq!(a["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(a["annotations"]["description"], "connection refused");
        assert_eq!(a["fingerprint"].as_str().unwrap().len(), 16);
        let r = alertmanager_body(
            "ops",
            &Message {
                kind: Kind::Resolved,
                ends_at: Some(1_796_000_060),
                ..m
            },
            "https://m.example",
        );
        assert_eq!(r["status"], "resolved");
        assert_eq!(r["alerts"][0]["endsAt"], "2026-11-30T00:54:20Z");
    }
}
