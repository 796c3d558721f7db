"""
The seller's page (/seller), the operator's page (/admin) and the JSON
API's routes (/api/NAME) on the market in memory: each as its owner, as
another account and as nobody, and the abuse of their forms and calls.
"""

import json


from cpushare.money import formatAmount
from cpushare.protocol import commands
from cpushare.server.db import store, websql
from cpushare.server.db.store import Account
from cpushare.server.site import api, apiroutes

from test.sitebrowser import SiteCase
from test.unit.test_orders import OrderCase

PASSWORD = "correct horse battery"


class SiteOrderCase(SiteCase, OrderCase):
    """
    The web site of a market with alice (a buyer with an image) and sam (a
    seller's account); C{self.browserOf(name)} logs a browser in as one.
    """

    async def accountNamed(self, name):
        def find(cursor):
            cursor.execute("SELECT id, created FROM accounts WHERE name = ?", (name,))
            return cursor.fetchone()
        accountId, created = await self.store.run(find)
        return Account(accountId, name, created)

    async def browserOf(self, name, admin=False):
        """A browser logged in as the account C{name} (made now if there is none)."""
        try:
            account = await self.accountNamed(name)
        except TypeError:
            return await self.loggedIn(name, admin=admin)
        await self.market.weblogins.setPassword(account, PASSWORD)
        if admin:
            await self.store.run(websql.setWebAdmin, name, True)
        browser = self.browser()
        form = await browser.get("/login")
        page = await browser.post("/login", {"name": name, "password": PASSWORD,
                                             "csrf": form.csrf()})
        self.assertEqual(page.status, 303, page)
        return browser

    async def aliceOnSam(self, price=6_000_000):
        """
        sam's seller offers a core at C{price}; one VM of alice's runs on it
        for ten minutes and is billed; alice rates its lease good.
        Returns (order, vm, lease).
        """
        seller = await self.program("seller", self.sam)
        await self.call(seller, commands.Offer, cores=1, memory=1024, price=price,
                        net_fee=2_000, country="IT")
        alice = await self.accountNamed("alice")
        placed = await api.call(self.market, alice, "place_order", {
            "image": self.sha, "vms": 1, "cores": 1, "memory": 256})
        [vm] = placed["vm_ids"]
        await self.within(seller.started.get())
        await self.call(seller, commands.VMState, vm=vm, state="running", cpu_seconds=600.0)
        await self.store.run(lambda c: c.execute(
            "UPDATE leases SET started = started - 700, live_since = started - 700"))
        await self.market.billing.tick()
        [lease] = (await api.call(self.market, alice, "leases"))["leases"]
        await api.call(self.market, alice, "rate", {
            "lease": lease["lease"], "good": True, "comment": "fast and <b>steady</b>"})
        self.seller = seller
        return placed["order"], vm, lease["lease"]

    async def csrfOf(self, browser):
        """The CSRF token of the browser's session, as a page's script reads it."""
        return (await browser.get("/logout")).csrf()

    async def callAPI(self, browser, name, arguments=None, token=None, body=None):
        """POST /api/NAME with a JSON body and the session's token (unless C{token} is given)."""
        token = await self.csrfOf(browser) if token is None else token
        body = json.dumps(arguments or {}).encode() if body is None else body
        return await browser.request("POST", f"/api/{name}", body, {
            "Content-Type": "application/json", "X-CSRF-Token": token})


class SellerPageTests(SiteOrderCase):

    async def test_the_seller_sees_its_earnings_leases_rating_terms_and_charts(self):
        order, vm, lease = await self.aliceOnSam()
        sam = await self.browserOf("sam")
        page = await sam.get("/seller")
        self.assertEqual(page.status, 200, page)
        shown = page.shown
        self.assertIn('value="6.00"', page.text)            # the price, in the form
        self.assertIn('value="IT"', page.text)
        self.assertIn(f"<tr><td>{lease}</td><td>{vm}</td>", page.text)
        self.assertIn("fast and <b>steady</b>", shown)       # the comment, escaped
        self.assertNotIn("<b>steady</b>", page.text)
        self.assertEqual(page.text.count("<svg"), 2)
        self.assertIn("Earnings a day", shown)
        self.assertIn("Prices of the sellers online", shown)
        earned = (await api.call(self.market, await self.accountNamed("sam"),
                                 "earnings"))["earnings"]
        self.assertGreater(earned, 0)
        self.assertIn(f'<dd id="earned">{formatAmount(earned)} USD</dd>', page.text)
        self.assertIn('<dd id="validated">0</dd>', page.text)
        self.assertIn("none checked yet", page.text)
        self.assertIn("This market makes no payouts", page.text)

        # Another account sees its own, empty, selling page; nobody is sent to log in.
        bob = await self.browserOf("bob")
        page = await bob.get("/seller")
        self.assertEqual(page.status, 200)
        self.assertNotIn("steady", page.text)
        self.assertNotIn("lease-list", page.text)
        self.assertIn("No VM has run on your machines yet", page.text)
        page = await self.browser().get("/seller")
        self.assertEqual((page.status, page.location), (303, "/login?next=%2Fseller"))
        page = await self.browser().post("/seller/terms", {"price": "1"})
        self.assertEqual(page.status, 403)

    async def test_a_bad_lease_cursor_is_a_message_on_the_page(self):
        sam = await self.browserOf("sam")
        for cursor in ("-1", "x" * 5000, "1.5"):
            page = await sam.get(f"/seller?before={cursor}")
            self.assertEqual(page.status, 400, cursor)
            self.assertIn('<p class="problem" id="message">before must be', page.text)
            self.assertNotIn("Traceback", page.text)
        # What the address says was done is said only of a payout's number.
        for query in ("payout=%C2%B2", "payout=%3Cb%3E", "payout=" + "9" * 40, "terms=x"):
            page = await sam.get(f"/seller?{query}")
            self.assertEqual(page.status, 200, query)
            self.assertNotIn('id="done"', page.text, query)

    async def test_the_terms_form_changes_the_terms_as_set_terms(self):
        sam = await self.browserOf("sam")
        token = await self.csrfOf(sam)
        page = await sam.post("/seller/terms", {"price": "7.5", "net_fee": "0.01",
                                                "country": "fr", "csrf": token})
        self.assertEqual((page.status, page.location), (303, "/seller?terms=changed"))
        account = await self.accountNamed("sam")
        self.assertEqual(await api.call(self.market, account, "terms"),
                         {"price": 7_500_000, "net_fee": 10_000, "country": "FR"})
        page = await sam.get(page.location)
        self.assertIn("Your terms are changed", page.text)
        self.assertIn('value="7.50"', page.text)

        refused = [
            ({"price": "-1"}, "price: '-1' is not an amount"),
            ({"price": "1e3"}, "price: '1e3' is not an amount"),
            ({"price": "0"}, "the price must be above 0"),
            ({"price": "5000"}, "the price must be above 0 and at most 1000.00"),
            ({"net_fee": "2"}, "above this market's ceiling"),
            ({"country": "Atlantis"}, "country"),
            ({"price": "1." + "0" * 7}, "is not an amount"),
        ]
        for fields, message in refused:
            page = await sam.post("/seller/terms", dict(fields, csrf=token))
            self.assertEqual(page.status, 400, (fields, page))
            problem = page.shown.split('id="message">')[1].split("</p>")[0]
            self.assertIn(message, problem, fields)
            # The form comes back as it was sent.
            for name, value in fields.items():
                self.assertIn(f'name="{name}" type="text" inputmode="decimal" maxlength="20" '
                              f'value="{value}"' if name != "country" else f'value="{value}"',
                              page.text)
        self.assertEqual((await api.call(self.market, account, "terms"))["price"], 7_500_000)

        # Without the session's token nothing changes.
        page = await sam.post("/seller/terms", {"price": "1"})
        self.assertEqual(page.status, 403)
        page = await sam.post("/seller/terms", {"price": "1", "csrf": "x" * 43})
        self.assertEqual(page.status, 403)
        self.assertEqual((await api.call(self.market, account, "terms"))["price"], 7_500_000)

    async def test_a_payout_is_refused_with_the_commands_message(self):
        await self.aliceOnSam()
        sam = await self.browserOf("sam")
        token = await self.csrfOf(sam)
        page = await sam.post("/seller/payout", {"amount": "abc", "email": "s@example.com",
                                                 "csrf": token})
        self.assertEqual(page.status, 400)
        self.assertIn("amount: &#39;abc&#39; is not an amount", page.text)
        # No form to send again: this market makes no payouts, and says so.
        self.assertNotIn('action="/seller/payout"', page.text)
        self.assertIn("This market makes no payouts", page.text)
        # This market has no PayPal account: the command's refusal, on the page.
        page = await sam.post("/seller/payout", {"amount": "", "email": "s@example.com",
                                                 "csrf": token})
        self.assertEqual(page.status, 409, page)
        with self.assertRaises(commands.NoPayments) as e:
            await api.call(self.market, await self.accountNamed("sam"), "payout",
                           {"email": "s@example.com"})
        self.assertIn(str(e.exception).replace("'", "&#39;"), page.text)
        self.assertEqual(page.text.count('id="message"'), 1)


class AdminPageTests(SiteOrderCase):

    async def test_the_operator_sees_accounts_books_payouts_and_health(self):
        await self.aliceOnSam()
        root = await self.browserOf("root", admin=True)
        page = await root.get("/admin")
        self.assertEqual(page.status, 200, page)
        for name in ("alice", "sam", "root"):
            self.assertIn(f"<td>{name}</td>", page.text)
        self.assertIn("The books balance", page.text)
        self.assertIn('<dd id="sellers-online">1</dd>', page.text)
        self.assertIn('<dd id="cores-offered">1</dd>', page.text)
        self.assertIn('<dd id="cores-used">1</dd>', page.text)
        self.assertIn('<dd id="vms">running 1</dd>', page.text)
        self.assertIn("None: every payout is settled", page.text)

        # A buyer gets 403, nobody is sent to log in.
        alice = await self.browserOf("alice")
        self.assertEqual((await alice.get("/admin")).status, 403)
        token = await self.csrfOf(alice)
        page = await alice.post("/admin/suspend", {"name": "sam", "confirm": "yes",
                                                   "csrf": token})
        self.assertEqual(page.status, 403)
        page = await self.browser().get("/admin")
        self.assertEqual((page.status, page.location), (303, "/login?next=%2Fadmin"))
        rows = await self.store.run(store.listAccounts)
        self.assertFalse(any(r["suspended"] for r in rows))

    async def test_suspending_asks_to_confirm_then_suspends_as_cpushare_admin(self):
        root = await self.browserOf("root", admin=True)
        token = await self.csrfOf(root)
        page = await root.post("/admin/suspend", {"name": "sam", "reason": "<i>fraud</i>",
                                                  "csrf": token})
        self.assertEqual(page.status, 200)
        self.assertIn("Suspend the account <strong>sam</strong>?", page.text)
        self.assertIn("Reason: &lt;i&gt;fraud&lt;/i&gt;", page.text)
        self.assertIn('name="confirm" value="yes"', page.text)
        rows = {r["name"]: r for r in await self.store.run(store.listAccounts)}
        self.assertIsNone(rows["sam"]["suspended"])

        page = await root.post("/admin/suspend", {"name": "sam", "reason": "<i>fraud</i>",
                                                  "confirm": "yes", "csrf": token})
        self.assertEqual((page.status, page.location), (303, "/admin?suspended=sam"))
        rows = {r["name"]: r for r in await self.store.run(store.listAccounts)}
        self.assertIsNotNone(rows["sam"]["suspended"])
        page = await root.get(page.location)
        self.assertIn("sam is suspended", page.text)
        self.assertIn('action="/admin/unsuspend"', page.text)

        for fields, status, message in [
            ({"name": "root"}, 400, "an operator cannot suspend its own account"),
            ({"name": "nobody"}, 400, "no active, unsuspended account named &#39;nobody&#39;"),
            ({"name": "sam"}, 400, "no active, unsuspended account named &#39;sam&#39;"),
            ({"name": "alice", "reason": "x" * 201}, 400, "reason must be at most 200"),
            ({}, 400, "name is missing"),
        ]:
            page = await root.post("/admin/suspend", dict(fields, confirm="yes", csrf=token))
            self.assertEqual(page.status, status, (fields, page))
            self.assertIn(message, page.text, fields)
        page = await root.post("/admin/explode", {"name": "sam", "csrf": token})
        self.assertEqual(page.status, 404)

        page = await root.post("/admin/unsuspend", {"name": "sam", "csrf": token})
        self.assertIn("Unsuspend the account <strong>sam</strong>?", page.text)
        page = await root.post("/admin/unsuspend", {"name": "sam", "confirm": "yes",
                                                    "csrf": token})
        self.assertEqual(page.location, "/admin?unsuspended=sam")
        rows = {r["name"]: r for r in await self.store.run(store.listAccounts)}
        self.assertIsNone(rows["sam"]["suspended"])
        # Without the token, nothing.
        page = await root.post("/admin/suspend", {"name": "sam", "confirm": "yes"})
        self.assertEqual(page.status, 403)
        rows = {r["name"]: r for r in await self.store.run(store.listAccounts)}
        self.assertIsNone(rows["sam"]["suspended"])

    async def test_the_accounts_come_a_page_at_a_time(self):
        self.patch(api, "ACCOUNTS_PAGE", 2)
        root = await self.browserOf("root", admin=True)
        page = await root.get("/admin")
        self.assertIn("<td>alice</td>", page.text)
        self.assertIn("<td>sam</td>", page.text)
        self.assertNotIn("<td>root</td>", page.text)
        sam = await self.accountNamed("sam")
        self.assertIn(f'href="/admin?after={sam.id}#accounts"', page.text)
        page = await root.get(f"/admin?after={sam.id}")
        self.assertIn("<td>root</td>", page.text)
        self.assertNotIn("<td>alice</td>", page.text)
        page = await root.get("/admin?after=-5")
        self.assertEqual(page.status, 400)
        self.assertIn("after must be a whole number", page.text)


class APIRouteTests(SiteOrderCase):

    async def test_reads_are_gets_and_answer_as_the_functions(self):
        order, vm, lease = await self.aliceOnSam()
        alice = await self.browserOf("alice")
        page = await alice.get("/api/vms")
        self.assertEqual((page.status, page.headers["content-type"]),
                         (200, "application/json"), page)
        account = await self.accountNamed("alice")
        self.assertEqual(json.loads(page.text), await api.call(self.market, account, "vms"))
        page = await alice.get(f"/api/console?vm={vm}&lines=3")
        self.assertEqual(json.loads(page.text)["vm"], vm)
        # Bad arguments are refused by name; another's VM as one that does not exist.
        page = await alice.get("/api/vms?before=-1")
        self.assertEqual(page.status, 400)
        self.assertIn("before must be a whole number", json.loads(page.text)["error"])
        page = await alice.get("/api/vms?bogus=1")
        self.assertIn("unknown argument 'bogus'", json.loads(page.text)["error"])
        bob = await self.browserOf("bob")
        page = await bob.get(f"/api/console?vm={vm}")
        self.assertEqual((page.status, json.loads(page.text)),
                         (404, {"error": f"you have no VM {vm}"}))
        page = await self.callAPI(bob, "stop_vm", {"vm": vm})
        self.assertEqual(page.status, 404)
        page = await bob.get("/api/no_such_thing")
        self.assertEqual((page.status, json.loads(page.text)),
                         (404, {"error": "there is no API function 'no_such_thing'"}))

    async def test_nobody_gets_401_and_a_buyer_403_on_the_operators(self):
        alice = await self.browserOf("alice")
        root = await self.browserOf("root", admin=True)
        for name, function in sorted(api.FUNCTIONS.items()):
            if function.post:
                page = await self.browser().request("POST", f"/api/{name}", b"{}", {
                    "Content-Type": "application/json", "X-CSRF-Token": "x"})
                self.assertEqual(page.status, 403, name)   # no session: no token matches
            else:
                page = await self.browser().get(f"/api/{name}")
                self.assertEqual((page.status, json.loads(page.text)),
                                 (401, {"error": "log in first"}), name)
            if function.admin and not function.post:
                page = await alice.get(f"/api/{name}")
                self.assertEqual((page.status, json.loads(page.text)), (403, {
                    "error": "only the market's operators may do that"}), name)
                page = await root.get(f"/api/{name}")
                self.assertEqual(page.status, 200, (name, page))
        page = await self.callAPI(alice, "admin_suspend", {"name": "sam"})
        self.assertEqual(page.status, 403)
        page = await self.callAPI(root, "admin_suspend", {"name": "sam", "reason": "test"})
        self.assertEqual((page.status, json.loads(page.text)), (200, {"suspended": "sam"}))

    async def test_changes_are_posts_with_the_sessions_token_in_a_header(self):
        sam = await self.browserOf("sam")
        account = await self.accountNamed("sam")
        page = await self.callAPI(sam, "set_terms", {"price": 3_000_000})
        self.assertEqual((page.status, json.loads(page.text)["price"]), (200, 3_000_000))
        self.assertEqual((await api.call(self.market, account, "terms"))["price"], 3_000_000)
        # Without the header, with a wrong one, or with the token as a form field: 403.
        for token in ("", "x" * 43):
            page = await self.callAPI(sam, "set_terms", {"price": 1}, token=token)
            self.assertEqual(page.status, 403, token)
            self.assertIn("error", json.loads(page.text))
        page = await sam.post("/api/set_terms", {"price": "1", "csrf": await self.csrfOf(sam)})
        self.assertEqual(page.status, 403)
        self.assertEqual((await api.call(self.market, account, "terms"))["price"], 3_000_000)
        # A change is never a GET, a read never a POST.
        page = await sam.get("/api/set_terms?price=1")
        self.assertEqual((page.status, page.headers["allow"]), (405, "POST"))
        page = await self.callAPI(sam, "terms")
        self.assertEqual((page.status, page.headers["allow"]), (405, "GET"))
        self.assertEqual((await api.call(self.market, account, "terms"))["price"], 3_000_000)

    async def test_bad_bodies_are_refused_with_a_message(self):
        sam = await self.browserOf("sam")
        cases = [
            (b"{", 400, "the body is not a JSON object in UTF-8"),
            (b"\xff\xfe", 400, "the body is not a JSON object in UTF-8"),
            (b"[1, 2]", 400, "the arguments must be a JSON object"),
            (b"[" * 50_000 + b"]" * 10_000, 400, "the body is not a JSON object"),
            (b'{"price": "' + b"9" * (apiroutes.MAX_BODY + 10) + b'"}', 413,
             f"at most {apiroutes.MAX_BODY} bytes"),
            (b'{"price": 1.5}', 400, "price must be a whole number"),
            (b'{"price": -1}', 400, "the price must be above 0"),
            (b'{"nope": 1}', 400, "unknown argument 'nope'"),
        ]
        for body, status, message in cases:
            page = await self.callAPI(sam, "set_terms", body=body)
            self.assertEqual(page.status, status, (body[:20], page))
            self.assertIn(message, json.loads(page.text)["error"], body[:20])
            self.assertNotIn("Traceback", page.text)
        token = await self.csrfOf(sam)
        page = await sam.request("POST", "/api/set_terms", b"price=1", {
            "Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": token})
        self.assertEqual(page.status, 400)
        self.assertIn("Content-Type: application/json", json.loads(page.text)["error"])

    async def test_a_failure_is_a_500_without_its_words_and_logged(self):
        sam = await self.browserOf("sam")

        async def broken(accountId):
            raise RuntimeError("/srv/cpushare/secret")
        self.patch(self.market.board, "termsOf", broken)
        page = await sam.get("/api/terms")
        self.assertEqual((page.status, json.loads(page.text)), (500, {
            "error": "the market could not answer; the error was logged"}))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
