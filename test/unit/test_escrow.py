"""
The earnings of a replicated lease wait for its verdict, on a real
database: each test runs on SQLite and on PostgreSQL (the `conn` fixture
of test/conftest.py).
"""

import argparse

import pytest
from twisted.internet import defer

from cpushare.client.cli import funds
from cpushare.money import CENT, MICRO
from cpushare.protocol import commands
from cpushare.server import admin
from cpushare.server.db import leases as leasesql
from cpushare.server.money import escrow, ledger, payouts, statements
from cpushare.server.money.billing import bill, openLease
from cpushare.server.money.escrow import CannotDecide, decide, pendingMismatch
from cpushare.server.money.ledger import EARNINGS, FUNDS, HELD, PENDING
from test.unit.test_billing import INTERVAL, PRICE, WINDOW, check, credit, market, run  # noqa: F401
from test.unit.test_ledger import adminArguments
from test.unit.test_orders import FakeProgram, OrderCase
from test.unit.test_replicas import AMD, INTEL

CREDIT = 10 * MICRO


def pendingLease(conn, m, verdict="pending", started=1000.0):
    """A lease of 2 cores opened at C{started} (its VM alive at once), replicated by default."""
    leaseId = run(conn, openLease, m["vm"], m["order"], m["alice"], m["sam"], "sam", PRICE,
                  0, 2, started, INTERVAL, WINDOW, verdict=verdict)
    run(conn, leasesql.showedLife, leaseId, started)
    return leaseId


def seller(conn, m):
    """sam's (earnings, pending)."""
    b = run(conn, ledger.balances, m["sam"])
    return b[EARNINGS], b[PENDING]


def buyer(conn, m):
    """alice's (funds, held)."""
    b = run(conn, ledger.balances, m["alice"])
    return b[FUNDS], b[HELD]


def leaseRow(conn, leaseId):
    lease = run(conn, leasesql.load, leaseId)
    return lease.verdict, lease.pending, lease.charged


def transactions(conn):
    return run(conn, ledger.books)["transactions"]


def statementOf(conn, accountId):
    entries, _ = run(conn, statements.statementPage, accountId)
    return [(e.kind, e.account, e.amount, e.memo) for e in entries]


def test_charges_of_a_pending_lease_wait_and_cannot_be_paid_out(conn, market):
    credit(conn, market, CREDIT)
    leaseId = pendingLease(conn, market)
    # 600 s at full tilt on 2 cores: 1200 CPU s at 10 micro-units each,
    # all the window held for it.
    result = run(conn, bill, leaseId, 1200.0, 0, 1600.0, False, INTERVAL, WINDOW)
    assert result.charged == 12_000
    assert seller(conn, market) == (0, 12_000)
    assert leaseRow(conn, leaseId) == ("pending", 12_000, 12_000)
    check(conn)
    # The cheating seller cannot take out what waits for its verdict.
    for amount in (None, CENT):
        with pytest.raises(commands.BadRequest, match="earnings"):
            run(conn, payouts.startPayout, market["sam"], amount, "sam@example.com", CENT,
                "USD")
    assert seller(conn, market) == (0, 12_000)
    # It sees it apart, and its statement says why.
    earned = run(conn, statements.earningsSheet, market["sam"])
    assert (earned.earnings, earned.awaiting) == (0, 12_000)
    kind, account, amount, memo = statementOf(conn, market["sam"])[0]
    assert (kind, account, amount) == ("charge", PENDING, 12_000)
    assert memo == ("VM %d on sam (lease %d): 1200.0 CPU s, 0 bytes, awaiting its replica"
                    " group's verdict" % (market["vm"], leaseId))
    check(conn)


@pytest.mark.parametrize("verdict, why", [
    ("accepted", "its result agreed with its replica group's"),
    ("inconclusive", "its replica group reached no majority"),
])
def test_an_accepted_or_inconclusive_verdict_pays_the_seller(conn, market, verdict, why):
    credit(conn, market, CREDIT)
    leaseId = pendingLease(conn, market)
    run(conn, bill, leaseId, 300.0, 0, 1300.0, False, INTERVAL, WINDOW)
    assert seller(conn, market) == (0, 3000)
    done = run(conn, decide, leaseId, verdict)
    assert done == escrow.Decided(lease=leaseId, vm=market["vm"], verdict=verdict,
                                  amount=3000, seller=market["sam"], buyer=market["alice"])
    assert seller(conn, market) == (3000, 0)
    assert leaseRow(conn, leaseId) == (verdict, 0, 3000)
    assert statementOf(conn, market["sam"])[:2] == [
        ("verdict", EARNINGS, 3000, "VM %d on sam (lease %d) %s, %s: 0.003 paid to the"
         " seller's earnings" % (market["vm"], leaseId, verdict, why)),
        ("verdict", PENDING, -3000, "VM %d on sam (lease %d) %s, %s: 0.003 paid to the"
         " seller's earnings" % (market["vm"], leaseId, verdict, why)),
    ]
    check(conn)
    # Decided while it still runs: its later bills go straight to the earnings.
    assert run(conn, bill, leaseId, 400.0, 0, 1400.0, False, INTERVAL, WINDOW).charged == 1000
    assert seller(conn, market) == (4000, 0)
    run(conn, bill, leaseId, 500.0, 0, 1450.0, True, INTERVAL, WINDOW, "done")
    assert seller(conn, market) == (5000, 0)
    assert buyer(conn, market) == (CREDIT - 5000, 0)
    check(conn)


def test_a_rejected_result_returns_the_charges_and_later_bills_charge_nothing(conn, market):
    credit(conn, market, CREDIT)
    leaseId = pendingLease(conn, market)
    run(conn, bill, leaseId, 300.0, 0, 1300.0, False, INTERVAL, WINDOW)
    funds, held = buyer(conn, market)
    done = run(conn, decide, leaseId, "rejected")
    assert (done.amount, done.verdict, done.replayed) == (3000, "rejected", False)
    assert seller(conn, market) == (0, 0)
    assert buyer(conn, market) == (funds + 3000, held)
    assert leaseRow(conn, leaseId) == ("rejected", 0, 3000)
    kind, account, amount, memo = statementOf(conn, market["alice"])[0]
    assert (kind, account, amount) == ("verdict", FUNDS, 3000)
    assert memo == ("VM %d on sam (lease %d) rejected, its result was in its replica group's"
                    " minority: 0.003 returned to the buyer's funds" % (market["vm"], leaseId))
    check(conn)
    # The VM runs on: what its seller reports is recorded and charged nothing.
    before = transactions(conn)
    result = run(conn, bill, leaseId, 900.0, 0, 1600.0, False, INTERVAL, WINDOW)
    assert result.charged == 0 and result.stop is None
    assert transactions(conn) == before
    result = run(conn, bill, leaseId, 1000.0, 0, 1700.0, True, INTERVAL, WINDOW, "done")
    assert result.charged == 0 and result.settled
    assert run(conn, leasesql.load, leaseId).cpuSeconds == 1000.0
    # Every micro-unit is back with the buyer, none with the seller.
    assert buyer(conn, market) == (CREDIT, 0)
    assert seller(conn, market) == (0, 0)
    check(conn)


def test_a_settled_lease_is_decided_as_well(conn, market):
    credit(conn, market, CREDIT)
    leaseId = pendingLease(conn, market)
    run(conn, bill, leaseId, 300.0, 0, 1300.0, True, INTERVAL, WINDOW, "done")
    assert buyer(conn, market) == (CREDIT - 3000, 0)
    assert run(conn, decide, leaseId, "rejected").amount == 3000
    assert buyer(conn, market) == (CREDIT, 0)
    check(conn)


def test_a_replayed_verdict_posts_nothing_and_a_different_one_is_refused(conn, market):
    credit(conn, market, CREDIT)
    leaseId = pendingLease(conn, market)
    run(conn, bill, leaseId, 300.0, 0, 1300.0, False, INTERVAL, WINDOW)
    run(conn, decide, leaseId, "accepted")
    before = transactions(conn), seller(conn, market), buyer(conn, market)
    again = run(conn, decide, leaseId, "accepted")
    assert (again.amount, again.replayed) == (0, True)
    # A greedy buyer's second opinion changes nothing.
    for other in ("rejected", "inconclusive"):
        with pytest.raises(CannotDecide, match=f"lease {leaseId} was already accepted;"
                           f" it cannot be {other} too"):
            run(conn, decide, leaseId, other)
    assert (transactions(conn), seller(conn, market), buyer(conn, market)) == before
    assert leaseRow(conn, leaseId)[:2] == ("accepted", 0)
    check(conn)


def test_a_lease_decided_before_its_first_charge_moves_nothing(conn, market):
    credit(conn, market, CREDIT)
    leaseId = pendingLease(conn, market)
    before = transactions(conn)
    done = run(conn, decide, leaseId, "rejected")
    assert (done.amount, done.replayed) == (0, False)
    assert transactions(conn) == before
    assert run(conn, bill, leaseId, 300.0, 0, 1300.0, True, INTERVAL, WINDOW).charged == 0
    assert buyer(conn, market) == (CREDIT, 0)
    check(conn)


def test_a_lease_without_replicas_has_no_verdict_to_give(conn, market):
    credit(conn, market, CREDIT)
    leaseId = pendingLease(conn, market, verdict=None)
    run(conn, bill, leaseId, 300.0, 0, 1300.0, False, INTERVAL, WINDOW)
    assert seller(conn, market) == (3000, 0)
    with pytest.raises(CannotDecide, match=f"lease {leaseId} is not of a replicated order"):
        run(conn, decide, leaseId, "rejected")
    assert seller(conn, market) == (3000, 0)
    assert leaseRow(conn, leaseId) == (None, 0, 3000)
    check(conn)


@pytest.mark.parametrize("verdict", ["pending", "ACCEPTED", "", None, 1])
def test_what_is_no_verdict_is_refused_naming_it(conn, market, verdict):
    credit(conn, market, CREDIT)
    leaseId = pendingLease(conn, market)
    with pytest.raises(CannotDecide, match="a verdict is one of accepted, inconclusive,"
                       f" unchecked, rejected, not {verdict!r}"):
        run(conn, decide, leaseId, verdict)
    with pytest.raises(CannotDecide, match="there is no lease 999"):
        run(conn, decide, 999, "accepted")
    assert leaseRow(conn, leaseId)[0] == "pending"


def test_what_a_rejected_lease_was_charged_leaves_the_orders_budget(conn, market):
    credit(conn, market, CREDIT)
    conn.execute("UPDATE orders SET budget = 15000 WHERE id = ?", (market["order"],))
    leaseId = pendingLease(conn, market)
    run(conn, bill, leaseId, 1200.0, 0, 1600.0, True, INTERVAL, WINDOW, "done")
    assert run(conn, leasesql.orderTotals, market["order"]) == (12_000, 0)
    run(conn, decide, leaseId, "rejected")
    # The buyer has it back: the order may spend it again.
    assert run(conn, leasesql.orderTotals, market["order"]) == (0, 0)
    check(conn)


def test_the_books_check_finds_leases_that_disagree_with_the_pending_accounts(
        conn, market, capsys):
    credit(conn, market, CREDIT)
    leaseId = pendingLease(conn, market)
    run(conn, bill, leaseId, 300.0, 0, 1300.0, False, INTERVAL, WINDOW)
    assert admin.main(adminArguments(conn) + ["books"]) == 0
    assert "pending" in capsys.readouterr().out
    # Someone edits a lease behind the ledger's back.
    conn.execute("UPDATE leases SET pending = pending + 7, held = held - 1 WHERE id = ?",
                 (leaseId,))
    assert run(conn, ledger.books)["ok"]            # the ledger alone still balances
    assert run(conn, pendingMismatch) == [(market["sam"], 3000, 3007)]
    assert admin.main(adminArguments(conn) + ["books"]) == 2
    out = capsys.readouterr().out
    assert (f"PENDING account {market['sam']}: its pending earnings are 0.003,"
            " its leases await verdicts on 0.003007") in out
    assert f"HELD account {market['alice']}: its held funds are 0.012" in out
    assert "THE BOOKS DO NOT BALANCE" in out


# -- on the market in memory (test/fakemarket.py)


class PendingOnTheMarketTests(OrderCase):
    """A replicated order's sellers see their earnings await verdicts."""

    @defer.inlineCallbacks
    def seller(self, name, host, country, cpu):
        who = yield self.register(name)
        session = yield self.connect("seller", *who, sessionClass=FakeProgram, host=host)
        yield self.call(session, commands.Offer, cores=1, memory=4096, country=country, **cpu)
        return session

    @defer.inlineCallbacks
    def test_sellers_see_what_awaits_verdicts_until_they_are_in(self):
        it = yield self.seller("it", "192.0.2.1", "IT", INTEL)
        de = yield self.seller("de", "198.51.100.1", "DE", AMD)
        placed = yield self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=1,
                                 cores=1, memory=256, replicas=2)
        self.assertEqual(placed["allocated"], 2)
        for s in (it, de):
            vm = (yield self.within(s.started.get()))["vm"]
            yield self.showLife(s, vm)
            yield self.call(s, commands.VMState, vm=vm, state="running", cpu_seconds=30.0)
        clock = self.reactor

        class MinuteLater:
            def seconds(self):
                return clock.seconds() + 60

        self.patch(self.market.billing, "reactor", MinuteLater())
        yield self.market.billing.tick()
        leases = {lease["seller"]: lease for lease in
                  (yield self.call(self.cli, commands.ListLeases))["leases"]}
        charged = leases["it"]["charged"]
        self.assertGreater(charged, 0)
        for s in (it, de):
            balance = yield self.call(s, commands.Balance)
            self.assertEqual((balance["earnings"], balance["awaiting_verdicts"]),
                             (0, leases[s.info["account"]]["charged"]))
            earned = yield self.call(s, commands.Earnings)
            self.assertEqual((earned["earnings"], earned["awaiting_verdicts"]),
                             (0, leases[s.info["account"]]["charged"]))
        yield self.checkBooks()
        funds = (yield self.call(self.cli, commands.Balance))["funds"]
        yield self.store.run(decide, leases["it"]["lease"], "accepted")
        yield self.store.run(decide, leases["de"]["lease"], "rejected")
        balance = yield self.call(it, commands.Balance)
        self.assertEqual((balance["earnings"], balance["awaiting_verdicts"]), (charged, 0))
        balance = yield self.call(de, commands.Balance)
        self.assertEqual((balance["earnings"], balance["awaiting_verdicts"]), (0, 0))
        self.assertEqual((yield self.call(self.cli, commands.Balance))["funds"],
                         funds + leases["de"]["charged"])
        yield self.checkBooks()


def showBalance(monkeypatch, capsys, sheet, show=funds.balance):
    """What C{show} prints of C{sheet}, as the market would answer it."""
    async def ask(reactor, home, command, **kw):
        return sheet

    monkeypatch.setattr(funds, "ask", ask)
    coroutine = show(None, argparse.Namespace(json=False), None)
    with pytest.raises(StopIteration):
        coroutine.send(None)
    return capsys.readouterr().out


def test_the_command_line_shows_what_awaits_verdicts_apart(monkeypatch, capsys):
    sheet = {"funds": 0, "held": 0, "earnings": 2 * MICRO, "payout": 0,
             "awaiting_verdicts": 1_500_000, "currency": "USD", "commission_percent": "5",
             "payments": True, "pending": []}
    out = showBalance(monkeypatch, capsys, sheet)
    assert "earnings:  2.00 USD   earned selling; 'cpushare payout'" in out
    assert "awaiting:  1.50 USD   earned with replicated runs, awaiting verdicts" in out
    # A market that says nothing of verdicts, or nothing waiting: no line.
    for answer in (dict(sheet, awaiting_verdicts=0),
                   {k: v for k, v in sheet.items() if k != "awaiting_verdicts"}):
        assert "awaiting" not in showBalance(monkeypatch, capsys, answer)
    sheet = {"earnings": 2 * MICRO, "payout": 0, "awaiting_verdicts": 1_500_000,
             "currency": "USD", "minimum": MICRO, "payments": True, "payouts": []}
    out = showBalance(monkeypatch, capsys, sheet, funds.earnings)
    assert ("awaiting:        1.50 USD (replicated runs awaiting verdicts: paid once their"
            " results are accepted)") in out
