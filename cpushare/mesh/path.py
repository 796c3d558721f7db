"""
One direct path to a peer seller, on a clock passed in.

The path starts "trying": it punches holes by sending a probe to every
candidate address at once (public and local, as the market brokers them),
again every L{PROBE_EVERY} seconds for L{PUNCH_FOR} seconds.  Any datagram
that authenticates (a probe-reply, a probe, a keepalive, a frame) makes it
"direct", and the address it came from becomes the path's address, which also
gets through a NAT that rewrote the peer's port.  While direct it sends a
keepalive when it sent nothing for L{KEEPALIVE_EVERY} seconds and a probe
every L{RTT_EVERY} seconds to measure the round trip.  When nothing
authenticated arrives for L{DEAD_AFTER} seconds, or punching fails, the path
is "relayed" (L{DirectPath.send} returns False and the caller uses the relay)
and it tries again after L{RETRY_FIRST} seconds, doubling up to L{RETRY_MOST}.

No amplification: only an authenticated probe is answered, with a reply as
long as the probe; nothing unauthenticated reaches a path at all (L{Mesh}
drops it in L{wire.Sessions.open}).
"""

import collections
import struct

from cpushare.mesh import wire

TRYING, DIRECT, RELAYED = "trying", "direct", "relayed"

PROBE_EVERY = 0.5
PUNCH_FOR = 10.0
KEEPALIVE_EVERY = 1.0
RTT_EVERY = 10.0
DEAD_AFTER = 5.0
RETRY_FIRST = 30.0
RETRY_MOST = 600.0
#: Probes whose replies are still awaited, at the most (older ones are forgotten).
PROBES_KEPT = 64
#: Candidate addresses of one peer, at the most.
MAX_CANDIDATES = 8

_PROBE = struct.Struct("!Q")


def checkCandidates(candidates):
    """C{candidates} as a list of (host, port); ValueError naming what is wrong."""
    candidates = list(candidates)
    if len(candidates) > MAX_CANDIDATES:
        raise ValueError(f"{len(candidates)} candidate addresses, more than {MAX_CANDIDATES}")
    checked = []
    for candidate in candidates:
        try:
            host, port = candidate
        except (TypeError, ValueError):
            raise ValueError(f"candidate {candidate!r} is not a (host, port) pair") from None
        if not isinstance(host, str) or not host or len(host) > 255:
            raise ValueError(f"candidate host {host!r} is not an address")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ValueError(f"candidate port {port!r} is not a UDP port")
        checked.append((host, port))
    return checked


class DirectPath:
    """
    The direct path of one L{wire.Pair} to the peer.

    @ivar state: "trying", "direct" or "relayed".
    @ivar rtt: the smoothed round trip in seconds (RFC 6298's 1/8 gain), or
        None before a probe was answered.
    @ivar address: where datagrams go while direct (the last authenticated
        datagram's source).
    @ivar bytesSent, bytesReceived, framesSent, framesReceived: the frames
        carried direct, for billing (both ends count).
    """

    def __init__(self, clock, transport, pair, candidates, deliver=lambda frame: None):
        self.clock = clock
        self.transport = transport
        self.pair = pair
        self.candidates = checkCandidates(candidates)
        self.deliver = deliver
        self.state = RELAYED
        self.address = None
        self.rtt = None
        self.bytesSent = self.bytesReceived = 0
        self.framesSent = self.framesReceived = 0
        self.sendErrors = 0
        self.retryDelay = RETRY_FIRST
        self._probes = collections.OrderedDict()
        self._probeNumber = 0
        self._lastSent = self._lastProbe = None
        self._timer = None
        self._deadline = None
        self._punchUntil = self._round = None
        self._running = False

    # -- the caller's side -------------------------------------------------

    def start(self):
        """Begin punching."""
        self._running = True
        self._punch()

    def stop(self):
        """Stop every timer; the path stays relayed and ignores what arrives."""
        self._running = False
        self._cancel()
        self.state = RELAYED

    def send(self, frame):
        """Send one ethernet frame direct; False when the path is not direct."""
        if self.state != DIRECT or not 1 <= len(frame) <= wire.MAX_FRAME:
            return False
        datagram = self.pair.seal(wire.DATA, frame)
        if datagram is None or not self._sendto(datagram, self.address):
            return False
        self.bytesSent += len(frame)
        self.framesSent += 1
        return True

    def received(self, opened, address):
        """An authenticated datagram of this pair (L{wire.Opened}) from C{address}."""
        if not self._running:
            return
        self._alive(address)
        if opened.kind == wire.DATA:
            self.bytesReceived += len(opened.payload)
            self.framesReceived += 1
            self.deliver(opened.payload)
        elif opened.kind == wire.PROBE:
            # As long as the probe, to where it came from: never an amplifier.
            self._sendto(self.pair.seal(wire.PROBE_REPLY, opened.payload), address)
        elif opened.kind == wire.PROBE_REPLY:
            sentAt = self._probes.pop(_PROBE.unpack(opened.payload)[0], None)
            if sentAt is not None:
                sample = self.clock.seconds() - sentAt
                self.rtt = sample if self.rtt is None else self.rtt + (sample - self.rtt) / 8

    # -- states ------------------------------------------------------------

    def _cancel(self):
        for call in (self._timer, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._deadline = None

    def _schedule(self, delay, what):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, what)

    def _punch(self):
        self.state = TRYING
        self._round = self.clock.seconds()
        self._punchUntil = self._round + PUNCH_FOR
        self._probeRound()

    def _probeRound(self):
        if self.clock.seconds() >= self._punchUntil:
            self._fallBack()
            return
        targets = list(self.candidates)
        if self.address is not None and self.address not in targets:
            targets.append(self.address)
        self._probe(targets)
        # Rounds on a fixed beat, however late a call runs.
        self._round += PROBE_EVERY
        self._schedule(max(0.0, self._round - self.clock.seconds()), self._probeRound)

    def _probe(self, targets):
        number = self._probeNumber
        self._probeNumber += 1
        self._probes[number] = self.clock.seconds()
        while len(self._probes) > PROBES_KEPT:
            self._probes.popitem(last=False)
        self._lastProbe = self.clock.seconds()
        for address in targets:
            datagram = self.pair.seal(wire.PROBE, _PROBE.pack(number))
            if datagram is not None:
                self._sendto(datagram, address)

    def _alive(self, address):
        self.address = address
        if self.state != DIRECT:
            self._cancel()
            self.state = DIRECT
            self.retryDelay = RETRY_FIRST
            self._schedule(KEEPALIVE_EVERY, self._tick)
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(DEAD_AFTER)
        else:
            self._deadline = self.clock.callLater(DEAD_AFTER, self._fallBack)

    def _tick(self):
        now = self.clock.seconds()
        if self._lastProbe is None or now - self._lastProbe >= RTT_EVERY:
            self._probe([self.address])
        elif self._lastSent is None or now - self._lastSent >= KEEPALIVE_EVERY - 1e-9:
            datagram = self.pair.seal(wire.KEEPALIVE)
            if datagram is not None:
                self._sendto(datagram, self.address)
        # The next keepalive is due a second after the last datagram sent.
        due = KEEPALIVE_EVERY
        if self._lastSent is not None and self._lastSent + KEEPALIVE_EVERY > now:
            due = self._lastSent + KEEPALIVE_EVERY - now
        self._schedule(due, self._tick)

    def _fallBack(self):
        self._cancel()
        self.state = RELAYED
        self._schedule(self.retryDelay, self._punch)
        self.retryDelay = min(self.retryDelay * 2, RETRY_MOST)

    def _sendto(self, datagram, address):
        try:
            self.transport.sendto(datagram, address)
        except OSError:
            # An unreachable peer, as the kernel says: the deadline handles it.
            self.sendErrors += 1
            return False
        self._lastSent = self.clock.seconds()
        return True


class Mesh:
    """
    What one seller's UDP port does with a datagram, without the socket: open
    it (L{wire.Sessions}) and hand it to its pair's path; drop the rest.
    """

    def __init__(self):
        self.sessions = wire.Sessions()
        self.paths = {}

    def add(self, path):
        self.sessions.add(path.pair)
        self.paths[path.pair.localSession] = path

    def remove(self, path):
        self.sessions.remove(path.pair)
        if self.paths.get(path.pair.localSession) is path:
            del self.paths[path.pair.localSession]

    def datagramReceived(self, data, address):
        opened = self.sessions.open(data)
        if opened is not None:
            self.paths[opened.pair.localSession].received(opened, address)
