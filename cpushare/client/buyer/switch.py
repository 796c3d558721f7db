"""
The buyer's virtual ethernet: a learning L2 switch.

Ports (VM channels, the TAP device, unix-socket clients, the DHCP server)
provide L{IPort}.  A port hands each frame it receives to
C{switch.frameReceived(port, frame)}; the switch calls C{send(frame)} on the
ports the frame goes out of.

Forwarding
    A unicast frame whose destination MAC is in the table goes out of that
    one port, unless that is the port it came in on (then it is filtered:
    a switch never sends a frame back out of its ingress port).  Broadcast,
    multicast and unknown unicast frames are flooded to every other port,
    except that unknown unicast is not flooded to ports that are pinned to
    their own MACs (see below): every MAC such a port may use is already
    known, so the frame cannot be for it.

Checks on every incoming frame (each failure is dropped and counted on the
ingress port)
    - shorter than the 14-byte ethernet header (C{droppedRunt});
    - longer than C{maxFrameSize} (C{droppedOversize}).  Frames carry no FCS
      here, so the default, L{MAX_FRAME_SIZE} = 1522 (1518 + an 802.1Q tag),
      leaves room for any standard frame; L{JUMBO_FRAME_SIZE} is there for
      networks that want jumbo frames;
    - a broadcast, multicast or all-zero source MAC (C{droppedBadSource});
    - a source MAC the port may not use (C{droppedSpoofed}): a port with an
      C{allowedSources} set (a VM port gets the MAC the market assigned to
      its NIC) may only send from those MACs, and no other port may send
      from a MAC that belongs to such a port.

The MAC table and its bounds
    MACs in a port's C{allowedSources} are static entries: learned at
    attach, never aged, never moved.  All others are learned from source
    addresses and forgotten after C{agingTime} seconds without a frame (on
    the injected clock; expiry is checked as frames arrive, so no timer
    runs).  The learned part holds at most C{maxEntries} MACs, and at most
    C{maxEntriesPerPort} of them may point at any one port.  When either
    bound is reached the switch does not learn the new MAC and evicts
    nobody: frames to that MAC are flooded, which costs bandwidth but keeps
    every host reachable.  So a port spoofing random source MACs cannot
    grow memory without bound, cannot push out the entries of hosts that
    were there first, and cannot fill the table on its own.  Refusals are
    counted (C{learningRefused}).

Output drops
    C{send} returns False when a port cannot take a frame now (its queue is
    full); that is counted on the egress port (C{droppedOut}).
"""

from collections import OrderedDict, deque

from twisted.logger import Logger
from zope.interface import Attribute, Interface

from cpushare.client.buyer.frames import ETHERNET_HEADER_SIZE, ZERO_MAC, macToString

MAX_FRAME_SIZE = 1518 + 4
JUMBO_FRAME_SIZE = 9018 + 4
MAX_ENTRIES = 4096
MAX_ENTRIES_PER_PORT = 1024
AGING_TIME = 300.0


class IPort(Interface):
    """One port of the buyer's switch."""

    name = Attribute("A short text naming the port for people: 'vm 12', 'tap cpushare0'.")
    allowedSources = Attribute(
        "None (any unicast source MAC), or a frozenset of the 6-byte MACs this "
        "port may send from; they are pinned to this port."
    )

    def send(frame):
        """
        Deliver one ethernet frame out of this port.  Return False if the port
        had to drop it (a full queue, a closed device), True otherwise.
        """


class PortCounters:
    """What one port of the switch took in and gave out, and what it dropped."""

    __slots__ = (
        "framesIn", "bytesIn", "framesOut", "bytesOut",
        "droppedRunt", "droppedOversize", "droppedBadSource", "droppedSpoofed",
        "droppedOut", "learningRefused",
    )

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    @property
    def dropped(self):
        return (self.droppedRunt + self.droppedOversize + self.droppedBadSource
                + self.droppedSpoofed + self.droppedOut)

    def asDict(self):
        return {name: getattr(self, name) for name in self.__slots__}


class MACEntry:
    __slots__ = ("port", "lastSeen")

    def __init__(self, port, lastSeen):
        self.port, self.lastSeen = port, lastSeen


class Switch:
    """
    A learning ethernet switch between L{IPort}s; see the module docstring
    for its rules.  C{clock} provides C{IReactorTime}.
    """

    log = Logger()

    def __init__(self, clock, maxFrameSize=MAX_FRAME_SIZE, maxEntries=MAX_ENTRIES,
                 maxEntriesPerPort=MAX_ENTRIES_PER_PORT, agingTime=AGING_TIME):
        self.clock = clock
        self.maxFrameSize = maxFrameSize
        self.maxEntries = maxEntries
        self.maxEntriesPerPort = maxEntriesPerPort
        self.agingTime = agingTime
        self.ports = {}  # port -> PortCounters, in attach order
        self._static = {}  # mac -> port
        self._learned = OrderedDict()  # mac -> MACEntry, least recently seen first
        self._learnedPerPort = {}  # port -> number of learned entries
        self._pending = deque()
        self._forwarding = False

    # -- ports

    def attach(self, port):
        """Join C{port} to the switch; its allowed MACs become static entries."""
        if port in self.ports:
            return self.ports[port]
        allowed = port.allowedSources or ()
        for mac in allowed:
            owner = self._static.get(mac)
            if owner is not None:
                raise ValueError(
                    f"MAC {macToString(mac)} of {port.name} already belongs to {owner.name}"
                )
        for mac in allowed:
            self._forget(mac)
            self._static[mac] = port
        counters = self.ports[port] = PortCounters()
        self._learnedPerPort[port] = 0
        self.log.info("port {name} joined the switch", name=port.name)
        return counters

    def detach(self, port):
        """Remove C{port} and every MAC table entry that points at it."""
        if self.ports.pop(port, None) is None:
            return
        for mac in [m for m, p in self._static.items() if p is port]:
            del self._static[mac]
        for mac in [m for m, e in self._learned.items() if e.port is port]:
            del self._learned[mac]
        del self._learnedPerPort[port]
        self.log.info("port {name} left the switch", name=port.name)

    def countersFor(self, port):
        return self.ports[port]

    def macTable(self):
        """The table now, for people: a list of (mac text, port, age in seconds or None if static)."""
        self._expire(self.clock.seconds())
        now = self.clock.seconds()
        rows = [(macToString(mac), port, None) for mac, port in self._static.items()]
        rows += [(macToString(mac), e.port, now - e.lastSeen) for mac, e in self._learned.items()]
        return rows

    def lookup(self, mac):
        """The port a frame for C{mac} would go out of, or None if it would flood."""
        port = self._static.get(mac)
        if port is not None:
            return port
        self._expire(self.clock.seconds())
        entry = self._learned.get(mac)
        return entry.port if entry is not None else None

    # -- forwarding

    def frameReceived(self, port, frame):
        """
        One frame from C{port}.  Frames that ports send in reply from inside
        C{send} (the DHCP server does) are queued and forwarded after the
        current one, so forwarding never recurses.
        """
        if self._forwarding:
            self._pending.append((port, frame))
            return
        self._forwarding = True
        try:
            self._forward(port, frame)
            while self._pending:
                self._forward(*self._pending.popleft())
        finally:
            self._forwarding = False
            self._pending.clear()

    def _forward(self, port, frame):
        counters = self.ports.get(port)
        if counters is None:
            return  # a late frame from a port that has left
        size = len(frame)
        counters.framesIn += 1
        counters.bytesIn += size
        if size < ETHERNET_HEADER_SIZE:
            counters.droppedRunt += 1
            return
        if size > self.maxFrameSize:
            counters.droppedOversize += 1
            return
        dst = frame[0:6]
        src = frame[6:12]
        if src[0] & 1 or src == ZERO_MAC:
            counters.droppedBadSource += 1
            return
        allowed = port.allowedSources
        if allowed is not None and src not in allowed:
            counters.droppedSpoofed += 1
            return
        owner = self._static.get(src)
        if owner is not None and owner is not port:
            counters.droppedSpoofed += 1
            return

        now = self.clock.seconds()
        self._expire(now)
        if owner is None:
            self._learn(port, counters, src, now)

        if not dst[0] & 1:
            out = self._static.get(dst)
            if out is None:
                entry = self._learned.get(dst)
                out = entry.port if entry is not None else None
            if out is not None:
                if out is not port:
                    self._send(out, frame, size)
                return
            self._flood(port, frame, size, unknownUnicast=True)
        else:
            self._flood(port, frame, size, unknownUnicast=False)

    def _flood(self, ingress, frame, size, unknownUnicast):
        for out in tuple(self.ports):
            if out is ingress:
                continue
            if unknownUnicast and out.allowedSources is not None:
                continue
            self._send(out, frame, size)

    def _send(self, out, frame, size):
        counters = self.ports.get(out)
        if counters is None:
            return
        try:
            sent = out.send(frame)
        except Exception:
            self.log.failure("port {name} failed to send a frame", name=out.name)
            sent = False
        if sent:
            counters.framesOut += 1
            counters.bytesOut += size
        else:
            counters.droppedOut += 1

    # -- the learned table

    def _learn(self, port, counters, mac, now):
        learned = self._learned
        entry = learned.get(mac)
        if entry is not None:
            if entry.port is not port:
                if self._learnedPerPort[port] >= self.maxEntriesPerPort:
                    counters.learningRefused += 1
                    return
                self._learnedPerPort[entry.port] -= 1
                self._learnedPerPort[port] += 1
                entry.port = port
            entry.lastSeen = now
            learned.move_to_end(mac)
            return
        if len(learned) >= self.maxEntries or self._learnedPerPort[port] >= self.maxEntriesPerPort:
            counters.learningRefused += 1
            return
        learned[mac] = MACEntry(port, now)
        self._learnedPerPort[port] += 1

    def _expire(self, now):
        learned = self._learned
        deadline = now - self.agingTime
        while learned:
            mac, entry = next(iter(learned.items()))
            if entry.lastSeen > deadline:
                break
            del learned[mac]
            self._learnedPerPort[entry.port] -= 1

    def _forget(self, mac):
        entry = self._learned.pop(mac, None)
        if entry is not None:
            self._learnedPerPort[entry.port] -= 1
