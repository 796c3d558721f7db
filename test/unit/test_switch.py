"""The buyer's learning switch, on recording fake ports and a fake clock."""

import random

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cpushare.client.buyer.switch import (
    AGING_TIME, JUMBO_FRAME_SIZE, MAX_FRAME_SIZE, IPort, Switch,
)

BROADCAST = b"\xff" * 6


def mac(n):
    return bytes([0x02, 0, 0, 0, n >> 8 & 0xFF, n & 0xFF])


def frame(dst, src, size=64):
    return dst + src + b"\x08\x00" + b"\x00" * (size - 14)


@implementer(IPort)
class FakePort:
    def __init__(self, name, allowed=None, room=True):
        self.name = name
        self.allowedSources = frozenset(allowed) if allowed is not None else None
        self.room = room
        self.received = []

    def send(self, frame):
        if not self.room:
            return False
        self.received.append(frame)
        return True


def build(n=3, **kw):
    clock = Clock()
    switch = Switch(clock, **kw)
    ports = [FakePort(f"p{i}") for i in range(n)]
    for port in ports:
        switch.attach(port)
    return clock, switch, ports


def test_fake_port_provides_the_interface():
    verifyObject(IPort, FakePort("x"))


def test_unknown_unicast_floods_then_the_reply_is_forwarded_to_one_port():
    clock, switch, (a, b, c) = build()
    f1 = frame(mac(2), mac(1))
    switch.frameReceived(a, f1)
    assert a.received == [] and b.received == [f1] and c.received == [f1]
    f2 = frame(mac(1), mac(2))
    switch.frameReceived(b, f2)
    assert a.received == [f2] and c.received == [f1]
    f3 = frame(mac(2), mac(1))
    switch.frameReceived(a, f3)
    assert b.received == [f1, f3] and c.received == [f1]
    assert switch.lookup(mac(1)) is a and switch.lookup(mac(2)) is b


def test_broadcast_and_multicast_flood_to_every_other_port():
    clock, switch, (a, b, c) = build()
    for dst in (BROADCAST, b"\x01\x00\x5e\x00\x00\x01", b"\x33\x33\x00\x00\x00\x01"):
        f = frame(dst, mac(1))
        switch.frameReceived(a, f)
        assert f not in a.received
        assert f in b.received and f in c.received


def test_never_sent_back_out_of_the_ingress_port():
    clock, switch, (a, b, c) = build()
    switch.frameReceived(a, frame(BROADCAST, mac(1)))
    switch.frameReceived(a, frame(BROADCAST, mac(2)))
    before = [len(p.received) for p in (a, b, c)]
    switch.frameReceived(a, frame(mac(2), mac(1)))  # both behind port a
    assert [len(p.received) for p in (a, b, c)] == before


def test_entries_age_out_on_the_clock_and_traffic_refreshes_them():
    clock, switch, (a, b, c) = build()
    switch.frameReceived(a, frame(BROADCAST, mac(1)))
    clock.advance(AGING_TIME - 1)
    assert switch.lookup(mac(1)) is a
    switch.frameReceived(a, frame(BROADCAST, mac(1)))
    clock.advance(AGING_TIME - 1)
    assert switch.lookup(mac(1)) is a
    clock.advance(2)
    assert switch.lookup(mac(1)) is None
    f = frame(mac(1), mac(2))
    switch.frameReceived(b, f)
    assert f in a.received and f in c.received  # flooded again
    assert switch.macTable() == [("02:00:00:00:00:02", b, 0)]


def test_a_station_that_moves_is_followed():
    clock, switch, (a, b, c) = build()
    switch.frameReceived(a, frame(BROADCAST, mac(1)))
    switch.frameReceived(b, frame(BROADCAST, mac(1)))
    assert switch.lookup(mac(1)) is b
    f = frame(mac(1), mac(3))
    switch.frameReceived(c, f)
    assert b.received[-1] == f and f not in a.received


def test_counters_per_port():
    clock, switch, (a, b, c) = build()
    switch.frameReceived(a, frame(BROADCAST, mac(1), 100))
    ca, cb = switch.countersFor(a), switch.countersFor(b)
    assert (ca.framesIn, ca.bytesIn, ca.framesOut) == (1, 100, 0)
    assert (cb.framesIn, cb.framesOut, cb.bytesOut) == (0, 1, 100)
    assert ca.dropped == 0


def test_short_and_oversized_frames_are_dropped_and_counted():
    clock, switch, (a, b, c) = build()
    switch.frameReceived(a, b"\xff" * 13)
    switch.frameReceived(a, b"")
    switch.frameReceived(a, frame(BROADCAST, mac(1), MAX_FRAME_SIZE + 1))
    switch.frameReceived(a, frame(BROADCAST, mac(1), 9000))
    assert b.received == [] and c.received == []
    counters = switch.countersFor(a)
    assert counters.droppedRunt == 2 and counters.droppedOversize == 2
    assert counters.framesIn == 4 and counters.dropped == 4
    switch.frameReceived(a, frame(BROADCAST, mac(1), 14))
    switch.frameReceived(a, frame(BROADCAST, mac(1), MAX_FRAME_SIZE))
    assert len(b.received) == 2


def test_jumbo_frames_when_configured():
    clock, switch, (a, b) = build(2, maxFrameSize=JUMBO_FRAME_SIZE)
    switch.frameReceived(a, frame(BROADCAST, mac(1), 9000))
    switch.frameReceived(a, frame(BROADCAST, mac(1), JUMBO_FRAME_SIZE + 1))
    assert len(b.received) == 1 and switch.countersFor(a).droppedOversize == 1


def test_group_or_zero_source_addresses_are_dropped():
    clock, switch, (a, b, c) = build()
    for src in (BROADCAST, b"\x01\x00\x5e\x00\x00\x01", b"\x00" * 6):
        switch.frameReceived(a, frame(mac(2), src))
    assert b.received == [] and switch.countersFor(a).droppedBadSource == 3
    assert switch.macTable() == []


def test_a_vm_port_may_only_send_from_its_own_mac():
    clock, switch, (a, b) = build(2)
    vm = FakePort("vm", allowed=[mac(7)])
    switch.attach(vm)
    switch.frameReceived(vm, frame(BROADCAST, mac(8)))
    switch.frameReceived(vm, frame(mac(1), mac(666)))
    assert a.received == [] and b.received == []
    assert switch.countersFor(vm).droppedSpoofed == 2
    assert switch.lookup(mac(8)) is None and switch.lookup(mac(666)) is None
    f = frame(BROADCAST, mac(7))
    switch.frameReceived(vm, f)
    assert a.received == [f] and b.received == [f]


def test_no_other_port_may_take_a_vm_mac():
    clock, switch, (a, b) = build(2)
    vm = FakePort("vm", allowed=[mac(7)])
    switch.attach(vm)
    assert switch.lookup(mac(7)) is vm  # static from the start
    switch.frameReceived(a, frame(BROADCAST, mac(7)))
    assert switch.countersFor(a).droppedSpoofed == 1
    assert vm.received == [] and b.received == []
    f = frame(mac(7), mac(1))
    switch.frameReceived(a, f)
    assert vm.received == [f] and b.received == []
    with pytest.raises(ValueError, match="already belongs to vm"):
        switch.attach(FakePort("vm2", allowed=[mac(7)]))


def test_static_entries_never_age():
    clock, switch, (a,) = build(1)
    vm = FakePort("vm", allowed=[mac(7)])
    switch.attach(vm)
    clock.advance(AGING_TIME * 10)
    assert switch.lookup(mac(7)) is vm


def test_unknown_unicast_does_not_reach_pinned_ports():
    clock, switch, (a, b) = build(2)
    vm = FakePort("vm", allowed=[mac(7)])
    switch.attach(vm)
    f = frame(mac(50), mac(1))
    switch.frameReceived(a, f)
    assert b.received == [f] and vm.received == []
    g = frame(BROADCAST, mac(1))
    switch.frameReceived(a, g)
    assert vm.received == [g]


def test_random_source_flood_cannot_grow_the_table_or_evict_others():
    clock, switch, (attacker, host, late) = build(maxEntries=64, maxEntriesPerPort=16)
    switch.frameReceived(host, frame(BROADCAST, mac(1)))
    rng = random.Random(7)
    for i in range(20000):
        src = bytes([rng.randrange(256) & 0xFE | 0x02]) + rng.randbytes(5)
        switch.frameReceived(attacker, frame(mac(1), src))
        if i % 1000 == 0:
            clock.advance(1)
    assert len(switch.macTable()) <= 64
    assert sum(1 for _, p, _ in switch.macTable() if p is attacker) == 16
    assert switch.countersFor(attacker).learningRefused > 19000
    # The host that was there first is still known, and forwarded to alone.
    assert switch.lookup(mac(1)) is host
    assert len(host.received) == 20000 and len(late.received) == 1  # the first broadcast
    # Another port still gets learned: the attacker cannot fill the table alone.
    switch.frameReceived(late, frame(mac(1), mac(2)))
    assert switch.lookup(mac(2)) is late


def test_a_full_table_refuses_new_macs_and_floods_to_them():
    clock, switch, (a, b, c) = build(maxEntries=4, maxEntriesPerPort=4)
    for n in range(1, 5):
        switch.frameReceived(a, frame(BROADCAST, mac(n)))
    switch.frameReceived(b, frame(BROADCAST, mac(10)))
    assert switch.lookup(mac(10)) is None
    assert switch.countersFor(b).learningRefused == 1
    f = frame(mac(10), mac(1))
    switch.frameReceived(a, f)
    assert f in b.received and f in c.received  # still delivered, by flooding
    assert all(switch.lookup(mac(n)) is a for n in range(1, 5))  # nobody evicted
    clock.advance(AGING_TIME + 1)
    switch.frameReceived(b, frame(BROADCAST, mac(10)))
    assert switch.lookup(mac(10)) is b  # room again once the old ones aged out


def test_a_full_output_port_counts_its_drops():
    clock, switch, (a, b) = build(2)
    b.room = False
    switch.frameReceived(a, frame(BROADCAST, mac(1)))
    assert switch.countersFor(b).droppedOut == 1
    assert switch.countersFor(b).framesOut == 0


def test_detach_forgets_the_port_and_its_entries():
    clock, switch, (a, b, c) = build()
    vm = FakePort("vm", allowed=[mac(7)])
    switch.attach(vm)
    switch.frameReceived(b, frame(BROADCAST, mac(2)))
    switch.detach(b)
    switch.detach(vm)
    switch.detach(vm)  # twice is harmless
    assert switch.lookup(mac(2)) is None and switch.lookup(mac(7)) is None
    a.received.clear()
    c.received.clear()
    switch.frameReceived(b, frame(BROADCAST, mac(2)))  # a late frame: ignored
    assert a.received == [] and c.received == []
    switch.frameReceived(a, frame(mac(2), mac(1)))
    assert len(c.received) == 1 and b not in switch.ports


def test_frames_sent_from_inside_send_are_forwarded_after_without_recursion():
    clock = Clock()
    switch = Switch(clock)
    a = FakePort("a")

    @implementer(IPort)
    class Responder:
        name = "responder"
        allowedSources = frozenset([mac(5)])

        def __init__(self):
            self.depth = 0

        def send(self, frame):
            self.depth += 1
            assert self.depth == 1
            switch.frameReceived(self, frame[6:12] + mac(5) + b"\x08\x00reply")
            self.depth -= 1
            return True

    responder = Responder()
    b = FakePort("b")
    for port in (a, responder, b):
        switch.attach(port)
    switch.frameReceived(a, frame(BROADCAST, mac(1)))
    assert a.received == [mac(1) + mac(5) + b"\x08\x00reply"]
    assert len(b.received) == 1


def test_a_port_that_raises_does_not_stop_the_others():
    clock, switch, (a, b, c) = build()

    def broken(frame):
        raise RuntimeError("boom")

    b.send = broken
    switch.frameReceived(a, frame(BROADCAST, mac(1)))
    assert len(c.received) == 1
    assert switch.countersFor(b).droppedOut == 1
