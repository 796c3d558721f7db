"""
The parts of the money desk alone: each is given only what it uses, the
payouts' timer runs on a clock, and the records that reach the wire have
the fields of the commands that carry them.
"""

import inspect
import re
from pathlib import Path

import attr
from twisted.internet import defer, task
from zope.interface import implementer

from cpushare.money import MICRO
from cpushare.protocol import commands, paging
from cpushare.server.db import store
from cpushare.server.money import ledger, payouts, statements
from cpushare.server.money.desk import MoneyDesk
from cpushare.server.money.funds import Funds
from cpushare.server.money.ledger import EARNINGS, PAYOUT, PAYPAL
from cpushare.server.money.paypal import IPayPal, PayoutStatus
from cpushare.server.money.payouts import Payouts
from cpushare.server.money.statements import Statements
from cpushare.server.db.store import Account

ROOT = Path(__file__).resolve().parent.parent.parent


class ConnectionStore:
    """A store that runs each function at once in a transaction on C{conn}."""

    def __init__(self, conn):
        self.conn = conn

    def run(self, fn, *args):
        return defer.maybeDeferred(store.transact, self.conn, fn, *args)


@implementer(IPayPal)
class RecordingPayPal:
    """Says every payout is created and then sent; records what it is asked."""

    def __init__(self):
        self.asked = []

    def createPayout(self, senderBatchId, receiverEmail, amount, currency, note):
        self.asked.append(("createPayout", receiverEmail, amount))
        return defer.succeed((f"BATCH{len(self.asked)}", "PENDING"))

    def payoutStatus(self, batchId):
        self.asked.append(("payoutStatus", batchId))
        return defer.succeed(PayoutStatus("SUCCESS", "SUCCESS"))


def parameters(cls):
    return list(inspect.signature(cls).parameters)


def test_each_part_of_the_desk_is_given_only_what_it_uses():
    # Adding funds asks no clock; statements only read the store; payouts
    # get two callables of the funds, not the funds.
    assert parameters(Funds) == ["store", "paypal", "currency", "commission", "publicUrl"]
    assert parameters(Statements) == ["store"]
    assert parameters(Payouts) == ["reactor", "store", "paypal", "currency", "minimum",
                                   "pollInterval", "requirePayPal", "expirePayments"]
    desk = MoneyDesk(task.Clock(), object())
    assert desk.payouts.requirePayPal == desk.funds.requirePayPal
    assert desk.payouts.expirePayments == desk.funds.expireUnapproved


def test_the_statement_page_size_is_the_protocols_alone():
    assert inspect.signature(statements.statementPage).parameters["limit"].default \
        == commands.STATEMENT_PAGE
    defined = [path.relative_to(ROOT).as_posix()
               for path in (ROOT / "cpushare").rglob("*.py")
               if re.search(r"^\s*STATEMENT_PAGE\s*=", path.read_text(), re.MULTILINE)]
    assert defined == ["cpushare/protocol/commands.py"]


def test_a_statement_entry_has_the_fields_of_the_statement_command():
    argument = paging.listArgument(commands.Statement, "entries")
    wire = [name.decode() for name, _ in argument.subargs]
    assert [f.name for f in attr.fields(statements.StatementEntry)] == wire


def _earn(conn, amount):
    sam = store.transact(conn, store.createAccount, "sam", "ab" * 32)
    store.transact(conn, ledger.post, "test", "earnings",
                   [(PAYPAL, None, -amount), (EARNINGS, sam, amount)])
    return Account(sam, "sam", 0.0)


def _payouts(conn, clock, paypal, expired, refusal=None):
    def requirePayPal():
        if refusal is not None:
            raise commands.NoPayments(refusal)

    def expirePayments(seconds):
        expired.append(seconds)
        return defer.succeed(None)

    return Payouts(clock, ConnectionStore(conn), paypal, "USD", MICRO, 60.0,
                   requirePayPal, expirePayments)


def test_the_payout_timer_expires_payments_and_settles_payouts_on_a_clock(conn):
    sam = _earn(conn, 30 * MICRO)
    clock, paypal, expired = task.Clock(), RecordingPayPal(), []
    clock.advance(1000)
    desk = _payouts(conn, clock, paypal, expired)
    desk.startPolling()
    assert expired == [1000]
    requested = []
    defer.ensureDeferred(desk.request(sam, 25 * MICRO, "sam@example.com")) \
        .addCallback(requested.append)
    [payout] = requested
    assert isinstance(payout, payouts.Payout)
    assert (payout.amount, payout.email, payout.state, payout.account) == (
        25 * MICRO, "sam@example.com", "pending", "sam")
    # Asked at once after creating it, then every pollInterval.
    clock.advance(0)
    assert paypal.asked == [("createPayout", "sam@example.com", 25 * MICRO),
                            ("payoutStatus", "BATCH1")]
    assert store.transact(conn, payouts.payout, payout.id).state == "sent"
    # Every poll, the one asked at once too, expires payments first.
    assert expired == [1000, 1000]
    clock.advance(60)
    assert expired == [1000, 1000, 1060]
    assert store.transact(conn, ledger.balances, sam.id)[PAYOUT] == 0
    assert store.transact(conn, ledger.books)["ok"]
    stopped = desk.stopPolling()
    assert stopped.called
    clock.advance(600)
    assert expired == [1000, 1000, 1060]


def test_a_payout_is_refused_before_anything_moves_while_payments_are_off(conn):
    sam = _earn(conn, 30 * MICRO)
    paypal = RecordingPayPal()
    desk = _payouts(conn, task.Clock(), paypal, [], refusal="no payments here")
    failed = []
    defer.ensureDeferred(desk.request(sam, 25 * MICRO, "sam@example.com")) \
        .addErrback(failed.append)
    [failure] = failed
    assert failure.check(commands.NoPayments) and "no payments here" in str(failure.value)
    assert paypal.asked == []
    assert store.transact(conn, payouts.accountPayouts, sam.id) == []
    assert store.transact(conn, ledger.balances, sam.id)[EARNINGS] == 30 * MICRO
