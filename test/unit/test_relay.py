"""The channel relay, on recording fake sessions."""

import pytest

from cpushare.protocol.commands import ChannelBusy
from cpushare.protocol.mux import Routing
from cpushare.server.relay import Relay


class FakeSession(Routing):
    def __init__(self, sessionId, room=True):
        self.sessionId = sessionId
        Routing.__init__(self)
        self.links = {}
        self.sent = []
        self.unlinked = []
        self.room = room

    def sendFrame(self, channel, payload):
        if not self.room:
            return False
        self.sent.append((channel, payload))
        return True

    def channelUnlinked(self, channel, reason):
        self.unlinked.append((channel, reason))

    def receive(self, channel, payload):
        """What the multiplexer does with an incoming frame."""
        route = self.routes.get(channel)
        if route is not None:
            route(payload)
        return route is not None


def test_frames_cross_a_link_both_ways_unchanged_and_counted():
    relay = Relay()
    seller, buyer = FakeSession(1), FakeSession(2)
    link = relay.link(seller, 10, buyer, 20)
    assert seller.receive(10, b"to buyer")
    assert buyer.receive(20, b"to seller!")
    assert buyer.sent == [(20, b"to buyer")]
    assert seller.sent == [(10, b"to seller!")]
    stats = link.statsFor(seller, 10)
    assert stats == dict(channel=10, peer_session=2, peer_channel=20,
                         frames_out=1, bytes_out=8, frames_in=1, bytes_in=10, dropped=0)
    assert link.statsFor(buyer, 20)["frames_out"] == 1


def test_a_full_receiver_drops_and_counts_the_drops_but_bills_no_traffic_for_them():
    relay = Relay()
    a, b = FakeSession(1), FakeSession(2, room=False)
    link = relay.link(a, 1, b, 1)
    a.receive(1, b"x")
    a.receive(1, b"y" * 1500)
    stats = link.statsFor(a, 1)
    assert stats["dropped"] == 2
    # Traffic (what a VM's lease pays for) is only what was delivered.
    assert (stats["frames_out"], stats["bytes_out"]) == (0, 0)
    assert link.bytesAB + link.bytesBA == 0
    b.room = True
    a.receive(1, b"z" * 100)
    assert (link.framesAB, link.bytesAB) == (1, 100)


def test_a_link_delivers_no_byte_past_its_allowance_and_says_so_once():
    relay = Relay()
    seller, buyer = FakeSession(1), FakeSession(2)
    link = relay.link(seller, 5, buyer, 5)
    spent = []
    link.meter(2500, lambda: spent.append(True))
    seller.receive(5, b"a" * 1500)
    buyer.receive(5, b"b" * 900)
    # 100 bytes left: a frame of 101 does not fit, in either direction.
    seller.receive(5, b"c" * 101)
    buyer.receive(5, b"d" * 101)
    for _ in range(1000):
        seller.receive(5, b"junk" * 375)
    assert buyer.sent == [(5, b"a" * 1500)]
    assert seller.sent == [(5, b"b" * 900)]
    assert link.bytesAB + link.bytesBA == 2400
    assert spent == [True]
    assert link.overAllowance == 1002
    # What still fits goes through.
    buyer.receive(5, b"e" * 100)
    assert link.bytesAB + link.bytesBA == 2500 and link.allowance == 0
    # A new allowance, and its own call when it is spent; no limit at all.
    link.meter(10, lambda: spent.append("again"))
    seller.receive(5, b"f" * 11)
    assert spent == [True, "again"]
    link.meter(None)
    seller.receive(5, b"g" * 100_000)
    assert buyer.sent[-1] == (5, b"g" * 100_000)


@pytest.mark.parametrize("share", [None, 1, 700, 5000])
def test_a_metered_link_decides_every_frame_as_its_whole_allowance_would(monkeypatch, share):
    """
    Each direction checks its frames against a share of the allowance;
    whatever the shares, a frame goes through exactly when it fits what is
    left of the whole allowance (and the receiver has room), and the
    shares never promise more than is left.
    """
    import random

    from cpushare.server import relay as relayModule

    if share is not None:
        monkeypatch.setattr(relayModule, "SHARE", share)
    rng = random.Random(share)
    seller, buyer = FakeSession(1), FakeSession(2)
    link = Relay().link(seller, 5, buyer, 5)
    left, spentCalls, over, overHere, delivered = None, [], 0, 0, [0, 0]
    for step in range(3000):
        if step % 500 == 0:
            left = rng.choice([0, 10, 3000, 20_000, 100_000])
            link.meter(left, lambda: spentCalls.append(step))
            spentCalls.clear()
            overHere = 0
        towardsB = rng.random() < 0.6
        size = rng.choice([1, 60, 64, 1500, 1514, rng.randint(1, 4000)])
        (buyer if towardsB else seller).room = rng.random() < 0.9
        receiver = buyer if towardsB else seller
        before = len(receiver.sent)
        (seller if towardsB else buyer).receive(5, b"x" * size)
        fits = size <= left
        went = len(receiver.sent) > before
        assert went == (fits and receiver.room), (step, size, left)
        if not fits:
            over += 1
            overHere += 1
        if went:
            left -= size
            delivered[0 if towardsB else 1] += size
        assert link.allowance == left
        assert (link.bytesAB, link.bytesBA) == tuple(delivered)
        assert link.overAllowance == over
        assert len(spentCalls) == min(1, overHere)
        shareAB, shareBA = link.limitAB - link.bytesAB, link.limitBA - link.bytesBA
        assert shareAB >= 0 and shareBA >= 0 and shareAB + shareBA <= left
    assert over > 0 and min(delivered) > 0


def test_traffic_both_ways_looks_at_the_whole_allowance_seldom(monkeypatch):
    """Each direction keeps its share while the other takes one: no check of the whole each frame."""
    from cpushare.server.relay import Link

    calls = []
    share = Link._share
    monkeypatch.setattr(Link, "_share", lambda self, *a: calls.append(a) or share(self, *a))
    seller, buyer = FakeSession(1), FakeSession(2)
    link = Relay().link(seller, 5, buyer, 5)
    link.meter(10**15)
    for _ in range(1000):
        seller.receive(5, b"d" * 1500)
        buyer.receive(5, b"a" * 64)
    assert len(buyer.sent) == len(seller.sent) == 1000
    assert calls == [(1500, True), (64, False)]


def test_the_first_frame_delivered_towards_b_is_noticed_once():
    relay = Relay()
    seller, buyer = FakeSession(1, room=False), FakeSession(2, room=False)
    link = relay.link(seller, 5, buyer, 5)
    seen = []
    link.watchFirstAB(lambda: seen.append(link.bytesAB))
    seller.receive(5, b"dropped")       # not delivered: no sign of life
    seller.room = buyer.room = True
    buyer.receive(5, b"to the VM")      # the other way: no sign of life either
    assert seen == []
    seller.receive(5, b"dhcp request")
    seller.receive(5, b"more")
    assert seen == [12]
    assert buyer.sent == [(5, b"dhcp request"), (5, b"more")]
    # Once unlinked, nothing puts its routes back.
    relay.unlink(link, "gone")
    link.meter(5)
    link.watchFirstAB(lambda: None)
    assert seller.routes == {} and buyer.routes == {}


def test_frames_on_other_channels_go_nowhere():
    relay = Relay()
    a, b, c = FakeSession(1), FakeSession(2), FakeSession(3)
    relay.link(a, 1, b, 1)
    assert not a.receive(2, b"x")
    assert not c.receive(1, b"x")
    assert b.sent == [] and c.sent == [] and a.sent == []


def test_a_channel_can_be_linked_only_once():
    relay = Relay()
    a, b, c = FakeSession(1), FakeSession(2), FakeSession(3)
    relay.link(a, 1, b, 1)
    with pytest.raises(ChannelBusy):
        relay.link(a, 1, c, 1)
    with pytest.raises(ChannelBusy):
        relay.link(c, 1, b, 1)
    with pytest.raises(ChannelBusy):
        relay.link(c, 5, c, 5)
    assert c.links == {} and c.routes == {}


def test_a_session_going_away_unlinks_and_tells_the_other_end():
    relay = Relay()
    a, b, c = FakeSession(1), FakeSession(2), FakeSession(3)
    relay.link(a, 1, b, 7)
    relay.link(a, 2, c, 8)
    relay.dropSession(a, "the peer disconnected")
    assert b.unlinked == [(7, "the peer disconnected")]
    assert c.unlinked == [(8, "the peer disconnected")]
    assert a.unlinked == []
    assert b.routes == {} and c.routes == {} and a.routes == {}
    assert relay.links == set()
    assert not b.receive(7, b"late")
    # The freed channels can be linked again.
    relay.link(b, 7, c, 8)
