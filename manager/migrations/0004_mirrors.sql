-- Mirrors (issue 5): replica states for repair, the time each copy was last
-- proven intact, and blobs found on nodes that no asset references.
--
-- Replica states:
--   pending    waiting for its first verified push
--   failed     a push failed; retried with backoff (`next_try`)
--   verified   the node re-hashed and committed the bytes (`verified_at`:
--              then, or the node's last scrub of that copy, whichever is later)
--   repairing  the copy was verified once but is gone or quarantined; it is
--              refilled from a verified copy elsewhere (`last_error` says why)
--   retired    the node is no longer configured; never retried, not counted
-- SQLite cannot change a CHECK constraint in place, so the table is rebuilt.
CREATE TABLE replicas_v4 (
    asset_id    TEXT    NOT NULL REFERENCES assets (id) ON DELETE CASCADE,
    node        TEXT    NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('pending', 'verified', 'failed', 'repairing', 'retired')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    next_try    INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL,
    verified_at INTEGER,
    PRIMARY KEY (asset_id, node)
);
INSERT INTO replicas_v4 (asset_id, node, state, attempts, last_error, next_try, updated_at, verified_at)
    SELECT asset_id, node, state, attempts, last_error, next_try, updated_at,
           CASE WHEN state = 'verified' THEN updated_at END
    FROM replicas;
DROP TABLE replicas;
ALTER TABLE replicas_v4 RENAME TO replicas;
CREATE INDEX replicas_due ON replicas (state, next_try);

-- A blob a node holds that no asset references: reported at once, deleted
-- only once it has been seen for the whole grace period.
CREATE TABLE unreferenced_blobs (
    node          TEXT    NOT NULL,
    blob_id       TEXT    NOT NULL,
    size          INTEGER NOT NULL,
    first_seen_at INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL,
    PRIMARY KEY (node, blob_id)
);
CREATE INDEX assets_blob ON assets (blob_id);
