"""
Adding funds: a buyer pays with PayPal, the market keeps its commission
and credits the rest to the buyer's funds (docs/buyer.md).

 1. C{FundsAdd}: the market creates a PayPal payment for the gross amount
    and records it (L{recordPayment}) with the commission worked out now,
    at the operator's rate, and a random nonce that goes into the return
    and cancel links.  The buyer gets the approval link.
 2. The buyer approves at PayPal, which sends the browser back to
    C{/paypal/return?n=NONCE&paymentId=PAY-..&token=..&PayerID=..} on the
    market's web endpoint (L{cpushare.server.web}).
 3. L{Funds.paymentReturned} claims the payment (created -> executing, so
    only one return at a time gets to PayPal), executes it, checks that
    PayPal says approved and completed with the amount and currency this
    market asked for, and credits the account in one store transaction:
    the ledger's deposit with reference C{paypal-payment:PAYPAL_ID} and
    the payment's state.  The reference is posted at most once, so no
    replay, duplicate or race ever credits twice, even between server
    processes.

A payment never approved expires after a day (L{Funds.expireUnapproved},
run on the payouts' polling timer, L{cpushare.server.money.payouts}).

The commission is a percentage of the amount added, in millionths of the
whole (5% is 50000) so that no float is ever involved, rounded down to the
cent: in the buyer's favour.
"""

import datetime
import re
import secrets
from typing import Optional
from urllib.parse import urlencode

import attr
from twisted.logger import Logger

from cpushare.money import CENT, MICRO, formatAmount
from cpushare.protocol import commands
from cpushare.server.money import ledger
from cpushare.server.money.ledger import COMMISSION, FUNDS, PAYPAL
from cpushare.server.money.paypal import PayPalError
from cpushare.server.money.rows import accountRows
from cpushare.server.db.store import now

# One deposit is at least DEPOSIT_MINIMUM and at most DEPOSIT_MAXIMUM:
# larger amounts are mistakes more often than money.
DEPOSIT_MINIMUM = 1 * MICRO
DEPOSIT_MAXIMUM = 10_000 * MICRO

# A percentage in millionths of the whole: 1% is 10000.
PERCENT = 10_000
WHOLE = 100 * PERCENT

NO_PAYMENTS = ("this market takes no payments: its operator has not set up PayPal "
               "(twistd cpushare-server --paypal-client-id ...)")

# PayPal lets a buyer approve a payment for about three hours; a payment
# not approved within a day (well past that) is marked expired.
PAYMENT_LIFETIME = 24 * 3600

_PERCENT = re.compile(r"^(\d{1,2})(?:\.(\d{1,4}))?$")
_PAYPAL_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def parsePercent(text):
    """
    "5" or "2.5" (percent, at most four decimals, below 100) as millionths
    of the whole; anything else is a ValueError naming the problem.
    """
    match = _PERCENT.match(str(text).strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not a percentage: write a number from 0 to below 100 with at "
            "most four decimals, like 5 or 2.5")
    return int(match.group(1)) * PERCENT + int((match.group(2) or "").ljust(4, "0"))


def formatPercent(rate):
    """Millionths of the whole as a percentage: 50000 is "5", 25000 is "2.5"."""
    whole, fraction = divmod(rate, PERCENT)
    digits = f"{fraction:04d}".rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def commissionOn(gross, rate):
    """The commission at C{rate} on C{gross}, rounded down to the cent."""
    return gross * rate // WHOLE // CENT * CENT


@attr.s
class Outcome:
    """What a return from PayPal came to: an HTTP status and a page's text."""

    status = attr.ib()
    title = attr.ib()
    message = attr.ib()
    credited = attr.ib(default=False)


@attr.s(frozen=True, auto_attribs=True)
class Payment:
    """
    A payment this market created at PayPal, as its row stands: our id,
    the account's id and name (C{account}), PayPal's id, the nonce of its
    links, the gross and the commission (micro-units), the currency, its
    state (created, executing, credited, cancelled, expired, check,
    mismatch), the payer, the reason it waits, and when it was created and
    last changed.
    """

    id: int
    account_id: int
    paypal_id: str
    nonce: str
    gross: int
    commission: int
    currency: str
    state: str
    payer_id: Optional[str]
    reason: Optional[str]
    created: str
    updated: str
    account: str

    @property
    def net(self):
        """What the payment adds to the buyer's funds."""
        return self.gross - self.commission


# -- SQL, run on the store's pool (Store.run) or directly by cpushare-admin

def _payments(cursor, rest, args):
    """The L{Payment}s that C{rest} (a WHERE, ORDER BY or LIMIT clause) selects."""
    return accountRows(cursor, Payment, "paypal_payments", rest, args)


def _payment(cursor, where, args):
    found = _payments(cursor, " WHERE " + where, args)
    return found[0] if found else None


def paymentByPayPalId(cursor, paypalId):
    return _payment(cursor, "p.paypal_id = ?", (paypalId,))


def recordPayment(cursor, accountId, paypalId, nonce, gross, commission, currency):
    """Record a payment PayPal created for an account; returns our id."""
    stamp = now()
    cursor.execute(
        "INSERT INTO paypal_payments (account_id, paypal_id, nonce, gross, commission,"
        " currency, state, created, updated) VALUES (?, ?, ?, ?, ?, ?, 'created', ?, ?)"
        " RETURNING id",
        (accountId, paypalId, nonce, gross, commission, currency, stamp, stamp),
    )
    return cursor.fetchone()[0]


def claimPayment(cursor, paypalId, nonce):
    """
    Take a payment that waits for its return (state C{created}) for
    executing.  Returns (L{Payment} or None, what happened): "claimed",
    "unknown" (this market created no such payment), "forged" (the nonce
    is not the payment's), or the state it is in.
    """
    payment = paymentByPayPalId(cursor, paypalId)
    if payment is None:
        return None, "unknown"
    if not secrets.compare_digest(payment.nonce.encode(), nonce.encode()):
        return payment, "forged"
    if payment.state != "created":
        return payment, payment.state
    cursor.execute(
        "UPDATE paypal_payments SET state = 'executing', updated = ?"
        " WHERE id = ? AND state = 'created'",
        (now(), payment.id),
    )
    if cursor.rowcount != 1:
        return payment, "executing"
    return payment, "claimed"


def setPaymentState(cursor, paymentId, state, reason=None, fromState="executing"):
    """Move a payment from C{fromState} to C{state}; False if it was not in C{fromState}."""
    cursor.execute(
        "UPDATE paypal_payments SET state = ?, reason = ?, updated = ?"
        " WHERE id = ? AND state = ?",
        (state, reason, now(), paymentId, fromState),
    )
    return cursor.rowcount == 1


def depositMemo(payment):
    return (f"PayPal payment {payment.paypal_id}: {formatAmount(payment.gross)}"
            f" {payment.currency} paid, commission {formatAmount(payment.commission)},"
            f" {formatAmount(payment.net)} added")


def creditPayment(cursor, paymentId, payerId, fromStates=("executing",)):
    """
    Credit a payment PayPal completed: the deposit in the ledger and the
    payment's state, in this one transaction.  Raises
    L{ledger.AlreadyPosted} when it was credited before (nothing changes).
    """
    payment = _payment(cursor, "p.id = ?", (paymentId,))
    if payment.state == "credited":
        raise ledger.AlreadyPosted(f"paypal-payment:{payment.paypal_id}", None)
    if payment.state not in fromStates:
        raise ValueError(f"payment {payment.paypal_id} is {payment.state}, not "
                         + " or ".join(fromStates))
    transactionId = ledger.post(cursor, "deposit", depositMemo(payment), [
        (PAYPAL, None, -payment.gross),
        (FUNDS, payment.account_id, payment.net),
        (COMMISSION, None, payment.commission),
    ], reference=f"paypal-payment:{payment.paypal_id}")
    cursor.execute(
        "UPDATE paypal_payments SET state = 'credited', payer_id = ?, reason = NULL,"
        " updated = ? WHERE id = ?",
        (payerId, now(), paymentId),
    )
    return transactionId


def cancelPayment(cursor, nonce):
    """A buyer cancelled at PayPal: a payment still waiting becomes C{cancelled}."""
    payment = _payment(cursor, "p.nonce = ?", (nonce,))
    if payment is not None and payment.state == "created":
        setPaymentState(cursor, payment.id, "cancelled", "cancelled by the buyer",
                        fromState="created")
        payment = attr.evolve(payment, state="cancelled")
    return payment


def expirePayments(cursor, before):
    """Mark the payments created before C{before} (ISO time) and never returned expired."""
    cursor.execute(
        "UPDATE paypal_payments SET state = 'expired', updated = ?,"
        " reason = 'not approved at PayPal within a day'"
        " WHERE state = 'created' AND created < ?",
        (now(), before),
    )
    return cursor.rowcount


def pendingPayments(cursor, accountId, limit=10):
    """An account's L{Payment}s that are not credited, cancelled or refused yet."""
    return _payments(
        cursor, " WHERE p.account_id = ? AND p.state IN"
        " ('created', 'executing', 'check', 'mismatch') ORDER BY p.id DESC LIMIT ?",
        (accountId, limit))


def listPayments(cursor, limit=1000):
    """The market's L{Payment}s, newest first (for the operator)."""
    return _payments(cursor, " ORDER BY p.id DESC LIMIT ?", (limit,))


def recoverInterruptedPayments(cursor):
    """
    At start: payments left C{executing} go back to C{created} (a return
    retries them; PayPal refuses a second execution, and the ledger a
    second credit).  Returns how many.
    """
    cursor.execute(
        "UPDATE paypal_payments SET state = 'created', updated = ?,"
        " reason = 'the server stopped while completing it' WHERE state = 'executing'",
        (now(),))
    return cursor.rowcount


# A return that claims no payment: (logged, HTTP status, page title, page text).
_NOT_CLAIMED = {
    "unknown": (", which this market did not create", 404, "Unknown payment",
                "This market created no payment {payment}."),
    "forged": (" with the wrong nonce: forged", 400, "Not this market's link",
               "This link does not match payment {payment}: it is not the one PayPal "
               "was given."),
}


class Funds:
    """
    Adding funds with PayPal.  C{paypal} is an L{IPayPal} (None: this
    market takes no payments); C{commission} is in millionths of the whole
    (see L{parsePercent}); C{publicUrl} is where buyers' browsers reach the
    web endpoint (set by the web service once it listens, unless given).
    """

    log = Logger()

    def __init__(self, store, paypal=None, currency="USD", commission=0, publicUrl=None):
        self.store = store
        self.paypal = paypal
        self.currency = currency
        self.commission = commission
        self.publicUrl = publicUrl
        # Called with the account id when funds were credited (the market
        # places the VMs that waited for them).
        self.onCredited = lambda accountId: None

    def requirePayPal(self):
        """Raise L{commands.NoPayments} unless PayPal and the web endpoint are up."""
        if self.paypal is None:
            raise commands.NoPayments(NO_PAYMENTS)
        if self.publicUrl is None:
            raise commands.NoPayments("this market's web endpoint is not up yet; try again")

    def checkDeposit(self, amount):
        cur = self.currency
        if amount <= 0:
            raise commands.BadRequest(f"the amount must be positive, not {formatAmount(amount)}")
        if amount % CENT:
            raise commands.BadRequest(
                f"{formatAmount(amount)} has a fraction of a cent: PayPal takes whole cents")
        if amount < DEPOSIT_MINIMUM:
            raise commands.BadRequest(
                f"{formatAmount(amount)} {cur} is less than the smallest payment, "
                f"{formatAmount(DEPOSIT_MINIMUM)} {cur}")
        if amount > DEPOSIT_MAXIMUM:
            raise commands.BadRequest(
                f"{formatAmount(amount)} {cur} is more than one payment may be, "
                f"{formatAmount(DEPOSIT_MAXIMUM)} {cur}")

    async def addFunds(self, account, amount):
        """Create a PayPal payment for C{amount}; returns what the buyer is shown."""
        self.requirePayPal()
        self.checkDeposit(amount)
        commission = commissionOn(amount, self.commission)
        nonce = secrets.token_urlsafe(24)
        query = urlencode({"n": nonce})
        base = self.publicUrl.rstrip("/")
        description = (f"CPUShare funds for account {account.name}: "
                       f"{formatAmount(amount - commission)} after the market's commission")
        try:
            paypalId, approvalUrl = await self.paypal.createPayment(
                amount, self.currency, f"{base}/paypal/return?{query}",
                f"{base}/paypal/cancel?{query}", description)
        except PayPalError as e:
            self.log.warn("PayPal did not create a payment for {name}: {error}",
                          name=account.name, error=str(e))
            raise commands.PayPalFailed(
                f"PayPal did not create the payment: {e.message}; nothing was charged")
        if not _PAYPAL_ID.match(paypalId):
            raise commands.PayPalFailed(f"PayPal answered with an odd payment id {paypalId!r}")
        await self.store.run(recordPayment, account.id, paypalId, nonce, amount,
                             commission, self.currency)
        self.log.info(
            "account {name} created PayPal payment {payment}: {gross} {currency}, "
            "commission {commission}",
            name=account.name, payment=paypalId, gross=formatAmount(amount),
            currency=self.currency, commission=formatAmount(commission))
        return {
            "payment": paypalId, "approval_url": approvalUrl, "gross": amount,
            "commission": commission, "net": amount - commission,
            "currency": self.currency, "commission_percent": formatPercent(self.commission),
        }

    async def paymentReturned(self, paypalId, payerId, nonce):
        """PayPal sent a buyer back: execute and credit, at most once.  Returns an L{Outcome}."""
        if self.paypal is None:
            return Outcome(404, "No payments here", NO_PAYMENTS.capitalize() + ".")
        if not paypalId or not payerId or not nonce:
            missing = [n for n, v in (("paymentId", paypalId), ("PayerID", payerId),
                                      ("n", nonce)) if not v]
            return Outcome(400, "Not a return from PayPal",
                           f"This link lacks {', '.join(missing)}: it is not a return from "
                           "PayPal.  Nothing was added to any funds.")
        if not _PAYPAL_ID.match(paypalId) or not _PAYPAL_ID.match(payerId) or len(nonce) > 128:
            return Outcome(400, "Not a return from PayPal",
                           "This link's payment or payer does not look like PayPal's.  "
                           "Nothing was added to any funds.")
        payment, status = await self.store.run(claimPayment, paypalId, nonce)
        if status in _NOT_CLAIMED:
            logged, code, title, text = _NOT_CLAIMED[status]
            self.log.warn("a return for payment {payment}" + logged, payment=paypalId)
            return Outcome(code, title, text.format(payment=paypalId)
                           + "  Nothing was added to any funds.")
        if status != "claimed":
            return self._stateOutcome(payment, status)
        return await self._execute(payment, payerId)

    def _stateOutcome(self, payment, state):
        gross = f"{formatAmount(payment.gross)} {payment.currency}"
        net = formatAmount(payment.net)
        if state == "credited":
            return Outcome(200, "Already added",
                           f"This payment of {gross} was already completed on "
                           f"{payment.updated}: {net} was added to the funds of "
                           f"{payment.account} then.  Nothing more was charged or added.")
        if state == "executing":
            return Outcome(409, "Being completed",
                           f"Payment {payment.paypal_id} is being completed right now.  "
                           "Reload this page in a moment to see how it ended.")
        if state == "expired":
            return Outcome(409, "Payment expired",
                           f"The payment of {gross} was not completed within a day and has "
                           "expired; nothing was charged or added.  Start again with "
                           "'cpushare funds add'.")
        if state == "cancelled":
            return Outcome(409, "Payment cancelled",
                           f"The payment of {gross} was cancelled; nothing was charged or "
                           "added.  Start again with 'cpushare funds add'.")
        return Outcome(409, "Waiting for the operator",
                       f"Payment {payment.paypal_id} needs the market operator's attention"
                       f" ({payment.reason or state}); nothing was added yet.")

    async def _execute(self, payment, payerId):
        paypalId = payment.paypal_id
        try:
            executed = await self.paypal.executePayment(paypalId, payerId)
        except PayPalError as e:
            if e.name == "PAYMENT_ALREADY_DONE":
                await self.store.run(setPaymentState, payment.id, "check", str(e))
                self.log.error(
                    "PayPal says payment {payment} of {name} was already completed, but this "
                    "market has not credited it: check it at PayPal, then "
                    "'cpushare-admin credit-payment {payment}'",
                    payment=paypalId, name=payment.account)
                return Outcome(409, "Waiting for the operator",
                               "PayPal says this payment was already completed, but this "
                               "market has not added it to your funds yet.  The operator "
                               "has been told and will add it by hand.")
            await self.store.run(setPaymentState, payment.id, "created", str(e))
            self.log.warn("PayPal did not complete payment {payment} of {name}: {error}",
                          payment=paypalId, name=payment.account, error=str(e))
            if e.definite:
                return Outcome(402, "Not paid",
                               f"PayPal did not complete the payment: {e.message}.  Nothing "
                               "was charged or added to your funds.")
            return Outcome(502, "PayPal did not answer",
                           f"PayPal could not be asked to complete the payment ({e.message}). "
                           " Nothing was added to your funds yet: reload this page to try "
                           "again.")
        except BaseException:
            await self.store.run(setPaymentState, payment.id, "created", "internal error")
            raise
        problem = self._mismatch(payment, executed)
        if problem is not None:
            state = "check" if problem.startswith("PayPal holds") else "mismatch"
            await self.store.run(setPaymentState, payment.id, state, problem)
            self.log.error("payment {payment} of {name} was not credited: {problem}",
                           payment=paypalId, name=payment.account, problem=problem)
            return Outcome(409, "Not added",
                           f"{problem}.  Nothing was added to your funds; the market's "
                           "operator has been told.")
        try:
            await self.store.run(creditPayment, payment.id, executed.payerId or payerId)
        except ledger.AlreadyPosted:
            return self._stateOutcome(payment, "credited")
        self.onCredited(payment.account_id)
        gross = f"{formatAmount(payment.gross)} {payment.currency}"
        net = formatAmount(payment.net)
        self.log.info("credited PayPal payment {payment}: {gross} paid, {net} to the funds "
                      "of {name}", payment=paypalId, gross=gross, net=net,
                      name=payment.account)
        return Outcome(
            200, "Funds added",
            f"{gross} paid, {net} added to your CPUShare funds (account "
            f"{payment.account}; the market's commission was "
            f"{formatAmount(payment.commission)}).",
            credited=True)

    def _mismatch(self, payment, executed):
        """Why PayPal's answer is not the payment this market created, or None."""
        asked = f"{formatAmount(payment.gross)} {payment.currency}"
        if executed.paymentId != payment.paypal_id:
            return (f"PayPal answered about payment {executed.paymentId!r} instead of "
                    f"{payment.paypal_id}")
        if executed.amount != payment.gross or executed.currency != payment.currency:
            paid = ("an amount it did not state" if executed.amount is None
                    else f"{formatAmount(executed.amount)} {executed.currency}")
            return f"PayPal reports {paid} paid, but this payment was created for {asked}"
        if executed.state != "approved":
            return f"PayPal reports the payment {executed.state!r}, not approved"
        if executed.saleState != "completed":
            return (f"PayPal holds the sale as {executed.saleState or 'unstated'}, not "
                    "completed")
        return None

    async def paymentCancelled(self, nonce):
        if self.paypal is None:
            return Outcome(404, "No payments here", NO_PAYMENTS.capitalize() + ".")
        if not nonce or len(nonce) > 128:
            return Outcome(400, "Not a link of this market",
                           "This link names no payment.  Nothing was charged or added.")
        payment = await self.store.run(cancelPayment, nonce)
        if payment is None:
            return Outcome(404, "Unknown payment",
                           "This market created no payment with this link.  Nothing was "
                           "charged or added.")
        if payment.state == "cancelled":
            self.log.info("payment {payment} of {name} cancelled at PayPal",
                          payment=payment.paypal_id, name=payment.account)
            return Outcome(200, "Payment cancelled",
                           f"You cancelled the payment of {formatAmount(payment.gross)} "
                           f"{payment.currency}: nothing was charged or added to your "
                           "funds.")
        return self._stateOutcome(payment, payment.state)

    async def expireUnapproved(self, seconds):
        """Mark the payments never approved within L{PAYMENT_LIFETIME} of C{seconds} expired."""
        cutoff = datetime.datetime.fromtimestamp(
            seconds - PAYMENT_LIFETIME, datetime.timezone.utc)
        expired = await self.store.run(expirePayments, cutoff.isoformat(timespec="seconds"))
        if expired:
            self.log.info("{n} payments never approved at PayPal expired", n=expired)
