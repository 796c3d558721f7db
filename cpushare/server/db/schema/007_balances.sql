-- Each ledger account keeps the running sum of its entries, updated in the
-- same transaction as the entries, so reading a balance does not sum them
-- all.  cpushare-admin books recomputes every one from the entries.
ALTER TABLE ledger_accounts ADD COLUMN balance BIGINT NOT NULL DEFAULT 0;

UPDATE ledger_accounts SET balance = (
    SELECT COALESCE(SUM(e.amount), 0) FROM ledger_entries e
    WHERE e.account_id = ledger_accounts.id
);
