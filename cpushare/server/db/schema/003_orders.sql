-- Buy orders and the VMs that run them.
CREATE TABLE orders (
    id {serial},
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    image TEXT NOT NULL REFERENCES images (sha256),
    vms INTEGER NOT NULL,
    cores INTEGER NOT NULL,
    memory INTEGER NOT NULL,
    state TEXT NOT NULL,
    created TEXT NOT NULL
);

CREATE TABLE vms (
    id {serial},
    order_id INTEGER NOT NULL REFERENCES orders (id),
    seller_account_id INTEGER REFERENCES accounts (id),
    mac TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    created TEXT NOT NULL,
    started {float},
    ended {float},
    cpu_seconds {float} NOT NULL DEFAULT 0,
    ip TEXT
);

CREATE INDEX vms_order ON vms (order_id);
CREATE INDEX vms_state ON vms (state);
