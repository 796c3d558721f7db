"""
Money in and out: buyers add funds with PayPal, sellers take their
earnings out with PayPal Payouts; everyone sees balances and statements.

Adding funds (docs/buyer.md):

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

Payouts (docs/seller.md): C{Payout} moves the amount from the seller's
earnings to its payout account (C{payout:ID:request}) before PayPal is
asked, so it cannot be spent twice; PayPal's answer, polled by
L{PayoutPoller} until it is final, then either sends it out
(C{payout:ID:sent}, to the market's PayPal account) or returns it to the
earnings (C{payout:ID:returned}).

The commission is a percentage of the amount added, in millionths of the
whole (5% is 50000) so that no float is ever involved, rounded down to the
cent: in the buyer's favour.
"""

import datetime
import re
import secrets
from urllib.parse import urlencode

import attr
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from cpushare.money import CENT, MICRO, formatAmount
from cpushare.protocol import commands
from cpushare.server.money import ledger
from cpushare.server.money.ledger import COMMISSION, EARNINGS, FUNDS, PAYOUT, PAYPAL
from cpushare.server.money.paypal import PayPalError
from cpushare.server.db.store import now

# One deposit, and one payout, is at least DEPOSIT_MINIMUM and at most
# these: larger amounts are mistakes more often than money.
DEPOSIT_MINIMUM = 1 * MICRO
DEPOSIT_MAXIMUM = 10_000 * MICRO
PAYOUT_MAXIMUM = 10_000 * MICRO

# A percentage in millionths of the whole: 1% is 10000.
PERCENT = 10_000
WHOLE = 100 * PERCENT

STATEMENT_PAGE = 200
MAX_MEMO = 200

NO_PAYMENTS = ("this market takes no payments: its operator has not set up PayPal "
               "(twistd cpushare-server --paypal-client-id ...)")

_PERCENT = re.compile(r"^(\d{1,2})(?:\.(\d{1,4}))?$")
_PAYPAL_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_EMAIL = re.compile(r"^[^@\s<>\"']{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


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


def checkEmail(email):
    if len(email) > 254 or not _EMAIL.match(email):
        raise commands.BadRequest(f"{email!r} is not an email address")
    return email


@attr.s
class Outcome:
    """What a return from PayPal came to: an HTTP status and a page's text."""

    status = attr.ib()
    title = attr.ib()
    message = attr.ib()
    credited = attr.ib(default=False)


# -- SQL, run on the store's pool (Store.run) or directly by cpushare-admin

_PAYMENT_KEYS = ("id", "account_id", "paypal_id", "nonce", "gross", "commission",
                 "currency", "state", "payer_id", "reason", "created", "updated",
                 "account")


def _payment(cursor, where, args):
    cursor.execute(
        "SELECT p.id, p.account_id, p.paypal_id, p.nonce, p.gross, p.commission,"
        " p.currency, p.state, p.payer_id, p.reason, p.created, p.updated, a.name"
        " FROM paypal_payments p JOIN accounts a ON a.id = p.account_id WHERE " + where,
        args,
    )
    row = cursor.fetchone()
    return None if row is None else dict(zip(_PAYMENT_KEYS, row))


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
    executing.  Returns (payment or None, what happened): "claimed",
    "unknown" (this market created no such payment), "forged" (the nonce
    is not the payment's), or the state it is in.
    """
    payment = paymentByPayPalId(cursor, paypalId)
    if payment is None:
        return None, "unknown"
    if not secrets.compare_digest(payment["nonce"].encode(), nonce.encode()):
        return payment, "forged"
    if payment["state"] != "created":
        return payment, payment["state"]
    cursor.execute(
        "UPDATE paypal_payments SET state = 'executing', updated = ?"
        " WHERE id = ? AND state = 'created'",
        (now(), payment["id"]),
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
    net = payment["gross"] - payment["commission"]
    return (f"PayPal payment {payment['paypal_id']}: {formatAmount(payment['gross'])}"
            f" {payment['currency']} paid, commission {formatAmount(payment['commission'])},"
            f" {formatAmount(net)} added")


def creditPayment(cursor, paymentId, payerId, fromStates=("executing",)):
    """
    Credit a payment PayPal completed: the deposit in the ledger and the
    payment's state, in this one transaction.  Raises
    L{ledger.AlreadyPosted} when it was credited before (nothing changes).
    """
    payment = _payment(cursor, "p.id = ?", (paymentId,))
    if payment["state"] == "credited":
        raise ledger.AlreadyPosted(f"paypal-payment:{payment['paypal_id']}", None)
    if payment["state"] not in fromStates:
        raise ValueError(f"payment {payment['paypal_id']} is {payment['state']}, not "
                         + " or ".join(fromStates))
    gross, commission = payment["gross"], payment["commission"]
    transactionId = ledger.post(cursor, "deposit", depositMemo(payment), [
        (PAYPAL, None, -gross),
        (FUNDS, payment["account_id"], gross - commission),
        (COMMISSION, None, commission),
    ], reference=f"paypal-payment:{payment['paypal_id']}")
    cursor.execute(
        "UPDATE paypal_payments SET state = 'credited', payer_id = ?, reason = NULL,"
        " updated = ? WHERE id = ?",
        (payerId, now(), paymentId),
    )
    return transactionId


def cancelPayment(cursor, nonce):
    """A buyer cancelled at PayPal: a payment still waiting becomes C{cancelled}."""
    payment = _payment(cursor, "p.nonce = ?", (nonce,))
    if payment is not None and payment["state"] == "created":
        setPaymentState(cursor, payment["id"], "cancelled", "cancelled by the buyer",
                        fromState="created")
        payment["state"] = "cancelled"
    return payment


# PayPal lets a buyer approve a payment for about three hours; a payment
# not approved within a day (well past that) is marked expired.
PAYMENT_LIFETIME = 24 * 3600


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
    """An account's payments that are not credited, cancelled or refused yet."""
    cursor.execute(
        "SELECT paypal_id, gross, commission, currency, state, created FROM paypal_payments"
        " WHERE account_id = ? AND state IN ('created', 'executing', 'check', 'mismatch')"
        " ORDER BY id DESC LIMIT ?",
        (accountId, limit),
    )
    return [{"payment": r[0], "gross": r[1], "net": r[1] - r[2], "currency": r[3],
             "state": r[4], "created": r[5]} for r in cursor.fetchall()]


def listPayments(cursor, limit=1000):
    cursor.execute(
        "SELECT p.id, p.paypal_id, a.name, p.gross, p.commission, p.currency, p.state,"
        " p.reason, p.created, p.updated FROM paypal_payments p"
        " JOIN accounts a ON a.id = p.account_id ORDER BY p.id DESC LIMIT ?",
        (limit,),
    )
    keys = ("id", "paypal_id", "account", "gross", "commission", "currency", "state",
            "reason", "created", "updated")
    return [dict(zip(keys, r)) for r in cursor.fetchall()]


def recoverInterrupted(cursor):
    """
    At start: payments left C{executing} go back to C{created} (a return
    retries them; PayPal refuses a second execution, and the ledger a
    second credit), and payouts left C{requested} before PayPal answered
    become C{unknown}, for the operator.  Returns how many of each.
    """
    stamp = now()
    cursor.execute(
        "UPDATE paypal_payments SET state = 'created', updated = ?,"
        " reason = 'the server stopped while completing it' WHERE state = 'executing'",
        (stamp,))
    payments = cursor.rowcount
    cursor.execute(
        "UPDATE paypal_payouts SET state = 'unknown', updated = ?,"
        " reason = 'the server stopped before PayPal answered' WHERE state = 'requested'",
        (stamp,))
    return payments, cursor.rowcount


def paymentCurrencies(cursor):
    cursor.execute("SELECT DISTINCT currency FROM paypal_payments")
    found = {r[0] for r in cursor.fetchall()}
    cursor.execute("SELECT DISTINCT currency FROM paypal_payouts")
    return found | {r[0] for r in cursor.fetchall()}


# -- payouts

_PAYOUT_KEYS = ("id", "account_id", "email", "amount", "currency", "sender_batch_id",
                "batch_id", "state", "paypal_status", "reason", "created", "updated")


def payout(cursor, payoutId):
    cursor.execute("SELECT " + ", ".join(_PAYOUT_KEYS) + " FROM paypal_payouts WHERE id = ?",
                   (payoutId,))
    row = cursor.fetchone()
    return None if row is None else dict(zip(_PAYOUT_KEYS, row))


def payoutEmail(cursor, accountId):
    cursor.execute("SELECT email FROM payout_addresses WHERE account_id = ?", (accountId,))
    row = cursor.fetchone()
    return None if row is None else row[0]


def startPayout(cursor, accountId, amount, email, minimum, currency):
    """
    Check a payout request and take the amount out of the earnings into the
    payout account; returns the payout as a dict.  C{amount} None is all
    the earnings (whole cents); C{email} None is the address used last
    time.  Refusals are L{commands.BadRequest} and change nothing.
    """
    if email is None:
        email = payoutEmail(cursor, accountId)
        if email is None:
            raise commands.BadRequest(
                "give the email address of your PayPal account with --email; "
                "it is remembered for your next payouts")
    else:
        checkEmail(email)
        cursor.execute(
            "INSERT INTO payout_addresses (account_id, email, updated) VALUES (?, ?, ?)"
            " ON CONFLICT (account_id) DO UPDATE SET email = excluded.email,"
            " updated = excluded.updated",
            (accountId, email, now()),
        )
    earnings = ledger.balance(cursor, EARNINGS, accountId)
    if amount is None:
        amount = earnings // CENT * CENT
        if amount == 0:
            raise commands.BadRequest(
                f"you have no earnings to pay out ({formatAmount(earnings)} {currency})")
    if amount <= 0:
        raise commands.BadRequest(f"the amount must be positive, not {formatAmount(amount)}")
    if amount % CENT:
        raise commands.BadRequest(
            f"{formatAmount(amount)} has a fraction of a cent: PayPal pays whole cents")
    if amount > PAYOUT_MAXIMUM:
        raise commands.BadRequest(
            f"{formatAmount(amount)} {currency} is more than one payout may be, "
            f"{formatAmount(PAYOUT_MAXIMUM)}")
    if amount > earnings:
        raise commands.BadRequest(
            f"you asked for {formatAmount(amount)} {currency} but your earnings are "
            f"{formatAmount(earnings)} {currency}")
    if amount < minimum:
        raise commands.BadRequest(
            f"{formatAmount(amount)} {currency} is below this market's payout minimum "
            f"of {formatAmount(minimum)} {currency}")
    stamp = now()
    sender = "cpushare-" + secrets.token_hex(12)
    cursor.execute(
        "INSERT INTO paypal_payouts (account_id, email, amount, currency, sender_batch_id,"
        " state, created, updated) VALUES (?, ?, ?, ?, ?, 'requested', ?, ?) RETURNING id",
        (accountId, email, amount, currency, sender, stamp, stamp),
    )
    payoutId = cursor.fetchone()[0]
    ledger.post(cursor, "payout", f"payout {payoutId} to {email} requested", [
        (EARNINGS, accountId, -amount),
        (PAYOUT, accountId, amount),
    ], reference=f"payout:{payoutId}:request")
    return payout(cursor, payoutId)


def payoutCreated(cursor, payoutId, batchId, status):
    cursor.execute(
        "UPDATE paypal_payouts SET batch_id = ?, paypal_status = ?, state = 'pending',"
        " updated = ? WHERE id = ? AND state = 'requested'",
        (batchId, status, now(), payoutId),
    )
    return cursor.rowcount == 1


def payoutUnknown(cursor, payoutId, reason):
    cursor.execute(
        "UPDATE paypal_payouts SET state = 'unknown', reason = ?, updated = ?"
        " WHERE id = ? AND state = 'requested'",
        (reason, now(), payoutId),
    )
    return cursor.rowcount == 1


def payoutStatusSeen(cursor, payoutId, status):
    cursor.execute(
        "UPDATE paypal_payouts SET paypal_status = ?, updated = ? WHERE id = ?"
        " AND state = 'pending' AND (paypal_status IS NULL OR paypal_status <> ?)",
        (status, now(), payoutId, status),
    )


SETTLEABLE = ("requested", "pending", "unknown")


def settlePayout(cursor, payoutId, outcome, status=None, reason=None, by="PayPal"):
    """
    Finish a payout: C{outcome} "sent" moves the money out to the market's
    PayPal account, "returned" back to the seller's earnings.  Returns
    False (and changes nothing) when the payout was already finished.
    """
    if outcome not in ("sent", "returned"):
        raise ValueError(f"a payout ends sent or returned, not {outcome!r}")
    p = payout(cursor, payoutId)
    if p is None:
        raise ValueError(f"there is no payout {payoutId}")
    if p["state"] not in SETTLEABLE:
        return False
    cursor.execute(
        "UPDATE paypal_payouts SET state = ?, paypal_status = COALESCE(?, paypal_status),"
        " reason = ?, updated = ? WHERE id = ? AND state = ?",
        (outcome, status, reason, now(), payoutId, p["state"]),
    )
    if cursor.rowcount != 1:
        return False
    account, amount = p["account_id"], p["amount"]
    if outcome == "sent":
        ledger.post(cursor, "payout", f"payout {payoutId} to {p['email']} sent by {by}", [
            (PAYOUT, account, -amount),
            (PAYPAL, None, amount),
        ], reference=f"payout:{payoutId}:sent")
    else:
        why = f": {reason}" if reason else ""
        ledger.post(cursor, "payout", f"payout {payoutId} returned to earnings{why}", [
            (PAYOUT, account, -amount),
            (EARNINGS, account, amount),
        ], reference=f"payout:{payoutId}:returned")
    return True


def pendingPayouts(cursor):
    cursor.execute("SELECT id, batch_id FROM paypal_payouts WHERE state = 'pending'"
                   " ORDER BY id")
    return cursor.fetchall()


def accountPayouts(cursor, accountId, limit=20):
    cursor.execute(
        "SELECT id, amount, email, state, paypal_status, reason, created, updated"
        " FROM paypal_payouts WHERE account_id = ? ORDER BY id DESC LIMIT ?",
        (accountId, limit),
    )
    keys = ("payout", "amount", "email", "state", "paypal_status", "reason", "created",
            "updated")
    return [{k: v for k, v in zip(keys, r) if v is not None} for r in cursor.fetchall()]


def listPayouts(cursor, limit=1000):
    cursor.execute(
        "SELECT p.id, a.name, p.email, p.amount, p.currency, p.state, p.batch_id,"
        " p.paypal_status, p.reason, p.created, p.updated FROM paypal_payouts p"
        " JOIN accounts a ON a.id = p.account_id ORDER BY p.id DESC LIMIT ?",
        (limit,),
    )
    keys = ("id", "account", "email", "amount", "currency", "state", "batch_id",
            "paypal_status", "reason", "created", "updated")
    return [dict(zip(keys, r)) for r in cursor.fetchall()]


# -- balances and statements


def statementPage(cursor, ownerId, before=None, limit=STATEMENT_PAGE):
    """
    The owner's ledger entries, newest first, older than entry C{before}
    (all when None), at most C{limit}; each with the balance of its
    account after it.  Returns (entries, more).
    """
    cursor.execute(
        "SELECT e.id, t.id, t.created, t.kind, t.memo, a.kind, e.amount, e.account_id"
        " FROM ledger_entries e"
        " JOIN ledger_accounts a ON a.id = e.account_id"
        " JOIN ledger_transactions t ON t.id = e.transaction_id"
        " WHERE a.owner_id = ? AND e.id < ? ORDER BY e.id DESC LIMIT ?",
        (ownerId, before if before is not None else 2**62, limit + 1),
    )
    rows = cursor.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    running = {}
    for entryId, _, _, _, _, _, _, accountId in rows:
        if accountId not in running:
            cursor.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries"
                " WHERE account_id = ? AND id <= ?",
                (accountId, entryId),
            )
            running[accountId] = int(cursor.fetchone()[0])
    entries = []
    for entryId, transactionId, created, kind, memo, account, amount, accountId in rows:
        entries.append({
            "entry": entryId, "transaction": transactionId, "time": created, "kind": kind,
            "memo": memo[:MAX_MEMO], "account": account, "amount": int(amount),
            "balance": running[accountId],
        })
        running[accountId] -= int(amount)
    return entries, more


def balanceSheet(cursor, accountId):
    result = ledger.balances(cursor, accountId)
    result["pending"] = pendingPayments(cursor, accountId)
    return result


def earningsSheet(cursor, accountId):
    result = ledger.balances(cursor, accountId)
    result["email"] = payoutEmail(cursor, accountId)
    result["payouts"] = accountPayouts(cursor, accountId)
    return result


class Funds(Service):
    """
    The market's money desk.  C{paypal} is an L{IPayPal} (None: this market
    takes no payments); C{commission} is in millionths of the whole (see
    L{parsePercent}); C{publicUrl} is where buyers' browsers reach the web
    endpoint (set by the web service once it listens, unless given).
    """

    log = Logger()

    def __init__(self, reactor, store, paypal=None, currency="USD", commission=0,
                 payoutMinimum=10 * MICRO, publicUrl=None, pollInterval=60.0):
        self.reactor = reactor
        self.store = store
        self.paypal = paypal
        self.currency = currency
        self.commission = commission
        self.payoutMinimum = payoutMinimum
        self.publicUrl = publicUrl
        self.pollInterval = pollInterval
        self.poller = None
        self._polling = None
        # Called with the account id when funds were credited (the market
        # places the VMs that waited for them).
        self.onCredited = lambda accountId: None

    def startService(self):
        Service.startService(self)
        if self.paypal is not None:
            self.paypal.start()

    def stopService(self):
        Service.stopService(self)
        if self.poller is not None and self.poller.running:
            self.poller.stop()
        d = self._polling or defer.succeed(None)

        def stopPayPal(_):
            if self.paypal is not None:
                self.paypal.stop()

        return d.addBoth(stopPayPal)

    async def open(self):
        """After the store is open: check the currency, start polling payouts."""
        if self.paypal is None:
            return
        used = await self.store.run(paymentCurrencies)
        other = sorted(used - {self.currency})
        if other:
            raise ValueError(
                f"this market's payments and payouts are in {', '.join(other)}, not "
                f"{self.currency}: start it with --currency {other[0]}")
        payments, payouts = await self.store.run(recoverInterrupted)
        if payments:
            self.log.warn("{n} payments were being completed when the server stopped: "
                          "their next return completes them", n=payments)
        if payouts:
            self.log.error("{n} payouts were being sent to PayPal when the server stopped: "
                           "check them at PayPal, then settle them with cpushare-admin "
                           "(see 'cpushare-admin payouts', state unknown)", n=payouts)
        self.poller = task.LoopingCall(self._poll)
        self.poller.clock = self.reactor
        self.poller.start(self.pollInterval, now=True)
        self.log.info(
            "taking payments with {paypal}: commission {commission}%, payouts from "
            "{minimum} {currency}",
            paypal=self.paypal, commission=formatPercent(self.commission),
            minimum=formatAmount(self.payoutMinimum), currency=self.currency)

    @property
    def takesPayments(self):
        return self.paypal is not None

    def _requirePayPal(self):
        if self.paypal is None:
            raise commands.NoPayments(NO_PAYMENTS)
        if self.publicUrl is None:
            raise commands.NoPayments("this market's web endpoint is not up yet; try again")

    # -- adding funds

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
        self._requirePayPal()
        self.checkDeposit(amount)
        commission = commissionOn(amount, self.commission)
        nonce = secrets.token_urlsafe(24)
        query = urlencode({"n": nonce})
        base = self.publicUrl.rstrip("/")
        description = (f"CPUShare funds for account {account['name']}: "
                       f"{formatAmount(amount - commission)} after the market's commission")
        try:
            paypalId, approvalUrl = await self.paypal.createPayment(
                amount, self.currency, f"{base}/paypal/return?{query}",
                f"{base}/paypal/cancel?{query}", description)
        except PayPalError as e:
            self.log.warn("PayPal did not create a payment for {name}: {error}",
                          name=account["name"], error=str(e))
            raise commands.PayPalFailed(
                f"PayPal did not create the payment: {e.message}; nothing was charged")
        if not _PAYPAL_ID.match(paypalId):
            raise commands.PayPalFailed(f"PayPal answered with an odd payment id {paypalId!r}")
        await self.store.run(recordPayment, account["id"], paypalId, nonce, amount,
                             commission, self.currency)
        self.log.info(
            "account {name} created PayPal payment {payment}: {gross} {currency}, "
            "commission {commission}",
            name=account["name"], payment=paypalId, gross=formatAmount(amount),
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
        if status == "unknown":
            self.log.warn("a return for payment {payment}, which this market did not create",
                          payment=paypalId)
            return Outcome(404, "Unknown payment",
                           f"This market created no payment {paypalId}.  Nothing was added "
                           "to any funds.")
        if status == "forged":
            self.log.warn("a return for payment {payment} with the wrong nonce: forged",
                          payment=paypalId)
            return Outcome(400, "Not this market's link",
                           f"This link does not match payment {paypalId}: it is not the one "
                           "PayPal was given.  Nothing was added to any funds.")
        if status != "claimed":
            return self._stateOutcome(payment, status)
        return await self._execute(payment, payerId)

    def _stateOutcome(self, payment, state):
        gross = f"{formatAmount(payment['gross'])} {payment['currency']}"
        net = formatAmount(payment["gross"] - payment["commission"])
        if state == "credited":
            return Outcome(200, "Already added",
                           f"This payment of {gross} was already completed on "
                           f"{payment['updated']}: {net} was added to the funds of "
                           f"{payment['account']} then.  Nothing more was charged or added.")
        if state == "executing":
            return Outcome(409, "Being completed",
                           f"Payment {payment['paypal_id']} is being completed right now.  "
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
                       f"Payment {payment['paypal_id']} needs the market operator's attention"
                       f" ({payment['reason'] or state}); nothing was added yet.")

    async def _execute(self, payment, payerId):
        paypalId = payment["paypal_id"]
        try:
            executed = await self.paypal.executePayment(paypalId, payerId)
        except PayPalError as e:
            if e.name == "PAYMENT_ALREADY_DONE":
                await self.store.run(setPaymentState, payment["id"], "check", str(e))
                self.log.error(
                    "PayPal says payment {payment} of {name} was already completed, but this "
                    "market has not credited it: check it at PayPal, then "
                    "'cpushare-admin credit-payment {payment}'",
                    payment=paypalId, name=payment["account"])
                return Outcome(409, "Waiting for the operator",
                               "PayPal says this payment was already completed, but this "
                               "market has not added it to your funds yet.  The operator "
                               "has been told and will add it by hand.")
            await self.store.run(setPaymentState, payment["id"], "created", str(e))
            self.log.warn("PayPal did not complete payment {payment} of {name}: {error}",
                          payment=paypalId, name=payment["account"], error=str(e))
            if e.definite:
                return Outcome(402, "Not paid",
                               f"PayPal did not complete the payment: {e.message}.  Nothing "
                               "was charged or added to your funds.")
            return Outcome(502, "PayPal did not answer",
                           f"PayPal could not be asked to complete the payment ({e.message}). "
                           " Nothing was added to your funds yet: reload this page to try "
                           "again.")
        except BaseException:
            await self.store.run(setPaymentState, payment["id"], "created", "internal error")
            raise
        problem = self._mismatch(payment, executed)
        if problem is not None:
            state = "check" if problem.startswith("PayPal holds") else "mismatch"
            await self.store.run(setPaymentState, payment["id"], state, problem)
            self.log.error("payment {payment} of {name} was not credited: {problem}",
                           payment=paypalId, name=payment["account"], problem=problem)
            return Outcome(409, "Not added",
                           f"{problem}.  Nothing was added to your funds; the market's "
                           "operator has been told.")
        try:
            await self.store.run(creditPayment, payment["id"], executed.payerId or payerId)
        except ledger.AlreadyPosted:
            return self._stateOutcome(payment, "credited")
        self.onCredited(payment["account_id"])
        gross = f"{formatAmount(payment['gross'])} {payment['currency']}"
        net = formatAmount(payment["gross"] - payment["commission"])
        self.log.info("credited PayPal payment {payment}: {gross} paid, {net} to the funds "
                      "of {name}", payment=paypalId, gross=gross, net=net,
                      name=payment["account"])
        return Outcome(
            200, "Funds added",
            f"{gross} paid, {net} added to your CPUShare funds (account "
            f"{payment['account']}; the market's commission was "
            f"{formatAmount(payment['commission'])}).",
            credited=True)

    def _mismatch(self, payment, executed):
        """Why PayPal's answer is not the payment this market created, or None."""
        asked = f"{formatAmount(payment['gross'])} {payment['currency']}"
        if executed.paymentId != payment["paypal_id"]:
            return (f"PayPal answered about payment {executed.paymentId!r} instead of "
                    f"{payment['paypal_id']}")
        if executed.amount != payment["gross"] or executed.currency != payment["currency"]:
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
        if payment["state"] == "cancelled":
            self.log.info("payment {payment} of {name} cancelled at PayPal",
                          payment=payment["paypal_id"], name=payment["account"])
            return Outcome(200, "Payment cancelled",
                           f"You cancelled the payment of {formatAmount(payment['gross'])} "
                           f"{payment['currency']}: nothing was charged or added to your "
                           "funds.")
        return self._stateOutcome(payment, payment["state"])

    # -- balances and statements

    def balance(self, account):
        return self.store.run(balanceSheet, account["id"])

    def statement(self, account, before=None):
        return self.store.run(statementPage, account["id"], before)

    def earnings(self, account):
        return self.store.run(earningsSheet, account["id"])

    # -- payouts

    async def requestPayout(self, account, amount=None, email=None):
        """Pay out earnings; returns the payout (a dict) as PayPal left it."""
        self._requirePayPal()
        p = await self.store.run(startPayout, account["id"], amount, email,
                                 self.payoutMinimum, self.currency)
        amountText = f"{formatAmount(p['amount'])} {p['currency']}"
        self.log.info("payout {id}: {amount} to {email} for {name}", id=p["id"],
                      amount=amountText, email=p["email"], name=account["name"])
        try:
            batchId, status = await self.paypal.createPayout(
                p["sender_batch_id"], p["email"], p["amount"], p["currency"],
                f"CPUShare earnings of account {account['name']}, payout {p['id']}")
        except PayPalError as e:
            if e.definite:
                await self.store.run(settlePayout, p["id"], "returned", e.name,
                                     f"PayPal refused it: {e.message}")
                self.log.warn("PayPal refused payout {id}: {error}; returned to earnings",
                              id=p["id"], error=str(e))
                raise commands.PayPalFailed(
                    f"PayPal refused the payout: {e.message}; the {amountText} is back in "
                    "your earnings")
            await self.store.run(payoutUnknown, p["id"], str(e))
            self.log.error(
                "payout {id}: PayPal's answer is unknown ({error}); check it at PayPal, "
                "then 'cpushare-admin payout-sent {id}' or 'payout-returned {id}'",
                id=p["id"], error=str(e))
            return await self.store.run(payout, p["id"])
        await self.store.run(payoutCreated, p["id"], batchId, status)
        self.log.info("payout {id}: PayPal batch {batch}, {status}", id=p["id"],
                      batch=batchId, status=status)
        if self.poller is not None and self.poller.running and self._polling is None:
            self.reactor.callLater(0, self.pollNow)
        return await self.store.run(payout, p["id"])

    def pollNow(self):
        """Ask PayPal about pending payouts now (once; the regular polling goes on)."""
        if self._polling is None:
            self._poll()

    def _poll(self):
        if self._polling is not None:
            return self._polling
        d = defer.ensureDeferred(self._pollOnce())
        d.addErrback(lambda f: self.log.failure("polling PayPal about payouts", f))

        def done(_):
            self._polling = None

        d.addBoth(done)
        if not d.called:
            self._polling = d
        return d

    async def _pollOnce(self):
        cutoff = datetime.datetime.fromtimestamp(
            self.reactor.seconds() - PAYMENT_LIFETIME, datetime.timezone.utc)
        expired = await self.store.run(expirePayments, cutoff.isoformat(timespec="seconds"))
        if expired:
            self.log.info("{n} payments never approved at PayPal expired", n=expired)
        for payoutId, batchId in await self.store.run(pendingPayouts):
            try:
                status = await self.paypal.payoutStatus(batchId)
            except PayPalError as e:
                self.log.warn("could not ask PayPal about payout {id} (batch {batch}): "
                              "{error}", id=payoutId, batch=batchId, error=str(e))
                continue
            seen = f"{status.batchStatus}/{status.itemStatus or '-'}"
            outcome = status.outcome
            if outcome is None:
                await self.store.run(payoutStatusSeen, payoutId, seen)
                continue
            reason = None
            if outcome == "failed":
                reason = f"PayPal says {seen}" + (f": {status.error}" if status.error else "")
            settled = await self.store.run(
                settlePayout, payoutId, "sent" if outcome == "sent" else "returned",
                seen, reason)
            if settled:
                self.log.info("payout {id}: {outcome} ({status})", id=payoutId,
                              outcome="sent" if outcome == "sent"
                              else "returned to earnings", status=seen)
