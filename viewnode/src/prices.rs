//! Paid movies' price epochs (docs/credits.md, "Price changes").
//!
//! A grant-less playback token carries the price epoch of its movie when it
//! was minted; once the movie has a price, a token from an earlier epoch
//! (handed out while it was free) must not play. Tokens are checked here
//! without calling the manager, so the node polls the manager for the list
//! of paid movies and their epochs every `price_poll_secs`, keeps it on
//! disk (a node restarted while the manager is down still refuses stale
//! tokens), and checks each grant-less token against it.
//!
//! The list counts only with the manager's MAC over this very request
//! ([`crate::AppState::call_manager`]), so nobody on the path can feed the
//! node a forged or replayed one.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Mutex, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use shared::PlaybackClaims;
use tokio::sync::watch;

use crate::{error::NodeError, SharedState};

#[derive(Serialize, Deserialize, Default)]
struct Snapshot {
    /// When it was fetched (our clock): how stale the list may be.
    fetched_at: i64,
    /// Asset id → its current price epoch; only movies with a price.
    paid: HashMap<String, u32>,
}

pub struct PaidEpochs {
    path: PathBuf,
    snap: RwLock<Snapshot>,
    /// One writer of the file at a time.
    write: Mutex<()>,
}

impl PaidEpochs {
    /// Loads `<storage_dir>/paid-epochs.json`. A missing file is an empty
    /// list; a damaged one is too, with an error logged: the next poll that
    /// the manager answers restores it (seconds, unless the manager is
    /// down: `/healthz` shows the list's age meanwhile), and refusing to
    /// start would stop free movies and paid grants alike.
    pub fn open(storage_dir: &Path) -> PaidEpochs {
        let path = storage_dir.join("paid-epochs.json");
        let snap = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::error!(file = %path.display(), "paid-epochs file unreadable, starting empty: {e}");
                Snapshot::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Snapshot::default(),
            Err(e) => {
                tracing::error!(file = %path.display(), "paid-epochs file unreadable, starting empty: {e}");
                Snapshot::default()
            }
        };
        PaidEpochs {
            path,
            snap: RwLock::new(snap),
            write: Mutex::new(()),
        }
    }

    /// Refuses a grant-less token minted before its movie became paid.
    pub fn check(&self, claims: &PlaybackClaims) -> Result<(), NodeError> {
        if claims.grant.is_some() {
            return Ok(());
        }
        let snap = self.snap.read().expect("not poisoned");
        match snap.paid.get(&claims.asset_id) {
            Some(&epoch) if claims.epoch < epoch => Err(NodeError::PaymentRequired),
            _ => Ok(()),
        }
    }

    /// Seconds since the list was last fetched (`None`: never).
    pub fn age_secs(&self) -> Option<i64> {
        let at = self.snap.read().expect("not poisoned").fetched_at;
        (at > 0).then(|| shared::runtime::unix_now() - at)
    }

    /// Takes a verified answer: durably on disk first, then in memory.
    /// Returns how many paid movies it lists.
    fn take(&self, paid: Vec<(String, u32)>) -> anyhow::Result<usize> {
        let _w = self.write.lock().expect("not poisoned");
        let snap = Snapshot {
            fetched_at: shared::runtime::unix_now(),
            paid: paid.into_iter().collect(),
        };
        let n = snap.paid.len();
        shared::runtime::write_file_durably(&self.path, &serde_json::to_vec(&snap)?)?;
        *self.snap.write().expect("not poisoned") = snap;
        Ok(n)
    }
}

/// One poll: fetch (the answer's MAC is checked there), take.
async fn fetch(st: &SharedState) -> anyhow::Result<usize> {
    let resp = st
        .call_manager("GET", "paid-epochs", Vec::new(), Duration::from_secs(20))
        .await?;
    anyhow::ensure!(resp.status.is_success(), "manager answered {}", resp.status);
    let a: shared::protocol::PaidEpochs = serde_json::from_slice(&resp.body)?;
    anyhow::ensure!(a.node == st.cfg.name, "the answer is for node {:?}", a.node);
    st.prices.take(a.paid)
}

/// Polls every `price_poll_secs` until `stop`. Failures are logged once per
/// run of failures, not per poll.
pub async fn poll(st: SharedState, mut stop: watch::Receiver<bool>) {
    if st.cfg.manager_url.is_empty() {
        return;
    }
    let every = Duration::from_secs(st.cfg.price_poll_secs);
    let mut failing = false;
    loop {
        match fetch(&st).await {
            Ok(n) => {
                if failing {
                    tracing::info!(paid = n, "price epochs fetched again");
                }
                failing = false;
                metrics::gauge!("viewnode_paid_movies").set(n as f64);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        "cannot fetch price epochs from the manager (keeping the last list): {e:#}"
                    );
                }
                failing = true;
                metrics::counter!("viewnode_price_poll_failures_total").increment(1);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(epoch: u32, grant: Option<&str>) -> PlaybackClaims {
        PlaybackClaims {
            asset_id: "m".into(),
            blob: shared::BlobId::of(b"x"),
            wrapped_key: vec![],
            expires_at: i64::MAX,
            grant: grant.map(Into::into),
            epoch,
        }
    }

    #[test]
    fn stale_free_tokens_are_refused_and_the_list_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let p = PaidEpochs::open(dir.path());
        assert!(p.check(&claims(0, None)).is_ok(), "nothing is paid yet");
        assert_eq!(p.age_secs(), None);
        p.take(vec![("m".into(), 1)]).unwrap();
        assert!(p.age_secs().is_some_and(|a| a <= 1));
        assert_eq!(
            p.check(&claims(0, None)).unwrap_err().code(),
            "payment_required"
        );
        assert!(p.check(&claims(1, None)).is_ok(), "minted in this epoch");
        assert!(p.check(&claims(0, Some("g"))).is_ok(), "a grant pays");
        drop(p);
        let again = PaidEpochs::open(dir.path());
        assert!(again.check(&claims(0, None)).is_err(), "kept on disk");
        again.take(vec![]).unwrap();
        assert!(again.check(&claims(0, None)).is_ok(), "free again");
        std::fs::write(dir.path().join("paid-epochs.json"), b"{garbage").unwrap();
        assert!(PaidEpochs::open(dir.path()).check(&claims(0, None)).is_ok());
    }
}
