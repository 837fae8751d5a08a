-- The operator's console acts on movies, jobs and accounts (docs/operations.md,
-- "The admin area").

-- A movie an operator took down (abuse, a complaint, the owner's request).
-- Kept apart from `state` so the pipeline's own transitions (a copy lost,
-- a copy back) never bring it back: readers see the state `withdrawn` while
-- `withdrawn_at` is set, and its copies stay on the nodes so that
-- reinstating it is instant.
ALTER TABLE assets ADD COLUMN withdrawn_at INTEGER;
ALTER TABLE assets ADD COLUMN withdrawn_reason TEXT;

-- Jobs are claimed highest priority first, then oldest first. An operator
-- raises one to move it ahead of the queue.
ALTER TABLE assets ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
-- Who holds (or last held) the job's lease, for the queue's "worker" column.
ALTER TABLE assets ADD COLUMN worker TEXT;

-- A disabled account cannot log in, and its sessions and API tokens stop
-- working at once; its movies, balance and ledger are kept.
ALTER TABLE users ADD COLUMN disabled_at INTEGER;
