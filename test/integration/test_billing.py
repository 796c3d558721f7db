"""
Billing through real processes: the real cpushare-server billing every
half second, a buyer with funds, and sellers that run no QEMU
(fakeseller.py: the same wire protocol, CPU seconds reported as a busy VM
would).  The server is killed with SIGKILL at random points while it bills
and started again; in the end the books balance and every lease was
charged exactly what its CPU seconds cost, once.
"""

import json
import random
import sys
import time
from pathlib import Path

from cpushare.server import billing, ledger, store

from test.unit.livecdfakes import otherISO

from .conftest import Market, cpushare, waitUntil

FAKE_SELLER = Path(__file__).parent / "fakeseller.py"
PRICE = 36_000_000          # 36.00 a core-hour: 0.01 a core-second


def startFakeSeller(processes, home, cores, name):
    return processes.start(name, [sys.executable, FAKE_SELLER, home, cores, PRICE])


def leases(market):
    conn = store.connect(str(market.data / "market.sqlite"))
    try:
        return store.transact(conn, lambda c: c.execute(
            "SELECT id, price, net_fee, cpu_seconds, net_bytes, charged, held, settled,"
            " seller_account_id FROM leases ORDER BY id").fetchall())
    finally:
        conn.close()


def books(market):
    result = market.admin("books")
    return result.status, result.stdout


def test_killing_the_server_while_it_bills_charges_each_lease_exactly_once(
        processes, tmp_path):
    market = Market(processes, tmp_path / "market",
                    extra=["--billing-interval", "0.5", "--hold-window", "5",
                           "--grace", "60", "--measure-every", "0"]).start()
    buyer = market.register(tmp_path / "bob", "bob", funds="50")
    sellers = []
    for name in ("sam", "sue"):
        home = market.register(tmp_path / name, name, funds=None)
        sellers.append(startFakeSeller(processes, home, 2, f"seller-{name}"))
    for seller in sellers:
        seller.waitForLog("offering")
    iso = tmp_path / "job.iso"
    otherISO(str(iso))
    uploaded = cpushare(buyer, "image", "upload", iso)
    assert uploaded.status == 0, uploaded
    placed = cpushare(buyer, "order", "place", "--image", iso, "--vms", "3", "--json")
    assert placed.status == 0, placed
    order = json.loads(placed.stdout)
    assert order["allocated"] == 3, order
    waitUntil(lambda: sum(s.log().count("started VM") for s in sellers) == 3,
              "the three VMs started", processes=processes)

    rng = random.Random(11)
    for round in range(5):
        time.sleep(rng.uniform(0.3, 1.5))
        market.proc.signal(9)
        market.proc.popen.wait(10)
        market.start()
        # The sellers come back by themselves and reattach their VMs.
        waitUntil(lambda: sum(s.log().count("reattached") for s in sellers) >= 2 * (round + 1),
                  "both sellers reattached", timeout=30, processes=processes)
        status, out = books(market)
        assert status == 0, out

    time.sleep(1.5)
    cancelled = cpushare(buyer, "order", "cancel", str(order["order"]))
    assert cancelled.status == 0, cancelled
    waitUntil(lambda: len(leases(market)) == 3 and all(row[7] for row in leases(market)),
              "every lease settled", timeout=30, processes=processes)

    status, out = books(market)
    assert status == 0, out
    rows = leases(market)
    assert len(rows) == 3, rows      # the VMs stayed on their sellers: no new leases
    earnings = {}
    for (leaseId, price, netFee, cpu, traffic, charged, held, settled, seller) in rows:
        # Charged exactly what its CPU seconds cost, once, and nothing left held.
        assert charged == billing.cost(price, netFee, cpu, traffic), rows
        assert held == 0 and cpu > 3.0, rows
        earnings[seller] = earnings.get(seller, 0) + charged
    conn = store.connect(str(market.data / "market.sqlite"))
    try:
        for seller, total in earnings.items():
            assert store.transact(conn, ledger.balances, seller)[ledger.EARNINGS] == total
        bob = store.transact(conn, lambda c: c.execute(
            "SELECT id FROM accounts WHERE name = 'bob'").fetchone()[0])
        left = store.transact(conn, ledger.balances, bob)
    finally:
        conn.close()
    assert left[ledger.HELD] == 0
    assert left[ledger.FUNDS] == 50 * ledger.MICRO - sum(earnings.values())
    shown = cpushare(buyer, "leases", "--json")
    assert sorted(entry["charged"] for entry in json.loads(shown.stdout)) == \
        sorted(row[5] for row in rows)
