-- The web site (docs/operator.md, "The web site"): the accounts' web
-- passwords, their browsers' sessions and the one-time login links that
-- `cpushare web` asks for.  No secret is stored as it is: a password as
-- its argon2id hash, a session id and a link's token as their SHA-256.

-- An account the operator made an administrator of the web site
-- (`cpushare-admin web-admin NAME`): it sees the operator's pages.
ALTER TABLE accounts ADD COLUMN web_admin INTEGER NOT NULL DEFAULT 0;

CREATE TABLE web_passwords (
    account_id INTEGER PRIMARY KEY REFERENCES accounts (id),
    hash TEXT NOT NULL,
    changed {float} NOT NULL
);

-- id: the SHA-256 (hex) of the session cookie's value. seen: when it was
-- last used (to the minute): a session unused for the idle time is over.
CREATE TABLE web_sessions (
    id TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    csrf TEXT NOT NULL,
    created {float} NOT NULL,
    seen {float} NOT NULL
);

CREATE INDEX web_sessions_account ON web_sessions (account_id);
CREATE INDEX web_sessions_seen ON web_sessions (seen);

-- id: the SHA-256 (hex) of the link's token, deleted when used.
CREATE TABLE web_login_tokens (
    id TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    expires {float} NOT NULL
);

CREATE INDEX web_login_tokens_account ON web_login_tokens (account_id);
CREATE INDEX web_login_tokens_expires ON web_login_tokens (expires);
