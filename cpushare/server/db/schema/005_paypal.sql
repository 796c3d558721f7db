-- Money in and out through PayPal.  The ledger holds the money (deposits
-- post "paypal-payment:PAYPAL_ID", payouts "payout:ID:request" and then
-- "payout:ID:sent" or "payout:ID:returned")
-- and these tables hold what PayPal was asked and what it answered.

-- Payments this market created for buyers to approve at PayPal.  Only
-- these are ever executed, for the account that created them, once.
CREATE TABLE paypal_payments (
    id {serial},
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    paypal_id TEXT NOT NULL UNIQUE,   -- PayPal's payment id, PAY-...
    nonce TEXT NOT NULL UNIQUE,       -- in our return and cancel links
    gross BIGINT NOT NULL,            -- what the buyer pays, micro-units
    commission BIGINT NOT NULL,       -- the market's part of it
    currency TEXT NOT NULL,
    state TEXT NOT NULL,              -- created, executing, credited, cancelled, mismatch, check
    payer_id TEXT,
    reason TEXT,                      -- PayPal's last refusal, or what did not match
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);

CREATE INDEX paypal_payments_account ON paypal_payments (account_id);

-- Where each seller's payouts go.
CREATE TABLE payout_addresses (
    account_id INTEGER PRIMARY KEY REFERENCES accounts (id),
    email TEXT NOT NULL,
    updated TEXT NOT NULL
);

-- Payouts of sellers' earnings with PayPal Payouts, one item a batch.
CREATE TABLE paypal_payouts (
    id {serial},
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    email TEXT NOT NULL,
    amount BIGINT NOT NULL,
    currency TEXT NOT NULL,
    sender_batch_id TEXT NOT NULL UNIQUE,   -- ours, PayPal refuses it twice
    batch_id TEXT UNIQUE,                   -- PayPal's payout_batch_id
    state TEXT NOT NULL,                    -- requested, pending, sent, returned, unknown
    paypal_status TEXT,                     -- PayPal's last word, BATCH/ITEM
    reason TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);

CREATE INDEX paypal_payouts_account ON paypal_payouts (account_id);
CREATE INDEX paypal_payouts_state ON paypal_payouts (state)
