-- What operators did in the admin, with who and when (docs/operations.md,
-- "The admin"). Append-only like the ledger: an operator who could edit
-- the record of their actions would make it worthless.
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor_id INTEGER NOT NULL REFERENCES users(id),
    -- The actor's email when it happened (accounts may change later).
    actor TEXT NOT NULL,
    -- A stable verb: grant_credits, node_drain, …
    action TEXT NOT NULL,
    -- What it acted on: an account, a node, a movie, a rule.
    target TEXT NOT NULL,
    -- What the operator gave (amount, reason, key) and what came of it.
    detail TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
