-- Durable jobs. Internal failures (not the uploader's fault) are retried
-- with backoff; a job that keeps failing stops blocking the queue. A worker
-- holds a job under a lease it renews while working, so a job whose worker
-- died is taken up again once the lease runs out. Cancel is a request the
-- working worker notices within a second.
ALTER TABLE assets ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE assets ADD COLUMN next_try INTEGER NOT NULL DEFAULT 0;
ALTER TABLE assets ADD COLUMN lease_until INTEGER NOT NULL DEFAULT 0;
ALTER TABLE assets ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
