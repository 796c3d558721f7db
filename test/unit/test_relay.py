"""The channel relay, on recording fake sessions."""

import pytest

from cpushare.protocol.commands import ChannelBusy
from cpushare.server.relay import Relay


class FakeSession:
    def __init__(self, sessionId, room=True):
        self.sessionId = sessionId
        self.routes = {}
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


def test_a_full_receiver_drops_and_counts():
    relay = Relay()
    a, b = FakeSession(1), FakeSession(2, room=False)
    link = relay.link(a, 1, b, 1)
    a.receive(1, b"x")
    a.receive(1, b"y")
    assert link.statsFor(a, 1)["dropped"] == 2
    assert link.statsFor(a, 1)["frames_out"] == 2


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
