"""
The queries behind the web site's charts: an owner's ledger movements
summed by day.  What the sums mean (which accounts, which kinds of
transaction make a buyer's spending or a seller's earnings) is the money
room's (L{cpushare.server.money.statements}); these only add up.

Like those of L{cpushare.server.db.store}, each takes a DB-API cursor and
runs inside one store transaction.
"""

import datetime

# Ledger entries are numbered in the order they are posted, and a
# transaction's time is the clock's when it was posted: the numbers grow
# with the times, but for transactions posted at once (whose times may
# differ by a second) and a clock set back.  The search for a window's
# first entry starts this long before the window to allow for them.
CLOCK_SLACK = datetime.timedelta(days=1)


def firstEntryFrom(cursor, since):
    """
    The id of the first ledger entry posted at or after C{since} (ISO
    8601 text, UTC), found by bisecting the entries by id: about 20
    lookups by primary key however long the ledger; one more than the last
    entry's when there is none.
    """
    # Apart: SQLite answers MIN or MAX alone from the index, both at once by a scan.
    cursor.execute("SELECT MIN(id) FROM ledger_entries")
    (low,) = cursor.fetchone()
    if low is None:
        return 1
    cursor.execute("SELECT MAX(id) FROM ledger_entries")
    high = cursor.fetchone()[0] + 1
    while low < high:
        middle = (low + high) // 2
        cursor.execute(
            "SELECT created FROM ledger_transactions WHERE id = (SELECT transaction_id"
            " FROM ledger_entries WHERE id >= ? ORDER BY id LIMIT 1)", (middle,))
        if cursor.fetchone()[0] >= since:
            high = middle
        else:
            low = middle + 1
    return low


def dailyTotals(cursor, ownerId, accountKinds, transactionKinds, since):
    """
    The sum of the owner's ledger entries on its accounts of
    C{accountKinds} in transactions of C{transactionKinds}, by UTC day,
    from day C{since} ("YYYY-MM-DD") on: [("YYYY-MM-DD", micro-units)],
    oldest first, days without such entries left out.

    A transaction's time is stored as ISO 8601 text in UTC
    (L{cpushare.server.db.store.now}), so its first ten characters are its
    day, and text order is time order.  Only the entries from
    L{firstEntryFrom} a L{CLOCK_SLACK} before C{since} are read, so the
    cost follows the window, not the owner's whole history.
    """
    if not accountKinds or not transactionKinds:
        return []
    searchFrom = (datetime.date.fromisoformat(since) - CLOCK_SLACK).isoformat()
    cursor.execute(
        "SELECT substr(t.created, 1, 10), SUM(e.amount)"
        " FROM ledger_accounts a"
        " JOIN ledger_entries e ON e.account_id = a.id"
        " JOIN ledger_transactions t ON t.id = e.transaction_id"
        " WHERE a.owner_id = ? AND e.id >= ?"
        " AND a.kind IN (" + ", ".join("?" * len(accountKinds)) + ")"
        " AND t.kind IN (" + ", ".join("?" * len(transactionKinds)) + ")"
        " AND t.created >= ?"
        " GROUP BY 1 ORDER BY 1",
        (ownerId, firstEntryFrom(cursor, searchFrom), *accountKinds, *transactionKinds,
         since),
    )
    return [(day, int(total)) for day, total in cursor.fetchall()]
