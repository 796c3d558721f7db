-- Trusted computing (docs/operator.md, "Trusted computing").

-- The sellers' TPM attestation keys, each bound at enrolment to one
-- account and one of its client certificates (by fingerprint): another
-- account or certificate cannot offer it.  ak_name is the key's TPM name
-- (hex), ak_public its public area (hex). ek_fingerprint and ek_issuer
-- say which endorsement certificate (and so which TPM) vouched for it.
-- last_attested is when its last quote passed, and last_result is "passed"
-- or why its last attestation was refused.
CREATE TABLE tpm_keys (
    ak_name TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    certificate TEXT NOT NULL,
    ek_fingerprint TEXT NOT NULL,
    ek_issuer TEXT NOT NULL,
    ak_public TEXT NOT NULL,
    enrolled TEXT NOT NULL,
    last_attested {float},
    last_result TEXT
);

CREATE INDEX tpm_keys_account ON tpm_keys (account_id);

-- The operator's attestation policy (cpushare-admin tpm-policy): the
-- digests allowed, by kind (firmware, kernel, qemu, client), and its
-- settings (allow_any_firmware: 1 lets any boot chain pass).
CREATE TABLE tpm_policy (
    kind TEXT NOT NULL,
    digest TEXT NOT NULL,
    added TEXT NOT NULL,
    PRIMARY KEY (kind, digest)
);

CREATE TABLE tpm_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- An order that runs only on attested sellers.
ALTER TABLE orders ADD COLUMN trusted INTEGER NOT NULL DEFAULT 0;

-- A seller's price a core-hour of trusted leases (NULL: its price).
ALTER TABLE seller_terms ADD COLUMN trusted_price BIGINT;

-- A trusted lease: when its last quote passed (its bills never go past
-- it), and the operator's commission on its charges, in parts per million.
ALTER TABLE leases ADD COLUMN trusted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE leases ADD COLUMN attested {float};
ALTER TABLE leases ADD COLUMN commission_ppm BIGINT NOT NULL DEFAULT 0;
