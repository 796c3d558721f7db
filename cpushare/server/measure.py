"""
The market measures each seller's bandwidth itself, on the seller's own
connection, so buyers can screen on a figure the seller cannot inflate.

A measurement sends C{COUNT} Probe commands of 60000 bytes each to the
seller, all at once, and times the answers (the seller can only answer a
box it has received whole): that is the bandwidth towards the seller.
Then C{COUNT} Probes whose answers carry 60000 bytes each: the bandwidth
from the seller.  Each way is the bytes over the time taken less one
round trip (the heartbeats' median); the seller's figure is the lower of
the two, in megabits a second.  A seller is measured shortly after it
comes online and then every C{EVERY} seconds; about 2 MB cross its
connection each time.  A seller that does not answer within C{TIMEOUT}
keeps no figure (and fails --min-bandwidth screens).

At most C{AT_ONCE} sellers are measured at a time, market-wide: when
thousands of sellers come back together (the server restarted), their
measurements queue instead of putting gigabytes in flight at once.
"""

from twisted.internet import defer
from twisted.logger import Logger

from cpushare.protocol import commands

COUNT = 16
FIRST = 2.0
EVERY = 3600.0
TIMEOUT = 60.0
AT_ONCE = 4

log = Logger()


async def bandwidth(reactor, session, count=COUNT, timeout=TIMEOUT):
    """(down, up) in megabits a second, measured on C{session}'s connection."""
    chunk = commands.PROBE_CHUNK
    payload = b"\x5a" * chunk
    rtt = (session.heartbeat.latencyMs() or 0.0) / 1000.0 if session.heartbeat else 0.0

    async def timed(**kw):
        start = reactor.seconds()
        calls = [session.control.callRemote(commands.Probe, **kw) for _ in range(count)]
        results = await defer.gatherResults(calls, consumeErrors=True).addTimeout(
            timeout, reactor)
        return reactor.seconds() - start, results

    down, _ = await timed(data=payload)
    up, results = await timed(data=b"", back=chunk)
    got = sum(len(r.get("data") or b"") for r in results)
    if got != count * chunk:
        raise ValueError(f"the seller answered {got} bytes of {count * chunk}")

    def mbps(seconds):
        return count * chunk * 8 / max(seconds - rtt, 1e-6) / 1e6

    return mbps(down), mbps(up)


class BandwidthMeter:
    """Measures a seller session now and then; keeps C{session.bandwidthMbps}."""

    def __init__(self, reactor, session, onMeasured, slots, first=FIRST, every=EVERY):
        """@param slots: the market's DeferredSemaphore of measurements at once."""
        self.reactor = reactor
        self.session = session
        self.slots = slots
        self.onMeasured = onMeasured
        self.every = every
        self._call = reactor.callLater(first, self._run)

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _run(self):
        self._call = None

        def measure():
            if not self.session.connected:
                return defer.succeed(None)
            d = defer.ensureDeferred(bandwidth(self.reactor, self.session))
            return d.addCallbacks(self._measured, self._failed)

        d = self.slots.run(measure)
        d.addBoth(self._again)

    def _measured(self, result):
        down, up = result
        self.session.bandwidthMbps = min(down, up)
        log.info("seller {name}: bandwidth {down:.1f} Mbps towards it, {up:.1f} from it",
                 name=self.session.account["name"], down=down, up=up)
        self.onMeasured(self.session)

    def _failed(self, failure):
        if self.session.connected:
            log.warn("seller {name}: measuring its bandwidth failed: {why}",
                     name=self.session.account["name"], why=failure.getErrorMessage())

    def _again(self, _):
        if self.session.connected and self.every:
            self._call = self.reactor.callLater(self.every, self._run)
