"""
Adding funds with PayPal, balances, statements and payouts, the whole
path: the market's Funds with the real PayPal SDK code (RESTPayPal)
pointed at the local fake of PayPal's REST endpoints (test/paypalfake.py)
over HTTP, the HTTPS endpoint on loopback with the market's certificate,
a real SQLite store, and the commands over a real client connection with
TLS.  The SDK speaks HTTP through real sockets, so these run on the real
reactor; the funds rules on the store are in test/unit/test_funds.py.
"""

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.ssl import Certificate
from twisted.protocols.policies import WrappingFactory
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from cpushare.money import CENT, MICRO
from cpushare.protocol import commands
from cpushare.server.money import funds as fundsModule
from cpushare.server.money import ledger
from cpushare.server.money.desk import MoneyDesk
from cpushare.server.money.funds import parsePercent
from cpushare.server.money.ledger import EARNINGS, FUNDS
from cpushare.server.money import payouts
from cpushare.server.money.paypal import RESTPayPal
from cpushare.server.web import loadWebTLS, site
from test.paypalfake import FakePayPal, closeAll
from test.tlsmarket import TLSMarketCase


class _Body(Protocol):
    """Collects a response body; readBody would warn that the agent's
    transport proxy has no abortConnection."""

    def __init__(self, done):
        self.done, self.parts = done, []

    def dataReceived(self, data):
        self.parts.append(data)

    def connectionLost(self, reason):
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _readBody(response):
    done = defer.Deferred()
    response.deliverBody(_Body(done))
    return done

class FundsCase(TLSMarketCase):
    """A market on loopback with real TLS: its PayPal is the fake one, over HTTPS."""

    commission = "5"

    @defer.inlineCallbacks
    def setUp(self):
        yield TLSMarketCase.setUp(self)
        self.fake = FakePayPal(reactor)
        self.fake.listen()
        self.addCleanup(self.fake.stop)
        self.paypal = RESTPayPal(reactor, "sandbox", self.fake.clientId, self.fake.secret,
                                 endpoint=self.fake.baseUrl)
        # Payouts are polled by the tests themselves (pollOnce): a day apart.
        self.money = MoneyDesk(reactor, self.store, self.paypal,
                               commission=parsePercent(self.commission),
                               payoutMinimum=5 * MICRO, pollInterval=86400.0)
        self.market.money = self.money
        self.funds = self.money.funds
        self.money.startService()
        self.addCleanup(self.money.stopService)
        from twisted.protocols.tls import TLSMemoryBIOFactory
        connections = WrappingFactory(
            TLSMemoryBIOFactory(loadWebTLS(self.credentials), False, site(self.funds)))
        web = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(connections)
        self.addCleanup(closeAll, reactor, connections)
        self.addCleanup(web.stopListening)
        self.funds.publicUrl = f"https://localhost:{web.getHost().port}"
        yield defer.ensureDeferred(self.money.open())
        self.agent = Agent(reactor, BrowserLikePolicyForHTTPS(
            trustRoot=Certificate.loadPEM(self.credentials.caPEM)))
        self.alice = yield self.register("alice")
        self.cli = yield self.connect("cli", *self.alice)

    @defer.inlineCallbacks
    def get(self, url):
        """GET C{url} (no redirects followed): (status, body text, Location)."""
        response = yield self.agent.request(b"GET", url.encode(), Headers())
        body = (yield _readBody(response)).decode("utf-8")
        location = response.headers.getRawHeaders(b"location", [b""])[0].decode()
        return response.code, body, location

    @defer.inlineCallbacks
    def approve(self, approvalUrl, action="approve"):
        """The buyer at PayPal: approve (or cancel); returns the URL PayPal sends it to."""
        code, _, location = yield self.get(approvalUrl + f"&action={action}")
        self.assertEqual(code, 302)
        return location

    @defer.inlineCallbacks
    def addFunds(self, amount="20.00", session=None):
        answer = yield (session or self.cli).control.callRemote(
            commands.FundsAdd, amount=ledger.parseAmount(amount))
        return answer

    def call(self, command, session=None, **kw):
        return (session or self.cli).control.callRemote(command, **kw)

    @defer.inlineCallbacks
    def balances(self, session=None):
        answer = yield self.call(commands.Balance, session)
        return answer["funds"], answer["earnings"], answer["payout"]

    def books(self):
        return self.store.run(ledger.books)

    def payment(self, paypalId):
        return self.store.run(fundsModule.paymentByPayPalId, paypalId)


class AddingFundsTests(FundsCase):

    @defer.inlineCallbacks
    def test_approving_a_payment_adds_the_net_and_the_statement_shows_it(self):
        credited = []
        self.funds.onCredited = credited.append     # the market places waiting VMs
        added = yield self.addFunds("20.00")
        self.assertEqual((added["gross"], added["commission"], added["net"]),
                         (20 * MICRO, MICRO, 19 * MICRO))
        self.assertEqual((added["currency"], added["commission_percent"]), ("USD", "5"))
        self.assertTrue(added["approval_url"].startswith(self.fake.baseUrl + "/webscr?"))
        # Nothing is credited before PayPal sends the buyer back.
        balance = yield self.call(commands.Balance)
        self.assertEqual(balance["funds"], 0)
        self.assertEqual([(p["payment"], p["state"]) for p in balance["pending"]],
                         [(added["payment"], "created")])

        back = yield self.approve(added["approval_url"])
        self.assertTrue(back.startswith(self.funds.publicUrl + "/paypal/return?n="), back)
        code, page, _ = yield self.get(back)
        self.assertEqual(code, 200)
        self.assertIn("20.00 USD paid, 19.00 added to your CPUShare funds", page)
        me = yield self.call(commands.WhoAmI)
        self.assertEqual(credited, [me["account_id"]])

        balance = yield self.call(commands.Balance)
        self.assertEqual((balance["funds"], balance["pending"]), (19 * MICRO, []))
        statement = yield self.call(commands.Statement)
        [entry] = statement["entries"]
        self.assertEqual((entry["kind"], entry["account"], entry["amount"], entry["balance"]),
                         ("deposit", "funds", 19 * MICRO, 19 * MICRO))
        self.assertIn(added["payment"], entry["memo"])
        self.assertFalse(statement["more"])
        books = yield self.books()
        self.assertTrue(books["ok"])
        self.assertEqual(books["byKind"], {"paypal": -20 * MICRO, "funds": 19 * MICRO,
                                           "commission": MICRO})

    @defer.inlineCallbacks
    def test_a_replayed_return_credits_nothing_and_asks_paypal_nothing(self):
        added = yield self.addFunds("20.00")
        back = yield self.approve(added["approval_url"])
        code, page, _ = yield self.get(back)
        self.assertEqual(code, 200)
        for _ in range(2):
            code, page, _ = yield self.get(back)
            self.assertEqual(code, 200)
            self.assertIn("was already completed", page)
            self.assertIn("Nothing more was charged or added", page)
        funds, _, _ = yield self.balances()
        self.assertEqual(funds, 19 * MICRO)
        self.assertEqual(self.fake.count("POST", "/execute"), 1)

    @defer.inlineCallbacks
    def test_racing_returns_credit_once(self):
        added = yield self.addFunds("20.00")
        back = yield self.approve(added["approval_url"])
        # PayPal answers slowly, so the second return arrives while the
        # first is being executed.
        self.fake.knobs["delay"] = 0.3
        results = yield defer.gatherResults([self.get(back), self.get(back), self.get(back)])
        pages = [page for _, page, _ in results]
        credited = [p for p in pages if "added to your CPUShare funds" in p]
        self.assertEqual(len(credited), 1, pages)
        for page in pages:
            if page is not credited[0]:
                self.assertTrue("being completed right now" in page
                                or "was already completed" in page, page)
        funds, _, _ = yield self.balances()
        self.assertEqual(funds, 19 * MICRO)
        self.assertEqual(self.fake.count("POST", "/execute"), 1)

    @defer.inlineCallbacks
    def test_forged_returns_credit_nothing_and_the_real_one_still_does(self):
        added = yield self.addFunds("20.00")
        back = yield self.approve(added["approval_url"])
        base = self.funds.publicUrl + "/paypal/return"
        real = dict(part.split("=", 1) for part in back.split("?", 1)[1].split("&"))

        def url(**fields):
            return base + "?" + "&".join(f"{k}={v}" for k, v in dict(real, **fields).items())

        forged = [
            (url(paymentId="PAY-MADEUP000000000000000"), 404, "This market created no payment"),
            (url(n="someone-elses-guess"), 400, "does not match payment"),
            (url(PayerID="NOTTHEPAYER"), 402, "PayPal did not complete the payment: Payer ID "
                                              "is invalid"),
            (base + f"?paymentId={real['paymentId']}&PayerID={real['PayerID']}", 400,
             "This link lacks n"),
            (url(paymentId="PAY-<script>"), 400, "does not look like PayPal"),
        ]
        for link, status, text in forged:
            code, page, _ = yield self.get(link)
            self.assertEqual(code, status, page)
            self.assertIn(text, page)
            self.assertIn("Nothing", page)
            funds, _, _ = yield self.balances()
            self.assertEqual(funds, 0)
        self.assertNotIn("<script>", page)
        payment = yield self.payment(added["payment"])
        self.assertEqual(payment.state, "created")

        code, page, _ = yield self.get(back)
        self.assertEqual(code, 200)
        self.assertIn("19.00 added to your CPUShare funds", page)
        funds, _, _ = yield self.balances()
        self.assertEqual(funds, 19 * MICRO)

    @defer.inlineCallbacks
    def test_a_tampered_amount_credits_nothing(self):
        added = yield self.addFunds("20.00")
        back = yield self.approve(added["approval_url"])
        self.fake.knobs["execute_total"] = "25.00"
        code, page, _ = yield self.get(back)
        self.assertEqual(code, 409)
        self.assertIn("PayPal reports 25.00 USD paid, but this payment was created for "
                      "20.00 USD", page)
        code, page, _ = yield self.get(back)
        self.assertIn("needs the market operator's attention", page)
        funds, _, _ = yield self.balances()
        self.assertEqual(funds, 0)
        payment = yield self.payment(added["payment"])
        self.assertEqual(payment.state, "mismatch")
        books = yield self.books()
        self.assertEqual(books["transactions"], 0)

    @defer.inlineCallbacks
    def test_a_sale_paypal_holds_as_pending_waits_for_the_operator(self):
        added = yield self.addFunds("20.00")
        back = yield self.approve(added["approval_url"])
        self.fake.knobs["sale_state"] = "pending"
        code, page, _ = yield self.get(back)
        self.assertEqual(code, 409)
        self.assertIn("PayPal holds the sale as pending", page)
        funds, _, _ = yield self.balances()
        self.assertEqual(funds, 0)
        payment = yield self.payment(added["payment"])
        self.assertEqual(payment.state, "check")

    @defer.inlineCallbacks
    def test_a_cancelled_payment_credits_nothing(self):
        added = yield self.addFunds("20.00")
        cancel = yield self.approve(added["approval_url"], action="cancel")
        self.assertTrue(cancel.startswith(self.funds.publicUrl + "/paypal/cancel?n="), cancel)
        code, page, _ = yield self.get(cancel)
        self.assertEqual(code, 200)
        self.assertIn("You cancelled the payment of 20.00 USD", page)
        # Approving at PayPal afterwards, in another tab, adds nothing.
        back = yield self.approve(added["approval_url"])
        code, page, _ = yield self.get(back)
        self.assertEqual(code, 409)
        self.assertIn("was cancelled; nothing was charged or added", page)
        funds, _, _ = yield self.balances()
        self.assertEqual(funds, 0)
        self.assertEqual(self.fake.count("POST", "/execute"), 0)

    @defer.inlineCallbacks
    def test_a_payment_never_approved_expires_after_a_day(self):
        old = yield self.addFunds("20.00")
        fresh = yield self.addFunds("30.00")
        # The first was made more than a day ago.
        yield self.store.run(lambda c: c.execute(
            "UPDATE paypal_payments SET created = '2000-01-01T00:00:00+00:00'"
            " WHERE paypal_id = ?", (old["payment"],)))
        yield self.money.payouts._poll()
        balance = yield self.call(commands.Balance)
        self.assertEqual([p["payment"] for p in balance["pending"]], [fresh["payment"]])
        self.assertEqual((yield self.payment(old["payment"])).state, "expired")
        # A late return completes nothing, and says why.
        back = yield self.approve(old["approval_url"])
        code, page, _ = yield self.get(back)
        self.assertEqual(code, 409)
        self.assertIn("was not completed within a day and has expired", page)
        self.assertEqual(self.fake.count("POST", "/execute"), 0)
        self.assertEqual((yield self.balances())[0], 0)

    @defer.inlineCallbacks
    def test_a_payment_paypal_refuses_to_complete_can_be_tried_again(self):
        added = yield self.addFunds("20.00")
        back = yield self.approve(added["approval_url"])
        self.fake.knobs["refuse_execute"] = "INSTRUMENT_DECLINED"
        code, page, _ = yield self.get(back)
        self.assertEqual(code, 402)
        self.assertIn("PayPal did not complete the payment", page)
        funds, _, _ = yield self.balances()
        self.assertEqual(funds, 0)
        self.fake.knobs["refuse_execute"] = None
        code, page, _ = yield self.get(back)
        self.assertEqual(code, 200)
        funds, _, _ = yield self.balances()
        self.assertEqual(funds, 19 * MICRO)

    @defer.inlineCallbacks
    def test_bad_amounts_are_refused_and_nothing_is_created(self):
        for micro, problem in [
            (-20 * MICRO, "must be positive"),
            (0, "must be positive"),
            (20_001_000, "20.001 has a fraction of a cent"),
            (50 * CENT, "less than the smallest payment, 1.00 USD"),
            (10_000 * MICRO + CENT, "more than one payment may be, 10000.00 USD"),
            (10**15, "more than one payment may be"),
        ]:
            with self.assertRaises(commands.BadRequest) as e:
                yield self.call(commands.FundsAdd, amount=micro)
            self.assertIn(problem, str(e.exception))
        self.assertEqual(self.fake.count("POST", "/v1/payments/payment"), 0)
        balance = yield self.call(commands.Balance)
        self.assertEqual((balance["funds"], balance["pending"]), (0, []))

    @defer.inlineCallbacks
    def test_paypal_refusing_the_market_is_one_clear_error(self):
        self.fake.secret = "rotated"
        with self.assertRaises(commands.PayPalFailed) as e:
            yield self.addFunds("20.00")
        self.assertIn("PayPal refused the market's client id and secret", str(e.exception))
        self.assertIn("nothing was charged", str(e.exception))

    @defer.inlineCallbacks
    def test_another_accounts_session_sees_none_of_it(self):
        added = yield self.addFunds("20.00")
        back = yield self.approve(added["approval_url"])
        yield self.get(back)
        bob = yield self.register("bob")
        bobSession = yield self.connect("cli", *bob)
        funds, _, _ = yield self.balances(bobSession)
        self.assertEqual(funds, 0)
        statement = yield self.call(commands.Statement, bobSession)
        self.assertEqual(statement["entries"], [])


class SellerCase(FundsCase):
    """A seller, sam, with 30.00 of earnings."""

    @defer.inlineCallbacks
    def setUp(self):
        yield FundsCase.setUp(self)
        self.sam = yield self.register("sam")
        self.samSession = yield self.connect("seller", *self.sam)
        self.samId = self.samSession.info["account_id"]
        yield self.earn(30 * MICRO)

    @defer.inlineCallbacks
    def earn(self, amount):
        """
        Give sam earnings paid from alice's funds: the charge billing posts
        for CPU time, without running a VM.
        """
        added = yield self.addFunds(ledger.formatAmount(amount * 2))
        yield self.get((yield self.approve(added["approval_url"])))
        aliceId = self.cli.info["account_id"]
        yield self.store.run(ledger.post, "charge", "CPU time (test)", [
            (FUNDS, aliceId, -amount), (EARNINGS, self.samId, amount)])

    def payout(self, **kw):
        return self.call(commands.Payout, self.samSession, **kw)

    @defer.inlineCallbacks
    def earnings(self):
        answer = yield self.call(commands.Earnings, self.samSession)
        return answer

    def pollOnce(self):
        return self.money.payouts._poll()


class PayoutTests(SellerCase):

    @defer.inlineCallbacks
    def test_a_payout_leaves_the_earnings_and_is_sent_when_paypal_says_so(self):
        self.fake.knobs["payout_polls"] = 1
        answer = yield self.payout(amount=25 * MICRO, email="sam@example.com")
        self.assertEqual((answer["amount"], answer["email"], answer["state"]),
                         (25 * MICRO, "sam@example.com", "pending"))
        e = yield self.earnings()
        self.assertEqual((e["earnings"], e["payout"]), (5 * MICRO, 25 * MICRO))
        # The market asks PayPal at once after creating a payout (PayPal:
        # PROCESSING); the test waits for that question to be answered.
        if self.money.payouts._polling is not None:
            yield self.money.payouts._polling
        e = yield self.earnings()
        self.assertEqual(e["payouts"][0]["state"], "pending")
        self.assertEqual(e["payouts"][0]["paypal_status"], "PROCESSING/PENDING")
        yield self.pollOnce()   # PayPal: SUCCESS
        e = yield self.earnings()
        self.assertEqual((e["earnings"], e["payout"]), (5 * MICRO, 0))
        self.assertEqual(e["payouts"][0]["state"], "sent")
        self.assertEqual(e["email"], "sam@example.com")
        [sent] = self.fake.payouts.values()
        self.assertEqual(sent["items"][0]["amount"], {"value": "25.00", "currency": "USD"})
        self.assertEqual(sent["items"][0]["receiver"], "sam@example.com")
        statement = yield self.call(commands.Statement, self.samSession)
        self.assertEqual([(x["account"], x["amount"], x["balance"]) for x in
                          statement["entries"]],
                         [("payout", -25 * MICRO, 0), ("payout", 25 * MICRO, 25 * MICRO),
                          ("earnings", -25 * MICRO, 5 * MICRO),
                          ("earnings", 30 * MICRO, 30 * MICRO)])
        books = yield self.books()
        self.assertTrue(books["ok"])
        # Paid in 60.00 through PayPal, 25.00 paid out through it.
        self.assertEqual(books["byKind"]["paypal"], -60 * MICRO + 25 * MICRO)

    @defer.inlineCallbacks
    def test_a_failed_payout_returns_the_money_to_the_earnings(self):
        for outcome in ("FAILED", "DENIED"):
            self.fake.knobs["payout_outcome"] = outcome
            yield self.payout(amount=30 * MICRO, email="sam@example.com")
            e = yield self.earnings()
            self.assertEqual((e["earnings"], e["payout"]), (0, 30 * MICRO))
            yield self.pollOnce()
            yield self.pollOnce()
            e = yield self.earnings()
            self.assertEqual((e["earnings"], e["payout"]), (30 * MICRO, 0))
            self.assertEqual(e["payouts"][0]["state"], "returned")
            self.assertIn(f"PayPal says {'DENIED/-' if outcome == 'DENIED' else 'SUCCESS/FAILED'}",
                          e["payouts"][0]["reason"])
        books = yield self.books()
        self.assertTrue(books["ok"])

    @defer.inlineCallbacks
    def test_a_payout_paypal_refuses_is_an_error_and_the_money_is_back(self):
        self.fake.knobs["payout_refuse"] = "INSUFFICIENT_FUNDS"
        with self.assertRaises(commands.PayPalFailed) as e:
            yield self.payout(amount=20 * MICRO, email="sam@example.com")
        self.assertIn("PayPal refused the payout", str(e.exception))
        self.assertIn("the 20.00 USD is back in your earnings", str(e.exception))
        e = yield self.earnings()
        self.assertEqual((e["earnings"], e["payout"]), (30 * MICRO, 0))
        self.assertEqual(e["payouts"][0]["state"], "returned")

    @defer.inlineCallbacks
    def test_a_payout_whose_answer_is_lost_waits_for_the_operator(self):
        self.fake.knobs["payout_answer_status"] = 500
        answer = yield self.payout(amount=20 * MICRO, email="sam@example.com")
        self.assertEqual(answer["state"], "unknown")
        e = yield self.earnings()
        self.assertEqual((e["earnings"], e["payout"]), (10 * MICRO, 20 * MICRO))
        # Polling does not guess.
        yield self.pollOnce()
        e = yield self.earnings()
        self.assertEqual(e["payouts"][0]["state"], "unknown")
        # The operator looked at PayPal: it was paid.
        settled = yield self.store.run(payouts.settlePayout, answer["payout"], "sent",
                                       None, None, "the operator")
        self.assertTrue(settled)
        e = yield self.earnings()
        self.assertEqual((e["earnings"], e["payout"], e["payouts"][0]["state"]),
                         (10 * MICRO, 0, "sent"))

    @defer.inlineCallbacks
    def test_all_earnings_by_default_and_the_email_is_remembered(self):
        with self.assertRaises(commands.BadRequest) as e:
            yield self.payout()
        self.assertIn("give the email address of your PayPal account with --email", str(e.exception))
        answer = yield self.payout(email="sam@example.com", amount=10 * MICRO)
        answer = yield self.payout()
        self.assertEqual((answer["amount"], answer["email"]), (20 * MICRO, "sam@example.com"))
        e = yield self.earnings()
        self.assertEqual(e["earnings"], 0)

    @defer.inlineCallbacks
    def test_bad_payouts_are_refused_and_nothing_changes(self):
        before = yield self.earnings()
        for kw, problem in [
            ({"amount": 31 * MICRO}, "you asked for 31.00 USD but your earnings are 30.00 USD"),
            ({"amount": 4 * MICRO}, "below this market's payout minimum of 5.00 USD"),
            ({"amount": 10_001_000}, "10.001 has a fraction of a cent"),
            ({"amount": -5 * MICRO}, "must be positive"),
            ({"amount": 0}, "must be positive"),
            ({"amount": 10**15}, "more than one payout may be, 10000.00"),
            ({"amount": 10 * MICRO, "email": "not an address"}, "is not an email address"),
        ]:
            kw.setdefault("email", "sam@example.com")
            with self.assertRaises(commands.BadRequest) as e:
                yield self.payout(**kw)
            self.assertIn(problem, str(e.exception))
        after = yield self.earnings()
        self.assertEqual(after, before)
        self.assertIsNone(after["email"])   # a refused payout remembers nothing
        self.assertEqual(self.fake.payouts, {})

    @defer.inlineCallbacks
    def test_a_payout_survives_a_restart_of_the_market(self):
        self.fake.knobs["payout_polls"] = 0
        yield self.payout(amount=30 * MICRO, email="sam@example.com")
        yield self.money.stopService()
        restarted = MoneyDesk(reactor, self.store, RESTPayPal(
            reactor, "sandbox", self.fake.clientId, self.fake.secret,
            endpoint=self.fake.baseUrl), pollInterval=86400.0)
        restarted.startService()
        self.addCleanup(restarted.stopService)
        # Opening polls at once, as the server does at start.
        yield defer.ensureDeferred(restarted.open())
        yield restarted.payouts._polling
        e = yield self.earnings()
        self.assertEqual((e["payout"], e["payouts"][0]["state"]), (0, "sent"))


class OperatorTests(SellerCase):
    """cpushare-admin settling by hand what PayPal never told the market."""

    def admin(self, *args):
        import contextlib
        import io
        import os

        from cpushare.server import admin
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = admin.main(["--data", os.path.dirname(self.store.database.path), *args])
        return status, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_the_operator_returns_a_payout_whose_answer_was_lost(self):
        self.fake.knobs["payout_answer_status"] = 500
        answer = yield self.payout(amount=20 * MICRO, email="sam@example.com")
        status, out, _ = self.admin("payouts")
        self.assertEqual(status, 0)
        self.assertIn("unknown", out)
        status, out, _ = self.admin("payout-returned", str(answer["payout"]))
        self.assertEqual((status, out.strip()), (0, f"payout {answer['payout']} returned: "
                                                    "20.00 USD"))
        e = yield self.earnings()
        self.assertEqual((e["earnings"], e["payout"]), (30 * MICRO, 0))
        # Once settled, never again.
        status, _, err = self.admin("payout-sent", str(answer["payout"]))
        self.assertEqual(status, 1)
        self.assertIn("is returned already", err)
        status, out, _ = self.admin("books")
        self.assertEqual(status, 0)

    @defer.inlineCallbacks
    def test_the_operator_credits_a_payment_paypal_completed_late(self):
        added = yield self.addFunds("20.00")
        back = yield self.approve(added["approval_url"])
        self.fake.knobs["sale_state"] = "pending"
        yield self.get(back)
        before, _, _ = yield self.balances()
        status, _, err = self.admin("credit-payment", "PAY-NOSUCHPAYMENT")
        self.assertEqual(status, 1)
        self.assertIn("is unknown", err)
        status, out, _ = self.admin("credit-payment", added["payment"])
        self.assertEqual(status, 0, out)
        self.assertIn("19.00 USD to the funds of alice", out)
        after, _, _ = yield self.balances()
        self.assertEqual(after - before, 19 * MICRO)
        status, _, err = self.admin("credit-payment", added["payment"])
        self.assertEqual(status, 1)
        self.assertIn("is credited", err)
        after, _, _ = yield self.balances()
        self.assertEqual(after - before, 19 * MICRO)
        status, out, _ = self.admin("payments")
        self.assertEqual(status, 0)
        [line] = [x for x in out.splitlines() if added["payment"] in x]
        self.assertEqual(line.split()[2:6], ["alice", "20.00", "USD", "commission"])
        self.assertIn(" credited ", line)
