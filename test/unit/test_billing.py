"""
Billing by CPU time with funds held ahead, on a real database: each test
runs on SQLite and on PostgreSQL (the `conn` fixture of test/conftest.py).
"""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cpushare import money
from cpushare.money import MICRO
from cpushare.server import admin
from cpushare.server.money import billing
from cpushare.server.money import ledger
from cpushare.server.db import leases as leasesql
from cpushare.server.db import store
from cpushare.server.money.billing import CannotFund, bill, heldMismatch, openLease
from cpushare.server.money.escrow import pendingMismatch
from cpushare.server.money.ledger import EARNINGS, FUNDS, HELD

PRICE = 36_000          # 0.036 a core-hour: 10 micro-units a core-second
INTERVAL, WINDOW = 60.0, 600.0


def run(conn, fn, *args, **kw):
    return store.transact(conn, lambda c: fn(c, *args, **kw))


@pytest.fixture
def market(conn):
    """A buyer (alice) with an order of one VM, and a seller (sam)."""
    alice = run(conn, store.createAccount, "alice", "ab" * 32)
    sam = run(conn, store.createAccount, "sam", "cd" * 32)
    conn.execute("INSERT INTO images (sha256, size, stored) VALUES ('x', 1, 'now')")
    orderId, [vmId] = run(conn, store.createOrder, alice, "x", 1, 2, 256)
    return {"alice": alice, "sam": sam, "order": orderId, "vm": vmId}


def lease(conn, m, started=1000.0, price=PRICE, netFee=0, cores=2, alive=True):
    """A lease opened at C{started}; with C{alive} its VM showed life at once."""
    leaseId = run(conn, openLease, m["vm"], m["order"], m["alice"], m["sam"], "sam", price,
                  netFee, cores, started, INTERVAL, WINDOW)
    if alive:
        run(conn, leasesql.showedLife, leaseId, started)
    return leaseId


def credit(conn, m, amount):
    run(conn, admin.credit, "alice", amount, "test")


def balances(conn, m):
    b = run(conn, ledger.balances, m["alice"])
    return b[FUNDS], b[HELD], run(conn, ledger.balances, m["sam"])[EARNINGS]


def check(conn):
    assert run(conn, ledger.books)["ok"]
    assert run(conn, heldMismatch) == []
    assert run(conn, pendingMismatch) == []


def test_a_lease_holds_a_window_and_pays_for_the_cpu_really_used(conn, market):
    credit(conn, market, 10 * MICRO)
    leaseId = lease(conn, market)
    # A window at full tilt: 2 cores x 600 s x 10 micro-units a core-second.
    assert balances(conn, market) == (10 * MICRO - 12_000, 12_000, 0)
    # 60 s later the VM used 30 CPU seconds (it idled half the time).
    result = run(conn, bill, leaseId, 30.0, 0, 1060.0, False, INTERVAL, WINDOW)
    assert result.charged == 300 and result.stop is None
    # Charged from the hold, then the hold topped up to a window again.
    assert balances(conn, market) == (10 * MICRO - 12_300, 12_000, 300)
    # The same report again charges nothing more; a lower one refunds nothing.
    assert run(conn, bill, leaseId, 30.0, 0, 1061.0).charged == 0
    assert run(conn, bill, leaseId, 10.0, 0, 1062.0).charged == 0
    # A seller claiming more than wall time x cores is capped: 2 x 100 s.
    assert run(conn, bill, leaseId, 5000.0, 0, 1100.0).charged == 2000 - 300
    # The lease ends: the last bill, and the hold goes back to the buyer.
    result = run(conn, bill, leaseId, 210.0, 0, 1105.0, True, INTERVAL, WINDOW, "stopped")
    assert result.settled and result.charged == 100
    assert balances(conn, market) == (10 * MICRO - 2100, 0, 2100)
    rows = run(conn, lambda c: c.execute(
        "SELECT ended, reason, cpu_seconds, charged, settled FROM leases").fetchall())
    assert rows == [(1105.0, "stopped", 210.0, 2100, 1)]
    # A settled lease is never billed again.
    assert run(conn, bill, leaseId, 9999.0, 0, 5000.0, True).charged == 0
    check(conn)


def test_network_traffic_is_charged_at_the_sellers_fee(conn, market):
    credit(conn, market, 10 * MICRO)
    leaseId = lease(conn, market, netFee=MICRO)      # 1.00 a GB
    funds, held, _ = balances(conn, market)
    assert held == 12_000 + MICRO                    # a window of CPU and 1 GB of traffic
    run(conn, bill, leaseId, 0.0, 250_000_000, 1010.0)
    assert balances(conn, market)[2] == 250_000      # a quarter GB: 0.25
    check(conn)


def test_a_buyer_without_funds_gets_no_lease(conn, market):
    credit(conn, market, 1000)                      # less than one interval at full tilt
    with pytest.raises(CannotFund, match="funds ran out.*needs 0.0002 more"):
        lease(conn, market)
    assert run(conn, lambda c: c.execute("SELECT COUNT(*) FROM leases").fetchone()) == (0,)
    assert balances(conn, market) == (1000, 0, 0)
    check(conn)


def test_vms_stop_when_funds_run_out_and_the_seller_is_still_paid(conn, market):
    credit(conn, market, 3000)                      # 2.5 intervals at full tilt
    leaseId = lease(conn, market)
    assert balances(conn, market) == (0, 3000, 0)
    result = run(conn, bill, leaseId, 120.0, 0, 1060.0, False, INTERVAL, WINDOW)
    assert result.charged == 1200 and result.stop is None     # 1800 still held
    result = run(conn, bill, leaseId, 240.0, 0, 1120.0, False, INTERVAL, WINDOW)
    assert result.charged == 1200
    assert "the buyer's funds ran out" in result.stop            # 600 held: < an interval
    result = run(conn, bill, leaseId, 250.0, 0, 1125.0, True, INTERVAL, WINDOW, "out of funds")
    assert balances(conn, market) == (500, 0, 2500)
    check(conn)


def test_an_orders_budget_caps_what_it_holds_and_spends(conn, market):
    credit(conn, market, 10 * MICRO)
    conn.execute("UPDATE orders SET budget = 5000 WHERE id = ?", (market["order"],))
    leaseId = lease(conn, market)
    assert balances(conn, market)[1] == 5000
    result = run(conn, bill, leaseId, 240.0, 0, 1120.0, False, INTERVAL, WINDOW)
    assert result.charged == 2400 and result.stop is None
    result = run(conn, bill, leaseId, 480.0, 0, 1240.0, False, INTERVAL, WINDOW)
    assert result.stop == "the order's budget is spent"
    run(conn, bill, leaseId, 480.0, 0, 1240.0, True)
    assert balances(conn, market)[2] == 4800
    check(conn)


def test_traffic_never_charges_more_than_the_hold_nor_the_budget(conn, market):
    # 10.00 of funds, an order budget of 1.00, a seller at 1000.00 a GB
    # pushing 12 MB of junk frames: 12.00 of traffic at its fee.
    credit(conn, market, 10 * MICRO)
    conn.execute("UPDATE orders SET budget = ? WHERE id = ?", (MICRO, market["order"]))
    leaseId = lease(conn, market, netFee=1000 * MICRO)
    funds, held, _ = balances(conn, market)
    assert held == MICRO and funds == 9 * MICRO
    result = run(conn, bill, leaseId, 10.0, 12_000_000, 1010.0, False, INTERVAL, WINDOW)
    assert result.charged == MICRO
    assert "the funds held for this VM are spent" in result.stop
    run(conn, bill, leaseId, 10.0, 13_000_000, 1011.0, True, INTERVAL, WINDOW, "spent")
    funds, held, earned = balances(conn, market)
    # Never more than the budget, and the rest of the funds untouched.
    assert (funds, held, earned) == (9 * MICRO, 0, MICRO)
    check(conn)


def test_the_network_allowance_keeps_an_interval_of_cpu_for_the_seller(conn, market):
    credit(conn, market, 10 * MICRO)
    conn.execute("UPDATE orders SET budget = ? WHERE id = ?", (MICRO, market["order"]))
    leaseId = lease(conn, market, netFee=1000 * MICRO)
    # 1.00 held; an interval of 2 cores at full tilt is 1200: the rest pays
    # for (1_000_000 - 1200) micro-units at 1000 a GB of traffic.
    assert run(conn, billing.leaseNetLimit, leaseId, INTERVAL) == 998_800
    result = run(conn, bill, leaseId, 50.0, 500_000, 1060.0, False, INTERVAL, WINDOW)
    assert result.charged == 500 + 500_000 and result.stop is None
    # Bytes billed plus what the remaining hold pays for, less an interval of CPU.
    assert result.netLimit == 500_000 + (MICRO - 500_500 - 1200)
    # Carrying exactly the limit, then a full interval of CPU, is all paid.
    result = run(conn, bill, leaseId, 170.0, result.netLimit, 1120.0, True, INTERVAL,
                 WINDOW, "done")
    assert result.stop is None
    assert balances(conn, market)[2] == MICRO
    assert billing.netLimit(PRICE, 0, 2, MICRO, 5) is None      # free traffic: no limit
    check(conn)


def test_a_vm_that_never_shows_life_earns_its_seller_nothing(conn, market):
    credit(conn, market, 10 * MICRO)
    leaseId = lease(conn, market, netFee=MICRO, alive=False)
    # Its seller says it ran flat out for an hour and carried traffic.
    result = run(conn, bill, leaseId, 7200.0, 10**8, 4600.0, False, INTERVAL, WINDOW)
    assert result.charged == 0
    run(conn, bill, leaseId, 7200.0, 10**8, 4600.0, True, INTERVAL, WINDOW, "stopped")
    assert balances(conn, market) == (10 * MICRO, 0, 0)
    check(conn)


def test_billing_counts_wall_time_from_the_first_sign_of_life(conn, market):
    credit(conn, market, 10 * MICRO)
    leaseId = lease(conn, market, alive=False)
    run(conn, leasesql.showedLife, leaseId, 1100.0)
    run(conn, leasesql.showedLife, leaseId, 1200.0)          # only the first counts
    # 300 s after placement, 200 s after life: at most 2 x 200 CPU seconds.
    result = run(conn, bill, leaseId, 600.0, 0, 1300.0, False, INTERVAL, WINDOW)
    assert result.charged == 400 * 10
    check(conn)


KILLED_BILLER = textwrap.dedent("""
    import sys
    from cpushare.server.money import billing
    from cpushare.server.db import store
    path, leaseId, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    conn = store.connect(path)
    t = start
    while True:
        t += 1.0
        # Each bill is one transaction: a lease's CPU seconds grow 1.5 a
        # second of lease time (it began at 1000), its traffic 1000 bytes.
        store.transact(conn, billing.bill, leaseId, (t - 1000) * 1.5, int(t - 1000) * 1000,
                       t, False, 1.0, 20.0)
        print(t, flush=True)
""")


@pytest.mark.slow
def test_killing_the_biller_at_random_points_never_charges_twice_or_skips(conn, market):
    credit(conn, market, 100 * MICRO)
    leaseId = lease(conn, market, netFee=2 * MICRO)
    url = conn.database.url
    rng = random.Random(4)
    last = 0.0
    start = 1000.0
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_BILLER, url, str(leaseId), str(max(start, last))],
            stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=os.getcwd()))
        # Once it bills (its imports and connection done), kill it at a
        # random point of its next transactions.
        first = proc.stdout.readline()
        assert first, "the biller died before its first bill"
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(proc.pid, signal.SIGKILL)
        out = [first] + proc.communicate()[0].split()
        last = max(last, float(out[-1]))
        check(conn)
        (cpu, traffic, charged), = run(conn, lambda c: c.execute(
            "SELECT cpu_seconds, net_bytes, charged FROM leases").fetchall())
        # Whatever was committed is charged exactly once, to the micro-unit.
        assert charged == money.cost(PRICE, 2 * MICRO, cpu, traffic)
        assert balances(conn, market)[2] == charged
    assert last > 1000.0, "the biller never committed a bill"
