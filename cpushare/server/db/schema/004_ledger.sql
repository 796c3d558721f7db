-- The double-entry ledger.  Money is integer micro-units of one currency.
-- Every movement is one transaction whose entries sum to zero, and balances are
-- the sums of entries, never stored.
CREATE TABLE ledger_accounts (
    id {serial},
    name TEXT NOT NULL UNIQUE,      -- "funds:42", "market:commission"
    kind TEXT NOT NULL,             -- funds, held, earnings, payout, commission, paypal, payouts
    owner_id INTEGER REFERENCES accounts (id)
);

CREATE INDEX ledger_accounts_owner ON ledger_accounts (owner_id);

CREATE TABLE ledger_transactions (
    id {serial},
    kind TEXT NOT NULL,             -- deposit, hold, release, charge, payout, ...
    reference TEXT UNIQUE,          -- what it settles, posted at most once
    memo TEXT NOT NULL,
    created TEXT NOT NULL
);

CREATE TABLE ledger_entries (
    id {serial},
    transaction_id INTEGER NOT NULL REFERENCES ledger_transactions (id),
    account_id INTEGER NOT NULL REFERENCES ledger_accounts (id),
    amount BIGINT NOT NULL
);

CREATE INDEX ledger_entries_account ON ledger_entries (account_id);
CREATE INDEX ledger_entries_transaction ON ledger_entries (transaction_id);
