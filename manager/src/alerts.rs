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
    /// When it was last raised.
    pub at: i64,
    /// When it was first raised, and how often since: a condition that
    /// holds (a damaged movie, on every reconcile pass) is one entry that
    /// counts up, so it never pushes other alerts out of the list.
    pub first_at: i64,
    pub count: u64,
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
    let now = shared::runtime::unix_now();
    let mut list = recent_list().lock().expect("not poisoned");
    if let Some(i) = list
        .iter()
        .position(|a| a.alert == alert && a.detail == detail)
    {
        let mut again = list.remove(i).expect("found");
        again.at = now;
        again.count += 1;
        list.push_back(again);
        return;
    }
    if list.len() >= KEEP {
        list.pop_front();
    }
    list.push_back(Alert {
        alert,
        at: now,
        first_at: now,
        count: 1,
        message: message.to_string(),
        detail,
    });
}

/// The alerts raised since start (at most 200), least recently raised first.
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

    /// The list is per process: these tests take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn alerts_are_kept_and_bounded() {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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

    #[test]
    fn a_condition_that_holds_is_one_entry_counting_up() {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..500 {
            raise("test_repeat", "still broken", "asset=a".into());
        }
        raise("test_other", "something else", "x".into());
        let list = recent();
        let repeats: Vec<_> = list.iter().filter(|a| a.alert == "test_repeat").collect();
        assert_eq!(repeats.len(), 1);
        assert_eq!(repeats[0].count, 500);
        assert!(
            list.iter().any(|a| a.alert == "test_other"),
            "not pushed out"
        );
    }
}
