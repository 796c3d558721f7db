"""
The result channel of replicated runs on the market's side: what a
seller reports of a VM's result (ResultReady) and what a buyer lists of
an order's results (ListResults), with what a cheating seller or buyer
would send, on the market in memory (test/fakemarket.py).
"""

import hashlib

from twisted.internet import defer

from cpushare.protocol import commands

from test.unit.test_orders import OrderCase
from test.unit import test_replicas
from test.unit.test_replicas import AMD, INTEL

DIGEST = hashlib.sha256(b"42\n").hexdigest()


class ResultTests(OrderCase):

    seller = test_replicas.ReplicaTests.seller
    order = test_replicas.ReplicaTests.order
    startedOn = test_replicas.ReplicaTests.startedOn

    @defer.inlineCallbacks
    def pair(self):
        """Two sellers (IT, Intel; DE, AMD) and one group of 2 replicas: [(session, vm)]."""
        it, _ = yield self.seller("it", "192.0.2.1", "IT", INTEL, price=10_000)
        de, _ = yield self.seller("de", "198.51.100.1", "DE", AMD, price=11_000)
        placed = yield self.order(replicas=2)
        self.assertEqual(placed["allocated"], 2)
        started = yield self.startedOn(it, de)
        return [(it, started[it][0]), (de, started[de][0])], placed["order"]

    def report(self, seller, vm, sha256=DIGEST, size=3):
        return self.call(seller, commands.ResultReady, vm=vm, sha256=sha256, size=size)

    @defer.inlineCallbacks
    def refused(self, d, error):
        try:
            yield d
        except error as e:
            return str(e)
        self.fail(f"not refused with {error.__name__}")

    @defer.inlineCallbacks
    def test_each_replica_shows_its_seller_country_cpu_digest_and_size(self):
        [(it, a), (de, b)], order = yield self.pair()
        yield self.report(it, a)
        yield self.report(de, b, hashlib.sha256(b"41\n").hexdigest(), 3)
        listed = yield self.call(self.cli, commands.ListResults, order=order)
        self.assertFalse(listed["more"])
        rows = {r["vm"]: r for r in listed["results"]}
        self.assertEqual(rows[a], {"vm": a, "replica_group": 1, "state": "allocated",
                                   "seller": "it", "country": "IT",
                                   "cpu": "GenuineIntel/6/85", "sha256": DIGEST, "size": 3})
        self.assertEqual((rows[b]["seller"], rows[b]["country"], rows[b]["cpu"]),
                         ("de", "DE", "AuthenticAMD/23/49"))
        self.assertEqual(rows[b]["sha256"], hashlib.sha256(b"41\n").hexdigest())

    @defer.inlineCallbacks
    def test_a_vm_that_ends_without_a_result_lists_none(self):
        [(it, a), (de, b)], order = yield self.pair()
        yield self.report(it, a)
        yield self.call(de, commands.VMState, vm=b, state="stopped", cpu_seconds=1.0)
        rows = {r["vm"]: r for r in (yield self.call(
            self.cli, commands.ListResults, order=order))["results"]}
        self.assertEqual(rows[b]["state"], "stopped")
        self.assertEqual((rows[b]["sha256"], rows[b]["size"]), (None, None))
        # Its seller cannot report one once the VM ended.
        yield self.refused(self.report(de, b), commands.NoSuchVM)

    # -- abuse

    @defer.inlineCallbacks
    def test_a_seller_cannot_report_for_a_vm_that_is_not_its_own(self):
        [(it, a), (de, b)], order = yield self.pair()
        why = yield self.refused(self.report(it, b), commands.NoSuchVM)
        self.assertIn(f"VM {b} is not running on this seller", why)
        yield self.refused(self.report(it, 999999), commands.NoSuchVM)
        # Nor may a buyer report one.
        yield self.refused(self.report(self.cli, a), commands.BadRequest)
        rows = (yield self.call(self.cli, commands.ListResults, order=order))["results"]
        self.assertEqual([r.get("sha256") for r in rows], [None, None])

    @defer.inlineCallbacks
    def test_a_seller_reports_a_result_once(self):
        [(it, a), _], order = yield self.pair()
        yield self.report(it, a)
        why = yield self.refused(self.report(it, a, hashlib.sha256(b"x").hexdigest(), 1),
                                 commands.BadRequest)
        self.assertIn("already reported", why)
        rows = (yield self.call(self.cli, commands.ListResults, order=order))["results"]
        self.assertIn(DIGEST, [r.get("sha256") for r in rows])

    @defer.inlineCallbacks
    def test_a_digest_must_be_64_lowercase_hex_characters(self):
        [(it, a), _], order = yield self.pair()
        for bad in ("", "ab" * 31, "ab" * 33, "AB" * 32, "g" * 64, DIGEST + "\n"):
            why = yield self.refused(self.report(it, a, bad), commands.BadRequest)
            self.assertIn("sha256", why)
        # The VM may still report a good one afterwards.
        yield self.report(it, a)

    @defer.inlineCallbacks
    def test_a_size_beyond_the_cap_or_below_zero_is_refused(self):
        [(it, a), _], order = yield self.pair()
        for bad in (-1, commands.RESULT_MAX + 1, 2**62):
            why = yield self.refused(self.report(it, a, size=bad), commands.BadRequest)
            self.assertIn("result size", why)
        yield self.report(it, a, size=commands.RESULT_MAX)

    @defer.inlineCallbacks
    def test_a_buyer_lists_only_its_own_orders_results(self):
        _, order = yield self.pair()
        bob = yield self.register("bob")
        bobCLI = yield self.connect("cli", *bob)
        why = yield self.refused(self.call(bobCLI, commands.ListResults, order=order),
                                 commands.BadRequest)
        self.assertIn(f"you have no order {order}", why)
