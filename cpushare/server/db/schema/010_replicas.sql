-- Replicated runs: how many times an order runs each of its VMs, on sellers
-- that differ in what diversity names (a comma-separated list of country,
-- cpu and owner), and the replica group of each VM (1 to the order's VMs;
-- NULL for a VM of an order without replicas).
ALTER TABLE orders ADD COLUMN replicas INTEGER NOT NULL DEFAULT 1;
ALTER TABLE orders ADD COLUMN diversity TEXT;
ALTER TABLE vms ADD COLUMN replica_group INTEGER;
