-- When a lease's VM first showed life (its first frame reached the buyer's
-- network or its console printed): billing counts wall time from here.
-- NULL while it has not: a VM that never shows life is never charged.
ALTER TABLE leases ADD COLUMN live_since {float};
