"""
The direct path between sellers (cpushare/mesh/): the datagram format, its
keys, the replay window and one path's states, without sockets: what a
cheating seller, a forger on the internet or another buyer network's peer
would send first, then the path on a fake network and a task.Clock.
"""

import collections
import random
import struct

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet import task

from cpushare.mesh import path as meshpath, replay, wire
from cpushare.mesh.path import DIRECT, RELAYED, TRYING, DirectPath, Mesh

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
FRAME = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + b"ping" * 20


def pairOf(secret=SECRET, a=101, b=202, sessionA=0x1111, sessionB=0x2222):
    """Both ends of a pair: A chose sessionA, B chose sessionB."""
    return (wire.Pair(secret, a, b, sessionA, sessionB),
            wire.Pair(secret, b, a, sessionB, sessionA))


def receiverOf(*pairs):
    sessions = wire.Sessions()
    for p in pairs:
        sessions.add(p)
    return sessions


# -- the datagram: abuse first ---------------------------------------------

def test_a_forgery_with_the_wrong_key_is_dropped_and_counted():
    a, b = pairOf()
    forger, _ = pairOf(secret=OTHER_SECRET)
    sessions = receiverOf(b)
    assert sessions.open(forger.seal(wire.DATA, FRAME)) is None
    assert sessions.drops == {wire.UNAUTHENTIC: 1}
    assert sessions.open(a.seal(wire.DATA, FRAME)).payload == FRAME


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_bit_is_dropped(data):
    a, b = pairOf()
    sessions = receiverOf(b)
    datagram = bytearray(a.seal(wire.DATA, FRAME))
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1))
    datagram[bit // 8] ^= 1 << (bit % 8)
    assert sessions.open(bytes(datagram)) is None
    assert sum(sessions.drops.values()) == 1


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_truncated_datagram_is_dropped(data):
    a, b = pairOf()
    sessions = receiverOf(b)
    datagram = a.seal(wire.DATA, FRAME)
    assert sessions.open(datagram[:data.draw(st.integers(0, len(datagram) - 1))]) is None
    assert sum(sessions.drops.values()) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=wire.MAX_DATAGRAM + 100))
def test_any_bytes_are_dropped_without_an_exception(junk):
    _, b = pairOf()
    sessions = receiverOf(b)
    assert sessions.open(junk) is None
    assert sum(sessions.drops.values()) == 1


def test_a_datagram_with_a_valid_looking_header_and_a_made_up_tag_is_not_authentic():
    _, b = pairOf()
    sessions = receiverOf(b)
    forged = wire.HEADER.pack(wire.VERSION, wire.PROBE, b.localSession, 7) + b"\0" * 24
    assert sessions.open(forged) is None
    assert sessions.drops == {wire.UNAUTHENTIC: 1}


def test_an_oversized_datagram_is_dropped_before_anything_else():
    a, b = pairOf()
    sessions = receiverOf(b)
    datagram = a.seal(wire.DATA, b"x" * wire.MAX_FRAME)
    assert len(datagram) == wire.MAX_DATAGRAM
    assert sessions.open(datagram).payload == b"x" * wire.MAX_FRAME
    assert sessions.open(datagram + b"x") is None
    assert sessions.open(b"\x01" * 65507) is None
    assert sessions.drops == {wire.TOO_BIG: 2}


def test_a_sender_cannot_seal_a_frame_too_big_or_a_probe_of_another_size():
    a, _ = pairOf()
    with pytest.raises(ValueError, match="cannot carry 1565 bytes"):
        a.seal(wire.DATA, b"x" * (wire.MAX_FRAME + 1))
    with pytest.raises(ValueError, match="probe cannot carry 9 bytes"):
        a.seal(wire.PROBE, b"x" * 9)
    with pytest.raises(ValueError, match="data cannot carry 0 bytes"):
        a.seal(wire.DATA, b"")


def test_a_header_that_lies_about_what_it_carries_is_malformed():
    a, b = pairOf()
    sessions = receiverOf(b)
    probe = bytearray(a.seal(wire.PROBE, b"12345678"))
    probe[1] = wire.KEEPALIVE  # a keepalive carries nothing
    assert sessions.open(bytes(probe)) is None
    unknown = bytearray(a.seal(wire.KEEPALIVE))
    unknown[1] = 9
    assert sessions.open(bytes(unknown)) is None
    version = bytearray(a.seal(wire.KEEPALIVE))
    version[0] = 2
    assert sessions.open(bytes(version)) is None
    assert sessions.drops == {wire.MALFORMED: 1, wire.BAD_TYPE: 1, wire.BAD_VERSION: 1}


def test_a_wrong_session_id_is_dropped_without_trying_a_key():
    a, b = pairOf()
    sessions = receiverOf(b)
    datagram = bytearray(a.seal(wire.DATA, FRAME))
    datagram[4:8] = struct.pack("!I", 0x3333)
    assert sessions.open(bytes(datagram)) is None
    assert sessions.drops == {wire.UNKNOWN_SESSION: 1}


def test_a_replayed_datagram_is_delivered_once():
    a, b = pairOf()
    sessions = receiverOf(b)
    datagram = a.seal(wire.DATA, FRAME)
    assert sessions.open(datagram).payload == FRAME
    assert sessions.open(datagram) is None
    assert sessions.drops == {replay.REPLAYED: 1}


def test_a_forger_cannot_move_the_window():
    a, b = pairOf()
    forger, _ = pairOf(secret=OTHER_SECRET)
    sessions = receiverOf(b)
    forger.counter = 10 ** 9
    assert sessions.open(forger.seal(wire.DATA, FRAME)) is None
    assert sessions.open(a.seal(wire.DATA, FRAME)).counter == 0
    assert sessions.drops == {wire.UNAUTHENTIC: 1}


def test_a_counter_older_than_the_window_is_refused():
    a, b = pairOf()
    sessions = receiverOf(b)
    first = a.seal(wire.KEEPALIVE)
    sealed = [a.seal(wire.KEEPALIVE) for _ in range(replay.WINDOW + 1)]
    assert sessions.open(sealed[-1]).counter == replay.WINDOW + 1
    assert sessions.open(first) is None
    assert sessions.open(sealed[0]).counter == 1  # exactly WINDOW behind: still once
    assert sessions.drops == {replay.TOO_OLD: 1}


def test_a_datagram_of_another_buyer_networks_pair_does_not_authenticate():
    # The same two sellers share two buyer networks; B chose a session for each.
    net1A, net1B = pairOf(SECRET, sessionA=0x10, sessionB=0x20)
    net2A, net2B = pairOf(OTHER_SECRET, sessionA=0x11, sessionB=0x21)
    sessions = receiverOf(net1B, net2B)
    crossed = bytearray(net1A.seal(wire.DATA, FRAME))
    crossed[4:8] = struct.pack("!I", 0x21)
    assert sessions.open(bytes(crossed)) is None
    assert sessions.drops == {wire.UNAUTHENTIC: 1}
    assert sessions.open(net2A.seal(wire.DATA, FRAME)).pair is net2B


def test_a_datagram_reflected_to_its_sender_does_not_authenticate():
    a, b = pairOf()
    sessions = receiverOf(a)
    reflected = bytearray(a.seal(wire.DATA, FRAME))
    reflected[4:8] = struct.pack("!I", a.localSession)
    assert sessions.open(bytes(reflected)) is None
    assert sessions.drops == {wire.UNAUTHENTIC: 1}
    assert wire.directionKey(SECRET, 101, 202) != wire.directionKey(SECRET, 202, 101)


def test_a_key_is_tied_to_both_sellers_ids():
    keys = {wire.directionKey(SECRET, s, r) for s, r in [(1, 2), (2, 1), (1, 3), (12, 3), (1, 23)]}
    assert len(keys) == 5


def test_round_trip_both_ways():
    a, b = pairOf()
    atA, atB = receiverOf(a), receiverOf(b)
    for n in range(3):
        opened = atB.open(a.seal(wire.DATA, FRAME + bytes([n])))
        assert (opened.pair, opened.kind, opened.counter, opened.payload) == (
            b, wire.DATA, n, FRAME + bytes([n]))
        assert atA.open(b.seal(wire.PROBE, b"%08d" % n)).payload == b"%08d" % n
    assert atA.open(b.seal(wire.KEEPALIVE)).payload == b""
    assert not atA.drops and not atB.drops


def test_a_pair_refuses_what_the_market_should_never_hand_out():
    with pytest.raises(ValueError, match="32 bytes"):
        wire.Pair(b"short", 1, 2, 1, 2)
    with pytest.raises(ValueError, match="two sellers, not 1 with itself"):
        wire.Pair(SECRET, 1, "1", 1, 2)
    with pytest.raises(ValueError, match="remote session id 0"):
        wire.Pair(SECRET, 1, 2, 1, 0)
    sessions = receiverOf(wire.Pair(SECRET, 1, 2, 5, 6))
    with pytest.raises(ValueError, match="session id 5 is already in use"):
        sessions.add(wire.Pair(SECRET, 1, 3, 5, 6))
    ids = iter([b"\0\0\0\0", b"\0\0\0\5", b"\0\0\0\7"])
    assert sessions.newId(lambda n: next(ids)) == 7


# -- the replay window --------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.integers(0, 100_000), st.integers(0, 2 ** 32))
def test_the_window_accepts_out_of_order_counters_once_each(base, seed):
    window = replay.ReplayWindow()
    window.accept(base + replay.WINDOW)
    order = list(range(base, base + replay.WINDOW + 1))
    random.Random(seed).shuffle(order)
    assert [window.accept(c) for c in order].count(None) == replay.WINDOW
    assert all(window.accept(c) == replay.REPLAYED for c in order)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 10_000), st.integers(0, 2 ** 64 + 5)), max_size=300))
def test_the_window_matches_a_model_of_every_counter_seen(counters):
    window, seen, highest = replay.ReplayWindow(), set(), 0
    for counter in sorted(counters)[:len(counters) // 2] + counters:
        if counter >= replay.LIMIT:
            expected = replay.TOO_OLD
        elif counter > highest or (highest - counter <= replay.WINDOW and counter not in seen):
            expected = None
        elif highest - counter > replay.WINDOW:
            expected = replay.TOO_OLD
        else:
            expected = replay.REPLAYED
        assert window.accept(counter) == expected, counter
        if expected is None:
            seen.add(counter)
            highest = max(highest, counter)


# -- paths on a fake network --------------------------------------------------

class Network:
    """
    Datagrams between addresses after C{latency} seconds, on a task.Clock;
    a NAT rewrites a host's source address and maps the outside one back.
    """

    def __init__(self, clock, latency=0.01):
        self.clock, self.latency = clock, latency
        self.hosts = {}
        self.outside = {}
        self.cut = False
        self.loss, self.random = 0.0, random.Random(14)
        self.lastDelivered = {}

    def attach(self, address, mesh, outside=None):
        self.hosts[address] = mesh
        if outside is not None:
            self.outside[address] = outside
            self.hosts[outside] = mesh
        return Transport(self, address)

    def carry(self, data, source, destination):
        if self.cut or (self.loss and self.random.random() < self.loss):
            return
        source = self.outside.get(source, source)
        mesh = self.hosts.get(destination)
        if mesh is not None:
            self.clock.callLater(self.latency, self.arrive, mesh, data, source)

    def arrive(self, mesh, data, source):
        if not self.cut:
            self.lastDelivered[mesh] = self.clock.seconds()
            mesh.datagramReceived(data, source)


class Transport:
    def __init__(self, network, address):
        self.network, self.address = network, address
        self.sent = []

    def sendto(self, data, address):
        self.sent.append((data, address))
        self.network.carry(data, self.address, address)

    def bytesTo(self, address=None):
        return sum(len(d) for d, a in self.sent if address is None or a == address)


A_HOME, B_HOME = ("198.51.100.1", 4000), ("203.0.113.2", 4000)


class Seller:
    """One seller's port: its mesh, its transport and its path to the peer."""

    def __init__(self, network, address, pair, candidates, outside=None):
        self.mesh = Mesh()
        self.transport = network.attach(address, self.mesh, outside)
        self.frames = []
        self.path = DirectPath(network.clock, self.transport, pair, candidates,
                               self.frames.append)
        self.mesh.add(self.path)


def joined(clock, aCandidates=(B_HOME,), bCandidates=(A_HOME,), bOutside=None, latency=0.01):
    network = Network(clock, latency)
    a, b = pairOf()
    sellerA = Seller(network, A_HOME, a, aCandidates)
    sellerB = Seller(network, B_HOME, b, bCandidates, bOutside)
    return network, sellerA, sellerB


def started(**kw):
    """Two sellers joined by a fake network, both paths started."""
    clock = task.Clock()
    network, a, b = joined(clock, **kw)
    a.path.start()
    b.path.start()
    return clock, network, a, b


def assertCarries(clock, a, b):
    """A frame that C{a} sends direct reaches C{b}, once."""
    assert a.path.send(FRAME)
    advance(clock, 0.1)
    assert b.frames == [FRAME]


def advance(clock, seconds):
    """Move the clock C{seconds} on, running each call at its own time."""
    end = clock.seconds() + seconds
    while True:
        due = [call.getTime() for call in clock.getDelayedCalls() if call.getTime() <= end]
        if not due:
            break
        clock.advance(max(0.0, min(due) - clock.seconds()))
    clock.advance(max(0.0, end - clock.seconds()))


def test_two_paths_punch_go_direct_and_carry_frames_both_ways():
    clock = task.Clock()
    network, a, b = joined(clock)
    assert not a.path.send(FRAME)
    a.path.start()
    b.path.start()
    assert a.path.state == TRYING and not a.path.send(FRAME)
    advance(clock, 0.1)
    assert (a.path.state, b.path.state) == (DIRECT, DIRECT)
    assert (a.path.address, b.path.address) == (B_HOME, A_HOME)
    assert a.path.rtt == pytest.approx(0.02) and b.path.rtt == pytest.approx(0.02)
    assert a.path.send(FRAME) and b.path.send(FRAME[::-1])
    advance(clock, 0.1)
    assert b.frames == [FRAME] and a.frames == [FRAME[::-1]]
    assert (a.path.bytesSent, a.path.bytesReceived) == (len(FRAME), len(FRAME))
    assert (b.path.framesSent, b.path.framesReceived) == (1, 1)
    assert not a.path.send(b"x" * (wire.MAX_FRAME + 1)) and not a.path.send(b"")


def test_an_idle_direct_path_keeps_alive_and_measures_its_rtt():
    clock, network, a, b = started(latency=0.03)
    advance(clock, 1)
    before = len(a.transport.sent)
    for _ in range(60):
        advance(clock, 1)
        assert (a.path.state, b.path.state) == (DIRECT, DIRECT)
    # One datagram a second (a keepalive, or a probe every 10 s), and the
    # replies to the peer's probes.
    kinds = collections.Counter(d[1] for d, _ in a.transport.sent[before:])
    assert 59 <= kinds[wire.KEEPALIVE] + kinds[wire.PROBE] <= 61
    assert kinds[wire.PROBE] == 6 and kinds[wire.PROBE_REPLY] == 6
    assert a.path.rtt == pytest.approx(0.06)


def test_a_busy_path_sends_no_keepalives():
    clock, network, a, b = started()
    advance(clock, 1)
    before = len(a.transport.sent)
    for _ in range(100):
        assert a.path.send(FRAME)
        advance(clock, 0.1)
    kinds = collections.Counter(d[1] for d, _ in a.transport.sent[before:])
    assert kinds[wire.KEEPALIVE] == 0 and kinds[wire.DATA] == 100
    assert len(b.frames) == 100


def test_a_cut_path_falls_back_within_5_s_then_comes_back_when_healed():
    clock, network, a, b = started()
    advance(clock, 3)
    network.cut = True
    cutAt = clock.seconds()
    while DIRECT in (a.path.state, b.path.state):
        assert clock.seconds() - cutAt <= 5.0
        advance(clock, 0.05)
    for seller in (a, b):
        silent = clock.seconds() - network.lastDelivered[seller.mesh]
        assert seller.path.state == RELAYED and silent <= 5.0 + 0.05
        assert not seller.path.send(FRAME)
    # Retried after 30 s: still cut, so punching fails and the next try waits 60 s.
    advance(clock, 30 + meshpath.PUNCH_FOR + 1)
    assert (a.path.state, b.path.state) == (RELAYED, RELAYED)
    assert a.path.retryDelay == 120.0
    network.cut = False
    advance(clock, 60)
    assert (a.path.state, b.path.state) == (DIRECT, DIRECT)
    assert a.path.retryDelay == meshpath.RETRY_FIRST
    assertCarries(clock, a, b)


def test_punching_gets_through_a_network_that_loses_most_datagrams():
    clock = task.Clock()
    network, a, b = joined(clock)
    network.loss = 0.7
    a.path.start()
    b.path.start()
    wentDirect = set()
    for _ in range(int(meshpath.PUNCH_FOR / 0.25)):
        advance(clock, 0.25)
        wentDirect.update(name for name, seller in [("a", a), ("b", b)]
                          if seller.path.state == DIRECT)
    assert wentDirect == {"a", "b"}
    # Once the loss is over, a keepalive brings back whichever end fell back.
    network.loss = 0.0
    advance(clock, meshpath.KEEPALIVE_EVERY + 0.1)
    assert (a.path.state, b.path.state) == (DIRECT, DIRECT)
    assertCarries(clock, a, b)


def test_retries_back_off_to_ten_minutes():
    clock = task.Clock()
    network, a, b = joined(clock)
    network.cut = True
    a.path.start()
    tries = []
    for _ in range(12):
        while a.path.state != TRYING:
            advance(clock, 1)
        tries.append(clock.seconds())
        while a.path.state == TRYING:
            advance(clock, 1)
    gaps = [later - earlier - meshpath.PUNCH_FOR for earlier, later in zip(tries, tries[1:])]
    assert gaps[:6] == [30, 60, 120, 240, 480, 600] and set(gaps[6:]) == {600}


def test_a_peer_behind_a_nat_that_rewrites_its_port_is_reached_at_the_reply_address():
    clock = task.Clock()
    outside = ("203.0.113.2", 61234)
    # A only knows B's port before the NAT rewrote it: its probes get nowhere.
    network, a, b = joined(clock, bOutside=outside)
    del network.hosts[B_HOME]
    a.path.start()
    b.path.start()
    advance(clock, 0.2)
    assert (a.path.state, b.path.state) == (DIRECT, DIRECT)
    assert a.path.address == outside
    assertCarries(clock, a, b)


def test_of_a_dead_and_a_live_candidate_the_live_one_carries_the_path():
    clock = task.Clock()
    dead = ("192.0.2.1", 9)
    network, a, b = joined(clock, aCandidates=[dead, ("10.1.1.1", 4000), B_HOME])
    a.path.start()
    b.path.start()
    advance(clock, 0.2)
    assert a.path.state == DIRECT and a.path.address == B_HOME
    probed = {address for _, address in a.transport.sent}
    assert dead in probed  # every candidate was tried at once
    assert a.path.send(FRAME)
    assert a.transport.sent[-1][1] == B_HOME


def test_a_candidate_list_from_a_compromised_market_is_refused_by_name():
    clock = task.Clock()
    pair, _ = pairOf()
    for bad, message in [([("h", 1)] * 9, "9 candidate addresses"),
                         (["host"], "is not a \\(host, port\\) pair"),
                         ([("h", 0)], "port 0 is not a UDP port"),
                         ([("", 1)], "host '' is not an address"),
                         ([("h", True)], "port True")]:
        with pytest.raises(ValueError, match=message):
            DirectPath(clock, None, pair, bad)


def test_a_probe_flood_from_an_unauthenticated_address_gets_no_answer():
    clock = task.Clock()
    network, a, b = joined(clock)
    attacker = ("192.0.2.66", 5555)
    network.attach(attacker, Mesh())
    # A path that is not started, and a session id the attacker guessed right.
    session = a.path.pair.localSession
    for n in range(5000):
        header = wire.HEADER.pack(wire.VERSION, wire.PROBE, session, n)
        a.mesh.datagramReceived(header + struct.pack("!Q", n) + b"\0" * 16, attacker)
        a.mesh.datagramReceived(b"\x01\x03" + bytes(n % 100), attacker)
    assert a.transport.bytesTo() == 0
    assert a.mesh.sessions.drops[wire.UNAUTHENTIC] == 5000
    assert sum(a.mesh.sessions.drops.values()) == 10000


def test_nothing_unauthenticated_or_replayed_reaches_a_direct_path():
    clock, network, a, b = started()
    advance(clock, 0.5)
    attacker = ("192.0.2.66", 5555)
    # What an eavesdropper captured from B, replayed from its own address,
    # and frames forged with B's session id in every way above.
    captured = [d for d, to in b.transport.sent]
    _, forger = pairOf(secret=OTHER_SECRET)
    for datagram in captured + [forger.seal(wire.DATA, FRAME), forger.seal(wire.PROBE, b"p" * 8)]:
        a.mesh.datagramReceived(datagram, attacker)
    advance(clock, 0.5)
    assert a.transport.bytesTo(attacker) == 0
    assert a.frames == [] and a.path.address == B_HOME
    assert a.mesh.sessions.drops[replay.REPLAYED] == len(captured)
    assert a.mesh.sessions.drops[wire.UNAUTHENTIC] == 2


def test_a_probe_reply_is_never_larger_than_the_probe():
    clock, network, a, b = started()
    advance(clock, 12)
    probes = [d for d, _ in a.transport.sent if d[1] == wire.PROBE]
    replies = [d for d, _ in b.transport.sent if d[1] == wire.PROBE_REPLY]
    assert probes and replies
    assert max(map(len, replies)) <= min(map(len, probes))


def test_a_stopped_path_sends_nothing_more():
    clock, network, a, b = started()
    advance(clock, 1)
    a.path.stop()
    sent = len(a.transport.sent)
    advance(clock, 100)
    assert len(a.transport.sent) == sent and a.path.state == RELAYED
    assert not a.path.send(FRAME)
    assert b.path.state != DIRECT  # a's silence took b off the direct path too


def test_an_unreachable_peer_as_the_kernel_says_is_counted_not_raised():
    clock = task.Clock()
    pair, _ = pairOf()

    class Refusing:
        def sendto(self, data, address):
            raise OSError(113, "No route to host")

    p = DirectPath(clock, Refusing(), pair, [B_HOME])
    p.start()
    advance(clock, meshpath.PUNCH_FOR + 1)
    assert p.state == RELAYED and p.sendErrors == 20
