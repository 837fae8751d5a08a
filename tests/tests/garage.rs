//! Mirror drills on a view node whose blobs live in Garage (issue 18): one
//! node on local disk (utah), one on a real single-node Garage (toronto),
//! the storage broken for real through Garage's own S3 API.
//!
//! In one cluster, one after the other (each drill leaves the movie whole
//! on both nodes for the next):
//! - zeroes written over 64 KiB in the middle of the object: found by a
//!   scrub pass, moved to `quarantine/`, refilled from utah;
//! - the object deleted: a viewer sent there gets `404 blob_missing`, the
//!   node reports it, the copy is refilled;
//! - the bucket emptied: reconciliation refills it;
//! - Garage stopped while the node runs: the node's `/healthz` fails, the
//!   manager sends viewers to utah; Garage back: toronto healthy again,
//!   its copy intact, a scrub pass finds nothing wrong.
//!
//! Playback from the bucket is checked byte for byte, whole and ranged.

use std::time::{Duration, Instant};

use e2e::{garage::Garage, make_webm, Cluster, ClusterOpts};
use futures::TryStreamExt;
use object_store::{path::Path as Key, ObjectStore, PutPayload};
use sha2::{Digest, Sha256};

const LIMIT: Duration = Duration::from_secs(180);
const BUCKET: &str = "toronto-blobs";

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let r = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let body = r.bytes().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(body.to_vec())
}

fn forced(media_url: &str, node: &str) -> String {
    format!("{media_url}?node={node}")
}

/// Names under `prefix` in the bucket.
async fn keys(s3: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    s3.list(Some(&Key::from(prefix)))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

async fn object(s3: &dyn ObjectStore, key: &str) -> Option<Vec<u8>> {
    match s3.get(&Key::from(key)).await {
        Ok(r) => Some(r.bytes().await.unwrap().to_vec()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("{key}: {e}"),
    }
}

/// Waits until the bucket holds a whole copy of `blob` and the manager
/// counts toronto's replica verified (and `extra` holds).
async fn wait_refilled(cluster: &Cluster, s3: &dyn ObjectStore, id: &str, blob: &str, what: &str) {
    let started = Instant::now();
    loop {
        let v = cluster.asset(id).await;
        assert_eq!(v["state"], "published", "{what}: stays published: {v}");
        let verified = v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["node"] == "toronto" && r["state"] == "verified");
        let whole = object(s3, &format!("blobs/{blob}"))
            .await
            .is_some_and(|b| hex::encode(Sha256::digest(&b)) == blob);
        if verified && whole {
            return;
        }
        assert!(
            started.elapsed() < LIMIT,
            "{what}: never refilled: {v}\nmanager log:\n{}",
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// toronto's copy plays byte for byte, whole and in a range (from the
/// redirector's fresh view: retried for a few seconds after a repair).
async fn plays_from_toronto(client: &reqwest::Client, media_url: &str, reference: &[u8]) {
    let started = Instant::now();
    let whole = loop {
        match fetch(client, &forced(media_url, "toronto")).await {
            Ok(b) => break b,
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("toronto does not play: {e}"),
        }
    };
    assert!(whole == reference, "whole movie from the bucket differs");
    let (from, to) = (100_001usize, 300_000usize.min(reference.len() - 1));
    let r = client
        .get(forced(media_url, "toronto"))
        .header("range", format!("bytes={from}-{to}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    let part = r.bytes().await.unwrap();
    assert!(
        part[..] == reference[from..=to],
        "range from the bucket differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_garage_keeps_every_mirror_guarantee() {
    let mut garage = Garage::start();
    garage.create_bucket(BUCKET);
    let s3 = garage.client(0, BUCKET);
    let mut opts = ClusterOpts::new(&["utah", "toronto"]);
    opts.fixed_ports = true;
    opts.reconcile_interval_secs = 3;
    opts.scrub_rate_mb_per_sec = 4.0;
    opts.scrub_interval_secs = 1;
    opts.node_tables = vec![String::new(), garage.storage_toml(0, BUCKET)];
    let cluster = Cluster::start_with(&opts);

    let input = cluster.dir.path().join("garage.webm");
    make_webm(&input);
    let id = cluster.publish(&input, "on garage", LIMIT).await;
    let asset = cluster.asset(&id).await;
    let media_url = asset["media_url"].as_str().unwrap().to_string();
    let client = cluster.client();
    let reference = fetch(&client, &forced(&media_url, "utah")).await.unwrap();

    // The copy is one object under its name, nothing left in staging.
    let held = keys(&*s3, "blobs").await;
    assert_eq!(held.len(), 1, "{held:?}");
    let blob = held[0].strip_prefix("blobs/").unwrap().to_string();
    let stored = object(&*s3, &held[0]).await.unwrap();
    assert_eq!(hex::encode(Sha256::digest(&stored)), blob);
    assert!(keys(&*s3, "tmp").await.is_empty());
    plays_from_toronto(&client, &media_url, &reference).await;

    // 1. Zeroes in the middle of the object, written through S3.
    let mut damaged = stored.clone();
    let mid = damaged.len() / 2;
    damaged[mid - 32 * 1024..mid + 32 * 1024].fill(0);
    s3.put(&Key::from(held[0].as_str()), PutPayload::from(damaged))
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        if !keys(&*s3, "quarantine").await.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < LIMIT,
            "the scrub never found the zeroes: {}",
            cluster.node_inventory(1).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_refilled(&cluster, &*s3, &id, &blob, "zeroed").await;
    let quarantined = keys(&*s3, "quarantine").await;
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(quarantined[0].starts_with(&format!("quarantine/{blob}.")));
    let metrics = cluster.metrics(&cluster.nodes[1].proc.url).await;
    assert!(
        metrics.contains("viewnode_scrub_mismatches_total 1"),
        "{metrics}"
    );
    plays_from_toronto(&client, &media_url, &reference).await;

    // 2. The object deleted: the first viewer sent there finds it missing.
    s3.delete(&Key::from(format!("blobs/{blob}")))
        .await
        .unwrap();
    let err = fetch(&client, &forced(&media_url, "toronto"))
        .await
        .unwrap_err();
    assert!(
        err.starts_with("404") && err.contains("blob_missing"),
        "{err}"
    );
    wait_refilled(&cluster, &*s3, &id, &blob, "deleted").await;
    plays_from_toronto(&client, &media_url, &reference).await;

    // 3. The bucket emptied.
    for k in keys(&*s3, "").await {
        s3.delete(&Key::from(k)).await.unwrap();
    }
    wait_refilled(&cluster, &*s3, &id, &blob, "emptied").await;
    assert!(cluster
        .manager
        .log_text()
        .contains("missing from the node's inventory"));

    // 4. Garage stopped under the running node.
    garage.kill(0);
    let node_health = format!("{}/healthz", cluster.nodes[1].proc.url);
    let started = Instant::now();
    loop {
        let r = client.get(&node_health).send().await.unwrap();
        if r.status() == 503 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "still healthy");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Viewers go to utah once the manager's probe has seen it.
    let started = Instant::now();
    loop {
        let to = cluster.redirect_location(&media_url).await;
        if to.starts_with(&cluster.nodes[0].proc.url) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "viewers still sent to {to}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for _ in 0..3 {
        assert!(fetch(&client, &media_url).await.unwrap() == reference);
    }
    let passes = cluster.node_inventory(0).await; // utah answers throughout
    assert_eq!(passes["node"], "utah");

    garage.restart(0);
    let started = Instant::now();
    loop {
        let r = client.get(&node_health).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "toronto never healthy again: {}",
            r.text().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A whole scrub pass after the outage finds nothing wrong.
    let inv = cluster.node_inventory(1).await;
    let after = inv["scrub"]["passes_completed"].as_u64().unwrap();
    let started = Instant::now();
    loop {
        let inv = cluster.node_inventory(1).await;
        if inv["scrub"]["passes_completed"].as_u64().unwrap() >= after + 2 {
            assert_eq!(inv["counts"]["good"], 1, "{inv}");
            break;
        }
        assert!(started.elapsed() < LIMIT, "no scrub pass: {inv}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let metrics = cluster.metrics(&cluster.nodes[1].proc.url).await;
    assert!(
        metrics.contains("viewnode_scrub_mismatches_total 1"),
        "only the zeroes were ever a mismatch: {metrics}"
    );
    plays_from_toronto(&client, &media_url, &reference).await;
    assert!(keys(&*s3, "tmp").await.is_empty());
}
