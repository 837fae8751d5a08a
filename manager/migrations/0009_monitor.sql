-- The monitor's memory (docs/operations.md, "Monitoring and alerts"): what
-- each check last found, every change of state, and seconds per state per
-- day for the status page's 90 daily bars. Kept in the catalog so history
-- and "was the operator told?" survive a restart.

-- One row per check: its latest result and what the channels were last told.
CREATE TABLE check_state (
    check_id TEXT PRIMARY KEY,
    -- The status page's component it counts towards (`web`, `playback:eu`).
    component TEXT NOT NULL,
    -- ok | degraded | down
    state TEXT NOT NULL,
    detail TEXT NOT NULL,
    -- When it entered `state`.
    since INTEGER NOT NULL,
    checked_at INTEGER NOT NULL,
    -- The state last announced (firing or resolved), and when; NULL: never.
    notified_state TEXT,
    notified_at INTEGER
);

-- Every change of state, newest last (pruned after 90 days).
CREATE TABLE check_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    check_id TEXT NOT NULL,
    component TEXT NOT NULL,
    at INTEGER NOT NULL,
    state TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX check_history_at ON check_history (at);

-- Seconds observed in each state, per check and UTC day (unix day number).
CREATE TABLE check_days (
    check_id TEXT NOT NULL,
    component TEXT NOT NULL,
    day INTEGER NOT NULL,
    ok_secs INTEGER NOT NULL DEFAULT 0,
    degraded_secs INTEGER NOT NULL DEFAULT 0,
    down_secs INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (check_id, day)
);

-- Every attempt to tell the operator, with the receiving end's answer.
CREATE TABLE alert_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    channel TEXT NOT NULL,
    -- The check or alert code, or `test`.
    subject TEXT NOT NULL,
    -- firing | resolved | test | heartbeat
    kind TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    answer TEXT NOT NULL
);
CREATE INDEX alert_deliveries_at ON alert_deliveries (at);

-- Incidents and maintenance the operator writes for the status page.
CREATE TABLE incidents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    -- minor | major | maintenance
    impact TEXT NOT NULL,
    -- Comma-separated component ids it concerns.
    components TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    -- Scheduled maintenance: the announced window; NULL for incidents.
    starts_at INTEGER,
    ends_at INTEGER,
    resolved_at INTEGER,
    created_by TEXT NOT NULL
);

CREATE TABLE incident_updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id INTEGER NOT NULL REFERENCES incidents(id),
    at INTEGER NOT NULL,
    -- investigating | identified | monitoring | resolved | scheduled | in_progress | completed
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    author TEXT NOT NULL
);
CREATE INDEX incident_updates_incident ON incident_updates (incident_id, at);

-- Nodes an operator took out of rotation: no new viewers, no new copies.
CREATE TABLE node_drains (
    node TEXT PRIMARY KEY,
    at INTEGER NOT NULL,
    by_whom TEXT NOT NULL
);
