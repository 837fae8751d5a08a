//! Background work as named workers, each with a status the operator can
//! read (`GET /api/v1/admin/workers`, and the coming console): its state,
//! how many runs, when the last one started and ended, its last error and
//! its progress. Garage's worker list is the model: a worker that stopped
//! or keeps failing is seen, not found later in a log.
//!
//! The registry is per process (one manager = one set of workers), so any
//! loop can report without being handed a handle through every layer.

use std::{
    collections::BTreeMap,
    sync::{Mutex, OnceLock},
};

use serde::Serialize;

/// One worker's status.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Status {
    pub name: &'static str,
    /// `idle` (between runs), `running`, or `stopped` (its loop ended).
    pub state: &'static str,
    /// Runs started since the process started.
    pub runs: u64,
    /// Runs that ended in an error.
    pub failures: u64,
    pub last_started_at: Option<i64>,
    pub last_finished_at: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    /// Whether the latest finished run failed (the console's "failing").
    pub last_run_failed: bool,
    /// What the current run is doing, in words (`transcoding <id> 40 %`).
    pub progress: Option<String>,
}

fn registry() -> &'static Mutex<BTreeMap<&'static str, Status>> {
    static R: OnceLock<Mutex<BTreeMap<&'static str, Status>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Every worker's status, by name.
pub fn statuses() -> Vec<Status> {
    registry()
        .lock()
        .expect("not poisoned")
        .values()
        .cloned()
        .collect()
}

/// A worker's handle: reports its runs into the registry.
#[derive(Debug, Clone, Copy)]
pub struct Worker {
    name: &'static str,
}

impl Worker {
    /// Registers `name` (idle, no runs yet); the same name twice shares one
    /// status (several transcode loops are one worker).
    pub fn register(name: &'static str) -> Worker {
        registry()
            .lock()
            .expect("not poisoned")
            .entry(name)
            .or_insert(Status {
                name,
                state: "idle",
                runs: 0,
                failures: 0,
                last_started_at: None,
                last_finished_at: None,
                last_error: None,
                last_error_at: None,
                last_run_failed: false,
                progress: None,
            });
        Worker { name }
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        if let Some(s) = registry().lock().expect("not poisoned").get_mut(self.name) {
            f(s);
        }
    }

    /// A run begins.
    pub fn started(&self) {
        let now = shared::runtime::unix_now();
        self.update(|s| {
            s.state = "running";
            s.runs += 1;
            s.last_started_at = Some(now);
            s.progress = None;
        });
    }

    /// What the run is doing now.
    pub fn progress(&self, what: impl Into<String>) {
        let what = what.into();
        self.update(|s| s.progress = Some(what));
    }

    /// The run ended; an error is kept until a later one replaces it (a
    /// success does not erase it: when it last failed matters too).
    pub fn finished<E: std::fmt::Display>(&self, result: Result<(), E>) {
        let now = shared::runtime::unix_now();
        let error = result.err().map(|e| format!("{e:#}"));
        self.update(|s| {
            s.state = "idle";
            s.last_finished_at = Some(now);
            s.progress = None;
            s.last_run_failed = error.is_some();
            if let Some(e) = error {
                s.failures += 1;
                s.last_error = Some(e);
                s.last_error_at = Some(now);
            }
        });
    }

    /// Its loop ended (shutdown, or a bug: then the operator sees it).
    pub fn stopped(&self) {
        self.update(|s| {
            s.state = "stopped";
            s.progress = None;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_reports_runs_errors_and_progress() {
        let w = Worker::register("test-worker");
        let get = || {
            statuses()
                .into_iter()
                .find(|s| s.name == "test-worker")
                .unwrap()
        };
        assert_eq!(get().state, "idle");
        w.started();
        w.progress("step 1");
        assert_eq!(get().state, "running");
        assert_eq!(get().progress.as_deref(), Some("step 1"));
        w.finished(Err::<(), _>(anyhow::anyhow!("disk full")));
        let s = get();
        assert_eq!((s.runs, s.failures, s.state), (1, 1, "idle"));
        assert_eq!(s.last_error.as_deref(), Some("disk full"));
        w.started();
        w.finished(Ok::<(), String>(()));
        let s = get();
        assert_eq!((s.runs, s.failures), (2, 1));
        assert_eq!(s.last_error.as_deref(), Some("disk full"), "kept");
        assert!(s.progress.is_none());
        w.stopped();
        assert_eq!(get().state, "stopped");
    }
}
