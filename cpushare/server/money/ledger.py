"""
The market's double-entry ledger.

Money is an integer number of micro-units (millionths) of the market's one
currency; floats never touch it.  Every movement is one transaction made of
entries that sum to zero, posted with L{post}; a balance is the sum of an
account's entries.  Each account keeps that sum as it goes (updated by
L{post} in the same transaction as the entries, so a balance is read
without summing every entry), and L{books} recomputes each one from the
entries.  So the whole book always sums to zero, and L{books} proves it.

Ledger accounts, by kind (an "owner" is a market account):

    funds       an owner's spendable money (a buyer's)
    held        an owner's money held for VMs running ahead of billing
    earnings    what an owner (a seller) has earned and not paid out
    pending     what an owner (a seller) has earned with leases of replicated
                orders whose verdict is not in yet: paid to its earnings when
                its replica group accepts the result (or cannot decide),
                returned to the buyer's funds when its result is rejected
                (L{cpushare.server.money.escrow}); never paid out
    payout      earnings on their way out in a PayPal payout
    commission  the market's (no owner)
    grants      the market's own money given to owners by the operator
                (cpushare-admin credit: refunds, trial credit)
    paypal      the market's side of PayPal (no owner): money that came in
                through PayPal is a debit here, money paid out a credit, so
                minus its balance is what the market holds at PayPal.

An entry's amount is what it adds to its account's balance as the owner
sees it.  A deposit of 20.00 with a 5% commission is

    paypal      -20.000000
    funds:7     +19.000000
    commission   +1.000000

The owners' accounts may never go below zero: L{post} refuses a
transaction that would leave one negative (L{InsufficientFunds}), and the
store's transaction rolls back with nothing changed.

A transaction may name a reference (a PayPal payment, a lease's billing
period): a reference is posted at most once (L{AlreadyPosted}), which is
what makes replays harmless.

All functions take a DB-API cursor and run inside the store's transaction
(C{Store.run}); they never commit.
"""

from cpushare.money import MAX_AMOUNT, MICRO, BadAmount, formatAmount, parseAmount  # noqa: F401
from cpushare.server.db.store import now

FUNDS = "funds"
HELD = "held"
EARNINGS = "earnings"
PENDING = "pending"
PAYOUT = "payout"
COMMISSION = "commission"
GRANTS = "grants"
PAYPAL = "paypal"

OWNED = (FUNDS, HELD, EARNINGS, PAYOUT, PENDING)
MARKET = (COMMISSION, GRANTS, PAYPAL)


class LedgerError(Exception):
    """A transaction the ledger refuses; the message says why."""


class Unbalanced(LedgerError):
    pass


class InsufficientFunds(LedgerError):
    def __init__(self, name, balance, needed):
        LedgerError.__init__(
            self,
            f"{name} would go below zero: it holds {formatAmount(balance)}"
            f" and {formatAmount(needed)} is needed",
        )
        self.name = name
        self.balance = balance
        self.needed = needed


class AlreadyPosted(LedgerError):
    def __init__(self, reference, transactionId):
        LedgerError.__init__(self, f"{reference} was already posted (transaction {transactionId})")
        self.reference = reference
        self.transactionId = transactionId


def accountName(kind, ownerId=None):
    if kind in OWNED:
        if ownerId is None:
            raise ValueError(f"a {kind} account belongs to an owner")
        return f"{kind}:{ownerId}"
    if kind in MARKET:
        return f"market:{kind}"
    raise ValueError(f"no ledger account kind {kind!r}")


def ledgerAccount(cursor, kind, ownerId=None):
    """The id of a ledger account, created on first use."""
    name = accountName(kind, ownerId)
    cursor.execute("SELECT id FROM ledger_accounts WHERE name = ?", (name,))
    row = cursor.fetchone()
    if row is not None:
        return row[0]
    cursor.execute(
        "INSERT INTO ledger_accounts (name, kind, owner_id) VALUES (?, ?, ?) RETURNING id",
        (name, kind, ownerId if kind in OWNED else None),
    )
    return cursor.fetchone()[0]


def _checkAmount(amount):
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise Unbalanced(f"an amount must be an integer of micro-units, not {amount!r}")
    if abs(amount) > MAX_AMOUNT:
        raise Unbalanced(f"an entry of {amount} micro-units is beyond any real amount")


def post(cursor, kind, memo, legs, reference=None):
    """
    Post one balanced transaction; returns its id.

    C{legs} is a list of (kind, owner id or None, amount) or
    (ledger account id, amount).  Entries must be non-zero integers that
    sum to zero; legs of zero (a commission of 0%) are left out.  Raises L{AlreadyPosted} when C{reference} was posted
    before, L{InsufficientFunds} when an owner's account would go below
    zero (the caller's store transaction then rolls back).
    """
    entries = []
    for leg in legs:
        if len(leg) == 3:
            legKind, owner, amount = leg
            accountId = ledgerAccount(cursor, legKind, owner) if amount else None
        else:
            accountId, amount = leg
        _checkAmount(amount)
        if amount:
            entries.append((accountId, amount))
    if len(entries) < 2:
        raise Unbalanced("a transaction moves money between at least two accounts")
    total = sum(amount for _, amount in entries)
    if total != 0:
        raise Unbalanced(f"the entries of {kind!r} sum to {total} micro-units, not zero")
    if reference is not None:
        cursor.execute("SELECT id FROM ledger_transactions WHERE reference = ?", (reference,))
        row = cursor.fetchone()
        if row is not None:
            raise AlreadyPosted(reference, row[0])
    cursor.execute(
        "INSERT INTO ledger_transactions (kind, reference, memo, created)"
        " VALUES (?, ?, ?, ?) RETURNING id",
        (kind, reference, memo, now()),
    )
    transactionId = cursor.fetchone()[0]
    for accountId, amount in entries:
        cursor.execute(
            "INSERT INTO ledger_entries (transaction_id, account_id, amount) VALUES (?, ?, ?)",
            (transactionId, accountId, amount),
        )
    moved = {}
    for accountId, amount in entries:
        moved[accountId] = moved.get(accountId, 0) + amount
    for accountId, amount in sorted(moved.items()):
        cursor.execute(
            "UPDATE ledger_accounts SET balance = balance + ? WHERE id = ?"
            " RETURNING name, kind, balance", (amount, accountId))
        name, accountKind, left = cursor.fetchone()
        if amount < 0 and accountKind in OWNED and left < 0:
            raise InsufficientFunds(name, int(left) - amount, -amount)
    return transactionId


def balanceOf(cursor, accountId):
    cursor.execute("SELECT balance FROM ledger_accounts WHERE id = ?", (accountId,))
    return int(cursor.fetchone()[0])


def balance(cursor, kind, ownerId=None):
    """One account's balance (0 for an account never used)."""
    cursor.execute("SELECT balance FROM ledger_accounts WHERE name = ?",
                   (accountName(kind, ownerId),))
    row = cursor.fetchone()
    return 0 if row is None else int(row[0])


def balances(cursor, ownerId):
    """{kind: balance} of every account an owner has, zeros included."""
    result = dict.fromkeys(OWNED, 0)
    cursor.execute("SELECT kind, balance FROM ledger_accounts WHERE owner_id = ?", (ownerId,))
    for kind, amount in cursor.fetchall():
        result[kind] = int(amount)
    return result


def statement(cursor, ownerId, limit=1000):
    """
    The owner's movements, newest first: one row per transaction and
    account with the transaction's kind, memo and time.
    """
    cursor.execute(
        "SELECT t.id, t.created, t.kind, t.memo, a.kind, e.amount"
        " FROM ledger_entries e"
        " JOIN ledger_accounts a ON a.id = e.account_id"
        " JOIN ledger_transactions t ON t.id = e.transaction_id"
        " WHERE a.owner_id = ? ORDER BY t.id DESC, e.id DESC LIMIT ?",
        (ownerId, limit),
    )
    keys = ("transaction", "time", "kind", "memo", "account", "amount")
    return [dict(zip(keys, row)) for row in cursor.fetchall()]


def books(cursor):
    """
    Prove the books: the sum of every entry, the transactions that do not
    sum to zero, the owners' accounts below zero, and the accounts whose
    running balance differs from the sum of their entries (C{drift}).
    C{ok} is True when the first is zero and the others are empty.
    """
    cursor.execute("SELECT COALESCE(SUM(amount), 0), COUNT(*) FROM ledger_entries")
    total, entryCount = cursor.fetchone()
    cursor.execute("SELECT COUNT(*) FROM ledger_transactions")
    (transactionCount,) = cursor.fetchone()
    cursor.execute(
        "SELECT transaction_id, SUM(amount) FROM ledger_entries"
        " GROUP BY transaction_id HAVING SUM(amount) <> 0 ORDER BY transaction_id"
    )
    unbalanced = [(t, int(s)) for t, s in cursor.fetchall()]
    cursor.execute(
        "SELECT a.name, SUM(e.amount) FROM ledger_accounts a"
        " JOIN ledger_entries e ON e.account_id = a.id"
        " WHERE a.kind IN (" + ", ".join("?" * len(OWNED)) + ")"
        " GROUP BY a.name HAVING SUM(e.amount) < 0"
        " ORDER BY a.name",
        OWNED,
    )
    negative = [(n, int(s)) for n, s in cursor.fetchall()]
    cursor.execute(
        "SELECT a.kind, COALESCE(SUM(e.amount), 0) FROM ledger_accounts a"
        " JOIN ledger_entries e ON e.account_id = a.id GROUP BY a.kind ORDER BY a.kind"
    )
    byKind = {k: int(s) for k, s in cursor.fetchall()}
    cursor.execute(
        "SELECT a.name, a.balance, COALESCE(SUM(e.amount), 0) FROM ledger_accounts a"
        " LEFT JOIN ledger_entries e ON e.account_id = a.id"
        " GROUP BY a.id, a.name, a.balance HAVING a.balance <> COALESCE(SUM(e.amount), 0)"
        " ORDER BY a.name"
    )
    drift = [(n, int(b), int(s)) for n, b, s in cursor.fetchall()]
    total = int(total)
    return {
        "ok": total == 0 and not unbalanced and not negative and not drift,
        "drift": drift,
        "total": total,
        "transactions": transactionCount,
        "entries": entryCount,
        "unbalanced": unbalanced,
        "negative": negative,
        "byKind": byKind,
    }
