"""
The market's queries: sellers' terms, orders' screens and budgets, ratings.
The leases' are in L{cpushare.server.db.leases}; the rules that use these
are the market's (L{cpushare.server.market}).

Like those of L{cpushare.server.db.store}, each takes a DB-API cursor and
runs inside one store transaction.
"""

import json

from cpushare.protocol import states
from cpushare.server.db.store import macFor, now

# -- sellers' terms


def sellerTerms(cursor, accountId):
    """A seller's stored terms, or None when it never set any."""
    cursor.execute(
        "SELECT price, net_fee, country, trusted_price FROM seller_terms WHERE account_id = ?",
        (accountId,))
    row = cursor.fetchone()
    if row is None:
        return None
    return {"price": int(row[0]), "net_fee": int(row[1]), "country": row[2],
            "trusted_price": None if row[3] is None else int(row[3])}


def setSellerTerms(cursor, accountId, defaults, price=None, net_fee=None, country=None,
                   trusted_price=None):
    """
    Change the terms given (None keeps the stored value, or C{defaults}'
    when there is none); returns the terms now in force.
    """
    terms = sellerTerms(cursor, accountId)
    exists = terms is not None
    terms = dict(terms or defaults)
    terms.setdefault("trusted_price", None)
    for key, value in (("price", price), ("net_fee", net_fee), ("country", country),
                       ("trusted_price", trusted_price)):
        if value is not None:
            terms[key] = value
    if exists:
        cursor.execute(
            "UPDATE seller_terms SET price = ?, net_fee = ?, country = ?, trusted_price = ?,"
            " updated = ? WHERE account_id = ?",
            (terms["price"], terms["net_fee"], terms["country"], terms["trusted_price"], now(),
             accountId))
    else:
        cursor.execute(
            "INSERT INTO seller_terms (account_id, price, net_fee, country, trusted_price,"
            " updated) VALUES (?, ?, ?, ?, ?, ?)",
            (accountId, terms["price"], terms["net_fee"], terms["country"],
             terms["trusted_price"], now()))
    return terms


# -- orders


def setOrderScreens(cursor, orderId, screens, budget):
    cursor.execute(
        "UPDATE orders SET screens = ?, budget = ?, trusted = ? WHERE id = ?",
        (json.dumps(screens, sort_keys=True), budget, int(bool(screens.get("trusted"))),
         orderId))


def orderBudget(cursor, orderId):
    """The order's budget (micro-units), or None when it has none."""
    cursor.execute("SELECT budget FROM orders WHERE id = ?", (orderId,))
    (budget,) = cursor.fetchone()
    return budget


def orderScreens(cursor, orderIds):
    """{order id: (screens arguments, budget)} for the orders given."""
    result = {}
    ids = list(orderIds)
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        cursor.execute(
            "SELECT id, screens, budget FROM orders WHERE id IN ("
            + ",".join("?" * len(chunk)) + ")", chunk)
        for orderId, screens, budget in cursor.fetchall():
            result[orderId] = (json.loads(screens or "{}"), budget)
    return result


def setReplicas(cursor, orderId, replicas, diversity, groups):
    """
    The order runs each VM C{replicas} times on sellers that differ in
    C{diversity} (names); C{groups} is {vm id: its replica group}.
    """
    cursor.execute("UPDATE orders SET replicas = ?, diversity = ? WHERE id = ?",
                   (replicas, ",".join(diversity), orderId))
    for vmId, group in sorted(groups.items()):
        cursor.execute("UPDATE vms SET replica_group = ? WHERE id = ?", (group, vmId))


def _diversity(text):
    return [name for name in (text or "").split(",") if name]


def orderReplicas(cursor, orderId):
    """(replicas, [diversity names]) of an order."""
    cursor.execute("SELECT replicas, diversity FROM orders WHERE id = ?", (orderId,))
    replicas, diversity = cursor.fetchone()
    return int(replicas), _diversity(diversity)


def activeReplicaGroups(cursor):
    """
    {vm id: (replica group, replicas, [diversity names])} of the active VMs
    that are replicas.
    """
    cursor.execute(
        "SELECT v.id, v.replica_group, o.replicas, o.diversity"
        " FROM vms v JOIN orders o ON o.id = v.order_id WHERE v.replica_group IS NOT NULL"
        " AND v.state IN (" + ",".join("?" * len(states.ACTIVE)) + ")", states.ACTIVE)
    return {vmId: (group, int(replicas), _diversity(diversity))
            for vmId, group, replicas, diversity in cursor.fetchall()}


def setVerdictFlags(cursor, orderId, compare, adaptive):
    """The order's differing results are compared by the buyer's program; it is adaptive."""
    cursor.execute("UPDATE orders SET compare = ?, adaptive = ? WHERE id = ?",
                   (1 if compare else 0, 1 if adaptive else 0, orderId))


def addReplicaVM(cursor, orderId, group):
    """One more VM in replica group C{group} of the order (a tie-break); returns its id."""
    stamp = now()
    cursor.execute(
        "INSERT INTO vms (order_id, mac, state, created, replica_group)"
        " VALUES (?, '', ?, ?, ?) RETURNING id",
        (orderId, states.VMState.PENDING, stamp, group))
    vmId = cursor.fetchone()[0]
    cursor.execute("UPDATE vms SET mac = ? WHERE id = ?", (macFor(vmId), vmId))
    cursor.execute("UPDATE orders SET vms = vms + 1 WHERE id = ?", (orderId,))
    return vmId


def addVerdict(cursor, orderId, group, verdict, sha256, decided, reason):
    """Keep the verdict of a replica group (once)."""
    cursor.execute(
        "INSERT INTO verdicts (order_id, replica_group, verdict, sha256, decided, reason)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (order_id, replica_group) DO NOTHING",
        (orderId, group, verdict, sha256, decided, reason))


def undecidedGroups(cursor):
    """
    The replica groups with no verdict yet whose order is open, a VM a row:
    (order, group, buyer, compare, adaptive, vm, state, latest result's
    lease, its sha256, whether the VM had a lease).
    """
    cursor.execute(
        "SELECT o.id, v.replica_group, o.account_id, o.compare, o.adaptive, v.id, v.state,"
        " r.lease_id, r.sha256,"
        " (SELECT COUNT(*) FROM leases l WHERE l.vm_id = v.id)"
        " FROM vms v JOIN orders o ON o.id = v.order_id"
        " LEFT JOIN results r ON r.lease_id ="
        "  (SELECT MAX(lease_id) FROM results WHERE vm_id = v.id)"
        " WHERE v.replica_group IS NOT NULL AND NOT EXISTS (SELECT 1 FROM verdicts d"
        "  WHERE d.order_id = o.id AND d.replica_group = v.replica_group)"
        " ORDER BY o.id, v.replica_group, v.id")
    return [tuple(row) for row in cursor.fetchall()]


def orderVerdicts(cursor, orderId):
    """{replica group: (verdict, sha256, reason)} of the order's decided groups."""
    cursor.execute("SELECT replica_group, verdict, sha256, reason FROM verdicts"
                   " WHERE order_id = ?", (orderId,))
    return {group: (verdict, sha256, reason) for group, verdict, sha256, reason
            in cursor.fetchall()}


# -- ratings


def ratingsOf(cursor, sellerId):
    """[(buyer account id, good votes, votes)] of a seller, its own account's left out."""
    cursor.execute(
        "SELECT buyer_account_id, SUM(good), COUNT(*) FROM ratings"
        " WHERE seller_account_id = ? AND buyer_account_id <> seller_account_id"
        " GROUP BY buyer_account_id", (sellerId,))
    return [(buyer, int(good), int(count)) for buyer, good, count in cursor.fetchall()]


def canariesFailed(cursor, sellerId):
    """How many known-answer jobs (canaries) the seller answered wrongly."""
    cursor.execute("SELECT canaries_failed FROM validation WHERE account_id = ?", (sellerId,))
    row = cursor.fetchone()
    return 0 if row is None else int(row[0])


def ratingsReceived(cursor, sellerId, before=None, limit=100):
    """
    The ratings buyers gave the seller's leases, newest first, older than
    lease C{before} when given: [{lease, good, comment, created}].  Not
    who gave them.
    """
    cursor.execute(
        "SELECT lease_id, good, comment, created FROM ratings"
        " WHERE seller_account_id = ? AND buyer_account_id <> seller_account_id"
        " AND lease_id < ? ORDER BY lease_id DESC LIMIT ?",
        (sellerId, 2**62 if before is None else before, limit))
    return [{"lease": lease, "rating": "good" if good else "bad", "comment": comment,
             "created": created} for lease, good, comment, created in cursor.fetchall()]


def leaseRating(cursor, leaseId):
    """(good, created) of the lease's rating, or None when it has none."""
    cursor.execute("SELECT good, created FROM ratings WHERE lease_id = ?", (leaseId,))
    return cursor.fetchone()


def addRating(cursor, leaseId, sellerId, buyerId, good, comment):
    cursor.execute(
        "INSERT INTO ratings (lease_id, seller_account_id, buyer_account_id, good, comment,"
        " created) VALUES (?, ?, ?, ?, ?, ?)",
        (leaseId, sellerId, buyerId, 1 if good else 0, comment, now()))


def accountName(cursor, accountId):
    cursor.execute("SELECT name FROM accounts WHERE id = ?", (accountId,))
    return cursor.fetchone()[0]


# -- results


def addResult(cursor, leaseId, vmId, orderId, sellerId, country, cpu, sha256, size, reported):
    """
    Record the result a lease's seller reported at C{reported}: one a lease,
    the first.  False when the lease has one already (a report again
    after a restart of the market): nothing is changed.
    """
    cursor.execute(
        "INSERT INTO results (lease_id, vm_id, order_id, seller_account_id, country, cpu,"
        " sha256, size, reported) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (lease_id) DO NOTHING",
        (leaseId, vmId, orderId, sellerId, country, cpu, sha256, size, reported))
    return cursor.rowcount == 1


def orderResults(cursor, orderId, after=None, limit=1000):
    """
    The VMs of an order after VM C{after}, by id, each with its latest
    result, the seller that reported it and what it said of itself; a VM
    without one has its current seller, if any, and no digest.
    """
    cursor.execute(
        "SELECT v.id, v.replica_group, v.state, s.name, r.country, r.cpu, r.sha256, r.size,"
        " l.id, l.verdict"
        " FROM vms v"
        " LEFT JOIN results r ON r.lease_id ="
        "  (SELECT MAX(lease_id) FROM results WHERE vm_id = v.id)"
        " LEFT JOIN leases l ON l.id = COALESCE(r.lease_id,"
        "  (SELECT MAX(id) FROM leases WHERE vm_id = v.id))"
        " LEFT JOIN accounts s ON s.id = COALESCE(r.seller_account_id, v.seller_account_id)"
        " WHERE v.order_id = ? AND v.id > ? ORDER BY v.id LIMIT ?",
        (orderId, -1 if after is None else after, limit))
    keys = ("vm", "replica_group", "state", "seller", "country", "cpu", "sha256", "size",
            "lease", "verdict")
    return [dict(zip(keys, row)) for row in cursor.fetchall()]
