"""
The buyer's VMs, console, funds and statement pages
(cpushare/server/site/pages_vms.py) on the in-memory market: the owner
sees and changes its own, another account finds alice's VMs, orders and
leases as if they did not exist and changes nothing, nobody is sent to
log in, and bad form input is answered on the page.
"""

import csv
import io
import re

from twisted.internet import defer
from zope.interface import implementer

from cpushare.money import MICRO
from cpushare.protocol import commands
from cpushare.server.db.store import Account
from cpushare.server import admin
from cpushare.server.money.paypal import IPayPal

from test.sitebrowser import PUBLIC_URL, SiteCase
from test.unit.test_orders import OrderCase

PASSWORD = "correct horse battery"
APPROVAL = "https://paypal.example/approve?token=EC-1"


@implementer(IPayPal)
class CreatingPayPal:
    """Creates every payment asked for, at an approval page of its own."""

    def __init__(self, approval=APPROVAL):
        self.approval = approval
        self.asked = []

    def createPayment(self, amount, currency, returnUrl, cancelUrl, description):
        self.asked.append((amount, currency, returnUrl))
        return defer.succeed((f"PAY-{len(self.asked)}", self.approval))

    def start(self):
        pass

    def stop(self):
        pass


def rows(page, table):
    """The text of the rows of the table with id C{table} on C{page}, tags taken out."""
    body = re.search(rf'<table id="{table}".*?<tbody>(.*?)</tbody>', page.text, re.S)
    if body is None:
        return []
    return [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row)).strip()
            for row in re.findall(r"<tr.*?</tr>", body.group(1), re.S)]


class VMPagesTests(SiteCase, OrderCase):

    async def logIn(self, name, accountId):
        """A browser logged in as the account C{name} (registered by the test)."""
        await self.market.weblogins.setPassword(Account(accountId, name, "now"), PASSWORD)
        browser = self.browser()
        form = await browser.get("/login")
        page = await browser.post("/login", {"name": name, "password": PASSWORD,
                                             "csrf": form.csrf()})
        self.assertEqual(page.status, 303, page)
        return browser

    async def aliceBrowser(self):
        return await self.logIn("alice", self.aliceId)

    async def bobBrowser(self):
        bob = await self.register("bob")
        cli = await self.connect("cli", *bob)
        bobId = (await cli.control.callRemote(commands.WhoAmI))["account_id"]
        return await self.logIn("bob", bobId)

    async def running(self):
        """Alice's VM running on sam's seller, billed once: (seller, order, vm, lease)."""
        seller = await self.program("seller", self.sam)
        await self.call(seller, commands.Offer, cores=1, memory=1024, price=6_000_000)
        placed = await self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=1,
                                 cores=1, memory=256)
        [vm] = placed["vm_ids"]
        await self.within(seller.started.get())
        await self.call(seller, commands.VMState, vm=vm, state="running", cpu_seconds=600.0)
        seller.sendFrame(commands.consoleChannel(vm),
                         b"".join(b"boot line %d\r\n" % i for i in range(60)) + b"<b>login:</b>")
        await self.sleep(0.1)
        await self.store.run(lambda c: c.execute(
            "UPDATE leases SET started = started - 700, live_since = started - 700"))
        await self.market.billing.tick()
        [lease] = (await self.call(self.cli, commands.ListLeases))["leases"]
        return seller, placed["order"], vm, lease["lease"]

    async def credits(self, count):
        """Credit alice's funds C{count} times, 1.00 with the memo "=credit N" each."""
        def credit(cursor):
            for i in range(count):
                admin.credit(cursor, "alice", MICRO, f"=credit {i}")
        await self.store.run(credit)

    async def post(self, browser, path, fields=None, page="/vms"):
        """POST C{fields} to C{path} with the CSRF token of C{page}'s form."""
        form = await browser.get(page)
        return await browser.post(path, dict(fields or {}, csrf=form.csrf()))

    # -- nobody

    async def test_nobody_is_sent_to_log_in_and_changes_nothing(self):
        seller, order, vm, lease = await self.running()
        nobody = self.browser()
        for path in ["/vms", f"/vms/{vm}/console", "/funds", "/statement", "/statement.csv",
                     f"/orders/{order}/cancel"]:
            page = await nobody.get(path)
            self.assertEqual(page.status, 303, path)
            self.assertTrue(page.location.startswith("/login?next="), page.location)
        for path, fields in [(f"/vms/{vm}/stop", {}), (f"/orders/{order}/cancel", {}),
                             (f"/leases/{lease}/rate", {"good": "false"}),
                             ("/funds/add", {"amount": "20"})]:
            page = await self.post(nobody, path, fields, page="/login")
            self.assertEqual(page.status, 303, path)
            self.assertTrue(page.location.startswith("/login?next="), page.location)
        [listed] = (await self.call(self.cli, commands.ListVMs))["vms"]
        self.assertEqual(listed["state"], "running")
        [shown] = (await self.call(self.cli, commands.ListLeases))["leases"]
        self.assertIsNone(shown.get("rating"))

    # -- the owner

    async def test_the_owner_sees_its_vm_reads_its_console_and_stops_it(self):
        seller, order, vm, lease = await self.running()
        alice = await self.aliceBrowser()
        page = await alice.get("/vms")
        self.assertEqual(page.status, 200)
        [row] = rows(page, "vms")
        # 600 CPU seconds at 6.00 a core-hour: 1.00.
        self.assertEqual(row, f"{vm} {order} running sam 1 10 min 00 s 1.00 console Stop "
                              "Good Bad")
        self.assertIn('<script src="/static/vms.js" defer></script>', page.text)
        self.assertIn(f'href="/orders/{order}/cancel"', page.text)

        console = await alice.get(f"/vms/{vm}/console")
        self.assertEqual(console.status, 200)
        self.assertIn("boot line 59\n&lt;b&gt;login:&lt;/b&gt;", console.text)
        self.assertNotIn("boot line 19\n", console.text)      # the last 40 lines
        self.assertIn('<script src="/static/console.js" defer></script>', console.text)

        stopped = await self.post(alice, f"/vms/{vm}/stop")
        self.assertEqual((stopped.status, stopped.location), (303, f"/vms?done=stopped-{vm}"))
        page = await alice.get(stopped.location)
        self.assertIn(f"VM {vm} is stopping.", page.text)
        [row] = rows(page, "vms")
        self.assertTrue(row.startswith(f"{vm} {order} stopped "), row)
        self.assertIn("stopped by the buyer", row)
        self.assertNotIn("Stop", row)
        # Stopping it again is refused on the page, as the API refuses it.
        again = await self.post(alice, f"/vms/{vm}/stop")
        self.assertEqual(again.status, 404)
        self.assertIn(f"you have no running VM {vm}", again.text)
        # Its console is gone with it.
        gone = await alice.get(f"/vms/{vm}/console")
        self.assertEqual(gone.status, 404)
        self.assertIn(f"you have no VM {vm}", gone.text)

    async def test_a_lease_is_rated_once(self):
        seller, order, vm, lease = await self.running()
        alice = await self.aliceBrowser()
        rated = await self.post(alice, f"/leases/{lease}/rate", {"good": "true"})
        self.assertEqual((rated.status, rated.location), (303, f"/vms?done=rated-{lease}"))
        page = await alice.get(rated.location)
        self.assertIn(f"Lease {lease} is rated: thank you.", page.text)
        self.assertIn("rated good", rows(page, "vms")[0])
        self.assertNotIn(f"/leases/{lease}/rate", page.text)
        # A second vote, forged without the page's button, is refused on the page.
        twice = await self.post(alice, f"/leases/{lease}/rate", {"good": "false"})
        self.assertEqual(twice.status, 403)
        self.assertIn(f"lease {lease} was already rated good", twice.shown)
        [shown] = (await self.call(self.cli, commands.ListLeases))["leases"]
        self.assertEqual(shown["rating"], "good")
        # A vote that is neither good nor bad, or none: named.
        for fields, problem in [({"good": "maybe"}, "good must be true or false, not 'maybe'"),
                                ({}, "good is missing")]:
            page = await self.post(alice, f"/leases/{lease}/rate", fields)
            self.assertEqual(page.status, 400)
            self.assertIn(problem, page.shown)

    async def test_an_order_is_cancelled_after_a_confirmation(self):
        seller, order, vm, lease = await self.running()
        alice = await self.aliceBrowser()
        ask = await alice.get(f"/orders/{order}/cancel")
        self.assertEqual(ask.status, 200)
        self.assertIn(f'action="/orders/{order}/cancel"', ask.text)
        # Asking changed nothing.
        [listed] = (await self.call(self.cli, commands.ListVMs))["vms"]
        self.assertEqual(listed["state"], "running")
        done = await alice.post(f"/orders/{order}/cancel", {"csrf": ask.csrf()})
        self.assertEqual((done.status, done.location), (303, f"/vms?done=cancelled-{order}"))
        page = await alice.get(done.location)
        self.assertIn(f"Order {order} is cancelled: its VMs stop.", page.text)
        self.assertIn("the order was cancelled", rows(page, "vms")[0])
        self.assertNotIn(f"/orders/{order}/cancel", page.text)

    async def test_bad_ids_and_cursors_are_answered_on_the_page(self):
        alice = await self.aliceBrowser()
        for path, status, problem in [
                ("/vms?before=x", 400, "before must be a whole number, not 'x'"),
                ("/vms?before=0", 400, "before must be a whole number from 1"),
                ("/vms/99999999999999999999999/console", 400, "vm must be a whole number"),
                ("/orders/99999999999999999999999/cancel", 404, "you have no order"),
                ("/statement?before=-1", 400, "before must be a positive entry number"),
                ("/vms/-1/console", 404, "There is no such page")]:
            page = await alice.get(path)
            self.assertEqual(page.status, status, path)
            self.assertIn(problem, page.shown, path)
            self.assertNotIn("Traceback", page.text)

    # -- another account

    async def test_another_account_finds_nothing_of_alices_and_changes_nothing(self):
        seller, order, vm, lease = await self.running()
        bob = await self.bobBrowser()
        page = await bob.get("/vms")
        self.assertEqual(rows(page, "vms"), [])
        self.assertNotIn(">sam<", page.text)
        for path, status, problem in [
                (f"/vms/{vm}/console", 404, f"you have no VM {vm}"),
                (f"/orders/{order}/cancel", 404, f"you have no order {order}")]:
            page = await bob.get(path)
            self.assertEqual(page.status, status, path)
            self.assertIn(problem, page.shown)
            self.assertNotIn("boot line", page.text)
        for path, fields, status, problem in [
                (f"/vms/{vm}/stop", {}, 404, f"you have no running VM {vm}"),
                (f"/orders/{order}/cancel", {}, 400, f"you have no order {order}"),
                (f"/leases/{lease}/rate", {"good": "false"}, 400, f"you have no lease {lease}")]:
            page = await self.post(bob, path, fields)
            self.assertEqual(page.status, status, path)
            self.assertIn(problem, page.shown)
        # Alice's VM runs on, unrated; bob's statement and CSV are his own (empty).
        [listed] = (await self.call(self.cli, commands.ListVMs))["vms"]
        self.assertEqual(listed["state"], "running")
        [shown] = (await self.call(self.cli, commands.ListLeases))["leases"]
        self.assertIsNone(shown.get("rating"))
        self.assertEqual(rows(await bob.get("/statement"), "statement"), [])
        # The CSV takes no argument naming an account: a query is ignored.
        download = await bob.get(f"/statement.csv?account={self.aliceId}&name=alice")
        self.assertEqual(len(list(csv.reader(io.StringIO(download.text)))), 1)

    # -- money

    async def test_funds_show_the_balances_and_add_funds_goes_to_paypal(self):
        paypal = CreatingPayPal()
        self.market.money.funds.paypal = paypal
        self.market.money.paypal = paypal
        self.market.money.funds.publicUrl = PUBLIC_URL
        alice = await self.aliceBrowser()
        page = await alice.get("/funds")
        self.assertEqual(page.status, 200)
        self.assertIn('<td class="number" id="funds">100.00 USD</td>', page.text)
        added = await self.post(alice, "/funds/add", {"amount": "20.50"}, page="/funds")
        self.assertEqual(added.status, 200)
        self.assertIn(f'<meta http-equiv="refresh" content="0; url={APPROVAL}">', added.shown)
        self.assertIn(f'href="{APPROVAL}"', added.shown)
        self.assertEqual(paypal.asked[0][:2], (20_500_000, "USD"))
        self.assertTrue(paypal.asked[0][2].startswith(PUBLIC_URL + "/paypal/return?n="))
        # The payment waits at PayPal, on the funds page.
        page = await alice.get("/funds")
        self.assertEqual(rows(page, "pending")[0].split()[0], "PAY-1")
        self.assertIn("20.50 USD", rows(page, "pending")[0])

    async def test_absurd_amounts_are_refused_on_the_funds_page(self):
        paypal = CreatingPayPal()
        self.market.money.funds.paypal = self.market.money.paypal = paypal
        self.market.money.funds.publicUrl = PUBLIC_URL
        alice = await self.aliceBrowser()
        for amount, problem in [
                ("-5", "'-5' is not an amount"),
                ("0", "'0' is zero"),
                ("1e9", "'1e9' is not an amount"),
                ("9999999999", "is more than the largest amount allowed"),
                ("20.001", "has a fraction of a cent"),
                ("<script>", "'<script>' is not an amount"),
                ("9" * 5000, "an amount has at most 40 characters"),
                ("", "'' is not an amount")]:
            page = await self.post(alice, "/funds/add", {"amount": amount}, page="/funds")
            self.assertEqual(page.status, 400, amount)
            self.assertIn(problem, page.shown, amount)
            self.assertNotIn("<script>", page.text)
            self.assertNotIn("Traceback", page.text)
        self.assertEqual(paypal.asked, [])
        # An approval address that is not a web page is not followed.
        paypal.approval = "javascript:alert(1)"
        page = await self.post(alice, "/funds/add", {"amount": "5"}, page="/funds")
        self.assertEqual(page.status, 502)
        self.assertNotIn("javascript:", page.text)

    async def test_a_market_without_paypal_says_so(self):
        alice = await self.aliceBrowser()
        page = await alice.get("/funds")
        self.assertIn("This market takes no payments.", page.text)
        self.assertNotIn('action="/funds/add"', page.text)
        forged = await self.post(alice, "/funds/add", {"amount": "5"}, page="/funds")
        self.assertEqual(forged.status, 409)
        self.assertIn("no payments", forged.text)

    async def test_the_statement_pages_its_entries_charts_spending_and_downloads_csv(self):
        seller, order, vm, lease = await self.running()
        # Many small credits, so the statement has pages.
        await self.credits(250)
        alice = await self.aliceBrowser()
        page = await alice.get("/statement")
        self.assertEqual(page.status, 200)
        first = rows(page, "statement")
        self.assertEqual(len(first), commands.STATEMENT_PAGE)
        self.assertIn("=credit 249", first[0])
        self.assertIn("<svg", page.text)
        self.assertIn("What your VMs cost a day", page.text)
        older = re.search(r'href="(/statement\?before=[0-9]+)"', page.text).group(1)
        second = rows(await alice.get(older), "statement")
        self.assertTrue(second)
        self.assertFalse(set(first) & set(second))
        self.assertTrue(any("charge" in row for row in first + second), first + second)

        download = await alice.get("/statement.csv")
        self.assertEqual(download.status, 200)
        self.assertEqual(download.headers["content-type"], "text/csv; charset=utf-8")
        self.assertEqual(download.headers["content-disposition"],
                         'attachment; filename="cpushare-statement.csv"')
        table = list(csv.reader(io.StringIO(download.text)))
        self.assertEqual(table[0][:2], ["date", "kind"])
        self.assertEqual(len(table), 1 + len(first) + len(second))
        # A memo a spreadsheet would run is quoted.
        self.assertEqual(table[1][3], "'=credit 249")

    async def test_the_csv_says_when_it_holds_only_the_newest_entries(self):
        await self.credits(5)
        original = self.market.money.statements.csvStatement
        self.patch(self.market.money.statements, "csvStatement",
                   lambda account, currency: original(account, currency, limit=3))
        alice = await self.aliceBrowser()
        table = list(csv.reader(io.StringIO((await alice.get("/statement.csv")).text)))
        self.assertEqual(len(table), 1 + 3 + 1)
        self.assertEqual(table[3][3], "'=credit 2")
        self.assertEqual(table[-1][1:4], [
            "note", "", "only the newest 3 entries are in this file; the statement pages go "
            "back further"])

    async def test_the_scripts_are_served_and_put_in_text_never_html(self):
        # A seller's name or a console line is a hostile peer's text: the
        # scripts that refresh the pages set it as text only.
        for name, asks in [("vms.js", "/api/vms"), ("console.js", "/api/console?vm=")]:
            page = await self.browser().get(f"/static/{name}")
            self.assertEqual(page.status, 200)
            self.assertEqual(page.headers["content-type"], "text/javascript; charset=utf-8")
            self.assertIn(asks, page.text)
            self.assertIn("textContent", page.text)
            for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                           "eval("):
                self.assertNotIn(unsafe, page.text, name)
