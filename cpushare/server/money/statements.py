"""
What an account sees of its money: its balances with the payments still
waiting at PayPal, its statement (the ledger's entries, a page at a time,
each with its account's balance after it), and a seller's earnings with
its payout address and recent payouts.  A seller's earnings awaiting the
verdicts of replicated runs (L{cpushare.server.money.escrow}) are shown
apart from those it may take out.  For the web site: a buyer's spending
and a seller's earnings a day, as series for a chart, and the statement as
CSV text.
"""

import csv
import datetime
import io
from typing import List, Optional

import attr

from cpushare.money import MICRO
from cpushare.protocol.commands import STATEMENT_PAGE
from cpushare.server.db import sitesql
from cpushare.server.db.store import now as ledgerNow
from cpushare.server.money import ledger
from cpushare.server.money.funds import Payment, pendingPayments
from cpushare.server.money.ledger import EARNINGS, FUNDS, HELD, PAYOUT, PENDING
from cpushare.server.money.payouts import Payout, accountPayouts, payoutEmail

MAX_MEMO = 200

# Days a spending or earnings series covers by default, and at most.
SERIES_DAYS = 30
MAX_SERIES_DAYS = 366
# Entries one CSV statement holds at most (newest first).
CSV_ENTRIES = 20_000

# What a day's spending and earnings are made of: the charges of leases
# (held funds to a seller), less what rejected verdicts return (a seller's
# pending earnings back to the buyer's funds).  Holds and releases move
# money between a buyer's own funds and held, so they net to nothing here.
SPENDING_ACCOUNTS = (FUNDS, HELD)
EARNING_ACCOUNTS = (EARNINGS, PENDING)
SPENT_IN = ("charge", "verdict")


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


def _lastDays(days, now):
    """The UTC midnights (unix seconds) of the C{days} days ending with C{now}'s."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_SERIES_DAYS:
        raise ValueError(f"a series covers 1 to {MAX_SERIES_DAYS} days, not {days!r}")
    today = int(now) // 86400 * 86400
    return [today - 86400 * back for back in range(days - 1, -1, -1)]


def _day(midnight):
    return datetime.datetime.fromtimestamp(midnight, datetime.timezone.utc).strftime("%Y-%m-%d")


def dailySeries(cursor, ownerId, accountKinds, sign, days, now):
    """
    The owner's movements on its C{accountKinds} in charges and verdicts
    a day, times C{sign}, over the C{days} days ending today (UTC,
    C{now} in unix seconds): [(unix time of the day's midnight,
    micro-units)], oldest first, 0 for a day without any.
    """
    midnights = _lastDays(days, now)
    totals = dict(sitesql.dailyTotals(cursor, ownerId, accountKinds, SPENT_IN,
                                      _day(midnights[0])))
    return [(midnight, sign * totals.get(_day(midnight), 0)) for midnight in midnights]


def spendingByDay(cursor, ownerId, days, now):
    """What the owner's VMs cost it a day (see L{dailySeries})."""
    return dailySeries(cursor, ownerId, SPENDING_ACCOUNTS, -1, days, now)


def earningsByDay(cursor, ownerId, days, now):
    """What the owner earned with its machines a day (see L{dailySeries})."""
    return dailySeries(cursor, ownerId, EARNING_ACCOUNTS, 1, days, now)


# -- the statement as CSV

CSV_COLUMNS = ("date", "kind", "account", "memo", "amount", "balance")
# A spreadsheet takes a cell that starts with one of these as a formula.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _textCell(text):
    """C{text} as a cell no spreadsheet runs: a formula-like start gets a quote."""
    text = str(text)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _sixDecimals(micro):
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{fraction:06d}"


def statementCsv(entries, currency):
    """
    L{StatementEntry}s as CSV text: a header, then one row an entry with
    its time (UTC), kind, account, memo, amount and that account's
    balance after it, in C{currency} with six decimals.  Text cells that
    a spreadsheet would take as a formula (starting with = + - @, a tab or
    a carriage return) start with a quote; amounts are plain numbers.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([*CSV_COLUMNS[:4], f"amount ({_textCell(currency)})",
                     f"balance ({_textCell(currency)})"])
    for e in entries:
        writer.writerow([_textCell(e.time), _textCell(e.kind), _textCell(e.account),
                         _textCell(e.memo), _sixDecimals(e.amount), _sixDecimals(e.balance)])
    return out.getvalue()


@attr.s(frozen=True, auto_attribs=True)
class CsvStatement:
    """
    An account's statement as CSV C{text} of its newest C{entries}
    entries; C{more} when older ones were left out.
    """

    text: str
    entries: int
    more: bool


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

    def spentByDay(self, account, days=SERIES_DAYS, now=None):
        """
        Fires with what the account's VMs cost it a day over the last
        C{days} days: [(unix time of the day's midnight UTC, micro-units)],
        oldest first.  C{now} (unix seconds) is the ledger's clock unless
        given.  ValueError for days out of 1 to L{MAX_SERIES_DAYS}.
        """
        return self._series(spendingByDay, account, days, now)

    def earnedByDay(self, account, days=SERIES_DAYS, now=None):
        """Fires with what the account earned a day, like L{spentByDay}."""
        return self._series(earningsByDay, account, days, now)

    def _series(self, query, account, days, now):
        if now is None:
            now = datetime.datetime.fromisoformat(ledgerNow()).timestamp()
        _lastDays(days, now)
        return self.store.run(query, account.id, days, now)

    def csvStatement(self, account, currency, limit=CSV_ENTRIES):
        """
        Fires with the account's statement as a L{CsvStatement}: its
        newest C{limit} entries, newest first.
        """
        def page(cursor):
            entries, more = statementPage(cursor, account.id, None, limit)
            return CsvStatement(statementCsv(entries, currency), len(entries), more)

        return self.store.run(page)
