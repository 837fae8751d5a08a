-- Costs that grow with the catalog (docs/scale.md).
--
-- "How many copies of this movie are verified" (`asset_id = ? AND state = ?`)
-- went through replicas_due (state, next_try): without statistics SQLite
-- prefers it to the primary key, so each such lookup read every verified
-- copy of every movie, and publishing, the admin's movie list and its
-- overview cost the square of the catalog. This index serves both columns.
CREATE INDEX replicas_asset_state ON replicas (asset_id, state);

-- The admin's movie list, newest first, stops after a page of rows
-- instead of sorting the whole catalog.
CREATE INDEX assets_created ON assets (created_at DESC, id);

-- The monitor's canary plays the smallest published movie every cycle.
CREATE INDEX assets_smallest ON assets (plain_len, id)
    WHERE state = 'published' AND withdrawn_at IS NULL;

-- view_events keep only what recognises a resent event (the per-grant
-- totals live in play_grants); the daily retention deletes by age, and
-- nothing reads them by grant.
DROP INDEX view_events_grant;
CREATE INDEX view_events_age ON view_events (last_at) WHERE after_refund = 0;
