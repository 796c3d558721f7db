"""
Heartbeats on the control channel.

Each side pings the other every C{interval} seconds and keeps the last
round-trip times; a peer from which nothing at all (control or frames) has
arrived for C{timeout} seconds is declared gone and its connection closed.

A round trip is timed on this side's own clock, from the moment the Ping
was written to the moment its answer arrived, and counts only if the answer
carries back the fresh random nonce the Ping carried (L{proof}): a peer
cannot answer a heartbeat before it has received it, so the latency is
never shorter than the real round trip, however the peer lies.  An answer
with another nonce (forged, or an earlier one replayed), or one that comes
later than C{timeout}, is ignored and counted in C{rejected}.
"""

import statistics
from collections import deque

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cpushare.protocol import proof
from cpushare.protocol.commands import Ping

DEFAULT_INTERVAL = 10.0
DEFAULT_TIMEOUT = 45.0
SAMPLES = 16


class Heartbeat:
    log = Logger()

    def __init__(self, reactor, mux, interval=DEFAULT_INTERVAL, timeout=DEFAULT_TIMEOUT):
        self.reactor = reactor
        self.mux = mux
        self.interval = interval
        self.timeout = timeout
        self.samples = deque(maxlen=SAMPLES)
        self.rejected = 0       # answers that proved no round trip
        self._pending = {}      # nonce -> when its Ping was sent
        self._loop = None

    def start(self):
        self._loop = LoopingCall(self.beat)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("heartbeat loop failed", f)
        )

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def beat(self):
        now = self.reactor.seconds()
        silent = now - self.mux.lastReceived
        if silent > self.timeout:
            self.stop()
            self.mux.peerSilent(silent)
            return
        for nonce, sent in list(self._pending.items()):
            if now - sent > self.timeout:
                del self._pending[nonce]
        nonce = proof.nonce()
        self._pending[nonce] = now
        d = self.mux.control.callRemote(Ping, nonce=nonce)
        d.addCallback(self._answered, nonce)
        d.addErrback(self._failed)

    def _answered(self, response, nonce):
        sent = self._pending.pop(nonce, None)
        if response.get("nonce") != nonce:
            self._reject("it did not carry back the nonce of the heartbeat it answered")
        elif sent is None or self.reactor.seconds() - sent > self.timeout:
            self._reject(f"it came more than {self.timeout:.0f}s late")
        else:
            self.samples.append(self.reactor.seconds() - sent)

    def _reject(self, why):
        self.rejected += 1
        # A line for the first few and then for every tenfold more: a peer
        # that lies all the time fills no log.
        if self.rejected <= 3 or str(self.rejected).rstrip("0") == "1":
            self.log.warn(
                "ignored a heartbeat answer from {peer} ({count} so far): {why}",
                peer=self.mux.describePeer(), count=self.rejected, why=why,
            )

    def _failed(self, failure):
        # A ping outstanding when the connection goes fails with the reason
        # the connection went; that is reported elsewhere.
        # Anything else is the peer's answer (an error, a malformed box): a
        # line for the operator, not a traceback.
        if self.mux.connected:
            self.log.warn(
                "heartbeat to {peer} failed: {why}", peer=self.mux.describePeer(),
                why=failure.getErrorMessage(),
            )

    def latencyMs(self):
        """The median round trip of the recent heartbeats, in ms, or None."""
        if not self.samples:
            return None
        return statistics.median(self.samples) * 1000.0
