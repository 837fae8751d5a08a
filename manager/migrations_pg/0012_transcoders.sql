-- Transcode workers on other machines (docs/operations.md, "Transcode
-- workers"). An operator makes a one-time registration token in the admin;
-- a worker redeems it once for its own secret, with which it signs every
-- call (shared::nodeauth, key id = its name). The secret is stored wrapped
-- by the master key, as terminals' are: a copy of the database alone
-- cannot act as a worker. Revoking keeps the row, so the name's history
-- stays readable; a revoked name may register again with a new token.
CREATE TABLE transcoders (
    name           TEXT    PRIMARY KEY,
    wrapped_secret BYTEA   NOT NULL,
    registered_at  BIGINT  NOT NULL,
    registered_by  TEXT    NOT NULL,
    last_seen_at   BIGINT,
    revoked_at     BIGINT
);

-- Only the SHA-256 of a registration token is kept; it is good once, for
-- an hour.
CREATE TABLE transcoder_tokens (
    token_hash TEXT    PRIMARY KEY,
    created_at BIGINT  NOT NULL,
    expires_at BIGINT  NOT NULL,
    created_by TEXT    NOT NULL,
    used_at    BIGINT,
    used_by    TEXT
);
