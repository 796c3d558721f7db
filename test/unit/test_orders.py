"""
Orders, VM placement, the VM lifecycle and the buyer's network links, on
the market in memory (test/fakemarket.py) with fake seller and buyer
programs.
"""

from twisted.internet import defer

from cpushare.client.cli import upload
from cpushare.money import MICRO
from cpushare.server import admin
from cpushare.server.money import billing, escrow
from cpushare.server.money import ledger
from cpushare.client.session import ClientControl, ClientSession
from cpushare.protocol import commands
from cpushare.protocol.commands import consoleChannel, nicChannel

from test.unit import test_session


class FakeSellerControl(ClientControl):
    @commands.StartVM.responder
    def startVM(self, vm, image, size, cores, memory, mac):
        self.session.started.put(dict(vm=vm, image=image, size=size, cores=cores,
                                      memory=memory, mac=mac))
        return {}

    @commands.StopVM.responder
    def stopVM(self, vm):
        self.session.stopped.put(vm)
        return {}

    @commands.PortAttached.responder
    def portAttached(self, vm, mac):
        self.session.attached.put((vm, mac))
        return {}

    @commands.PortDetached.responder
    def portDetached(self, vm, reason):
        self.session.detached.put((vm, reason))
        return {}


class FakeProgram(ClientSession):
    controlClass = FakeSellerControl

    def __init__(self, *a, **kw):
        ClientSession.__init__(self, *a, **kw)
        self.started = defer.DeferredQueue()
        self.stopped = defer.DeferredQueue()
        self.attached = defer.DeferredQueue()
        self.detached = defer.DeferredQueue()


class OrderCase(test_session.ImageCase):
    """A market with alice (buyer, an image uploaded) and sam (seller) registered."""

    @defer.inlineCallbacks
    def checkBooks(self):
        """The books balance and every lease's hold matches the ledger."""
        books = yield self.store.run(ledger.books)
        self.assertTrue(books["ok"], books)
        self.assertEqual((yield self.store.run(billing.heldMismatch)), [])
        self.assertEqual((yield self.store.run(escrow.pendingMismatch)), [])

    @defer.inlineCallbacks
    def setUp(self):
        yield test_session.ImageCase.setUp(self)
        self.alice = yield self.register("alice")
        self.sam = yield self.register("sam")
        self.cli = yield self.connect("cli", *self.alice)
        self.aliceId = (yield self.cli.control.callRemote(commands.WhoAmI))["account_id"]
        yield self.store.run(admin.credit, "alice", 100 * MICRO, "funds for the tests")
        self.iso = self.makeFile(300000, b"livecd")
        self.sha, _, _ = yield defer.ensureDeferred(upload.upload(self.reactor, self.cli, self.iso))

    def program(self, role, who):
        return self.connect(role, *who, sessionClass=FakeProgram)

    @defer.inlineCallbacks
    def offer(self, seller, cores, memory):
        yield seller.control.callRemote(commands.Offer, cores=cores, memory=memory)

    def balances(self, name):
        """The ledger balances of account C{name}."""
        def get(cursor):
            cursor.execute("SELECT id FROM accounts WHERE name = ?", (name,))
            return ledger.balances(cursor, cursor.fetchone()[0])
        return self.store.run(get)

    def call(self, session, command, **kw):
        return session.control.callRemote(command, **kw)

    @defer.inlineCallbacks
    def showLife(self, seller, vmId):
        """The VM prints on its console, as a booting VM does: its lease is billed from now."""
        seller.sendFrame(consoleChannel(vmId), b"Linux version ...\r\n")

        def alive(cursor):
            cursor.execute("SELECT live_since FROM leases WHERE vm_id = ? AND ended IS NULL",
                           (vmId,))
            row = cursor.fetchone()
            return row is not None and row[0] is not None

        for _ in range(100):
            if (yield self.store.run(alive)):
                return
            yield self.sleep(0.05)
        self.fail(f"VM {vmId} never showed life")

    @defer.inlineCallbacks
    def runOne(self):
        """A seller (sam) offering one core, and one VM of alice's started on it."""
        seller = yield self.program("seller", self.sam)
        yield self.offer(seller, 1, 1024)
        [vm] = (yield self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=1,
                                cores=1, memory=256))["vm_ids"]
        yield self.within(seller.started.get())
        return seller, vm



class OrderTests(OrderCase):

    @defer.inlineCallbacks
    def test_vms_are_placed_first_fit_and_wait_for_capacity(self):
        seller = yield self.program("seller", self.sam)
        yield self.offer(seller, 2, 1024)
        buyer = yield self.program("buyer", self.alice)
        placed = yield self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=3,
                                 cores=1, memory=256)
        self.assertEqual(placed["allocated"], 2)
        first, second, third = placed["vm_ids"]
        starts = yield self.take(seller.started, 2)
        self.assertEqual([s["vm"] for s in starts], [first, second])
        self.assertEqual({s["image"] for s in starts}, {self.sha})
        self.assertEqual(starts[0]["mac"], "0a:cb:" + ":".join(
            f"{b:02x}" for b in first.to_bytes(4, "big")))
        attached = yield self.take(buyer.attached, 2)
        self.assertEqual([vm for vm, mac in attached], [first, second])

        # The seller fetches the image it was told to boot, and only that.
        data = b""
        while len(data) < starts[0]["size"]:
            chunk = yield self.call(seller, commands.FetchImageChunk, vm=first,
                                    offset=len(data), length=commands.IMAGE_CHUNK)
            data += chunk["data"]
        with open(self.iso, "rb") as f:
            self.assertEqual(data, f.read())
        with self.assertRaises(commands.NoSuchVM):
            yield self.call(seller, commands.FetchImageChunk, vm=third, offset=0, length=10)

        # Frames cross between the VM's NIC on the seller and the buyer program.
        fromVM = defer.DeferredQueue()
        buyer.route(nicChannel(first), fromVM.put)
        seller.sendFrame(nicChannel(first), b"\xff" * 6 + b"frame from the VM")
        self.assertEqual((yield self.within(fromVM.get())), b"\xff" * 6 + b"frame from the VM")
        toVM = defer.DeferredQueue()
        seller.route(nicChannel(first), toVM.put)
        buyer.sendFrame(nicChannel(first), b"reply")
        self.assertEqual((yield self.within(toVM.get())), b"reply")

        yield self.call(seller, commands.VMState, vm=first, state="running", cpu_seconds=1.5)
        listed = (yield self.call(self.cli, commands.ListVMs))["vms"]
        byId = {v["vm"]: v for v in listed}
        self.assertEqual(byId[first]["state"], "running")
        self.assertEqual(byId[first]["seller"], "sam")
        self.assertEqual(byId[first]["cpu_seconds"], 1.5)
        self.assertEqual(byId[third]["state"], "pending")

        # Stopping one frees its capacity; the waiting VM is placed at once.
        yield self.call(self.cli, commands.StopVM, vm=first)
        self.assertEqual((yield self.within(seller.stopped.get())), first)
        self.assertEqual((yield self.within(buyer.detached.get()))[0], first)
        self.assertEqual((yield self.within(seller.started.get()))["vm"], third)
        listed = {v["vm"]: v for v in (yield self.call(self.cli, commands.ListVMs))["vms"]}
        self.assertEqual(listed[first]["state"], "stopped")
        self.assertEqual(listed[first]["reason"], "stopped by the buyer")

    @defer.inlineCallbacks
    def test_other_accounts_cannot_touch_or_see_a_buyers_vms(self):
        seller = yield self.program("seller", self.sam)
        yield self.offer(seller, 4, 4096)
        bob = yield self.register("bob")
        bobCLI = yield self.connect("cli", *bob)
        bobBuyer = yield self.program("buyer", bob)
        seen = []
        for channel in range(0, 64):
            bobBuyer.route(channel, seen.append)
        placed = yield self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=1,
                                 cores=1, memory=256)
        [vm] = placed["vm_ids"]
        yield self.within(seller.started.get())
        for command, kw in ((commands.StopVM, {"vm": vm}),
                            (commands.AttachConsole, {"vm": vm})):
            with self.assertRaises(commands.NoSuchVM):
                yield self.call(bobCLI, command, **kw)
        with self.assertRaises(commands.BadRequest):
            yield self.call(bobCLI, commands.PlaceOrder, image=self.sha, vms=1, cores=1,
                            memory=256)
        self.assertEqual((yield self.call(bobCLI, commands.ListVMs))["vms"], [])
        seller.sendFrame(nicChannel(vm), b"\xff" * 14)
        seller.sendFrame(consoleChannel(vm), b"console")
        yield self.sleep(0.2)
        self.assertEqual(seen, [])

    @defer.inlineCallbacks
    def test_absurd_orders_are_refused(self):
        for kw, words in [
            (dict(vms=0, cores=1, memory=256), "1 to"),
            (dict(vms=10**6, cores=1, memory=256), "1 to"),
            (dict(vms=1, cores=0, memory=256), "cores"),
            (dict(vms=1, cores=1, memory=1), "memory"),
        ]:
            with self.assertRaises(commands.BadRequest) as e:
                yield self.call(self.cli, commands.PlaceOrder, image=self.sha, **kw)
            self.assertIn(words, str(e.exception))
        with self.assertRaises(commands.BadRequest) as e:
            yield self.call(self.cli, commands.PlaceOrder, image="f" * 64, vms=1, cores=1,
                            memory=256)
        self.assertIn("no image", str(e.exception))

    @defer.inlineCallbacks
    def test_a_seller_that_comes_back_reattaches_its_vms(self):
        self.market.orders.grace = 30
        seller = yield self.program("seller", self.sam)
        yield self.offer(seller, 1, 1024)
        buyer = yield self.program("buyer", self.alice)
        [vm] = (yield self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=1,
                                cores=1, memory=256))["vm_ids"]
        yield self.within(seller.started.get())
        yield self.call(seller, commands.VMState, vm=vm, state="running", cpu_seconds=0.0)
        yield self.close(seller)
        yield self.sleep(0.1)
        listed = (yield self.call(self.cli, commands.ListVMs))["vms"]
        self.assertEqual(listed[0]["state"], "detached")
        self.assertIn("seller disconnected", listed[0]["reason"])

        again = yield self.program("seller", self.sam)
        kept = yield self.call(again, commands.ReattachVMs, vms=[vm, 9999])
        self.assertEqual(kept["keep"], [vm])
        yield self.offer(again, 1, 1024)
        listed = (yield self.call(self.cli, commands.ListVMs))["vms"]
        self.assertEqual(listed[0]["state"], "running")
        fromVM = defer.DeferredQueue()
        buyer.route(nicChannel(vm), fromVM.put)
        again.sendFrame(nicChannel(vm), b"still here")
        self.assertEqual((yield self.within(fromVM.get())), b"still here")

        # Another seller cannot claim the VM.
        mallory = yield self.register("mallory")
        other = yield self.program("seller", mallory)
        self.assertEqual((yield self.call(other, commands.ReattachVMs, vms=[vm]))["keep"], [])

    @defer.inlineCallbacks
    def test_a_seller_that_does_not_come_back_loses_its_vms_to_another(self):
        self.market.orders.grace = 0.3
        seller, vm = yield self.runOne()
        yield self.close(seller)
        ben = yield self.register("ben")
        other = yield self.program("seller", ben)
        yield self.offer(other, 2, 2048)
        started = yield self.within(other.started.get())
        self.assertEqual(started["vm"], vm)
        listed = (yield self.call(self.cli, commands.ListVMs))["vms"]
        self.assertEqual((listed[0]["state"], listed[0]["seller"]), ("allocated", "ben"))

    @defer.inlineCallbacks
    def test_a_vm_placed_again_counts_and_pays_only_the_cpu_of_its_new_seller(self):
        self.market.orders.grace = 0.3
        seller, vm = yield self.runOne()
        yield self.call(seller, commands.VMState, vm=vm, state="running", cpu_seconds=50.0)
        yield self.close(seller)
        ben = yield self.register("ben")
        other = yield self.program("seller", ben)
        yield self.offer(other, 1, 1024)
        yield self.within(other.started.get())
        yield self.showLife(other, vm)
        listed = (yield self.call(self.cli, commands.ListVMs))["vms"][0]
        self.assertEqual((listed["seller"], listed["cpu_seconds"]), ("ben", 0.0))
        yield self.call(other, commands.VMState, vm=vm, state="running", cpu_seconds=2.0)
        listed = (yield self.call(self.cli, commands.ListVMs))["vms"][0]
        self.assertEqual((listed["state"], listed["cpu_seconds"]), ("running", 2.0))

        # An hour on, ben's lease is billed the 2 CPU seconds ben gave, not sam's 50.
        clock = self.reactor

        class HourLater:
            def seconds(self):
                return clock.seconds() + 3600

        self.patch(self.market.billing, "reactor", HourLater())
        yield self.market.billing.tick()
        leases = (yield self.call(self.cli, commands.ListLeases))["leases"]
        self.assertEqual([(lease["seller"], lease["cpu_seconds"]) for lease in leases][0],
                         ("ben", 2.0))

    @defer.inlineCallbacks
    def test_the_console_shows_recent_output_then_follows_and_takes_input(self):
        seller, vm = yield self.runOne()
        seller.sendFrame(consoleChannel(vm), b"booting...\r\n")
        seller.sendFrame(consoleChannel(vm), b"CPUSHARE-READY ip=10.77.0.100/24\r\n")
        yield self.sleep(0.1)
        output = defer.DeferredQueue()
        self.cli.route(consoleChannel(vm), output.put)
        answer = yield self.call(self.cli, commands.AttachConsole, vm=vm)
        self.assertEqual(answer["channel"], consoleChannel(vm))
        self.assertEqual((yield self.within(output.get())),
                         b"booting...\r\nCPUSHARE-READY ip=10.77.0.100/24\r\n")
        seller.sendFrame(consoleChannel(vm), b"# ")
        self.assertEqual((yield self.within(output.get())), b"# ")
        typed = defer.DeferredQueue()
        seller.route(consoleChannel(vm), typed.put)
        self.cli.sendFrame(consoleChannel(vm), b"uname -a\n")
        self.assertEqual((yield self.within(typed.get())), b"uname -a\n")
        # When the VM ends, the console says why.
        ended = defer.Deferred()
        self.cli.channelUnlinked = lambda channel, reason: ended.callback(reason)
        yield self.call(self.cli, commands.StopVM, vm=vm)
        self.assertIn("stopped by the buyer", (yield self.within(ended)))

    @defer.inlineCallbacks
    def test_cancelling_an_order_stops_its_vms_and_the_waiting_ones(self):
        seller = yield self.program("seller", self.sam)
        yield self.offer(seller, 1, 1024)
        placed = yield self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=2,
                                 cores=1, memory=256)
        first, second = placed["vm_ids"]
        yield self.within(seller.started.get())
        answer = yield self.call(self.cli, commands.CancelOrder, order=placed["order"])
        self.assertEqual(answer["stopped"], 2)
        self.assertEqual((yield self.within(seller.stopped.get())), first)
        listed = {v["vm"]: v for v in (yield self.call(self.cli, commands.ListVMs))["vms"]}
        self.assertEqual({listed[first]["state"], listed[second]["state"]}, {"stopped"})
        self.assertEqual(listed[second]["reason"], "the order was cancelled")
        # The freed capacity does not start anything else of the order.
        yield self.sleep(0.2)
        self.assertEqual(seller.started.pending, [])
        # The seller's last report of a VM the market stopped is its CPU time.
        yield self.call(seller, commands.VMState, vm=first, state="stopped", cpu_seconds=4.5)
        listed = {v["vm"]: v for v in (yield self.call(self.cli, commands.ListVMs))["vms"]}
        self.assertEqual(listed[first]["cpu_seconds"], 4.5)
        # Nobody else can cancel it; an order that does not exist says so.
        bob = yield self.register("bob")
        bobCLI = yield self.connect("cli", *bob)
        for orderId in (placed["order"], 999):
            with self.assertRaises(commands.BadRequest) as e:
                yield self.call(bobCLI, commands.CancelOrder, order=orderId)
            self.assertIn(f"no order {orderId}", str(e.exception))

    @defer.inlineCallbacks
    def test_a_second_buyer_program_takes_over_when_the_first_goes(self):
        seller = yield self.program("seller", self.sam)
        yield self.offer(seller, 1, 1024)
        first = yield self.program("buyer", self.alice)
        second = yield self.program("buyer", self.alice)
        [vm] = (yield self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=1,
                                cores=1, memory=256))["vm_ids"]
        self.assertEqual((yield self.within(first.attached.get()))[0], vm)
        self.assertEqual(second.attached.pending, [])
        yield self.close(first)
        self.assertEqual((yield self.within(second.attached.get()))[0], vm)
        frames = defer.DeferredQueue()
        second.route(nicChannel(vm), frames.put)
        seller.sendFrame(nicChannel(vm), b"\xff" * 14)
        self.assertEqual((yield self.within(frames.get())), b"\xff" * 14)

    @defer.inlineCallbacks
    def test_a_vm_that_ended_while_its_seller_was_away_is_reported_on_return(self):
        self.market.orders.grace = 30
        seller, vm = yield self.runOne()
        yield self.close(seller)
        again = yield self.program("seller", self.sam)
        self.assertEqual((yield self.call(again, commands.ReattachVMs, vms=[]))["keep"], [])
        yield self.call(again, commands.VMState, vm=vm, state="stopped", cpu_seconds=7.0,
                        reason="the VM powered off")
        listed = (yield self.call(self.cli, commands.ListVMs))["vms"][0]
        self.assertEqual((listed["state"], listed["reason"], listed["cpu_seconds"]),
                         ("stopped", "the VM powered off", 7.0))
        # Another account's seller cannot end it that way.
        [other] = (yield self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=1,
                                   cores=1, memory=256))["vm_ids"]
        yield self.offer(again, 1, 1024)
        yield self.within(again.started.get())
        mallory = yield self.register("mallory")
        intruder = yield self.program("seller", mallory)
        with self.assertRaises(commands.NoSuchVM):
            yield self.call(intruder, commands.VMState, vm=other, state="stopped",
                            cpu_seconds=0.0)
