"""
The web site's JSON API (cpushare/server/site/api.py) on the market in
memory: nobody and other accounts are refused as if what they ask for did
not exist, absurd arguments are refused by name, and each function answers
what the control command of the same purpose answers for the same data.
"""

import json

import attr
from twisted.internet import defer

from cpushare.money import MICRO
from cpushare.protocol import commands
from cpushare.protocol.commands import BadRequest, NoSuchVM, NotAuthenticated, NotPermitted
from cpushare.server.db import store
from cpushare.server.db.store import Account
from cpushare.server.market.screens import rating
from cpushare.server.site import api

from test.unit.test_orders import OrderCase
from test.unit.test_ratings import _lease


@attr.s(frozen=True)
class Operator:
    """An account record that says it is an operator's, as the site's login gives it."""

    id = attr.ib()
    name = attr.ib()
    created = attr.ib(default=0.0)
    admin = attr.ib(default=True)


def present(value):
    """An answer without the keys whose value is None (AMP answers absent optionals so)."""
    if isinstance(value, dict):
        return {k: present(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [present(v) for v in value]
    return value


class APITests(OrderCase):

    @defer.inlineCallbacks
    def setUp(self):
        yield OrderCase.setUp(self)
        self.bob = yield self.register("bob")
        self.bobCli = yield self.connect("cli", *self.bob)
        self.samCli = yield self.connect("cli", *self.sam)
        self.aliceAccount = yield self.accountOf(self.cli)
        self.bobAccount = yield self.accountOf(self.bobCli)
        self.samAccount = yield self.accountOf(self.samCli)

    @defer.inlineCallbacks
    def accountOf(self, cli):
        """The account record of C{cli}'s account, as the site's login would give it."""
        who = yield self.call(cli, commands.WhoAmI)
        return Account(who["account_id"], who["name"], who["created"])

    @defer.inlineCallbacks
    def api(self, name, account, /, **arguments):
        """The answer of API function C{name}, checked to survive JSON unchanged."""
        answer = yield api.call(self.market, account, name, arguments)
        self.assertEqual(json.loads(json.dumps(answer)), answer)
        return answer

    @defer.inlineCallbacks
    def refused(self, error, name, account, /, **arguments):
        """The message API function C{name} refuses the call with, as C{error}."""
        with self.assertRaises(error) as e:
            yield api.call(self.market, account, name, arguments)
        return str(e.exception)

    @defer.inlineCallbacks
    def running(self, seller):
        """One VM of alice's placed on C{seller} (a program offering room), running."""
        placed = yield self.api("place_order", self.aliceAccount, image=self.sha, vms=1,
                                cores=1, memory=256)
        [vm] = placed["vm_ids"]
        yield self.within(seller.started.get())
        yield self.call(seller, commands.VMState, vm=vm, state="running", cpu_seconds=1.0)
        return placed["order"], vm

    # -- nobody, and other accounts

    @defer.inlineCallbacks
    def test_nobody_is_refused_by_every_function_and_a_buyer_by_the_operators(self):
        self.assertGreaterEqual(len(api.FUNCTIONS), 20)
        for name, function in sorted(api.FUNCTIONS.items()):
            message = yield self.refused(NotAuthenticated, name, None)
            self.assertEqual(message, "log in first")
            if function.admin:
                message = yield self.refused(NotPermitted, name, self.aliceAccount)
                self.assertEqual(message, "only the market's operators may do that")
        message = yield self.refused(BadRequest, "no_such_thing", self.aliceAccount)
        self.assertEqual(message, "there is no API function 'no_such_thing'")
        self.assertEqual(api.statusOf(api.NoSuchFunction("x")), 404)
        self.assertEqual(api.statusOf(NoSuchVM("x")), 404)
        self.assertEqual(api.statusOf(BadRequest("x")), 400)
        self.assertEqual(api.refusal(NoSuchVM("you have no VM 3")),
                         (404, {"error": "you have no VM 3"}))
        # A bug's words are not shown: they are for the log.
        self.assertEqual(api.refusal(ValueError("/srv/cpushare/secret")),
                         (500, {"error": "the market could not answer; the error was logged"}))

    @defer.inlineCallbacks
    def test_another_accounts_vms_orders_leases_and_images_are_as_if_they_did_not_exist(self):
        seller = yield self.program("seller", self.sam)
        yield self.offer(seller, 2, 2048)
        order, vm = yield self.running(seller)
        [lease] = (yield self.api("leases", self.aliceAccount))["leases"]
        bob = self.bobAccount
        # VMs: the same message as for a VM nobody has.
        for name in ("console", "stop_vm"):
            theirs = yield self.refused(NoSuchVM, name, bob, vm=vm)
            none = yield self.refused(NoSuchVM, name, bob, vm=vm + 1000)
            self.assertEqual(theirs.replace(str(vm), "N"), none.replace(str(vm + 1000), "N"))
        # Orders, leases, images.
        for name, key, theirs, none in (("cancel_order", "order", order, order + 1000),
                                        ("delete_image", "sha256", self.sha, "f" * 64)):
            a = yield self.refused(BadRequest, name, bob, **{key: theirs})
            b = yield self.refused(BadRequest, name, bob, **{key: none})
            self.assertEqual(a.replace(str(theirs), "N"), b.replace(str(none), "N"))
        a = yield self.refused(BadRequest, "rate", bob, lease=lease["lease"], good=False)
        b = yield self.refused(BadRequest, "rate", bob, lease=lease["lease"] + 1000, good=False)
        self.assertEqual(a.replace(str(lease["lease"]), "N"),
                         b.replace(str(lease["lease"] + 1000), "N"))
        # Bob's lists hold nothing of alice's, whatever cursor he gives.
        for name in ("vms", "leases", "seller_leases", "images"):
            answer = yield self.api(name, bob)
            self.assertEqual(answer[name if name != "seller_leases" else "leases"], [])
        self.assertEqual((yield self.api("vms", bob, before=vm + 1))["vms"], [])
        self.assertEqual((yield self.api("statement", bob))["entries"], [])
        self.assertEqual((yield self.api("balance", bob))["funds"], 0)
        # Nothing of alice's changed: her VM still runs and her image is hers.
        self.assertEqual((yield self.api("vms", self.aliceAccount))["vms"][0]["state"], "running")
        self.assertEqual(len((yield self.api("images", self.aliceAccount))["images"]), 1)
        # The buyer does not see the leases on sam's machines, nor sam alice's VMs.
        self.assertEqual((yield self.api("seller_leases", self.aliceAccount))["leases"], [])
        self.assertEqual((yield self.api("vms", self.samAccount))["vms"], [])
        # Sam sees the lease on his machine, without alice's name or order.
        [seen] = (yield self.api("seller_leases", self.samAccount))["leases"]
        self.assertEqual((seen["lease"], seen["vm"]), (lease["lease"], vm))
        self.assertNotIn("alice", json.dumps(seen))
        self.assertNotIn("order", seen)

    # -- bad arguments

    @defer.inlineCallbacks
    def test_absurd_arguments_are_refused_naming_them(self):
        alice = self.aliceAccount
        cases = [
            ("sellers", {"offset": -1}, "offset must be a whole number from 0"),
            ("sellers", {"offset": "1e999"}, "offset must be a whole number, not '1e999'"),
            ("sellers", {"bogus": 1}, "unknown argument 'bogus'"),
            ("sellers", {"min_rating": "NaN"}, "min_rating must be a number"),
            ("sellers", {"min_rating": 2.5}, "the minimum rating must be between 0 and 1"),
            ("sellers", {"countries": ["XYZ"]}, "country 'XYZ' is not a two-letter"),
            ("sellers", {"countries": ["IT"] * 1000}, "countries has at most 300 items"),
            ("sellers", {"explain": "perhaps"}, "explain must be true or false"),
            ("sellers", {"replicas": 99}, "--replicas is 2 to"),
            ("place_order", {"vms": 1, "cores": 1, "memory": 256}, "image is missing"),
            ("place_order", {"image": "x" * 100000, "vms": 1, "cores": 1, "memory": 256},
             "image must be at most 64 characters"),
            ("place_order", {"image": self.sha, "vms": 10**30, "cores": 1, "memory": 256},
             "vms must be a whole number from"),
            ("place_order", {"image": self.sha, "vms": True, "cores": 1, "memory": 256},
             "vms must be a whole number, not True"),
            ("place_order", {"image": self.sha, "vms": 5000, "cores": 1, "memory": 256},
             "an order is for 1 to 1000 VMs, not 5000"),
            ("place_order", {"image": self.sha, "vms": 1, "cores": 1, "memory": 1},
             "a VM has 64 to"),
            ("place_order", {"image": self.sha, "vms": 1, "cores": 1, "memory": 256,
                             "budget": -5}, "a budget is above 0"),
            ("place_order", {"image": self.sha, "vms": 1, "cores": 1, "memory": 256,
                             "adaptive": True, "replicas": 2}, "--replicas auto replaces"),
            ("place_order", {"image": "0" * 64, "vms": 1, "cores": 1, "memory": 256},
             "this account has no image"),
            ("console", {"vm": 1, "lines": 0}, "lines must be a whole number from 1 to 500"),
            ("console", {"vm": 1, "lines": 10**6}, "lines must be a whole number from 1 to 500"),
            ("vms", {"before": 0}, "before must be a whole number from 1"),
            ("statement", {"before": -1}, "before must be a positive entry number"),
            ("rate", {"lease": 1}, "good is missing"),
            ("rate", {"lease": 1, "good": True, "comment": "x" * 600},
             "a comment is at most 500 characters"),
            ("images", {"after": "../../etc/passwd"}, "after must be a sha256 digest"),
            ("set_terms", {"price": -3}, "the price must be above 0"),
            ("set_terms", {"country": "Italy"}, "is not a two-letter country code"),
            ("payout", {"email": "a" * 300}, "email must be at most 254 characters"),
        ]
        for name, arguments, expected in cases:
            message = yield self.refused(BadRequest, name, alice, **arguments)
            self.assertIn(expected, message, (name, arguments))
            self.assertLess(len(message), 400, (name, arguments))
        # Not an object of arguments at all; too many; a query that is not UTF-8.
        for arguments in ([1, 2], "offset=1", {str(i): i for i in range(100)}):
            with self.assertRaises(BadRequest):
                yield api.call(self.market, alice, "sellers", arguments)
        with self.assertRaises(BadRequest) as e:
            api.fromQuery({b"offset": [b"\xff"]})
        self.assertEqual(str(e.exception), "the query string is not UTF-8")
        # Nothing was placed or changed by any of them.
        self.assertEqual((yield self.api("vms", alice))["vms"], [])

    def test_query_strings_give_the_same_arguments_as_json(self):
        query = api.fromQuery({b"offset": [b"2"], b"explain": [b"on"],
                               b"countries": [b"IT", b"FR"], b"not_countries": [b"US,DE"],
                               b"min_rating": [b"0.5"], b"max_price": [b""],
                               b"max_latency": [b"  "], b"csrf": [b"token"]})
        # A form's fields left blank are not given, nor its CSRF token.
        self.assertEqual(api.parse(query, api.FUNCTIONS["sellers"].spec), {
            "offset": 2, "explain": True, "countries": ["IT", "FR"],
            "not_countries": ["US", "DE"], "min_rating": 0.5})

    # -- one set of rules: the answers of the control commands

    @defer.inlineCallbacks
    def test_the_market_answers_as_list_sellers_with_the_reasons_excluded(self):
        seller = yield self.program("seller", self.sam)
        yield self.call(seller, commands.Offer, cores=2, memory=2048, price=20_000,
                        country="IT")
        dear = yield self.register("dear")
        other = yield self.program("seller", dear)
        yield self.call(other, commands.Offer, cores=1, memory=1024, price=90_000,
                        country="FR")
        for arguments in ({}, {"explain": True, "max_price": 50_000},
                          {"explain": True, "countries": ["FR"], "replicas": 2},
                          {"offset": 1, "explain": True}):
            mine = yield self.api("sellers", self.aliceAccount, **arguments)
            theirs = yield self.call(self.cli, commands.ListSellers,
                                     offset=arguments.pop("offset", 0), **arguments)
            self.assertEqual(mine, present(theirs), arguments)
        mine = yield self.api("sellers", self.aliceAccount, explain=True, max_price=50_000)
        self.assertEqual([(s["name"], s["price"], s["country"]) for s in mine["sellers"]],
                         [("sam", 20_000, "IT"), ("dear", 90_000, "FR")])
        self.assertIn("more than --max-price", mine["sellers"][1]["excluded"])
        self.assertEqual((mine["total"], mine["passing"]), (2, 1))
        # A seller sees its own seller as its own, never as one it could buy from.
        own = {s["name"]: s for s in (yield self.api("sellers", self.samAccount))["sellers"]}
        self.assertIn("your own account", own["sam"]["excluded"])
        self.assertNotIn("excluded", own["dear"])

    @defer.inlineCallbacks
    def test_orders_and_vms_answer_as_the_commands_with_cost_and_console(self):
        seller = yield self.program("seller", self.sam)
        yield self.call(seller, commands.Offer, cores=2, memory=2048, price=6_000_000)
        order = {"image": self.sha, "vms": 2, "cores": 1, "memory": 256, "replicas": 2,
                 "diverse": ["owner"], "explain": True}
        mine = yield self.api("place_order", self.aliceAccount, dry_run=True, **order)
        theirs = yield self.call(self.cli, commands.PlaceOrder, dry_run=True, **order)
        self.assertEqual(mine, present(theirs))
        self.assertEqual(mine["order"], 0)
        self.assertIn("replica group 1", mine["waiting"])
        self.assertEqual((yield self.api("vms", self.aliceAccount))["vms"], [])

        orderId, vm = yield self.running(seller)
        seller.sendFrame(commands.consoleChannel(vm),
                         b"".join(b"line %d\r\n" % i for i in range(100)) + b"bad \xff byte")
        yield self.sleep(0.1)
        shown = yield self.api("console", self.aliceAccount, vm=vm, lines=3)
        self.assertEqual(shown, {"vm": vm, "lines": ["line 98", "line 99", "bad \ufffd byte"]})
        self.assertEqual(len((yield self.api("console", self.aliceAccount, vm=vm))["lines"]), 40)

        # Billed: the VM ran 600 CPU seconds at 6.00 a core-hour, 1.00.
        yield self.call(seller, commands.VMState, vm=vm, state="running", cpu_seconds=600.0)
        yield self.store.run(lambda c: c.execute(
            "UPDATE leases SET started = started - 700, live_since = started - 700"))
        yield self.market.billing.tick()
        mine = yield self.api("vms", self.aliceAccount)
        theirs = yield self.call(self.cli, commands.ListVMs)
        [listed] = mine["vms"]
        self.assertEqual(listed.pop("cost"), MICRO)
        self.assertEqual(mine, present(theirs))
        self.assertEqual((listed["state"], listed["seller"], listed["cpu_seconds"]),
                         ("running", "sam", 600.0))
        self.assertEqual((yield self.api("leases", self.aliceAccount)),
                         present((yield self.call(self.cli, commands.ListLeases))))

        yield self.api("stop_vm", self.aliceAccount, vm=vm)
        self.assertEqual((yield self.within(seller.stopped.get())), vm)
        message = yield self.refused(NoSuchVM, "stop_vm", self.aliceAccount, vm=vm)
        self.assertIn(f"you have no running VM {vm}", message)
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_cancel_stops_the_orders_vms_as_cancel_order(self):
        seller = yield self.program("seller", self.sam)
        yield self.offer(seller, 2, 2048)
        orderId, vm = yield self.running(seller)
        self.assertEqual((yield self.api("cancel_order", self.aliceAccount, order=orderId)),
                         {"stopped": 1})
        self.assertEqual((yield self.within(seller.stopped.get())), vm)
        # The command answers the same for an order with nothing left to stop.
        self.assertEqual((yield self.api("cancel_order", self.aliceAccount, order=orderId)),
                         (yield self.call(self.cli, commands.CancelOrder, order=orderId)))

    @defer.inlineCallbacks
    def test_images_list_as_list_images_and_delete_frees_the_quota(self):
        mine = yield self.api("images", self.aliceAccount)
        self.assertEqual(mine, (yield self.call(self.cli, commands.ListImages)))
        self.assertEqual([i["sha256"] for i in mine["images"]], [self.sha])
        seller = yield self.program("seller", self.sam)
        yield self.offer(seller, 2, 2048)
        orderId, vm = yield self.running(seller)
        message = yield self.refused(BadRequest, "delete_image", self.aliceAccount,
                                     sha256=self.sha)
        self.assertIn("boots 1 of your VMs that are not over", message)
        yield self.api("cancel_order", self.aliceAccount, order=orderId)
        self.assertEqual((yield self.api("delete_image", self.aliceAccount, sha256=self.sha)),
                         {})
        self.assertEqual((yield self.call(self.cli, commands.ListImages))["images"], [])
        message = yield self.refused(BadRequest, "delete_image", self.aliceAccount,
                                     sha256=self.sha)
        self.assertEqual(message, f"you have no image {self.sha}")
        # Its room in the quota is free: the whole quota's worth fits again.
        from cpushare.client.cli import upload
        big = self.makeFile(self.imageQuota - 1000, b"big")
        _, _, sent = yield defer.ensureDeferred(upload.upload(self.reactor, self.cli, big))
        self.assertTrue(sent)
        # The VMs that booted it are still listed.
        self.assertEqual([v["vm"] for v in (yield self.api("vms", self.aliceAccount))["vms"]],
                         [vm])

    @defer.inlineCallbacks
    def test_rating_and_the_sellers_side_answer_as_the_commands(self):
        seller = yield self.program("seller", self.sam)
        yield self.call(seller, commands.Offer, cores=1, memory=1024, price=6_000_000,
                        net_fee=2_000, country="IT")
        orderId, vm = yield self.running(seller)
        yield self.call(seller, commands.VMState, vm=vm, state="running", cpu_seconds=600.0)
        yield self.store.run(lambda c: c.execute(
            "UPDATE leases SET started = started - 700, live_since = started - 700"))
        yield self.market.billing.tick()
        [lease] = (yield self.api("leases", self.aliceAccount))["leases"]
        rated = yield self.api("rate", self.aliceAccount, lease=lease["lease"], good=True,
                               comment="fast and <b>steady</b>")
        self.assertEqual(rated, {"seller": "sam", "rating": rating(1, 0), "votes": 1})
        message = yield self.refused(NotPermitted, "rate", self.aliceAccount,
                                     lease=lease["lease"], good=False)
        self.assertIn("was already rated good", message)

        sam = self.samAccount
        standing = yield self.api("seller_rating", sam)
        self.assertEqual((standing["rating"], standing["votes"], standing["more"]),
                         (rating(1, 0), 1, False))
        [given] = standing["ratings"]
        self.assertEqual((given["lease"], given["rating"], given["comment"]),
                         (lease["lease"], "good", "fast and <b>steady</b>"))
        self.assertEqual((yield self.api("seller_rating", self.bobAccount))["ratings"], [])
        [onMine] = (yield self.api("seller_leases", sam))["leases"]
        self.assertEqual((onMine["charged"], onMine["rating"], onMine["price"]),
                         (MICRO, "good", 6_000_000))

        terms = yield self.api("terms", sam)
        self.assertEqual(terms, {"price": 6_000_000, "net_fee": 2_000, "country": "IT"})
        self.assertEqual(terms, present((yield self.call(self.samCli, commands.SetTerms))))
        changed = yield self.api("set_terms", sam, price=7_000_000)
        self.assertEqual(changed["price"], 7_000_000)
        self.assertEqual((yield self.api("terms", sam))["price"], 7_000_000)
        self.assertEqual((yield self.api("terms", self.bobAccount)),
                         {"price": self.market.board.defaults["price"], "net_fee": 0})
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_money_answers_as_balance_statement_and_earnings(self):
        for account, cli in ((self.aliceAccount, self.cli), (self.bobAccount, self.bobCli)):
            for name, command in (("balance", commands.Balance),
                                  ("statement", commands.Statement),
                                  ("earnings", commands.Earnings)):
                mine = yield self.api(name, account)
                self.assertEqual(mine, present((yield self.call(cli, command))), name)
        statement = yield self.api("statement", self.aliceAccount)
        self.assertEqual([(e["kind"], e["amount"]) for e in statement["entries"]],
                         [("credit", 100 * MICRO)])
        before = statement["entries"][0]["entry"]
        self.assertEqual((yield self.api("statement", self.aliceAccount, before=before)),
                         present((yield self.call(self.cli, commands.Statement,
                                                  before=before))))
        # This market takes no payments: said as the commands say it.
        with self.assertRaises(commands.NoPayments) as e:
            yield self.api("add_funds", self.aliceAccount, amount=10 * MICRO)
        self.assertEqual(api.statusOf(e.exception), 409)
        with self.assertRaises(commands.NoPayments):
            yield self.api("payout", self.samAccount)

    # -- the operator's

    @defer.inlineCallbacks
    def test_the_operator_suspends_as_cpushare_admin_and_sees_the_books_and_health(self):
        yield defer.ensureDeferred(self.market.access.start())
        self.addCleanup(self.market.access.stop)
        operator = Operator(self.aliceId, "alice")
        seller = yield self.program("seller", self.sam)
        yield self.offer(seller, 2, 2048)
        yield self.running(seller)

        accounts = yield self.api("admin_accounts", operator)
        self.assertEqual([a["name"] for a in accounts["accounts"]], ["alice", "sam", "bob"])
        self.assertFalse(accounts["more"])
        after = yield self.api("admin_accounts", operator, after=accounts["accounts"][0]["id"])
        self.assertEqual([a["name"] for a in after["accounts"]], ["sam", "bob"])

        health = yield self.api("admin_health", operator)
        self.assertEqual((health["sellers_online"], health["cores_offered"],
                          health["cores_used"], health["vms_running"]), (1, 2, 1, 1))
        self.assertEqual(health["connections"], len(self.market.sessions))
        books = yield self.api("admin_books", operator)
        self.assertTrue(books["ok"], books)
        self.assertEqual(books["total"], 0)
        self.assertEqual((yield self.api("admin_payouts", operator)), {"payouts": []})

        message = yield self.refused(BadRequest, "admin_suspend", operator, name="alice")
        self.assertEqual(message, "an operator cannot suspend its own account")
        message = yield self.refused(BadRequest, "admin_suspend", operator, name="nobody")
        self.assertEqual(message, "no active, unsuspended account named 'nobody'")
        message = yield self.refused(BadRequest, "admin_suspend", operator, name="bob",
                                     reason="x" * 201)
        self.assertEqual(message, "reason must be at most 200 characters of text")
        self.assertEqual((yield self.api("admin_suspend", operator, name="bob",
                                         reason="unpaid bills")), {"suspended": "bob"})
        # As with cpushare-admin suspend: the running market closes bob's connection.
        yield self.market.access.check()
        yield self.bobCli.whenLost()
        [bob] = [a for a in (yield self.api("admin_accounts", operator))["accounts"]
                 if a["name"] == "bob"]
        self.assertIn("suspended", bob)
        self.assertEqual((yield self.api("admin_unsuspend", operator, name="bob")),
                         {"unsuspended": "bob"})
        rows = yield self.store.run(store.listAccounts)
        self.assertEqual([r["suspended"] for r in rows], [None, None, None])


def _vm(conn, buyer, seller, charges):
    """One VM of C{buyer}'s with a lease on C{seller} for each (charged, verdict) given."""
    first = _lease(conn, buyer, seller, charges[0][0])

    def more(cursor):
        for charged, verdict in charges[1:]:
            cursor.execute(
                "INSERT INTO leases (vm_id, order_id, buyer_account_id, seller_account_id,"
                " price, net_fee, cores, started, charged, verdict)"
                " SELECT vm_id, order_id, buyer_account_id, seller_account_id, price, net_fee,"
                " cores, started, ?, ? FROM leases WHERE id = ?", (charged, verdict, first))
        cursor.execute("SELECT vm_id FROM leases WHERE id = ?", (first,))
        return cursor.fetchone()[0]
    return store.transact(conn, more)


def test_a_vms_cost_leaves_out_rejected_charges_and_other_buyers_vms(conn):
    from cpushare.server.db import leases

    alice, bob, sam = (store.transact(conn, store.createAccount, n, n.ljust(64, "0"))
                       for n in ("alice", "bob", "sam"))
    mine = _vm(conn, alice, sam, [(300, None), (200, "rejected"), (50, "accepted")])
    theirs = _vm(conn, bob, sam, [(999, None)])
    assert store.transact(conn, leases.vmCharges, alice, [mine, theirs]) == {mine: 350}
    assert store.transact(conn, leases.vmCharges, alice, []) == {}
    onSam = store.transact(conn, leases.sellerLeases, sam)
    assert [(entry["vm"], entry["charged"]) for entry in onSam] == \
        [(theirs, 999), (mine, 50), (mine, 200), (mine, 300)]
    assert store.transact(conn, leases.sellerLeases, alice) == []
    assert [a["name"] for a in store.transact(conn, store.listAccounts, alice, 1)] == ["bob"]


def test_the_lease_a_vm_page_rates_is_each_vms_newest_and_only_the_buyers(conn):
    """
    The VMs page shows a rating button for each VM on it, however many
    newer leases the buyer has: the newest lease of each VM asked for, never
    one of another buyer's VMs.
    """
    from cpushare.server.db import leases

    alice, bob, sam = (store.transact(conn, store.createAccount, n, n.ljust(64, "0"))
                       for n in ("alice", "bob", "sam"))
    mine = _vm(conn, alice, sam, [(300, None), (200, None)])
    others = [_vm(conn, alice, sam, [(1, None)]) for _ in range(3)]
    theirs = _vm(conn, bob, sam, [(999, None)])
    newest = store.transact(conn, leases.accountLeases, alice)
    shown = store.transact(conn, leases.vmLastLeases, alice, [mine, theirs])
    assert shown == {mine: {"lease": max(e["lease"] for e in newest if e["vm"] == mine),
                            "rating": None}}
    assert newest[0]["vm"] == others[-1]  # newer leases than mine's exist
    store.transact(conn, lambda c: c.execute(
        "INSERT INTO ratings (lease_id, buyer_account_id, seller_account_id, good, created)"
        " VALUES (?, ?, ?, 0, 'now')", (shown[mine]["lease"], alice, sam)))
    assert store.transact(conn, leases.vmLastLeases, alice, [mine])[mine]["rating"] == "bad"
    assert store.transact(conn, leases.vmLastLeases, alice, []) == {}
