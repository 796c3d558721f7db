"""
Adding funds, balances, statements and payouts: the arithmetic, the
store's rules on both databases, and a market without PayPal in memory.
The whole path through the PayPal SDK, the fake PayPal and the HTTPS
return page is in test/integration/test_funds_paypal.py.
"""

import pytest
from twisted.internet import defer

from cpushare.money import CENT, MICRO, BadAmount
from cpushare.protocol import commands
from cpushare.server.money import desk
from cpushare.server.money import funds as fundsModule
from cpushare.server.money import ledger
from cpushare.server.money import payouts
from cpushare.server.money import statements
from cpushare.server.db import store
from cpushare.server.money.funds import commissionOn, formatPercent, parsePercent
from cpushare.server.money.ledger import EARNINGS, FUNDS, PAYOUT, PAYPAL
from cpushare.server.money.paypal import checkEndpoint, parsePayPalDecimal, paypalDecimal
from test.unit import test_session

# -- the arithmetic


@pytest.mark.parametrize("gross, percent, commission", [
    ("20.00", "5", "1.00"),
    ("20.01", "2.5", "0.50"),      # 0.50025, rounded down to the cent
    ("19.99", "5", "0.99"),        # 0.9995
    ("1.00", "0", "0.00"),
    ("10000.00", "99.9999", "9999.99"),
    ("3.33", "33.3333", "1.10"),   # 1.10999889
])
def test_the_commission_is_rounded_down_to_the_cent(gross, percent, commission):
    amount = commissionOn(ledger.parseAmount(gross), parsePercent(percent))
    assert amount == ledger.parseAmount(commission) if commission != "0.00" else amount == 0
    assert amount % CENT == 0


def test_percentages_parse_exactly_and_format_back():
    assert parsePercent("5") == 50_000
    assert parsePercent("2.5") == 25_000
    assert parsePercent("0.0001") == 1
    assert parsePercent("0") == 0
    assert formatPercent(50_000) == "5"
    assert formatPercent(25_000) == "2.5"
    assert formatPercent(1) == "0.0001"
    for bad in ("100", "-1", "abc", "2.55555", "5%", "", "1e1"):
        with pytest.raises(ValueError, match="not a percentage"):
            parsePercent(bad)


def test_paypal_decimals_convert_exactly_and_refuse_fractions_of_a_cent():
    assert paypalDecimal(20 * MICRO) == "20.00"
    assert paypalDecimal(20_500_000) == "20.50"
    assert paypalDecimal(1 * CENT) == "0.01"
    assert paypalDecimal(10_000 * MICRO) == "10000.00"
    with pytest.raises(BadAmount, match="fraction of a cent"):
        paypalDecimal(20_001_000)
    with pytest.raises(BadAmount):
        paypalDecimal(-CENT)
    with pytest.raises(BadAmount):
        paypalDecimal(1.5)
    assert parsePayPalDecimal("20.00") == 20 * MICRO
    assert parsePayPalDecimal("20.5") == 20_500_000
    assert parsePayPalDecimal("7") == 7 * MICRO
    assert parsePayPalDecimal("0.01") == CENT
    # What was never PayPal's: signs, exponents, sub-cent digits, separators.
    for bad in ("-1.00", "1e3", "20.001", "1,000.00", "", None, "20.00 "):
        with pytest.raises(BadAmount):
            parsePayPalDecimal(bad)


def test_the_paypal_endpoint_is_https_or_loopback():
    assert checkEndpoint("https://api.sandbox.paypal.com/") == "https://api.sandbox.paypal.com"
    assert checkEndpoint("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert checkEndpoint("http://localhost:8080/") == "http://localhost:8080"
    for bad, problem in [("http://paypal.example.com", "unencrypted"),
                         ("ftp://x", "not an http"), ("https://x/v1/", "scheme, host and port")]:
        with pytest.raises(ValueError, match=problem):
            checkEndpoint(bad)


# -- the store, on both databases: a credit is posted once, a payout ends once


# `conn` (test/conftest.py) is a migrated connection, on SQLite and on PostgreSQL.


def run(conn, fn, *args, **kw):
    return store.transact(conn, lambda c: fn(c, *args, **kw))


def test_a_payment_is_credited_once_even_when_a_second_claim_slips_through(conn):
    alice = run(conn, store.createAccount, "alice", "ab" * 32)
    paymentId = run(conn, fundsModule.recordPayment, alice, "PAY-1", "nonce", 20 * MICRO,
                    MICRO, "USD")
    payment, status = run(conn, fundsModule.claimPayment, "PAY-1", "nonce")
    assert status == "claimed"
    run(conn, fundsModule.creditPayment, paymentId, "PAYER")
    assert run(conn, ledger.balance, FUNDS, alice) == 19 * MICRO
    _, status = run(conn, fundsModule.claimPayment, "PAY-1", "nonce")
    assert status == "credited"
    # Another server process that read the payment before this one
    # credited it, and claimed it: the ledger's reference stops it.
    run(conn, lambda c: c.execute(
        "UPDATE paypal_payments SET state = 'executing' WHERE id = ?", (paymentId,)))
    with pytest.raises(ledger.AlreadyPosted):
        store.transact(conn, lambda c: ledger.post(c, "deposit", "again", [
            (PAYPAL, None, -20 * MICRO), (FUNDS, alice, 20 * MICRO)],
            reference="paypal-payment:PAY-1"))
    with pytest.raises(ledger.AlreadyPosted):
        run(conn, fundsModule.creditPayment, paymentId, "PAYER")
    assert run(conn, ledger.balance, FUNDS, alice) == 19 * MICRO
    assert run(conn, ledger.books)["ok"]


def test_returns_racing_on_two_connections_claim_and_credit_once(db, conn):
    """Two server processes (two connections) completing the same payment at once."""
    import threading

    alice = run(conn, store.createAccount, "alice", "ab" * 32)
    paymentId = run(conn, fundsModule.recordPayment, alice, "PAY-1", "nonce", 20 * MICRO,
                    MICRO, "USD")
    others = [db.connect() for _ in range(4)]
    barrier = threading.Barrier(len(others))
    results = [None] * len(others)

    def race(i, fn, *args):
        barrier.wait()
        try:
            results[i] = store.transact(others[i], fn, *args)
        except Exception as e:
            results[i] = e

    def together(fn, *args):
        threads = [threading.Thread(target=race, args=(i, fn) + args)
                   for i in range(len(others))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return list(results)

    try:
        claims = together(fundsModule.claimPayment, "PAY-1", "nonce")
        assert sorted(status for _, status in claims) == ["claimed"] + ["executing"] * 3
        credits = together(fundsModule.creditPayment, paymentId, "PAYER")
        assert sum(isinstance(r, int) for r in credits) == 1, credits
        assert sum(isinstance(r, ledger.AlreadyPosted) for r in credits) == 3, credits
    finally:
        for c in others:
            c.close()
    assert run(conn, ledger.balance, FUNDS, alice) == 19 * MICRO
    assert run(conn, ledger.books)["ok"]


def test_a_forged_nonce_or_an_unknown_payment_claims_nothing(conn):
    alice = run(conn, store.createAccount, "alice", "ab" * 32)
    run(conn, fundsModule.recordPayment, alice, "PAY-1", "nonce", 20 * MICRO, 0, "USD")
    assert run(conn, fundsModule.claimPayment, "PAY-2", "nonce") == (None, "unknown")
    payment, status = run(conn, fundsModule.claimPayment, "PAY-1", "other")
    assert status == "forged" and payment.state == "created"


def test_a_payout_ends_once_sent_or_returned(conn):
    sam = run(conn, store.createAccount, "sam", "ab" * 32)
    run(conn, ledger.post, "test", "earnings", [(PAYPAL, None, -30 * MICRO),
                                                  (EARNINGS, sam, 30 * MICRO)])
    p = run(conn, payouts.startPayout, sam, 25 * MICRO, "sam@example.com", MICRO, "USD")
    assert run(conn, ledger.balances, sam)[PAYOUT] == 25 * MICRO
    assert run(conn, payouts.settlePayout, p.id, "returned", reason="test")
    assert not run(conn, payouts.settlePayout, p.id, "sent")
    assert not run(conn, payouts.settlePayout, p.id, "returned")
    assert run(conn, ledger.balances, sam)[EARNINGS] == 30 * MICRO
    assert run(conn, ledger.balances, sam)[PAYOUT] == 0
    assert run(conn, ledger.books)["ok"]


def test_statement_pages_carry_each_accounts_running_balance(conn):
    sam = run(conn, store.createAccount, "sam", "ab" * 32)
    for i in range(1, 6):
        run(conn, ledger.post, "test", f"earning {i}", [(PAYPAL, None, -i * MICRO),
                                                          (EARNINGS, sam, i * MICRO)])
    first, more = run(conn, statements.statementPage, sam, None, 2)
    assert more
    second, more = run(conn, statements.statementPage, sam, first[-1].entry, 2)
    third, more = run(conn, statements.statementPage, sam, second[-1].entry, 2)
    assert not more
    entries = first + second + third
    assert [e.memo for e in entries] == [f"earning {i}" for i in (5, 4, 3, 2, 1)]
    assert [e.balance for e in entries] == [15 * MICRO, 10 * MICRO, 6 * MICRO, 3 * MICRO,
                                               MICRO]


# -- a market with no PayPal, in memory (test/fakemarket.py)


class NoPayPalTests(test_session.MarketCase):
    """A market whose operator set up no PayPal: it runs, and says it takes no payments."""

    @defer.inlineCallbacks
    def test_funds_add_and_payout_say_the_market_takes_no_payments(self):
        alice = yield self.register("alice")
        cli = yield self.connect("cli", *alice)
        for command, kw in [(commands.FundsAdd, {"amount": 20 * MICRO}),
                            (commands.Payout, {"email": "a@example.com"})]:
            with self.assertRaises(commands.NoPayments) as e:
                yield cli.control.callRemote(command, **kw)
            self.assertIn("this market takes no payments", str(e.exception))
        balance = yield cli.control.callRemote(commands.Balance)
        self.assertEqual((balance["funds"], balance["payments"]), (0, False))

    @defer.inlineCallbacks
    def test_the_return_page_says_so(self):
        outcome = yield defer.ensureDeferred(
            self.market.money.funds.paymentReturned("PAY-1", "PAYER", "n"))
        self.assertEqual(outcome.status, 404)
        self.assertIn("takes no payments", outcome.message)


def test_a_restart_lets_an_interrupted_payment_complete_and_flags_an_interrupted_payout(conn):
    alice = run(conn, store.createAccount, "alice", "ab" * 32)
    run(conn, ledger.post, "test", "earnings", [(PAYPAL, None, -30 * MICRO),
                                                  (EARNINGS, alice, 30 * MICRO)])
    paymentId = run(conn, fundsModule.recordPayment, alice, "PAY-1", "nonce", 20 * MICRO, 0,
                    "USD")
    run(conn, fundsModule.claimPayment, "PAY-1", "nonce")
    p = run(conn, payouts.startPayout, alice, 25 * MICRO, "a@example.com", MICRO, "USD")
    # The server stopped here, with both half done.
    assert run(conn, desk.recoverInterrupted) == (1, 1)
    _, status = run(conn, fundsModule.claimPayment, "PAY-1", "nonce")
    assert status == "claimed"
    run(conn, fundsModule.creditPayment, paymentId, "PAYER")
    assert run(conn, payouts.payout, p.id).state == "unknown"
    assert run(conn, ledger.balances, alice)[PAYOUT] == 25 * MICRO
    assert run(conn, desk.recoverInterrupted) == (0, 0)
