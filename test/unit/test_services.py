"""
The market's services are given what they use, never the whole market:
billing reports through the narrow interface the orders give it.
"""

from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cpushare.protocol import commands
from cpushare.protocol.mux import Routing
from cpushare.server.money.billing import Bill, Billing, ILeases
from cpushare.server.db.store import Account


class FakeStore:
    """Runs nothing: each run() answers the next of C{answers}."""

    groupCommit = True

    def __init__(self, answers):
        self.answers = list(answers)
        self.ran = []

    def run(self, fn, *args):
        self.ran.append((fn.__name__, args[0]))
        return defer.succeed(self.answers.pop(0))


@implementer(ILeases)
class RecordingLeases:
    def __init__(self, vms):
        self.vms = vms
        self.calls = []

    def billable(self):
        return self.vms

    def outOfFunds(self, vm, why):
        self.calls.append(("outOfFunds", vm.id, why))

    def netLimitChanged(self, vm, limit):
        self.calls.append(("netLimitChanged", vm.id, limit))

    def retryFunding(self, buyerId=None):
        self.calls.append(("retryFunding",))


def _vm(vmId, leaseId, active=True):
    return SimpleNamespace(id=vmId, leaseId=leaseId, active=active, cpuSeconds=1.0,
                           netBytes=lambda: 0)


def test_billing_reports_what_each_bill_decided_to_the_leases_it_serves():
    vms = [_vm(1, 10), _vm(2, 20), _vm(3, None), _vm(4, 40, active=False)]
    store = FakeStore([Bill(charged=0, held=0, stop="the funds ran out", settled=False,
                            netLimit=None),
                       Bill(charged=10, held=90, stop=None, settled=False, netLimit=5000)])
    leases = RecordingLeases(vms)
    verifyObject(ILeases, leases)
    billing = Billing(Clock(), store)
    billing.serve(leases)
    billing.tick()
    # Only active VMs with a lease are billed, each once.
    assert store.ran == [("bill", 10), ("bill", 20)]
    assert leases.calls == [("outOfFunds", 1, "the funds ran out"),
                            ("netLimitChanged", 2, 5000), ("retryFunding",)]


def test_the_market_wires_its_services_without_handing_itself_over(tmp_path):
    market = _market(tmp_path)
    for service in (market.board, market.orders, market.billing, market.cpubench, market.canaries,
                    market.ratings, market.access, market.admission):
        assert not any(value is market for value in vars(service).values()), service
    verifyObject(ILeases, market.orders)
    assert market.billing.leases is market.orders
    # The image store set after the market is built reaches the services that use it.
    images = object()
    market.images = images
    assert market.orders.images is images and market.cpubench.images is images


class FakeSession(Routing):
    """What the market asks of a session whose channels it links."""

    def __init__(self, sessionId, accountId, role="buyer"):
        Routing.__init__(self)
        self.sessionId, self.account, self.role = sessionId, Account(accountId, f"a{accountId}", 0.0), role
        self.links, self.told, self.unlinked = {}, [], []
        self.control = SimpleNamespace(
            callRemote=lambda command, **kw: self.told.append((command, kw)))

    def sendFrame(self, channel, payload):
        return True

    def channelUnlinked(self, channel, reason):
        self.unlinked.append((channel, reason))


def _market(tmp_path):
    from cpushare.server.db.store import Store
    from cpushare.server.market.market import Market

    clock = Clock()
    return Market(clock, Store(clock, str(tmp_path / "db.sqlite")), credentials=None)


def test_the_market_links_channels_only_between_sessions_of_one_account(tmp_path):
    market = _market(tmp_path)
    alice, bob, alice2 = FakeSession(1, 10), FakeSession(2, 20), FakeSession(3, 10)
    market.sessions = {1: alice, 2: bob, 3: alice2}
    with pytest.raises(commands.NotPermitted, match="same account"):
        market.linkChannel(alice, 4, 2, 4)
    with pytest.raises(commands.NoSuchSession):
        market.linkChannel(alice, 4, 9, 4)
    assert alice.links == {} and bob.routes == {}
    market.linkChannel(alice, 4, 3, 5)
    assert alice2.told == [(commands.ChannelLinked,
                            {"channel": 5, "peer_session": 1, "peer_channel": 4})]
    assert set(alice.routes) == {4} and set(alice2.routes) == {5}
    market.unlinkChannel(alice2, 5)
    assert alice.unlinked == [(4, "unlinked by the peer")] and alice.routes == {}
    with pytest.raises(commands.BadRequest, match="not linked"):
        market.unlinkChannel(alice2, 5)


def test_a_rating_is_checked_before_the_store_and_its_votes_reach_the_board():
    from cpushare.server.market.ratings import MAX_COMMENT, Rated, Ratings

    voted = []
    store = FakeStore([(7, "sam", (1.0, 0.0, 1))])
    ratings = Ratings(store, lambda seller, votes: voted.append((seller, votes)))
    failed = []
    defer.ensureDeferred(ratings.rate(Account(1, "a1", 0.0), 3, True, "x" * (MAX_COMMENT + 1))) \
        .addErrback(failed.append)
    assert failed[0].check(commands.BadRequest) and "at most" in str(failed[0].value)
    assert store.ran == []
    rated = []
    defer.ensureDeferred(ratings.rate(Account(1, "a1", 0.0), 3, True)).addCallback(rated.append)
    assert store.ran == [("rateLease", 1)]
    assert voted == [(7, (1.0, 0.0, 1))]
    assert rated[0].seller == "sam" and rated[0].votes == 1 and isinstance(rated[0], Rated)
