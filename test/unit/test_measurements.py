"""
The market's measurements of a seller (latency and bandwidth) against
sellers that lie, over a link simulated in memory on a fake clock: the
real AMP boxes, the real heartbeat and bandwidth code, and a seller that
echoes forged values, answers before it could have received a request, or
delays answers to make the market subtract a longer round trip.  Whatever
it sends, the figures it gets are no better than those of its real link.
"""

import os

from twisted.internet.address import IPv4Address
from twisted.internet import defer
from twisted.internet.defer import DeferredSemaphore
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.trial import unittest

from cpushare.client.session import ClientControl
from cpushare.protocol import commands
from cpushare.protocol.heartbeat import Heartbeat
from cpushare.protocol.mux import ControlProtocol
from cpushare.server.market import measure
from cpushare.server.db.store import Account

ONE_WAY = 0.020         # seconds each way: a 40 ms round trip
RATE = 1_000_000        # bytes a second each way: 8 Mbps
LINK_MBPS = RATE * 8 / 1e6
INTERVAL = 1.0


class LinkEnd:
    """One end of a L{Link}: the transport its protocol writes to."""

    def __init__(self, link, side):
        self.link = link
        self.side = side
        self.protocol = None
        self.busyUntil = 0.0
        self.disconnecting = False

    def write(self, data):
        self.link.carry(self, data)

    def writeSequence(self, seq):
        self.write(b"".join(seq))

    def getPeer(self):
        return IPv4Address("TCP", "10.200.0.2" if self.side == "server" else "10.200.0.1", 7444)

    def getHost(self):
        return IPv4Address("TCP", "10.200.0.1" if self.side == "server" else "10.200.0.2", 7444)

    def loseConnection(self):
        self.disconnecting = True


class Link:
    """
    Two protocols joined in memory, on a Clock: each direction carries
    C{rate} bytes a second, one write after another, and delivers each
    write C{delay} seconds after its last byte left.
    """

    def __init__(self, clock, server, client, delay=ONE_WAY, rate=RATE):
        self.clock = clock
        self.delay = delay
        self.rate = rate
        self.server = LinkEnd(self, "server")
        self.client = LinkEnd(self, "client")
        self.server.protocol, self.client.protocol = server, client
        self.lastReceived = {"server": clock.seconds(), "client": clock.seconds()}
        server.makeConnection(self.server)
        client.makeConnection(self.client)

    def carry(self, end, data):
        now = self.clock.seconds()
        start = max(now, end.busyUntil)
        end.busyUntil = start + len(data) / self.rate
        other = self.client if end is self.server else self.server
        self.clock.callLater(end.busyUntil + self.delay - now, self._deliver, other, data)

    def _deliver(self, end, data):
        self.lastReceived[end.side] = self.clock.seconds()
        end.protocol.dataReceived(data)


class ServerSide:
    """What the heartbeat and the bandwidth meter need of a market session."""

    def __init__(self, clock):
        self.clock = clock
        self.control = ControlProtocol()
        self.account = Account(1, "sam", 0.0)
        self.connected = True
        self.heartbeat = None
        self.bandwidthMbps = None
        self.silent = []
        self.link = None

    @property
    def lastReceived(self):
        return self.link.lastReceived["server"]

    def peerSilent(self, seconds):
        self.silent.append(seconds)

    def describePeer(self):
        return "10.200.0.2:7444"


class HonestSellerSession:
    """The seller program's own responders (cpushare.client.session), as it runs them."""

    heartbeat = None


def honestSeller(clock=None):
    return ClientControl(HonestSellerSession())


class LyingSeller(amp.AMP):
    """
    A seller that reads the market's boxes and writes the answers it
    likes, raw: it may echo forged values, answer with tags it predicts
    before the request has reached it, and hold answers back.
    """

    def __init__(self, clock):
        amp.AMP.__init__(self)
        self.clock = clock

    def ampBoxReceived(self, box):
        command = box.get(amp.COMMAND)
        if command == b"Ping":
            self.ping(box)
        elif command == b"Probe":
            self.probe(box)

    def answer(self, tag, **values):
        answer = amp.AmpBox({amp.ANSWER: tag})
        for key, value in values.items():
            answer[key.encode()] = value
        self.transport.write(answer.serialize())

    def honestPing(self, box):
        # (sent is what the market's heartbeats carried before they had nonces.)
        echo = {k.decode(): v for k, v in box.items() if k in (b"sent", b"nonce")}
        self.answer(box[amp.ASK], **echo)

    def ping(self, box):
        self.honestPing(box)

    def probe(self, box):
        seller = honestSeller()
        seller.makeConnection(self.transport)
        seller.ampBoxReceived(box)


def advance(clock, until):
    """Run C{clock} to time C{until}, each delayed call at its own time."""
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls()]
        if not due or min(due) > until:
            clock.advance(max(0.0, until - clock.seconds()))
            return
        clock.advance(max(0.0, min(due) - clock.seconds()))


def run(clock, d, seconds=60.0):
    """Run C{clock} until C{d} has fired; its result (or its failure, raised)."""
    results = []
    d.addBoth(results.append)
    end = clock.seconds() + seconds
    while not results and clock.seconds() < end:
        advance(clock, min(end, clock.seconds() + 0.05))
    if not results:
        raise AssertionError(f"nothing happened in {seconds} s of the fake clock")
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


class MeasurementCase(unittest.TestCase):

    def connect(self, sellerClass):
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.server = ServerSide(self.clock)
        self.seller = sellerClass(self.clock)
        self.server.link = Link(self.clock, self.server.control, self.seller)
        self.server.heartbeat = Heartbeat(self.clock, self.server, interval=INTERVAL,
                                          timeout=5.0)
        self.addCleanup(self.server.heartbeat.stop)

    def beat(self, seconds=20.0):
        """Heartbeats for C{seconds} of the fake clock."""
        self.server.heartbeat.start()
        advance(self.clock, self.clock.seconds() + seconds)

    def measured(self):
        """The seller's bandwidth as the market's meter keeps it after one measurement."""
        meter = measure.BandwidthMeter(self.clock, self.server, lambda s: None,
                                       DeferredSemaphore(1), first=0.0, every=0)
        self.addCleanup(meter.stop)
        advance(self.clock, self.clock.seconds())
        end = self.clock.seconds() + 60.0
        while meter.slots.tokens == 0 and self.clock.seconds() < end:
            advance(self.clock, self.clock.seconds() + 0.05)
        self.assertEqual(meter.slots.tokens, 1, "the measurement never ended")
        return self.server.bandwidthMbps, meter


class HonestLinkTests(MeasurementCase):

    def test_an_honest_seller_is_measured_as_its_link(self):
        self.connect(honestSeller)
        self.beat()
        latency = self.server.heartbeat.latencyMs()
        self.assertGreaterEqual(latency, 2 * ONE_WAY * 1000)
        self.assertLess(latency, 2 * ONE_WAY * 1000 + 5)
        down, up = run(self.clock, defer.ensureDeferred(measure.bandwidth(self.clock, self.server)))
        for mbps in (down, up):
            self.assertLessEqual(mbps, LINK_MBPS)
            self.assertGreater(mbps, LINK_MBPS / 2)


class ForgedEcho(LyingSeller):
    """Echoes a send time 100 s in the future and a nonce of its own."""

    def ping(self, box):
        values = {"nonce": os.urandom(16), "latency_ms": b"0"}
        if b"sent" in box:
            values["sent"] = repr(float(box[b"sent"]) + 100.0).encode()
        self.answer(box[amp.ASK], **values)


class EarlyAnswers(LyingSeller):
    """
    Answers each heartbeat before it arrives: from the last one it
    predicts the next one's tag (AMP counts them) and send time, and
    answers it so that the answer reaches the market just after the
    market sent it.
    """

    def ping(self, box):
        tag = int(box[amp.ASK], 16)    # AMP counts its tags in hex
        values = {"nonce": os.urandom(16)}
        if b"sent" in box:
            values["sent"] = repr(float(box[b"sent"]) + INTERVAL).encode()
        if tag == 1:
            self.honestPing(box)
        self.clock.callLater(INTERVAL - 2 * ONE_WAY + 0.005, self.answer,
                             b"%x" % (tag + 1), **values)


class ReplayedNonce(LyingSeller):
    """Answers each heartbeat with the nonce of an earlier one."""

    first = None

    def ping(self, box):
        if self.first is None:
            self.first = dict(box)
            self.honestPing(box)
            return
        values = {k.decode(): v for k, v in self.first.items() if k in (b"sent", b"nonce")}
        self.answer(box[amp.ASK], **values)


class LatePings(LyingSeller):
    """Answers every heartbeat honestly, but later than the market's timeout (5 s)."""

    def ping(self, box):
        self.clock.callLater(5.5, self.honestPing, box)


class SlowPings(LyingSeller):
    """Holds every heartbeat answer for 3 s, so the market's round trip is long."""

    def ping(self, box):
        self.clock.callLater(3.0, self.honestPing, box)


class EarlyProbes(SlowPings):
    """
    Also answers every Probe of a burst as soon as the first arrives,
    guessing the tags of the others (they follow it), with bytes of its own.
    """

    answered = 0

    def probe(self, box):
        tag = int(box[amp.ASK], 16)    # AMP counts its tags in hex
        if tag <= self.answered:
            return
        for t in range(tag, tag + measure.COUNT):
            back = int(box.get(b"back", b"0"))
            self.answer(b"%x" % t, digest=b"\0" * 32, data=b"\0" * back)
        self.answered = tag + measure.COUNT - 1


class TurnsLiar(LyingSeller):
    """Answers probes honestly until C{lying}, then with bytes of its own."""

    lying = False

    def probe(self, box):
        if not self.lying:
            return LyingSeller.probe(self, box)
        self.answer(box[amp.ASK], digest=os.urandom(32),
                    data=b"\0" * int(box.get(b"back", b"0")))


class LyingSellerTests(MeasurementCase):

    def assertNoBetterThanTheLink(self, latency):
        self.assertTrue(latency is None or latency >= 2 * ONE_WAY * 1000,
                        f"a lying seller was shown {latency} ms on a 40 ms link")

    def test_a_forged_echo_gives_no_latency(self):
        self.connect(ForgedEcho)
        self.beat()
        self.assertNoBetterThanTheLink(self.server.heartbeat.latencyMs())
        self.assertIsNone(self.server.heartbeat.latencyMs())
        self.assertGreaterEqual(self.server.heartbeat.rejected, 15)

    def test_answers_sent_before_the_heartbeat_arrived_are_ignored(self):
        self.connect(EarlyAnswers)
        self.beat()
        self.assertNoBetterThanTheLink(self.server.heartbeat.latencyMs())
        self.assertGreaterEqual(self.server.heartbeat.rejected, 15)

    def test_a_replayed_nonce_is_ignored_and_counted(self):
        self.connect(ReplayedNonce)
        self.beat()
        # The first heartbeat was answered honestly: that round trip is all it has.
        latency = self.server.heartbeat.latencyMs()
        self.assertNoBetterThanTheLink(latency)
        self.assertEqual(len(self.server.heartbeat.samples), 1)
        self.assertGreaterEqual(self.server.heartbeat.rejected, 15)

    def test_answers_later_than_the_timeout_are_ignored_and_counted(self):
        self.connect(LatePings)
        self.beat()
        self.assertIsNone(self.server.heartbeat.latencyMs())
        self.assertGreaterEqual(self.server.heartbeat.rejected, 10)
        self.assertEqual(self.server.silent, [])
        self.assertLessEqual(len(self.server.heartbeat._pending), 6)

    def test_slow_heartbeats_do_not_buy_bandwidth(self):
        self.connect(SlowPings)
        self.beat()
        self.assertGreaterEqual(self.server.heartbeat.latencyMs(), 3000.0)
        mbps, _ = self.measured()
        self.assertIsNotNone(mbps)
        self.assertLessEqual(mbps, LINK_MBPS)

    def test_probes_answered_before_the_bytes_arrived_give_no_bandwidth(self):
        self.connect(EarlyProbes)
        self.beat()
        mbps, meter = self.measured()
        self.assertTrue(mbps is None or mbps <= LINK_MBPS,
                        f"a lying seller was shown {mbps} Mbps on an 8 Mbps link")
        self.assertIsNone(mbps)
        self.assertEqual(meter.rejected, measure.COUNT)

    def test_a_seller_caught_lying_loses_the_figure_it_had(self):
        self.connect(TurnsLiar)
        mbps, _ = self.measured()
        self.assertLessEqual(mbps, LINK_MBPS)
        self.seller.lying = True
        mbps, meter = self.measured()
        self.assertIsNone(mbps)
        self.assertEqual(meter.rejected, measure.COUNT)
