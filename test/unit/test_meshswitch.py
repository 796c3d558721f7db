"""
The seller's switch of its VMs' frames (cpushare/client/seller/meshswitch.py)
on a fake network and a task.Clock: where each frame goes (a VM here, a
peer directly, the relay), what a hostile peer or market can make it do,
and what it reports.
"""

import pytest
from twisted.internet import defer, task

from cpushare.client.seller import meshswitch
from cpushare.client.seller.meshswitch import MeshSwitch
from cpushare.mesh.path import DEAD_AFTER, DIRECT, RELAYED
from cpushare.protocol import commands

from test.unit.test_mesh import Network, advance

NETWORK, OTHER_NETWORK = 7, 8
A_ID, B_ID = 11, 12
A_ADDRESS, B_ADDRESS = ("198.51.100.1", 4000), ("203.0.113.2", 4000)
SECRET = bytes(range(32))
MACS = {1: "0a:cb:00:00:00:01", 2: "0a:cb:00:00:00:02", 3: "0a:cb:00:00:00:03",
        4: "0a:cb:00:00:00:04"}


def mac(vmId):
    return bytes.fromhex(MACS[vmId].replace(":", ""))


def frame(src, dst, body=b"ping" * 25):
    return (dst if isinstance(dst, bytes) else mac(dst)) + \
        (src if isinstance(src, bytes) else mac(src)) + b"\x08\x00" + body


class Nic:
    def __init__(self):
        self.frames = []

    def sendFrame(self, frame):
        self.frames.append(frame)


class VM:
    def __init__(self, vmId):
        self.id, self.mac, self.nic = vmId, MACS[vmId], Nic()


class Control:
    def __init__(self):
        self.calls = []

    def callRemote(self, command, **kw):
        self.calls.append((command, kw))
        return defer.succeed({})


class Session:
    def __init__(self):
        self.control = Control()

    def reports(self):
        return [kw["paths"] for c, kw in self.control.calls if c is commands.MeshReport]


class Host:
    def __init__(self, *vmIds):
        self.vms = {n: VM(n) for n in vmIds}
        self.session = Session()


class Port:
    """The seller's UDP port on the fake network."""

    def __init__(self, network, address):
        self.mesh = None
        self.transport = self.socket = self
        self.network, self.address = network, address

    def sendto(self, data, address):
        self.network.carry(data, self.address, address)


class Mesh:
    """The fake network's host: hands datagrams to the switch's mesh."""

    def __init__(self, port):
        self.port = port

    def datagramReceived(self, data, source):
        self.port.mesh.datagramReceived(data, source)


def peer(peerId, local, remote, candidates, macs, secret=SECRET):
    return {"peer": peerId, "secret": secret, "local_session": local, "remote_session": remote,
            "candidates": [{"host": h, "port": p} for h, p in candidates],
            "macs": [MACS[m] for m in macs]}


def switches(clock, network=None):
    """Seller A (VMs 1, 3 of the network; 4 of another buyer's) and B (VM 2)."""
    network = network or Network(clock)
    hosts, ports = (Host(1, 3, 4), Host(2)), []
    for host, address in zip(hosts, (A_ADDRESS, B_ADDRESS)):
        port = Port(network, address)
        network.hosts[address] = Mesh(port)
        ports.append(port)
    a, b = (MeshSwitch(clock, host, port) for host, port in zip(hosts, ports))
    a.view(NETWORK, [1, 3], [peer(B_ID, 0x100, 0x200, [B_ADDRESS], [2])], A_ID)
    b.view(NETWORK, [2], [peer(A_ID, 0x200, 0x100, [A_ADDRESS], [1, 3])], B_ID)
    a.view(OTHER_NETWORK, [4], [], A_ID)
    return network, a, b


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def joined(clock):
    network, a, b = switches(clock)
    advance(clock, 1)
    assert a.paths()[0][2].path.state == DIRECT
    return network, a, b


def test_a_frame_to_a_vm_on_a_peer_goes_directly_and_is_counted_at_both_ends(clock, joined):
    network, a, b = joined
    vm1, vm2 = a.host.vms[1], b.host.vms[2]
    sent = frame(1, 2)
    assert a.frameFromVM(vm1, sent) is True
    advance(clock, 0.1)
    assert vm2.nic.frames == [sent]
    [(_, _, toB)] = a.paths()
    [(_, _, toA)] = b.paths()
    assert toB.counts[1] == [len(sent), 0]
    assert toA.counts[2] == [0, len(sent)]
    # And back.
    assert b.frameFromVM(vm2, frame(2, 1)) is True
    advance(clock, 0.1)
    assert vm1.nic.frames == [frame(2, 1)]


def test_a_frame_between_two_vms_of_the_network_here_never_leaves_the_seller(clock, joined):
    network, a, b = joined
    before = dict(network.lastDelivered)
    assert a.frameFromVM(a.host.vms[1], frame(1, 3)) is True
    assert a.host.vms[3].nic.frames == [frame(1, 3)]
    assert a.localFrames == 1
    advance(clock, 0.005)
    assert network.lastDelivered == before


def test_broadcasts_unknown_macs_and_spoofed_sources_go_through_the_relay(clock, joined):
    network, a, b = joined
    vm1 = a.host.vms[1]
    assert a.frameFromVM(vm1, frame(1, b"\xff" * 6)) is False       # broadcast: the buyer's switch
    assert a.frameFromVM(vm1, frame(1, b"\x01\x00\x5e\x00\x00\x01")) is False  # multicast
    assert a.frameFromVM(vm1, frame(1, b"\x02\x63\x70\x73\x68\x02")) is False  # the buyer's own
    assert a.frameFromVM(vm1, frame(3, 2)) is False    # not VM 1's own MAC: the relay polices it
    assert a.frameFromVM(vm1, b"\x00" * 10) is False
    advance(clock, 0.1)
    assert b.host.vms[2].nic.frames == []


def test_no_frame_crosses_into_another_buyers_network_on_the_same_seller(clock, joined):
    network, a, b = joined
    vm1, vm4 = a.host.vms[1], a.host.vms[4]
    # VM 1 aims at another buyer's VM on its own seller: the relay, which links only its buyer.
    assert a.frameFromVM(vm1, frame(1, 4)) is False
    assert a.frameFromVM(vm4, frame(4, 1)) is False
    # Seller B's path (keys of network 7) carries a frame for VM 4: dropped.
    [(_, _, toA)] = b.paths()
    assert toA.path.send(frame(2, 4)) is True
    advance(clock, 0.1)
    assert vm4.nic.frames == [] and vm1.nic.frames == []
    assert a.drops[meshswitch.NOT_HERE] == 1


def test_a_peer_cannot_send_a_frame_in_another_vms_name(clock, joined):
    network, a, b = joined
    [(_, _, toA)] = b.paths()
    toA.path.send(frame(3, 1))           # VM 3 lives on A, not on B
    toA.path.send(frame(b"\x0a\xcb\x00\x00\x99\x99", 1))
    toA.path.send(frame(2, b"\xff" * 6))   # broadcasts never come directly
    toA.path.send(b"\x0a" * 12)
    advance(clock, 0.1)
    assert a.host.vms[1].nic.frames == []
    assert a.drops == {meshswitch.FOREIGN_SOURCE: 2, meshswitch.NOT_HERE: 1,
                       meshswitch.RUNT: 1}


def test_a_silent_path_sends_frames_through_the_relay_within_five_seconds(clock, joined):
    network, a, b = joined
    vm1 = a.host.vms[1]
    network.cut = True
    advance(clock, DEAD_AFTER + 0.1)
    assert a.paths()[0][2].path.state == RELAYED
    assert a.frameFromVM(vm1, frame(1, 2)) is False


def test_the_paths_are_reported_with_their_counts_and_when_their_state_changes(clock, joined):
    network, a, b = joined
    a.start()
    a.frameFromVM(a.host.vms[1], frame(1, 2))
    advance(clock, meshswitch.CHECK_EVERY + 0.01)
    [[row]] = a.host.session.reports()
    assert (row["network"], row["peer"], row["state"]) == (NETWORK, B_ID, DIRECT)
    assert row["vms"] == [{"vm": 1, "sent": len(frame(1, 2)), "received": 0}]
    assert row["rtt_ms"] > 0
    network.cut = True
    advance(clock, DEAD_AFTER + meshswitch.CHECK_EVERY)
    assert a.host.session.reports()[-1][0]["state"] == RELAYED
    assert len(a.host.session.reports()) == 2
    a.stop()


def test_a_new_view_without_vms_forgets_the_network_and_its_keys(clock, joined):
    network, a, b = joined
    assert len(a.mesh.sessions.pairs) == 1
    a.view(NETWORK, [], [], A_ID)
    assert a.mesh.sessions.pairs == {}
    assert a.frameFromVM(a.host.vms[1], frame(1, 3)) is False
    # B's datagrams to A now reach nothing.
    [(_, _, toA)] = b.paths()
    toA.path.send(frame(2, 1))
    advance(clock, 0.1)
    assert a.host.vms[1].nic.frames == []


def test_a_pair_brokered_anew_replaces_the_old_keys(clock, joined):
    network, a, b = joined
    [(_, _, old)] = a.paths()
    a.view(NETWORK, [1, 3], [peer(B_ID, 0x101, 0x201, [B_ADDRESS], [2], bytes(32))], A_ID)
    [(_, _, new)] = a.paths()
    assert new is not old and old.path.state == RELAYED
    assert set(a.mesh.sessions.pairs) == {0x101}


@pytest.mark.parametrize("change, field", [
    ({"secret": b"short"}, "MeshPeers secret"),
    ({"local_session": 0}, "MeshPeers local_session"),
    ({"remote_session": 2 ** 32}, "MeshPeers remote_session"),
    ({"peer": A_ID}, "MeshPeers peer"),
    ({"candidates": [{"host": "example.com", "port": 1}]}, "MeshPeers candidates"),
    ({"candidates": [{"host": "2001:db8::1", "port": 1}]}, "MeshPeers candidates"),
    ({"candidates": [{"host": "192.0.2.1", "port": 0}]}, "MeshPeers candidates"),
    ({"candidates": [{"host": "192.0.2.1", "port": n} for n in range(1, 10)]},
     "MeshPeers candidates"),
    ({"macs": ["ff:ff:ff:ff:ff:ff"]}, "MeshPeers mac"),
    ({"macs": ["0a:cb:00:00:00:01,id=x"]}, "MeshPeers mac"),
    ({"macs": [MACS[2]] * (commands.MESH_MACS + 1)}, "MeshPeers macs"),
])
def test_a_hostile_market_view_is_refused_by_name_and_changes_nothing(clock, change, field):
    network, a, b = switches(clock)
    before = dict(a.mesh.sessions.pairs)
    bad = {**peer(13, 0x300, 0x400, [B_ADDRESS], [2]), **change}
    with pytest.raises(commands.BadRequest) as caught:
        a.view(NETWORK, [1, 3], [bad], A_ID)
    assert str(caught.value).startswith(field)
    assert a.mesh.sessions.pairs == before


def test_a_market_cannot_reuse_a_session_id_of_another_network_or_name_too_many_peers(clock):
    network, a, b = switches(clock)
    with pytest.raises(commands.BadRequest, match="local_session: 256 is already in use"):
        a.view(OTHER_NETWORK, [4], [peer(13, 0x100, 0x400, [B_ADDRESS], [2])], A_ID)
    peers = [peer(100 + n, 0x500 + n, 0x600, [B_ADDRESS], []) for n in range(33)]
    with pytest.raises(commands.BadRequest, match="peers: 33 are more than 32"):
        a.view(OTHER_NETWORK, [4], peers, A_ID)
    twice = [peer(13, 0x700, 1, [B_ADDRESS], []), peer(13, 0x701, 1, [B_ADDRESS], [])]
    with pytest.raises(commands.BadRequest, match="MeshPeers peer: 13 is not another seller"):
        a.view(OTHER_NETWORK, [4], twice, A_ID)
    with pytest.raises(commands.BadRequest, match="MeshPeers vm"):
        a.view(OTHER_NETWORK, [0], [], A_ID)
    assert set(a.mesh.sessions.pairs) == {0x100}
