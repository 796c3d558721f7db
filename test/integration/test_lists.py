"""
Long lists through the real server and CLI: an account with 5,000 VMs and
leases, 1,000 images and 600 ledger movements, some with the longest
text a hostile peer can get stored (a seller's stop reason, an image name,
a memo), is listed in full by `cpushare vms`, `leases`, `image list` and
`statement`, page after page, each entry once and in order.

The rows go straight into the market's database, as the market would
write them (no QEMU, no sellers running): the VMs are over, so the running
server has nothing of them in memory.
"""

from cpushare.server import admin
from cpushare.server.db import store

from .conftest import cpushare

VMS = 5000
IMAGES = 1000
CREDITS = 600
# What a hostile seller could have stored: far past any page, and in
# characters of several bytes each.
HOSTILE_REASON = "\u00e9\u2603" * 3000
HOSTILE_NAME = "\U0001f4a5" * 200


def fill(market):
    conn = store.connect(str(market.data / "market.sqlite"))

    def rows(cursor):
        ids = {}
        for name in ("bob", "sam"):
            cursor.execute("SELECT id FROM accounts WHERE name = ?", (name,))
            ids[name] = cursor.fetchone()[0]
        bob, sam = ids["bob"], ids["sam"]
        for i in range(IMAGES):
            name = HOSTILE_NAME if i % 3 == 0 else f"job-{i}.iso"
            store.addAccountImage(cursor, bob, f"{i:064x}", 1000 + i, name)
        order, vmIds = store.createOrder(cursor, bob, f"{0:064x}", VMS, 1, 64)
        store.closeOrder(cursor, order, "cancelled")
        for n, vm in enumerate(vmIds):
            reason = HOSTILE_REASON if n % 10 == 0 else "stopped by the buyer"
            store.updateVM(cursor, vm, state="stopped", seller_account_id=sam,
                           started=1.7e9 + n, ended=1.7e9 + n + 60, cpu_seconds=59.5,
                           reason=reason, ip=f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
            cursor.execute(
                "INSERT INTO leases (vm_id, order_id, buyer_account_id, seller_account_id,"
                " price, net_fee, cores, started, ended, cpu_seconds, net_bytes, charged,"
                " reason) VALUES (?, ?, ?, ?, 10000, 5000, 1, ?, ?, 59.5, 123456789, 165,"
                " ?)", (vm, order, bob, sam, 1.7e9 + n, 1.7e9 + n + 60, reason))
        for i in range(CREDITS):
            admin.credit(cursor, "bob", 1000 + i, HOSTILE_NAME if i % 2 else f"credit {i}")
        return vmIds

    try:
        return store.transact(conn, rows)
    finally:
        conn.close()


def listed(home, *command):
    result = cpushare(home, *command, "--json", timeout=120)
    assert result.status == 0, result
    assert result.stderr == "", result
    return result.json()


def test_every_list_command_lists_thousands_of_entries(market, tmp_path):
    bob = market.register(tmp_path / "bob", "bob", funds=None)
    market.register(tmp_path / "sam", "sam", funds=None)
    vmIds = fill(market)
    newestFirst = sorted(vmIds, reverse=True)

    vms = listed(bob, "vms")
    assert [v["vm"] for v in vms] == newestFirst
    assert {v["seller"] for v in vms} == {"sam"}
    assert all(v["reason"] for v in vms)

    leases = listed(bob, "leases")
    assert [lease["vm"] for lease in leases] == newestFirst
    ids = [lease["lease"] for lease in leases]
    assert ids == sorted(set(ids), reverse=True)
    assert all(lease["charged"] == 165 for lease in leases)

    images = listed(bob, "image", "list")
    assert sorted(i["sha256"] for i in images) == [f"{i:064x}" for i in range(IMAGES)]
    assert sum(i["name"].startswith("\U0001f4a5") for i in images) == (IMAGES + 2) // 3

    statement = listed(bob, "statement")["entries"]
    assert [e["amount"] for e in statement] == [1000 + i for i in reversed(range(CREDITS))]

    # The tables a person reads: a header and one line per entry.
    table = cpushare(bob, "vms", timeout=120)
    assert table.status == 0, table
    assert len(table.stdout.splitlines()) == VMS + 1
    table = cpushare(bob, "leases", timeout=120)
    assert table.status == 0, table
    assert len(table.stdout.splitlines()) == VMS + 1
