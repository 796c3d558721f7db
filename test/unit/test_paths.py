"""
The market's brokering of direct paths between the sellers of one buyer
network (cpushare/server/market/paths.py), on the market in memory: who
gets which secret and whose MACs, what a lying seller's report does, and
what the buyer sees and pays.
"""

from twisted.internet import defer

from cpushare.client.cli import upload
from cpushare.money import MICRO
from cpushare.protocol import commands
from cpushare.server import admin
from cpushare.server.market import paths as paths_

from cpushare.server.db.store import Account

from test.fakemarket import LogCapture
from test.sitebrowser import SiteCase
from test.unit.test_site_vms import PASSWORD, rows
from test.unit.test_orders import FakeProgram, FakeSellerControl, OrderCase

GB = 10 ** 9


class MeshSellerControl(FakeSellerControl):
    @commands.MeshPeers.responder
    def meshPeers(self, network, vms, peers):
        self.session.views.append((network, sorted(vms), peers))
        return {}


class MeshProgram(FakeProgram):
    controlClass = MeshSellerControl

    def __init__(self, *a, **kw):
        FakeProgram.__init__(self, *a, **kw)
        self.views = []

    def lastView(self, network):
        for view in reversed(self.views):
            if view[0] == network:
                return view
        return None


class PathsCase(OrderCase):

    @defer.inlineCallbacks
    def seller(self, name, candidates=(("192.0.2.10", 4000),), cores=1, netFee=None):
        who = self.lastWho = yield self.register(name)
        session = yield self.connect("seller", *who, sessionClass=MeshProgram)
        terms = {} if netFee is None else {"net_fee": netFee}
        yield self.call(session, commands.Offer, cores=cores, memory=4096, **terms)
        if candidates:
            yield self.call(session, commands.MeshCandidates,
                            candidates=[{"host": h, "port": p} for h, p in candidates])
        return session

    @defer.inlineCallbacks
    def place(self, cli, vms):
        placed = yield self.call(cli, commands.PlaceOrder, image=self.sha, vms=vms, cores=1,
                                 memory=256)
        yield self.sleep(0.5)
        return placed["vm_ids"]

    def report(self, seller, network, peer, state="direct", rtt=None, **counts):
        """C{counts}: vm<id>=(sent, received)."""
        vms = [{"vm": int(k[2:]), "sent": s, "received": r} for k, (s, r) in counts.items()]
        row = {"network": network, "peer": peer, "state": state, "vms": vms}
        if rtt is not None:
            row["rtt_ms"] = rtt
        return self.call(seller, commands.MeshReport, paths=[row])

    @defer.inlineCallbacks
    def listPaths(self):
        answer = yield self.call(self.cli, commands.ListPaths)
        return answer["paths"]

    @defer.inlineCallbacks
    def twoSellers(self, netFee=None):
        sam = yield self.seller("sam1", [("192.0.2.10", 4000), ("10.0.0.5", 4000)],
                                netFee=netFee)
        sue = yield self.seller("sue1", [("198.51.100.7", 5000)], netFee=netFee)
        self.sueWho = self.lastWho
        first, second = yield self.place(self.cli, 2)
        onSam = {vm for vm in (first, second) if self.market.orders.vms[vm].seller.account.name
                 == "sam1"}
        [samVM], [sueVM] = sorted(onSam), sorted({first, second} - onSam)
        return sam, sue, samVM, sueVM


class BrokeringTests(PathsCase):

    @defer.inlineCallbacks
    def test_two_sellers_of_one_network_get_the_same_secret_and_each_others_vms(self):
        sam, sue, samVM, sueVM = yield self.twoSellers()
        network, vms, [toSue] = sam.lastView(self.aliceId)
        self.assertEqual(vms, [samVM])
        _, vms, [toSam] = sue.lastView(self.aliceId)
        self.assertEqual(vms, [sueVM])
        self.assertEqual(toSue["peer"], sue.info["session"])
        self.assertEqual(toSam["peer"], sam.info["session"])
        self.assertEqual(len(toSue["secret"]), 32)
        self.assertEqual(toSue["secret"], toSam["secret"])
        # Each writes the id the other chose.
        self.assertEqual(toSue["remote_session"], toSam["local_session"])
        self.assertEqual(toSam["remote_session"], toSue["local_session"])
        self.assertNotEqual(toSue["local_session"], toSam["local_session"])
        self.assertEqual([(c["host"], c["port"]) for c in toSue["candidates"]],
                         [("198.51.100.7", 5000)])
        self.assertEqual([(c["host"], c["port"]) for c in toSam["candidates"]],
                         [("192.0.2.10", 4000), ("10.0.0.5", 4000)])
        self.assertEqual(toSue["macs"], [self.market.orders.vms[sueVM].mac])
        self.assertEqual(toSam["macs"], [self.market.orders.vms[samVM].mac])

    @defer.inlineCallbacks
    def test_another_buyers_network_on_the_same_sellers_has_its_own_secret(self):
        sam, sue, samVM, sueVM = yield self.twoSellers()
        bob = yield self.register("bob")
        bobCli = yield self.connect("cli", *bob)
        bobId = (yield self.call(bobCli, commands.WhoAmI))["account_id"]
        yield self.store.run(admin.credit, "bob", 100 * MICRO, "funds for the tests")
        yield defer.ensureDeferred(upload.upload(self.reactor, bobCli, self.iso))
        # Both sellers are full: one more core each for Bob.
        yield self.call(sam, commands.Offer, cores=2, memory=4096)
        yield self.call(sue, commands.Offer, cores=2, memory=4096)
        bobVMs = yield self.place(bobCli, 2)
        self.assertEqual(len(bobVMs), 2)
        _, samBob, [bobPeer] = sam.lastView(bobId)
        _, samAlice, [alicePeer] = sam.lastView(self.aliceId)
        self.assertNotEqual(bobPeer["secret"], alicePeer["secret"])
        self.assertNotEqual(bobPeer["local_session"], alicePeer["local_session"])
        self.assertFalse(set(samBob) & set(samAlice))
        self.assertFalse(set(bobPeer["macs"]) & set(alicePeer["macs"]))
        self.assertNotIn(self.market.orders.vms[sueVM].mac, bobPeer["macs"])

    @defer.inlineCallbacks
    def test_a_seller_without_a_udp_path_gets_no_view_and_its_pairs_are_relayed(self):
        sam, sue, samVM, sueVM = yield self.twoSellers()
        ned = yield self.seller("ned1", candidates=())
        [nedVM] = yield self.place(self.cli, 1)
        self.assertEqual(self.market.orders.vms[nedVM].seller.account.name, "ned1")
        self.assertEqual(ned.views, [])
        # The others have no pair with it: its VM's frames go through the relay.
        self.assertEqual(len(sam.lastView(self.aliceId)[2]), 1)
        listed = yield self.listPaths()
        self.assertEqual(len(listed), 3)
        withNed = [p for p in listed if "ned1" in (p["seller_a"], p["seller_b"])]
        self.assertEqual([p["state"] for p in withNed], ["relayed", "relayed"])
        self.assertIn("ned1 has no UDP path to the market", withNed[0]["why"])

    @defer.inlineCallbacks
    def test_a_vm_that_ends_takes_its_seller_out_of_the_network(self):
        sam, sue, samVM, sueVM = yield self.twoSellers()
        yield self.call(self.cli, commands.StopVM, vm=sueVM)
        yield self.sleep(0.5)
        self.assertEqual(sue.lastView(self.aliceId), (self.aliceId, [], []))
        self.assertEqual(sam.lastView(self.aliceId), (self.aliceId, [samVM], []))
        self.assertEqual((yield self.listPaths()), [])
        # A report on the pair now is ignored, never billed.
        yield self.report(sam, self.aliceId, sue.info["session"], **{f"vm{samVM}": (500, 0)})
        self.assertEqual(self.market.paths.ignored["no such path"], 1)

    @defer.inlineCallbacks
    def test_a_seller_that_reconnects_is_brokered_anew_with_a_new_secret(self):
        sam, sue, samVM, sueVM = yield self.twoSellers()
        old = sam.lastView(self.aliceId)[2][0]
        sue.transport.loseConnection()
        yield self.sleep(1)
        self.assertEqual(sam.lastView(self.aliceId), (self.aliceId, [samVM], []))
        back = yield self.connect("seller", *self.sueWho, sessionClass=MeshProgram)
        keep = yield self.call(back, commands.ReattachVMs, vms=[sueVM])
        self.assertEqual(keep["keep"], [sueVM])
        yield self.call(back, commands.MeshCandidates,
                        candidates=[{"host": "198.51.100.7", "port": 5001}])
        yield self.sleep(0.1)
        [new] = sam.lastView(self.aliceId)[2]
        self.assertEqual(new["peer"], back.info["session"])
        self.assertNotEqual(new["peer"], old["peer"])
        self.assertNotEqual(new["secret"], old["secret"])
        self.assertEqual(back.lastView(self.aliceId)[2][0]["secret"], new["secret"])

    @defer.inlineCallbacks
    def test_new_candidates_are_sent_to_the_peers_with_the_same_secret(self):
        sam, sue, samVM, sueVM = yield self.twoSellers()
        before = sam.lastView(self.aliceId)[2][0]
        yield self.call(sue, commands.MeshCandidates,
                        candidates=[{"host": "198.51.100.7", "port": 6000}])
        yield self.sleep(0.1)
        after = sam.lastView(self.aliceId)[2][0]
        self.assertEqual(after["candidates"], [{"host": "198.51.100.7", "port": 6000}])
        self.assertEqual((after["secret"], after["local_session"]),
                         (before["secret"], before["local_session"]))


class ReportTests(PathsCase):

    @defer.inlineCallbacks
    def test_the_buyer_sees_a_pair_direct_only_when_both_ends_say_so(self):
        sam, sue, samVM, sueVM = yield self.twoSellers()
        samId, sueId = sam.info["session"], sue.info["session"]
        [pair] = yield self.listPaths()
        self.assertEqual(pair["state"], "trying")
        self.assertEqual(sorted(pair["vms_a"] + pair["vms_b"]), sorted([samVM, sueVM]))
        yield self.report(sam, self.aliceId, sueId, "direct", rtt=2.0)
        [pair] = yield self.listPaths()
        self.assertEqual(pair["state"], "trying")
        yield self.report(sue, self.aliceId, samId, "direct", rtt=4.0)
        [pair] = yield self.listPaths()
        self.assertEqual(pair["state"], "direct")
        self.assertAlmostEqual(pair["rtt_ms"], 3.0)
        yield self.report(sue, self.aliceId, samId, "relayed")
        [pair] = yield self.listPaths()
        self.assertEqual(pair["state"], "relayed")
        self.assertIn("hole punching failed", pair["why"])

    @defer.inlineCallbacks
    def test_the_smaller_count_is_billed_and_a_mismatch_is_logged_against_both(self):
        sam, sue, samVM, sueVM = yield self.twoSellers(netFee=1_000_000)
        yield self.showLife(sam, samVM)
        yield self.showLife(sue, sueVM)
        samId, sueId = sam.info["session"], sue.info["session"]
        with LogCapture() as logs:
            for _ in range(3):
                # Sam says it sent 30 MB; Sue says it received 18, and nothing moves.
                yield self.report(sam, self.aliceId, sueId, **{f"vm{samVM}": (3 * 10**7, 0)})
                yield self.report(sue, self.aliceId, samId, **{f"vm{sueVM}": (0, 18 * 10**6)})
        [pair] = yield self.listPaths()
        self.assertEqual(pair["direct_bytes"], 18 * 10**6)
        orders = self.market.orders
        self.assertEqual(orders.vms[samVM].netDirect, 18 * 10**6)
        self.assertEqual(orders.vms[sueVM].netDirect, 18 * 10**6)
        mismatches = [t for t in logs.texts() if "mismatch logged against both" in t]
        self.assertEqual(mismatches, [
            f"mesh: network {self.aliceId}: sam1 says it sent 30000000 bytes directly to sue1,"
            " which says it received 18000000; billed 18000000, the smaller (mismatch logged"
            " against both)"])
        self.assertEqual(self.market.paths.mismatches, {"sam1": 1, "sue1": 1})
        # The lease's bill counts the direct bytes as it counts the relay's.
        yield self.call(self.cli, commands.StopVM, vm=samVM)
        yield self.sleep(20)

        def netBytes(cursor):
            cursor.execute("SELECT net_bytes FROM leases WHERE vm_id = ?", (samVM,))
            return cursor.fetchone()[0]
        self.assertGreaterEqual((yield self.store.run(netBytes)), 18 * 10**6)
        yield self.checkBooks()

    @defer.inlineCallbacks
    def test_counts_in_flight_or_within_the_tolerance_are_not_a_mismatch(self):
        sam, sue, samVM, sueVM = yield self.twoSellers()
        samId, sueId = sam.info["session"], sue.info["session"]
        with LogCapture() as logs:
            # Frames flowing: each report sees more; the ends report at other moments.
            for step in range(1, 6):
                yield self.report(sam, self.aliceId, sueId, **{f"vm{samVM}": (step * 10**8, 0)})
                yield self.report(sue, self.aliceId, samId,
                                  **{f"vm{sueVM}": (0, step * 10**8 + 5 * 10**7)})
            # Quiet, and within 5 %.
            for _ in range(3):
                yield self.report(sam, self.aliceId, sueId, **{f"vm{samVM}": (6 * 10**8, 0)})
                yield self.report(sue, self.aliceId, samId, **{f"vm{sueVM}": (0, 58 * 10**7)})
        self.assertFalse([t for t in logs.texts() if "mismatch" in t])
        [pair] = yield self.listPaths()
        self.assertEqual(pair["direct_bytes"], 58 * 10**7)

    @defer.inlineCallbacks
    def test_a_seller_cannot_bill_for_another_sellers_vm_or_take_bytes_back(self):
        sam, sue, samVM, sueVM = yield self.twoSellers(netFee=1_000_000)
        yield self.showLife(sam, samVM)
        yield self.showLife(sue, sueVM)
        samId, sueId = sam.info["session"], sue.info["session"]
        paths = self.market.paths
        # Sam claims bytes for Sue's VM: ignored.
        yield self.report(sam, self.aliceId, sueId, **{f"vm{sueVM}": (10**9, 10**9)})
        self.assertEqual(paths.ignored["not its VM"], 1)
        yield self.report(sam, self.aliceId, sueId, **{f"vm{samVM}": (5 * 10**6, 0)})
        yield self.report(sue, self.aliceId, samId, **{f"vm{sueVM}": (0, 5 * 10**6)})
        self.assertEqual(self.market.orders.vms[sueVM].netDirect, 5 * 10**6)
        # Counts that go back are ignored: nothing is refunded or billed twice.
        yield self.report(sue, self.aliceId, samId, **{f"vm{sueVM}": (0, 1)})
        self.assertEqual(paths.ignored["counts went back"], 1)
        self.assertEqual(self.market.orders.vms[sueVM].netDirect, 5 * 10**6)
        # A pair of another network, or with itself: nothing.
        yield self.report(sam, self.aliceId + 99, sueId, **{f"vm{samVM}": (10**9, 0)})
        yield self.report(sam, self.aliceId, samId, **{f"vm{samVM}": (10**9, 0)})
        self.assertEqual(paths.ignored["no such path"], 2)
        # Absurd fields are refused by name.
        with self.assertRaises(commands.BadRequest) as caught:
            yield self.report(sam, self.aliceId, sueId, state="warp")
        self.assertIn("unknown path state 'warp'", str(caught.exception))
        with self.assertRaises(commands.BadRequest) as caught:
            yield self.report(sam, self.aliceId, sueId, **{f"vm{samVM}": (-1, 0)})
        self.assertIn("byte counts out of range", str(caught.exception))
        # A buyer's connection reports nothing.
        with self.assertRaises(commands.BadRequest):
            yield self.report(self.cli, self.aliceId, sueId)
        self.assertEqual(self.market.orders.vms[samVM].netDirect, 5 * 10**6)

    @defer.inlineCallbacks
    def test_another_buyer_sees_none_of_the_paths(self):
        yield self.twoSellers()
        bob = yield self.register("bob")
        bobCli = yield self.connect("cli", *bob)
        self.assertEqual((yield self.call(bobCli, commands.ListPaths))["paths"], [])
        self.assertEqual(len((yield self.listPaths())), 1)


class LimitTests(PathsCase):

    def test_a_network_meshes_its_first_sellers_and_each_of_them_sees_all_the_others(self):
        """Over MESH_PEERS + 1 sellers the rest stays relayed, never half-paired."""
        from twisted.internet.task import Clock

        class Seller:
            connected = False

            def __init__(self, n):
                self.sessionId = n
                self.meshCandidates = [("192.0.2.1", 1000 + n)]
                self.account = type("A", (), {"name": f"s{n}"})

        class VM:
            def __init__(self, n):
                self.id, self.buyerId, self.mac = n, 7, f"0a:cb:00:00:00:{n:02x}"

        clock = Clock()
        sent = []
        paths = paths_.Paths(clock)
        paths._send = lambda seller, network, vms, peers, delay: sent.append((seller, peers))
        sellers = [Seller(n) for n in range(1, commands.MESH_PEERS + 4)]
        for n, seller in enumerate(sellers, 1):
            paths.joined(VM(n), seller)
        clock.advance(0)
        views = {seller.sessionId: {p["peer"] for p in peers} for seller, peers in sent}
        meshed = set(range(1, commands.MESH_PEERS + 2))
        for n, peers in views.items():
            if n in meshed:
                self.assertEqual(peers, meshed - {n})
            else:
                self.assertEqual(peers, set())
        # Every session id a seller writes is unique on that seller.
        self.assertEqual(len(sent), len(sellers))


class PathsPageTests(SiteCase, PathsCase):

    async def test_the_vms_page_shows_each_pair_of_sellers_and_nobody_elses(self):
        sam, sue, samVM, sueVM = await self.twoSellers()
        samId, sueId = sam.info["session"], sue.info["session"]
        await self.report(sam, self.aliceId, sueId, "direct", rtt=2.0)
        await self.report(sue, self.aliceId, samId, "direct", rtt=4.0)
        await self.market.weblogins.setPassword(Account(self.aliceId, "alice", "now"), PASSWORD)
        browser = self.browser()
        form = await browser.get("/login")
        await browser.post("/login", {"name": "alice", "password": PASSWORD,
                                      "csrf": form.csrf()})
        page = await browser.get("/vms")
        self.assertEqual(page.status, 200)
        [row] = rows(page, "paths")
        self.assertEqual(row, f"sam1 – sue1 {samVM} – {sueVM} direct 3.0 ms 0")
        # Sue's side goes quiet: the page says relayed, and why.
        await self.report(sue, self.aliceId, samId, "relayed")
        [row] = rows(await browser.get("/vms"), "paths")
        self.assertIn("relayed", row)
        self.assertIn("hole punching failed or the path went silent", row)
        # Bob, who has no VMs there, sees no pair at all.
        bob = await self.register("bob")
        cli = await self.connect("cli", *bob)
        bobId = (await cli.control.callRemote(commands.WhoAmI))["account_id"]
        await self.market.weblogins.setPassword(Account(bobId, "bob", "now"), PASSWORD)
        other = self.browser()
        form = await other.get("/login")
        await other.post("/login", {"name": "bob", "password": PASSWORD, "csrf": form.csrf()})
        page = await other.get("/vms")
        self.assertNotIn('id="paths"', page.text)
        self.assertNotIn("sue1", page.text)


class SyncTests(PathsCase):

    def test_the_nearer_sellers_view_leaves_later_so_both_start_punching_together(self):
        from twisted.internet.task import Clock

        clock = Clock()
        arrived = {}

        class Heartbeat:
            def __init__(self, rtt):
                self.rtt = rtt

            def latencyMs(self):
                return self.rtt

        class Control:
            def __init__(self, seller):
                self.seller = seller

            def callRemote(self, command, **kw):
                # The view reaches the seller one way later.
                arrived[self.seller.sessionId] = clock.seconds() + paths_.oneWay(self.seller)
                return defer.succeed({})

        class Seller:
            connected = True

            def __init__(self, n, rtt):
                self.sessionId = n
                self.meshCandidates = [("192.0.2.1", 1000 + n)]
                self.account = type("A", (), {"name": f"s{n}"})
                self.heartbeat = Heartbeat(rtt)
                self.control = Control(self)

        class VM:
            def __init__(self, n):
                self.id, self.buyerId, self.mac = n, 7, f"0a:cb:00:00:00:{n:02x}"

        paths = paths_.Paths(clock)
        far, near, unknown = Seller(1, 180.0), Seller(2, 20.0), Seller(3, None)
        for n, seller in enumerate((far, near, unknown), 1):
            paths.joined(VM(n), seller)
        clock.advance(0)
        self.assertEqual(set(arrived), {1})
        clock.advance(0.08)
        self.assertEqual(set(arrived), {1, 2})
        clock.advance(0.01)         # a round trip not measured yet counts as none
        self.assertEqual(set(arrived), {1, 2, 3})
        self.assertAlmostEqual(arrived[1], 0.09)
        self.assertAlmostEqual(arrived[2], 0.09)
        self.assertAlmostEqual(arrived[3], 0.09)
        # A view that changes nothing is not sent again, and an absurd round
        # trip holds a view back at most MAX_SYNC_DELAY.
        far.heartbeat.rtt = 10 ** 7
        self.assertEqual(paths_.oneWay(far), paths_.MAX_SYNC_DELAY)


def test_vms_paths_prints_each_pair_with_its_state_round_trip_and_reason():
    from cpushare.client.cli.vms import formatPaths
    text = formatPaths([
        {"index": 0, "seller_a": "sam", "seller_b": "sue", "vms_a": [1, 4], "vms_b": [2],
         "state": "direct", "rtt_ms": 6.84, "direct_bytes": 2290112},
        {"index": 1, "seller_a": "sam", "seller_b": "ned", "vms_a": [1, 4], "vms_b": [3],
         "state": "relayed", "direct_bytes": 0, "why": "ned has no UDP path to the market"},
    ])
    header, direct, relayed = text.splitlines()
    assert header.split() == ["SELLERS", "VMS", "PATH", "RTT", "DIRECT", "BYTES", "WHY"]
    assert direct.split() == ["sam", "-", "sue", "1,4", "-", "2", "direct", "6.8", "ms",
                              "2290112"]
    assert relayed.split()[:8] == ["sam", "-", "ned", "1,4", "-", "3", "relayed", "-"]
    assert relayed.endswith("0  ned has no UDP path to the market")
