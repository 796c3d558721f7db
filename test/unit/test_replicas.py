"""
Replicated runs: each VM of an order run K times, on sellers that differ
in country, CPU and owner as the order asks; what a cheating seller or
buyer would try, on the market in memory (test/fakemarket.py).
"""

import pytest
from twisted.internet import defer

from cpushare.protocol import commands
from cpushare.server.db import marketsql, store
from cpushare.server.money import billing, ledger
from cpushare.server.market import replicas
from cpushare.server.market.replicas import Mark, conflict, cpuBand, network

from test.unit.test_orders import FakeProgram, OrderCase

INTEL = {"cpu_vendor": "GenuineIntel", "cpu_family": "6", "cpu_model": "85"}
AMD = {"cpu_vendor": "AuthenticAMD", "cpu_family": "23", "cpu_model": "49"}
ARM = {"cpu_vendor": "0x41", "cpu_family": "8", "cpu_model": "0xd0c"}


class ReplicaTests(OrderCase):

    @defer.inlineCallbacks
    def seller(self, name, host, country=None, cpu=None, price=None, cores=2, who=None):
        """A seller program of account C{name} connecting from C{host}."""
        if who is None:
            who = yield self.register(name)
        session = yield self.connect("seller", *who, sessionClass=FakeProgram, host=host)
        terms = {k: v for k, v in (("price", price), ("country", country)) if v is not None}
        yield self.call(session, commands.Offer, cores=cores, memory=4096, **terms,
                        **(cpu or {}))
        return session, who

    def order(self, vms=1, **kw):
        return self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=vms, cores=1,
                         memory=256, **kw)

    @defer.inlineCallbacks
    def startedOn(self, *sellers):
        """{seller session: [vm ids started on it]} after the market settles."""
        yield self.sleep(0.5)
        found = {}
        for s in sellers:
            found[s] = [start["vm"] for start in s.started.pending]
            del s.started.pending[:]
        return found

    @defer.inlineCallbacks
    def test_a_seller_with_two_accounts_on_one_network_gets_one_replica_of_a_group(self):
        a, _ = yield self.seller("a1", "192.0.2.10", "IT", INTEL, price=10_000)
        b, _ = yield self.seller("a2", "192.0.2.77", "DE", AMD, price=11_000)
        placed = yield self.order(replicas=2, diverse=["owner"])
        self.assertEqual(placed["allocated"], 1)
        self.assertIn("replica group 1: needs 2 sellers of different owners", placed["waiting"])
        self.assertIn("1 online", placed["waiting"])
        started = yield self.startedOn(a, b)
        self.assertEqual((len(started[a]), len(started[b])), (1, 0))
        # One on another network takes the second replica.
        c, _ = yield self.seller("c", "198.51.100.5", "FR", ARM, price=12_000)
        started = yield self.startedOn(a, b, c)
        self.assertEqual([len(started[s]) for s in (a, b, c)], [0, 0, 1])
        # IPv6: one /48 is one network too.
        self.assertEqual(network("2001:db8:1:2::5"), network("2001:db8:1:ffff::9"))
        self.assertNotEqual(network("2001:db8:1::5"), network("2001:db8:2::5"))
        self.assertEqual(network("::ffff:192.0.2.10"), network("192.0.2.200"))

    @defer.inlineCallbacks
    def test_one_account_never_holds_two_replicas_whatever_the_diversity(self):
        a, who = yield self.seller("sam2", "192.0.2.10", "IT", INTEL)
        b, _ = yield self.seller("sam2", "203.0.113.9", "DE", AMD, who=who)
        placed = yield self.order(replicas=2, diverse=["country"])
        self.assertEqual(placed["allocated"], 1)
        self.assertIn("replica group 1", placed["waiting"])
        started = yield self.startedOn(a, b)
        self.assertEqual(len(started[a]) + len(started[b]), 1)

    @defer.inlineCallbacks
    def test_replicas_do_not_land_in_one_country_when_country_diversity_is_asked(self):
        it1, _ = yield self.seller("it1", "192.0.2.1", "IT", INTEL, price=10_000)
        it2, _ = yield self.seller("it2", "198.51.100.1", "IT", AMD, price=10_500)
        de, _ = yield self.seller("de", "203.0.113.1", "DE", ARM, price=20_000)
        nowhere, _ = yield self.seller("nowhere", "100.64.0.1", None, ARM, price=1_000)
        placed = yield self.order(replicas=3, diverse=["country"], explain=True)
        self.assertEqual(placed["allocated"], 2)
        self.assertIn("replica group 1: needs 3 sellers in different countries, 2 online",
                      placed["waiting"])
        self.assertEqual(placed["explain"], [placed["waiting"]])
        started = yield self.startedOn(it1, it2, de, nowhere)
        self.assertEqual([len(started[s]) for s in (it1, it2, de, nowhere)], [1, 0, 1, 0])
        listed = yield self.call(self.cli, commands.ListSellers, offset=0, replicas=3,
                                 diverse=["country"])
        self.assertIn("needs 3 sellers in different countries", listed["replicas"])
        listed = yield self.call(self.cli, commands.ListSellers, offset=0, replicas=2)
        self.assertIn("2 replicas can be placed now", listed["replicas"])
        vms = (yield self.call(self.cli, commands.ListVMs))["vms"]
        self.assertEqual(sorted(v["replica_group"] for v in vms), [1, 1, 1])

    @defer.inlineCallbacks
    def test_a_restart_keeps_replica_groups_and_their_accounts_apart(self):
        from cpushare.server.market.orders import Orders
        a, who = yield self.seller("a", "192.0.2.1", "IT", INTEL)
        b, _ = yield self.seller("b", "198.51.100.1", "DE", AMD)
        placed = yield self.order(replicas=3)
        self.assertEqual(placed["allocated"], 2)
        market = self.market
        restarted = Orders(market.reactor, market.store, market.relay, market.board,
                           market.billing, market.buyerSession, market.images, grace=60)
        self.addCleanup(restarted.stop)
        yield defer.ensureDeferred(restarted.load())
        vms = [restarted.vms[v] for v in placed["vm_ids"]]
        self.assertEqual({(vm.group, vm.replicas) for vm in vms}, {(1, 3)})
        self.assertEqual(vms[0].diversity, frozenset(replicas.DIVERSITY))
        waiting = [vm for vm in vms if vm.state == "pending"]
        self.assertEqual(len(waiting), 1)
        # Only the accounts of the replicas placed before are known again:
        # the same account is refused, another with the same figures is not.
        placedAccounts = {vm.mark.account for vm in vms if vm.mark is not None}
        self.assertEqual(len(placedAccounts), 2)
        again = market.sellers()[0]
        mark = replicas.markOf(again, market.board.figures(again))
        self.assertIn("already runs", conflict(vms[0].diversity, mark,
                                               restarted._siblingMarks(waiting[0])))

    def score(self, name, score):
        """The market's CPU benchmark gives seller C{name} C{score}."""
        for s in self.market.sellers():
            if s.account.name == name:
                s.cpuScore = score
        self.market.board.invalidate()
        self.market.orders.capacityChanged()

    @defer.inlineCallbacks
    def test_a_seller_lying_about_its_cpu_cannot_put_two_replicas_on_one_kind(self):
        # The market runs its CPU benchmark: a CPU-diverse replica waits for a score.
        self.market.orders.measuresCPU = True
        honest, _ = yield self.seller("honest", "192.0.2.1", "IT", INTEL, price=10_000)
        copycat, _ = yield self.seller("copycat", "198.51.100.1", "DE", INTEL, price=10_500)
        self.score("honest", 120.0)
        self.score("copycat", 300.0)
        placed = yield self.order(replicas=2, diverse=["cpu"])
        self.assertEqual(placed["allocated"], 1)
        self.assertIn("needs 2 sellers with different CPUs, 1 online", placed["waiting"])
        # It says it is an AMD; it is not placed before the market measured it...
        liar, _ = yield self.seller("liar", "203.0.113.1", "FR", AMD, price=11_000)
        started = yield self.startedOn(honest, copycat, liar)
        self.assertEqual([len(started[s]) for s in (honest, copycat, liar)], [1, 0, 0])
        # ...and the market's own benchmark puts it in the honest seller's band.
        self.score("liar", 130.0)
        started = yield self.startedOn(honest, copycat, liar)
        self.assertEqual([len(started[s]) for s in (honest, copycat, liar)], [0, 0, 0])
        vms = (yield self.call(self.cli, commands.ListVMs))["vms"]
        self.assertIn("different CPUs", [v for v in vms if v["state"] == "pending"][0]["reason"])
        # A CPU in another band, with another model, takes it.
        other, _ = yield self.seller("other", "100.64.0.1", "US", ARM, price=12_000)
        self.score("other", 400.0)
        started = yield self.startedOn(honest, copycat, liar, other)
        self.assertEqual([len(started[s]) for s in (honest, copycat, liar, other)],
                         [0, 0, 0, 1])
        # A seller that does not say its CPU never takes a CPU-diverse replica.
        silent, _ = yield self.seller("silent", "100.65.0.1", "ES", None, price=1)
        self.score("silent", 900.0)
        yield self.order(replicas=2, diverse=["cpu"])
        started = yield self.startedOn(silent)
        self.assertEqual(started[silent], [])

    @defer.inlineCallbacks
    def test_absurd_replicas_and_cpu_descriptions_are_refused_naming_the_problem(self):
        seller, _ = yield self.seller("s", "192.0.2.1", "IT", INTEL)
        for kw, problem in [
                (dict(replicas=6), f"at most {replicas.MAX_REPLICAS} (MAX_REPLICAS)"),
                (dict(replicas=1), "--replicas is 2 to 5"),
                (dict(replicas=-3), "--replicas is 2 to 5"),
                (dict(replicas=2 ** 40), "--replicas is 2 to 5"),
                (dict(replicas=2, diverse=["colour"]), "'colour' is not one of country"),
                (dict(diverse=["country"]), "--diverse needs --replicas"),
                (dict(vms=400, replicas=3), "1200 VMs"),
        ]:
            with self.assertRaises(commands.BadRequest) as e:
                yield self.order(**kw)
            self.assertIn(problem, str(e.exception))
        self.assertEqual((yield self.call(self.cli, commands.ListVMs))["vms"], [])
        with self.assertRaises(commands.BadRequest) as e:
            yield self.call(seller, commands.Offer, cores=1, memory=1024,
                            cpu_model="x" * 65, cpu_vendor="v", cpu_family="1")
        self.assertIn("cpu_model", str(e.exception))
        with self.assertRaises(commands.BadRequest) as e:
            yield self.call(seller, commands.Offer, cores=1, memory=1024,
                            cpu_model="1\x1b[2J", cpu_vendor="v", cpu_family="1")
        self.assertIn("printable", str(e.exception))

    @defer.inlineCallbacks
    def test_a_dry_run_shows_the_hold_of_every_replica_and_holds_nothing(self):
        a, _ = yield self.seller("a", "192.0.2.1", "IT", INTEL, price=20_000)
        b, _ = yield self.seller("b", "198.51.100.1", "DE", AMD, price=36_000)
        before = yield self.store.run(ledger.books)
        funds = yield self.store.run(ledger.balance, ledger.FUNDS, self.aliceId)
        plan = yield self.order(vms=2, replicas=2, dry_run=True)
        window = self.market.billing.window
        expected = 2 * (billing.windowCost(20_000, 0, 1, window)
                        + billing.windowCost(36_000, 0, 1, window))
        self.assertEqual(plan["hold"], expected)
        self.assertEqual(plan["allocated"], 4)
        self.assertEqual(plan["vm_ids"], [])
        self.assertEqual(sorted((p["group"], p["seller"]) for p in plan["plan"]),
                         [(1, "a"), (1, "b"), (2, "a"), (2, "b")])
        started = yield self.startedOn(a, b)
        self.assertEqual(started, {a: [], b: []})
        self.assertEqual((yield self.call(self.cli, commands.ListVMs))["vms"], [])
        self.assertEqual((yield self.store.run(ledger.books)), before)
        self.assertEqual((yield self.store.run(ledger.balance, ledger.FUNDS, self.aliceId)),
                         funds)
        yield self.checkBooks()
        # A dry run whose replicas cannot all be placed says so and prices the rest.
        plan = yield self.order(vms=1, replicas=3, dry_run=True)
        self.assertEqual(plan["allocated"], 2)
        self.assertIn("replica group 1: needs 3 sellers", plan["waiting"])
        self.assertEqual(plan["hold"], expected // 2)
        # Without replicas too: the cheapest capacity first, what does not fit waits.
        plan = yield self.order(vms=5, dry_run=True)
        self.assertEqual(plan["allocated"], 4)
        self.assertEqual(plan["hold"], expected)
        self.assertIn("have no room for 1 cores", plan["waiting"])
        self.assertEqual([p["seller"] for p in plan["plan"]], ["a", "a", "b", "b"])
        self.assertEqual((yield self.store.run(ledger.books)), before)


class ReplicaGroupTests(OrderCase):
    """The replicas of a placed order are funded like any VM."""

    @defer.inlineCallbacks
    def test_replicas_of_a_group_are_placed_held_and_listed(self):
        sellers = []
        for i, (cc, cpu) in enumerate((("IT", INTEL), ("DE", AMD))):
            who = yield self.register(f"s{i}")
            s = yield self.connect("seller", *who, sessionClass=FakeProgram,
                                   host=f"10.{i}.0.1")
            yield self.call(s, commands.Offer, cores=2, memory=4096, country=cc, **cpu)
            sellers.append(s)
        placed = yield self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=2,
                                 cores=1, memory=256, replicas=2)
        self.assertEqual(placed["allocated"], 4)
        vms = (yield self.call(self.cli, commands.ListVMs))["vms"]
        self.assertEqual(sorted((v["replica_group"], v["seller"]) for v in vms),
                         [(1, "s0"), (1, "s1"), (2, "s0"), (2, "s1")])
        yield self.sleep(0.5)
        yield self.checkBooks()


def test_the_cpu_benchmark_band_and_networks():
    assert cpuBand(None) is None
    assert cpuBand(0.0) == cpuBand(replicas.CPU_BAND_WIDTH - 1) == 0
    assert cpuBand(replicas.CPU_BAND_WIDTH) == 1
    assert network("192.0.2.10") == "192.0.2.0/24"
    assert network("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert network("?") is None
    a = Mark(account=1, network="192.0.2.0/24", country="IT", cpu=("v", "1", "2"), band=2)
    b = Mark(account=2, network="198.51.100.0/24", country="DE", cpu=("v", "1", "3"), band=3)
    everything = frozenset(replicas.DIVERSITY)
    assert conflict(everything, b, [a]) is None
    assert "same CPU benchmark band" in conflict(everything, b.evolve(band=2), [a])
    assert "no CPU benchmark" not in (conflict(everything, b.evolve(band=None), [a]) or "")
    assert "does not say its CPU" in conflict(everything, b.evolve(cpu=None), [a])
    assert "does not state its country" in conflict(everything, b.evolve(country=None), [a])
    assert "network" in conflict(frozenset(["owner"]), b.evolve(network=a.network), [a])
    assert conflict(frozenset(), b.evolve(network=a.network, country="IT"), [a]) is None
    assert "already runs" in conflict(frozenset(), b.evolve(account=1), [a])


def test_an_orders_replicas_and_groups_are_stored(conn):
    accountId = store.transact(conn, store.createAccount, "alice", "ab" * 32)
    store.transact(conn, store.addAccountImage, accountId, "cd" * 32, 1000, "a.iso")
    orderId, ids = store.transact(conn, store.createOrder, accountId, "cd" * 32, 4, 1, 256)
    store.transact(conn, marketsql.setReplicas, orderId, 2, ["country", "owner"],
                   {vmId: 1 + i // 2 for i, vmId in enumerate(ids)})
    groups = store.transact(conn, marketsql.activeReplicaGroups)
    assert groups == {vmId: (1 + i // 2, 2, ["country", "owner"]) for i, vmId in enumerate(ids)}
    listed = store.transact(conn, store.accountVMs, accountId)
    assert sorted(v["replica_group"] for v in listed) == [1, 1, 2, 2]
    assert store.transact(conn, marketsql.orderReplicas, orderId) == (2, ["country", "owner"])


X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
"""
AARCH64 = """processor\t: 0
BogoMIPS\t: 50.00
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
"""


def test_the_seller_reads_its_cpu_from_proc_cpuinfo(tmp_path):
    from cpushare.client.seller.cpuinfo import offerFields, readOfferFields
    assert offerFields(X86) == {"cpu_vendor": "AuthenticAMD", "cpu_family": "25",
                                "cpu_model": "1"}
    assert offerFields(AARCH64) == {"cpu_vendor": "0x41", "cpu_family": "8",
                                    "cpu_model": "0xd0c"}
    assert offerFields("vendor_id : " + "x" * 500 + "\ncpu family : 6\nmodel : 1\n")[
        "cpu_vendor"] == "x" * commands.CPU_TEXT
    assert readOfferFields(str(tmp_path / "missing")) == {}


@pytest.mark.parametrize("text", ["", "vendor_id\t: GenuineIntel\n",
                                  "vendor_id : \x1b[2J\ncpu family : 6\nmodel : 1\n"])
def test_partial_cpuinfo_gives_no_cpu(text):
    from cpushare.client.seller.cpuinfo import offerFields
    assert offerFields(text) == {}


def test_the_command_line_asks_for_replicas_and_shows_groups_and_the_dry_run():
    from cpushare.client.cli.main import parser
    from cpushare.client.cli.screens import replicaArguments
    from cpushare.client.cli.vms import formatDryRun, formatVMs
    args = parser().parse_args(["order", "place", "--image", "a" * 64, "--vms", "2",
                                "--replicas", "3", "--diverse", "country, owner",
                                "--dry-run", "--explain"])
    assert replicaArguments(args) == {"replicas": 3, "diverse": ["country", "owner"]}
    assert args.dry_run and args.explain
    args = parser().parse_args(["sellers", "--replicas", "2"])
    assert replicaArguments(args) == {"replicas": 2}
    shown = formatDryRun({"order": 0, "vm_ids": [], "allocated": 2, "hold": 6_000,
                          "plan": [{"group": 1, "seller": "a", "country": "IT",
                                    "price": 20_000, "hold": 3_000},
                                   {"group": 1, "seller": "b", "price": 16_000,
                                    "hold": 3_000}],
                          "waiting": "replica group 1: needs 3 sellers in different"
                                     " countries, 2 online"}, 1, 3)
    assert "nothing was placed and nothing is held" in shown
    assert "2 of 3 VMs would be placed now" in shown
    assert "waiting: replica group 1: needs 3 sellers in different countries" in shown
    table = formatVMs([{"vm": 7, "order": 2, "replica_group": 1, "state": "pending",
                        "mac": "m", "cpu_seconds": 0.0},
                       {"vm": 8, "order": 3, "state": "pending", "mac": "m",
                        "cpu_seconds": 0.0}], 0.0)
    header, first, second = table.splitlines()
    assert header.split()[:3] == ["VM", "ORDER", "GROUP"]
    assert first.split()[:3] == ["7", "2", "1"] and second.split()[:3] == ["8", "3", "-"]
