//! What the manager and the view nodes say to each other, written once:
//! both sides serialize and parse these types, so a field cannot mean one
//! thing here and another there (docs/api.md has the routes; every call and
//! answer is signed, `nodeauth`).

use serde::{Deserialize, Serialize};

/// One view-journal event: what one paid response served since its
/// previous event (`POST /internal/v1/nodes/{name}/journal`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEvent {
    /// Unique per node, forever (a UUID).
    pub id: String,
    /// The grant the token carried (paid views only).
    pub grant: Option<String>,
    pub asset: String,
    /// Bytes handed to the client since this response's previous event.
    pub bytes: u64,
    /// Unix seconds of the first and last of those bytes.
    pub first_at: i64,
    pub last_at: i64,
}

/// A delivery of the view journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalBatch {
    pub events: Vec<JournalEvent>,
    /// Every paid response that started on the node before this time (its
    /// clock) has had its first bytes journalled and delivered, this batch
    /// included (docs/credits.md, "Refunds"). 0 from a node that predates
    /// watermarks: it never lets a refund through.
    #[serde(default)]
    pub watermark: i64,
    /// The node's clock when it sent the batch.
    #[serde(default)]
    pub now: i64,
}

/// The manager's answer to a [`JournalBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalReceipt {
    pub node: String,
    /// Events new to the manager.
    pub applied: u64,
    /// Events it had already applied (a resend).
    pub duplicates: u64,
}

/// A node's report of copies it lost (`POST …/events`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub events: Vec<NodeReportEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReportEvent {
    /// `quarantined` (a bad copy set aside) or `missing` (asked for, not there).
    pub kind: String,
    pub blob: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub at: i64,
}

/// The paid movies and their price epochs (`GET …/paid-epochs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaidEpochs {
    pub node: String,
    /// `(asset id, epoch)` of every movie with a price.
    pub paid: Vec<(String, u32)>,
}

/// What a node holds (`GET /internal/v1/blobs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    #[serde(default)]
    pub node: String,
    pub blobs: Vec<HeldBlob>,
    #[serde(default)]
    pub quarantined: Vec<QuarantinedBlob>,
    #[serde(default)]
    pub counts: InventoryCounts,
    /// The node's scrub status, as it reports it (for operators).
    #[serde(default)]
    pub scrub: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBlob {
    pub blob: String,
    pub size: u64,
    /// When the node last proved it hashes to its name.
    #[serde(default)]
    pub verified_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantinedBlob {
    pub blob: String,
    pub since: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryCounts {
    pub good: u64,
    pub good_bytes: u64,
    pub quarantined: u64,
}

/// The git commit this code was built from (12 hex digits), or `unknown`.
pub const GIT_COMMIT: &str = env!("SLMEDIA_GIT_COMMIT");

/// The version a process reports: crate version and commit.
pub fn build_version() -> String {
    format!("{} ({GIT_COMMIT})", env!("CARGO_PKG_VERSION"))
}

/// Changes when what a node and the manager must agree on changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// A fingerprint of the configuration a node shares with the manager: the
/// public key that signs playback tokens, the master key's id, and the
/// wire protocol. Both sides compute it from their own settings; a node
/// whose fingerprint differs from the manager's will refuse good tokens or
/// fail to open blobs, and the operator's console says so before viewers do.
pub fn config_fingerprint(token_public_key_hex: &str, master_key_id: u32) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!(
        "slmedia shared config v1\npublic_key={}\nmaster_key_id={master_key_id}\nprotocol={PROTOCOL_VERSION}\n",
        token_public_key_hex.trim().to_ascii_lowercase()
    ));
    hex::encode(&d[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_from_a_node_without_watermarks_parses_with_none() {
        let b: JournalBatch = serde_json::from_str(
            r#"{"events":[{"id":"e","grant":"g","asset":"a","bytes":5,"first_at":1,"last_at":2}]}"#,
        )
        .unwrap();
        assert_eq!((b.watermark, b.now, b.events[0].bytes), (0, 0, 5));
        // Negative byte counts are not a thing the wire can carry.
        assert!(serde_json::from_str::<JournalEvent>(
            r#"{"id":"e","grant":null,"asset":"a","bytes":-1,"first_at":1,"last_at":2}"#
        )
        .is_err());
    }

    #[test]
    fn an_inventory_round_trips() {
        let i = Inventory {
            node: "utah".into(),
            blobs: vec![HeldBlob {
                blob: "ab".into(),
                size: 3,
                verified_at: Some(9),
            }],
            quarantined: vec![QuarantinedBlob {
                blob: "cd".into(),
                since: 4,
            }],
            counts: InventoryCounts {
                good: 1,
                good_bytes: 3,
                quarantined: 1,
            },
            scrub: serde_json::json!({"passes_completed": 2}),
        };
        let back: Inventory = serde_json::from_value(serde_json::to_value(&i).unwrap()).unwrap();
        assert_eq!(back, i);
    }
}

// ---- transcode workers (manager/src/runners.rs, transcoder/) ----------------

/// `POST /api/v1/runners/register`: a one-time registration token from the
/// admin, and the name the worker will sign with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerRegistration {
    pub token: String,
    pub name: String,
}

/// The answer to a registration: the worker's own secret, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerCredentials {
    pub name: String,
    /// 64 hex characters; the HMAC key of every call it signs.
    pub secret: String,
}

/// `POST /api/v1/runners/jobs/request`: the job a worker may accept (204
/// when there is none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerOffer {
    pub id: String,
}

/// `POST /api/v1/runners/jobs/{id}/accept`: the job is the worker's while
/// it reports progress; every later call on it carries `?lease=`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerJob {
    pub id: String,
    pub lease: String,
    pub lease_secs: i64,
    pub source_bytes: u64,
    /// The source's duration as the manager probed it.
    pub duration_secs: f64,
    pub max_width: u32,
    pub max_height: u32,
    pub crf: u8,
    pub preset: String,
}

/// `POST …/progress`: how far the transcode is, 0.0 to 1.0.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerProgress {
    pub progress: f64,
}

/// The answer to a progress report: `cancel` when the uploader cancelled
/// (the worker stops and calls `abort`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerProgressAnswer {
    pub cancel: bool,
}

/// `POST …/error`: why the worker could not make the result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerFailure {
    /// The media crate's stable code when it has one.
    pub code: String,
    pub message: String,
}
