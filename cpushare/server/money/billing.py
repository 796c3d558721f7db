"""
Billing: each VM pays for the CPU time it really used, at the price of the
lease it runs under, and for the network traffic the market counted.

The buyer's money is held ahead.  When a VM is placed, a window of
C{window} seconds at full tilt (price x cores x window) is moved from the
buyer's funds to its held funds, and the VM is only started once that
hold is made.  Every C{interval} seconds each lease is billed:

 - its wall time starts when the VM first showed life (its first frame
   reached the buyer's network or its console printed: C{live_since});
   a VM that never shows life is never charged, whatever its seller says;
 - its CPU seconds are those the seller reported, never more than the
   lease's wall time times its cores, and never fewer than already billed;
 - its cost so far is CPU seconds x price / 3600 plus bytes x fee / 10^9
   (the bytes the relay delivered, never those it dropped), rounded down
   to the micro-unit; what was not charged yet moves from held funds to
   the seller's earnings, and never more than is held: no charge passes
   the funds held for the lease, so none passes the buyer's funds or the
   order's budget.  A lease of a replicated order whose verdict is
   pending is charged to its seller's pending account instead, until
   L{cpushare.server.money.escrow.decide} pays or returns it; one whose
   result was rejected is charged nothing more (its CPU seconds and bytes
   are still recorded);
 - the hold is topped up to a whole window again from the buyer's funds,
   within the order's budget;
 - the lease's network allowance (L{netLimit}) is set again: the bytes it
   may carry before the hold, less one interval of CPU at full tilt, is
   spent.  The relay drops the frames past it and the VM is stopped.

A trusted lease (one of an order placed with --trusted) is billed the
same way, but its wall time ends at its last good TPM quote
(C{attested}): a lease whose attestation fails is never charged past the
quote before, and the operator's trusted commission (C{commission_ppm})
goes from each of its charges to the market's commission account in the
charge's own transaction.

When the buyer's funds (or the order's budget) can no longer hold one
billing interval at full tilt, the VM is stopped with a notice: it never
runs on credit, and because one interval at full tilt is always held, the
seller is paid for every CPU second it gave.  When a lease ends, a last
bill is made with the CPU seconds the seller reported last and what is
still held goes back to the buyer's funds.

Every bill is one store transaction that updates the lease and posts its
ledger transactions together, so a server killed at any point charges a
lease neither twice nor never: the next bill starts from what the
database says was charged.

The SQL of the leases is in L{cpushare.server.db.leases}; here is what
a lease may hold and cost.
"""

import attr
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface

from cpushare.money import cost, formatAmount
from cpushare.server.db import leases as leasesql
from cpushare.server.db import marketsql
from cpushare.server.money import ledger
from cpushare.server.money import escrow
from cpushare.server.money.escrow import PENDING_VERDICT, REJECTED
from cpushare.server.money.ledger import COMMISSION, EARNINGS, FUNDS, HELD, PENDING

INTERVAL = 60.0
# Bills a tick has waiting for the store at once.
IN_FLIGHT = 64
WINDOW = 600.0
# Traffic held for per window when a seller charges for it, in bytes.
NET_ALLOWANCE = 10**9


def netLimit(price, netFee, cores, held, netBytes, interval=INTERVAL):
    """
    The total bytes a lease may have carried before its next bill: those
    billed (C{netBytes}) and as many more as its hold pays for at C{netFee},
    keeping one interval of CPU at full tilt for the seller.  None when
    traffic is free.
    """
    if netFee <= 0:
        return None
    spare = held - windowCost(price, 0, cores, interval)
    return netBytes + max(0, spare) * 10**9 // netFee


class CannotFund(Exception):
    """The buyer's funds or the order's budget cannot hold a lease: the reason."""


def windowCost(price, netFee, cores, seconds):
    """What a lease can cost at most in C{seconds}: full tilt, plus the traffic allowance."""
    return price * cores * int(seconds * 1000) // 3_600_000 + \
        netFee * NET_ALLOWANCE * int(seconds * 1000) // (int(WINDOW * 1000) * 10**9)


def _budgetLeft(cursor, orderId):
    """What the order may still hold or spend, or None when it has no budget."""
    budget = marketsql.orderBudget(cursor, orderId)
    if budget is None:
        return None
    charged, held = leasesql.orderTotals(cursor, orderId)
    return max(0, int(budget) - charged - held)


def _hold(cursor, lease, amount):
    """Move C{amount} of the buyer's funds to held for C{lease} (a L{Lease}, updated)."""
    lease.held += amount
    lease.heldTotal += amount
    ledger.post(
        cursor, "hold", f"held for VM {lease.vm} (lease {lease.id})",
        [(FUNDS, lease.buyer, -amount), (HELD, lease.buyer, amount)],
        reference=f"lease:{lease.id}:held:{lease.heldTotal}")


def _topUp(cursor, lease, interval, window):
    """
    Hold up to a whole window again; returns why the lease cannot go on
    (its funds or budget do not hold one more interval), or None.
    """
    target = windowCost(lease.price, lease.netFee, lease.cores, window)
    least = windowCost(lease.price, 0, lease.cores, interval)
    want = target - lease.held
    budget = _budgetLeft(cursor, lease.order)
    funds = ledger.balance(cursor, FUNDS, lease.buyer)
    take = max(0, min(want, funds, want if budget is None else budget))
    if take > 0:
        _hold(cursor, lease, take)
    if lease.held >= least:
        return None
    if budget is not None and budget < want and budget < funds:
        return "the order's budget is spent"
    return ("the buyer's funds ran out; add funds with 'cpushare funds add'"
            f" (this VM needs {formatAmount(least - lease.held)} more)")


def openLease(cursor, vmId, orderId, buyerId, sellerId, sellerName, price, netFee, cores,
              started, interval=INTERVAL, window=WINDOW, verdict=None, trusted=False,
              commissionPpm=0):
    """
    Create a lease and hold its first window; returns its id.  Raises
    CannotFund (and nothing is kept) when the buyer's funds or the order's
    budget do not hold one interval.  C{verdict} 'pending': its earnings
    wait for its replica group's verdict.  C{trusted}: a trusted lease,
    billed up to its last good quote, C{commissionPpm} of its charges
    going to the market (L{bill}).
    """
    leaseId = leasesql.insert(cursor, vmId, orderId, buyerId, sellerId, price, netFee, cores,
                              started, verdict, trusted, commissionPpm)
    lease = leasesql.Lease(
        id=leaseId, vm=vmId, order=orderId, buyer=buyerId, seller=sellerId,
        sellerName=sellerName, price=price, netFee=netFee, cores=cores, started=started,
        ended=None, cpuSeconds=0.0, netBytes=0, charged=0, held=0, heldTotal=0, settled=0,
        liveSince=None, verdict=verdict)
    why = _topUp(cursor, lease, interval, window)
    if why is not None:
        raise CannotFund(why)
    leasesql.setHeld(cursor, lease.id, lease.held, lease.heldTotal)
    return lease.id


def leaseNetLimit(cursor, leaseId, interval=INTERVAL):
    """L{netLimit} of a lease as stored now (for a lease just opened)."""
    price, netFee, cores, held, netBytes = leasesql.figures(cursor, leaseId)
    return netLimit(price, netFee, cores, held, netBytes, interval)


def openLeaseStates(cursor, interval=INTERVAL):
    """
    {lease id: (live_since, L{netLimit}, net bytes, net fee)} of the leases
    not ended, for a restarting server.
    """
    return {leaseId: (alive, netLimit(price, fee, cores, held, nbytes, interval), nbytes, fee)
            for leaseId, alive, price, fee, cores, held, nbytes in leasesql.openFigures(cursor)}


@attr.s(frozen=True, slots=True)
class Bill:
    """What one bill of a lease did, in micro-units."""

    charged: int = attr.ib()        # charged by this bill
    held: int = attr.ib()           # still held for the lease after it
    stop = attr.ib()                # why the VM must stop, or None
    settled: bool = attr.ib()       # the lease is settled: nothing more to bill
    netLimit = attr.ib()            # the lease's L{netLimit}: bytes its hold pays for


def bill(cursor, leaseId, cpuSeconds, netBytes, now, final=False, interval=INTERVAL,
         window=WINDOW, reason=None):
    """
    Bill one lease up to C{now}; with C{final}, settle it: the lease ends
    at C{now} (unless it ended before) for C{reason}, the last charge is
    made, and what is still held goes back to the buyer.  Returns the
    L{Bill}.
    """
    lease = leasesql.load(cursor, leaseId)
    if lease is None:
        raise KeyError(f"no lease {leaseId}")
    if lease.settled:
        return Bill(charged=0, held=0, stop=None, settled=True, netLimit=0)
    if final and lease.ended is None:
        lease.ended = now
        leasesql.endLease(cursor, leaseId, now, reason)
    end = lease.ended if lease.ended is not None else now
    if lease.trusted:
        # Fail closed: a trusted lease is charged only up to its last good quote.
        end = min(end, lease.started if lease.attested is None else lease.attested)
    if lease.liveSince is None:
        # It never showed life: nothing it did is charged.
        wall, cpuSeconds, netBytes = 0.0, 0.0, 0
    else:
        wall = max(0.0, end - max(lease.started, lease.liveSince))
    cpu = max(float(lease.cpuSeconds), min(float(cpuSeconds), wall * lease.cores))
    traffic = max(lease.netBytes, int(netBytes))
    due = cost(lease.price, lease.netFee, cpu, traffic) - lease.charged
    paid = 0
    stop = None
    if due > 0 and lease.verdict != REJECTED:
        # Never more than is held for the lease: its hold is all the buyer
        # agreed to pay for it so far.
        paid = min(due, lease.held)
        if paid < due:
            stop = ("the funds held for this VM are spent"
                    f" ({formatAmount(due - paid)} of its use was not charged)")
        if paid > 0:
            lease.charged += paid
            lease.held -= paid
            # The operator's trusted commission, in the bill's own transaction.
            commission = paid * lease.commissionPpm // 1_000_000
            to, waits = EARNINGS, ""
            if lease.verdict == PENDING_VERDICT:
                to, waits = PENDING, ", awaiting its replica group's verdict"
                lease.pending += paid - commission
            ledger.post(
                cursor, "charge",
                f"VM {lease.vm} on {lease.sellerName} (lease {lease.id}):"
                f" {cpu:.1f} CPU s, {traffic} bytes{waits}",
                [(HELD, lease.buyer, -paid), (to, lease.seller, paid - commission),
                 (COMMISSION, None, commission)],
                reference=f"lease:{lease.id}:charged:{lease.charged}")
    if final:
        if lease.held > 0:
            ledger.post(
                cursor, "release", f"released from VM {lease.vm} (lease {lease.id})",
                [(HELD, lease.buyer, -lease.held), (FUNDS, lease.buyer, lease.held)],
                reference=f"lease:{lease.id}:released")
            lease.held = 0
        lease.settled = 1
    elif stop is None:
        stop = _topUp(cursor, lease, interval, window)
    lease.cpuSeconds, lease.netBytes = cpu, traffic
    leasesql.saveBill(cursor, lease)
    return Bill(charged=paid, held=lease.held, stop=stop, settled=bool(lease.settled),
                netLimit=netLimit(lease.price, lease.netFee, lease.cores, lease.held, traffic,
                                  interval))


def checkBooks(cursor):
    """
    L{ledger.books}, with the buyers whose held funds (C{held}) and the
    sellers whose pending earnings (C{pending}) differ from their leases'
    (what `cpushare-admin books` proves).
    """
    report = ledger.books(cursor)
    report["held"] = heldMismatch(cursor)
    report["pending"] = escrow.pendingMismatch(cursor)
    report["ok"] = report["ok"] and not report["held"] and not report["pending"]
    return report


def heldMismatch(cursor):
    """
    Buyers whose held funds differ from what their unsettled leases hold:
    [(account id, held balance, held by leases)]; empty when all agree.
    """
    byLeases = leasesql.heldByBuyer(cursor)
    cursor.execute("SELECT owner_id FROM ledger_accounts WHERE kind = ?", (HELD,))
    owners = {r[0] for r in cursor.fetchall()} | set(byLeases)
    out = []
    for owner in sorted(owners):
        held = ledger.balance(cursor, HELD, owner)
        if held != byLeases.get(owner, 0):
            out.append((owner, held, byLeases.get(owner, 0)))
    return out


class ILeases(Interface):
    """
    What billing asks of the service that runs the leases (the market's
    orders), and how it reports what a bill decided.  A lease is billed
    through its VM: an object with C{id}, C{leaseId} (None: no lease),
    C{active}, C{cpuSeconds} and C{netBytes()}.
    """

    def billable():
        """The VMs whose leases are billed now."""

    def outOfFunds(vm, why):
        """The funds held for C{vm}'s lease are spent and cannot be topped up: stop it."""

    def netLimitChanged(vm, limit):
        """A bill set the bytes C{vm}'s lease may carry in all (None: no limit)."""

    def retryFunding(buyerId=None):
        """A round of bills is over: funds may have come for the VMs that wait for them."""


class Billing:
    """Bills every running lease each C{interval} seconds; see the module."""

    log = Logger()

    def __init__(self, reactor, store, interval=INTERVAL, window=WINDOW):
        self.reactor = reactor
        self.store = store
        self.interval = interval
        self.window = window
        self.leases = None          # an ILeases, given by L{serve}
        self._loop = None
        self._running = None

    def serve(self, leases):
        """Bill the leases of C{leases} (an L{ILeases}) and report to it."""
        self.leases = leases

    async def settleLeftovers(self, keep):
        """
        At start: settle the leases left unsettled by the last run, except
        those of the VMs in C{keep} ({lease id}), which go on.
        """
        for leaseId, vmId, ended in await self.store.run(leasesql.unsettledLeases):
            if leaseId not in keep:
                await self.settle(leaseId, 0.0, 0, "the market server restarted", ended)

    def start(self):
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: self.log.failure("billing", f))

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._running

    async def billNow(self, vm):
        """Bill the lease of C{vm} now; its result (see L{bill}), or None if that failed."""
        leaseId = vm.leaseId
        try:
            return await self.store.run(
                bill, leaseId, vm.cpuSeconds, vm.netBytes(), self.reactor.seconds(),
                False, self.interval, self.window)
        except Exception:
            self.log.failure("billing lease {lease} of VM {vm}", lease=leaseId, vm=vm.id)
            return None

    async def _billOne(self, vm):
        leaseId = vm.leaseId
        result = await self.billNow(vm)
        if result is None or not vm.active or vm.leaseId != leaseId:
            return
        if result.stop is not None:
            self.leases.outOfFunds(vm, result.stop)
        else:
            self.leases.netLimitChanged(vm, result.netLimit)

    async def _tick(self):
        # Bills go to the store a few at a time, one transaction each: on
        # SQLite IN_FLIGHT of them share a commit; on PostgreSQL as many as
        # the store has connections (more would only conflict over the
        # same buyers' funds and be run again).
        store = self.store
        limit = defer.DeferredSemaphore(
            IN_FLIGHT if getattr(store, "groupCommit", False) else store.pool.max)
        bills = [limit.run(lambda vm=vm: defer.ensureDeferred(self._billOne(vm)))
                 for vm in list(self.leases.billable())
                 if vm.leaseId is not None and vm.active]
        await defer.gatherResults(bills)
        self.leases.retryFunding()

    def tick(self):
        """Bill every lease once; returns a Deferred (the LoopingCall waits for it)."""
        self._running = defer.ensureDeferred(self._tick())
        return self._running

    def settle(self, leaseId, cpuSeconds, netBytes, reason=None, ended=None):
        """The last bill of a lease that ended; fires with its result."""
        when = self.reactor.seconds() if ended is None else ended
        d = self.store.run(bill, leaseId, cpuSeconds, netBytes, when,
                                  True, self.interval, self.window, reason)
        d.addErrback(lambda f: self.log.failure("settling lease {lease}", f, lease=leaseId))
        return d
