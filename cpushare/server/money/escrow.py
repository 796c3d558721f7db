"""
Escrow: the earnings of a replicated lease wait for its verdict.

While a lease's verdict is pending, billing moves what it charges from
the buyer's held funds to the seller's ledger account of kind pending
(L{cpushare.server.money.billing}) and counts it in the lease's
C{pending}.  When the lease's replica group is decided, L{decide} moves
all of it at once, in one balanced transaction with the reference
C{lease:ID:verdict}:

    accepted       pending -> the seller's earnings (paid)
    inconclusive   pending -> the seller's earnings (paid: no majority, so
                   nobody is found wrong; otherwise a buyer whose guest
                   writes random results would get CPU for free)
    unchecked      pending -> the seller's earnings (a VM of an order
                   replicated adaptively that ran once: not compared)
    rejected       pending -> the buyer's funds (returned: the result was
                   in its group's minority); later bills of the lease
                   charge nothing

A decided lease's later bills follow its verdict: paid to the earnings,
or nothing.  L{pendingMismatch} proves that each seller's pending account
holds what its leases say waits.

All functions take a DB-API cursor and run inside the store's transaction.
"""

import attr

from cpushare.money import formatAmount
from cpushare.server.db import leases as leasesql
from cpushare.server.money import ledger
from cpushare.server.money.ledger import EARNINGS, FUNDS, PENDING

PENDING_VERDICT = leasesql.PENDING_VERDICT
ACCEPTED, INCONCLUSIVE, REJECTED = "accepted", "inconclusive", "rejected"
# A VM of an adaptively replicated order that ran once: paid, not compared.
UNCHECKED = "unchecked"
VERDICTS = (ACCEPTED, INCONCLUSIVE, UNCHECKED, REJECTED)

# Why a verdict was given, and where the money that waited for it goes.
_MEMO = {
    ACCEPTED: ("its result agreed with its replica group's", "paid to the seller's earnings"),
    INCONCLUSIVE: ("its replica group reached no majority", "paid to the seller's earnings"),
    UNCHECKED: ("it ran once, not compared (adaptive replication)",
                "paid to the seller's earnings"),
    REJECTED: ("its result was in its replica group's minority",
               "returned to the buyer's funds"),
}


class CannotDecide(ValueError):
    """A verdict that cannot be given to a lease; the message says why."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Decided:
    """
    What L{decide} moved, in micro-units: C{amount} from the seller's
    pending account to its earnings (accepted, inconclusive, unchecked) or to the
    buyer's funds (rejected); 0 when nothing waited or when the same
    verdict was given before (C{replayed}).
    """

    lease: int
    vm: int
    verdict: str
    amount: int
    seller: int
    buyer: int
    replayed: bool = False


def decide(cursor, leaseId, verdict):
    """
    Give lease C{leaseId} its C{verdict} (accepted, inconclusive,
    unchecked or rejected) and move what its bills charged meanwhile; returns a
    L{Decided}.  Works for a lease still running and for a settled one.
    Giving the same verdict again moves nothing; L{CannotDecide} for a
    lease that does not exist, one that is not replicated, or one already
    decided otherwise.
    """
    if verdict not in VERDICTS:
        raise CannotDecide(f"a verdict is one of {', '.join(VERDICTS)}, not {verdict!r}")
    lease = leasesql.load(cursor, leaseId)
    if lease is None:
        raise CannotDecide(f"there is no lease {leaseId}")

    def decided(amount, replayed=False):
        return Decided(lease=lease.id, vm=lease.vm, verdict=verdict, amount=amount,
                       seller=lease.seller, buyer=lease.buyer, replayed=replayed)

    if lease.verdict is None:
        raise CannotDecide(
            f"lease {leaseId} is not of a replicated order: it has no verdict to give")
    if lease.verdict == verdict:
        return decided(0, replayed=True)
    if lease.verdict != PENDING_VERDICT:
        raise CannotDecide(
            f"lease {leaseId} was already {lease.verdict}; it cannot be {verdict} too")
    amount = lease.pending
    if amount:
        to = (FUNDS, lease.buyer) if verdict == REJECTED else (EARNINGS, lease.seller)
        ledger.post(
            cursor, "verdict",
            f"VM {lease.vm} on {lease.sellerName} (lease {lease.id}) {verdict},"
            f" {_MEMO[verdict][0]}: {formatAmount(amount)} {_MEMO[verdict][1]}",
            [(PENDING, lease.seller, -amount), (*to, amount)],
            reference=f"lease:{lease.id}:verdict")
    leasesql.setVerdict(cursor, lease.id, verdict)
    return decided(amount)


def pendingMismatch(cursor):
    """
    Sellers whose pending account differs from what their leases say
    waits for a verdict: [(account id, pending balance, pending by
    leases)]; empty when all agree.
    """
    byLeases = leasesql.pendingBySeller(cursor)
    cursor.execute("SELECT owner_id, balance FROM ledger_accounts WHERE kind = ?", (PENDING,))
    balances = {owner: int(amount) for owner, amount in cursor.fetchall()}
    return [(owner, balances.get(owner, 0), byLeases.get(owner, 0))
            for owner in sorted(set(balances) | set(byLeases))
            if balances.get(owner, 0) != byLeases.get(owner, 0)]
