-- Verdicts of replicated runs (docs/buyer.md, "Replicated runs").
--
-- A lease of a replicated order keeps what its bills charge in its
-- seller's ledger account of kind pending until its replica group is
-- decided.  verdict is NULL for a lease of an order without replicas,
-- 'pending' until the group is decided, then 'accepted' (its result is the
-- group's: paid), 'inconclusive' (no majority: paid, nobody flagged) or
-- 'rejected' (in the minority: not paid, what was charged goes back to
-- the buyer).  pending is what its bills charged that waits for the verdict.
ALTER TABLE leases ADD COLUMN verdict TEXT;
ALTER TABLE leases ADD COLUMN pending BIGINT NOT NULL DEFAULT 0;

-- An order whose differing results the buyer's program compares with a
-- command of its own (kept on the buyer's computer, never sent here), and
-- an order replicated adaptively (--replicas auto): each VM is run again
-- with probability 1/n for a seller with n consecutive valid results.
ALTER TABLE orders ADD COLUMN compare INTEGER NOT NULL DEFAULT 0;
ALTER TABLE orders ADD COLUMN adaptive INTEGER NOT NULL DEFAULT 0;

-- A decided replica group: accepted (with the digest of the result all or
-- a majority agreed on, NULL when they agreed on having none) or
-- inconclusive, when, and why.
CREATE TABLE verdicts (
    order_id INTEGER NOT NULL REFERENCES orders (id),
    replica_group INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    sha256 TEXT,
    decided {float} NOT NULL,
    reason TEXT,
    PRIMARY KEY (order_id, replica_group)
);

-- What verdicts and canaries say of a seller: results accepted, results
-- found wrong (in a minority, or a canary answered wrongly), results
-- accepted since the last wrong one, and wrong canary answers.
CREATE TABLE validation (
    account_id INTEGER PRIMARY KEY REFERENCES accounts (id),
    validated INTEGER NOT NULL DEFAULT 0,
    invalid INTEGER NOT NULL DEFAULT 0,
    consecutive INTEGER NOT NULL DEFAULT 0,
    canaries_failed INTEGER NOT NULL DEFAULT 0
);

-- Known-answer jobs the market ran on sellers: the VM, its seller, the
-- digest it must report, what it reported, whether it passed, and what
-- the market paid the seller for it from its own account.
CREATE TABLE canaries (
    vm_id INTEGER PRIMARY KEY REFERENCES vms (id),
    seller_account_id INTEGER NOT NULL REFERENCES accounts (id),
    expected TEXT NOT NULL,
    reported TEXT,
    passed INTEGER,
    paid BIGINT NOT NULL DEFAULT 0,
    started {float} NOT NULL,
    ended {float}
);

CREATE INDEX canaries_seller ON canaries (seller_account_id);
