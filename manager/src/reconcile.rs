//! Reconciliation: the catalog says which node should hold which blob; the
//! nodes' inventories say what they hold. Every `reconcile.interval_secs`
//! the two are compared and the differences acted on:
//!
//! - a replica `verified` in the catalog whose blob is not in the node's good
//!   list (gone, quarantined by a scrub or a failed read, or of the wrong
//!   size) goes to `repairing`, due at once; the replication loop refills it
//!   from a verified copy (`pipeline::replicate_asset`) and verifies it again;
//! - a replica not yet `verified` whose blob the node does list is
//!   `verified` (a push that completed unseen, a copy an operator put back);
//!   the node's own last-verification time is recorded either way;
//! - a node that becomes reachable again has its waiting replicas made due
//!   now, instead of at the end of their backoff;
//! - replicas on nodes removed from the configuration are `retired` (never
//!   retried, never counted) and every configured node gets a replica of
//!   every mirrored asset;
//! - a blob no asset references is reported (log, `manager_unreferenced_blobs`)
//!   and deleted from the node only once it has been seen unreferenced for
//!   `reconcile.unreferenced_grace_secs`;
//! - a `damaged` asset with a good source again (a node's copy, or the
//!   sealed file put back in the outbox) replicates and is published again.
//!
//! Nodes also report a quarantine the moment it happens
//! (`POST /internal/v1/nodes/{name}/events`, signed with that node's
//! secret), so repair normally starts within seconds; this loop is the
//! backstop for reports that never arrived and for losses nobody saw.
//!
//! Only the blob store is compared: nodes keep other things (backups) apart
//! from `blobs/`, and their inventory never lists them.

use std::collections::{HashMap, HashSet};

use shared::BlobId;
use tokio::sync::watch;

use crate::{
    catalog,
    domain::ReplicaState,
    pipeline::{self, Pipeline},
};

/// Runs a pass every `reconcile.interval_secs` until `stop` fires.
pub async fn run(st: pipeline::Ctx, mut stop: watch::Receiver<bool>) {
    let every = std::time::Duration::from_secs(st.cfg.reconcile.interval_secs);
    let mut reachable: HashMap<String, bool> = HashMap::new();
    let worker = crate::workers::Worker::register("reconcile");
    loop {
        worker.started();
        let r = pass(&st, &mut reachable).await;
        if let Err(e) = &r {
            tracing::error!("reconciliation pass failed: {e:#}");
        }
        worker.finished(r);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => {
                worker.stopped();
                return;
            }
        }
    }
}

/// One comparison of every node with the catalog.
pub async fn pass(st: &Pipeline, reachable: &mut HashMap<String, bool>) -> anyhow::Result<()> {
    let began = std::time::Instant::now();
    // Where a pass spends its time (debug log): docs/scale.md.
    let lap =
        |what: &str| tracing::debug!(ms = began.elapsed().as_millis() as u64, "reconcile: {what}");
    let (retired, added) = st.db.sync_replica_nodes(&st.nodes.names()).await?;
    if retired > 0 {
        tracing::warn!(
            count = retired,
            "replicas on nodes no longer configured retired"
        );
    }
    if added > 0 {
        tracing::info!(count = added, "replicas added for configured nodes");
    }
    let assets = st.db.mirrored_assets().await?;
    let replica_list = st.db.mirrored_replicas().await?;
    let replicas: HashMap<(&str, &str), &catalog::Replica> = replica_list
        .iter()
        .map(|r| ((r.asset_id.as_str(), r.node.as_str()), r))
        .collect();
    let referenced = st.db.referenced_blobs().await?;
    lap("catalog read");
    let grace = st.cfg.reconcile.unreferenced_grace_secs as i64;

    for node in st.nodes.list.iter() {
        let name = node.cfg.name.clone();
        // Evidence gathered from here on is newer than any push verified
        // before this instant, and only such pushes may be undone by it.
        let observed = catalog::now();
        let inv = match st.nodes.inventory(node).await {
            Ok(i) => i,
            Err(e) => {
                if reachable.insert(name.clone(), false) != Some(false) {
                    tracing::warn!(node = %name, "cannot read the node's inventory: {e}");
                }
                metrics::gauge!("manager_node_inventory_ok", "node" => name.clone()).set(0.0);
                continue;
            }
        };
        metrics::gauge!("manager_node_inventory_ok", "node" => name.clone()).set(1.0);
        lap("inventory fetched");
        node.set_last_inventory(&inv, observed);
        if reachable.insert(name.clone(), true) != Some(true) {
            let n = st.db.replicas_due_now(&name).await?;
            if n > 0 {
                tracing::info!(node = %name, count = n, "node reachable; its waiting copies are due now");
            }
        }
        let good: HashMap<&str, &crate::nodes::HeldBlob> =
            inv.blobs.iter().map(|b| (b.blob.as_str(), b)).collect();
        let quarantined: HashSet<&str> = inv.quarantined.iter().map(|q| q.blob.as_str()).collect();

        // Copies still verified whose proof time moved on (the node's scrub
        // re-read them): written together below, not one commit each.
        let mut proved_again: Vec<(String, i64)> = Vec::new();
        for a in &assets {
            let Some(r) = replicas.get(&(a.id.as_str(), name.as_str())) else {
                continue;
            };
            if r.state == ReplicaState::Retired {
                continue;
            }
            match good.get(a.blob_id.as_str()) {
                Some(h) if h.size as i64 == a.sealed_len && r.state == ReplicaState::Verified => {
                    if let Some(at) = h.verified_at.filter(|&at| Some(at) > r.verified_at) {
                        proved_again.push((a.id.clone(), at));
                    }
                }
                Some(h) if h.size as i64 == a.sealed_len => {
                    if st.db.replica_seen_good(&a.id, &name, h.verified_at).await? {
                        tracing::info!(asset = %a.id, node = %name, was = %r.state, "node holds a good copy; replica verified");
                    }
                }
                other => {
                    let reason = match other {
                        Some(h) => format!(
                            "the node's copy is {} bytes, the sealed blob {}",
                            h.size, a.sealed_len
                        ),
                        None if quarantined.contains(a.blob_id.as_str()) => {
                            "quarantined on the node (failed its hash or tag check)".to_string()
                        }
                        None => "missing from the node's inventory".to_string(),
                    };
                    if r.state == ReplicaState::Verified
                        && st.db.replica_lost(&a.id, &name, &reason, observed).await?
                    {
                        tracing::warn!(asset = %a.id, node = %name, "verified copy lost: {reason}; repairing");
                        metrics::counter!("manager_replicas_lost_total", "node" => name.clone())
                            .increment(1);
                    }
                }
            }
        }

        st.db.refresh_verified_at(&name, &proved_again).await?;
        lap("copies compared and proof times written");

        // The other way round: what the node holds that nothing references.
        let mut unreferenced = 0u64;
        for h in &inv.blobs {
            if referenced.contains(&h.blob) {
                continue;
            }
            let Ok(blob) = h.blob.parse::<BlobId>() else {
                continue;
            };
            unreferenced += 1;
            let first = st
                .db
                .note_unreferenced(&name, &h.blob, h.size as i64)
                .await?;
            let age = catalog::now() - first;
            if first >= observed {
                tracing::warn!(node = %name, %blob, size = h.size, grace_secs = grace,
                    "blob referenced by no movie; it will be deleted after the grace period");
            }
            if age >= grace {
                match st.nodes.delete_blob(node, &blob).await {
                    Ok(()) => {
                        st.db.drop_unreferenced(&name, &h.blob).await?;
                        metrics::counter!("manager_unreferenced_blobs_deleted_total", "node" => name.clone())
                            .increment(1);
                        tracing::warn!(node = %name, %blob, age_secs = age, "unreferenced blob deleted");
                        unreferenced -= 1;
                    }
                    Err(e) => {
                        tracing::error!(node = %name, %blob, "cannot delete unreferenced blob: {e}")
                    }
                }
            }
        }
        st.db.forget_unreferenced(&name, observed).await?;
        metrics::gauge!("manager_unreferenced_blobs", "node" => name.clone())
            .set(unreferenced as f64);
        metrics::gauge!("manager_node_inventory_blobs", "node" => name.clone())
            .set(inv.blobs.len() as f64);
        metrics::gauge!("manager_node_quarantined_blobs", "node" => name.clone())
            .set(inv.quarantined.len() as f64);
        let now = catalog::now();
        let oldest = inv
            .blobs
            .iter()
            .map(|b| now - b.verified_at.unwrap_or(0))
            .max()
            .unwrap_or(0);
        metrics::gauge!("manager_node_oldest_verification_age_seconds", "node" => name.clone())
            .set(oldest as f64);
    }

    // Counted afresh below, after this pass's changes.
    drop(replicas);
    drop(replica_list);

    // A damaged movie with a good source again goes back to replicating.
    for a in assets.iter().filter(|a| a.state == "damaged") {
        let in_outbox = a
            .blob_id
            .parse::<BlobId>()
            .map(|b| pipeline::outbox_path(st, &b).exists())
            .unwrap_or(false);
        let on_a_node = st
            .db
            .replicas(&a.id)
            .await?
            .iter()
            .any(|r| r.state == ReplicaState::Verified);
        if (in_outbox || on_a_node) && st.db.undamage(&a.id).await? {
            tracing::warn!(asset = %a.id, in_outbox, on_a_node, "damaged movie has a good copy again; replicating");
            pipeline::replicate_asset(st, &a.id).await?;
        }
    }

    let mut damaged = 0;
    for (state, n) in st.db.asset_state_counts().await? {
        metrics::gauge!("manager_assets", "state" => state.clone()).set(n as f64);
        if state == "damaged" {
            damaged = n;
        }
    }
    metrics::gauge!("manager_assets_damaged").set(damaged as f64);
    if damaged > 0 {
        crate::alerts::raise(
            "movie_damaged",
            "movies with no good copy left",
            format!("count={damaged}"),
        );
    }
    let mut by_state: HashMap<ReplicaState, i64> = HashMap::new();
    for r in st.db.mirrored_replicas().await? {
        *by_state.entry(r.state).or_default() += 1;
    }
    for s in [
        ReplicaState::Pending,
        ReplicaState::Failed,
        ReplicaState::Verified,
        ReplicaState::Repairing,
        ReplicaState::Retired,
    ] {
        metrics::gauge!("manager_replicas", "state" => s.as_str())
            .set(by_state.get(&s).copied().unwrap_or(0) as f64);
    }
    metrics::gauge!("manager_reconcile_last_pass_seconds").set(began.elapsed().as_secs_f64());
    metrics::counter!("manager_reconcile_passes_total").increment(1);
    lap("pass done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::catalog;

    async fn sealed_asset() -> (tempfile::TempDir, catalog::SharedCatalog) {
        let dir = tempfile::tempdir().unwrap();
        let db = catalog::open(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
        let owner = db
            .create_account("a@example.com", "x", crate::domain::Role::Uploader, 0)
            .await
            .unwrap();
        db.insert_asset("m", owner, "M", "m.mp4", 10).await.unwrap();
        let nodes = ["utah".to_string(), "toronto".to_string()];
        db.record_sealed("m", "seed", &"ab".repeat(32), 100, 90, b"k", &nodes)
            .await
            .unwrap();
        (dir, db)
    }

    fn state_of(rs: &[catalog::Replica], node: &str) -> String {
        rs.iter()
            .find(|r| r.node == node)
            .unwrap()
            .state
            .to_string()
    }

    #[tokio::test]
    async fn a_copy_is_downgraded_only_by_evidence_newer_than_its_proof() {
        let (_d, db) = sealed_asset().await;
        db.replica_verified("m", "utah").await.unwrap();
        db.replica_verified("m", "toronto").await.unwrap();
        assert!(db.publish_if_replicated("m", 2).await.unwrap());
        let proof = db.replicas("m").await.unwrap()[0].verified_at.unwrap();
        // An inventory gathered before the push was verified proves nothing.
        assert!(!db
            .replica_lost("m", "utah", "missing", proof)
            .await
            .unwrap());
        assert!(db
            .replica_lost("m", "utah", "missing", proof + 1)
            .await
            .unwrap());
        let rs = db.replicas("m").await.unwrap();
        assert_eq!(state_of(&rs, "utah"), "repairing");
        // A failed repair stays `repairing` (and keeps its reason visible).
        db.replica_failed("m", "utah", "unreachable", 0)
            .await
            .unwrap();
        assert_eq!(
            state_of(&db.replicas("m").await.unwrap(), "utah"),
            "repairing"
        );
        // A copy the node lists again is verified with the node's proof time.
        assert!(db
            .replica_seen_good("m", "utah", Some(proof + 50))
            .await
            .unwrap());
        let rs = db.replicas("m").await.unwrap();
        assert_eq!(state_of(&rs, "utah"), "verified");
        assert_eq!(
            rs.iter().find(|r| r.node == "utah").unwrap().verified_at,
            Some(proof + 50)
        );
    }

    #[tokio::test]
    async fn damaged_only_without_a_verified_copy_and_back_when_one_appears() {
        let (_d, db) = sealed_asset().await;
        db.replica_verified("m", "toronto").await.unwrap();
        assert!(!db.mark_damaged("m").await.unwrap(), "toronto holds one");
        let hit = db
            .replicas_quarantined("toronto", &"ab".repeat(32), "scrub")
            .await
            .unwrap();
        assert_eq!(hit, vec!["m".to_string()]);
        assert!(db.mark_damaged("m").await.unwrap());
        assert!(!db.mark_damaged("m").await.unwrap(), "alert raised once");
        let a = db.asset("m").await.unwrap().unwrap();
        assert_eq!(
            (a.state.as_str(), a.error_code.as_deref()),
            ("damaged", Some("movie_damaged"))
        );
        assert!(db.undamage("m").await.unwrap());
        assert_eq!(
            db.asset("m").await.unwrap().unwrap().state.as_str(),
            "replicating"
        );
    }

    #[tokio::test]
    async fn removed_nodes_are_retired_and_new_ones_get_a_replica() {
        let (_d, db) = sealed_asset().await;
        let now_nodes = ["toronto".to_string(), "paris".to_string()];
        assert_eq!(db.sync_replica_nodes(&now_nodes).await.unwrap(), (1, 1));
        let rs = db.replicas("m").await.unwrap();
        assert_eq!(state_of(&rs, "utah"), "retired");
        assert_eq!(state_of(&rs, "paris"), "pending");
        // Retired replicas are never due and do not hold back "all verified".
        let due = db.due_replicas().await.unwrap();
        assert!(due.iter().all(|r| r.node != "utah"), "{due:?}");
        db.replica_verified("m", "toronto").await.unwrap();
        db.replica_verified("m", "paris").await.unwrap();
        assert!(db.all_verified("m").await.unwrap());
        // Idempotent; and a node that comes back is filled again.
        assert_eq!(db.sync_replica_nodes(&now_nodes).await.unwrap(), (0, 0));
        let all = [
            "utah".to_string(),
            "toronto".to_string(),
            "paris".to_string(),
        ];
        assert_eq!(db.sync_replica_nodes(&all).await.unwrap(), (0, 1));
        assert_eq!(
            state_of(&db.replicas("m").await.unwrap(), "utah"),
            "pending"
        );
    }

    #[tokio::test]
    async fn unreferenced_blobs_keep_their_first_sighting() {
        let (_d, db) = sealed_asset().await;
        let first = db.note_unreferenced("utah", "cd", 5).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        assert_eq!(db.note_unreferenced("utah", "cd", 5).await.unwrap(), first);
        assert!(db
            .referenced_blobs()
            .await
            .unwrap()
            .contains(&"ab".repeat(32)));
        // Not seen in a later pass: forgotten, so its clock starts again.
        db.forget_unreferenced("utah", catalog::now() + 1)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        assert!(db.note_unreferenced("utah", "cd", 5).await.unwrap() > first);
    }
}
