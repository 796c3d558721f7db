"""Heartbeats on a fake clock."""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from cpushare.protocol.commands import Ping
from cpushare.protocol.heartbeat import Heartbeat


class FakeControl:
    def __init__(self):
        self.calls = []

    def callRemote(self, command, **kw):
        d = Deferred()
        self.calls.append((command, kw, d))
        return d


class FakeMux:
    def __init__(self, clock):
        self.control = FakeControl()
        self.lastReceived = clock.seconds()
        self.silent = []
        self.connected = True

    def peerSilent(self, seconds):
        self.silent.append(seconds)

    def describePeer(self):
        return "fake"


def test_latency_is_the_median_of_answered_pings():
    clock = Clock()
    mux = FakeMux(clock)
    hb = Heartbeat(clock, mux, interval=1.0, timeout=5.0)
    hb.start()
    assert hb.latencyMs() is None
    for delay in (0.010, 0.002, 0.004):
        command, kw, d = mux.control.calls[-1]
        assert command is Ping
        clock.advance(delay)
        mux.lastReceived = clock.seconds()
        d.callback({"nonce": kw["nonce"]})
        clock.advance(1.0 - delay)
    assert abs(hb.latencyMs() - 4.0) < 1e-6
    hb.stop()


def test_a_silent_peer_is_declared_gone_after_the_timeout():
    clock = Clock()
    mux = FakeMux(clock)
    hb = Heartbeat(clock, mux, interval=1.0, timeout=5.0)
    hb.start()
    clock.advance(4.0)
    mux.lastReceived = clock.seconds()
    clock.advance(5.0)
    assert mux.silent == []
    clock.advance(1.0)
    assert len(mux.silent) == 1 and mux.silent[0] > 5.0
    pings = len(mux.control.calls)
    clock.advance(10.0)
    assert len(mux.control.calls) == pings, "no pings after the peer is gone"
