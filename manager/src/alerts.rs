//! The one place alerts go through: what must wake an operator (every copy
//! of a movie lost, the newest backup too old, a refunded view served).
//! Each alert is an error-level log line starting `ALERT:` with its stable
//! `alert` code, a count in `manager_alerts_total{alert}`, and an entry in
//! a short in-memory list (`recent`) that the operator's API shows. The
//! coming alerting (mail, the console's incidents) hooks in here.

use std::{
    collections::VecDeque,
    sync::{Mutex, OnceLock},
};

use serde::Serialize;

/// How many recent alerts are kept in memory.
const KEEP: usize = 200;

#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    /// Stable code: `movie_damaged`, `backup_stale`, `served_after_refund`.
    pub alert: &'static str,
    pub at: i64,
    /// One sentence for a person, with what to do.
    pub message: String,
    /// The specifics (`asset=… blob=…`).
    pub detail: String,
}

fn recent_list() -> &'static Mutex<VecDeque<Alert>> {
    static R: OnceLock<Mutex<VecDeque<Alert>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Raises an alert (see the module docs).
pub fn raise(alert: &'static str, message: &str, detail: String) {
    tracing::error!(alert, %detail, "ALERT: {message}");
    metrics::counter!("manager_alerts_total", "alert" => alert).increment(1);
    let mut list = recent_list().lock().expect("not poisoned");
    if list.len() >= KEEP {
        list.pop_front();
    }
    list.push_back(Alert {
        alert,
        at: shared::runtime::unix_now(),
        message: message.to_string(),
        detail,
    });
}

/// The alerts raised since start (at most the last 200), oldest first.
pub fn recent() -> Vec<Alert> {
    recent_list()
        .lock()
        .expect("not poisoned")
        .iter()
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_are_kept_and_bounded() {
        for i in 0..KEEP + 5 {
            raise("test_alert", "a test", format!("n={i}"));
        }
        let mine: Vec<_> = recent()
            .into_iter()
            .filter(|a| a.alert == "test_alert")
            .collect();
        assert!(mine.len() <= KEEP);
        assert_eq!(mine.last().unwrap().detail, format!("n={}", KEEP + 4));
    }
}
