"""
The switch's connection ports: a VM's mux channel, and QEMU's stream framing
over in-memory transports, then over a real unix socket.
"""

import os
import shutil
import stat
import struct
import tempfile

from twisted.internet import reactor as globalReactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cpushare.client.buyer import dhcp
from cpushare.client.buyer.dhcp import DHCPServer
from cpushare.client.buyer.ports import ChannelPort, StreamPort, StreamPortFactory, listenUNIX
from cpushare.protocol.mux import Routing
from cpushare.protocol.qemustream import MAX_STREAM_FRAME
from cpushare.client.buyer.switch import IPort, Switch

from test.unit.test_dhcp import bootp, udpFrame

BROADCAST = b"\xff" * 6
A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")


def frame(dst, src, body=b"hello"):
    return dst + src + b"\x88\xb5" + body


def framed(*frames):
    return b"".join(struct.pack("!I", len(f)) + f for f in frames)


def unframe(data):
    out = []
    while data:
        (n,) = struct.unpack("!I", data[:4])
        out.append(data[4:4 + n])
        data = data[4 + n:]
    return out


class RecordingSwitch:
    def __init__(self):
        self.attached = []
        self.frames = []

    def attach(self, port):
        self.attached.append(port)

    def detach(self, port):
        self.attached.remove(port)

    def frameReceived(self, port, frame):
        self.frames.append((port, frame))


@implementer(IPort)
class SinkPort:
    name = "sink"
    allowedSources = None

    def __init__(self):
        self.received = []

    def send(self, frame):
        self.received.append(frame)
        return True


class FakeSession(Routing):
    def __init__(self, room=True):
        Routing.__init__(self)
        self.sent = []
        self.room = room

    def sendFrame(self, channel, payload):
        if not self.room:
            return False
        self.sent.append((channel, payload))
        return True


# -- a VM's channel

def test_a_channel_port_joins_the_switch_through_the_session_routes():
    switch = Switch(Clock())
    sink = SinkPort()
    switch.attach(sink)
    session = FakeSession()
    port = ChannelPort(switch, session, 12, mac=A)
    verifyObject(IPort, port)
    port.start()
    assert port.name == "vm channel 12"
    session.routes[12](frame(BROADCAST, A))
    session.routes[12](frame(BROADCAST, B))  # spoofed
    assert sink.received == [frame(BROADCAST, A)]
    assert switch.countersFor(port).droppedSpoofed == 1
    switch.frameReceived(sink, frame(A, B, b"to the vm"))
    assert session.sent == [(12, frame(A, B, b"to the vm"))]
    session.room = False
    switch.frameReceived(sink, frame(A, B))
    assert switch.countersFor(port).droppedOut == 1
    port.stop()
    assert session.routes == {} and port not in switch.ports


# -- QEMU stream framing, in memory

def streamPort():
    switch = RecordingSwitch()
    port = StreamPort(switch, "test client")
    transport = StringTransport()
    port.makeConnection(transport)
    return switch, port, transport


def test_stream_frames_are_parsed_across_every_split():
    frames = [frame(BROADCAST, A), frame(B, A, b"x" * 1500), b"", frame(A, B, b"y")]
    stream = framed(*frames)
    for cut in range(len(stream) + 1):
        switch, port, _ = streamPort()
        port.dataReceived(stream[:cut])
        port.dataReceived(stream[cut:])
        assert [f for _, f in switch.frames] == frames, cut
    switch, port, _ = streamPort()
    for i in range(len(stream)):
        port.dataReceived(stream[i:i + 1])
    assert [f for _, f in switch.frames] == frames


def test_stream_port_writes_length_and_frame():
    switch, port, transport = streamPort()
    assert switch.attached == [port]
    assert transport.producer is port and transport.streaming
    assert port.send(frame(A, B)) is True
    assert port.send(b"") is True
    assert unframe(transport.value()) == [frame(A, B), b""]


def test_stream_port_drops_while_the_client_does_not_read():
    switch, port, transport = streamPort()
    port.pauseProducing()  # what the transport does when its buffer is full
    assert port.send(frame(A, B)) is False
    assert transport.value() == b""
    port.resumeProducing()
    assert port.send(frame(A, B, b"again")) is True
    assert unframe(transport.value()) == [frame(A, B, b"again")]


def test_a_length_beyond_the_limit_closes_the_connection():
    switch, port, transport = streamPort()
    port.dataReceived(framed(frame(BROADCAST, A)) + struct.pack("!I", MAX_STREAM_FRAME + 1)
                      + b"more")
    assert [f for _, f in switch.frames] == [frame(BROADCAST, A)]
    assert transport.disconnecting


def test_a_lost_connection_leaves_the_switch():
    switch, port, transport = streamPort()
    port.connectionLost(None)
    assert switch.attached == [] and port.send(b"x") is False


class StreamClient(Protocol):
    """A QEMU, as far as the framing goes."""

    def __init__(self):
        self.buffer = b""

    def frames(self):
        return unframe(self.buffer)

    def dataReceived(self, data):
        self.buffer += data


def test_two_stream_clients_meet_the_dhcp_server_through_iosim():
    clock = Clock()
    switch = Switch(clock)
    DHCPServer(clock, switch).start()
    factory = StreamPortFactory(switch)
    clients, pumps = [], []
    for _ in range(2):
        server = factory.buildProtocol(None)
        client = StreamClient()
        _, _, pump = iosim.connectedServerAndClient(lambda s=server: s, lambda c=client: c)
        clients.append(client)
        pumps.append(pump)
    (one, two), ports = clients, [p for p in switch.ports if isinstance(p, StreamPort)]
    assert [p.name for p in ports] == ["stream client 1", "stream client 2"]
    discover = udpFrame(A, BROADCAST, bootp(dhcp.DISCOVER, A))
    one.transport.write(framed(discover))
    for pump in pumps:
        pump.flush()
    [offer] = one.frames()
    assert offer[:6] == A and dhcp.parseDHCP(offer[42:]).messageType == dhcp.OFFER
    assert two.frames() == [discover]  # the broadcast reached the other client


# -- a real unix socket and a real reactor

class UnixSocketTests(unittest.TestCase):

    def setUp(self):
        folder = tempfile.mkdtemp(prefix="cpushare-test-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.path = os.path.join(folder, "net.sock")
        self.switch = Switch(globalReactor)
        self.dhcp = DHCPServer(globalReactor, self.switch)
        self.dhcp.start()
        self.listening = listenUNIX(globalReactor, self.switch, self.path)
        self.addCleanup(self.listening.stopListening)

    @inlineCallbacks
    def connect(self):
        client = StreamClient()
        factory = Factory.forProtocol(lambda: client)
        yield UNIXClientEndpoint(globalReactor, self.path).connect(factory)
        self.addCleanup(client.transport.loseConnection)
        return client

    @inlineCallbacks
    def waitFor(self, condition, timeout=5.0):
        for _ in range(int(timeout / 0.01)):
            if condition():
                return
            yield deferLater(globalReactor, 0.01, lambda: None)
        self.fail("timed out")

    def test_socket_is_for_its_owner_only(self):
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    @inlineCallbacks
    def test_clients_exchange_frames_and_get_an_address(self):
        one = yield self.connect()
        two = yield self.connect()
        yield self.waitFor(lambda: len(self.switch.ports) == 3)
        hello = frame(BROADCAST, A, b"x" * 1400)
        one.transport.write(framed(hello))
        yield self.waitFor(lambda: two.frames() == [hello])
        two.transport.write(framed(udpFrame(B, BROADCAST, bootp(dhcp.DISCOVER, B))))
        yield self.waitFor(lambda: any(f[:6] == B for f in two.frames()))
        offer = [f for f in two.frames() if f[:6] == B][0]
        self.assertEqual(dhcp.parseDHCP(offer[42:]).messageType, dhcp.OFFER)
        one.transport.loseConnection()
        yield self.waitFor(lambda: len(self.switch.ports) == 2)

    @inlineCallbacks
    def test_a_client_that_does_not_read_loses_frames_not_memory(self):
        slow = yield self.connect()
        yield self.waitFor(lambda: len(self.switch.ports) == 2)
        slow.transport.pauseProducing()
        [port] = [p for p in self.switch.ports if isinstance(p, StreamPort)]
        source = SinkPort()
        self.switch.attach(source)
        for i in range(2000):
            self.switch.frameReceived(source, frame(BROADCAST, A, b"%06d" % i + b"z" * 1400))
            if i % 100 == 0:
                yield deferLater(globalReactor, 0, lambda: None)
        counters = self.switch.countersFor(port)
        self.assertGreater(counters.droppedOut, 0)
        buffered = len(port.transport.dataBuffer) + sum(map(len, port.transport._tempDataBuffer))
        self.assertLess(buffered, 64 * 1024 + 2 * 1500)
        slow.transport.resumeProducing()
        yield self.waitFor(lambda: len(slow.frames()) == counters.framesOut)
        got = slow.frames()
        numbers = [int(f[14:20]) for f in got]
        self.assertEqual(numbers, sorted(numbers))
        self.assertTrue(all(len(f) == 14 + 1406 for f in got))
        self.assertEqual(counters.framesOut + counters.droppedOut, 2000)

    def test_a_second_listener_on_a_live_socket_fails(self):
        self.assertRaises(CannotListenError, listenUNIX, globalReactor, self.switch, self.path)
