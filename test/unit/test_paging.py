"""
Every list the market answers with fits one AMP value (65,535 bytes),
however long its entries: pages are cut by count and by encoded size, the
text a peer chose is clipped, and walking the pages by their cursor gives
every entry once, in order, on SQLite and PostgreSQL alike.
"""

from twisted.protocols import amp

from cpushare.protocol import commands, paging
from cpushare.server.db import leases as leasesql
from cpushare.server.db import store

BOOM = "\U0001f4a5"   # four bytes in UTF-8


def worstEntry(argument, texts):
    """An entry of the AmpList C{argument} with every field at its longest."""
    entry = {}
    for key, sub in argument.subargs:
        name = key.decode()
        if isinstance(sub, amp.Unicode):
            entry[name] = BOOM * texts.get(name, paging.MAX_TEXT)
        elif isinstance(sub, amp.Boolean):
            entry[name] = False
        elif isinstance(sub, amp.Float):
            entry[name] = -1.2345678901234567e+300
        elif isinstance(sub, amp.Integer):
            entry[name] = -2**63
        else:
            raise AssertionError(f"no worst case for {name}: {sub!r}")
    return entry


def assertFitsAMP(testcase, command, response):
    """C{response} encodes as an answer to C{command} with every value within AMP's limit."""
    box = amp._objectsToStrings(response, command.response, amp.Box(), None)
    for key, value in box.items():
        testcase.assertLessEqual(len(value), paging.AMP_MAX_VALUE, (command.__name__, key))
    box.serialize()   # raises TooLong past the limit


# Strings whose length is set elsewhere than by MAX_TEXT (characters).
TEXTS = {
    "sha256": 64, "name": 200, "mac": 17, "ip": 45, "state": 10, "time": 32,
    "uploaded": 32, "created": 32, "updated": 32, "email": 254, "currency": 3,
    "payment": 64, "account": 16, "kind": 32, "rating": 4, "seller": 32, "country": 2,
}

PAGED = [
    (commands.ListVMs, "vms", commands.VMS_PAGE, {"more": True}),
    (commands.ListLeases, "leases", commands.LEASES_PAGE, {"more": True}),
    (commands.ListImages, "images", commands.IMAGES_PAGE, {"more": True}),
    (commands.Statement, "entries", commands.STATEMENT_PAGE,
     {"more": True, "currency": "USD"}),
    (commands.ListSellers, "sellers", commands.SELLERS_PAGE, {"total": 10**6, "passing": 1}),
    (commands.LinkStats, "links", commands.LINKS_PAGE, {"unrouted": 2**62, "more": True}),
]

# Lists of a fixed, small number of entries: the most recent ones.
FIXED = [
    (commands.Earnings, "payouts", 20,
     {"earnings": 2**62, "payout": 2**62, "currency": "USD", "minimum": 2**62,
      "payments": True, "email": "x" * 254}),
    (commands.Balance, "pending", 10,
     {"funds": 2**62, "held": 2**62, "earnings": 2**62, "payout": 2**62, "currency": "USD",
      "commission_percent": "99.9999", "payments": True}),
]


def test_a_page_of_the_longest_entries_fits_one_amp_value():
    import unittest
    case = unittest.TestCase()
    for command, name, limit, rest in PAGED:
        argument = paging.listArgument(command, name)
        rows = [worstEntry(argument, TEXTS) for _ in range(limit + 1)]
        page, more = paging.pageOf(command, name, rows, limit)
        assert page and more, command.__name__
        assertFitsAMP(case, command, dict(rest, **{name: page}))
    for command, name, count, rest in FIXED:
        argument = paging.listArgument(command, name)
        rows = [worstEntry(argument, TEXTS) for _ in range(count)]
        assertFitsAMP(case, command, dict(rest, **{name: rows}))


def test_a_page_of_ordinary_entries_is_full():
    argument = paging.listArgument(commands.ListVMs, "vms")
    vm = {"vm": 123456, "order": 12345, "seller": "some-seller", "state": "running",
          "mac": "0a:cb:00:01:e2:40", "ip": "10.0.1.200", "cores": 2, "memory": 1024,
          "started": 1764740000.123456, "cpu_seconds": 3512.25}
    rows = [dict(vm, vm=vm["vm"] - i) for i in range(commands.VMS_PAGE + 1)]
    page, more = paging.pageOf(commands.ListVMs, "vms", rows, commands.VMS_PAGE)
    assert (len(page), more) == (commands.VMS_PAGE, True)
    page, more = paging.pageOf(commands.ListVMs, "vms", rows[:5], commands.VMS_PAGE)
    assert (len(page), more) == (5, False)
    assert sum(paging.entrySize(argument, r) for r in rows[:commands.VMS_PAGE]) \
        <= paging.PAGE_BYTES


def test_clip():
    assert paging.clip(None) is None
    assert paging.clip("short") == "short"
    clipped = paging.clip("x" * 5000)
    assert len(clipped) == paging.MAX_TEXT and clipped.endswith("\u2026")


def _fill(cursor, vms, images):
    buyer = store.createAccount(cursor, "bob", "f" * 64)
    seller = store.createAccount(cursor, "sam", "e" * 64)
    for i in range(images):
        # One upload stamp for all: the order falls back on the sha256.
        cursor.execute("INSERT INTO images (sha256, size, stored) VALUES (?, 1, 'then')",
                       (f"{i:064x}",))
        cursor.execute(
            "INSERT INTO account_images (account_id, sha256, name, uploaded)"
            " VALUES (?, ?, ?, '2026-01-01T00:00:00+00:00')",
            (buyer, f"{i:064x}", BOOM * 200 if i % 2 else f"job-{i}.iso"))
    order, ids = store.createOrder(cursor, buyer, f"{0:064x}", vms, 1, 64)
    for n, vm in enumerate(ids):
        reason = "\u2603" * 5000 if n % 3 == 0 else "done"
        store.updateVM(cursor, vm, state="stopped", reason=reason, seller_account_id=seller,
                       started=1.0, ended=2.0)
        cursor.execute(
            "INSERT INTO leases (vm_id, order_id, buyer_account_id, seller_account_id, price,"
            " net_fee, cores, started, ended, reason) VALUES (?, ?, ?, ?, 1, 1, 1, 1.0, 2.0, ?)",
            (vm, order, buyer, seller, reason))
    return buyer, ids


def _walk(testcase, command, name, fetch, limit, key, cursor):
    """Every entry, page after page from C{fetch(cursorValue)}, each page checked."""
    found, at, pages = [], None, 0
    while True:
        rows = [{k: v for k, v in r.items() if v is not None} for r in fetch(at)]
        page, more = paging.pageOf(command, name, rows, limit)
        assertFitsAMP(testcase, command, {name: page, "more": more})
        found.extend(page)
        pages += 1
        if not more:
            return found, pages
        at = page[-1][key]


def test_walking_the_pages_lists_every_entry_once_in_order(conn):
    import unittest
    case = unittest.TestCase()
    vms = 2 * max(commands.VMS_PAGE, commands.LEASES_PAGE) + 7
    buyer, ids = store.transact(conn, _fill, vms, commands.IMAGES_PAGE + 3)

    def vmsBefore(before):
        rows = store.transact(conn, store.accountVMs, buyer, before, commands.VMS_PAGE + 1)
        for row in rows:
            row["reason"] = paging.clip(row["reason"])
        return rows

    found, pages = _walk(case, commands.ListVMs, "vms", vmsBefore, commands.VMS_PAGE,
                         "vm", "before")
    assert [v["vm"] for v in found] == sorted(ids, reverse=True)
    assert pages > vms // commands.VMS_PAGE   # long reasons make some pages shorter

    found, _ = _walk(case, commands.ListLeases, "leases", lambda before: store.transact(
        conn, leasesql.accountLeases, buyer, before, commands.LEASES_PAGE + 1),
        commands.LEASES_PAGE, "lease", "before")
    assert [lease["vm"] for lease in found] == sorted(ids, reverse=True)
    assert max(len(lease["reason"]) for lease in found) == paging.MAX_TEXT

    found, pages = _walk(case, commands.ListImages, "images", lambda after: store.transact(
        conn, store.accountImages, buyer, after, commands.IMAGES_PAGE + 1),
        commands.IMAGES_PAGE, "sha256", "after")
    assert [i["sha256"] for i in found] == [f"{i:064x}" for i in range(len(found))]
    assert len(found) == commands.IMAGES_PAGE + 3
