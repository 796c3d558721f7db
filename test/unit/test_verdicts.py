"""
Verdicts of replica groups on the market in memory (test/fakemarket.py):
the results compared, a tie-break placed, money and ratings following the
verdict, adaptive replication, and what a cheating seller or buyer would
try.
"""

import hashlib
import random

from twisted.internet import defer

from cpushare.protocol import commands
from cpushare.server.market import validation, verdicts
from cpushare.server.money import escrow

from test.unit.test_orders import OrderCase
from test.unit.test_replicas import AMD, ARM, INTEL
from test.unit.test_results import ResultTaker, ResultTakerControl, ResultTests

RIGHT = hashlib.sha256(b"42\n").hexdigest()
WRONG = hashlib.sha256(b"41\n").hexdigest()
OTHER = hashlib.sha256(b"40\n").hexdigest()
PRICE = 3_600_000               # 3.60 a core-hour: a CPU second costs 1,000 micro-units


class ComparingControl(ResultTakerControl):
    @commands.CompareResults.responder
    def compareResults(self, order, a, b):
        self.session.asked.append((order, a, b))
        return {"same": self.session.answer}


class ComparingProgram(ResultTaker):
    controlClass = ComparingControl
    answer = True

    def __init__(self, *a, **kw):
        ResultTaker.__init__(self, *a, **kw)
        self.asked = []


class VerdictTests(OrderCase):

    seller = ResultTests.seller
    order = ResultTests.order
    startedOn = ResultTests.startedOn
    report = ResultTests.report

    @defer.inlineCallbacks
    def group(self, **kw):
        """
        Sellers in IT, DE and FR (the FR one dearer, so it takes only a
        third replica) and one group of 2 replicas, both shown life and
        billed 60 CPU seconds: ({name: (session, vm)}, order).
        """
        it, _ = yield self.seller("it", "192.0.2.1", "IT", INTEL, price=PRICE)
        de, _ = yield self.seller("de", "198.51.100.1", "DE", AMD, price=PRICE)
        fr, _ = yield self.seller("fr", "203.0.113.1", "FR", ARM, price=2 * PRICE)
        placed = yield self.order(replicas=2, **kw)
        self.assertEqual(placed["allocated"], 2)
        started = yield self.startedOn(it, de, fr)
        self.assertEqual(started[fr], [])
        vms = {"it": (it, started[it][0]), "de": (de, started[de][0])}
        for session, vm in vms.values():
            yield self.bill(session, vm)
        self.sellers = {"it": it, "de": de, "fr": fr}
        return vms, placed["order"]

    @defer.inlineCallbacks
    def bill(self, session, vm, seconds=60.0):
        """C{vm} shows life, runs C{seconds} of CPU, and is billed."""
        yield self.showLife(session, vm)
        yield self.sleep(seconds)
        yield self.call(session, commands.VMState, vm=vm, state="running",
                        cpu_seconds=seconds)
        yield self.market.billing.tick()

    @defer.inlineCallbacks
    def decided(self, order):
        """The rows of ListResults once the market settled, by VM."""
        yield self.sleep(1)
        rows = (yield self.call(self.cli, commands.ListResults, order=order))["results"]
        return {r["vm"]: r for r in rows}

    def counts(self, name):
        def get(cursor):
            cursor.execute("SELECT id FROM accounts WHERE name = ?", (name,))
            return validation.validationOf(cursor, cursor.fetchone()[0])
        return self.store.run(get)

    def rated(self, leaseId):
        def get(cursor):
            cursor.execute("SELECT good, comment FROM ratings WHERE lease_id = ?", (leaseId,))
            return cursor.fetchone()
        return self.store.run(get)

    @defer.inlineCallbacks
    def checkBooks(self):
        yield OrderCase.checkBooks(self)
        self.assertEqual((yield self.store.run(escrow.pendingMismatch)), [])

    # -- verdicts

    @defer.inlineCallbacks
    def test_an_agreeing_pair_is_accepted_and_its_sellers_are_paid(self):
        vms, order = yield self.group()
        before = yield self.balances("it")
        self.assertEqual(before["earnings"], 0)
        self.assertEqual(before["pending"], 60_000)
        for session, vm in vms.values():
            yield self.report(session, vm, RIGHT)
        rows = yield self.decided(order)
        self.assertEqual({r["verdict"] for r in rows.values()}, {"accepted"})
        for name in ("it", "de"):
            after = yield self.balances(name)
            self.assertEqual((after["pending"], after["earnings"]), (0, 60_000))
            counts = yield self.counts(name)
            self.assertEqual((counts.validated, counts.invalid, counts.consecutive), (1, 0, 1))
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_a_mismatch_places_a_third_replica_and_the_minority_is_not_paid(self):
        vms, order = yield self.group()
        alice = yield self.balances("alice")
        (it, a), (de, b) = vms["it"], vms["de"]
        yield self.report(it, a, RIGHT)
        yield self.report(de, b, WRONG)
        # Nothing is decided: a third replica goes to the only seller that
        # differs from both in country, CPU and owner.
        fr = self.sellers["fr"]
        [c] = (yield self.startedOn(it, de, fr))[fr]
        rows = yield self.decided(order)
        self.assertEqual(sorted(rows), sorted([a, b, c]))
        self.assertEqual({r["verdict"] for r in rows.values()}, {"pending"})
        yield self.bill(fr, c)
        yield self.report(fr, c, RIGHT)
        rows = yield self.decided(order)
        self.assertEqual({vm: r["verdict"] for vm, r in rows.items()},
                         {a: "accepted", b: "rejected", c: "accepted"})
        # The cheater was charged 60 s like the others (60,000): it goes back to
        # alice, who paid fr's 60 s at twice the price (120,000) since.
        cheater = yield self.balances("de")
        self.assertEqual((cheater["pending"], cheater["earnings"]), (0, 0))
        self.assertEqual((yield self.balances("fr"))["earnings"], 120_000)
        self.assertEqual((yield self.balances("it"))["earnings"], 60_000)
        after = yield self.balances("alice")
        self.assertEqual(after["funds"] + after["held"],
                         alice["funds"] + alice["held"] - 120_000 + 60_000)
        # Its VM is stopped, its lease rated bad, its consecutive count gone.
        self.assertEqual((yield self.within(de.stopped.get())), b)
        good, comment = yield self.rated(rows[b]["lease"])
        self.assertEqual(good, 0)
        self.assertIn("minority of replica group 1", comment)
        counts = yield self.counts("de")
        self.assertEqual((counts.validated, counts.invalid, counts.consecutive), (0, 1, 0))
        self.assertEqual((yield self.counts("fr")).validated, 1)
        # Buyers see it at once, next to the rating the bad one lowered.
        listed = {s["name"]: s for s in
                  (yield self.call(self.cli, commands.ListSellers, offset=0))["sellers"]}
        self.assertEqual((listed["de"]["validated"], listed["de"]["error_rate"]), (0, 1.0))
        self.assertEqual((listed["it"]["validated"], listed["it"]["error_rate"]), (1, 0.0))
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_three_different_results_are_inconclusive_and_everybody_is_paid(self):
        vms, order = yield self.group()
        (it, a), (de, b) = vms["it"], vms["de"]
        yield self.report(it, a, RIGHT)
        yield self.report(de, b, WRONG)
        fr = self.sellers["fr"]
        [c] = (yield self.startedOn(it, de, fr))[fr]
        yield self.bill(fr, c)
        yield self.report(fr, c, OTHER)
        rows = yield self.decided(order)
        self.assertEqual({r["verdict"] for r in rows.values()}, {"inconclusive"})
        for name, paid in (("it", 60_000), ("de", 60_000), ("fr", 120_000)):
            self.assertEqual((yield self.balances(name))["earnings"], paid)
            self.assertEqual((yield self.counts(name)).invalid, 0)
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_a_replica_that_ends_without_a_result_is_outvoted(self):
        vms, order = yield self.group()
        (it, a), (de, b) = vms["it"], vms["de"]
        yield self.report(it, a, RIGHT)
        # de's guest powers off without writing a result.
        yield self.call(de, commands.VMState, vm=b, state="stopped", cpu_seconds=60.0)
        fr = self.sellers["fr"]
        [c] = (yield self.startedOn(it, de, fr))[fr]
        yield self.bill(fr, c)
        yield self.report(fr, c, RIGHT)
        rows = yield self.decided(order)
        self.assertEqual(rows[b]["verdict"], "rejected")
        self.assertEqual((yield self.counts("de")).invalid, 1)
        yield self.sleep(20)        # its lease is settled
        self.assertEqual((yield self.balances("de"))["earnings"], 0)
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_the_group_is_decided_when_the_verdict_timeout_passes(self):
        self.market.orders.verdicts.timeout = 300.0
        vms, order = yield self.group()
        (it, a), (de, b) = vms["it"], vms["de"]
        yield self.report(it, a, RIGHT)
        rows = yield self.decided(order)
        self.assertEqual(rows[a]["verdict"], "pending")
        yield self.sleep(300)
        rows = yield self.decided(order)
        # One result of two is no majority: both are paid, nobody is flagged.
        self.assertEqual({r["verdict"] for r in rows.values()}, {"inconclusive"})
        self.assertEqual((yield self.balances("it"))["pending"], 0)
        self.assertEqual((yield self.counts("de")).invalid, 0)
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_a_group_half_reported_before_a_restart_is_decided_after_it(self):
        from cpushare.server.market.orders import Orders
        vms, order = yield self.group()
        (it, a), (de, b) = vms["it"], vms["de"]
        yield self.report(it, a, RIGHT)
        market = self.market
        restarted = Orders(market.reactor, market.store, market.relay, market.board,
                           market.billing, market.buyerSession, market.images, grace=60)
        self.addCleanup(restarted.stop)
        yield defer.ensureDeferred(restarted.load())
        group = restarted.verdicts.groups[(order, 1)]
        self.assertEqual({vm: m.outcome for vm, m in group.members.items()},
                         {a: RIGHT, b: verdicts.MISSING})
        # Its seller comes back with the VM, and reports its result.
        [session] = [s for s in market.sellers() if s.account.name == "de"]
        self.assertEqual(restarted.reattach(session, [b]), [b])
        # A seller cannot report a result again because the market forgot it did.
        [first] = [s for s in market.sellers() if s.account.name == "it"]
        self.assertEqual(restarted.reattach(first, [a]), [a])
        try:
            yield defer.ensureDeferred(restarted.resultReady(first, a, WRONG, 3))
        except commands.BadRequest as e:
            self.assertIn("already reported", str(e))
        else:
            self.fail("a second result of one lease was taken after a restart")
        yield defer.ensureDeferred(restarted.resultReady(session, b, RIGHT, 3))
        yield self.sleep(1)

        def leaseVerdicts(cursor):
            cursor.execute("SELECT vm_id, verdict FROM leases WHERE order_id = ?", (order,))
            return dict(cursor.fetchall())
        self.assertEqual((yield self.store.run(leaseVerdicts)), {a: "accepted", b: "accepted"})
        self.assertNotIn((order, 1), restarted.verdicts.groups)
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_a_tie_break_that_finds_no_seller_ends_when_time_is_up(self):
        self.market.orders.verdicts.timeout = 300.0
        vms, order = yield self.group()
        yield self.close(self.sellers["fr"])
        (it, a), (de, b) = vms["it"], vms["de"]
        yield self.report(it, a, RIGHT)
        yield self.report(de, b, WRONG)
        rows = yield self.decided(order)
        [c] = [vm for vm in rows if vm not in (a, b)]
        listed = {v["vm"]: v for v in (yield self.call(self.cli, commands.ListVMs))["vms"]}
        self.assertEqual(listed[c]["state"], "pending")
        self.assertIn("replica group 1: needs 3 sellers", listed[c]["reason"])
        yield self.sleep(300)
        rows = yield self.decided(order)
        self.assertEqual((rows[a]["verdict"], rows[b]["verdict"]),
                         ("inconclusive", "inconclusive"))
        listed = {v["vm"]: v for v in (yield self.call(self.cli, commands.ListVMs))["vms"]}
        self.assertEqual((listed[c]["state"], listed[c]["reason"]),
                         ("stopped", "its replica group was decided without it"))
        self.assertEqual((yield self.counts("de")).invalid, 0)
        yield self.checkBooks()

    # -- what a cheater tries

    @defer.inlineCallbacks
    def test_a_buyer_that_stops_a_replica_cannot_get_its_seller_found_wrong(self):
        vms, order = yield self.group()
        (it, a), (de, b) = vms["it"], vms["de"]
        yield self.report(it, a, RIGHT)
        yield self.call(self.cli, commands.StopVM, vm=b)
        rows = yield self.decided(order)
        self.assertEqual({r["verdict"] for r in rows.values()}, {"inconclusive"})
        yield self.sleep(20)
        self.assertEqual((yield self.balances("de"))["earnings"], 60_000)
        self.assertEqual((yield self.counts("de")).invalid, 0)
        self.assertIsNone((yield self.rated(rows[b]["lease"])))
        # Nor is a third replica started for it.
        self.assertEqual((yield self.startedOn(self.sellers["fr"]))[self.sellers["fr"]], [])
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_a_buyer_that_cancels_pays_the_replicas_that_ran(self):
        vms, order = yield self.group()
        yield self.call(self.cli, commands.CancelOrder, order=order)
        rows = yield self.decided(order)
        self.assertEqual({r["verdict"] for r in rows.values()}, {"inconclusive"})
        yield self.sleep(20)
        for name in ("it", "de"):
            self.assertEqual((yield self.balances(name))["earnings"], 60_000)
        yield self.checkBooks()

    # -- the comparator

    @defer.inlineCallbacks
    def test_the_buyers_comparator_can_find_different_digests_the_same(self):
        buyer = yield self.connect("buyer", *self.alice, sessionClass=ComparingProgram)
        vms, order = yield self.group(compare=True)
        (it, a), (de, b) = vms["it"], vms["de"]
        yield self.report(it, a, RIGHT)
        yield self.report(de, b, WRONG)
        rows = yield self.decided(order)
        self.assertEqual(buyer.asked, [(order, a, b)] if RIGHT < WRONG else [(order, b, a)])
        self.assertEqual({r["verdict"] for r in rows.values()}, {"accepted"})
        self.assertEqual((yield self.startedOn(self.sellers["fr"]))[self.sellers["fr"]], [])

    @defer.inlineCallbacks
    def test_a_comparator_saying_different_brings_the_tie_break(self):
        ComparingProgram.answer = False
        self.addCleanup(setattr, ComparingProgram, "answer", True)
        yield self.connect("buyer", *self.alice, sessionClass=ComparingProgram)
        vms, order = yield self.group(compare=True)
        (it, a), (de, b) = vms["it"], vms["de"]
        yield self.report(it, a, RIGHT)
        yield self.report(de, b, WRONG)
        fr = self.sellers["fr"]
        self.assertEqual(len((yield self.startedOn(fr))[fr]), 1)

    @defer.inlineCallbacks
    def test_a_comparator_needs_replicas(self):
        yield self.seller("it", "192.0.2.1", "IT", INTEL, price=PRICE)
        try:
            yield self.order(compare=True)
        except commands.BadRequest as e:
            self.assertIn("comparator compares replicas", str(e))
        else:
            self.fail("a comparator without replicas was taken")

    # -- adaptive replication

    def test_a_seller_is_checked_with_probability_one_in_its_consecutive_valid_results(self):
        v = verdicts.Verdicts(None, None, None, threshold=10, random=random.Random(7))
        self.assertTrue(all(v.draw(n) for n in range(10) for _ in range(100)))
        for n in (10, 40):
            share = sum(v.draw(n) for _ in range(20_000)) / 20_000
            self.assertLess(abs(share - 1 / n), 0.25 / n, (n, share))

    @defer.inlineCallbacks
    def test_adaptive_runs_a_new_seller_twice_and_a_trusted_one_now_and_then(self):
        v = self.market.orders.verdicts
        self.patch(v, "random", random.Random(1))
        it, _ = yield self.seller("it", "192.0.2.1", "IT", INTEL, price=PRICE)
        de, _ = yield self.seller("de", "198.51.100.1", "DE", AMD, price=2 * PRICE)
        placed = yield self.order(adaptive=True)
        started = yield self.startedOn(it, de)
        # "it" has no valid results yet: its VM runs a second time, on de.
        self.assertEqual((len(started[it]), len(started[de])), (1, 1))
        self.assertEqual(len(placed["vm_ids"]), 1)

        # Once "it" has many consecutive valid results, its VMs mostly run once.
        def trusted(cursor):
            cursor.execute("SELECT id FROM accounts WHERE name = 'it'")
            sellerId = cursor.fetchone()[0]
            for _ in range(1000):
                validation.record(cursor, sellerId, True)
        yield self.store.run(trusted)
        yield self.call(self.cli, commands.CancelOrder, order=placed["order"])
        yield self.call(it, commands.Offer, cores=8, memory=4096, price=PRICE, country="IT",
                        **INTEL)
        placed = yield self.order(vms=4, adaptive=True)
        started = yield self.startedOn(it, de)
        self.assertEqual((len(started[it]), len(started[de])), (4, 0))
        # A VM run once is paid as unchecked when it reports its result.
        vm = started[it][0]
        yield self.bill(it, vm)
        yield self.report(it, vm, RIGHT)
        rows = yield self.decided(placed["order"])
        self.assertEqual(rows[vm]["verdict"], "unchecked")
        self.assertEqual((yield self.counts("it")).validated, 1000)
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_replicas_auto_and_a_number_together_are_refused(self):
        try:
            yield self.order(adaptive=True, replicas=3)
        except commands.BadRequest as e:
            self.assertIn("--replicas auto", str(e))
        else:
            self.fail("taken")
