-- Buyers' livecd images, stored once by sha256, owned by accounts.
CREATE TABLE images (
    sha256 TEXT PRIMARY KEY,
    size {bigint} NOT NULL,
    stored TEXT NOT NULL
);

CREATE TABLE account_images (
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    sha256 TEXT NOT NULL REFERENCES images (sha256),
    name TEXT NOT NULL,
    uploaded TEXT NOT NULL,
    PRIMARY KEY (account_id, sha256)
);
