-- In-world terminals: screens in Second Life that ask for media URLs. Their
-- requests arrive from Linden's simulators, where the X-SecondLife-* headers
-- can be forged by anyone with a web client, so each terminal signs its
-- requests with its own secret. The secret is stored wrapped by the master
-- key: a copy of the database alone cannot forge terminal requests.
CREATE TABLE terminals (
    id             TEXT    PRIMARY KEY,
    owner_id       INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name           TEXT    NOT NULL,
    wrapped_secret BLOB    NOT NULL,
    created_at     INTEGER NOT NULL,
    last_used_at   INTEGER
);
CREATE INDEX terminals_owner ON terminals (owner_id);

-- Nonces seen within the signature window, so a captured request cannot be
-- replayed. Rows older than the window are deleted as new ones arrive.
CREATE TABLE terminal_nonces (
    terminal_id TEXT    NOT NULL REFERENCES terminals (id) ON DELETE CASCADE,
    nonce       TEXT    NOT NULL,
    seen_at     INTEGER NOT NULL,
    PRIMARY KEY (terminal_id, nonce)
);
