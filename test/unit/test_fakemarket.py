"""
The test harness itself: the in-memory links of test/fakemarket.py carry
bytes in order after their delay, stop a producer when full, close after
what was written, and a wait that nothing will end fails instead of
hanging; test/conftest.py marks the slow tests.
"""

import os
import time
import unittest
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol

from test import conftest
from test.fakemarket import (
    LINK_BUFFER, LINK_DELAY, READ_SIZE, Loopback, MarketCase, MemoryReactor, Stuck, runUntil,
)


class Recorder(Protocol):
    def __init__(self):
        self.received = []
        self.lost = None

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost = reason


class Producer:
    def __init__(self):
        self.events = []

    def pauseProducing(self):
        self.events.append("pause")

    def resumeProducing(self):
        self.events.append("resume")


def link():
    reactor = MemoryReactor()
    a = IPv4Address("TCP", "127.0.0.1", 1)
    b = IPv4Address("TCP", "127.0.0.1", 2)
    left, right = Loopback(reactor, a, b), Loopback(reactor, b, a)
    left.other, right.other = right, left
    left.protocol, right.protocol = Recorder(), Recorder()
    left.protocol.makeConnection(left)
    right.protocol.makeConnection(right)
    return reactor, left, right


def test_bytes_arrive_in_order_after_the_links_delay_in_reads_of_a_socket_size():
    reactor, left, right = link()
    left.write(b"one ")
    left.writeSequence([b"two ", b"three"])
    reactor.advance(LINK_DELAY / 2)
    assert right.protocol.received == []
    reactor.advance(LINK_DELAY / 2)
    assert right.protocol.received == [b"one two three"]
    left.write(b"x" * (READ_SIZE * 2 + 1))
    reactor.advance(LINK_DELAY)
    assert [len(d) for d in right.protocol.received[1:]] == [READ_SIZE, READ_SIZE, 1]


def test_a_paused_reader_is_given_nothing_until_it_resumes():
    reactor, left, right = link()
    right.pauseProducing()
    left.write(b"held")
    reactor.advance(LINK_DELAY)
    assert right.protocol.received == []
    right.resumeProducing()
    reactor.advance(0)
    assert right.protocol.received == [b"held"]


def test_a_full_link_pauses_its_producer_until_the_bytes_are_delivered():
    reactor, left, right = link()
    producer = Producer()
    left.registerProducer(producer, True)
    left.write(b"x" * LINK_BUFFER)
    assert producer.events == []
    left.write(b"x")
    assert producer.events == ["pause"]
    reactor.advance(LINK_DELAY)
    assert producer.events == ["pause", "resume"]


def test_closing_delivers_what_was_written_first_and_aborting_does_not():
    reactor, left, right = link()
    left.write(b"last words")
    left.loseConnection()
    left.write(b"too late")
    reactor.advance(LINK_DELAY)
    assert right.protocol.received == [b"last words"]
    assert left.protocol.lost is not None
    reactor.advance(LINK_DELAY)
    assert right.protocol.lost is not None and left.disconnected and right.disconnected

    reactor, left, right = link()
    left.write(b"lost")
    left.abortConnection()
    reactor.advance(LINK_DELAY)
    assert right.protocol.received == []
    assert "aborted" in right.protocol.lost.getErrorMessage()


def test_a_wait_that_nothing_scheduled_can_end_fails_at_once():
    d = runUntil(MemoryReactor(), defer.Deferred(), what="the wait")
    with pytest.raises(Stuck, match="the wait waits for something nothing"):
        d.result.raiseException()
    d.addErrback(lambda _: None)


def test_a_wait_past_its_limit_of_clock_time_fails():
    reactor = MemoryReactor()
    reactor.callLater(1000, lambda: None)
    d = runUntil(reactor, defer.Deferred(), limit=600, what="the wait")
    with pytest.raises(Stuck, match="after 600s of the market's time"):
        d.result.raiseException()
    d.addErrback(lambda _: None)


def test_a_wait_advances_the_clock_to_the_next_timer_only():
    reactor = MemoryReactor()
    d = defer.Deferred()
    reactor.callLater(30, d.callback, "done")
    reactor.callLater(31, lambda: None)
    assert runUntil(reactor, d).result == "done"
    assert reactor.seconds() == 30


TESTS = os.path.dirname(os.path.abspath(conftest.__file__))


class WaitsAnHour(MarketCase):
    """A market test that waits an hour of the market's time, with a seller connected."""

    __test__ = False        # run by the test below, not collected itself
    clockLimit = 7200.0
    heartbeat, heartbeatTimeout = 10, 45

    @defer.inlineCallbacks
    def test_wait(self):
        key, cert = yield self.register("sam")
        seller = yield self.connect("seller", key, cert)
        yield self.sleep(3600)
        self.waited = self.reactor.seconds()
        self.stillConnected = seller.connected


def test_a_market_test_waits_on_the_clock_not_the_wall():
    case = WaitsAnHour("test_wait")
    result = unittest.TestResult()
    started = time.monotonic()
    case.run(result)
    assert (result.errors, result.failures) == ([], [])
    assert time.monotonic() - started < 30
    assert case.waited >= 3600
    assert case.stillConnected, "the heartbeats kept the seller connected all along"


def item(path="unit/test_x.py", fixtures=(), params=None):
    marks = []
    node = SimpleNamespace(
        path=os.path.join(TESTS, path), fixturenames=fixtures, add_marker=marks.append,
        marks=marks)
    if params is not None:
        node.callspec = SimpleNamespace(params=params)
    return node


def test_the_tests_needing_postgresql_qemu_or_a_browser_are_marked_slow():
    slow = [item(fixtures=("postgres", "postgresURL")),
            item(fixtures=("db",), params={"db": "postgresql"}),
            item(fixtures=("paidMarket",), params={"paidMarket": "postgresql"}),
            item(fixtures=("browser",))]
    heavy = [item(path="vm/test_market_vms.py"), item(path="browser/test_smoke.py")]
    fast = [item(fixtures=("db",), params={"db": "sqlite"}), item(fixtures=("tmp_path",))]
    conftest.pytest_collection_modifyitems(None, slow + heavy + fast)
    assert [[m.name for m in i.marks] for i in slow] == [["slow"]] * len(slow)
    assert [i.marks for i in fast] == [[], []]
    # The VM and browser tests run one after the other in one test process.
    assert [[(m.name, m.args) for m in i.marks] for i in heavy] == [
        [("slow", ()), ("xdist_group", ("vm",))]] * len(heavy)
