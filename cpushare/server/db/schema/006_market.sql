-- Sellers' terms, buy orders' screens, leases and ratings.

-- What a seller asks: micro-units per core-hour and per GB of traffic.
CREATE TABLE seller_terms (
    account_id INTEGER PRIMARY KEY REFERENCES accounts (id),
    price BIGINT NOT NULL,
    net_fee BIGINT NOT NULL,
    country TEXT,
    updated TEXT NOT NULL
);

-- An order's screens as JSON (the arguments of PlaceOrder) and its budget.
ALTER TABLE orders ADD COLUMN screens TEXT NOT NULL DEFAULT '{{}}';
ALTER TABLE orders ADD COLUMN budget BIGINT;

-- A lease is one VM's stay on one seller, at the terms it was placed at.
CREATE TABLE leases (
    id {serial},
    vm_id INTEGER NOT NULL REFERENCES vms (id),
    order_id INTEGER NOT NULL REFERENCES orders (id),
    buyer_account_id INTEGER NOT NULL REFERENCES accounts (id),
    seller_account_id INTEGER NOT NULL REFERENCES accounts (id),
    price BIGINT NOT NULL,
    net_fee BIGINT NOT NULL,
    cores INTEGER NOT NULL,
    started {float} NOT NULL,
    ended {float},
    cpu_seconds {float} NOT NULL DEFAULT 0,
    net_bytes BIGINT NOT NULL DEFAULT 0,
    charged BIGINT NOT NULL DEFAULT 0,
    held BIGINT NOT NULL DEFAULT 0,
    held_total BIGINT NOT NULL DEFAULT 0,
    settled INTEGER NOT NULL DEFAULT 0,
    reason TEXT
);

CREATE INDEX leases_vm ON leases (vm_id);
CREATE INDEX leases_order ON leases (order_id);
CREATE INDEX leases_open ON leases (settled);
CREATE INDEX leases_buyer ON leases (buyer_account_id);
CREATE INDEX leases_seller ON leases (seller_account_id);

-- One vote per lease, by the lease's buyer.
CREATE TABLE ratings (
    lease_id INTEGER PRIMARY KEY REFERENCES leases (id),
    seller_account_id INTEGER NOT NULL REFERENCES accounts (id),
    buyer_account_id INTEGER NOT NULL REFERENCES accounts (id),
    good INTEGER NOT NULL,
    comment TEXT,
    created TEXT NOT NULL
);

CREATE INDEX ratings_seller ON ratings (seller_account_id);
