//! Which manager process runs the background work.
//!
//! Several managers may share one PostgreSQL database: every one of them
//! serves the site, the API and the media URLs, and keeps its own view of
//! the nodes' health, but the background work (the pipeline's jobs and
//! pushes, reconciliation, backups, refunds, the monitor's checks) runs in
//! one process only, the leader. The lead is a session advisory lock held
//! on a connection of its own ([`crate::catalog::Catalog::try_lead`]): the server frees it
//! the moment the leader's process dies, and a standby, asking every
//! [`TICK`], takes over within seconds. A leader whose connection stops
//! answering gives its work up ([`crate::catalog::Catalog::still_leading`]), so that two
//! leaders overlap for at most a few seconds; the job leases cover that
//! overlap (a job is claimed by one worker at a time, its lease renewed
//! while it runs, taken over only once it lapses).
//!
//! On SQLite there is one process per database ([`crate::catalog::claim_process`]),
//! and it always leads.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};
use std::time::Duration;

use tokio::{sync::watch, task::JoinHandle};

use crate::catalog::SharedCatalog;

/// How often a standby asks for the lead, and a leader checks it holds it.
pub const TICK: Duration = Duration::from_secs(2);

/// Whether this process leads now (`/healthz` says `role`).
#[derive(Debug, Default)]
pub struct Role(AtomicBool);

impl Role {
    pub fn leading(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// `"leader"` or `"standby"`.
    pub fn name(&self) -> &'static str {
        if self.leading() {
            "leader"
        } else {
            "standby"
        }
    }

    fn set(&self, leading: bool) {
        self.0.store(leading, Ordering::Release);
        metrics::gauge!("manager_leader").set(if leading { 1.0 } else { 0.0 });
    }
}

/// The background work while this process leads: `start` spawns it, given
/// a stop signal; it is stopped (given `grace`, then aborted) when the lead
/// is lost or `stop` fires. Returns once `stop` has fired and the work
/// has ended.
pub async fn run<F>(
    db: SharedCatalog,
    role: Arc<Role>,
    start: F,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) where
    F: Fn(watch::Receiver<bool>) -> Vec<JoinHandle<()>> + Send + 'static,
{
    role.set(false);
    let mut work: Option<(watch::Sender<bool>, Vec<JoinHandle<()>>)> = None;
    let mut last_error: Option<String> = None;
    let mut standing_by_said = false;
    loop {
        if *stop.borrow() {
            break;
        }
        if work.is_none() {
            match db.try_lead().await {
                Ok(true) => {
                    if db.shared() {
                        tracing::warn!(
                            "this manager now leads: the background work (jobs, pushes, \
                             reconciliation, backups, refunds, checks) runs here"
                        );
                    }
                    let (tx, rx) = watch::channel(false);
                    work = Some((tx, start(rx)));
                    role.set(true);
                    last_error = None;
                }
                Ok(false) => {
                    if !standing_by_said {
                        tracing::info!(
                            "another manager leads: this one serves and stands by \
                             to take the background work over"
                        );
                        standing_by_said = true;
                    }
                    last_error = None;
                }
                Err(e) => {
                    let e = e.to_string();
                    if last_error.as_ref() != Some(&e) {
                        tracing::error!("cannot ask the database for the lead: {e}");
                        last_error = Some(e);
                    }
                }
            }
        } else if work
            .as_ref()
            .is_some_and(|(_, tasks)| tasks.iter().any(|t| t.is_finished()))
        {
            // A loop of the background work ended on its own (a bug): it
            // is started again whole, here, at the next tick (the lead is
            // still this process's), and the operator told.
            crate::alerts::raise(
                "background_work_stopped",
                "A background task of the leading manager stopped unexpectedly; the background \
                 work was restarted. Look in the manager's log for the panic before this line.",
                String::new(),
            );
            if let Some((tx, tasks)) = work.take() {
                wind_down(tx, tasks, grace).await;
            }
            role.set(false);
        } else if !db.still_leading().await {
            role.set(false);
            standing_by_said = false;
            crate::alerts::raise(
                "lead_lost",
                "This manager lost its lead (its database connection stopped answering): \
                 its background work stopped; another manager takes it over, or this one \
                 when its database answers again. Check the database server and the network to it.",
                String::new(),
            );
            if let Some((tx, tasks)) = work.take() {
                wind_down(tx, tasks, grace).await;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => {}
        }
    }
    if let Some((tx, tasks)) = work.take() {
        wind_down(tx, tasks, grace).await;
    }
    role.set(false);
}

/// Asks the work to stop, gives it `grace` in all, then aborts what is left.
async fn wind_down(tx: watch::Sender<bool>, tasks: Vec<JoinHandle<()>>, grace: Duration) {
    let _ = tx.send(true);
    let deadline = tokio::time::Instant::now() + grace;
    for mut t in tasks {
        if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// The work a test leader runs: counts its starts, and runs until told
    /// to stop (or never stops, to be aborted).
    fn counting_work(
        starts: Arc<AtomicUsize>,
        running: Arc<AtomicUsize>,
    ) -> impl Fn(watch::Receiver<bool>) -> Vec<JoinHandle<()>> + Send + 'static {
        move |mut stop| {
            starts.fetch_add(1, Ordering::SeqCst);
            let running = running.clone();
            vec![tokio::spawn(async move {
                running.fetch_add(1, Ordering::SeqCst);
                let _ = stop.wait_for(|s| *s).await;
                running.fetch_sub(1, Ordering::SeqCst);
            })]
        }
    }

    #[tokio::test]
    async fn the_only_process_on_sqlite_leads_at_once_and_stops_its_work_on_stop() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("m.db").display());
        let db = crate::catalog::open(&url).await.unwrap();
        let role = Arc::new(Role::default());
        let (starts, running) = (Arc::default(), Arc::<AtomicUsize>::default());
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run(
            db,
            role.clone(),
            counting_work(Arc::clone(&starts), running.clone()),
            stop,
            Duration::from_secs(5),
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while running.load(Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the work never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(role.name(), "leader");
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(running.load(Ordering::SeqCst), 0, "the work was stopped");
        assert_eq!(starts.load(Ordering::SeqCst), 1, "started once");
        assert_eq!(role.name(), "standby");
    }

    #[tokio::test]
    async fn on_postgres_one_of_two_processes_leads_and_the_other_takes_over_when_it_dies() {
        let (url, _) = crate::catalog::postgres::test_database().await;
        let a = crate::catalog::open(&url).await.unwrap();
        let b = crate::catalog::open(&url).await.unwrap();
        let (role_a, role_b) = (Arc::new(Role::default()), Arc::new(Role::default()));
        let (starts, running) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (stop_a_tx, stop_a) = watch::channel(false);
        let (stop_b_tx, stop_b) = watch::channel(false);
        let grace = Duration::from_secs(5);
        let task_a = tokio::spawn(run(
            a.clone(),
            role_a.clone(),
            counting_work(starts.clone(), running.clone()),
            stop_a,
            grace,
        ));
        let wait_for = |what: &'static str, f: Box<dyn Fn() -> bool>| async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !f() {
                assert!(tokio::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let r = role_a.clone();
        wait_for("a never led", Box::new(move || r.leading())).await;
        let task_b = tokio::spawn(run(
            b.clone(),
            role_b.clone(),
            counting_work(starts.clone(), running.clone()),
            stop_b,
            grace,
        ));
        // Several of b's ticks: it must stand by, and the work run once.
        tokio::time::sleep(TICK * 3).await;
        assert_eq!(role_b.name(), "standby");
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        assert_eq!(running.load(Ordering::SeqCst), 1);
        // a's lead connection killed by the server, as when its process
        // dies: a gives its work up, b takes it over.
        assert_eq!(crate::catalog::postgres::end_lead_session(&url).await, 1);
        let r = role_b.clone();
        wait_for("b never took over", Box::new(move || r.leading())).await;
        let r = role_a.clone();
        wait_for("a still thinks it leads", Box::new(move || !r.leading())).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        let n = running.clone();
        wait_for(
            "a's work still runs beside b's",
            Box::new(move || n.load(Ordering::SeqCst) == 1),
        )
        .await;
        // a keeps asking, and keeps standing by while b leads.
        tokio::time::sleep(TICK * 2).await;
        assert!(!role_a.leading());
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        stop_a_tx.send(true).unwrap();
        stop_b_tx.send(true).unwrap();
        task_a.await.unwrap();
        task_b.await.unwrap();
        assert_eq!(running.load(Ordering::SeqCst), 0);
    }
}
