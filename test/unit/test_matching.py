"""
The market's matching: sellers' terms, buyers' screens, the cheapest
capacity first, waiting orders filled as capacity appears, leases and
ratings; on a real server in this process with fake seller programs.
"""

from twisted.internet import defer

from cpushare.client.cli import upload
from cpushare.money import MICRO
from cpushare.protocol import commands, proof
from cpushare.server import admin
from cpushare.server.market import cpubench
from cpushare.server.money import ledger
from cpushare.server.market.screens import rating
from cpushare.server.db.store import Account

from test.unit import test_orders
from test.unit.test_orders import FakeSellerControl, OrderCase


class MatchingTests(OrderCase):

    @defer.inlineCallbacks
    def seller(self, name, cores=2, price=None, country=None, net_fee=None):
        """A registered seller program offering capacity at these terms."""
        who = yield self.register(name)
        session = yield self.program("seller", who)
        terms = {k: v for k, v in (("price", price), ("country", country),
                                   ("net_fee", net_fee)) if v is not None}
        answer = yield self.call(session, commands.Offer, cores=cores, memory=4096, **terms)
        return session, who, answer

    def order(self, vms=1, **kw):
        return self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=vms, cores=1,
                         memory=256, **kw)

    def sellers(self, **kw):
        d = self.call(self.cli, commands.ListSellers, offset=0, **kw)
        return d

    @defer.inlineCallbacks
    def test_the_cheapest_capacity_is_used_first_and_partial_fills_spill_over(self):
        dear, _, _ = yield self.seller("dear", price=50_000)
        cheap, _, answer = yield self.seller("cheap", price=20_000, country="it")
        self.assertEqual(answer, {"price": 20_000, "net_fee": 0, "country": "IT"})
        middling, _, _ = yield self.seller("middling", price=30_000)
        listed = yield self.sellers()
        self.assertEqual([s["name"] for s in listed["sellers"]], ["cheap", "middling", "dear"])
        self.assertEqual(listed["sellers"][0]["price"], 20_000)

        placed = yield self.order(vms=3)
        self.assertEqual(placed["allocated"], 3)
        self.assertIsNone(placed["waiting"])
        first, second, third = placed["vm_ids"]
        self.assertEqual([s["vm"] for s in (yield self.take(cheap.started, 2))], [first, second])
        self.assertEqual((yield self.within(middling.started.get()))["vm"], third)
        self.assertEqual(len(dear.started.pending), 0)
        leases = (yield self.call(self.cli, commands.ListLeases))["leases"]
        self.assertEqual(sorted((lease["vm"], lease["seller"], lease["price"]) for lease in leases),
                         [(first, "cheap", 20_000), (second, "cheap", 20_000),
                          (third, "middling", 30_000)])
        free = {s["name"]: s["free_cores"] for s in (yield self.sellers())["sellers"]}
        self.assertEqual(free, {"cheap": 0, "middling": 1, "dear": 2})

    @defer.inlineCallbacks
    def test_screens_exclude_sellers_and_explain_why(self):
        yield self.seller("cheap", price=20_000, country="DE")
        yield self.seller("italian", price=40_000, country="IT", net_fee=MICRO // 2)
        yield self.seller("anywhere", price=30_000)

        listed = yield self.sellers(max_price=35_000, explain=True)
        self.assertEqual(listed["passing"], 2)
        byName = {s["name"]: s.get("excluded") for s in listed["sellers"]}
        self.assertEqual(byName["cheap"], None)
        self.assertEqual(byName["italian"],
                         "asks 0.04 a core-hour, more than --max-price 0.035")
        # Without --explain only the sellers that pass are listed.
        listed = yield self.sellers(max_price=35_000)
        self.assertEqual([s["name"] for s in listed["sellers"]], ["cheap", "anywhere"])

        listed = yield self.sellers(countries=["it"], explain=True)
        self.assertEqual([s["name"] for s in listed["sellers"] if s["excluded"] is None],
                         ["italian"])
        reasons = {s["name"]: s.get("excluded") for s in listed["sellers"]}
        self.assertEqual(reasons["anywhere"],
                         "is in an unstated country, not in --country IT")
        listed = yield self.sellers(not_countries=["DE", "IT"])
        self.assertEqual([s["name"] for s in listed["sellers"]], ["anywhere"])
        listed = yield self.sellers(max_net_fee=MICRO // 4, countries=["IT"], explain=True)
        self.assertEqual(listed["passing"], 0)
        self.assertIn("charges 0.50 a GB, more than --max-net-fee 0.25",
                      [s.get("excluded") for s in listed["sellers"]])
        # A new seller has no votes: a rating floor excludes it; latency is
        # measured by the heartbeats (0.2 s here) and may not be yet.
        listed = yield self.sellers(min_rating=0.1, explain=True)
        self.assertEqual(listed["passing"], 0)
        self.assertTrue(all("below --min-rating 0.1" in s["excluded"]
                            for s in listed["sellers"]))
        listed = yield self.sellers(min_bandwidth=1.0, explain=True)
        self.assertTrue(all("no bandwidth measured yet" in s["excluded"]
                            for s in listed["sellers"]))

        # An order with screens nobody passes waits and says why.
        placed = yield self.order(vms=2, max_price=25_000, not_countries=["DE"])
        self.assertEqual(placed["allocated"], 0)
        self.assertIn("none of the 3 sellers online passes the screens", placed["waiting"])
        self.assertIn("2 by --max-price", placed["waiting"])
        self.assertIn("1 by --not-country", placed["waiting"])
        vms = (yield self.call(self.cli, commands.ListVMs))["vms"]
        self.assertEqual({v["state"] for v in vms}, {"pending"})
        self.assertEqual({v["reason"] for v in vms}, {placed["waiting"]})

    @defer.inlineCallbacks
    def test_waiting_orders_are_filled_at_once_by_new_capacity_or_lower_prices(self):
        placed = yield self.order(vms=2, max_price=25_000)
        self.assertEqual(placed["waiting"], "no seller is online; waiting for one")
        dear, dearWho, _ = yield self.seller("dear", cores=1, price=50_000)
        self.assertEqual(len(dear.started.pending), 0)
        vms = (yield self.call(self.cli, commands.ListVMs))["vms"]
        self.assertEqual({v["state"] for v in vms}, {"pending"})

        # A seller that passes comes online: the oldest waiting VM goes there.
        cheap, _, _ = yield self.seller("cheap", cores=1, price=20_000)
        self.assertEqual((yield self.within(cheap.started.get()))["vm"], placed["vm_ids"][0])
        # The dear seller lowers its price while it runs: the other VM goes there.
        dearCli = yield self.connect("cli", *dearWho)
        terms = yield self.call(dearCli, commands.SetTerms, price=25_000)
        self.assertEqual(terms["price"], 25_000)
        self.assertEqual((yield self.within(dear.started.get()))["vm"], placed["vm_ids"][1])

    @defer.inlineCallbacks
    def test_terms_are_kept_across_reconnections(self):
        seller, who, answer = yield self.seller("sam2", price=33_000, country="FR")
        self.assertEqual(answer["price"], 33_000)
        yield self.close(seller)
        again = yield self.program("seller", who)
        answer = yield self.call(again, commands.Offer, cores=1, memory=1024)
        self.assertEqual(answer, {"price": 33_000, "net_fee": 0, "country": "FR"})
        # A seller that never said gets the market's default price.
        fresh, _, answer = yield self.seller("fresh")
        self.assertEqual(answer, {"price": self.market.board.defaults["price"], "net_fee": 0,
                                  "country": None})

    @defer.inlineCallbacks
    def test_many_concurrent_orders_never_oversell(self):
        seller, _, _ = yield self.seller("small", cores=3)
        results = yield defer.gatherResults([self.order(vms=2) for _ in range(15)])
        self.assertEqual(sum(r["allocated"] for r in results), 3)
        starts = yield self.take(seller.started, 3)
        yield self.sleep(0.3)
        self.assertEqual(len(seller.started.pending), 0)
        self.assertEqual(len({s["vm"] for s in starts}), 3)
        self.assertEqual(self.market.orders.used(self.market.sellers()[0]), (3, 768))

    @defer.inlineCallbacks
    def test_absurd_screens_terms_and_budgets_are_refused_naming_the_problem(self):
        seller, who, _ = yield self.seller("sane", price=20_000)
        bad = [
            (dict(max_price=-5), "the maximum price must be an amount between 0"),
            (dict(min_rating=1.5), "the minimum rating must be between 0 and 1"),
            (dict(max_latency=float("nan")), "max_latency: 'nan' is not a finite number"),
            (dict(min_cpu=-1.0), "the minimum CPU score must be between"),
            (dict(countries=["ITA"]), "country 'ITA' is not a two-letter country code"),
            (dict(countries=["IT"], not_countries=["it"]), "IT is both wanted and excluded"),
            (dict(budget=0), "a budget is above 0"),
        ]
        for kw, problem in bad:
            with self.assertRaises(commands.BadRequest) as e:
                yield self.order(**kw)
            self.assertIn(problem, str(e.exception))
        cli = yield self.connect("cli", *who)
        for kw, problem in [(dict(price=0), "the price must be above 0"),
                            (dict(price=10**12), "at most 1000.00"),
                            (dict(net_fee=-1), "the network fee must be 0 or more"),
                            (dict(country="Italy"), "'ITALY' is not a two-letter")]:
            with self.assertRaises(commands.BadRequest) as e:
                yield self.call(cli, commands.SetTerms, **kw)
            self.assertIn(problem, str(e.exception))
        with self.assertRaises(commands.BadRequest):
            yield self.call(seller, commands.Offer, cores=1, memory=1024, price=-3)
        # Nothing changed: no order was made, the terms are as they were.
        self.assertEqual((yield self.call(self.cli, commands.ListVMs))["vms"], [])
        self.assertEqual((yield self.call(cli, commands.SetTerms))["price"], 20_000)

    @defer.inlineCallbacks
    def test_only_a_leases_buyer_rates_it_once_and_the_rating_is_shown(self):
        seller, _, _ = yield self.seller("rated", cores=1, price=6_000_000)
        placed = yield self.order()
        yield self.within(seller.started.get())
        [lease] = (yield self.call(self.cli, commands.ListLeases))["leases"]
        self.assertIsNone(lease["ended"])

        bob = yield self.register("bob")
        bobCli = yield self.connect("cli", *bob)
        with self.assertRaises(commands.BadRequest) as e:
            yield self.call(bobCli, commands.Rate, lease=lease["lease"], good=False)
        self.assertIn(f"you have no lease {lease['lease']}", str(e.exception))
        with self.assertRaises(commands.BadRequest):
            yield self.call(self.cli, commands.Rate, lease=999999, good=True)
        # Nothing billed yet: nothing to rate.
        with self.assertRaises(commands.NotPermitted) as e:
            yield self.call(self.cli, commands.Rate, lease=lease["lease"], good=True)
        self.assertIn("was not billed anything yet", str(e.exception))
        # The VM ran 600 CPU seconds at 6.00 a core-hour: 1.00 billed (all
        # that the ten minutes' hold holds), a full vote.
        yield self.call(seller, commands.VMState, vm=lease["vm"], state="running",
                        cpu_seconds=600.0)
        # It showed life from the start (billing counts only from then).
        yield self.store.run(lambda c: c.execute(
            "UPDATE leases SET started = started - 700, live_since = started - 700"))
        yield self.market.billing.tick()
        [lease] = (yield self.call(self.cli, commands.ListLeases))["leases"]
        self.assertEqual(lease["charged"], MICRO)

        result = yield self.call(self.cli, commands.Rate, lease=lease["lease"], good=True,
                                 comment="fast and steady")
        self.assertEqual(result, {"seller": "rated", "rating": rating(1, 0), "votes": 1})
        with self.assertRaises(commands.NotPermitted) as e:
            yield self.call(self.cli, commands.Rate, lease=lease["lease"], good=False)
        self.assertIn("was already rated good", str(e.exception))
        [shown] = (yield self.sellers())["sellers"]
        self.assertEqual((shown["votes"], shown["rating"]), (1, rating(1, 0)))
        [lease] = (yield self.call(self.cli, commands.ListLeases))["leases"]
        self.assertEqual(lease["rating"], "good")

        # The lease ends with its VM.
        yield self.call(self.cli, commands.CancelOrder, order=placed["order"])
        yield self.sleep(0.2)
        [lease] = (yield self.call(self.cli, commands.ListLeases))["leases"]
        self.assertEqual(lease["reason"], "the order was cancelled")
        self.assertGreaterEqual(lease["ended"], lease["started"])


def test_the_rating_needs_many_votes_to_be_trusted():
    assert rating(0, 0) == 0.0
    assert 0.40 < rating(3, 0) < 0.45
    assert rating(290, 10) > 0.93
    # Three perfect votes do not outweigh three hundred good ones.
    assert rating(3, 0) < rating(290, 10) < rating(300, 0)
    # Nor do three bad votes sink a seller with three hundred good ones.
    assert rating(300, 3) > 0.95
    assert rating(0, 3) == 0.0


class BillingTests(OrderCase):
    """The market side of billing: funds gate placement, run out, leases settle."""

    @defer.inlineCallbacks
    def setUp(self):
        yield OrderCase.setUp(self)
        self.carol = yield self.register("carol")
        self.carolCli = yield self.connect("cli", *self.carol)
        self.carolSha, _, _ = yield defer.ensureDeferred(
            upload.upload(self.reactor, self.carolCli, self.iso))
        self.seller = yield self.program("seller", self.sam)
        # 3.60 a core-hour: 1000 micro-units a core-second.
        yield self.call(self.seller, commands.Offer, cores=2, memory=4096, price=3_600_000)

    def place(self, **kw):
        return self.call(self.carolCli, commands.PlaceOrder, image=self.carolSha, vms=1,
                         cores=1, memory=256, **kw)

    @defer.inlineCallbacks
    def test_a_buyer_without_funds_waits_until_funds_come(self):
        placed = yield self.place()
        self.assertEqual(placed["allocated"], 1)   # capacity was found ...
        yield self.sleep(0.2)
        [vm] = (yield self.call(self.carolCli, commands.ListVMs))["vms"]
        self.assertEqual(vm["state"], "pending")   # ... but not paid for
        self.assertIn("the buyer's funds ran out; add funds with 'cpushare funds add'",
                      vm["reason"])
        self.assertEqual(len(self.seller.started.pending), 0)
        self.assertEqual((yield self.call(self.carolCli, commands.ListLeases))["leases"], [])
        # Alice's VMs are not held back by carol's empty purse.
        alice = yield self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=1, cores=1,
                                memory=256)
        self.assertEqual((yield self.within(self.seller.started.get()))["vm"], alice["vm_ids"][0])

        yield self.store.run(admin.credit, "carol", 5 * MICRO, "trial credit")
        yield self.market.billing.tick()
        self.assertEqual((yield self.within(self.seller.started.get()))["vm"], vm["vm"])
        held = (yield self.balances("carol"))[ledger.HELD]
        self.assertEqual(held, 600 * 1000)         # a 600 s window of one core

    @defer.inlineCallbacks
    def test_a_vm_whose_funds_run_out_is_stopped_and_its_seller_paid(self):
        yield self.store.run(admin.credit, "carol", 150_000, "a little")
        placed = yield self.place()
        [vmId] = placed["vm_ids"]
        yield self.within(self.seller.started.get())
        yield self.showLife(self.seller, vmId)
        self.assertEqual((yield self.balances("carol"))[ledger.HELD], 150_000)
        self.market.billing.interval = 60.0
        # The VM used 100 CPU seconds: 0.10 of the 0.15 held.
        yield self.call(self.seller, commands.VMState, vm=vmId, state="running",
                        cpu_seconds=100.0)
        # As if the lease began 110 s ago (the cap is wall time x cores).
        yield self.store.run(lambda c: c.execute("UPDATE leases SET started = started - 110,"
                                             " live_since = live_since - 110"))
        yield self.market.billing.tick()
        # 0.05 left cannot hold an interval at full tilt (0.06): stopped.
        self.assertEqual((yield self.within(self.seller.stopped.get())), vmId)
        [vm] = (yield self.call(self.carolCli, commands.ListVMs))["vms"]
        self.assertEqual(vm["state"], "stopped")
        self.assertIn("the buyer's funds ran out", vm["reason"])
        # The seller reports the VM's last CPU seconds: the lease is settled.
        yield self.call(self.seller, commands.VMState, vm=vmId, state="stopped",
                        cpu_seconds=104.5)
        yield self.sleep(0.2)
        [lease] = (yield self.call(self.carolCli, commands.ListLeases))["leases"]
        self.assertEqual((lease["cpu_seconds"], lease["charged"]), (104.5, 104_500))
        self.assertEqual((lease["cpu_cost"], lease["net_cost"], lease["held"]), (104_500, 0, 0))
        carol = yield self.balances("carol")
        self.assertEqual((carol[ledger.FUNDS], carol[ledger.HELD]), (45_500, 0))
        self.assertEqual((yield self.balances("sam"))[ledger.EARNINGS], 104_500)
        yield self.checkBooks()


class BandwidthTests(OrderCase):

    @defer.inlineCallbacks
    def test_the_market_measures_a_sellers_bandwidth_on_its_connection(self):
        from cpushare.server.market import measure
        seller = yield self.program("seller", self.sam)
        yield self.call(seller, commands.Offer, cores=1, memory=1024)
        [session] = self.market.sellers()
        down, up = yield defer.ensureDeferred(measure.bandwidth(self.reactor, session, count=4))
        # Loopback in one process: far more than any WAN, and both ways measured.
        self.assertGreater(down, 10.0)
        self.assertGreater(up, 10.0)
        # The meter started by the offer keeps the lower figure, shown to buyers.
        for _ in range(100):
            if session.bandwidthMbps is not None:
                break
            yield self.sleep(0.1)
        [listed] = (yield self.call(self.cli, commands.ListSellers, offset=0,
                                    min_bandwidth=1.0))["sellers"]
        self.assertGreater(listed["bandwidth_mbps"], 1.0)
        excluded = yield self.call(self.cli, commands.ListSellers, offset=0, explain=True,
                                   min_bandwidth=1e6)
        self.assertIn("less than --min-bandwidth 1e+06", excluded["sellers"][0]["excluded"])

    @defer.inlineCallbacks
    def test_a_seller_that_answers_short_gets_no_figure(self):
        from cpushare.server.market import measure
        seller = yield self.program("seller", self.sam)
        seller.control.__class__ = ShortProbeControl
        yield self.call(seller, commands.Offer, cores=1, memory=1024)
        [session] = self.market.sellers()
        with self.assertRaises(measure.UnprovenAnswers) as e:
            yield defer.ensureDeferred(measure.bandwidth(self.reactor, session, count=2))
        self.assertIn("2 of 2 answers to Probe did not carry the bytes asked for",
                      str(e.exception))


class ShortProbeControl(FakeSellerControl):
    @commands.Probe.responder
    def probe(self, nonce, data, back=None):
        answer = {"digest": proof.probeDigest(nonce, data)}
        return dict(answer, data=b"x") if back else answer


class BenchSellerControl(FakeSellerControl):
    """A seller whose VMs are a console that runs the CPU benchmark (or cheats)."""

    @commands.StartVM.responder
    def startVM(self, vm, image, size, cores, memory, mac):
        session = self.session
        session.started.put(dict(vm=vm, image=image, cores=cores, memory=memory))
        channel = commands.consoleChannel(vm)

        def typed(data):
            line = data.decode().strip()
            _, nonce, mb = line.split()
            digest = cpubench.expectedDigest(nonce, int(mb))
            if session.cheat:
                digest = "0" * 64
            answer = f"{line}\r\nCPUSHARE-BENCH-RESULT {nonce} {digest}\r\n/ # \x1b[6n"
            session.reactor.callLater(0.05, session.sendFrame, channel, answer.encode())

        session.route(channel, typed)
        if not session.silent:
            session.reactor.callLater(0.05, session.sendFrame, channel,
                              b"boot...\r\nCPUSHARE-READY mac=x ip=none\r\n/ # \x1b[6n")
        return {}


class BenchSeller(test_orders.FakeProgram):
    controlClass = BenchSellerControl
    cheat = silent = False


class CPUBenchTests(OrderCase):

    @defer.inlineCallbacks
    def setUp(self):
        yield OrderCase.setUp(self)
        image = self.makeFile(5000, b"bench")
        market = self.market
        bench = cpubench.CPUBench(market.reactor, market.store, market.orders,
                                  market.board.invalidate, market.images, image=image,
                                  every=3600, mb=2, timeout=2.0)
        self.market.cpubench = bench
        yield defer.ensureDeferred(bench.prepare(None))
        self.assertTrue(bench.enabled)
        self.addCleanup(bench.stop)
        self.seller = yield self.connect("seller", *self.sam, sessionClass=BenchSeller)
        yield self.call(self.seller, commands.Offer, cores=1, memory=1024)
        [self.session] = self.market.sellers()
        bench.sessionLost(self.session)     # the tests run it themselves

    def measure(self):
        return defer.ensureDeferred(self.market.cpubench.measure(self.session))

    @defer.inlineCallbacks
    def test_the_market_times_a_benchmark_vm_on_the_seller_and_keeps_the_score(self):
        score = yield self.measure()
        started = yield self.within(self.seller.started.get())
        self.assertEqual((started["cores"], started["memory"]), (1, 256))
        self.assertEqual(started["image"], self.market.cpubench.sha256)
        # The VM is stopped at once, and it cost nobody anything.
        self.assertEqual((yield self.within(self.seller.stopped.get())), started["vm"])
        self.assertGreater(score, 0)
        self.assertEqual(self.session.cpuScore, score)
        [listed] = (yield self.call(self.cli, commands.ListSellers, offset=0,
                                    min_cpu=score / 2))["sellers"]
        self.assertAlmostEqual(listed["cpu_score"], score)
        self.assertEqual((yield self.store.run(lambda c: c.execute(
            "SELECT COUNT(*) FROM leases").fetchone()))[0], 0)
        self.assertEqual(self.market.orders.used(self.session), (0, 0))

    @defer.inlineCallbacks
    def test_a_wrong_result_or_no_answer_leaves_no_score(self):
        self.seller.cheat = True
        self.assertIsNone((yield self.measure()))
        self.assertIsNone(self.session.cpuScore)
        excluded = yield self.call(self.cli, commands.ListSellers, offset=0, explain=True,
                                   min_cpu=1.0)
        self.assertIn("no CPU score measured yet", excluded["sellers"][0]["excluded"])
        self.seller.cheat, self.seller.silent = False, True
        self.assertIsNone((yield self.measure()))       # times out after 2 s
        self.assertEqual(self.market.orders.used(self.session), (0, 0))

    @defer.inlineCallbacks
    def test_no_benchmark_when_the_seller_has_no_room(self):
        yield self.order()
        yield self.within(self.seller.started.get())
        self.assertIsNone((yield self.measure()))
        self.assertEqual(len(self.seller.started.pending), 0)
        yield self.sleep(0.1)    # the order's VM has its console up

    def order(self):
        return self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=1, cores=1,
                         memory=256)

    @defer.inlineCallbacks
    def test_a_restart_drops_an_interrupted_benchmark_and_keeps_buyers_vms(self):
        from cpushare.server.market.orders import Orders
        yield self.call(self.seller, commands.Offer, cores=2, memory=1024)
        yield self.order()
        buyerVM = (yield self.within(self.seller.started.get()))["vm"]
        self.seller.silent = True
        self.market.cpubench.timeout = 30.0
        measuring = self.measure()
        benchVM = (yield self.within(self.seller.started.get()))["vm"]
        yield self.sleep(0.2)
        # The market server restarts: its orders are loaded from the database.
        market = self.market
        restarted = Orders(market.reactor, market.store, market.relay, market.board,
                           market.billing, market.buyerSession, market.images, grace=60)
        self.addCleanup(restarted.stop)
        yield defer.ensureDeferred(restarted.load())
        self.assertEqual(sorted(restarted.vms), [buyerVM])
        self.assertEqual(restarted.vms[buyerVM].state, "detached")
        yield self.sleep(0.2)
        state = yield self.store.run(lambda c: c.execute(
            "SELECT state, reason FROM vms WHERE id = ?", (benchVM,)).fetchone())
        self.assertEqual(tuple(state), ("stopped", "the market server restarted"))
        # The benchmark does not wait for a VM that ended.
        self.market.orders._end(self.market.orders.vms[benchVM], "failed", "QEMU crashed")
        self.assertIsNone((yield self.within(measuring)))


def test_measurements_and_benchmarks_wait_for_a_free_slot():
    """Sellers coming back together are measured a few at a time, not all at once."""
    from types import SimpleNamespace

    from twisted.internet.task import Clock

    from cpushare.server.market.measure import BandwidthMeter

    class Control:
        def callRemote(self, command, nonce, data, back=None):
            sent.append(back)
            answer = {"digest": proof.probeDigest(nonce, data)}
            if back:
                answer["data"] = proof.probeFill(nonce, back)
            return defer.succeed(answer)

    sent, measured = [], []
    clock = Clock()
    class Session(SimpleNamespace):
        __hash__ = object.__hash__      # sessions are keys, as the market's are

    session = Session(connected=True, heartbeat=None, control=Control(),
                      account=Account(0, "sam", 0.0), bandwidthMbps=None)
    slots = defer.DeferredSemaphore(1)
    slots.acquire()                     # another seller is being measured
    BandwidthMeter(clock, session, measured.append, slots, first=1.0, every=0)
    clock.advance(1.0)
    assert sent == [] and measured == []
    slots.release()
    assert len(sent) == 32 and measured == [session]
    assert session.bandwidthMbps is not None

    bench = cpubench.CPUBench(clock, None, None, None, every=3600)
    ran = []

    async def measure(s):
        ran.append(s)

    bench.measure = measure
    bench.slots = defer.DeferredSemaphore(1)
    bench.slots.acquire()
    bench._start(session)
    assert ran == [] and session in bench.queued
    bench.slots.release()
    assert ran == [session] and not bench.queued
