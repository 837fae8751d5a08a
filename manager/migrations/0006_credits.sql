-- Credits (issue 7, docs/credits.md): an append-only ledger, a cached
-- balance per account that every movement updates in the same transaction,
-- prices, play grants, the nodes' view journal, avatar links.

-- The balance is a cache of SUM(ledger.amount) for the account, kept so a
-- purchase can check and debit in one guarded UPDATE; the CHECK makes a
-- negative balance impossible even for a buggy caller, and a test proves
-- the cache equals the ledger sum.
ALTER TABLE users ADD COLUMN balance INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0);

CREATE TABLE ledger (
    id            INTEGER PRIMARY KEY,
    account_id    INTEGER NOT NULL REFERENCES users (id),
    amount        INTEGER NOT NULL CHECK (amount <> 0),
    kind          TEXT    NOT NULL CHECK (kind IN ('signup_bonus', 'grant', 'purchase', 'sale',
                                                   'refund', 'sale_reversal', 'upload')),
    -- What the movement pays for: a grant id, an asset id, a rule.
    reference     TEXT    NOT NULL DEFAULT '',
    -- One movement per key, ever: a retried request finds its entry.
    idem_key      TEXT    NOT NULL UNIQUE,
    -- Who caused it: `user:<id>`, `terminal:<id>`, `operator:<email>`, `system`.
    actor         TEXT    NOT NULL,
    reason        TEXT    NOT NULL DEFAULT '',
    balance_after INTEGER NOT NULL CHECK (balance_after >= 0),
    created_at    INTEGER NOT NULL
);
CREATE INDEX ledger_account ON ledger (account_id, id);

-- Append-only: history is corrected by a new entry, never by editing one.
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;

-- Price of one view in credits; 0 = free.
ALTER TABLE assets ADD COLUMN price INTEGER NOT NULL DEFAULT 0 CHECK (price >= 0);

-- A paid view: the right to play one asset until `expires_at`. Its id is
-- carried in the playback token and echoed in the nodes' view journal.
CREATE TABLE play_grants (
    id              TEXT    PRIMARY KEY,
    asset_id        TEXT    NOT NULL REFERENCES assets (id),
    buyer_id        INTEGER NOT NULL REFERENCES users (id),
    seller_id       INTEGER NOT NULL REFERENCES users (id),
    price           INTEGER NOT NULL CHECK (price > 0),
    seller_share    INTEGER NOT NULL CHECK (seller_share >= 0),
    -- `<buyer id>:<request id>`: the same request is charged once.
    request_key     TEXT    NOT NULL UNIQUE,
    source          TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    bytes_served    INTEGER NOT NULL DEFAULT 0,
    first_served_at INTEGER,
    last_served_at  INTEGER,
    state           TEXT    NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'refunded'))
);
CREATE INDEX play_grants_due ON play_grants (state, expires_at);
CREATE INDEX play_grants_buyer ON play_grants (buyer_id, created_at);

-- The nodes' view journal as applied: one row per event, so an event sent
-- twice is applied once.
CREATE TABLE view_events (
    node        TEXT    NOT NULL,
    event_id    TEXT    NOT NULL,
    grant_id    TEXT,
    asset_id    TEXT    NOT NULL,
    bytes       INTEGER NOT NULL,
    first_at    INTEGER NOT NULL,
    last_at     INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (node, event_id)
);
CREATE INDEX view_events_grant ON view_events (grant_id);

-- When each node last delivered its journal (manager clock). A grant is
-- refunded only once every node has reported since it expired.
CREATE TABLE journal_contacts (
    node    TEXT    PRIMARY KEY,
    seen_at INTEGER NOT NULL
);

-- Second Life avatars linked to accounts, and the one-time codes that link them.
CREATE TABLE avatar_links (
    avatar_key TEXT    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    linked_at  INTEGER NOT NULL
);
CREATE TABLE link_codes (
    code_hash  TEXT    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at INTEGER NOT NULL
);
