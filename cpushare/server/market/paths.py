"""
Direct paths between the sellers of one buyer network: who meets whom, with
which keys, and what they say they carried.

A buyer network is a buyer account's virtual ethernet: every VM of the
account.  When a VM of it runs on a seller (L{Paths.joined}) or leaves one
(L{Paths.left}), or a seller's candidate addresses change, the market sends
each seller of the network that gave candidates its whole view again
(MeshPeers): its own VMs in the network, and for every other seller with candidates (up to
L{commands.MESH_PEERS}) a fresh 32-byte pair secret, the session ids both
ends write in each other's datagrams, the peer's candidates and its VMs'
MACs.  A secret lives as long as both sellers host VMs of the network on the
same connections; it is never sent to anybody else.  The views of the
nearer sellers (by their heartbeats' round trips) leave later, so that all
of them arrive, and the sellers start punching, at about the same moment.

Sellers report each path (MeshReport): its state, round trip, and the bytes
each of their VMs sent to and received from the peer directly.  For each
direction the market bills the smaller of the sender's and the receiver's
count, shared among the VMs in proportion to what each end claimed, and
logs a mismatch past L{TOLERANCE_BYTES} and L{TOLERANCE_RATIO} against both
sellers.  The ends report at different moments, so while frames flow their
counts differ by what crossed in between: a direction is compared only when
it is quiet, when both ends' last two reports show no new bytes of it.
"""

import collections
import os

import attr
from twisted.logger import Logger

from cpushare.mesh import path as meshpath
from cpushare.mesh import wire
from cpushare.protocol import commands

#: A mismatch between both ends' counts of a quiet direction that is logged:
#: more than this many bytes and this share of the larger count.
TOLERANCE_BYTES = 1024 * 1024
TOLERANCE_RATIO = 0.05
#: The longest a view is held back so that both ends of a pair get theirs at
#: the same moment (a plain MASQUERADE router lets a pair through only when
#: both ends start punching within the time a datagram takes between them).
MAX_SYNC_DELAY = 1.0
#: The largest byte count believed in a report.
MAX_COUNT = 2 ** 62

DIRECT, RELAYED, TRYING = meshpath.DIRECT, meshpath.RELAYED, meshpath.TRYING
STATES = (DIRECT, RELAYED, TRYING)


def oneWay(seller):
    """
    Half of C{seller}'s heartbeat round trip in seconds (0 before one was
    measured), at most L{MAX_SYNC_DELAY}: how long a view takes to reach it.
    """
    heartbeat = getattr(seller, "heartbeat", None)
    latency = None if heartbeat is None else heartbeat.latencyMs()
    return 0.0 if latency is None else min(MAX_SYNC_DELAY, latency / 2000.0)


@attr.s(frozen=True)
class PairView:
    """One pair of sellers of a buyer network, as the buyer sees it."""

    sellerA = attr.ib()         # seller account names, A the older session
    sellerB = attr.ib()
    vmsA = attr.ib()            # the buyer's VM ids on each
    vmsB = attr.ib()
    state = attr.ib()           # "direct", "trying" or "relayed"
    rtt = attr.ib()             # seconds, or None
    directBytes = attr.ib()     # billed bytes carried directly, both directions
    why = attr.ib(default=None)  # why relayed, when the market knows


class _End:
    """What one seller of a pair last reported."""

    def __init__(self):
        self.state = TRYING
        self.rtt = None
        self.vms = {}               # vm id -> (sent, received)
        self.reported = False
        self.totals = (0, 0)        # bytes sent and received in all, last report
        self.quiet = (False, False)  # neither total moved in the last report


class _Pair:
    def __init__(self, secret, ids):
        self.secret = secret
        self.ids = ids              # seller session id -> the session id it chose
        self.ends = collections.defaultdict(_End)
        self.billed = {}            # (vm id, "sent" or "received") -> bytes billed
        self.logged = {}            # (from, to) -> the gap last logged
        self.agreed = collections.Counter()     # (from, to) -> the smaller count


class Paths:
    """
    The brokering of direct paths and what sellers report of them.
    C{counted(vmId, nbytes)} is told the direct bytes newly billed to a VM.
    """

    log = Logger()

    def __init__(self, reactor, random=os.urandom, counted=lambda vmId, nbytes: None):
        self.reactor = reactor
        self.random = random
        self.counted = counted
        self._spots = {}            # network -> {vm id: (seller session, mac)}
        self._pairs = {}            # network -> {(low session id, high): _Pair}
        self._taken = collections.defaultdict(set)  # seller session id -> ids it uses
        self._sent = {}             # (seller session, network) -> the view sent last
        self._dirty = set()
        self._flush = None
        self.ignored = collections.Counter()    # report entries ignored, by reason
        self.mismatches = collections.Counter()  # seller account name -> logged

    # -- who is where ------------------------------------------------------

    def joined(self, vm, seller):
        """C{vm} (with C{buyerId}, C{mac}) runs on C{seller} now."""
        spots = self._spots.setdefault(vm.buyerId, {})
        if spots.get(vm.id, (None,))[0] is not seller:
            spots[vm.id] = (seller, vm.mac)
            self._changed(vm.buyerId)

    def left(self, vm):
        """C{vm} runs on no seller now (it ended, or its seller went)."""
        spots = self._spots.get(vm.buyerId)
        if spots is not None and spots.pop(vm.id, None) is not None:
            if not spots:
                del self._spots[vm.buyerId]
            self._changed(vm.buyerId)

    def candidatesChanged(self, seller):
        """C{seller}'s candidate addresses changed: its networks are brokered again."""
        for network, spots in self._spots.items():
            if any(s is seller for s, _ in spots.values()):
                self._changed(network)

    def sessionLost(self, seller):
        for key in [k for k in self._sent if k[0] is seller]:
            del self._sent[key]

    def _changed(self, network):
        self._dirty.add(network)
        if self._flush is None:
            # Every change of this turn of the reactor, sent once.
            self._flush = self.reactor.callLater(0, self._sendViews)

    def _sellers(self, network):
        """{seller session: [(vm id, mac)]} of C{network}, by session."""
        sellers = {}
        for vmId, (seller, mac) in sorted(self._spots.get(network, {}).items()):
            sellers.setdefault(seller, []).append((vmId, mac))
        return dict(sorted(sellers.items(), key=lambda item: item[0].sessionId))

    def _sendViews(self):
        self._flush = None
        dirty, self._dirty = self._dirty, set()
        for network in sorted(dirty):
            sellers = self._sellers(network)
            # The first sellers with candidates, by session, form the mesh
            # (each one's peers are all the others); a seller without a UDP
            # path gets no view: its frames go through the relay, as always.
            meshed = [s for s in sellers if s.meshCandidates][:commands.MESH_PEERS + 1]
            self._prunePairs(network, {s.sessionId for s in meshed})
            ways = {s: oneWay(s) for s in meshed}
            latest = max(ways.values(), default=0.0)
            for seller, vms in sellers.items():
                if seller.meshCandidates:
                    # The nearer sellers' views leave later, so that every
                    # seller of the mesh starts punching at the same moment.
                    self._sendView(seller, network, vms,
                                   {s: sellers[s] for s in meshed} if seller in meshed else {},
                                   latest - ways.get(seller, latest))
            for key in [k for k in self._sent if k[1] == network and
                        (k[0] not in sellers or not k[0].meshCandidates)]:
                # The network left that seller: it forgets the network's paths.
                self._send(key[0], network, [], [])

    def _prunePairs(self, network, ids):
        """Forget the pairs of C{network} whose sellers are not both in the mesh (C{ids})."""
        pairs = self._pairs.get(network, {})
        for key in [k for k in pairs if k[0] not in ids or k[1] not in ids]:
            for sessionId, chosen in pairs.pop(key).ids.items():
                taken = self._taken[sessionId]
                taken.discard(chosen)
                if not taken:
                    del self._taken[sessionId]
        if not pairs:
            self._pairs.pop(network, None)

    def _pair(self, network, a, b):
        low, high = sorted((a.sessionId, b.sessionId))
        pairs = self._pairs.setdefault(network, {})
        pair = pairs.get((low, high))
        if pair is None:
            # Each seller finds a pair by the id it chose: unique on that seller.
            ids = {}
            for sessionId in (low, high):
                taken = self._taken[sessionId]
                ids[sessionId] = wire.newSessionId(taken, self.random)
                taken.add(ids[sessionId])
            pair = pairs[(low, high)] = _Pair(self.random(wire.SECRET_SIZE), ids)
        return pair

    def _sendView(self, seller, network, vms, sellers, delay=0.0):
        peers = []
        for other, otherVMs in sellers.items():
            if other is seller:
                continue
            pair = self._pair(network, seller, other)
            peers.append({
                "peer": other.sessionId, "secret": pair.secret,
                "local_session": pair.ids[seller.sessionId],
                "remote_session": pair.ids[other.sessionId],
                "candidates": [{"host": h, "port": p} for h, p in other.meshCandidates],
                "macs": [mac for _, mac in otherVMs[:commands.MESH_MACS]]})
        self._send(seller, network, [vmId for vmId, _ in vms], peers, delay)

    def _send(self, seller, network, vms, peers, delay=0.0):
        view = (list(vms), peers)
        key = (seller, network)
        if self._sent.get(key) == view:
            return
        if vms:
            self._sent[key] = view
        else:
            self._sent.pop(key, None)
        if delay > 0:
            self.reactor.callLater(delay, self._deliver, seller, network, vms, peers)
        else:
            self._deliver(seller, network, vms, peers)

    def _deliver(self, seller, network, vms, peers):
        if not seller.connected:
            return
        seller.control.callRemote(
            commands.MeshPeers, network=network, vms=list(vms), peers=peers).addErrback(
            lambda f: seller.connected and self.log.warn(
                "mesh: seller {seller} refused the view of network {network}: {why}",
                seller=seller.account.name, network=network, why=f.getErrorMessage()))

    # -- what sellers report -----------------------------------------------

    def report(self, seller, paths):
        """A MeshReport of C{seller}: keep it, and bill what both ends agree on."""
        for entry in paths:
            network, peer = entry["network"], entry["peer"]
            pair = self._pairs.get(network, {}).get(tuple(sorted((seller.sessionId, peer))))
            if pair is None or peer == seller.sessionId:
                self.ignored["no such path"] += 1
                continue
            if entry["state"] not in STATES:
                raise commands.BadRequest(f"unknown path state {entry['state']!r}")
            spots = self._spots.get(network, {})
            end = pair.ends[seller.sessionId]
            counts = {}
            for row in entry["vms"]:
                vmId, sent, received = row["vm"], row["sent"], row["received"]
                if spots.get(vmId, (None,))[0] is not seller:
                    self.ignored["not its VM"] += 1
                    continue
                if not (0 <= sent <= MAX_COUNT and 0 <= received <= MAX_COUNT):
                    raise commands.BadRequest(f"VM {vmId}: byte counts out of range")
                before = end.vms.get(vmId, (0, 0))
                if sent < before[0] or received < before[1]:
                    self.ignored["counts went back"] += 1
                    continue
                counts[vmId] = (sent, received)
            end.vms.update(counts)
            totals = (sum(s for s, _ in end.vms.values()), sum(r for _, r in end.vms.values()))
            end.quiet = (end.reported and totals[0] == end.totals[0],
                         end.reported and totals[1] == end.totals[1])
            end.totals = totals
            end.state = entry["state"]
            rtt = entry.get("rtt_ms")
            end.rtt = None if rtt is None or not 0 <= rtt < 600000 else rtt / 1000.0
            end.reported = True
            self._bill(network, pair, seller.sessionId, peer)

    def _bill(self, network, pair, one, other):
        for sender, receiver in ((one, other), (other, one)):
            sentBy = pair.ends[sender].vms if sender in pair.ends else {}
            receivedBy = pair.ends[receiver].vms if receiver in pair.ends else {}
            claimSent = sum(s for s, _ in sentBy.values())
            claimReceived = sum(r for _, r in receivedBy.values())
            agreed = min(claimSent, claimReceived)
            pair.agreed[(sender, receiver)] = agreed
            self._share(pair, sentBy, 0, claimSent, agreed, "sent")
            self._share(pair, receivedBy, 1, claimReceived, agreed, "received")
            if sender in pair.ends and receiver in pair.ends and \
                    pair.ends[sender].quiet[0] and pair.ends[receiver].quiet[1]:
                self._checkMismatch(network, pair, sender, receiver, claimSent, claimReceived)

    def _share(self, pair, claims, which, total, agreed, label):
        if not total:
            return
        for vmId, counts in claims.items():
            share = counts[which] * agreed // total
            before = pair.billed.get((vmId, label), 0)
            if share > before:
                pair.billed[(vmId, label)] = share
                self.counted(vmId, share - before)

    def _checkMismatch(self, network, pair, sender, receiver, sent, received):
        key = (sender, receiver)
        gap = abs(sent - received)
        tolerance = max(TOLERANCE_BYTES, TOLERANCE_RATIO * max(sent, received))
        if gap <= tolerance:
            pair.logged.pop(key, None)
            return
        if gap <= pair.logged.get(key, -tolerance) + tolerance:
            return              # logged already, and it did not grow
        pair.logged[key] = gap
        names = [self._name(network, s) for s in key]
        for name in names:
            self.mismatches[name] += 1
        self.log.warn(
            "mesh: network {network}: {a} says it sent {sent} bytes directly to {b},"
            " which says it received {received}; billed {billed}, the smaller"
            " (mismatch logged against both)", network=network, a=names[0], b=names[1],
            sent=sent, received=received, billed=min(sent, received))

    def _name(self, network, sessionId):
        for seller, _ in self._spots.get(network, {}).values():
            if seller.sessionId == sessionId:
                return seller.account.name
        return f"session {sessionId}"

    # -- what the buyer sees -----------------------------------------------

    def paths(self, network):
        """The L{PairView}s of C{network}, pair by pair of its sellers."""
        sellers = list(self._sellers(network).items())
        views = []
        for i, (a, vmsA) in enumerate(sellers):
            for b, vmsB in sellers[i + 1:]:
                views.append(self._view(network, a, vmsA, b, vmsB))
        return views

    def _view(self, network, a, vmsA, b, vmsB):
        ids = lambda vms: [vmId for vmId, _ in vms]  # noqa: E731
        pair = self._pairs.get(network, {}).get((a.sessionId, b.sessionId))
        if pair is None:
            missing = [s.account.name for s in (a, b) if not s.meshCandidates]
            why = (f"{' and '.join(missing)} {'has' if len(missing) == 1 else 'have'}"
                   " no UDP path to the market" if missing
                   else f"more than {commands.MESH_PEERS} sellers in the network")
            return PairView(a.account.name, b.account.name, ids(vmsA), ids(vmsB),
                            RELAYED, None, 0, why)
        ends = [pair.ends[s.sessionId] if s.sessionId in pair.ends else None for s in (a, b)]
        states = [end.state if end is not None and end.reported else TRYING for end in ends]
        if states == [DIRECT, DIRECT]:
            state = DIRECT
        elif TRYING in states:
            state = TRYING
        else:
            state = RELAYED
        rtts = [end.rtt for end in ends if end is not None and end.rtt is not None]
        rtt = sum(rtts) / len(rtts) if rtts else None
        why = None
        if state == RELAYED:
            why = "no direct path: hole punching failed or the path went silent"
        return PairView(a.account.name, b.account.name, ids(vmsA), ids(vmsB), state, rtt,
                        sum(pair.agreed.values()), why)
