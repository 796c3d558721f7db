"""
Heartbeats on the control channel.

Each side pings the other every C{interval} seconds and keeps the last
round-trip times; a peer from which nothing at all (control or frames) has
arrived for C{timeout} seconds is declared gone and its connection closed.
"""

import statistics
from collections import deque

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

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
        d = self.mux.control.callRemote(Ping, sent=now)
        d.addCallback(self._answered)
        d.addErrback(self._failed)

    def _answered(self, response):
        self.samples.append(self.reactor.seconds() - response["sent"])

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
