-- Accounts and the client certificates the market's CA signed for them.
CREATE TABLE accounts (
    id {serial},
    name TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL,
    deleted TEXT
);

CREATE TABLE certificates (
    fingerprint TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    issued TEXT NOT NULL,
    revoked TEXT
);

CREATE INDEX certificates_account ON certificates (account_id);
