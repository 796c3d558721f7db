"""
The VM state machine: the whole table walked, the values on the wire kept,
and illegal moves refused, logged and survived by the market and the seller.
"""

import itertools
import pathlib
import re

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from cpushare.client.seller.vmhost import HostedVM, VMHost
from cpushare.protocol import states
from cpushare.protocol.states import (
    ACTIVE, OVER, REPORTED, TRANSITIONS, IllegalTransition, VMLife, VMState)
from cpushare.server import admin
from cpushare.server.db.store import Account

from test.fakemarket import LogCapture, MemoryMarket, Replies, command, control

ALL_PAIRS = list(itertools.product(VMState, VMState))


class SomeVM(VMLife):
    def __init__(self, state):
        VMLife.__init__(self, state)
        self.id = 42


# -- the table


def test_the_values_on_the_wire_and_in_the_database_are_the_old_strings():
    assert [s.value for s in VMState] == [
        "pending", "allocated", "fetching", "booting", "running", "detached",
        "stopped", "failed", "lost"]
    assert VMState.RUNNING == "running" and f"{VMState.RUNNING}" == "running"
    assert [s.value for s in states.OrderState] == ["open", "done", "cancelled"]


def test_the_table_names_every_state_and_ended_ones_never_move():
    assert set(TRANSITIONS) == set(VMState)
    assert set(ACTIVE) | OVER == set(VMState) and not set(ACTIVE) & OVER
    assert REPORTED <= set(VMState)
    for state in OVER:
        assert TRANSITIONS[state] == frozenset()


@pytest.mark.parametrize("old,new", [p for p in ALL_PAIRS if p[1] in TRANSITIONS[p[0]]])
def test_every_move_in_the_table_is_made(old, new):
    vm = SomeVM(old)
    vm.moveTo(new)
    assert vm.state is new


@pytest.mark.parametrize("old,new", [p for p in ALL_PAIRS if p[1] not in TRANSITIONS[p[0]]])
def test_every_move_not_in_the_table_raises_naming_the_vm_from_and_to(old, new):
    vm = SomeVM(old)
    with pytest.raises(IllegalTransition) as raised:
        vm.moveTo(new)
    assert (raised.value.vm, raised.value.old, raised.value.new) == (42, old, new)
    assert str(raised.value) == f"VM 42 cannot go from {old.value} to {new.value}"
    assert vm.state is old


def test_running_never_goes_back_to_allocated_nor_a_vm_back_from_its_end():
    assert ("running", "allocated") not in {(o, n) for o, n in ALL_PAIRS
                                            if n in TRANSITIONS[o]}
    with pytest.raises(IllegalTransition):
        SomeVM(VMState.RUNNING).moveTo("allocated")
    with pytest.raises(IllegalTransition):
        SomeVM(VMState.STOPPED).moveTo(VMState.RUNNING)


def test_the_state_is_read_only_outside_the_table():
    vm = SomeVM(VMState.PENDING)
    with pytest.raises(AttributeError):
        vm.state = VMState.RUNNING
    with pytest.raises(ValueError):
        vm.moveTo("sleeping")
    assert vm.state is VMState.PENDING


# The modules that set or list VM states: each names them only through the enum.
STATE_USERS = [
    "cpushare/server/market", "cpushare/server/money/billing.py", "cpushare/server/db",
    "cpushare/server/session.py", "cpushare/client/seller", "cpushare/protocol/commands.py",
    "cpushare/client/demo.py",
]
LITERAL = re.compile(r"""["'](%s)["']""" % "|".join(s.value for s in VMState))
# Keys of AMP arguments, answers and dicts are names, not states; a lease's
# verdict "pending" (db/leases.py's PENDING_VERDICT) is not a VM's.
NAMES = re.compile(r"""b["']\w+["']|["']\w+["']\s*:|\[["']\w+["']\]|"""
                   r"""^\w+_VERDICT = ["']\w+["']$""")


def test_no_module_that_moves_vms_writes_a_state_as_a_string():
    root = pathlib.Path(__file__).resolve().parents[2]
    found = []
    for place in STATE_USERS:
        path = root / place
        for source in ([path] if path.is_file() else sorted(path.rglob("*.py"))):
            for number, line in enumerate(source.read_text().splitlines(), 1):
                if LITERAL.search(NAMES.sub("", line)):
                    found.append(f"{source.relative_to(root)}:{number}: {line.strip()}")
    assert found == []


# -- the seller


class FakeControl:
    def __init__(self):
        self.calls = []

    def callRemote(self, command, **kw):
        self.calls.append((command, kw))
        return defer.succeed({})


class FakeSession:
    def __init__(self):
        self.control = FakeControl()
        self.routes = {}

    def whenLost(self):
        return defer.Deferred()


class FakeCache:
    def __init__(self):
        self.fetched = defer.Deferred()

    def acquire(self, image):
        pass

    def ensure(self, image, size, fetch):
        return self.fetched

    def release(self, image):
        pass

    def inThread(self, fn, *args):
        return defer.maybeDeferred(fn, *args)


class FakeTransport:
    pid = 1234


def hosted():
    host = VMHost(Clock(), FakeCache(), "qemu-system-x86_64")
    host.session = FakeSession()
    vm = HostedVM(host, 9, "ab" * 32, 100, 1, 256, "0a:cb:00:00:00:09")
    host.vms[vm.id] = vm
    return host, vm


def test_the_seller_refuses_an_illegal_move_logs_it_once_and_tells_nothing():
    host, vm = hosted()
    assert vm.state is VMState.ALLOCATED
    for state in (VMState.FETCHING, VMState.BOOTING, VMState.RUNNING):
        host.report(vm, state)
    with LogCapture() as log:
        host.report(vm, VMState.FETCHING)
    assert vm.state is VMState.RUNNING
    assert [kw["state"] for _, kw in host.session.control.calls] == [
        "fetching", "booting", "running"]
    assert log.failures == []
    assert log.texts() == ["refused: VM 9 cannot go from running to fetching"]
    host.reportAll()    # the periodic report of a running VM: no move
    assert [kw["state"] for _, kw in host.session.control.calls[3:]] == ["running"]


def test_a_vm_that_ended_while_the_market_was_away_is_told_on_return_without_moving():
    host, vm = hosted()
    for state in (VMState.FETCHING, VMState.BOOTING, VMState.RUNNING):
        host.report(vm, state)
    host.session = None
    with LogCapture() as log:
        host.vmEnded(vm, VMState.STOPPED, "the VM powered off")
        session = FakeSession()
        defer.ensureDeferred(host.connected(session))
    assert vm.state is VMState.STOPPED
    assert [(kw["state"], kw["reason"]) for _, kw in session.control.calls] == [
        ("stopped", "the VM powered off")]
    assert not [t for t in log.texts() if "refused" in t]


# -- the market


@pytest.fixture
def mm():
    m = MemoryMarket()
    yield m
    m.close()


SHA = "ab" * 32


def answer(transport, tag):
    found = Replies(transport).answer(tag)
    assert found is not None, f"no answer to request {tag}"
    return found


def started(m):
    """A seller (sam) offering a core, and one VM of alice's placed on it: (seller, cli, vm)."""
    seller, sellerOut = m.connect("sam")
    m.hello(seller, "seller")
    cli, cliOut = m.connect("alice")
    m.hello(cli, "cli")

    def image(cursor):
        cursor.execute("INSERT INTO images (sha256, size, stored) VALUES (?, ?, ?)",
                       (SHA, 300000, "2026-01-01"))
        cursor.execute("INSERT INTO account_images (account_id, sha256, name, uploaded)"
                       " SELECT id, ?, 'job.iso', '2026-01-01' FROM accounts WHERE name = ?",
                       (SHA, "alice"))
        admin.credit(cursor, "alice", 100 * 10**6, "funds for the tests")

    m.store.run(image)
    seller.dataReceived(control(command("Offer", 2, cores=b"1", memory=b"1024")))
    cli.dataReceived(control(command("PlaceOrder", 2, image=SHA.encode(), vms=b"1",
                                     cores=b"1", memory=b"256")))
    m.reactor.advance(0)
    placed = answer(cliOut, 2)
    assert placed[b"allocated"] == b"1", placed
    [vm] = m.market.orders.vms.values()
    assert vm.state is VMState.ALLOCATED
    return seller, sellerOut, cli, cliOut, vm


def report(m, seller, tag, vm, state, cpu=b"1.0"):
    seller.dataReceived(control(command("VMState", tag, vm=str(vm.id).encode(),
                                        state=state.encode(), cpu_seconds=cpu)))
    m.reactor.advance(0)


def test_a_seller_moving_a_running_vm_back_is_refused_logged_and_the_market_serves_on(mm):
    seller, sellerOut, cli, cliOut, vm = started(mm)
    report(mm, seller, 10, vm, "running")
    assert b"_error" not in answer(sellerOut, 10)
    assert vm.state is VMState.RUNNING

    with LogCapture() as log:
        report(mm, seller, 11, vm, "allocated", cpu=b"99.0")
        report(mm, seller, 12, vm, "fetching", cpu=b"99.0")
    for tag, old in ((11, "allocated"), (12, "fetching")):
        refused = answer(sellerOut, tag)
        assert refused[b"_error_code"] == b"BAD_REQUEST"
        assert refused[b"_error_description"] == (
            f"VM {vm.id} cannot go from running to {old}".encode())
    assert log.failures == []
    assert [t for t in log.texts() if "cannot go" in t] == [
        f"seller sam refused: VM {vm.id} cannot go from running to allocated",
        f"seller sam refused: VM {vm.id} cannot go from running to fetching"]
    assert vm.state is VMState.RUNNING and vm.cpuSeconds == 1.0

    # The market serves on: the seller's next report and the buyer's listing.
    report(mm, seller, 13, vm, "running", cpu=b"2.0")
    assert b"_error" not in answer(sellerOut, 13)
    assert vm.cpuSeconds == 2.0
    cli.dataReceived(control(command("ListVMs", 20)))
    mm.reactor.advance(0)
    assert b"running" in answer(cliOut, 20)[b"vms"]


def test_a_stopped_vm_never_runs_again_whatever_its_seller_says(mm):
    seller, sellerOut, cli, cliOut, vm = started(mm)
    report(mm, seller, 10, vm, "running")
    cli.dataReceived(control(command("StopVM", 21, vm=str(vm.id).encode())))
    mm.reactor.advance(0)
    assert b"_error" not in answer(cliOut, 21)
    assert vm.state is VMState.STOPPED
    with LogCapture() as log:
        report(mm, seller, 11, vm, "running")   # before its last word: ignored
        report(mm, seller, 12, vm, "stopped")   # its last word
        report(mm, seller, 13, vm, "running")   # after it: no such VM here
    assert b"_error" not in answer(sellerOut, 11)
    assert answer(sellerOut, 13)[b"_error_code"] == b"NO_SUCH_VM"
    assert log.failures == []
    assert vm.state is VMState.STOPPED
    with pytest.raises(IllegalTransition):
        vm.moveTo(VMState.RUNNING)
    cli.dataReceived(control(command("ListVMs", 22)))
    mm.reactor.advance(0)
    listed = answer(cliOut, 22)[b"vms"]
    assert b"stopped" in listed and b"running" not in listed


def test_an_internal_move_the_table_refuses_is_logged_and_changes_nothing(mm):
    seller, sellerOut, cli, cliOut, vm = started(mm)
    orders = mm.market.orders
    orders.stopVM(Account(vm.buyerId, "buyer", 0.0), vm.id)
    assert vm.state is VMState.STOPPED
    with LogCapture() as log:
        orders._end(vm, VMState.FAILED, "a second end")
    assert log.failures == []
    assert log.texts() == [f"refused: VM {vm.id} cannot go from stopped to failed"]
    assert vm.state is VMState.STOPPED and vm.reason == "stopped by the buyer"


def test_vmstate_takes_only_the_states_a_seller_reports(mm):
    seller, sellerOut, cli, cliOut, vm = started(mm)
    report(mm, seller, 10, vm, "pending")
    assert answer(sellerOut, 10)[b"_error_description"] == b"unknown VM state 'pending'"
    assert vm.state is VMState.ALLOCATED


@pytest.mark.parametrize("outcome,told", [
    ("runs", ["fetching", "booting", "running"]),
    ("cannot launch", ["fetching", "booting", "failed"]),
    ("stopped while fetching", ["fetching", "stopped"]),
])
def test_the_sellers_boot_reports_each_move_once(outcome, told):
    host, vm = hosted()

    def launch(path):
        if outcome == "cannot launch":
            raise OSError("no QEMU here")
        vm.transport = FakeTransport()
        vm.moveTo(VMState.RUNNING)

    vm.launch = launch
    with LogCapture() as log:
        defer.ensureDeferred(host._boot(vm))
        if outcome == "stopped while fetching":
            vm.stop("stopped by the market")
        host.cache.fetched.callback("/cache/image.iso")
    assert [kw["state"] for _, kw in host.session.control.calls] == told
    assert vm.state == told[-1]
    assert not [t for t in log.texts() if "refused" in t]
