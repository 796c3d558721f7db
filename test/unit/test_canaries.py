"""
Canaries: known-answer jobs the market runs on its sellers, on the market
in memory (test/fakemarket.py) with fake sellers whose VMs answer the
canary right, wrong, twice, too much, not at all, or go away.
"""

import hashlib
import random

from twisted.internet import defer
from twisted.internet.task import Clock

from cpushare.money import cpuCost
from cpushare.protocol import commands
from cpushare.server.market import canary as canary_
from cpushare.server.market import cpubench
from cpushare.server.market.orders import SYSTEM_RESULT_MAX
from cpushare.server.market.ratings import votes
from cpushare.server.market.validation import Validation, validationOf
from cpushare.server.money import ledger

from test.fakemarket import LogCapture
from test.unit import test_orders
from test.unit.test_orders import FakeSellerControl, OrderCase

# The seller's price: 3.60 a core-hour, a micro-unit a millisecond of CPU.
PRICE = 3_600_000
# The CPU seconds a canary VM used, as its seller's last word says, and
# the seconds its guest takes to answer after the line is typed.
CPU = 12.5
WORKS = 20.0


class CanarySellerControl(FakeSellerControl):
    """A seller whose VMs boot to a shell and answer the canary as C{session.mode} says."""

    @commands.StartVM.responder
    def startVM(self, vm, image, size, cores, memory, mac):
        session = self.session
        session.started.put(dict(vm=vm, image=image, cores=cores, memory=memory))
        channel = commands.consoleChannel(vm)
        session.route(channel, lambda data: session.typed(vm, data))
        session.reactor.callLater(0.05, session.sendFrame, channel,
                                  b"boot...\r\nCPUSHARE-READY mac=x ip=none\r\n/ # \x1b[6n")
        return {}

    @commands.StopVM.responder
    def stopVM(self, vm):
        session = self.session
        session.stopped.put(vm)
        # Its last word: the VM's final CPU seconds.
        session.reactor.callLater(0.2, session.control.callRemote, commands.VMState, vm=vm,
                                  state="stopped", cpu_seconds=session.cpu)
        return {}


class CanarySeller(test_orders.FakeProgram):
    controlClass = CanarySellerControl
    mode = "right"
    cpu = CPU

    def __init__(self, *a, **kw):
        test_orders.FakeProgram.__init__(self, *a, **kw)
        self.lines = []
        self.refusals = []

    def typed(self, vm, data):
        line = data.decode().strip()
        self.lines.append(line)
        _, seed, mb = line.split()
        answer = (cpubench.expectedDigest(seed, int(mb)) + "\n").encode()
        self.reactor.callLater(WORKS, lambda: defer.ensureDeferred(self.answer(vm, answer)))

    def call(self, command, **kw):
        """Send C{command}; a refusal is kept (its message), not raised."""
        d = self.control.callRemote(command, **kw)
        return d.addErrback(lambda f: self.refusals.append(f.getErrorMessage()))

    async def result(self, vm, data):
        """Send C{data} as the VM's result, as the seller's result port does."""
        for offset in range(0, len(data), 4096):
            await self.call(commands.ResultChunk, vm=vm, offset=offset,
                            data=data[offset:offset + 4096])
        await self.call(commands.ResultReady, vm=vm, sha256=hashlib.sha256(data).hexdigest(),
                        size=len(data))

    async def answer(self, vm, right):
        mode = self.mode
        if mode == "right":
            await self.result(vm, right)
        elif mode == "wrong":
            await self.result(vm, b"0" * 64 + b"\n")
        elif mode == "twice":
            await self.result(vm, right)
            await self.result(vm, b"1" * 64 + b"\n")
        elif mode == "wrong-then-right":
            await self.result(vm, b"0" * 64 + b"\n")
            await self.result(vm, right)
        elif mode == "too-big":
            await self.result(vm, right + b"x" * SYSTEM_RESULT_MAX)
        elif mode == "disconnect":
            self.transport.loseConnection()
        # "silent": nothing


class CanaryTests(OrderCase):

    clockLimit = 3600.0

    @defer.inlineCallbacks
    def setUp(self):
        yield OrderCase.setUp(self)
        market = self.market
        bench = market.cpubench
        bench.image = self.makeFile(5000, b"bench")
        bench.forCanaries = True
        yield defer.ensureDeferred(bench.prepare(None))
        self.assertFalse(bench.enabled)         # no benchmarks: canaries only
        self.canaries = canary_.Canaries(market.reactor, market.store, market.orders, bench,
                                         market.board, every=3600, mb=2, timeout=30.0,
                                         random=random.Random(7))
        market.canaries = self.canaries
        self.addCleanup(self.canaries.stop)
        self.seller, self.samId, self.session = yield self.canarySeller(self.sam)
        self.grantsBefore = yield self.grants()    # alice's funds came from grants

    @defer.inlineCallbacks
    def canarySeller(self, who, cores=1):
        seller = yield self.connect("seller", *who, sessionClass=CanarySeller)
        yield self.call(seller, commands.Offer, cores=cores, memory=1024, price=PRICE)
        session = [s for s in self.market.sellers() if s.sessionId == max(
            s.sessionId for s in self.market.sellers())][0]
        self.canaries.sessionLost(session)      # the tests run them themselves
        return seller, session.account.id, session

    def runCanary(self, session=None):
        return defer.ensureDeferred(self.canaries.run(session or self.session))

    def row(self):
        """The last canary's row: (seller, expected, reported, passed, paid)."""
        return self.store.run(lambda c: c.execute(
            "SELECT seller_account_id, expected, reported, passed, paid, ended FROM canaries"
            " ORDER BY vm_id DESC").fetchone())

    def validation(self, accountId=None):
        return self.store.run(validationOf, accountId or self.samId)

    def grants(self):
        return self.store.run(ledger.balance, ledger.GRANTS)

    @defer.inlineCallbacks
    def grantsSpent(self):
        """What the market's grants paid since the test began."""
        return self.grantsBefore - (yield self.grants())

    @defer.inlineCallbacks
    def assertFailed(self, why):
        """The last canary failed for C{why}: not paid, counted, and rated bad by the market."""
        seller, expected, reported, passed, paid, ended = yield self.row()
        self.assertEqual((seller, passed, paid), (self.samId, 0, 0))
        self.assertIsNotNone(ended)
        self.assertEqual((yield self.balances("sam"))["earnings"], 0)
        self.assertEqual((yield self.grantsSpent()), 0)
        counts = yield self.validation()
        self.assertEqual((counts.invalid, counts.consecutive, counts.canariesFailed), (1, 0, 1))
        yield self.assertMarketVotedBad()
        self.assertEqual(self.market.orders.used(self.session), (0, 0))
        yield self.checkBooks()
        return reported

    @defer.inlineCallbacks
    def assertMarketVotedBad(self):
        """The market's one bad vote, in full, is sam's only vote."""
        self.assertEqual((yield self.store.run(votes, self.samId)), (0.0, 1.0, 1))
        [listed] = (yield self.call(self.cli, commands.ListSellers, offset=0))["sellers"]
        self.assertEqual((listed["votes"], listed["rating"]), (1, 0.0))

    # -- abuse

    @defer.inlineCallbacks
    def test_a_wrong_answer_is_not_paid_resets_the_count_and_rates_the_seller_bad(self):
        self.assertTrue((yield self.runCanary()))
        self.assertEqual((yield self.validation()).consecutive, 1)
        paid = (yield self.balances("sam"))["earnings"]
        self.seller.mode = "wrong"
        with LogCapture() as log:
            self.assertFalse((yield self.runCanary()))
        reported = (yield self.row())[2]
        self.assertEqual(reported, hashlib.sha256(b"0" * 64 + b"\n").hexdigest())
        [line] = [t for t in log.texts() if "failed" in t]
        self.assertIn("on seller sam failed: the canary's result was wrong", line)
        self.assertEqual(log.failures, [])
        counts = yield self.validation()
        self.assertEqual((counts.validated, counts.invalid, counts.consecutive,
                          counts.canariesFailed), (1, 1, 0, 1))
        # The first canary's pay stays; the wrong one added nothing.
        self.assertEqual((yield self.balances("sam"))["earnings"], paid)
        yield self.assertMarketVotedBad()
        excluded = yield self.call(self.cli, commands.ListSellers, offset=0, explain=True,
                                   min_rating=0.1)
        self.assertIn("rating", excluded["sellers"][0]["excluded"])
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_a_seller_that_reports_nothing_fails_at_the_timeout(self):
        self.seller.mode = "silent"
        started = self.reactor.seconds()
        self.assertFalse((yield self.runCanary()))
        self.assertGreaterEqual(self.reactor.seconds() - started, 30.0)
        self.assertIsNone((yield self.assertFailed("no result")))
        self.assertEqual(len(self.seller.lines), 1)

    @defer.inlineCallbacks
    def test_a_second_result_is_refused_and_the_first_counts(self):
        self.seller.mode = "twice"
        self.assertTrue((yield self.runCanary()))
        yield self.sleep(2)
        self.assertTrue(self.seller.refusals)
        self.assertTrue(all("takes no result now" in r or "not running" in r
                            for r in self.seller.refusals), self.seller.refusals)
        counts = yield self.validation()
        self.assertEqual((counts.validated, counts.invalid), (1, 0))
        # Nor does a right answer after a wrong one help.
        self.seller.mode = "wrong-then-right"
        self.assertFalse((yield self.runCanary()))
        counts = yield self.validation()
        self.assertEqual((counts.validated, counts.invalid, counts.consecutive), (1, 1, 0))
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_a_result_too_big_is_refused_past_4_kib_and_fails(self):
        self.seller.mode = "too-big"
        self.assertFalse((yield self.runCanary()))
        self.assertIn(f"up to {SYSTEM_RESULT_MAX}", self.seller.refusals[0])
        yield self.assertFailed("wrong")

    @defer.inlineCallbacks
    def test_a_seller_that_disconnects_mid_canary_fails_it(self):
        self.seller.mode = "disconnect"
        with LogCapture() as log:
            self.assertFalse((yield self.runCanary()))
        self.assertIn("the canary got no result: its VM lost: the seller disconnected",
                      " ".join(log.texts()))
        self.assertEqual(log.failures, [])
        seller, expected, reported, passed, paid, ended = yield self.row()
        self.assertEqual((reported, passed, paid), (None, 0, 0))
        counts = yield self.validation()
        self.assertEqual((counts.invalid, counts.canariesFailed), (1, 1))
        yield self.checkBooks()
        # It is not given another canary while away.
        self.assertEqual(self.canaries.calls, {})

    @defer.inlineCallbacks
    def test_a_canary_the_market_stops_is_left_undecided(self):
        self.seller.mode = "silent"
        with LogCapture() as log:
            running = self.runCanary()
            vm = (yield self.within(self.seller.started.get()))["vm"]
            yield self.sleep(5)
            self.canaries.stop()
            self.assertIsNone((yield running))
            self.assertEqual((yield self.within(self.seller.stopped.get())), vm)
        self.assertIn(f"canary VM {vm} on sam left undecided: the market stops",
                      " ".join(log.texts()))
        self.assertEqual(log.failures, [])
        self.assertEqual((yield self.row())[3], None)
        self.assertEqual((yield self.validation()), Validation())
        self.assertEqual(self.canaries.calls, {})

    @defer.inlineCallbacks
    def test_a_canary_is_decided_and_paid_once(self):
        self.assertTrue((yield self.runCanary()))
        vmId = (yield self.store.run(lambda c: c.execute(
            "SELECT vm_id FROM canaries").fetchone()))[0]
        before = yield self.balances("sam")
        again = self.store.run(canary_.decide, vmId, self.samId, "ab" * 32, True, 10**6, 0.0)
        yield self.assertFailure(again, canary_.AlreadyDecided)
        # Even its row forgotten, the ledger's reference refuses a second payment,
        # and nothing else of that decision is kept.
        yield self.store.run(lambda c: c.execute(
            "UPDATE canaries SET passed = NULL WHERE vm_id = ?", (vmId,)))
        again = self.store.run(canary_.decide, vmId, self.samId, "ab" * 32, True, 10**6, 0.0)
        yield self.assertFailure(again, ledger.AlreadyPosted)
        self.assertEqual((yield self.balances("sam")), before)
        self.assertEqual((yield self.validation()).validated, 1)
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_a_canary_waits_for_room_and_records_nothing_meanwhile(self):
        yield self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=1, cores=1,
                        memory=256)
        yield self.within(self.seller.started.get())
        self.assertIsNone((yield self.runCanary()))
        self.assertIsNone((yield self.row()))
        self.assertEqual(self.seller.lines, [])

    @defer.inlineCallbacks
    def test_the_market_result_channel_refuses_a_vm_that_takes_no_result(self):
        # A benchmark VM (no canary) takes no result.
        self.seller.mode = "silent"
        bench = self.market.cpubench
        bench.every, bench.timeout = 3600, 2.0
        measuring = defer.ensureDeferred(bench.measure(self.session))
        vm = (yield self.within(self.seller.started.get()))["vm"]
        with self.assertRaises(commands.BadRequest) as e:
            yield self.call(self.seller, commands.ResultReady, vm=vm, sha256="ab" * 32, size=3)
        self.assertIn("is the market's own and takes no result now", str(e.exception))
        yield measuring

    @defer.inlineCallbacks
    def test_the_market_gives_each_seller_online_canaries_until_it_goes(self):
        sue = yield self.register("sue")
        seller = yield self.connect("seller", *sue, sessionClass=CanarySeller)
        yield self.call(seller, commands.Offer, cores=1, memory=1024)
        [session] = [s for s in self.market.sellers() if s.account.name == "sue"]
        self.assertIn(session, self.canaries.calls)
        yield self.close(seller)
        yield self.sleep(1)
        self.assertNotIn(session, self.canaries.calls)

    # -- the right answer

    @defer.inlineCallbacks
    def test_the_right_answer_is_paid_from_the_market_for_the_vms_cpu_seconds(self):
        with LogCapture() as log:
            self.assertTrue((yield self.runCanary()))
        started = yield self.within(self.seller.started.get())
        self.assertEqual((started["cores"], started["memory"]), (1, 256))
        self.assertEqual(started["image"], self.market.cpubench.sha256)
        [line] = self.seller.lines
        command, seed, mb = line.split()
        self.assertEqual((command, mb), ("/cpushare/canary", "2"))
        self.assertEqual(len(seed), 32)
        seller, expected, reported, passed, paid, ended = yield self.row()
        self.assertEqual(expected, canary_.resultDigest(seed, 2))
        self.assertEqual((seller, reported, passed), (self.samId, expected, 1))
        self.assertEqual(paid, cpuCost(PRICE, CPU))
        self.assertEqual(paid, 12_500)
        balances = yield self.balances("sam")
        self.assertEqual(balances["earnings"], paid)
        self.assertEqual((yield self.grantsSpent()), paid)
        reference = yield self.store.run(lambda c: c.execute(
            "SELECT COUNT(*) FROM ledger_transactions WHERE reference = ?",
            (f"canary:{started['vm']}",)).fetchone())
        self.assertEqual(reference[0], 1)
        counts = yield self.validation()
        self.assertEqual((counts.validated, counts.invalid, counts.consecutive), (1, 0, 1))
        self.assertIn("answered right; paid 0.0125", " ".join(log.texts()))
        # Nobody else paid, no lease, and the seller's capacity is back.
        self.assertEqual((yield self.balances("alice"))["funds"], 100 * 10**6)
        self.assertEqual((yield self.store.run(lambda c: c.execute(
            "SELECT COUNT(*) FROM leases").fetchone()))[0], 0)
        self.assertEqual(self.market.orders.used(self.session), (0, 0))
        [listed] = (yield self.call(self.cli, commands.ListSellers, offset=0))["sellers"]
        self.assertEqual(listed["votes"], 0)
        yield self.checkBooks()
        # A seller that says its VM used more CPU than the canary's time
        # allows is paid for that time at most.
        self.seller.cpu = 1e6
        self.assertTrue((yield self.runCanary()))
        paid = (yield self.row())[4]
        self.assertGreater(paid, cpuCost(PRICE, WORKS))
        self.assertLess(paid, cpuCost(PRICE, WORKS + 5))
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_sellers_get_canaries_at_random_one_at_a_time_each(self):
        sue = yield self.register("sue")
        other, _, otherSession = yield self.canarySeller(sue, cores=2)
        self.seller.mode = other.mode = "silent"
        self.canaries.every = 60.0
        for session in (self.session, otherSession):
            self.canaries.sellerOnline(session)
        starts = []
        for _ in range(4):
            starts.append((yield self.within(defer.DeferredList(
                [self.seller.started.get(), other.started.get()],
                fireOnOneCallback=True), 20000)))
            self.assertLessEqual(len(self.canaries.running), 2)
            self.assertLessEqual(self.market.orders.used(otherSession)[0], 1)
        counts = yield self.validation()
        self.assertGreater(counts.canariesFailed, 0)
        rows = yield self.store.run(lambda c: c.execute(
            "SELECT started FROM canaries ORDER BY vm_id").fetchall())
        self.assertGreaterEqual(len(rows), 4)
        self.assertEqual(len({r[0] for r in rows}), len(rows))


def test_canaries_come_at_exponential_waits_of_the_mean_asked():
    bench = cpubench.CPUBench(Clock(), None, None, None, every=0)
    bench.sha256 = "ab" * 32
    canaries = canary_.Canaries(Clock(), None, None, bench, None, every=600,
                                random=random.Random(1))
    assert canaries.enabled
    waits = [canaries.nextWait() for _ in range(4000)]
    assert 570 < sum(waits) / len(waits) < 630
    assert min(waits) < 10 and max(waits) > 3000
    assert not canary_.Canaries(Clock(), None, None, bench, None, every=0).enabled


def test_at_most_a_few_canaries_run_at_once_market_wide():
    from types import SimpleNamespace

    from cpushare.server.db.store import Account

    class Session(SimpleNamespace):
        __hash__ = object.__hash__

    clock = Clock()
    bench = cpubench.CPUBench(clock, None, None, None, every=0)
    bench.sha256 = "ab" * 32
    canaries = canary_.Canaries(clock, None, None, bench, None, every=60,
                                random=random.Random(3))
    running = {}

    def run(session):
        running[session] = d = defer.Deferred()
        return d

    canaries.run = run
    sellers = [Session(connected=True, account=Account(i, f"s{i}", 0.0)) for i in range(5)]
    for s in sellers:
        canaries.sellerOnline(s)
        canaries.sellerOnline(s)        # once is enough
    assert len(canaries.calls) == 5
    clock.advance(10_000)
    assert len(running) == canary_.AT_ONCE and len(canaries.queued) == 5 - canary_.AT_ONCE
    first = next(iter(running))
    running.pop(first).callback(True)
    assert len(running) == canary_.AT_ONCE
    # The seller whose canary ended waits for its next; none runs twice at once.
    assert first in canaries.calls and first not in running


def test_the_servers_canary_option():
    from twisted.python import usage

    from cpushare.server.tap import Options

    options = Options()
    options.parseOptions([])
    assert options["canary-every"] == canary_.EVERY
    for bad in ("-1", "inf", "nan"):
        try:
            Options().parseOptions(["--canary-every", bad])
        except usage.UsageError as e:
            assert "--canary-every must be 0 (never) or a number of seconds" in str(e)
        else:
            raise AssertionError(f"--canary-every {bad} was taken")


def test_the_cheating_seller_alters_every_result():
    from test import cheatingseller

    told = []
    port = cheatingseller.cheatingResultPort()(1, lambda *r: told.append(r), told.append)
    port.dataReceived(b"CPUSHARE-RESULT 65\n" + b"a" * 30)
    port.dataReceived(b"a" * 34 + b"\n")
    wrong = hashlib.sha256(cheatingseller.altered(b"a" * 64 + b"\n")).hexdigest()
    assert told == [(wrong, 65)]
    assert wrong != hashlib.sha256(b"a" * 64 + b"\n").hexdigest()
