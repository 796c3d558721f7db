"""
The result channel of replicated runs on the market's side: what a
seller reports of a VM's result (ResultReady) and what a buyer lists of
an order's results (ListResults), with what a cheating seller or buyer
would send, on the market in memory (test/fakemarket.py).
"""

import hashlib
import os

from twisted.internet import defer

from cpushare.protocol import commands

from test.unit.test_orders import FakeProgram, FakeSellerControl, OrderCase
from test.unit import test_replicas
from test.unit.test_replicas import AMD, INTEL

DIGEST = hashlib.sha256(b"42\n").hexdigest()


class ResultTakerControl(FakeSellerControl):
    @commands.ResultChunk.responder
    def resultChunk(self, vm, offset, data, order=None):
        self.session.chunks.append((order, vm, offset, data))
        return {}

    @commands.ResultReady.responder
    def resultReady(self, vm, sha256, size, order=None):
        self.session.readyResults.append((order, vm, sha256, size))
        return {}


class ResultTaker(FakeProgram):
    controlClass = ResultTakerControl

    def __init__(self, *a, **kw):
        FakeProgram.__init__(self, *a, **kw)
        self.chunks = []
        self.readyResults = []


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
        self.assertIsInstance(rows[a].pop("lease"), int)
        self.assertEqual(rows[a].pop("verdict"), "pending")
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

    @defer.inlineCallbacks
    def buyerProgram(self):
        """alice's buyer program, recording the results the market passes on."""
        program = yield self.connect("buyer", *self.alice, sessionClass=ResultTaker)
        return program

    @defer.inlineCallbacks
    def test_the_bytes_reach_the_buyers_program_in_order_then_the_digest(self):
        buyer = yield self.buyerProgram()
        [(it, a), _], order = yield self.pair()
        yield self.call(it, commands.ResultChunk, vm=a, offset=0, data=b"4")
        yield self.call(it, commands.ResultChunk, vm=a, offset=1, data=b"2\n")
        yield self.report(it, a)
        yield self.sleep(0.5)
        self.assertEqual(buyer.chunks, [(order, a, 0, b"4"), (order, a, 1, b"2\n")])
        self.assertEqual(buyer.readyResults, [(order, a, DIGEST, 3)])

    @defer.inlineCallbacks
    def test_result_bytes_out_of_order_or_not_ones_own_are_refused(self):
        buyer = yield self.buyerProgram()
        [(it, a), (de, b)], order = yield self.pair()
        yield self.refused(self.call(it, commands.ResultChunk, vm=b, offset=0, data=b"x"),
                           commands.NoSuchVM)
        why = yield self.refused(self.call(it, commands.ResultChunk, vm=a, offset=5,
                                           data=b"x"), commands.BadRequest)
        self.assertIn("do not follow the 0 sent", why)
        yield self.refused(self.call(it, commands.ResultChunk, vm=a, offset=0, data=b""),
                           commands.BadRequest)
        yield self.refused(self.call(it, commands.ResultChunk, vm=a, offset=0,
                                     data=b"x" * (commands.IMAGE_CHUNK + 1)),
                           commands.BadRequest)
        yield self.call(it, commands.ResultChunk, vm=a, offset=0, data=b"x")
        yield self.refused(self.call(it, commands.ResultChunk, vm=a, offset=0, data=b"x"),
                           commands.BadRequest)
        # A digest whose bytes the buyer did not all get is recorded, not passed on.
        yield self.report(it, a, size=2)
        yield self.sleep(0.5)
        self.assertEqual(buyer.chunks, [(order, a, 0, b"x")])
        self.assertEqual(buyer.readyResults, [])
        yield self.refused(self.call(it, commands.ResultChunk, vm=a, offset=1, data=b"x"),
                           commands.BadRequest)

    @defer.inlineCallbacks
    def test_without_a_buyer_program_the_bytes_are_refused_and_the_digest_kept(self):
        [(it, a), _], order = yield self.pair()
        why = yield self.refused(self.call(it, commands.ResultChunk, vm=a, offset=0,
                                           data=b"x"), commands.BadRequest)
        self.assertIn("buyer's program is not connected", why)
        yield self.report(it, a)
        rows = (yield self.call(self.cli, commands.ListResults, order=order))["results"]
        self.assertIn(DIGEST, [r["sha256"] for r in rows])

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


# -- the seller's end of the result port, fed as a hostile guest would


from twisted.internet.testing import StringTransport  # noqa: E402

from cpushare.client.seller import results, vmhost  # noqa: E402
from test.unit.test_vmhost import hosted  # noqa: E402


def port(cap=1000):
    told = []
    p = results.ResultPort(7, lambda sha256, size: told.append((sha256, size)), told.append,
                           cap=cap)
    p.makeConnection(StringTransport())
    return p, told


def feed(p, data, step=1):
    for i in range(0, len(data), step):
        p.dataReceived(data[i:i + step])


def test_a_result_is_hashed_as_its_bytes_arrive_in_any_pieces():
    data = bytes(range(256)) * 3
    for step in (1, 7, 4096):
        p, told = port()
        feed(p, b"CPUSHARE-RESULT 768\n" + data + b"after the end", step)
        assert told == [(hashlib.sha256(data).hexdigest(), 768)]
        assert p.dropped == len(b"after the end")
        assert not p.transport.disconnecting
    p, told = port()
    p.dataReceived(b"CPUSHARE-RESULT 0\n")
    assert told == [(hashlib.sha256(b"").hexdigest(), 0)]


def test_a_result_larger_than_the_cap_is_refused_from_its_header():
    p, told = port(cap=1000)
    p.dataReceived(b"CPUSHARE-RESULT 1001\n" + b"x" * 10)
    [failure] = told
    assert failure.kind == results.TOO_BIG and "1001 bytes, more than the cap of 1000" in str(failure)
    assert p.transport.disconnecting
    p.dataReceived(b"x" * 5000)          # read no more: dropped, not hashed
    assert told == [failure] and p.received == 0
    p, told = port(cap=1000)
    feed(p, b"CPUSHARE-RESULT 1000\n" + b"x" * 1000, 100)
    assert told == [(hashlib.sha256(b"x" * 1000).hexdigest(), 1000)]


def test_garbage_framing_is_a_failed_result():
    for garbage in (b"hello world\n", b"CPUSHARE-RESULT -5\n", b"CPUSHARE-RESULT 007\n",
                    b"CPUSHARE-RESULT 5 \n", b"CPUSHARE-RESULT 99999999999999999999\n",
                    b"x" * 10000, b"CPUSHARE-RESULT 5\r\n12345", b"\x00" * 36):
        p, told = port()
        feed(p, garbage, 3)
        [failure] = told
        assert failure.kind == results.BAD_FRAMING, garbage
        assert p.transport.disconnecting


def test_a_result_that_never_ends_is_no_result_when_the_vm_stops():
    host, vm = hosted()
    vm.results, told = port()
    vm.results.dataReceived(b"CPUSHARE-RESULT 100\n" + b"y" * 40)
    assert told == []
    vm.stop("stopped by the market")
    assert told == [] and host.ended == []      # its port is read to the end first
    vm.results.connectionLost()
    [failure] = told
    assert failure.kind == results.UNFINISHED
    assert "after 40 of 100 bytes" in str(failure)
    assert vm.resultUntold is None
    assert host.ended == [("stopped", "stopped by the market")]
    # A port that never closes is given up RESULT_DRAIN seconds after the end.
    host, vm = hosted()
    vm.results, told = port()
    vm.results.dataReceived(b"CPUSHARE-RESULT 100\n")
    vm.stop("stopped by the market")
    host.reactor.advance(vmhost.RESULT_DRAIN)
    assert [f.kind for f in told] == [results.UNFINISHED]
    assert vm.results.transport.disconnecting and len(host.ended) == 1
    # A VM that wrote nothing has no result and no failure either.
    host, vm = hosted()
    vm.results, told = port()
    vm.stop("stopped by the market")
    vm.results.connectionLost()
    assert told == [] and vm.results.result is None and len(host.ended) == 1


def test_the_bytes_go_on_a_chunk_at_a_time_and_the_result_is_told_after_the_last():
    host, vm = hosted()
    sent = []

    def forward(offset, data):
        sent.append((offset, data, defer.Deferred()))
        return sent[-1][2]

    told = []
    vm.results = results.ResultPort(7, lambda *r: told.append(r), told.append, forward=forward)
    transport = StringTransport()
    vm.results.makeConnection(transport)
    data = b"z" * (results.FORWARD_CHUNK + 10)
    vm.results.dataReceived(b"CPUSHARE-RESULT %d\n" % len(data) + data)
    assert [(o, len(d)) for o, d, _ in sent] == [(0, results.FORWARD_CHUNK)]
    assert transport.producerState == "paused"      # the guest waits meanwhile
    vm.stop("stopped by the market")
    vm.results.connectionLost()
    sent[0][2].callback({})
    assert [(o, len(d)) for o, d, _ in sent] == [(0, results.FORWARD_CHUNK),
                                                 (results.FORWARD_CHUNK, 10)]
    assert told == [] and host.ended == []
    sent[1][2].callback({})
    assert told == [(hashlib.sha256(data).hexdigest(), len(data))]
    assert len(host.ended) == 1
    assert b"".join(d for _, d, _ in sent) == data


def test_a_buyer_that_takes_no_bytes_leaves_the_result_hashed_and_told():
    told = []
    p = results.ResultPort(7, lambda *r: told.append(r), told.append,
                           forward=lambda o, d: defer.fail(commands.BadRequest("no buyer")))
    p.makeConnection(StringTransport())
    p.dataReceived(b"CPUSHARE-RESULT 3\n42\n")
    assert told == [(DIGEST, 3)] and p.forward is None


def test_a_complete_result_is_told_to_the_market_once_connected():
    host, vm = hosted()
    calls = []
    host.tellResult = lambda v: calls.append(v.resultUntold)
    vm.results = results.ResultPort(7, vm._resultReady, lambda f: None)
    vm.results.dataReceived(b"CPUSHARE-RESULT 3\n42\n")
    assert calls == [(DIGEST, 3)]


def test_the_host_tells_a_result_once_and_keeps_it_while_away():
    from twisted.internet.task import Clock
    from cpushare.client.seller.vmhost import VMHost
    told = []

    class Control:
        def callRemote(self, command, **kw):
            told.append((command, kw))
            return defer.succeed({})

    class Session:
        control = Control()

    host = VMHost(Clock(), cache=None, qemuBinary="qemu-system-x86_64")
    _, vm = hosted()
    vm.host = host
    vm.resultUntold = (DIGEST, 3)
    host.tellResult(vm)                  # no market: kept for later
    assert told == [] and vm.resultUntold == (DIGEST, 3)
    host.session = Session()
    host.tellResult(vm)
    host.tellResult(vm)
    assert told == [(commands.ResultReady, {"vm": 7, "sha256": DIGEST, "size": 3})]


# -- the guest's side: cpushare-result of the reference livecd


def sendResult(tmp_path, content, *extra):
    """Run the livecd's cpushare-result (with the host's sh) on a file: (status, port bytes)."""
    import subprocess
    from cpushare.vm import livecd
    script = tmp_path / "cpushare-result"
    script.write_text(livecd.RESULT_SCRIPT)
    job = tmp_path / "answer"
    job.write_bytes(content)
    port = tmp_path / "port"
    port.write_bytes(b"")
    done = subprocess.run(["sh", str(script), str(job), *extra], capture_output=True,
                          env={"PATH": "/usr/bin:/bin", "CPUSHARE_RESULT_PORT": str(port)})
    return done.returncode, port.read_bytes()


def test_cpushare_result_frames_a_file_as_the_seller_reads_it(tmp_path):
    for content in (b"", b"42\n", bytes(range(256)) * 1000):
        status, sent = sendResult(tmp_path, content)
        assert status == 0
        p, told = port(cap=commands.RESULT_MAX)
        feed(p, sent, 65536)
        assert told == [(hashlib.sha256(content).hexdigest(), len(content))]
        assert p.dropped == 0


def test_cpushare_result_refuses_a_missing_file_or_extra_arguments(tmp_path):
    status, sent = sendResult(tmp_path, b"x", "more")
    assert status == 2 and sent == b""


def test_the_livecd_loads_the_result_ports_driver_and_ships_cpushare_result():
    from cpushare.vm import livecdparts
    assert "virtio_console" in livecdparts.GUEST_MODULES


def test_results_are_shown_by_replica_group_with_a_full_digest():
    from cpushare.client.cli.vms import formatResults
    table = formatResults([
        {"vm": 9, "replica_group": 2, "state": "running", "seller": "de", "country": "DE"},
        {"vm": 8, "replica_group": 1, "state": "stopped", "seller": "it", "country": "IT",
         "cpu": "GenuineIntel/6/85", "sha256": DIGEST, "size": 3,
         "saved": "/h/results/2/8.result"},
    ], 0).splitlines()
    assert table[0].split() == ["GROUP", "VM", "LEASE", "SELLER", "COUNTRY", "CPU", "STATE",
                                "SIZE", "SHA256", "VERDICT", "SAVED"]
    assert table[1].split() == ["1", "8", "-", "it", "IT", "GenuineIntel/6/85", "stopped", "3",
                                DIGEST, "-", "/h/results/2/8.result"]
    assert table[2].split() == ["2", "9", "-", "de", "DE", "-", "running", "-", "no", "result",
                                "-", "-"]


# -- the buyer's program saves the bytes


def resultFiles(tmp_path):
    from cpushare.client.buyer.results import ResultFiles
    from test.fakemarket import MemoryReactor
    return ResultFiles(MemoryReactor(), str(tmp_path))


def fired(d):
    found = []
    d.addBoth(found.append)
    [value] = found
    return value


def test_the_buyer_saves_a_result_under_its_order_once_its_digest_matches(tmp_path):
    from cpushare.client.home import resultPath
    files = resultFiles(tmp_path)
    fired(files.chunk(4, 9, 0, b"4"))
    fired(files.chunk(4, 9, 1, b"2\n"))
    path = resultPath(str(tmp_path), 4, 9)
    assert path == str(tmp_path / "results" / "4" / "9.result")
    assert not os.path.exists(path)
    assert fired(files.ready(4, 9, DIGEST, 3)) == path
    assert open(path, "rb").read() == b"42\n"
    # A result whose bytes are not the digest reported keeps its .part name.
    fired(files.chunk(4, 10, 0, b"41\n"))
    assert fired(files.ready(4, 10, DIGEST, 3)) is None
    assert open(resultPath(str(tmp_path), 4, 10) + ".part", "rb").read() == b"41\n"
    assert not os.path.exists(resultPath(str(tmp_path), 4, 10))


def test_the_buyer_refuses_bytes_out_of_order_or_past_the_cap(tmp_path):
    files = resultFiles(tmp_path)
    fired(files.chunk(4, 9, 0, b"ab"))
    assert isinstance(fired(files.chunk(4, 9, 5, b"x")).value, commands.BadRequest)
    assert isinstance(fired(files.chunk(None, 9, 0, b"x")).value, commands.BadRequest)
    assert isinstance(fired(files.chunk(4, 11, commands.RESULT_MAX, b"x")).value,
                      commands.BadRequest)
    # The seller started the VM's result again: it starts over.
    fired(files.chunk(4, 9, 0, b"c"))
    assert open(tmp_path / "results" / "4" / "9.result.part", "rb").read() == b"c"



def test_a_lease_keeps_its_first_result_in_the_store(conn):
    from cpushare.server.db import marketsql, store

    def setUp(cursor):
        buyer = store.createAccount(cursor, "bob", "ab" * 32)
        seller = store.createAccount(cursor, "sam", "cd" * 32)
        cursor.execute("INSERT INTO images (sha256, size, stored) VALUES (?, ?, ?)",
                       ("ef" * 32, 1, store.now()))
        orderId, [vmId] = store.createOrder(cursor, buyer, "ef" * 32, 1, 1, 256)
        cursor.execute(
            "INSERT INTO leases (vm_id, order_id, buyer_account_id, seller_account_id, price,"
            " net_fee, cores, started) VALUES (?, ?, ?, ?, 0, 0, 1, 0)",
            (vmId, orderId, buyer, seller))
        cursor.execute("SELECT id FROM leases")
        return orderId, vmId, seller, cursor.fetchone()[0]

    orderId, vmId, seller, lease = store.transact(conn, setUp)
    for digest in (DIGEST, "0" * 64):
        store.transact(conn, marketsql.addResult, lease, vmId, orderId, seller, "IT",
                       "GenuineIntel/6/85", digest, 3, 1.0)
    [row] = store.transact(conn, marketsql.orderResults, orderId)
    assert (row["sha256"], row["size"], row["seller"], row["country"]) == (DIGEST, 3, "sam", "IT")


def test_a_seller_may_take_smaller_results_but_not_larger_than_the_market(monkeypatch):
    import pytest
    from twisted.python import usage
    from cpushare.client.options import ClientOptions
    from cpushare.client.seller.service import Options
    from cpushare.client.home import Home

    def noAccount(self):
        self.home = Home("/nonexistent")

    monkeypatch.setattr(ClientOptions, "postOptions", noAccount)
    for bad in ("0", "65"):
        with pytest.raises(usage.UsageError, match="--result-max must be 1 to 64"):
            Options().parseOptions(["--result-max", bad])
    options = Options()
    options.parseOptions(["--result-max", "8"])
    assert options["result-max"] == 8
    options = Options()
    options.parseOptions([])
    assert options["result-max"] * 1024 * 1024 == commands.RESULT_MAX
