-- The keys of buyers' encrypted images (docs/operator.md, "Encrypted
-- images' keys"), given by `cpushare image upload --encrypt`.  No key is
-- stored as it is: sealed is the hex of a 12-byte nonce and the key sealed
-- with AES-256-GCM under the market's key-encryption key (a file, never in
-- the database), bound to the account and the image (the associated data
-- is "ACCOUNT_ID:SHA256").  kek names the key-encryption key that sealed
-- it: the first 16 hex digits of its SHA-256.  A row goes with its image.
CREATE TABLE image_keys (
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    sha256 TEXT NOT NULL,
    sealed TEXT NOT NULL,
    kek TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (account_id, sha256)
);
