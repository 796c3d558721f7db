"""
The SQL of the leases: each stay of a VM on a seller, with the terms it
was placed at and what billing charged and holds for it.

Only SQL: what a lease may cost and hold is billing's
(L{cpushare.server.money.billing}), when one opens and ends the orders'
(L{cpushare.server.market.orders}).  Like those of
L{cpushare.server.db.store}, each function takes a DB-API cursor and runs
inside one store transaction.
"""

import attr

from cpushare.money import cpuCost, netCost
from cpushare.protocol.paging import clip

# A replicated lease's verdict until its replica group is decided.
PENDING_VERDICT = "pending"


@attr.s(slots=True)
class Lease:
    """
    One lease as billing reads and changes it: ids, the terms it was placed
    at, and (amounts in micro-units) what was charged and what is held.
    Times are seconds since the epoch.
    """

    id: int = attr.ib()
    vm: int = attr.ib()
    order: int = attr.ib()
    buyer: int = attr.ib()
    seller: int = attr.ib()
    sellerName: str = attr.ib()
    price: int = attr.ib(converter=int)
    netFee: int = attr.ib(converter=int)
    cores: int = attr.ib()
    started: float = attr.ib()
    ended: float = attr.ib()            # None while it runs
    cpuSeconds: float = attr.ib()
    netBytes: int = attr.ib(converter=int)
    charged: int = attr.ib(converter=int)
    held: int = attr.ib(converter=int)
    heldTotal: int = attr.ib(converter=int)
    settled: int = attr.ib()
    liveSince: float = attr.ib()        # None until its VM showed life
    # None when not replicated; else pending until its replica group is
    # decided, then accepted, inconclusive or rejected
    # (L{cpushare.server.money.escrow}).
    verdict: str = attr.ib(default=None)
    # What its bills charged that waits for its verdict (in its seller's
    # ledger account of kind pending).
    pending: int = attr.ib(default=0, converter=int)
    # A trusted lease is billed up to C{attested}, when its last quote
    # passed (None: none did); the operator's commission on its charges,
    # in parts per million, goes to the market.
    trusted: int = attr.ib(default=0)
    attested: float = attr.ib(default=None)
    commissionPpm: int = attr.ib(default=0, converter=int)


def insert(cursor, vmId, orderId, buyerId, sellerId, price, netFee, cores, started,
           verdict=None, trusted=False, commissionPpm=0):
    """
    A new lease, nothing held or charged yet; returns its id.  C{verdict}
    is L{cpushare.server.money.escrow.PENDING_VERDICT} for a lease of a
    replicated order (its earnings wait for its replica group's verdict),
    else None.  C{trusted}: a trusted lease, with the operator's
    commission C{commissionPpm} (parts per million of its charges).
    """
    cursor.execute(
        "INSERT INTO leases (vm_id, order_id, buyer_account_id, seller_account_id, price,"
        " net_fee, cores, started, verdict, trusted, commission_ppm)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (vmId, orderId, buyerId, sellerId, price, netFee, cores, started, verdict,
         int(bool(trusted)), commissionPpm))
    return cursor.fetchone()[0]


def setAttested(cursor, leaseId, when):
    """A quote of trusted lease C{leaseId} passed at C{when}: it may be billed up to then."""
    cursor.execute("UPDATE leases SET attested = ? WHERE id = ? AND (attested IS NULL"
                   " OR attested < ?)", (when, leaseId, when))


def setHeld(cursor, leaseId, held, heldTotal):
    cursor.execute("UPDATE leases SET held = ?, held_total = ? WHERE id = ?",
                   (held, heldTotal, leaseId))


def load(cursor, leaseId):
    """The lease as a L{Lease}, or None."""
    cursor.execute(
        "SELECT l.id, l.vm_id, l.order_id, l.buyer_account_id, l.seller_account_id, s.name,"
        " l.price, l.net_fee, l.cores, l.started, l.ended, l.cpu_seconds, l.net_bytes,"
        " l.charged, l.held, l.held_total, l.settled, l.live_since, l.verdict, l.pending,"
        " l.trusted, l.attested, l.commission_ppm"
        " FROM leases l JOIN accounts s ON s.id = l.seller_account_id WHERE l.id = ?",
        (leaseId,))
    row = cursor.fetchone()
    if row is None:
        return None
    return Lease(*row)


def saveBill(cursor, lease):
    """Store what a bill changed in C{lease} (a L{Lease})."""
    cursor.execute(
        "UPDATE leases SET cpu_seconds = ?, net_bytes = ?, charged = ?, held = ?,"
        " held_total = ?, settled = ?, verdict = ?, pending = ? WHERE id = ?",
        (lease.cpuSeconds, lease.netBytes, lease.charged, lease.held,
         lease.heldTotal, lease.settled, lease.verdict, lease.pending, lease.id))


def setVerdict(cursor, leaseId, verdict):
    """The lease's verdict is in: nothing of it waits any more."""
    cursor.execute("UPDATE leases SET verdict = ?, pending = 0 WHERE id = ?", (verdict, leaseId))


def figures(cursor, leaseId):
    """(price, net fee, cores, held, net bytes) of a lease, amounts as ints."""
    cursor.execute("SELECT price, net_fee, cores, held, net_bytes FROM leases WHERE id = ?",
                   (leaseId,))
    price, netFee, cores, held, netBytes = cursor.fetchone()
    return int(price), int(netFee), cores, int(held), int(netBytes)


def openFigures(cursor):
    """
    [(id, live_since, price, net fee, cores, held, net bytes)] of the leases
    not ended, amounts as ints.
    """
    cursor.execute("SELECT id, live_since, price, net_fee, cores, held, net_bytes FROM leases"
                   " WHERE ended IS NULL")
    return [(leaseId, alive, int(price), int(fee), cores, int(held), int(nbytes))
            for leaseId, alive, price, fee, cores, held, nbytes in cursor.fetchall()]


def openLeases(cursor):
    """{vm id: lease id} of the leases not ended, for a restarting server."""
    cursor.execute("SELECT id, vm_id FROM leases WHERE ended IS NULL")
    return {vmId: leaseId for leaseId, vmId in cursor.fetchall()}


def showedLife(cursor, leaseId, when):
    """The lease's VM showed life at C{when}: its billing starts (once)."""
    cursor.execute("UPDATE leases SET live_since = ? WHERE id = ? AND live_since IS NULL",
                   (when, leaseId))


def endLease(cursor, leaseId, ended, reason):
    """Mark a lease ended; its CPU seconds are billing's to set (capped there)."""
    cursor.execute(
        "UPDATE leases SET ended = ?, reason = ? WHERE id = ? AND ended IS NULL",
        (ended, reason, leaseId))


def unsettledLeases(cursor):
    """[(lease id, vm id, ended)] of the leases not settled yet."""
    cursor.execute("SELECT id, vm_id, ended FROM leases WHERE settled = 0 ORDER BY id")
    return cursor.fetchall()


def orderTotals(cursor, orderId):
    """
    (charged, held) summed over the order's leases; what rejected leases
    were charged went back to the buyer and does not count.
    """
    cursor.execute(
        "SELECT COALESCE(SUM(CASE WHEN verdict = 'rejected' THEN 0 ELSE charged END), 0),"
        " COALESCE(SUM(held), 0) FROM leases WHERE order_id = ?", (orderId,))
    charged, held = cursor.fetchone()
    return int(charged), int(held)


def heldByBuyer(cursor):
    """{buyer account id: what its leases hold}."""
    cursor.execute(
        "SELECT buyer_account_id, COALESCE(SUM(held), 0) FROM leases GROUP BY buyer_account_id")
    return {a: int(h) for a, h in cursor.fetchall()}


def pendingBySeller(cursor):
    """{seller account id: what its leases' bills charged that waits for their verdicts}."""
    cursor.execute(
        "SELECT seller_account_id, SUM(pending) FROM leases WHERE pending <> 0"
        " GROUP BY seller_account_id")
    return {a: int(p) for a, p in cursor.fetchall()}


def paidTo(cursor, sellerId):
    """{buyer account id: what it was charged over its leases on this seller}."""
    cursor.execute(
        "SELECT buyer_account_id, SUM(charged) FROM leases WHERE seller_account_id = ?"
        " GROUP BY buyer_account_id", (sellerId,))
    return {buyer: int(total) for buyer, total in cursor.fetchall()}


def parties(cursor, leaseId):
    """(buyer account id, seller account id, charged) of a lease, or None."""
    cursor.execute(
        "SELECT buyer_account_id, seller_account_id, charged FROM leases WHERE id = ?",
        (leaseId,))
    row = cursor.fetchone()
    return None if row is None else (row[0], row[1], int(row[2]))


LEASE_KEYS = ("lease", "vm", "order", "seller", "price", "net_fee", "cores", "started",
              "ended", "cpu_seconds", "net_bytes", "charged", "reason", "rating")


def accountLeases(cursor, accountId, before=None, limit=1000):
    """The leases of this account's VMs, newest first, older than lease C{before} if given."""
    cursor.execute(
        "SELECT l.id, l.vm_id, l.order_id, s.name, l.price, l.net_fee, l.cores, l.started,"
        " l.ended, l.cpu_seconds, l.net_bytes, l.charged, l.reason, r.good, l.held"
        " FROM leases l JOIN accounts s ON s.id = l.seller_account_id"
        " LEFT JOIN ratings r ON r.lease_id = l.id"
        " WHERE l.buyer_account_id = ? AND l.id < ? ORDER BY l.id DESC LIMIT ?",
        (accountId, 2**62 if before is None else before, limit))
    rows = []
    for *row, held in cursor.fetchall():
        entry = _listed(LEASE_KEYS, row)
        # The breakdown of what was charged: CPU time, then traffic (billing
        # rounds each down, so they may add up to a micro-unit less).
        entry["cpu_cost"] = cpuCost(entry["price"], entry["cpu_seconds"])
        entry["net_cost"] = netCost(entry["net_fee"], entry["net_bytes"])
        entry["held"] = int(held)
        rows.append(entry)
    return rows


def _listed(keys, row):
    """
    A lease's C{row} as a list shows it, a dict of C{keys}: amounts as ints,
    its rating good or bad (or None), its reason clipped.
    """
    entry = dict(zip(keys, row))
    for key in ("price", "net_fee", "net_bytes", "charged"):
        entry[key] = int(entry[key])
    entry["rating"] = None if entry["rating"] is None else (
        "good" if entry["rating"] else "bad")
    entry["reason"] = clip(entry["reason"])
    return entry


def pendingLeases(cursor, vmId):
    """[(lease id, seller account id, buyer account id)] of C{vmId}'s leases awaiting a verdict."""
    cursor.execute(
        "SELECT id, seller_account_id, buyer_account_id FROM leases"
        " WHERE vm_id = ? AND verdict = ? ORDER BY id", (vmId, PENDING_VERDICT))
    return [tuple(row) for row in cursor.fetchall()]


SELLER_LEASE_KEYS = ("lease", "vm", "price", "net_fee", "cores", "started", "ended",
                     "cpu_seconds", "net_bytes", "charged", "reason", "rating", "verdict")


def sellerLeases(cursor, sellerId, before=None, limit=1000):
    """
    The leases that ran on this account's sellers, newest first, older than
    lease C{before} if given.  Nothing about their buyers: not their names,
    orders or comments.
    """
    cursor.execute(
        "SELECT l.id, l.vm_id, l.price, l.net_fee, l.cores, l.started, l.ended,"
        " l.cpu_seconds, l.net_bytes, l.charged, l.reason, r.good, l.verdict"
        " FROM leases l LEFT JOIN ratings r ON r.lease_id = l.id"
        " WHERE l.seller_account_id = ? AND l.id < ? ORDER BY l.id DESC LIMIT ?",
        (sellerId, 2**62 if before is None else before, limit))
    return [_listed(SELLER_LEASE_KEYS, row) for row in cursor.fetchall()]


def vmLastLeases(cursor, buyerId, vmIds):
    """
    {vm id: {"lease": id, "rating": "good", "bad" or None}}: the newest
    lease of each of C{vmIds} that is a VM of the buyer C{buyerId}, the one
    its buyer rates.
    """
    rows = _ofVMs(
        cursor, "SELECT l.vm_id, l.id, r.good FROM leases l LEFT JOIN ratings r"
        " ON r.lease_id = l.id WHERE l.id IN (SELECT MAX(id) FROM leases"
        " WHERE buyer_account_id = ? AND vm_id IN ({vms}) GROUP BY vm_id)", buyerId, vmIds)
    return {vmId: {"lease": lease, "rating": None if good is None else (
        "good" if good else "bad")} for vmId, lease, good in rows}


def vmCharges(cursor, buyerId, vmIds):
    """
    {vm id: what its leases charged the buyer C{buyerId}} for those of
    C{vmIds} that are its VMs; what rejected leases were charged went back
    to the buyer and does not count (as in L{orderTotals}).
    """
    rows = _ofVMs(
        cursor, "SELECT vm_id, COALESCE(SUM(CASE WHEN verdict = 'rejected' THEN 0"
        " ELSE charged END), 0) FROM leases WHERE buyer_account_id = ? AND vm_id IN ({vms})"
        " GROUP BY vm_id", buyerId, vmIds)
    return {vmId: int(charged) for vmId, charged in rows}


def _ofVMs(cursor, query, buyerId, vmIds):
    """
    The rows of C{query} for the buyer C{buyerId} and the VMs C{vmIds}
    (its C{{vms}} stands for their placeholders); none for no VMs.
    """
    vmIds = list(vmIds)
    if not vmIds:
        return []
    cursor.execute(query.format(vms=", ".join("?" * len(vmIds))), [buyerId] + vmIds)
    return cursor.fetchall()
