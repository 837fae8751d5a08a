//! The catalog's states as types. Each has one string form, used only at
//! the edges: the database (its `CHECK` constraints list the same words),
//! JSON and pages. Everywhere else the compiler checks every comparison and
//! every `match`, where a mistyped string used to compare false in silence.

use std::fmt;

/// Where a movie is in its life (migrations/0001_init.sql).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type, serde::Serialize, serde::Deserialize,
)]
#[sqlx(rename_all = "lowercase")]
// TEXT on PostgreSQL too, as SQLite has it (CHECKs list the words).
#[sqlx(type_name = "text")]
#[serde(rename_all = "lowercase")]
pub enum AssetState {
    /// Uploaded and paid for; waiting for a worker.
    Queued,
    Probing,
    Transcoding,
    Sealing,
    /// Sealed; waiting for `min_replicas` verified copies.
    Replicating,
    /// Playable.
    Published,
    /// Refused (bad input, cancelled, or given up); never plays.
    Rejected,
    /// Every stored copy lost or corrupt; plays again once one is back.
    Damaged,
    /// Taken down by an operator (migrations/0010_console.sql); its copies
    /// are kept so that reinstating it is instant.
    Withdrawn,
}

impl AssetState {
    /// Every state, in a movie's order of life.
    pub const ALL: [AssetState; 9] = [
        AssetState::Queued,
        AssetState::Probing,
        AssetState::Transcoding,
        AssetState::Sealing,
        AssetState::Replicating,
        AssetState::Published,
        AssetState::Rejected,
        AssetState::Damaged,
        AssetState::Withdrawn,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AssetState::Queued => "queued",
            AssetState::Probing => "probing",
            AssetState::Transcoding => "transcoding",
            AssetState::Sealing => "sealing",
            AssetState::Replicating => "replicating",
            AssetState::Published => "published",
            AssetState::Rejected => "rejected",
            AssetState::Damaged => "damaged",
            AssetState::Withdrawn => "withdrawn",
        }
    }

    /// No worker will move it on by itself.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            AssetState::Published
                | AssetState::Rejected
                | AssetState::Damaged
                | AssetState::Withdrawn
        )
    }
}

impl fmt::Display for AssetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an account may do. Operators run the site (admin API, grants);
/// everyone else uploads, buys and watches.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type, serde::Serialize, serde::Deserialize,
)]
#[sqlx(rename_all = "lowercase")]
// TEXT on PostgreSQL too, as SQLite has it (CHECKs list the words).
#[sqlx(type_name = "text")]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Uploader,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Uploader => "uploader",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uploader" => Ok(Role::Uploader),
            "operator" => Ok(Role::Operator),
            _ => Err(format!("{s:?} is not a role (uploader, operator)")),
        }
    }
}

/// A copy of a movie on one node (migrations/0004_mirrors.sql).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type, serde::Serialize, serde::Deserialize,
)]
#[sqlx(rename_all = "lowercase")]
// TEXT on PostgreSQL too, as SQLite has it (CHECKs list the words).
#[sqlx(type_name = "text")]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// To be pushed.
    Pending,
    /// The node holds a copy it proved intact.
    Verified,
    /// A push failed; retried with backoff.
    Failed,
    /// Lost or quarantined on the node; being refilled.
    Repairing,
    /// The node left the configuration.
    Retired,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Pending => "pending",
            ReplicaState::Verified => "verified",
            ReplicaState::Failed => "failed",
            ReplicaState::Repairing => "repairing",
            ReplicaState::Retired => "retired",
        }
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Largest amount one movement may carry (10^12 credits).
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;
/// Largest balance an account may hold; with [`MAX_AMOUNT`] it keeps every
/// sum far from i64 overflow (SQLite would turn an overflow into a float).
pub const MAX_BALANCE: i64 = 1_000_000_000_000_000;

/// An amount of credits one movement may carry: a whole number from 1 to
/// [`MAX_AMOUNT`]. Made only by checking (`Credits::new`, or the ledger's
/// parsers at the edges), so a function taking `Credits` never sees zero,
/// a negative or an overflowing value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Credits(i64);

impl Credits {
    pub fn new(n: i64) -> Option<Self> {
        (1..=MAX_AMOUNT).contains(&n).then_some(Self(n))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A movie's price per view: free, or [`Credits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(into = "i64")]
pub enum Price {
    Free,
    Paid(Credits),
}

impl Price {
    pub fn get(self) -> i64 {
        match self {
            Price::Free => 0,
            Price::Paid(c) => c.get(),
        }
    }
}

impl From<Price> for i64 {
    fn from(p: Price) -> i64 {
        p.get()
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.get().fmt(f)
    }
}

/// What a monitor check found (migrations/0009_monitor.sql). Ordered from
/// best to worst, so a component's state is the `max` of its checks'.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    sqlx::Type,
    serde::Serialize,
    serde::Deserialize,
)]
#[sqlx(rename_all = "lowercase")]
// TEXT on PostgreSQL too, as SQLite has it (CHECKs list the words).
#[sqlx(type_name = "text")]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Ok,
    /// Working, but not as it should (slower, fewer copies, one node down).
    Degraded,
    /// Not working.
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Degraded => "degraded",
            Health::Down => "down",
        }
    }

    /// How the status page says it.
    pub fn words(self) -> &'static str {
        match self {
            Health::Ok => "Operational",
            Health::Degraded => "Degraded",
            Health::Down => "Outage",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_are_whole_positive_and_bounded() {
        assert_eq!(Credits::new(1).map(Credits::get), Some(1));
        assert_eq!(Credits::new(MAX_AMOUNT).map(Credits::get), Some(MAX_AMOUNT));
        for bad in [0, -1, MAX_AMOUNT + 1, i64::MIN, i64::MAX] {
            assert_eq!(Credits::new(bad), None, "{bad}");
        }
        assert_eq!(Price::Free.get(), 0);
        assert_eq!(serde_json::to_value(Price::Paid(Credits(7))).unwrap(), 7);
    }

    #[test]
    fn string_forms_match_the_database_and_json() {
        for s in AssetState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            // `withdrawn` is read back, never stored (migrations/0010).
            if s == AssetState::Withdrawn {
                let sql = include_str!("catalog/portable.rs");
                assert!(sql.contains(&format!("'{s}'")), "{s} not read back");
                continue;
            }
            let sql = include_str!("../migrations/0001_init.sql");
            assert!(sql.contains(&format!("'{s}'")), "{s} not in the CHECK");
        }
        for s in [
            ReplicaState::Pending,
            ReplicaState::Verified,
            ReplicaState::Failed,
            ReplicaState::Repairing,
            ReplicaState::Retired,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            let sql = include_str!("../migrations/0004_mirrors.sql");
            assert!(sql.contains(&format!("'{s}'")), "{s} not in the CHECK");
        }
    }
}
