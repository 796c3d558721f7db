"""
The market measures each seller's bandwidth itself, on the seller's own
connection, so buyers can screen on a figure the seller cannot inflate.

A measurement sends C{COUNT} Probe commands of 60000 random bytes each to
the seller, all at once, and times the answers on the market's own clock:
that is the bandwidth towards the seller.  Then C{COUNT} Probes whose
answers carry 60000 bytes each: the bandwidth from the seller.  Each way is
the bytes over the time from sending the first request to receiving the
last answer, so it includes one round trip: the figure is never more than
the link carries (a little less on a long link), and nothing the seller
says enters it.  The seller's figure is the lower of the two, in megabits
a second.

An answer counts only if it proves the seller had the bytes: towards the
seller, a digest of the probe's fresh nonce and random bytes, which needs
every byte; from it, bytes derived from the nonce, which it cannot send
before the request arrives (L{cpushare.protocol.proof}).  A seller whose
answers prove nothing (it answered a probe before it could have received
it, or with bytes of its own) is caught: the measurement fails, the
answers are counted in C{BandwidthMeter.rejected}, and the seller loses any
figure it had until it is measured honestly.  A seller is measured shortly
after it comes online and then every C{EVERY} seconds; about 2 MB cross
its connection each time.  A seller that does not answer within C{TIMEOUT}
gets no new figure (one never measured fails --min-bandwidth screens).

At most C{AT_ONCE} sellers are measured at a time, market-wide: when
thousands of sellers come back together (the server restarted), their
measurements queue instead of putting gigabytes in flight at once.
"""

import os

from twisted.internet import defer
from twisted.logger import Logger

from cpushare.protocol import commands, proof

COUNT = 16
FIRST = 2.0
EVERY = 3600.0
TIMEOUT = 60.0
AT_ONCE = 4

log = Logger()


class UnprovenAnswers(Exception):
    """Answers to Probe that do not prove the seller received or sent the bytes."""

    def __init__(self, count, of, what):
        Exception.__init__(self, f"{count} of {of} answers to Probe {what}")
        self.count = count


async def bandwidth(reactor, session, count=COUNT, timeout=TIMEOUT):
    """(down, up) in megabits a second, measured on C{session}'s connection."""
    chunk = commands.PROBE_CHUNK

    async def timed(probes):
        start = reactor.seconds()
        calls = [session.control.callRemote(commands.Probe, **kw) for kw in probes]
        results = await defer.gatherResults(calls, consumeErrors=True).addTimeout(
            timeout, reactor)
        return reactor.seconds() - start, results

    payload = os.urandom(count * chunk)
    towards = [{"nonce": proof.nonce(), "data": payload[i * chunk:(i + 1) * chunk]}
               for i in range(count)]
    down, results = await timed(towards)
    wrong = sum(r.get("digest") != proof.probeDigest(p["nonce"], p["data"])
                for p, r in zip(towards, results))
    if wrong:
        raise UnprovenAnswers(wrong, count, "did not carry the digest of the bytes sent")

    back = [{"nonce": proof.nonce(), "data": b"", "back": chunk} for _ in range(count)]
    up, results = await timed(back)
    wrong = sum(r.get("data") != proof.probeFill(p["nonce"], chunk)
                for p, r in zip(back, results))
    if wrong:
        raise UnprovenAnswers(wrong, count, "did not carry the bytes asked for")

    def mbps(seconds):
        return count * chunk * 8 / max(seconds, 1e-6) / 1e6

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
        self.rejected = 0       # answers to Probe that proved nothing
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
                 name=self.session.account.name, down=down, up=up)
        self.onMeasured(self.session)

    def _failed(self, failure):
        if failure.check(UnprovenAnswers):
            self.rejected += failure.value.count
            self.session.bandwidthMbps = None
            self.onMeasured(self.session)
            log.warn("seller {name}: {why}; it has no bandwidth figure until it is measured"
                     " again", name=self.session.account.name,
                     why=failure.getErrorMessage())
        elif self.session.connected:
            log.warn("seller {name}: measuring its bandwidth failed: {why}",
                     name=self.session.account.name, why=failure.getErrorMessage())

    def _again(self, _):
        if self.session.connected and self.every:
            self._call = self.reactor.callLater(self.every, self._run)
