"""
The market's services are given what they use, never the whole market:
billing reports through the narrow interface the orders give it.
"""

from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cpushare.server.money.billing import Billing, ILeases


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
    store = FakeStore([{"stop": "the funds ran out", "net_limit": None},
                       {"stop": None, "net_limit": 5000}])
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
    from cpushare.server.db.store import Store
    from cpushare.server.market.market import Market

    clock = Clock()
    market = Market(clock, Store(clock, str(tmp_path / "db.sqlite")), credentials=None)
    for service in (market.board, market.orders, market.billing, market.cpubench):
        assert not any(value is market for value in vars(service).values()), service
    verifyObject(ILeases, market.orders)
    assert market.billing.leases is market.orders
    # The image store set after the market is built reaches the services that use it.
    images = object()
    market.images = images
    assert market.orders.images is images and market.cpubench.images is images
