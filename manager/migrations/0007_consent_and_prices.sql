-- Buyers' consent to in-world purchases (docs/credits.md, "Terminals").
-- A terminal's signature proves only that its owner sent the request; the
-- avatar key in it is whatever the owner wrote (avatar keys are public).
-- So a purchase through a terminal is charged only when the buyer's account
-- has approved that terminal's owner, up to a cap per rolling 24 hours.
CREATE TABLE terminal_approvals (
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    owner_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    daily_cap    INTEGER NOT NULL CHECK (daily_cap > 0),
    -- The screen the buyer approved from, shown on their account page.
    via_terminal TEXT    NOT NULL DEFAULT '',
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (user_id, owner_id)
);

-- Which screen (and whose) made each avatar link: the account page shows
-- it, so a link made through a stranger's screen stands out.
ALTER TABLE avatar_links ADD COLUMN via_terminal TEXT NOT NULL DEFAULT '';
ALTER TABLE avatar_links ADD COLUMN via_owner_id INTEGER;

-- Whose terminal sold a grant (NULL: bought on the web or the API), so the
-- daily cap counts only what that owner's screens spent.
ALTER TABLE play_grants ADD COLUMN terminal_owner_id INTEGER REFERENCES users (id);
CREATE INDEX play_grants_terminal ON play_grants (buyer_id, terminal_owner_id, created_at);

-- Goes up each time a movie turns from free to paid. Grant-less playback
-- tokens carry the epoch they were minted in; once the movie is paid, one
-- older than this is refused by the manager at once and by the nodes within
-- a poll (docs/credits.md, "Price changes"), so a URL handed out while the
-- movie was free stops playing when a price is set.
ALTER TABLE assets ADD COLUMN price_epoch INTEGER NOT NULL DEFAULT 0 CHECK (price_epoch >= 0);

-- Each node's watermark (docs/credits.md, "Refunds"): every paid response
-- that started on the node before this time (the node's clock, moved back
-- by how far it ran ahead of ours) has been journalled and delivered. A
-- grant is refunded only once every node's watermark passed its window.
-- `seen_at` stays as the time of the last delivery.
ALTER TABLE journal_contacts ADD COLUMN watermark INTEGER NOT NULL DEFAULT 0;

-- Journal bytes that arrived for a grant already refunded: recorded here
-- (never added to the grant) and raised as an alert.
ALTER TABLE view_events ADD COLUMN after_refund INTEGER NOT NULL DEFAULT 0;

-- Written by `manager backup restore` (docs/backup.md): views delivered
-- after the backup and before the restore are not in the restored books.
-- A grant bought before `backup_at` whose window (plus grace) ends after
-- `safe_until` (the lowest node watermark the backup held) may have been
-- served in that gap: it is never refunded automatically. No refund runs
-- at all until every node's watermark has passed `restored_at`.
CREATE TABLE refund_freeze (
    backup_at   INTEGER NOT NULL,
    safe_until  INTEGER NOT NULL,
    restored_at INTEGER NOT NULL
);
