//! The monitor: every check on a schedule, the results kept in the catalog
//! (so history and "was the operator told?" survive a restart), alerts sent
//! when a check goes bad, again while it stays bad, and when it recovers,
//! and the public status page's copy pushed to every node.
//!
//! The checks look at what a user would feel, not only at processes being
//! up: the database written and read back, the staging disk, the viewer's
//! path as Second Life's viewer takes it (a fresh media URL's `HEAD`, then a
//! `Range` request on every node, compared byte for byte), each node's own
//! health report, its disk and its clock, the code and shared configuration
//! each node runs (drift), backups, the queues, the books.
//!
//! Each result belongs to a component of the status page (`web`,
//! `playback:<site>`, `transcoding`, `backups`), or to `internal` for what
//! only the operator sees. docs/operations.md has a runbook per check.

use std::{
    collections::HashMap,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    alerts,
    catalog::{self, CheckResult, SharedCatalog},
    config::Config,
    domain::Health,
    nodes::Nodes,
    notify::{Kind, Message, Notifier},
    redirect::Minter,
    workers,
};

/// Bytes the viewer's-path check reads from each node.
const CANARY_BYTES: u64 = 64 * 1024;
/// The live database's integrity is checked this often.
const INTEGRITY_EVERY: i64 = 86_400;
/// Every balance is compared with its ledger this often.
const BOOKS_EVERY: i64 = 600;
/// The status page's copy on the nodes is refreshed at least this often.
const SNAPSHOT_EVERY: i64 = 60;

/// Renders the public status page (the HTTP layer's template) for the
/// copies the nodes serve when the manager is down.
pub type RenderStatus = Arc<dyn Fn(&crate::status::Page) -> String + Send + Sync>;

pub struct Monitor {
    pub db: SharedCatalog,
    pub cfg: Config,
    pub nodes: Nodes,
    pub minter: Arc<Minter>,
    pub notifier: Notifier,
    pub render_status: RenderStatus,
    /// When this process started: a new site has no backup yet.
    started_at: i64,
    /// The viewer's path is checked step by step (no redirects followed).
    http: reqwest::Client,
}

/// What the monitor remembers between runs; what it told the channels is
/// also in the catalog, but must hold when the catalog is what failed.
/// What the channels were last told about a check.
#[derive(Clone, Copy)]
struct Told {
    state: Health,
    at: i64,
    /// When the state announced began (a resolved message's `startsAt`).
    began: i64,
}

/// `certs` (what, expires at) judged at `at`: the soonest to expire
/// decides; degraded within `warn` seconds, down within a fifth of it.
fn cert_state(id: &str, mut certs: Vec<(String, i64)>, at: i64, warn: i64) -> CheckResult {
    certs.sort_by_key(|c| c.1);
    let Some((what, soonest)) = certs.first() else {
        return ok(id, "internal", "no certificate in use (plain HTTP)");
    };
    let left = soonest - at;
    let state = if left < warn / 5 {
        Health::Down
    } else if left < warn {
        Health::Degraded
    } else {
        Health::Ok
    };
    let when = crate::backup::format_utc(*soonest);
    let detail = if left <= 0 {
        format!("the certificate of {what} expired {when}")
    } else {
        format!(
            "the certificate of {what} expires soonest: {when}, in {}",
            crate::console::human_age(left)
        )
    };
    result(id, "internal", state, detail)
}

/// A certificate an answer came with during this run.
struct CertSeen {
    /// A node's name, or `manager`.
    who: String,
    what: &'static str,
    expires_at: i64,
}

#[derive(Default)]
struct Memory {
    /// Per (node or `manager`, which address): the last certificate
    /// expiry read off an answer.
    certs: HashMap<(String, &'static str), i64>,
    /// Per check: what was last announced.
    told: HashMap<String, Told>,
    integrity: Option<(i64, CheckResult)>,
    books: Option<(i64, CheckResult)>,
    /// Per one-off alert (code, detail): the raise last sent.
    alerts_sent: HashMap<(&'static str, String), i64>,
    /// Per alert code: when a message about it was last sent.
    alert_told: HashMap<&'static str, i64>,
    snapshot_at: i64,
    snapshot_hash: Vec<u8>,
    pruned_at: i64,
    /// When a failed prune was last logged.
    prune_failed_at: i64,
}

fn result(
    check_id: &str,
    component: &str,
    state: Health,
    detail: impl Into<String>,
) -> CheckResult {
    CheckResult {
        check_id: check_id.to_string(),
        component: component.to_string(),
        state,
        detail: detail.into(),
    }
}

fn ok(check_id: &str, component: &str, detail: impl Into<String>) -> CheckResult {
    result(check_id, component, Health::Ok, detail)
}

/// The status page's component a node's checks count towards: its site's
/// playback, unless an operator drained it (then users are not sent there,
/// and its state is the operator's business only).
fn node_component(n: &crate::nodes::Node) -> String {
    if n.is_drained() {
        "internal".into()
    } else {
        format!("playback:{}", n.cfg.site())
    }
}

/// Degraded below `low` percent free, down below a fifth of that.
fn disk_state(free_percent: u64, low: u64) -> Health {
    match free_percent {
        p if p < low / 5 => Health::Down,
        p if p < low => Health::Degraded,
        _ => Health::Ok,
    }
}

impl Monitor {
    pub fn new(
        db: SharedCatalog,
        cfg: Config,
        nodes: Nodes,
        minter: Arc<Minter>,
        notifier: Notifier,
        render_status: RenderStatus,
    ) -> anyhow::Result<Self> {
        // As a viewer's player: the public trust store, and each redirect
        // looked at rather than followed.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            // Certificates' expiry is read off the answers.
            .tls_info(true)
            .build()?;
        Ok(Self {
            db,
            cfg,
            nodes,
            minter,
            notifier,
            render_status,
            started_at: catalog::now(),
            http,
        })
    }

    /// Runs every check every `monitor.interval_secs` until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let worker = workers::Worker::register("monitor");
        let mut mem = Memory::default();
        if let Ok(states) = self.db.check_states().await {
            for s in states {
                if let (Some(state), Some(at)) = (s.notified_state, s.notified_at) {
                    let began = if s.state == state { s.since } else { at };
                    mem.told.insert(s.check_id, Told { state, at, began });
                }
            }
        }
        let every = Duration::from_secs(self.cfg.monitor.interval_secs);
        loop {
            worker.started();
            let r = self.run_once(&mut mem).await;
            worker.finished(r.map_err(|e| format!("{e:#}")));
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => {
                    worker.stopped();
                    return;
                }
            }
        }
    }

    /// On a manager that shares its database with others, while it does
    /// not lead: sends the one-off alerts raised in this process (a node's
    /// journal delivered here, an audit write that failed here, this
    /// process losing its lead), which the leader's monitor never sees.
    /// While it leads, its own monitor sends them: they are only marked
    /// as sent here, so none goes twice when the lead moves.
    pub async fn forward_alerts(
        self: Arc<Self>,
        leading: Arc<dyn Fn() -> bool + Send + Sync>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut mem = Memory::default();
        let every = Duration::from_secs(self.cfg.monitor.interval_secs.clamp(1, 10));
        loop {
            if leading() {
                for al in alerts::recent() {
                    mem.alerts_sent.insert((al.alert, al.detail.clone()), al.at);
                }
            } else {
                self.send_raised_alerts(&mut mem, catalog::now());
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn run_once(&self, mem: &mut Memory) -> anyhow::Result<()> {
        let at = catalog::now();
        let results = self.checks(mem, at).await;
        let max_gap = 2 * self.cfg.monitor.interval_secs as i64;
        let mut stored = 0;
        for r in &results {
            // When the state it is in began.
            let began = match self.db.record_check(r, at, max_gap).await {
                Ok(before) => {
                    stored += 1;
                    before
                        .filter(|b| b.state == r.state)
                        .map_or(at, |b| b.since)
                }
                Err(e) => {
                    tracing::warn!(check = %r.check_id, "check result not stored: {e}");
                    mem.told
                        .get(&r.check_id)
                        .filter(|t| t.state == r.state)
                        .map_or(at, |t| t.began)
                }
            };
            self.announce(mem, r, at, began);
            if r.state != Health::Ok {
                metrics::gauge!("manager_check_failing", "check" => r.check_id.clone()).set(1.0);
            } else {
                metrics::gauge!("manager_check_failing", "check" => r.check_id.clone()).set(0.0);
            }
        }
        self.send_raised_alerts(mem, at);
        // The pings stop when this loop does, not only when the process dies.
        self.notifier.heartbeat();
        if let Err(e) = self.push_snapshot(mem, at).await {
            tracing::warn!("status page copy not pushed: {e:#}");
        }
        if at - mem.pruned_at > 86_400 {
            let keep = self.cfg.monitor.keep_days as i64 * 86_400;
            // A day beyond the retention: an event is refused on arrival
            // before its row can be gone, even across a clock step.
            let views = self
                .db
                .prune_view_events(at - crate::ledger::VIEW_EVENT_KEEP_SECS - 86_400)
                .await;
            let history = self.db.prune_monitor(at - keep).await;
            match (&views, &history) {
                (Ok(n), Ok(())) => {
                    if *n > 0 {
                        tracing::info!(count = n, "view events past their retention deleted");
                    }
                    mem.pruned_at = at;
                }
                // Retried every cycle until it works; said once a day.
                (Err(e), _) | (_, Err(e)) if at - mem.prune_failed_at > 86_400 => {
                    mem.prune_failed_at = at;
                    tracing::warn!(
                        "old view events and check history could not be deleted (retrying): {e}"
                    );
                }
                _ => {}
            }
        }
        anyhow::ensure!(
            stored == results.len(),
            "{} of {} check results could not be stored",
            results.len() - stored,
            results.len()
        );
        Ok(())
    }

    /// Decides whether `r` is news for the channels, and sends it.
    /// `began`: when the state `r` reports began.
    fn announce(&self, mem: &mut Memory, r: &CheckResult, at: i64, began: i64) {
        let a = &self.cfg.alerts;
        let told = mem.told.get(&r.check_id).copied();
        let since_told = told.map_or(i64::MAX, |t| at - t.at);
        let kind = match (r.state, told) {
            (Health::Ok, Some(t)) if t.state != Health::Ok => Kind::Resolved,
            (Health::Ok, _) => return,
            (bad, Some(t)) if t.state == bad => {
                if a.repeat_secs == 0 || since_told < a.repeat_secs as i64 {
                    return;
                }
                Kind::Firing
            }
            _ => Kind::Firing,
        };
        // A flapping check: at most one message per check per gap. The
        // state differs from what was told, so the next run catches up.
        if since_told < a.min_gap_secs as i64 {
            return;
        }
        // A resolved message names what it resolves: the state and start
        // of the firing, so receivers match it with its alert.
        let (state, starts_at) = match (kind, told) {
            (Kind::Resolved, Some(t)) => (t.state, t.began),
            _ => (r.state, began),
        };
        self.notifier.send(Message {
            subject: r.check_id.clone(),
            kind,
            state,
            component: r.component.clone(),
            summary: summary(&r.check_id, r.state),
            detail: r.detail.clone(),
            starts_at,
            ends_at: (kind == Kind::Resolved).then_some(at),
        });
        mem.told.insert(
            r.check_id.clone(),
            Told {
                state: r.state,
                at,
                began,
            },
        );
        let (db, id, state) = (self.db.clone(), r.check_id.clone(), r.state);
        tokio::spawn(async move {
            if let Err(e) = db.mark_notified(&id, state, at).await {
                tracing::warn!(check = %id, "announcement not recorded: {e}");
            }
        });
    }

    /// One-off alerts (a refunded view served, a movie damaged) raised
    /// since they were last sent: one message per code listing every
    /// pending one, at most one per code per gap (the rest wait, never
    /// dropped).
    fn send_raised_alerts(&self, mem: &mut Memory, at: i64) {
        let gap = self.cfg.alerts.min_gap_secs as i64;
        let recent = alerts::recent();
        let mut pending: HashMap<&'static str, Vec<&alerts::Alert>> = HashMap::new();
        for al in &recent {
            let key = (al.alert, al.detail.clone());
            if mem.alerts_sent.get(&key).is_none_or(|sent| al.at > *sent) {
                pending.entry(al.alert).or_default().push(al);
            }
        }
        for (code, list) in pending {
            if mem.alert_told.get(code).is_some_and(|t| at - t < gap) {
                continue;
            }
            mem.alert_told.insert(code, at);
            let first = list[0];
            let mut detail: Vec<String> = list
                .iter()
                .take(20)
                .map(|al| {
                    format!(
                        "{} (raised {} time(s) since {})",
                        al.detail,
                        al.count,
                        crate::notify::rfc3339(al.first_at)
                    )
                })
                .collect();
            if list.len() > 20 {
                detail.push(format!("and {} more", list.len() - 20));
            }
            self.notifier.send(Message {
                subject: code.to_string(),
                kind: Kind::Firing,
                state: Health::Down,
                component: "internal".into(),
                summary: first.message.clone(),
                detail: detail.join("\n"),
                starts_at: list.iter().map(|a| a.at).min().unwrap_or(at),
                // An event, not a state: it stops counting by itself.
                ends_at: Some(at + 3600),
            });
            for al in list {
                mem.alerts_sent.insert((al.alert, al.detail.clone()), al.at);
            }
        }
        // Forget what the alert list no longer holds (it keeps 200).
        mem.alerts_sent.retain(|(code, detail), _| {
            recent
                .iter()
                .any(|a| a.alert == *code && a.detail == *detail)
        });
    }

    /// Every check once.
    async fn checks(&self, mem: &mut Memory, at: i64) -> Vec<CheckResult> {
        let mut out = Vec::new();
        out.push(match self.db.health_check().await {
            Ok(()) => ok("manager.database", "web", "written, read back and deleted"),
            Err(e) => result("manager.database", "web", Health::Down, format!("{e:#}")),
        });
        out.push(match staging_check(&self.cfg.staging_dir()).await {
            Ok(()) => ok(
                "manager.storage",
                "web",
                "staging written, read back and deleted",
            ),
            Err(e) => result(
                "manager.storage",
                "web",
                Health::Down,
                format!("staging: {e}"),
            ),
        });
        out.push(match shared::runtime::disk_space(&self.cfg.data_dir) {
            Ok(d) => result(
                "manager.disk",
                "web",
                disk_state(d.free_percent(), self.cfg.monitor.low_disk_percent),
                format!(
                    "{} % free of {}",
                    d.free_percent(),
                    media::human_bytes(d.total_bytes)
                ),
            ),
            Err(e) => result(
                "manager.disk",
                "web",
                Health::Down,
                format!("cannot read: {e}"),
            ),
        });
        if mem
            .integrity
            .as_ref()
            .is_none_or(|(t, _)| at - t >= INTEGRITY_EVERY)
        {
            let r = match self.db.integrity_check().await {
                Ok(()) => ok(
                    "manager.integrity",
                    "internal",
                    "the database's quick check is ok",
                ),
                Err(e) => result("manager.integrity", "internal", Health::Down, e),
            };
            mem.integrity = Some((at, r));
        }
        out.extend(mem.integrity.as_ref().map(|(_, r)| r.clone()));
        let mut certs = Vec::new();
        out.extend(self.viewer_path(at, &mut certs).await);
        out.extend(self.node_checks());
        out.extend(self.cert_checks(at, mem, certs));
        out.extend(self.library_checks(at).await);
        if mem
            .books
            .as_ref()
            .is_none_or(|(t, _)| at - t >= BOOKS_EVERY)
        {
            let r = match self.db.verify_balances().await {
                Ok(off) if off.is_empty() => ok("books", "internal", "every balance equals its ledger sum"),
                Ok(off) => result(
                    "books",
                    "internal",
                    Health::Down,
                    format!(
                        "{} account(s) hold a balance that differs from their ledger, e.g. account {} holds {} but its ledger sums to {}",
                        off.len(), off[0].0, off[0].1, off[0].2
                    ),
                ),
                Err(e) => result("books", "internal", Health::Down, format!("cannot check: {e}")),
            };
            mem.books = Some((at, r));
        }
        out.extend(mem.books.as_ref().map(|(_, r)| r.clone()));
        out.push(self.workers_check());
        out
    }

    /// Every certificate in use and when it expires: per node, the one its
    /// manager-facing address answered the probe with and the one its
    /// viewers' address answered the playback check with; for the manager,
    /// its public address's and the cluster CA's. Plain HTTP has none.
    fn cert_checks(&self, at: i64, mem: &mut Memory, seen: Vec<CertSeen>) -> Vec<CheckResult> {
        let warn = self.cfg.monitor.cert_warn_days as i64 * 86_400;
        // The last expiry read from each address is kept: an expired
        // certificate fails the handshake, and nothing is read off it then.
        for c in seen {
            mem.certs.insert((c.who, c.what), c.expires_at);
        }
        for n in self.nodes.list.iter() {
            if let Some(t) = n.last_probe().and_then(|p| p.cert_expires_at) {
                mem.certs
                    .insert((n.cfg.name.clone(), "its address for the manager"), t);
            }
        }
        let known = |who: &str| -> Vec<(String, i64)> {
            mem.certs
                .iter()
                .filter(|((w, _), _)| w == who)
                .map(|((_, what), t)| (what.to_string(), *t))
                .collect()
        };
        let mut out = Vec::new();
        for n in self.nodes.list.iter() {
            let id = format!("cert.{}", n.cfg.name);
            let certs = known(&n.cfg.name);
            let https = n.cfg.url.starts_with("https://");
            if certs.is_empty() && https && n.last_probe().is_some() {
                out.push(result(
                    &id,
                    "internal",
                    Health::Degraded,
                    "its address for the manager is https but no certificate could be read (see node.*: the handshake fails?)",
                ));
                continue;
            }
            out.push(cert_state(&id, certs, at, warn));
        }
        let mut certs = known("manager");
        if let Some(t) = crate::nodecall::pem_expiry(&self.cfg.node_ca_cert) {
            certs.push(("the cluster CA (node_ca_cert)".into(), t));
        }
        out.push(cert_state("cert.manager", certs, at, warn));
        out
    }

    /// Each node's own report, as the node monitor last probed it, and
    /// what it says of its disk, journal, clock, code and configuration.
    fn node_checks(&self) -> Vec<CheckResult> {
        let my_fingerprint = shared::protocol::config_fingerprint(
            &self.minter.signer.public_hex(),
            self.cfg.master_key_id,
        );
        let my_version = shared::protocol::build_version();
        let max_skew = self.cfg.monitor.max_clock_skew_secs as i64 * 1000;
        let mut out = Vec::new();
        for n in self.nodes.list.iter() {
            let name = &n.cfg.name;
            let component = node_component(n);
            let id = format!("node.{name}");
            let drained = if n.is_drained() { " (drained)" } else { "" };
            let Some(p) = n.last_probe() else {
                out.push(ok(&id, &component, format!("not probed yet{drained}")));
                continue;
            };
            let report = p.report.clone().unwrap_or_default();
            if !p.ok {
                out.push(result(
                    &id,
                    &component,
                    Health::Down,
                    format!("{}{drained}", p.detail),
                ));
            } else {
                let mut state = Health::Ok;
                let mut notes = vec![format!("healthy{drained}")];
                if let Some(d) = report.get("disk").and_then(|d| {
                    serde_json::from_value::<shared::runtime::DiskSpace>(d.clone()).ok()
                }) {
                    state = state.max(disk_state(
                        d.free_percent(),
                        self.cfg.monitor.low_disk_percent,
                    ));
                    notes.push(format!("disk {} % free", d.free_percent()));
                }
                if report.get("journal").and_then(|j| j.as_str()) == Some("write_failing") {
                    state = state.max(Health::Degraded);
                    notes.push("its view journal cannot be written (refunds wait)".into());
                }
                if let Some(skew) = p.skew_ms {
                    if skew.abs() > max_skew {
                        state = state.max(Health::Degraded);
                        notes.push(format!(
                            "its clock is {:+.1} s off the manager's",
                            skew as f64 / 1000.0
                        ));
                    }
                }
                out.push(result(&id, &component, state, notes.join("; ")));
            }
            // Drift: other code, or other shared settings, than the manager's.
            let id = format!("drift.{name}");
            match (
                report.get("version").and_then(|v| v.as_str()),
                report.get("config_fingerprint").and_then(|v| v.as_str()),
            ) {
                (None, _) | (_, None) => out.push(ok(&id, "internal", "no report to compare yet")),
                (Some(v), Some(f)) => {
                    let mut diffs = Vec::new();
                    if f != my_fingerprint {
                        diffs.push(format!(
                            "its shared configuration (token public key, master key id, protocol) has fingerprint {f}, the manager's is {my_fingerprint}"
                        ));
                    }
                    if v != my_version {
                        diffs.push(format!("it runs {v}, the manager {my_version}"));
                    }
                    out.push(if diffs.is_empty() {
                        ok(
                            &id,
                            "internal",
                            format!("same code and configuration as the manager ({v}, {f})"),
                        )
                    } else {
                        result(&id, "internal", Health::Degraded, diffs.join("; "))
                    });
                }
            }
        }
        out
    }

    /// The viewer's path for the canary movie: `HEAD` of a fresh media URL
    /// at the manager (no redirects followed) answers `200 video/mp4`, and
    /// on every node a `Range` request answers `206` with the same bytes,
    /// an MP4's first box, and the movie's length.
    async fn viewer_path(&self, at: i64, certs: &mut Vec<CertSeen>) -> Vec<CheckResult> {
        let canary = if self.cfg.monitor.canary_asset.is_empty() {
            self.db.canary_asset().await
        } else {
            self.db.asset(&self.cfg.monitor.canary_asset).await
        };
        let nodes_ok = |detail: &str| {
            self.nodes
                .list
                .iter()
                .map(|n| {
                    ok(
                        &format!("playback.{}", n.cfg.name),
                        &node_component(n),
                        detail,
                    )
                })
                .collect::<Vec<_>>()
        };
        let a = match canary {
            Ok(Some(a)) if a.state == crate::domain::AssetState::Published => a,
            Ok(_) => {
                let mut v = nodes_ok("no published movie to play yet");
                v.push(ok(
                    "media.redirect",
                    "web",
                    "no published movie to play yet",
                ));
                return v;
            }
            Err(e) => {
                let mut v = nodes_ok("the canary movie could not be read (see manager.database)");
                v.push(result(
                    "media.redirect",
                    "web",
                    Health::Down,
                    format!("cannot read the canary movie: {e}"),
                ));
                return v;
            }
        };
        let Some(url) = self.minter.media_url_until(&a, None, at + 600) else {
            return vec![result(
                "media.redirect",
                "web",
                Health::Down,
                "the canary movie has no blob",
            )];
        };
        let mut out = Vec::new();
        let head = self
            .http
            .head(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Some(t) = head.as_ref().ok().and_then(crate::nodecall::cert_expiry) {
            certs.push(CertSeen {
                who: "manager".into(),
                what: "the manager's public address",
                expires_at: t,
            });
        }
        out.push(match head {
            Ok(r)
                if r.status() == reqwest::StatusCode::OK
                    && r.headers()
                        .get(reqwest::header::CONTENT_TYPE)
                        .is_some_and(|t| t == "video/mp4") =>
            {
                ok(
                    "media.redirect",
                    "web",
                    format!("HEAD of a media URL for {} answers 200 video/mp4", a.id),
                )
            }
            Ok(r) => result(
                "media.redirect",
                "web",
                Health::Down,
                format!(
                    "HEAD of a media URL for {} answered {} {:?}",
                    a.id,
                    r.status(),
                    r.headers().get(reqwest::header::CONTENT_TYPE)
                ),
            ),
            Err(e) => result(
                "media.redirect",
                "web",
                Health::Down,
                format!("HEAD of a media URL: {}", crate::nodecall::explain(&e)),
            ),
        });
        let len = a.plain_len.unwrap_or(0).max(0) as u64;
        let want = CANARY_BYTES.min(len);
        let mut first: Option<(String, Vec<u8>)> = None;
        for n in self.nodes.list.iter() {
            let id = format!("playback.{}", n.cfg.name);
            let component = node_component(n);
            let r = self.range_on(&url, &n.cfg.name, want, len).await;
            out.push(match r {
                Ok((bytes, ttfb, cert)) => {
                    if let Some(t) = cert {
                        certs.push(CertSeen {
                            who: n.cfg.name.clone(),
                            what: "its viewers' address",
                            expires_at: t,
                        });
                    }
                    let same = match &first {
                        None => {
                            first = Some((n.cfg.name.clone(), bytes));
                            None
                        }
                        Some((other, b)) => (b != &bytes).then(|| other.clone()),
                    };
                    match same {
                        Some(other) => result(
                            &id,
                            &component,
                            Health::Down,
                            format!("its bytes differ from {other}'s for {}", a.id),
                        ),
                        None => ok(
                            &id,
                            &component,
                            format!(
                                "206 with {want} right bytes of {} in {} ms",
                                a.id,
                                ttfb.as_millis()
                            ),
                        ),
                    }
                }
                Err(e) if !n.is_healthy() => {
                    result(&id, &component, Health::Down, format!("node down: {e}"))
                }
                Err(e) => result(&id, &component, Health::Down, e),
            });
        }
        out
    }

    /// A viewer's `Range: bytes=0-(want-1)` on node `name`, through the
    /// redirect the manager gives for it.
    async fn range_on(
        &self,
        url: &str,
        name: &str,
        want: u64,
        len: u64,
    ) -> Result<(Vec<u8>, Duration, Option<i64>), String> {
        let r = self
            .http
            .get(format!("{url}?node={name}"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| crate::nodecall::explain(&e))?;
        if r.status() != reqwest::StatusCode::FOUND {
            return Err(format!(
                "the media URL answered {} for this node",
                r.status()
            ));
        }
        let loc = r
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or("a redirect without a location")?
            .to_string();
        let started = Instant::now();
        let r = self
            .http
            .get(&loc)
            .header(
                reqwest::header::RANGE,
                format!("bytes=0-{}", want.saturating_sub(1)),
            )
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .map_err(|e| crate::nodecall::explain(&e))?;
        let ttfb = started.elapsed();
        let cert = crate::nodecall::cert_expiry(&r);
        let status = r.status();
        let range = r
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if status != reqwest::StatusCode::PARTIAL_CONTENT {
            return Err(format!("a range request answered {status}"));
        }
        let expect = format!("bytes 0-{}/{len}", want.saturating_sub(1));
        if range != expect {
            return Err(format!("Content-Range {range:?}, expected {expect:?}"));
        }
        let bytes = r
            .bytes()
            .await
            .map_err(|e| format!("reading the range: {e}"))?;
        if bytes.len() as u64 != want || bytes.get(4..8) != Some(b"ftyp".as_slice()) {
            return Err(format!("{} bytes that do not start an MP4", bytes.len()));
        }
        Ok((bytes.to_vec(), ttfb, cert))
    }

    /// Backups, the queues, the outbox, the journal and the movies.
    async fn library_checks(&self, at: i64) -> Vec<CheckResult> {
        let m = &self.cfg.monitor;
        let mut out = Vec::new();
        let dir = crate::backup::backups_dir(&self.cfg);
        let newest = tokio::task::spawn_blocking(move || crate::backup::list_local(&dir))
            .await
            .ok()
            .and_then(|l| l.into_iter().next());
        let max_age = self.cfg.backup.max_age_secs as i64;
        out.push(match newest {
            None if at - self.started_at <= max_age => ok(
                "backup.age",
                "backups",
                "no backup yet; the first is due within the backup interval",
            ),
            None => result(
                "backup.age",
                "backups",
                Health::Degraded,
                "there is no local backup",
            ),
            Some(b) => {
                let age = (at - b.created_at).max(0);
                let state = match age {
                    a if a > 2 * max_age => Health::Down,
                    a if a > max_age => Health::Degraded,
                    _ => Health::Ok,
                };
                result(
                    "backup.age",
                    "backups",
                    state,
                    format!(
                        "the newest backup is {} old",
                        crate::console::human_age(age)
                    ),
                )
            }
        });
        match self
            .db
            .replication_summary(self.cfg.min_replicas as i64, at)
            .await
        {
            Ok(s) => {
                let mut state = Health::Ok;
                let mut notes = vec![format!("{} waiting", s.jobs_waiting)];
                if s.oldest_job_secs > m.max_queue_age_secs as i64 {
                    state = Health::Degraded;
                    notes.push(format!(
                        "the oldest has waited {}",
                        crate::console::human_age(s.oldest_job_secs)
                    ));
                }
                if s.jobs_failed > 0 {
                    state = Health::Degraded;
                    notes.push(format!(
                        "{} failed processing and wait for a retry",
                        s.jobs_failed
                    ));
                }
                if let Some(w) = workers::statuses()
                    .into_iter()
                    .find(|w| w.name == "transcode" && w.last_run_failed)
                {
                    state = Health::Degraded;
                    notes.push(format!(
                        "the transcode worker's last run failed: {}",
                        w.last_error.unwrap_or_default()
                    ));
                }
                out.push(result("jobs", "transcoding", state, notes.join("; ")));
                out.push(if s.damaged > 0 {
                    result(
                        "movies",
                        "internal",
                        Health::Down,
                        format!("{} movie(s) damaged: every copy lost", s.damaged),
                    )
                } else if s.under_replicated > 0 {
                    result(
                        "movies",
                        "internal",
                        Health::Degraded,
                        format!(
                            "{} published movie(s) have fewer than {} verified copies",
                            s.under_replicated, self.cfg.min_replicas
                        ),
                    )
                } else {
                    ok("movies", "internal", "every published movie has its copies")
                });
            }
            Err(e) => out.push(result(
                "jobs",
                "transcoding",
                Health::Down,
                format!("cannot count jobs: {e}"),
            )),
        }
        // One look at the folder: how long its oldest file has waited, and
        // how much it holds against `outbox_max_mb` (past it with movies not
        // yet on enough nodes, which the pipeline cannot trim, new jobs wait).
        let outbox = self.cfg.outbox_dir();
        let (oldest, bytes) = tokio::task::spawn_blocking(move || outbox_contents(&outbox))
            .await
            .unwrap_or((None, 0));
        out.push(match oldest {
            _ if bytes > self.cfg.outbox_max_mb.saturating_mul(1 << 20) => result(
                "outbox",
                "internal",
                Health::Degraded,
                format!(
                    "the outbox holds {} MiB, over its {} MiB bound, of movies not yet on enough nodes; new transcodes wait",
                    bytes >> 20,
                    self.cfg.outbox_max_mb
                ),
            ),
            Some(age) if age > m.max_outbox_age_secs as i64 => result(
                "outbox",
                "internal",
                Health::Degraded,
                format!(
                    "a sealed file has waited {} for a node to take it",
                    crate::console::human_age(age)
                ),
            ),
            _ => ok("outbox", "internal", "nothing waits long"),
        });
        match self.db.journal_watermarks().await {
            Ok(marks) => {
                for n in self.nodes.list.iter() {
                    let id = format!("journal.{}", n.cfg.name);
                    let mark = marks
                        .iter()
                        .find(|(node, _)| node == &n.cfg.name)
                        .map(|(_, w)| *w);
                    out.push(match mark {
                        None => ok(&id, "internal", "no journal delivered yet"),
                        Some(w) if at - w > m.max_journal_lag_secs as i64 => result(
                            &id,
                            "internal",
                            Health::Degraded,
                            format!(
                                "its journal is {} behind: refunds wait for it",
                                crate::console::human_age(at - w)
                            ),
                        ),
                        Some(w) => ok(
                            &id,
                            "internal",
                            format!(
                                "journal {} behind",
                                crate::console::human_age((at - w).max(0))
                            ),
                        ),
                    });
                }
            }
            Err(e) => {
                for n in self.nodes.list.iter() {
                    out.push(result(
                        &format!("journal.{}", n.cfg.name),
                        "internal",
                        Health::Down,
                        format!("the watermarks cannot be read: {e}"),
                    ));
                }
            }
        }
        out
    }

    fn workers_check(&self) -> CheckResult {
        let bad: Vec<String> = workers::statuses()
            .into_iter()
            .filter(|w| w.name != "monitor" && (w.last_run_failed || w.state == "stopped"))
            .map(|w| match w.last_error {
                Some(e) if w.last_run_failed => format!("{}: {e}", w.name),
                _ => format!("{} is {}", w.name, w.state),
            })
            .collect();
        if bad.is_empty() {
            ok("workers", "internal", "every worker's last run succeeded")
        } else {
            result("workers", "internal", Health::Degraded, bad.join("; "))
        }
    }

    /// Pushes the rendered status page to every node when it changed, or
    /// at least every [`SNAPSHOT_EVERY`] (the nodes judge from its age
    /// whether the manager is reachable).
    async fn push_snapshot(&self, mem: &mut Memory, at: i64) -> anyhow::Result<()> {
        let page = crate::status::page(&*self.db, &self.cfg, at).await?;
        let html = (self.render_status)(&page);
        let hash = <sha2::Sha256 as sha2::Digest>::digest(html.as_bytes()).to_vec();
        if hash == mem.snapshot_hash && at - mem.snapshot_at < SNAPSHOT_EVERY {
            return Ok(());
        }
        let body = serde_json::to_vec(&serde_json::json!({ "generated_at": at, "html": html }))?;
        let pushes = self
            .nodes
            .list
            .iter()
            .map(|n| self.nodes.put_status(n, body.clone()));
        let mut failed = Vec::new();
        for (n, r) in self
            .nodes
            .list
            .iter()
            .zip(futures::future::join_all(pushes).await)
        {
            if let Err(e) = r {
                failed.push(format!("{}: {e}", n.cfg.name));
            }
        }
        mem.snapshot_hash = hash;
        mem.snapshot_at = at;
        if !failed.is_empty() {
            tracing::debug!("status page copy not taken by {}", failed.join("; "));
        }
        Ok(())
    }
}

/// The line an alert leads with.
fn summary(check_id: &str, state: Health) -> String {
    let (family, rest) = check_id.split_once('.').unwrap_or((check_id, ""));
    let what = match family {
        "manager" => format!("the manager's {rest}"),
        "node" => format!("node {rest}"),
        "playback" => format!("playback from node {rest}"),
        "drift" => format!("node {rest}'s code or configuration"),
        "journal" => format!("node {rest}'s view journal"),
        "cert" if rest == "manager" => "the manager's certificates".to_string(),
        "cert" => format!("node {rest}'s certificates"),
        "media" => "media URLs".to_string(),
        "backup" => "backups".to_string(),
        "jobs" => "transcoding".to_string(),
        other => other.to_string(),
    };
    match state {
        Health::Ok => format!("{what}: fine again"),
        Health::Degraded => format!("{what}: degraded"),
        Health::Down => format!("{what}: failing"),
    }
}

/// Writes, reads back and deletes a file in the staging folder; a failed
/// delete fails too. `/healthz` and the monitor both take this look.
pub async fn staging_check(dir: &Path) -> Result<(), String> {
    let p = dir.join(format!("health.{}.part", uuid::Uuid::new_v4()));
    let probe = uuid::Uuid::new_v4().to_string();
    let r = async {
        tokio::fs::write(&p, &probe)
            .await
            .map_err(|e| e.to_string())?;
        let back = tokio::fs::read_to_string(&p)
            .await
            .map_err(|e| e.to_string())?;
        (back == probe)
            .then_some(())
            .ok_or_else(|| "read back differs".to_string())
    }
    .await;
    let removed = tokio::fs::remove_file(&p).await.map_err(|e| e.to_string());
    r.and(removed)
}

/// Seconds since the oldest file in `dir` was modified, and the bytes of
/// its sealed files (what `pipeline::trim_outbox` counts).
fn outbox_contents(dir: &Path) -> (Option<i64>, u64) {
    let now = std::time::SystemTime::now();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (None, 0);
    };
    let (mut oldest, mut bytes) = (None, 0u64);
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if let Some(age) = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
        {
            oldest = oldest.max(Some(age.as_secs() as i64));
        }
        if e.file_name().to_string_lossy().ends_with(".sealed") {
            bytes += meta.len();
        }
    }
    (oldest, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_degrade_as_they_near_expiry_and_the_soonest_decides() {
        let day = 86_400;
        let warn = 14 * day;
        let at = 1_000_000_000;
        let judge = |certs: &[(&str, i64)]| {
            let r = cert_state(
                "cert.utah",
                certs.iter().map(|(w, t)| (w.to_string(), *t)).collect(),
                at,
                warn,
            );
            (r.state, r.detail)
        };
        assert_eq!(judge(&[]).0, Health::Ok);
        assert!(judge(&[]).1.contains("plain HTTP"));
        assert_eq!(judge(&[("a", at + 60 * day)]).0, Health::Ok);
        let (state, detail) = judge(&[("a", at + 60 * day), ("b", at + 10 * day)]);
        assert_eq!(state, Health::Degraded);
        assert!(
            detail.contains("of b expires soonest") && detail.contains("in 10 d"),
            "{detail}"
        );
        assert_eq!(judge(&[("a", at + 2 * day)]).0, Health::Down);
        let (state, detail) = judge(&[("a", at - 1)]);
        assert_eq!(state, Health::Down);
        assert!(detail.contains("expired"), "{detail}");
        assert_eq!(
            summary("cert.utah", Health::Degraded),
            "node utah's certificates: degraded"
        );
    }

    #[test]
    fn disks_degrade_then_go_down() {
        assert_eq!(disk_state(50, 10), Health::Ok);
        assert_eq!(disk_state(9, 10), Health::Degraded);
        assert_eq!(disk_state(1, 10), Health::Down);
        assert_eq!(disk_state(1, 1), Health::Ok);
    }

    #[test]
    fn summaries_name_the_part() {
        assert_eq!(summary("node.utah", Health::Down), "node utah: failing");
        assert_eq!(
            summary("manager.database", Health::Ok),
            "the manager's database: fine again"
        );
        assert_eq!(summary("backup.age", Health::Degraded), "backups: degraded");
    }
}
