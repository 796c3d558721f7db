"""
The seller's switch of its VMs' frames, one buyer network at a time.

The market tells the seller, per buyer network, which of its VMs belong to
it and which other sellers host its other VMs (MeshPeers: a pair secret,
session ids, candidate addresses and the peer's VMs' MACs).  A frame a VM
sends goes:

 - to another VM of the same network on this seller, directly (it never
   leaves the machine);
 - to a VM on a peer seller, over the pair's L{DirectPath} while that is
   direct;
 - everywhere else through the relay to the buyer's switch, as before: the
   buyer's own network, DHCP, broadcasts and multicasts (so the buyer's
   switch delivers each to every VM exactly once, and no loop can form),
   frames whose source is not the VM's own MAC, and every frame while the
   path is not direct.

A frame that arrives directly from a peer reaches a VM only if its source
is one of that peer's VMs in the network and its destination one of this
seller's VMs in it; anything else is dropped and counted.  Nothing from the
UDP port reaches a VM without passing the pair's authentication
(L{cpushare.mesh.wire}).

Every checked field of MeshPeers is checked as if the market were hostile:
a bad one refuses the whole view with a BadRequest naming it.
"""

import collections
import ipaddress

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cpushare.client import marketchecks
from cpushare.mesh import path as meshpath
from cpushare.mesh import wire
from cpushare.protocol import commands

#: Seconds between reports of the paths to the market (and whenever a path
#: changes state, within L{CHECK_EVERY}).
REPORT_EVERY = 10.0
CHECK_EVERY = 0.5
#: Rows of VMs one MeshReport carries at most (a bigger report is split).
REPORT_ROWS = 400
#: Buyer networks one seller keeps views of at most.
MAX_NETWORKS = 1024

# Why a frame that came directly was dropped (MeshSwitch.drops).
RUNT = "runt frame"
FOREIGN_SOURCE = "source is not one of the peer's VMs"
NOT_HERE = "destination is not a VM of the network here"


def macBytes(text):
    return bytes.fromhex(text.replace(":", ""))


class _Peer:
    def __init__(self, key, path, macs):
        self.key = key              # (peer, secret, local session, remote session)
        self.path = path
        self.macs = macs            # the peer's VMs' MACs, as bytes
        self.counts = collections.defaultdict(lambda: [0, 0])  # vm id -> [sent, received]
        self.reportedState = None


class _Network:
    def __init__(self, number):
        self.number = number
        self.vms = set()            # this seller's VM ids in it
        self.peers = {}             # peer session id -> _Peer
        self.where = {}             # MAC bytes -> ("local", vm id) or ("peer", peer id)


class _UDP:
    """
    DirectPath's transport: the seller's UDP port, written through its
    socket (Twisted's C{write} checks the address of every datagram, a fifth
    of a frame's cost; a path's addresses were checked when brokered).  A
    full socket buffer or an unreachable peer is an OSError, which the path
    counts.
    """

    def __init__(self, port):
        self.port = port

    def sendto(self, datagram, address):
        transport = self.port.transport
        if transport is None:
            raise OSError("the UDP port is closed")
        transport.socket.sendto(datagram, address)


class MeshSwitch:
    """
    C{host} is the L{cpushare.client.seller.vmhost.VMHost} (its C{vms} and
    C{session}); C{port} the seller's L{MeshPort}, whose datagrams that are
    not the market's answers come to L{mesh}.
    """

    log = Logger()

    def __init__(self, reactor, host, port):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.mesh = meshpath.Mesh()
        self.networks = {}
        self.ofVM = {}              # vm id -> its _Network
        self.drops = collections.Counter()
        self.localFrames = 0
        self._lastReport = None
        self._dropsLogged = collections.Counter()
        self._checker = LoopingCall(self._check)
        self._checker.clock = reactor
        port.mesh = self.mesh

    def start(self):
        self._checker.start(CHECK_EVERY, now=False)

    def stop(self):
        if self._checker.running:
            self._checker.stop()
        self.forgetAll()

    def forgetAll(self):
        """A new market session: the old views' keys are good no more."""
        for network in list(self.networks):
            self._drop(network)

    # -- the market's views ------------------------------------------------

    def view(self, network, vms, peers, me):
        """
        MeshPeers: the view of C{network} from this seller (C{me}, its
        session id at the market), replacing the one before.
        """
        checked = self._checkView(network, vms, peers, me)
        if not vms:
            self._drop(network)
            return
        net = self.networks.get(network)
        if net is None:
            if len(self.networks) >= MAX_NETWORKS:
                raise commands.BadRequest(
                    f"MeshPeers: more than {MAX_NETWORKS} buyer networks on one seller")
            net = self.networks[network] = _Network(network)
        for vmId in net.vms - set(vms):
            self.ofVM.pop(vmId, None)
        net.vms = set(vms)
        for vmId in vms:
            self.ofVM[vmId] = net
        keys = {key[0]: key for key, _, _ in checked}
        for peerId, peer in list(net.peers.items()):
            if keys.get(peerId) != peer.key:
                # A peer gone, or a pair brokered anew: its old keys end here.
                self._stopPeer(peer)
                del net.peers[peerId]
        for key, candidates, macs in checked:
            peer = net.peers.get(key[0])
            if peer is None:
                pair = wire.Pair(key[1], me, key[0], key[2], key[3])
                path = meshpath.DirectPath(self.reactor, _UDP(self.port), pair, candidates)
                peer = net.peers[key[0]] = _Peer(key, path, macs)
                path.deliver = self._deliverer(net, peer)
                self.mesh.add(path)
                path.start()
            else:
                peer.path.candidates = candidates
                peer.macs = macs
        self._rebuild(net)

    def _checkView(self, network, vms, peers, me):
        """[(key, candidates, MACs)] of C{peers}, every field checked."""
        what = "MeshPeers"
        if network <= 0:
            marketchecks.refuse(what, "network", network, "is not a network number")
        for vmId in vms:
            marketchecks.checkVMId(what, vmId)
        if len(peers) > commands.MESH_PEERS:
            marketchecks.refuse(what, "peers", len(peers),
                                f"are more than {commands.MESH_PEERS}")
        checked, seen = [], set()
        # Ids of other networks' pairs are taken; this network's are replaced.
        net = self.networks.get(network)
        taken = set(self.mesh.sessions.pairs) - (set() if net is None else {
            peer.path.pair.localSession for peer in net.peers.values()})
        for entry in peers:
            peer = entry["peer"]
            if peer == me or peer in seen or peer <= 0:
                marketchecks.refuse(what, "peer", peer, "is not another seller")
            seen.add(peer)
            secret = entry["secret"]
            if len(secret) != wire.SECRET_SIZE:
                marketchecks.refuse(what, "secret", f"{len(secret)} bytes",
                                    f"is not {wire.SECRET_SIZE} bytes")
            local, remote = entry["local_session"], entry["remote_session"]
            for name, sid in (("local_session", local), ("remote_session", remote)):
                if not 0 < sid < 2 ** 32:
                    marketchecks.refuse(what, name, sid, "is not a 32-bit id above 0")
            if local in taken:
                marketchecks.refuse(what, "local_session", local, "is already in use here")
            taken.add(local)
            try:
                candidates = meshpath.checkCandidates(
                    (c["host"], c["port"]) for c in entry["candidates"])
                # Discovery is IPv4, and so is the seller's UDP port.
                candidates = [(str(ipaddress.IPv4Address(h)), p) for h, p in candidates]
            except ValueError as e:
                marketchecks.refuse(what, "candidates", entry["candidates"], str(e))
            if len(entry["macs"]) > commands.MESH_MACS:
                marketchecks.refuse(what, "macs", len(entry["macs"]),
                                    f"are more than {commands.MESH_MACS}")
            for mac in entry["macs"]:
                marketchecks.checkMAC(what, mac)
            checked.append(((peer, secret, local, remote), candidates,
                            {macBytes(m) for m in entry["macs"]}))
        return checked

    def _rebuild(self, net):
        where = {}
        for peerId, peer in sorted(net.peers.items()):
            for mac in peer.macs:
                where[mac] = ("peer", peerId)
        for vmId in sorted(net.vms):
            vm = self.host.vms.get(vmId)
            if vm is not None:
                # Its own VMs win over what a peer claims.
                where[macBytes(vm.mac)] = ("local", vmId)
        net.where = where

    def _drop(self, network):
        net = self.networks.pop(network, None)
        if net is None:
            return
        for vmId in net.vms:
            if self.ofVM.get(vmId) is net:
                del self.ofVM[vmId]
        for peer in net.peers.values():
            self._stopPeer(peer)
        # Its last counts reach the market with the next report of the others.

    def _stopPeer(self, peer):
        peer.path.stop()
        self.mesh.remove(peer.path)

    # -- frames ------------------------------------------------------------

    def frameFromVM(self, vm, frame):
        """
        C{frame} from C{vm}'s NIC: True when it went to a VM on this seller
        or directly to a peer; False when the relay is its way.
        """
        net = self.ofVM.get(vm.id)
        if net is None or len(frame) < 14 or frame[0] & 1:
            return False
        if net.where.get(bytes(frame[6:12])) != ("local", vm.id):
            return False            # not the VM's own MAC: the relay polices it
        where = net.where.get(bytes(frame[:6]))
        if where is None:
            return False
        kind, target = where
        if kind == "local":
            other = self.host.vms.get(target)
            if other is None or other is vm or other.nic is None:
                return False
            other.nic.sendFrame(frame)
            self.localFrames += 1
            return True
        peer = net.peers[target]
        if not peer.path.send(frame):
            return False
        peer.counts[vm.id][0] += len(frame)
        return True

    def _deliverer(self, net, peer):
        def deliver(frame):
            if len(frame) < 14 or frame[0] & 1:
                self.drops[RUNT if len(frame) < 14 else NOT_HERE] += 1
                return
            if bytes(frame[6:12]) not in peer.macs:
                self.drops[FOREIGN_SOURCE] += 1
                return
            where = net.where.get(bytes(frame[:6]))
            vm = None if where is None or where[0] != "local" else self.host.vms.get(where[1])
            if vm is None or vm.nic is None:
                self.drops[NOT_HERE] += 1
                return
            vm.nic.sendFrame(frame)
            peer.counts[vm.id][1] += len(frame)
        return deliver

    # -- reports -----------------------------------------------------------

    def paths(self):
        """(network, peer id, _Peer) of every path, for people and reports."""
        return [(net.number, peerId, peer) for net in self.networks.values()
                for peerId, peer in sorted(net.peers.items())]

    def _check(self):
        now = self.reactor.seconds()
        changed = any(peer.path.state != peer.reportedState for _, _, peer in self.paths())
        if changed or self._lastReport is None or now - self._lastReport >= REPORT_EVERY:
            self.report()
            self._logDrops()

    def _logDrops(self):
        """One line when datagrams or frames were dropped since the last one."""
        dropped = collections.Counter(self.mesh.sessions.drops)
        dropped.update(self.drops)
        if dropped == self._dropsLogged:
            return
        self._dropsLogged = dropped
        self.log.info("mesh: dropped so far: {drops}", drops=", ".join(
            f"{reason}: {n}" for reason, n in sorted(dropped.items())))

    def report(self):
        """Tell the market every path's state, round trip and direct bytes."""
        session = self.host.session
        if session is None:
            return
        self._lastReport = self.reactor.seconds()
        rows, size = [], 0
        for network, peerId, peer in self.paths():
            state = peer.path.state
            if state != peer.reportedState:
                self.log.info("mesh: network {network}: the path to seller session {peer}"
                              " is {state}{rtt}", network=network, peer=peerId, state=state,
                              rtt="" if peer.path.rtt is None
                              else f" (round trip {peer.path.rtt * 1000:.1f} ms)")
            peer.reportedState = state
            row = {"network": network, "peer": peerId, "state": state,
                   "vms": [{"vm": vmId, "sent": s, "received": r}
                           for vmId, (s, r) in sorted(peer.counts.items())]}
            if peer.path.rtt is not None:
                row["rtt_ms"] = peer.path.rtt * 1000.0
            if rows and size + len(row["vms"]) + 1 > REPORT_ROWS:
                self._send(session, rows)
                rows, size = [], 0
            rows.append(row)
            size += len(row["vms"]) + 1
        if rows:
            self._send(session, rows)

    def _send(self, session, rows):
        session.control.callRemote(commands.MeshReport, paths=rows).addErrback(
            lambda f: self.log.warn("mesh: reporting the paths: {why}",
                                    why=f.getErrorMessage()))
