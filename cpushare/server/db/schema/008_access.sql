-- Account suspension, one account per public key, certificates revoked one
-- by one or replaced by a new one, and the changes of access the running
-- server follows (cpushare-admin writes them from another process).
ALTER TABLE accounts ADD COLUMN suspended TEXT;
ALTER TABLE accounts ADD COLUMN suspended_reason TEXT;

-- The SHA-256 of the certificate's SubjectPublicKeyInfo: one account per key.
ALTER TABLE certificates ADD COLUMN public_key TEXT;
-- The certificate's serial number in lower-case hex, for `cpushare-admin revoke`.
ALTER TABLE certificates ADD COLUMN serial TEXT;
-- A certificate issued by `cpushare rekey`: the fingerprint of the one it
-- replaces, until its first use revokes that one.
ALTER TABLE certificates ADD COLUMN replaces TEXT;

CREATE UNIQUE INDEX certificates_public_key ON certificates (public_key);
CREATE INDEX certificates_serial ON certificates (serial);

-- Each suspension, deletion or revocation, in order: the server reads the
-- new ones every few seconds and closes the connections they concern.
-- fingerprint NULL: every certificate of the account.
CREATE TABLE access_changes (
    id {serial},
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    fingerprint TEXT,
    what TEXT NOT NULL,
    created TEXT NOT NULL
);
