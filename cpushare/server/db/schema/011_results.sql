-- The result a VM wrote to its port org.cpushare.result, as its seller
-- reported it: the sha256 and size of the bytes, and who the seller said it
-- was when it reported (country, and CPU as vendor/family/model).  One row a lease,
-- as a VM placed again elsewhere may have one result on each seller.
CREATE TABLE results (
    lease_id INTEGER PRIMARY KEY REFERENCES leases (id),
    vm_id INTEGER NOT NULL REFERENCES vms (id),
    order_id INTEGER NOT NULL REFERENCES orders (id),
    seller_account_id INTEGER NOT NULL REFERENCES accounts (id),
    country TEXT,
    cpu TEXT,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    reported {float} NOT NULL
);

CREATE INDEX results_order ON results (order_id);
