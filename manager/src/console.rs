//! The operator's console as a service: what the admin area shows (one
//! overview that answers "is everything fine?") and what it does, each
//! action written to the audit log with who, what and when.
//!
//! It reads what the rest of the manager already keeps: the catalog, the
//! node monitor's last probe of each node, the workers' registry, the
//! alert list and the backup folder. It takes them as arguments, never the
//! whole application state, and knows nothing of HTTP.

use serde::Serialize;
use shared::runtime::DiskSpace;

use crate::{
    alerts,
    catalog::{self, AuditEntry, Catalog, ReplicationSummary, User},
    config::Config,
    domain::Credits,
    ledger::{self, LedgerError, Recipients},
    nodes::{Nodes, Probe},
    workers,
};

#[derive(Debug, Serialize)]
pub struct NodeView {
    pub name: String,
    pub site: String,
    pub healthy: bool,
    /// `None` until the monitor's first probe.
    pub probe: Option<Probe>,
    pub version: Option<String>,
    pub disk: Option<DiskSpace>,
}

#[derive(Debug, Serialize)]
pub struct BackupView {
    pub id: String,
    pub created_at: i64,
    pub age_secs: i64,
}

/// Everything on the overview, gathered at `at`.
#[derive(Debug, Serialize)]
pub struct Overview {
    pub at: i64,
    /// Each thing that needs the operator, in words; empty when all is well.
    pub problems: Vec<String>,
    /// `ok`, or the database's failure (a write, read back and delete).
    pub database: String,
    pub manager_disk: Option<DiskSpace>,
    pub nodes: Vec<NodeView>,
    pub workers: Vec<workers::Status>,
    pub alerts: Vec<alerts::Alert>,
    pub movies: ReplicationSummary,
    pub last_backup: Option<BackupView>,
    /// Accounts whose balance differs from their ledger sum:
    /// `(account, balance, ledger sum)`. Always checked; always empty.
    pub books_off: Vec<(i64, i64, i64)>,
}

/// Looks at every part once. Each failing look is reported, not returned:
/// the overview must show what it can when something is broken.
pub async fn overview(db: &dyn Catalog, nodes: &Nodes, cfg: &Config) -> Overview {
    let at = catalog::now();
    let mut problems = Vec::new();
    let database = match db.health_check().await {
        Ok(()) => "ok".to_string(),
        Err(e) => {
            problems.push(format!("the database fails its check: {e:#}"));
            format!("{e:#}")
        }
    };
    let manager_disk = disk(&cfg.data_dir);
    match manager_disk {
        Some(d) if d.free_percent() < cfg.monitor.low_disk_percent => {
            problems.push(format!("the manager's disk is {}% free", d.free_percent()))
        }
        None => problems.push("the manager's disk space cannot be read".into()),
        _ => {}
    }
    let nodes: Vec<NodeView> = nodes
        .list
        .iter()
        .map(|n| {
            let probe = n.last_probe();
            let report = probe.as_ref().and_then(|p| p.report.as_ref());
            let disk = report
                .and_then(|r| r.get("disk"))
                .and_then(|d| serde_json::from_value::<DiskSpace>(d.clone()).ok());
            let version = report
                .and_then(|r| r.get("version"))
                .and_then(|v| v.as_str())
                .map(str::to_string);
            NodeView {
                name: n.cfg.name.clone(),
                site: n.cfg.site().to_string(),
                healthy: n.is_healthy(),
                probe,
                version,
                disk,
            }
        })
        .collect();
    for n in &nodes {
        match &n.probe {
            Some(p) if !p.ok => problems.push(format!("node {} is down: {}", n.name, p.detail)),
            _ => {}
        }
        if let Some(d) = n
            .disk
            .filter(|d| d.free_percent() < cfg.monitor.low_disk_percent)
        {
            problems.push(format!(
                "node {}'s disk is {}% free",
                n.name,
                d.free_percent()
            ));
        }
    }
    let workers = workers::statuses();
    for w in &workers {
        if w.last_run_failed {
            problems.push(format!(
                "the {} worker's last run failed: {}",
                w.name,
                w.last_error.as_deref().unwrap_or("")
            ));
        }
    }
    let movies = match db.replication_summary(cfg.min_replicas as i64, at).await {
        Ok(s) => s,
        Err(e) => {
            problems.push(format!("movies could not be counted: {e}"));
            ReplicationSummary::default()
        }
    };
    if movies.damaged > 0 {
        problems.push(format!(
            "{} movie(s) damaged: every copy lost",
            movies.damaged
        ));
    }
    if movies.under_replicated > 0 {
        problems.push(format!(
            "{} published movie(s) have fewer than {} verified copies",
            movies.under_replicated, cfg.min_replicas
        ));
    }
    if movies.jobs_failed > 0 {
        problems.push(format!(
            "{} upload(s) failed processing and wait for a retry",
            movies.jobs_failed
        ));
    }
    let dir = crate::backup::backups_dir(cfg);
    let last_backup = tokio::task::spawn_blocking(move || crate::backup::list_local(&dir))
        .await
        .ok()
        .and_then(|l| l.into_iter().next())
        .map(|m| BackupView {
            age_secs: (at - m.created_at).max(0),
            id: m.id,
            created_at: m.created_at,
        });
    match &last_backup {
        None => problems.push("there is no local backup".into()),
        Some(b) if b.age_secs > cfg.backup.max_age_secs as i64 => {
            problems.push(format!("the last backup is {} old", human_age(b.age_secs)))
        }
        _ => {}
    }
    // What the monitor found failing lately, with its words.
    if let Ok(states) = db.check_states().await {
        let fresh = at - 3 * cfg.monitor.interval_secs as i64;
        for s in states
            .iter()
            .filter(|s| s.state != crate::domain::Health::Ok && s.checked_at >= fresh)
        {
            problems.push(format!("check {} is {}: {}", s.check_id, s.state, s.detail));
        }
    }
    let books_off = db.verify_balances().await.unwrap_or_else(|e| {
        problems.push(format!("the books could not be checked: {e}"));
        Vec::new()
    });
    if !books_off.is_empty() {
        problems.push(format!(
            "{} account(s) hold a balance that differs from their ledger",
            books_off.len()
        ));
    }
    Overview {
        at,
        problems,
        database,
        manager_disk,
        nodes,
        workers,
        alerts: alerts::recent(),
        movies,
        last_backup,
        books_off,
    }
}

fn disk(path: &std::path::Path) -> Option<DiskSpace> {
    shared::runtime::disk_space(path).ok()
}

/// `90 s`, `12 min`, `5 h`, `3 d`: ages as an operator reads them.
pub fn human_age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// Records what `who` did. The console calls it for every action, also a
/// refused one, so the log answers "who tried what".
pub async fn audit(db: &dyn Catalog, who: &User, action: &str, target: &str, detail: &str) {
    let e = AuditEntry {
        actor_id: who.id,
        actor: &who.email,
        action,
        target,
        detail,
    };
    if let Err(err) = db.record_audit(&e).await {
        // The action stands; the operator must learn the record is missing.
        alerts::raise(
            "audit_write_failed",
            "an operator action could not be written to the audit log; check the database",
            format!("action={action} target={target} error={err}"),
        );
    }
}

/// An operator's grant of credits, audited with its outcome.
pub async fn grant(
    db: &dyn Catalog,
    who: &User,
    to: &Recipients,
    amount: Credits,
    reason: &str,
    key: &str,
) -> Result<Vec<i64>, LedgerError> {
    let actor = format!("operator:{}", who.email);
    let r = ledger::grant(db, to, amount, &actor, reason, key).await;
    let target = match to {
        Recipients::Account(id) => format!("account:{id}"),
        Recipients::CreatedBefore(t) => format!("accounts created before {t}"),
    };
    let outcome = match &r {
        Ok(done) => format!("credited {} account(s)", done.len()),
        Err(e) => format!("refused: {e}"),
    };
    audit(
        db,
        who,
        "grant_credits",
        &target,
        &format!(
            "amount={amount} key={key:?} reason={:?}: {outcome}",
            reason.trim()
        ),
    )
    .await;
    if let Ok(done) = &r {
        tracing::info!(%actor, amount = amount.get(), count = done.len(), reason, "credits granted");
    }
    r
}

/// Why an operator's action on a node or an incident was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("no node is called {0:?}")]
    NoSuchNode(String),
    #[error("{0}")]
    Invalid(&'static str),
    #[error("no open incident {0}")]
    NoSuchIncident(i64),
    #[error("no movie {0:?}")]
    NoSuchMovie(String),
    #[error("no account {0}")]
    NoSuchAccount(i64),
    /// The action does not apply to the thing as it is now (words say why).
    #[error("{0}")]
    NotNow(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Takes `node` out of rotation (no new viewers, no new copies; viewers
/// already sent there finish) or brings it back, audited. Copies it
/// missed while drained are pushed at once on its return.
pub async fn drain(
    db: &dyn Catalog,
    nodes: &Nodes,
    who: &User,
    node: &str,
    drained: bool,
) -> Result<bool, ConsoleError> {
    let Some(n) = nodes.get(node) else {
        audit(
            db,
            who,
            if drained { "node_drain" } else { "node_return" },
            &format!("node:{node}"),
            "refused: no such node",
        )
        .await;
        return Err(ConsoleError::NoSuchNode(node.to_string()));
    };
    let changed = db
        .set_drained(node, drained, &who.email, catalog::now())
        .await?;
    n.set_drained(drained);
    if !drained {
        db.replicas_due_now(node).await?;
    }
    audit(
        db,
        who,
        if drained { "node_drain" } else { "node_return" },
        &format!("node:{node}"),
        if changed { "done" } else { "already so" },
    )
    .await;
    tracing::warn!(node, drained, by = %who.email, "node rotation changed by an operator");
    Ok(changed)
}

/// Loads which nodes are drained (at start).
pub async fn load_drains(db: &dyn Catalog, nodes: &Nodes) -> sqlx::Result<()> {
    for name in db.drained_nodes().await? {
        if let Some(n) = nodes.get(&name) {
            n.set_drained(true);
            tracing::warn!(node = %name, "node is drained (out of rotation) since an operator said so");
        }
    }
    Ok(())
}

/// Brings this process's drains in line with the database's: with several
/// managers on one database, an operator drains a node through one of
/// them, and every one sends viewers by that ([`crate::run`] calls this
/// every few seconds).
pub async fn follow_drains(db: &dyn Catalog, nodes: &Nodes) -> sqlx::Result<()> {
    let drained = db.drained_nodes().await?;
    for n in nodes.list.iter() {
        let now = drained.contains(&n.cfg.name);
        if n.is_drained() != now {
            n.set_drained(now);
            tracing::warn!(
                node = %n.cfg.name,
                drained = now,
                "node drain changed by an operator on another manager"
            );
        }
    }
    Ok(())
}

// ---- movies, jobs and accounts ---------------------------------------------------

/// Longest reason an operator gives for withdrawing a movie.
const MAX_REASON: usize = 500;

/// Takes a finished movie down (`Some(reason)`: media URLs, purchases and
/// listings refuse it at once) or puts it back (`None`), audited. Its
/// copies stay on the nodes, so reinstating is instant.
pub async fn withdraw(
    db: &dyn Catalog,
    who: &User,
    asset_id: &str,
    reason: Option<&str>,
) -> Result<(), ConsoleError> {
    let action = if reason.is_some() {
        "movie_withdraw"
    } else {
        "movie_reinstate"
    };
    let target = format!("movie:{asset_id}");
    let reason = reason.map(str::trim);
    let r = async {
        let a = db
            .asset(asset_id)
            .await?
            .ok_or_else(|| ConsoleError::NoSuchMovie(asset_id.to_string()))?;
        if let Some(why) = reason {
            if why.is_empty() || why.chars().count() > MAX_REASON {
                return Err(ConsoleError::Invalid(
                    "a reason of 1 to 500 characters is needed",
                ));
            }
            if a.state == crate::domain::AssetState::Withdrawn {
                return Err(ConsoleError::NotNow("it is already withdrawn".into()));
            }
            if !matches!(
                a.state,
                crate::domain::AssetState::Replicating
                    | crate::domain::AssetState::Published
                    | crate::domain::AssetState::Damaged
            ) {
                return Err(ConsoleError::NotNow(format!(
                    "it is {}: only a processed movie is withdrawn (cancel a job instead)",
                    a.state
                )));
            }
        } else if a.state != crate::domain::AssetState::Withdrawn {
            return Err(ConsoleError::NotNow("it is not withdrawn".into()));
        }
        if !db.set_withdrawn(asset_id, reason, catalog::now()).await? {
            return Err(ConsoleError::NotNow(
                "it changed meanwhile; look again".into(),
            ));
        }
        Ok(())
    }
    .await;
    let detail = match (&r, reason) {
        (Ok(()), Some(why)) => format!("done: {why:?}"),
        (Ok(()), None) => "done".into(),
        (Err(e), _) => format!("refused: {e}"),
    };
    audit(db, who, action, &target, &detail).await;
    if r.is_ok() {
        tracing::warn!(asset = asset_id, action, by = %who.email, "movie availability changed by an operator");
    }
    r
}

/// Every waiting copy of the movie is pushed or refilled now instead of
/// at the end of its back-off. Returns how many copies were waiting.
pub async fn repair_now(db: &dyn Catalog, who: &User, asset_id: &str) -> Result<u64, ConsoleError> {
    let target = format!("movie:{asset_id}");
    let r = async {
        db.asset(asset_id)
            .await?
            .ok_or_else(|| ConsoleError::NoSuchMovie(asset_id.to_string()))?;
        Ok(db.asset_replicas_due_now(asset_id).await?)
    }
    .await;
    let detail = match &r {
        Ok(n) => format!("{n} waiting copies due now"),
        Err(e) => format!("refused: {e}"),
    };
    audit(db, who, "movie_repair", &target, &detail).await;
    r
}

/// What one node said when asked to re-hash its copy.
#[derive(Debug, Clone, Serialize)]
pub struct Reverified {
    pub node: String,
    /// `verified`, `quarantined`, `missing`, or the error in words.
    pub outcome: String,
}

/// Asks every node that should hold the movie to re-hash its copy now and
/// records what each found: a good copy's proof time moves to now; a bad
/// or missing one is refilled from a verified copy elsewhere. Audited.
pub async fn reverify(
    db: &dyn Catalog,
    nodes: &Nodes,
    who: &User,
    asset_id: &str,
) -> Result<Vec<Reverified>, ConsoleError> {
    let target = format!("movie:{asset_id}");
    let r = async {
        let a = db
            .asset(asset_id)
            .await?
            .ok_or_else(|| ConsoleError::NoSuchMovie(asset_id.to_string()))?;
        let Some(blob) = a
            .blob_id
            .as_deref()
            .and_then(|b| b.parse::<shared::BlobId>().ok())
        else {
            return Err(ConsoleError::NotNow(format!(
                "it is {} and has no sealed file to verify",
                a.state
            )));
        };
        // Every node at once: each reads its own disk.
        let asks = db
            .replicas(asset_id)
            .await?
            .into_iter()
            .filter(|rep| rep.state != crate::domain::ReplicaState::Retired)
            .filter_map(|rep| nodes.get(&rep.node).map(|n| (rep.node, n)))
            .map(|(name, node)| async move {
                let observed = catalog::now();
                (name, observed, nodes.verify_blob(node, &blob).await)
            });
        let mut out = Vec::new();
        for (node, observed, answer) in futures::future::join_all(asks).await {
            let outcome = match answer {
                Ok((state, at)) => {
                    match state.as_str() {
                        "verified" => {
                            db.replica_seen_good(asset_id, &node, at.or(Some(observed)))
                                .await?;
                        }
                        "quarantined" | "missing" => {
                            db.replica_lost(
                                asset_id,
                                &node,
                                &format!("re-verification found it {state}"),
                                observed,
                            )
                            .await?;
                        }
                        _ => {}
                    }
                    state
                }
                Err(e) => format!("not checked: {e}"),
            };
            out.push(Reverified { node, outcome });
        }
        Ok(out)
    }
    .await;
    let detail = match &r {
        Ok(v) => v
            .iter()
            .map(|x| format!("{}: {}", x.node, x.outcome))
            .collect::<Vec<_>>()
            .join("; "),
        Err(e) => format!("refused: {e}"),
    };
    audit(db, who, "movie_reverify", &target, &detail).await;
    r
}

/// Moves a queued job ahead of the queue, audited.
pub async fn raise_priority(
    db: &dyn Catalog,
    who: &User,
    asset_id: &str,
) -> Result<i64, ConsoleError> {
    let r = match db.raise_priority(asset_id).await? {
        Some(p) => Ok(p),
        None => Err(match db.asset(asset_id).await? {
            None => ConsoleError::NoSuchMovie(asset_id.to_string()),
            Some(a) => ConsoleError::NotNow(format!(
                "it is {}: only a queued job is moved ahead",
                a.state
            )),
        }),
    };
    let detail = match &r {
        Ok(p) => format!("priority {p}"),
        Err(e) => format!("refused: {e}"),
    };
    audit(db, who, "job_raise", &format!("movie:{asset_id}"), &detail).await;
    r
}

/// Disables an account (it cannot log in; its sessions end and its API
/// tokens stop working at once) or enables it again, audited. Movies,
/// balance and ledger are kept. An operator cannot disable themselves.
pub async fn set_disabled(
    db: &dyn Catalog,
    who: &User,
    account: i64,
    disabled: bool,
) -> Result<(), ConsoleError> {
    let action = if disabled {
        "account_disable"
    } else {
        "account_enable"
    };
    let r = async {
        if disabled && account == who.id {
            return Err(ConsoleError::Invalid("you cannot disable your own account"));
        }
        let a = db
            .account(account)
            .await?
            .ok_or(ConsoleError::NoSuchAccount(account))?;
        if a.disabled_at.is_some() == disabled {
            return Err(ConsoleError::NotNow(format!(
                "{} is already {}",
                a.email,
                if disabled { "disabled" } else { "enabled" }
            )));
        }
        if !db.set_disabled(account, disabled, catalog::now()).await? {
            return Err(ConsoleError::NotNow(
                "another operator changed it meanwhile; look again".into(),
            ));
        }
        Ok(a.email)
    }
    .await;
    let detail = match &r {
        Ok(email) => format!("done: {email}"),
        Err(e) => format!("refused: {e}"),
    };
    audit(db, who, action, &format!("account:{account}"), &detail).await;
    r.map(|_| ())
}

/// Impacts an incident may have.
pub const IMPACTS: [&str; 3] = ["minor", "major", "maintenance"];
/// Statuses of an incident's updates.
pub const INCIDENT_STATUSES: [&str; 7] = [
    "investigating",
    "identified",
    "monitoring",
    "resolved",
    "scheduled",
    "in_progress",
    "completed",
];
/// Longest incident title and update text.
const MAX_TITLE: usize = 200;
const MAX_BODY: usize = 5000;

/// Opens an incident (or announces maintenance), audited.
#[allow(clippy::too_many_arguments)]
pub async fn open_incident(
    db: &dyn Catalog,
    who: &User,
    title: &str,
    impact: &str,
    components: &[String],
    known: &[String],
    window: Option<(i64, i64)>,
    body: &str,
) -> Result<i64, ConsoleError> {
    let title = title.trim();
    let body = body.trim();
    if title.is_empty() || title.chars().count() > MAX_TITLE {
        return Err(ConsoleError::Invalid(
            "a title of 1 to 200 characters is needed",
        ));
    }
    if body.is_empty() || body.chars().count() > MAX_BODY {
        return Err(ConsoleError::Invalid(
            "a first update of 1 to 5000 characters is needed",
        ));
    }
    if !IMPACTS.contains(&impact) {
        return Err(ConsoleError::Invalid(
            "impact is minor, major or maintenance",
        ));
    }
    if components.is_empty() || components.iter().any(|c| !known.contains(c)) {
        return Err(ConsoleError::Invalid(
            "name at least one component the status page shows",
        ));
    }
    if let Some((s, e)) = window {
        if e <= s {
            return Err(ConsoleError::Invalid(
                "maintenance must end after it starts",
            ));
        }
    }
    let at = catalog::now();
    let status = match (impact, window) {
        ("maintenance", Some((s, _))) if s > at => "scheduled",
        ("maintenance", _) => "in_progress",
        _ => "investigating",
    };
    let comps = components.join(",");
    let id = db
        .create_incident(&crate::catalog::NewIncident {
            title,
            impact,
            components: &comps,
            starts_at: window.map(|w| w.0),
            ends_at: window.map(|w| w.1),
            status,
            body,
            author: &who.email,
            at,
        })
        .await?;
    audit(
        db,
        who,
        "incident_open",
        &format!("incident:{id}"),
        &format!("{impact} on {comps}: {title:?}"),
    )
    .await;
    Ok(id)
}

/// Adds an update to an open incident; `resolved` and `completed` close it.
pub async fn update_incident(
    db: &dyn Catalog,
    who: &User,
    id: i64,
    status: &str,
    body: &str,
) -> Result<(), ConsoleError> {
    let body = body.trim();
    if !INCIDENT_STATUSES.contains(&status) {
        return Err(ConsoleError::Invalid("unknown status"));
    }
    if body.is_empty() || body.chars().count() > MAX_BODY {
        return Err(ConsoleError::Invalid(
            "an update of 1 to 5000 characters is needed",
        ));
    }
    let closes = matches!(status, "resolved" | "completed");
    let done = db
        .add_incident_update(
            &crate::catalog::IncidentUpdate {
                incident_id: id,
                at: catalog::now(),
                status: status.to_string(),
                body: body.to_string(),
                author: who.email.clone(),
            },
            closes,
        )
        .await?;
    audit(
        db,
        who,
        "incident_update",
        &format!("incident:{id}"),
        &if done {
            status.to_string()
        } else {
            "refused: no open incident".into()
        },
    )
    .await;
    if done {
        Ok(())
    } else {
        Err(ConsoleError::NoSuchIncident(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_an_operator_says_them() {
        assert_eq!(human_age(90), "90 s");
        assert_eq!(human_age(720), "12 min");
        assert_eq!(human_age(5 * 3600), "5 h");
        assert_eq!(human_age(3 * 86_400), "3 d");
    }
}
