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

import pytest

from cpushare import money
from cpushare.server.money import ledger
from cpushare.server.db import store

from test.unit.livecdfakes import otherISO

from .conftest import Market, cpushare, startBuyer, waitUntil

FAKE_SELLER = Path(__file__).parent / "fakeseller.py"
PRICE = 36_000_000          # 36.00 a core-hour: 0.01 a core-second


def startFakeSeller(processes, home, cores, name, price=PRICE, extra=()):
    return processes.start(name, [sys.executable, FAKE_SELLER, home, cores, price, *extra])


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


@pytest.mark.slow  # SIGKILLs the server
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
        assert charged == money.cost(price, netFee, cpu, traffic), rows
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


def fundsOf(market, name):
    conn = store.connect(str(market.data / "market.sqlite"))
    try:
        return store.transact(conn, lambda c: ledger.balances(c, c.execute(
            "SELECT id FROM accounts WHERE name = ?", (name,)).fetchone()[0]))
    finally:
        conn.close()


def test_a_seller_flooding_junk_frames_never_charges_the_buyer_past_its_budget(
        processes, tmp_path):
    # An operator who allows fees up to 1000.00 a GB; a seller asking that
    # and pushing junk frames at the buyer's network as fast as it can; a
    # buyer with 10.00 of funds and an order budget of 1.00.
    market = Market(processes, tmp_path / "market",
                    extra=["--billing-interval", "0.5", "--hold-window", "5",
                           "--max-net-fee", "1000", "--measure-every", "0"]).start()
    buyer = market.register(tmp_path / "bob", "bob", funds="10")
    home = market.register(tmp_path / "greedy", "greedy", funds=None)
    seller = startFakeSeller(processes, home, 2, "seller-greedy", price=10_000,
                             extra=["--flood", "--net-fee", str(1000 * ledger.MICRO)])
    seller.waitForLog("offering")
    bobBuyer = startBuyer(processes, buyer)
    market.waitForLog("buyer bob connected")
    iso = tmp_path / "job.iso"
    otherISO(str(iso))
    assert cpushare(buyer, "image", "upload", iso).status == 0
    placed = cpushare(buyer, "order", "place", "--image", iso, "--budget", "1.00", "--json")
    assert placed.status == 0, placed
    [vm] = json.loads(placed.stdout)["vm_ids"]
    # The hold is spent within a second or so of flooding: the market stops the VM.
    seller.waitForLog("stopped VM", timeout=30)
    waitUntil(lambda: leases(market) and all(row[7] for row in leases(market)),
              "the lease settled", timeout=30, processes=processes)
    [(leaseId, price, netFee, cpu, traffic, charged, held, settled, _)] = leases(market)
    assert charged <= ledger.MICRO, charged
    assert held == 0
    # Traffic stopped at what the hold paid for, about 1 MB, though the
    # seller pushed far more.
    assert 0 < traffic <= ledger.MICRO * 10**9 // netFee
    bob = fundsOf(market, "bob")
    assert bob[ledger.FUNDS] == 10 * ledger.MICRO - charged >= 9 * ledger.MICRO
    assert bob[ledger.HELD] == 0
    assert fundsOf(market, "greedy")[ledger.EARNINGS] == charged
    status, out = books(market)
    assert status == 0, out
    shown = cpushare(buyer, "vms", "--json")
    [entry] = json.loads(shown.stdout)
    assert entry["vm"] == vm and entry["state"] == "stopped", entry
    assert "the funds held for this VM are spent by its network traffic" in entry["reason"]
    # The buyer's program was told too, and logs it.
    bobBuyer.proc.waitForLog(f"VM {vm} left the network: the funds held for this VM are spent")
    assert bobBuyer.proc.alive()


def test_a_seller_that_fakes_its_vms_is_paid_nothing(processes, tmp_path):
    market = Market(processes, tmp_path / "market",
                    extra=["--billing-interval", "0.5", "--hold-window", "5",
                           "--measure-every", "0"]).start()
    buyer = market.register(tmp_path / "bob", "bob", funds="50")
    home = market.register(tmp_path / "faker", "faker", funds=None)
    faker = startFakeSeller(processes, home, 2, "seller-faker", extra=["--silent"])
    faker.waitForLog("offering")
    iso = tmp_path / "job.iso"
    otherISO(str(iso))
    assert cpushare(buyer, "image", "upload", iso).status == 0
    placed = cpushare(buyer, "order", "place", "--image", iso, "--vms", "2", "--json")
    assert placed.status == 0, placed
    order = json.loads(placed.stdout)
    waitUntil(lambda: faker.log().count("started VM") == 2, "the two VMs started",
              processes=processes)
    # It reports both VMs running flat out for a few bills.
    time.sleep(2.0)
    assert cpushare(buyer, "order", "cancel", str(order["order"])).status == 0
    waitUntil(lambda: len(leases(market)) == 2 and all(row[7] for row in leases(market)),
              "the leases settled", timeout=30, processes=processes)
    for row in leases(market):
        assert row[3] == 0.0 and row[5] == 0, row      # no CPU second billed, nothing charged
    assert fundsOf(market, "faker")[ledger.EARNINGS] == 0
    assert fundsOf(market, "bob")[ledger.FUNDS] == 50 * ledger.MICRO
    status, out = books(market)
    assert status == 0, out
