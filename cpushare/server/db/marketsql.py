"""
The market's queries: sellers' terms, orders' screens, leases, ratings.

Like those of L{cpushare.server.db.store}, each takes a DB-API cursor and
runs inside one store transaction.
"""

import json

from cpushare.protocol.commands import BadRequest, NotPermitted
from cpushare.protocol.paging import clip
from cpushare.money import cpuCost, netCost
from cpushare.server.db.store import now

# -- sellers' terms


def sellerTerms(cursor, accountId):
    """A seller's stored terms, or None when it never set any."""
    cursor.execute(
        "SELECT price, net_fee, country FROM seller_terms WHERE account_id = ?", (accountId,))
    row = cursor.fetchone()
    if row is None:
        return None
    return {"price": int(row[0]), "net_fee": int(row[1]), "country": row[2]}


def setSellerTerms(cursor, accountId, defaults, price=None, net_fee=None, country=None):
    """
    Change the terms given (None keeps the stored value, or C{defaults}'
    when there is none); returns the terms now in force.
    """
    terms = sellerTerms(cursor, accountId)
    exists = terms is not None
    terms = dict(terms or defaults)
    for key, value in (("price", price), ("net_fee", net_fee), ("country", country)):
        if value is not None:
            terms[key] = value
    if exists:
        cursor.execute(
            "UPDATE seller_terms SET price = ?, net_fee = ?, country = ?, updated = ?"
            " WHERE account_id = ?",
            (terms["price"], terms["net_fee"], terms["country"], now(), accountId))
    else:
        cursor.execute(
            "INSERT INTO seller_terms (account_id, price, net_fee, country, updated)"
            " VALUES (?, ?, ?, ?, ?)",
            (accountId, terms["price"], terms["net_fee"], terms["country"], now()))
    return terms


# A buyer account's vote counts in full once it has paid the seller this
# much (micro-units, 1.00) over all their leases; below, in proportion.
RATING_FULL_VOTE = 1_000_000


def votes(cursor, accountId):
    """
    A seller's votes as (good, bad, raters): each buyer account that rated
    it counts once, its leases' ratings averaged, weighted by what it paid
    this seller up to L{RATING_FULL_VOTE}; C{raters} is how many buyer
    accounts rated it.  So many votes from one account, or from fresh
    accounts that paid next to nothing, weigh next to nothing.
    """
    cursor.execute(
        "SELECT buyer_account_id, SUM(good), COUNT(*) FROM ratings"
        " WHERE seller_account_id = ? AND buyer_account_id <> seller_account_id"
        " GROUP BY buyer_account_id", (accountId,))
    rated = cursor.fetchall()
    if not rated:
        return 0.0, 0.0, 0
    cursor.execute(
        "SELECT buyer_account_id, SUM(charged) FROM leases WHERE seller_account_id = ?"
        " GROUP BY buyer_account_id", (accountId,))
    paid = {buyer: int(total) for buyer, total in cursor.fetchall()}
    good = bad = 0.0
    for buyer, goodCount, count in rated:
        weight = min(1.0, paid.get(buyer, 0) / RATING_FULL_VOTE)
        share = int(goodCount) / int(count)
        good += weight * share
        bad += weight * (1.0 - share)
    return good, bad, len(rated)


def sellerStanding(cursor, accountId, defaults):
    """What the market needs of a seller that comes online: (terms, votes)."""
    return sellerTerms(cursor, accountId) or dict(defaults), votes(cursor, accountId)


# -- orders


def setOrderScreens(cursor, orderId, screens, budget):
    cursor.execute(
        "UPDATE orders SET screens = ?, budget = ? WHERE id = ?",
        (json.dumps(screens, sort_keys=True), budget, orderId))


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


# -- leases


def endLease(cursor, leaseId, ended, reason):
    """Mark a lease ended; its CPU seconds are billing's to set (capped there)."""
    cursor.execute(
        "UPDATE leases SET ended = ?, reason = ? WHERE id = ? AND ended IS NULL",
        (ended, reason, leaseId))


def openLeases(cursor):
    """{vm id: lease id} of the leases not ended, for a restarting server."""
    cursor.execute("SELECT id, vm_id FROM leases WHERE ended IS NULL")
    return {vmId: leaseId for leaseId, vmId in cursor.fetchall()}


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
        entry = dict(zip(LEASE_KEYS, row))
        for key in ("price", "net_fee", "net_bytes", "charged"):
            entry[key] = int(entry[key])
        # The breakdown of what was charged: CPU time, then traffic (billing
        # rounds each down, so they may add up to a micro-unit less).
        entry["cpu_cost"] = cpuCost(entry["price"], entry["cpu_seconds"])
        entry["net_cost"] = netCost(entry["net_fee"], entry["net_bytes"])
        entry["held"] = int(held)
        entry["rating"] = None if entry["rating"] is None else (
            "good" if entry["rating"] else "bad")
        entry["reason"] = clip(entry["reason"])
        rows.append(entry)
    return rows


# -- ratings

MAX_COMMENT = 500


def rate(cursor, accountId, leaseId, good, comment):
    """
    The lease's buyer rates its seller, once, and only a lease it was
    charged for; returns the seller's account id, name and votes (L{votes})
    after this one.  Anyone else's lease is refused as if it did not
    exist; a lease of an account's own VM on its own seller is never rated.
    """
    if comment is not None and len(comment) > MAX_COMMENT:
        raise BadRequest(f"a comment is at most {MAX_COMMENT} characters")
    cursor.execute(
        "SELECT buyer_account_id, seller_account_id, charged FROM leases WHERE id = ?",
        (leaseId,))
    row = cursor.fetchone()
    if row is None or row[0] != accountId:
        raise BadRequest(f"you have no lease {leaseId}")
    if row[1] == accountId:
        raise NotPermitted(f"lease {leaseId} ran on your own seller: you cannot rate yourself")
    if int(row[2]) <= 0:
        raise NotPermitted(
            f"lease {leaseId} was not billed anything yet: only a lease you paid for can be "
            "rated (try again after its first bill)")
    cursor.execute("SELECT good, created FROM ratings WHERE lease_id = ?", (leaseId,))
    done = cursor.fetchone()
    if done is not None:
        raise NotPermitted(
            f"lease {leaseId} was already rated {'good' if done[0] else 'bad'} on {done[1]}")
    cursor.execute(
        "INSERT INTO ratings (lease_id, seller_account_id, buyer_account_id, good, comment,"
        " created) VALUES (?, ?, ?, ?, ?, ?)",
        (leaseId, row[1], accountId, 1 if good else 0, comment, now()))
    cursor.execute("SELECT name FROM accounts WHERE id = ?", (row[1],))
    return row[1], cursor.fetchone()[0], votes(cursor, row[1])
