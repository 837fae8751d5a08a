-- The manager's catalog. SQLite first (WAL, synchronous=FULL); the column
-- types stay within what PostgreSQL accepts too.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    email         TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    role          TEXT    NOT NULL CHECK (role IN ('uploader', 'operator')),
    created_at    INTEGER NOT NULL
);

-- Only hashes of session and API tokens are stored: a copy of the database
-- does not let anyone log in.
CREATE TABLE sessions (
    token_hash TEXT    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf       TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE TABLE api_tokens (
    token_hash TEXT    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    label      TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE assets (
    id            TEXT    PRIMARY KEY,
    owner_id      INTEGER NOT NULL REFERENCES users (id),
    title         TEXT    NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('queued', 'probing', 'transcoding', 'sealing',
                                                    'replicating', 'published', 'rejected', 'damaged')),
    progress      REAL    NOT NULL DEFAULT 0,
    error_code    TEXT,
    error_message TEXT,
    source_name   TEXT    NOT NULL,
    source_bytes  INTEGER NOT NULL,
    blob_id       TEXT,
    sealed_len    INTEGER,
    plain_len     INTEGER,
    wrapped_key   BLOB,
    width         INTEGER,
    height        INTEGER,
    duration_secs REAL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX assets_state ON assets (state, created_at);
CREATE INDEX assets_owner ON assets (owner_id, created_at);

CREATE TABLE replicas (
    asset_id   TEXT    NOT NULL REFERENCES assets (id) ON DELETE CASCADE,
    node       TEXT    NOT NULL,
    state      TEXT    NOT NULL CHECK (state IN ('pending', 'verified', 'failed')),
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    next_try   INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (asset_id, node)
);

-- Written, read back and deleted by /healthz so that "healthy" proves the
-- database accepts writes, not merely that a connection opens.
CREATE TABLE health_probe (
    id    TEXT    PRIMARY KEY,
    at    INTEGER NOT NULL
);
