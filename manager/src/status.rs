//! The public status page's content: each component's state now, 90 days
//! of daily bars from the monitor's stored history, and the incidents and
//! maintenance the operator wrote. The HTTP layer renders it at `/status`
//! (with feeds and a badge); the monitor pushes a rendered copy to every
//! node, which serves it when the manager cannot.
//!
//! A day's bar is its worst state; its percentage is the share of the
//! observed time the component was up (degraded counts as up), taken from
//! its worst check. Time the manager itself was down is not observed by
//! the manager: the nodes' copy of this page says so instead.

use serde::Serialize;

use crate::{
    catalog::{self, Catalog, Incident},
    config::Config,
    domain::Health,
};

/// Days of bars shown.
pub const DAYS: i64 = 90;
/// Resolved incidents listed on the page (the feeds carry 90 days).
pub const RECENT_INCIDENT_DAYS: i64 = 14;

#[derive(Debug, Clone, Serialize)]
pub struct Day {
    /// `YYYY-MM-DD`, UTC.
    pub date: String,
    /// `None`: nothing observed that day.
    pub state: Option<Health>,
    /// Percent up, `None` when nothing was observed.
    pub uptime: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Component {
    pub id: String,
    pub name: String,
    pub state: Health,
    pub days: Vec<Day>,
    /// Percent up over the observed part of the 90 days.
    pub uptime: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub generated_at: i64,
    /// The monitor's newest stored result is old: the states shown may
    /// not be current (the monitor stopped, or cannot write its results).
    pub stale: bool,
    pub overall: Health,
    pub components: Vec<Component>,
    /// Open incidents and maintenance in progress.
    pub active: Vec<Incident>,
    /// Maintenance announced for later.
    pub scheduled: Vec<Incident>,
    /// Closed in the last [`RECENT_INCIDENT_DAYS`] days.
    pub recent: Vec<Incident>,
}

/// The components users see, with names for people: the site, playback per
/// region (a node's site), transcoding, backups.
pub fn components(cfg: &Config) -> Vec<(String, String)> {
    let mut out = vec![(
        "web".to_string(),
        "Web site, uploads and media URLs".to_string(),
    )];
    for n in &cfg.nodes {
        let id = format!("playback:{}", n.site());
        if !out.iter().any(|(i, _)| *i == id) {
            out.push((id, format!("Playback: {}", n.site())));
        }
    }
    out.push(("transcoding".into(), "Transcoding".into()));
    out.push(("backups".into(), "Backups".into()));
    out
}

/// `YYYY-MM-DD` of a unix day number.
pub fn date_of(day: i64) -> String {
    crate::notify::rfc3339(day * 86_400)[..10].to_string()
}

fn impact_state(impact: &str) -> Health {
    match impact {
        "major" => Health::Down,
        "minor" => Health::Degraded,
        _ => Health::Ok,
    }
}

/// Gathers the page at `now`.
pub async fn page(db: &dyn Catalog, cfg: &Config, now: i64) -> anyhow::Result<Page> {
    let today = now.div_euclid(86_400);
    let from = today - DAYS + 1;
    let states = db.check_states().await?;
    let days = db.check_days(from).await?;
    let incidents = db.incidents(now - DAYS * 86_400).await?;
    // A check not run lately (a node removed from the configuration)
    // no longer speaks for its component.
    let fresh = now - 3 * cfg.monitor.interval_secs as i64;
    let (mut active, mut scheduled, mut recent) = (Vec::new(), Vec::new(), Vec::new());
    for i in incidents {
        let open = i.resolved_at.is_none();
        if open && i.impact == "maintenance" && i.starts_at.is_some_and(|s| s > now) {
            scheduled.push(i);
        } else if open {
            active.push(i);
        } else if i
            .resolved_at
            .is_some_and(|r| r >= now - RECENT_INCIDENT_DAYS * 86_400)
        {
            recent.push(i);
        }
    }
    let stale = states
        .iter()
        .map(|s| s.checked_at)
        .max()
        .is_some_and(|t| t < fresh);
    let mut shown = Vec::new();
    for (id, name) in components(cfg) {
        let mine: Vec<_> = states.iter().filter(|s| s.component == id).collect();
        let current: Vec<_> = mine.iter().filter(|s| s.checked_at >= fresh).collect();
        let mut state = if id.starts_with("playback:") {
            // A region is out only when every node in it is; one node of
            // several down is degraded (viewers go to the others).
            let mut per_node: std::collections::BTreeMap<&str, Health> = Default::default();
            for s in &current {
                let node = s.check_id.split_once('.').map_or("", |(_, n)| n);
                let e = per_node.entry(node).or_insert(Health::Ok);
                *e = (*e).max(s.state);
            }
            let worst = per_node.values().copied().max().unwrap_or(Health::Ok);
            if per_node.values().all(|h| *h == Health::Down) {
                worst
            } else {
                worst.min(Health::Degraded)
            }
        } else {
            current.iter().map(|s| s.state).max().unwrap_or(Health::Ok)
        };
        // Results there were, but none lately: not known to be fine.
        if current.is_empty() && !mine.is_empty() {
            state = state.max(Health::Degraded);
        }
        for i in &active {
            if i.components.split(',').any(|c| c == id) {
                state = state.max(impact_state(&i.impact));
            }
        }
        let mut bars = Vec::new();
        let (mut up_total, mut seen_total) = (0f64, 0f64);
        for day in from..=today {
            let rows: Vec<_> = days
                .iter()
                .filter(|d| d.component == id && d.day == day)
                .collect();
            let worst = rows
                .iter()
                .map(|d| {
                    if d.down_secs > 0 {
                        Health::Down
                    } else if d.degraded_secs > 0 {
                        Health::Degraded
                    } else {
                        Health::Ok
                    }
                })
                .max();
            // Up share of the day from its worst check.
            let up = rows
                .iter()
                .filter_map(|d| {
                    let total = (d.ok_secs + d.degraded_secs + d.down_secs) as f64;
                    (total > 0.0).then(|| (1.0 - d.down_secs as f64 / total, total))
                })
                .min_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((share, total)) = up {
                up_total += share * total;
                seen_total += total;
            }
            bars.push(Day {
                date: date_of(day),
                state: worst,
                uptime: up.map(|(share, _)| share * 100.0),
            });
        }
        shown.push(Component {
            id,
            name,
            state,
            days: bars,
            uptime: (seen_total > 0.0).then(|| up_total / seen_total * 100.0),
        });
    }
    Ok(Page {
        generated_at: now,
        stale,
        overall: shown.iter().map(|c| c.state).max().unwrap_or(Health::Ok),
        components: shown,
        active,
        scheduled,
        recent,
    })
}

/// The incidents a feed carries: all of the last 90 days, newest first.
pub async fn feed(db: &dyn Catalog, now: i64) -> anyhow::Result<Vec<Incident>> {
    Ok(db.incidents(now - DAYS * 86_400).await?)
}

/// What an incident's latest update says, for a feed entry's summary.
pub fn latest(i: &Incident) -> (&str, &str, i64) {
    i.updates.last().map_or(("", "", i.created_at), |u| {
        (u.status.as_str(), u.body.as_str(), u.at)
    })
}

pub use catalog::{IncidentUpdate, NewIncident};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_numbers_read_as_dates() {
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(20_787), "2026-11-30");
    }
}
