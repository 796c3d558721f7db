"""
The multiplexed framing: parsing, routing, bad input and flow control,
on in-memory transports and a fake clock.
"""

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp
from twisted.test import iosim

from cpushare.protocol import mux
from cpushare.protocol.mux import (
    CHANNEL_QUEUE_LIMIT, CHANNEL_RESERVE, CONTROL_QUEUE_LIMIT, FRAME_QUEUE_LIMIT, MAX_PAYLOAD,
    ControlProtocol,
    Multiplexer, ProtocolError, VersionMismatch, encode, greeting,
)


class Echo(amp.Command):
    arguments = [(b"text", amp.Unicode())]
    response = [(b"text", amp.Unicode())]


class EchoControl(ControlProtocol):
    @Echo.responder
    def echo(self, text):
        return {"text": text.upper()}


class Mux(Multiplexer):
    def __init__(self, reactor):
        Multiplexer.__init__(self, reactor)
        self.greetings = []

    def makeControl(self):
        return EchoControl()

    def greetingReceived(self, version, software):
        self.greetings.append((version, software))


def connected():
    clock = MemoryReactorClock()
    m = Mux(clock)
    transport = StringTransport()
    m.makeConnection(transport)
    return clock, m, transport


def test_greeting_is_sent_first():
    clock, m, transport = connected()
    assert transport.value() == greeting()
    assert transport.value().startswith(b"CPUSHARE/1 cpushare/")


def test_messages_are_parsed_across_any_split():
    stream = greeting(b"peer/1".decode()) + encode(5, b"abc") + encode(7, b"") + encode(5, b"x" * 3000)
    for cut in range(1, len(stream)):
        clock, m, _ = connected()
        got = []
        m.route(5, got.append)
        m.route(7, got.append)
        m.dataReceived(stream[:cut])
        m.dataReceived(stream[cut:])
        assert got == [b"abc", b"", b"x" * 3000], cut
        assert m.greetings == [(1, "peer/1")]
        assert m.counters.framesIn == 3


def test_unrouted_frames_are_dropped_and_counted():
    clock, m, _ = connected()
    got = []
    m.route(5, got.append)
    m.dataReceived(greeting() + encode(6, b"not yours") + encode(5, b"mine"))
    assert got == [b"mine"]
    assert m.counters.droppedUnrouted == 1


def test_routes_change_only_through_route_and_unroute():
    """route/unroute do what writing the routes dict did; the dict is not writable."""
    clock, m, _ = connected()
    got, other = [], []
    m.route(5, got.append)
    m.dataReceived(greeting() + encode(5, b"one"))
    m.route(5, other.append)                        # a new route replaces the old one
    m.dataReceived(encode(5, b"two"))
    assert (got, other) == ([b"one"], [b"two"])
    assert m.routes == {5: other.append}
    # unroute(channel, handler) leaves a route that is not that handler's.
    assert not m.unroute(5, got.append)
    assert m.unroute(5, other.append)
    assert not m.unroute(5)
    m.dataReceived(encode(5, b"three"))
    assert other == [b"two"] and m.counters.droppedUnrouted == 1
    m.route(6, got.append)
    assert m.unroute(6) and m.routes == {}
    with pytest.raises(TypeError):
        m.routes[7] = got.append
    with pytest.raises(AttributeError):
        m.routes = {}


def test_oversized_message_closes_the_connection():
    clock, m, transport = connected()
    m.dataReceived(greeting() + mux.HEADER.pack(3, MAX_PAYLOAD + 1) + b"x" * 10)
    assert transport.disconnecting
    assert isinstance(m.closeReason, ProtocolError)
    assert "larger than the limit" in str(m.closeReason)
    # Nothing after the bad header is interpreted.
    m.dataReceived(encode(3, b"later"))
    assert m.counters.framesIn == 0


@pytest.mark.parametrize("data, words", [
    (b"GET / HTTP/1.1\r\n\r\n", "not speaking the CPUShare protocol"),
    (b"CPUSHARE/x y\n", "not a CPUShare greeting"),
    (b"CPUSHARE/" + b"1" * 200, "not speaking the CPUShare protocol"),
])
def test_a_peer_that_is_not_cpushare_is_closed(data, words):
    clock, m, transport = connected()
    m.dataReceived(data)
    assert transport.disconnecting
    assert words in str(m.closeReason)


def test_version_mismatch_names_both_versions_and_closes_after_our_greeting():
    clock, m, transport = connected()
    m.dataReceived(b"CPUSHARE/2 future/9\n" + encode(1, b"ignored"))
    assert isinstance(m.closeReason, VersionMismatch)
    assert "version 2" in str(m.closeReason) and "version 1" in str(m.closeReason)
    assert transport.value().startswith(greeting())
    assert transport.disconnecting
    assert m.counters.framesIn == 0


def test_frames_are_written_in_one_batch_per_reactor_turn():
    clock, m, transport = connected()
    transport.clear()
    for i in range(10):
        assert m.sendFrame(9, b"%d" % i)
    assert transport.value() == b""
    clock.advance(0)
    assert transport.value() == b"".join(encode(9, b"%d" % i) for i in range(10))


def test_a_flooding_channel_loses_its_own_frames_and_the_others_get_through():
    clock, m, transport = connected()
    clock.advance(0)
    transport.clear()
    m.pauseProducing()
    frame = b"f" * 1500
    flooded = sum(1 for _ in range(1000) if m.sendFrame(2, frame))
    # The flooder holds at most its share of the queue, and its excess is dropped.
    assert flooded * (len(frame) + 8) <= CHANNEL_QUEUE_LIMIT + len(frame) + 8
    assert m.counters.droppedFull == 1000 - flooded
    # Another VM's frames still go (the queue is not full).
    assert all(m.sendFrame(4, b"g" * 100) for _ in range(50))
    # Even with the whole queue taken by flooders, every other channel keeps
    # a reserve of its own.
    for flooder in (6, 8, 10):
        for _ in range(1000):
            m.sendFrame(flooder, frame)
    assert m._queued > FRAME_QUEUE_LIMIT
    taken = sum(1 for _ in range(300) if m.sendFrame(12, b"h" * 100))
    assert CHANNEL_RESERVE <= taken * 108 < CHANNEL_RESERVE + 108
    assert not m.sendFrame(6, frame)
    m.resumeProducing()
    data = transport.value()
    assert data.count(b"h" * 100) == taken and data.count(b"g" * 100) == 50


def test_frames_past_the_queue_bound_are_dropped_while_the_transport_is_full():
    clock, m, transport = connected()
    clock.advance(0)
    transport.clear()
    m.pauseProducing()
    frame = b"f" * 1500
    sent = 0
    # Three channels fill the queue (one alone may hold only part of it).
    while m.sendFrame(3 + 2 * (sent % 3), frame):
        sent += 1
    assert sent * (len(frame) + 8) > FRAME_QUEUE_LIMIT
    assert sent * (len(frame) + 8) <= FRAME_QUEUE_LIMIT + len(frame) + 8
    assert m.counters.droppedFull == 1
    assert m.congested
    clock.advance(0)
    assert transport.value() == b""
    # Control is never dropped, even now.
    m.sendControl(b"c" * 100)
    m.resumeProducing()
    data = transport.value()
    assert len(data) == sent * (len(frame) + 8) + 108
    assert data.endswith(encode(0, b"c" * 100))
    assert not m.congested


def test_a_peer_that_does_not_read_control_stops_being_read():
    clock, m, transport = connected()
    clock.advance(0)
    m.pauseProducing()
    assert transport.producerState == "producing"
    for _ in range(CONTROL_QUEUE_LIMIT // MAX_PAYLOAD + 1):
        m.sendControl(b"r" * MAX_PAYLOAD)
    assert transport.producerState == "paused"
    m.resumeProducing()
    assert transport.producerState == "producing"


def test_when_drained_fires_once_the_transport_takes_the_queue():
    clock, m, transport = connected()
    clock.advance(0)
    m.pauseProducing()
    m.sendFrame(3, b"x")
    d = m.whenDrained()
    assert not d.called
    m.resumeProducing()
    assert d.called


def test_control_commands_round_trip_between_two_multiplexers():
    clock = MemoryReactorClock()
    a, b = Mux(clock), Mux(clock)
    pump = iosim.connect(
        a, iosim.makeFakeServer(a), b, iosim.makeFakeClient(b), clock=clock,
    )
    results = []
    b.control.callRemote(Echo, text="hello").addCallback(results.append)
    pump.flush()
    assert results == [{"text": "HELLO"}]
    got = []
    a.route(4, got.append)
    b.sendFrame(4, b"frame")
    pump.flush()
    assert got == [b"frame"]


def test_malformed_control_data_closes_the_connection():
    clock, m, transport = connected()
    # An AMP key longer than 255 bytes is a protocol violation.
    m.dataReceived(greeting() + encode(0, b"\x01\x00" + b"k" * 256))
    assert transport.disconnecting
    assert "control" in str(m.closeReason)


def test_closing_unregisters_the_producer_so_tls_can_close():
    clock, m, transport = connected()
    assert transport.producer is m
    m.transport.loseConnection()
    assert transport.producer is None
    assert transport.disconnecting


def test_closing_writes_what_is_still_queued_first():
    clock, m, transport = connected()
    clock.advance(0)
    transport.clear()
    m.sendFrame(3, b"last words")
    m.sendControl(b"goodbye")
    m.transport.loseConnection()
    assert transport.value() == encode(3, b"last words") + encode(0, b"goodbye")
    assert transport.disconnecting


def test_nagle_is_off_so_small_messages_are_not_held_back():
    class TCPTransport(StringTransport):
        noDelay = False

        def setTcpNoDelay(self, enabled):
            self.noDelay = enabled

    m = Mux(MemoryReactorClock())
    transport = TCPTransport()
    m.makeConnection(transport)
    assert transport.noDelay
