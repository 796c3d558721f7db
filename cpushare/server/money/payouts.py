"""
Payouts (docs/seller.md): a seller takes its earnings out with PayPal
Payouts.

C{Payout} moves the amount from the seller's earnings to its payout
account (C{payout:ID:request}) before PayPal is asked, so it cannot be
spent twice; PayPal's answer, polled by L{Payouts} until it is final, then
either sends it out (C{payout:ID:sent}, to the market's PayPal account)
or returns it to the earnings (C{payout:ID:returned}).  A payout whose
answer was lost waits in state C{unknown} for the operator, who settles it
with cpushare-admin (L{settlePayout}).
"""

import re
import secrets
from typing import Optional

import attr
from twisted.internet import defer, task
from twisted.logger import Logger

from cpushare.money import CENT, MICRO, formatAmount
from cpushare.protocol import commands
from cpushare.server.money import ledger
from cpushare.server.money.ledger import EARNINGS, PAYOUT, PAYPAL
from cpushare.server.money.paypal import PayPalError
from cpushare.server.money.rows import accountRows
from cpushare.server.db.store import now

# One payout is at most this: larger amounts are mistakes more often than money.
PAYOUT_MAXIMUM = 10_000 * MICRO

# The states a payout may still end from, sent or returned.
SETTLEABLE = ("requested", "pending", "unknown")

_EMAIL = re.compile(r"^[^@\s<>\"']{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


def checkEmail(email):
    if len(email) > 254 or not _EMAIL.match(email):
        raise commands.BadRequest(f"{email!r} is not an email address")
    return email


@attr.s(frozen=True, auto_attribs=True)
class Payout:
    """
    A payout of a seller's earnings, as its row stands: our id, the
    account's id and name (C{account}), the PayPal address, the amount
    (micro-units) and currency, our batch id and PayPal's, its state
    (requested, pending, sent, returned, unknown), PayPal's last word
    (BATCH/ITEM), the reason it was returned or waits, and when it was
    created and last changed.
    """

    id: int
    account_id: int
    email: str
    amount: int
    currency: str
    sender_batch_id: str
    batch_id: Optional[str]
    state: str
    paypal_status: Optional[str]
    reason: Optional[str]
    created: str
    updated: str
    account: str


# -- SQL, run on the store's pool (Store.run) or directly by cpushare-admin

def _payouts(cursor, rest, args):
    """The L{Payout}s that C{rest} (a WHERE, ORDER BY or LIMIT clause) selects."""
    return accountRows(cursor, Payout, "paypal_payouts", rest, args)


def payout(cursor, payoutId):
    """The L{Payout} C{payoutId}, or None."""
    found = _payouts(cursor, " WHERE p.id = ?", (payoutId,))
    return found[0] if found else None


def payoutEmail(cursor, accountId):
    cursor.execute("SELECT email FROM payout_addresses WHERE account_id = ?", (accountId,))
    row = cursor.fetchone()
    return None if row is None else row[0]


def startPayout(cursor, accountId, amount, email, minimum, currency):
    """
    Check a payout request and take the amount out of the earnings into the
    payout account; returns the L{Payout}.  C{amount} None is all the
    earnings (whole cents); C{email} None is the address used last time.
    Refusals are L{commands.BadRequest} and change nothing.
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
    if p.state not in SETTLEABLE:
        return False
    cursor.execute(
        "UPDATE paypal_payouts SET state = ?, paypal_status = COALESCE(?, paypal_status),"
        " reason = ?, updated = ? WHERE id = ? AND state = ?",
        (outcome, status, reason, now(), payoutId, p.state),
    )
    if cursor.rowcount != 1:
        return False
    account, amount = p.account_id, p.amount
    if outcome == "sent":
        ledger.post(cursor, "payout", f"payout {payoutId} to {p.email} sent by {by}", [
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
    """An account's most recent L{Payout}s, newest first."""
    return _payouts(cursor, " WHERE p.account_id = ? ORDER BY p.id DESC LIMIT ?",
                    (accountId, limit))


def openPayouts(cursor, limit=1000):
    """The L{Payout}s not settled yet (requested, pending, unknown), oldest first."""
    return _payouts(cursor, " WHERE p.state IN (" + ", ".join("?" * len(SETTLEABLE))
                    + ") ORDER BY p.id LIMIT ?", (*SETTLEABLE, limit))


def listPayouts(cursor, limit=1000):
    """The market's L{Payout}s, newest first (for the operator)."""
    return _payouts(cursor, " ORDER BY p.id DESC LIMIT ?", (limit,))


def recoverInterruptedPayouts(cursor):
    """
    At start: payouts left C{requested} before PayPal answered become
    C{unknown}, for the operator.  Returns how many.
    """
    cursor.execute(
        "UPDATE paypal_payouts SET state = 'unknown', updated = ?,"
        " reason = 'the server stopped before PayPal answered' WHERE state = 'requested'",
        (now(),))
    return cursor.rowcount


class Payouts:
    """
    Sellers' payouts with PayPal Payouts, and the polling of PayPal until
    each one is final.

    @param paypal: an L{IPayPal}, or None (this market takes no payments).
    @param minimum: the smallest payout, in micro-units.
    @param pollInterval: seconds between questions to PayPal about the
        payouts it has not finished.
    @param requirePayPal: called before a payout is taken; raises
        L{commands.NoPayments} while the market takes no payments
        (L{cpushare.server.money.funds.Funds.requirePayPal}).
    @param expirePayments: called with the reactor's time at the start of
        each poll, firing when done: the expiry of payments never approved
        rides the same timer
        (L{cpushare.server.money.funds.Funds.expireUnapproved}).
    """

    log = Logger()

    def __init__(self, reactor, store, paypal, currency, minimum, pollInterval,
                 requirePayPal, expirePayments):
        self.reactor = reactor
        self.store = store
        self.paypal = paypal
        self.currency = currency
        self.minimum = minimum
        self.pollInterval = pollInterval
        self.requirePayPal = requirePayPal
        self.expirePayments = expirePayments
        self.poller = None
        self._polling = None

    def startPolling(self):
        """Poll PayPal now, then every C{pollInterval} seconds."""
        self.poller = task.LoopingCall(self._poll)
        self.poller.clock = self.reactor
        self.poller.start(self.pollInterval, now=True)

    def stopPolling(self):
        """Stop polling; fires once a poll under way has ended."""
        if self.poller is not None and self.poller.running:
            self.poller.stop()
        return self._polling or defer.succeed(None)

    async def request(self, account, amount=None, email=None):
        """Pay out earnings; returns the L{Payout} as PayPal left it."""
        self.requirePayPal()
        p = await self.store.run(startPayout, account.id, amount, email,
                                 self.minimum, self.currency)
        amountText = f"{formatAmount(p.amount)} {p.currency}"
        self.log.info("payout {id}: {amount} to {email} for {name}", id=p.id,
                      amount=amountText, email=p.email, name=account.name)
        try:
            batchId, status = await self.paypal.createPayout(
                p.sender_batch_id, p.email, p.amount, p.currency,
                f"CPUShare earnings of account {account.name}, payout {p.id}")
        except PayPalError as e:
            if e.definite:
                await self.store.run(settlePayout, p.id, "returned", e.name,
                                     f"PayPal refused it: {e.message}")
                self.log.warn("PayPal refused payout {id}: {error}; returned to earnings",
                              id=p.id, error=str(e))
                raise commands.PayPalFailed(
                    f"PayPal refused the payout: {e.message}; the {amountText} is back in "
                    "your earnings")
            await self.store.run(payoutUnknown, p.id, str(e))
            self.log.error(
                "payout {id}: PayPal's answer is unknown ({error}); check it at PayPal, "
                "then 'cpushare-admin payout-sent {id}' or 'payout-returned {id}'",
                id=p.id, error=str(e))
            return await self.store.run(payout, p.id)
        await self.store.run(payoutCreated, p.id, batchId, status)
        self.log.info("payout {id}: PayPal batch {batch}, {status}", id=p.id,
                      batch=batchId, status=status)
        if self.poller is not None and self.poller.running and self._polling is None:
            self.reactor.callLater(0, self.pollNow)
        return await self.store.run(payout, p.id)

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
        await self.expirePayments(self.reactor.seconds())
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
