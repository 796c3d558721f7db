"""
What a hostile seller or a self-dealing account tries against the money:
junk frames at a high fee, a VM that never boots, buying its own leases;
and the matching that ranks sellers by what a VM-hour really costs.  On a
real server in this process with fake seller and buyer programs.
"""

from twisted.internet import defer

from cpushare import money
from cpushare.money import MICRO
from cpushare.protocol import commands
from cpushare.protocol.commands import nicChannel
from cpushare.server.money import billing
from cpushare.server.money import ledger

from test.unit.test_orders import OrderCase


class HoldCase(OrderCase):

    @defer.inlineCallbacks
    def seller(self, name, cores=2, **terms):
        """A registered seller program offering capacity at these terms."""
        who = yield self.register(name)
        session = yield self.program("seller", who)
        yield self.call(session, commands.Offer, cores=cores, memory=4096, **terms)
        return session, who

    def order(self, vms=1, **kw):
        return self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=vms, cores=1,
                         memory=256, **kw)

    def sellers(self, **kw):
        return self.call(self.cli, commands.ListSellers, offset=0, **kw)

    @defer.inlineCallbacks
    def settled(self):
        """The leases, once all are settled."""
        def leases(cursor):
            cursor.execute("SELECT vm_id, charged, held, settled, net_bytes, cpu_seconds"
                           " FROM leases ORDER BY id")
            return cursor.fetchall()

        for _ in range(100):
            rows = yield self.store.run(leases)
            if rows and all(row[3] for row in rows):
                return rows
            yield self.sleep(0.05)
        self.fail(f"leases not settled: {rows}")



class NetworkFeeTests(HoldCase):

    @defer.inlineCallbacks
    def test_junk_frames_at_a_high_fee_never_charge_more_than_the_budget(self):
        # A market whose operator allows fees up to 1000.00 a GB, a seller
        # asking that, and alice (100.00 of funds) with an order budget of
        # 1.00: 12 MB of junk from the seller would cost 12.00.
        self.market.board.maxNetFee = 1000 * MICRO
        greedy, _ = yield self.seller("greedy", price=10_000, net_fee=1000 * MICRO)
        buyer = yield self.program("buyer", self.alice)
        before = (yield self.balances("alice"))[ledger.FUNDS]
        placed = yield self.order(budget=MICRO)
        [vm] = placed["vm_ids"]
        yield self.within(greedy.started.get())
        yield self.within(buyer.attached.get())
        received = []
        buyer.route(nicChannel(vm), received.append)
        junk = b"\xff" * 6 + b"\x00" * 1494
        # 8000 frames, a batch at a time so the seller's own queue takes them.
        for _ in range(80):
            for _ in range(100):
                greedy.sendFrame(nicChannel(vm), junk)
            yield self.sleep(0.01)
        # The hold is spent: the VM is stopped, and the buyer is told why.
        self.assertEqual((yield self.within(greedy.stopped.get())), vm)
        detachedVM, why = yield self.within(buyer.detached.get())
        self.assertEqual(detachedVM, vm)
        self.assertIn("the funds held for this VM are spent by its network traffic", why)
        [shown] = (yield self.call(self.cli, commands.ListVMs))["vms"]
        self.assertEqual((shown["state"], shown["reason"]), ("stopped", why))
        yield self.call(greedy, commands.VMState, vm=vm, state="stopped", cpu_seconds=1.0)
        # A billing tick on the way changes nothing.
        yield self.market.billing.tick()
        [(_, charged, held, _, netBytes, _)] = yield self.settled()
        self.assertLessEqual(charged, MICRO)
        self.assertEqual(held, 0)
        # Frames stopped at about 1 MB: what 1.00 buys at 1000.00 a GB.
        self.assertLessEqual(netBytes, MICRO * 10**9 // (1000 * MICRO))
        self.assertLess(sum(map(len, received)), 1_100_000)
        after = yield self.balances("alice")
        self.assertEqual(before - after[ledger.FUNDS], charged)
        self.assertEqual(after[ledger.HELD], 0)
        self.assertEqual((yield self.balances("greedy"))[ledger.EARNINGS], charged)
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_a_buyer_with_funds_keeps_its_traffic_flowing_past_one_hold(self):
        # A hold of 1 MB of traffic a window (instead of 1 GB) at 1000.00 a
        # GB: 1.00.  Alice has 100.00 and no budget: each time the traffic
        # spends the hold, the VM is billed and the hold topped up.
        self.patch(billing, "NET_ALLOWANCE", 10**6)
        self.market.board.maxNetFee = 1000 * MICRO
        greedy, _ = yield self.seller("greedy", price=10_000, net_fee=1000 * MICRO)
        buyer = yield self.program("buyer", self.alice)
        before = (yield self.balances("alice"))[ledger.FUNDS]
        placed = yield self.order()
        [vm] = placed["vm_ids"]
        yield self.within(greedy.started.get())
        yield self.within(buyer.attached.get())
        received = []
        buyer.route(nicChannel(vm), received.append)
        frame = b"\xff" * 6 + b"\x00" * 1494
        while sum(map(len, received)) < 3_500_000:
            for _ in range(50):
                greedy.sendFrame(nicChannel(vm), frame)
            yield self.sleep(0.01)
            self.assertEqual(len(greedy.stopped.pending), 0)
        [shown] = (yield self.call(self.cli, commands.ListVMs))["vms"]
        self.assertNotIn(shown["state"], ("stopped", "failed"))
        yield self.call(self.cli, commands.StopVM, vm=vm)
        yield self.call(greedy, commands.VMState, vm=vm, state="stopped", cpu_seconds=0.0)
        [(_, charged, held, _, netBytes, _)] = yield self.settled()
        # Every byte delivered was paid for, from holds topped up as it went.
        self.assertGreaterEqual(netBytes, 3_500_000)
        self.assertEqual(charged, money.cost(10_000, 1000 * MICRO, 0.0, netBytes))
        self.assertEqual(before - (yield self.balances("alice"))[ledger.FUNDS], charged)
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_matching_ranks_sellers_by_what_a_vm_hour_really_costs(self):
        # 0.01 a core-hour but 0.50 a GB, against 0.05 a core-hour and free traffic.
        yield self.seller("cheapcpu", price=10_000, net_fee=MICRO // 2)
        flat, _ = yield self.seller("flat", price=50_000)
        listed = yield self.sellers()
        self.assertEqual([s["name"] for s in listed["sellers"]], ["flat", "cheapcpu"])
        # A buyer that expects no traffic gets the cheaper CPU first.
        listed = yield self.sellers(traffic=0.0)
        self.assertEqual([s["name"] for s in listed["sellers"]], ["cheapcpu", "flat"])
        # 0.05 a GB: 0.01 + 0.05 x 0.5 GB = 0.035 < 0.05.
        placed = yield self.order()
        self.assertEqual((yield self.within(flat.started.get()))["vm"], placed["vm_ids"][0])
        # --max-net-fee screens the fee out, with the reason.
        listed = yield self.sellers(max_net_fee=MICRO // 10, explain=True, traffic=0.0)
        self.assertEqual(listed["passing"], 1)
        reasons = {s["name"]: s.get("excluded") for s in listed["sellers"]}
        self.assertEqual(reasons["cheapcpu"], "charges 0.50 a GB, more than --max-net-fee 0.10")

    @defer.inlineCallbacks
    def test_the_operators_ceiling_on_fees_refuses_higher_terms(self):
        _, who = yield self.seller("modest", net_fee=MICRO // 2)
        greedy = yield self.program("seller", (yield self.register("greedy")))
        with self.assertRaises(commands.BadRequest) as e:
            yield self.call(greedy, commands.Offer, cores=1, memory=1024, net_fee=2 * MICRO)
        self.assertIn("the network fee 2.00 a GB is above this market's ceiling of 1.00 a GB",
                      str(e.exception))
        cli = yield self.connect("cli", *who)
        with self.assertRaises(commands.BadRequest) as e:
            yield self.call(cli, commands.SetTerms, net_fee=1000 * MICRO)
        self.assertIn("ceiling of 1.00 a GB (the server's --max-net-fee)", str(e.exception))
        self.assertEqual((yield self.call(cli, commands.SetTerms))["net_fee"], MICRO // 2)
        # The operator lowers the ceiling below a seller's stored fee: it is
        # not matched, and --explain says why.
        self.market.board.maxNetFee = MICRO // 4
        self.market.board.invalidate()
        listed = yield self.sellers(explain=True)
        self.assertEqual(listed["passing"], 0)
        self.assertEqual([s["excluded"] for s in listed["sellers"]],
                         ["charges 0.50 a GB, above the market's ceiling of 0.25"])
        placed = yield self.order()
        self.assertIn("1 by ceiling", placed["waiting"])


class SelfDealingTests(HoldCase):

    @defer.inlineCallbacks
    def test_an_account_is_never_matched_with_itself(self):
        # Alice sells too, cheaper than anybody: her own orders never go there.
        own = yield self.program("seller", self.alice)
        yield self.call(own, commands.Offer, cores=4, memory=4096, price=1)
        placed = yield self.order()
        self.assertEqual(placed["allocated"], 0)
        self.assertIn("none of the 1 sellers online passes the screens (1 by own account)",
                      placed["waiting"])
        for explain in (True, False):
            listed = yield self.sellers(explain=explain)
            self.assertEqual(listed["passing"], 0)
            self.assertEqual([(s["name"], s["excluded"]) for s in listed["sellers"]],
                             [("alice", "is your own account: an account is never matched"
                                        " with itself")])
        # Another seller comes, dearer: the waiting VM goes there, not to alice.
        other, _ = yield self.seller("other", price=90_000)
        self.assertEqual((yield self.within(other.started.get()))["vm"], placed["vm_ids"][0])
        self.assertEqual(len(own.started.pending), 0)
        # Other buyers see alice's capacity as usual.
        bob = yield self.register("bob")
        bobCli = yield self.connect("cli", *bob)
        listed = yield self.call(bobCli, commands.ListSellers, offset=0)
        self.assertEqual(listed["sellers"][0]["name"], "alice")


class PaidForNothingTests(HoldCase):

    @defer.inlineCallbacks
    def test_a_seller_that_fakes_a_vm_without_frames_or_console_earns_nothing(self):
        faker, _ = yield self.seller("faker", price=3_600_000)
        honest, _ = yield self.seller("honest", price=3_600_000)
        placed = yield self.order(vms=4)
        starts = [s["vm"] for s in (yield defer.gatherResults(
            [self.within(faker.started.get()), self.within(faker.started.get()),
             self.within(honest.started.get()), self.within(honest.started.get())]))]
        fakeVMs, honestVMs = starts[:2], starts[2:]
        self.assertEqual(sorted(starts), sorted(placed["vm_ids"]))
        # The honest VMs boot: one prints on its console, the other asks
        # DHCP from the buyer's network.
        buyer = yield self.program("buyer", self.alice)
        yield self.within(buyer.attached.get())
        yield self.within(buyer.attached.get())
        yield self.within(buyer.attached.get())
        yield self.within(buyer.attached.get())
        honest.sendFrame(commands.consoleChannel(honestVMs[0]), b"Booting Linux\r\n")
        honest.sendFrame(nicChannel(honestVMs[1]), b"\xff" * 6 + b"dhcp discover")
        # The faker says its VMs run flat out, and sends nothing else.
        for vm in fakeVMs:
            yield self.call(faker, commands.VMState, vm=vm, state="running", cpu_seconds=0.0)
        for vm in honestVMs:
            yield self.showLifeSaved(vm)

        clock = self.reactor

        class HourLater:
            def seconds(self):
                return clock.seconds() + 3600

        for vm in fakeVMs:
            yield self.call(faker, commands.VMState, vm=vm, state="running",
                            cpu_seconds=3600.0)
        for vm in honestVMs:
            yield self.call(honest, commands.VMState, vm=vm, state="running",
                            cpu_seconds=100.0)
        self.patch(self.market.billing, "reactor", HourLater())
        yield self.market.billing.tick()
        yield self.call(self.cli, commands.CancelOrder, order=placed["order"])
        for seller, vms in ((faker, fakeVMs), (honest, honestVMs)):
            for vm in vms:
                yield self.call(seller, commands.VMState, vm=vm, state="stopped",
                                cpu_seconds=3600.0 if seller is faker else 100.0)
        rows = {row[0]: row for row in (yield self.settled())}
        for vm in fakeVMs:
            self.assertEqual(rows[vm][1], 0)
        for vm in honestVMs:
            self.assertEqual(rows[vm][1], 100 * 1000)     # 100 CPU s at 0.001 a second
        self.assertEqual((yield self.balances("faker"))[ledger.EARNINGS], 0)
        self.assertEqual((yield self.balances("honest"))[ledger.EARNINGS], 200_000)
        yield self.checkBooks()

    @defer.inlineCallbacks
    def showLifeSaved(self, vmId):
        def alive(cursor):
            cursor.execute("SELECT live_since FROM leases WHERE vm_id = ?", (vmId,))
            return cursor.fetchone()[0] is not None

        for _ in range(100):
            if (yield self.store.run(alive)):
                return
            yield self.sleep(0.05)
        self.fail(f"VM {vmId} never showed life")
