"""
What an account sees of its money: its balances with the payments still
waiting at PayPal, its statement (the ledger's entries, a page at a time,
each with its account's balance after it), and a seller's earnings with
its payout address and recent payouts.  A seller's earnings awaiting the
verdicts of replicated runs (L{cpushare.server.money.escrow}) are shown
apart from those it may take out.
"""

from typing import List, Optional

import attr

from cpushare.protocol.commands import STATEMENT_PAGE
from cpushare.server.money import ledger
from cpushare.server.money.funds import Payment, pendingPayments
from cpushare.server.money.ledger import EARNINGS, FUNDS, HELD, PAYOUT, PENDING
from cpushare.server.money.payouts import Payout, accountPayouts, payoutEmail

MAX_MEMO = 200


@attr.s(frozen=True, auto_attribs=True)
class StatementEntry:
    """
    One ledger entry of an owner's: its id and its transaction's, when,
    the transaction's kind and memo, the kind of account it moved
    (funds, held, earnings, payout, pending), the amount and that account's
    balance after it (micro-units).  Its fields are those of an entry of
    the C{Statement} command.
    """

    entry: int
    transaction: int
    time: str
    kind: str
    memo: str
    account: str
    amount: int
    balance: int


@attr.s(frozen=True, auto_attribs=True)
class BalanceSheet:
    """
    An owner's balances (micro-units) and its L{Payment}s still waiting at
    PayPal; C{awaiting} is what it earned that awaits verdicts.
    """

    funds: int
    held: int
    earnings: int
    payout: int
    pending: List[Payment]
    awaiting: int = 0


@attr.s(frozen=True, auto_attribs=True)
class EarningsSheet:
    """
    A seller's earnings and money on its way out (micro-units), its payout
    address (None before its first payout), its recent L{Payout}s, and what
    it earned that awaits verdicts (C{awaiting}: not paid out before).
    """

    earnings: int
    payout: int
    email: Optional[str]
    payouts: List[Payout]
    awaiting: int = 0


# -- SQL, run on the store's pool (Store.run)


def statementPage(cursor, ownerId, before=None, limit=STATEMENT_PAGE):
    """
    The owner's ledger entries, newest first, older than entry C{before}
    (all when None), at most C{limit}, as L{StatementEntry}s.  Returns
    (entries, more).
    """
    cursor.execute(
        "SELECT e.id, t.id, t.created, t.kind, t.memo, a.kind, e.amount, e.account_id"
        " FROM ledger_entries e"
        " JOIN ledger_accounts a ON a.id = e.account_id"
        " JOIN ledger_transactions t ON t.id = e.transaction_id"
        " WHERE a.owner_id = ? AND e.id < ? ORDER BY e.id DESC LIMIT ?",
        (ownerId, before if before is not None else 2**62, limit + 1),
    )
    rows = cursor.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    running = {}
    for entryId, _, _, _, _, _, _, accountId in rows:
        if accountId not in running:
            cursor.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries"
                " WHERE account_id = ? AND id <= ?",
                (accountId, entryId),
            )
            running[accountId] = int(cursor.fetchone()[0])
    entries = []
    for entryId, transactionId, created, kind, memo, account, amount, accountId in rows:
        entries.append(StatementEntry(
            entry=entryId, transaction=transactionId, time=created, kind=kind,
            memo=memo[:MAX_MEMO], account=account, amount=int(amount),
            balance=running[accountId]))
        running[accountId] -= int(amount)
    return entries, more


def balanceSheet(cursor, accountId):
    """The account's L{BalanceSheet}."""
    b = ledger.balances(cursor, accountId)
    return BalanceSheet(funds=b[FUNDS], held=b[HELD], earnings=b[EARNINGS],
                        payout=b[PAYOUT], pending=pendingPayments(cursor, accountId),
                        awaiting=b[PENDING])


def earningsSheet(cursor, accountId):
    """The account's L{EarningsSheet}."""
    b = ledger.balances(cursor, accountId)
    return EarningsSheet(earnings=b[EARNINGS], payout=b[PAYOUT],
                         email=payoutEmail(cursor, accountId),
                         payouts=accountPayouts(cursor, accountId), awaiting=b[PENDING])


class Statements:
    """An account's balances, statement and earnings, read from the C{store}."""

    def __init__(self, store):
        self.store = store

    def balance(self, account):
        """Fires with the account's L{BalanceSheet}."""
        return self.store.run(balanceSheet, account.id)

    def statement(self, account, before=None):
        """Fires with a page of the account's statement: (L{StatementEntry}s, more)."""
        return self.store.run(statementPage, account.id, before)

    def earnings(self, account):
        """Fires with the account's L{EarningsSheet}."""
        return self.store.run(earningsSheet, account.id)
