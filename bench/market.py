"""
The market's benchmarks (run by `make bench`; `bench/market.py --quick` for a smoke run).

    matching  SELLERS sellers online, ORDERS one-VM orders with screens placed
              as fast as possible: orders allocated per second and the time
              from placing an order to its VM's StartVM being sent (the order
              stored, matched, its lease funded), against the same number of
              bare order inserts on the same store (the baseline: what the
              database alone costs).
    ledger    bills of running leases per second (each one store transaction
              that reads the lease, posts its charge and top-up, updates it)
              against a plain loop of one-row insert transactions on the same
              database, on SQLite and on PostgreSQL (CPUSHARE_BENCH_POSTGRES
              names the database, else a private cluster is started as the
              tests do, with fsync off: compare the ratio, not the rates).

The matching benchmark runs the server's own Market, Board, Orders and
Store in this process on the real reactor and a SQLite file; the sellers
are in-process stand-ins for connections (a real seller connection costs
54 KiB and is measured by bench/run.py's connections benchmark), so what is
measured is the market's work per order, not TLS.  Results go to
bench/results/market_matching.json and market_ledger.json.
"""

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from twisted.internet import defer, task  # noqa: E402

from cpushare.money import MICRO  # noqa: E402
from cpushare.protocol import commands  # noqa: E402
from cpushare.protocol.mux import Routing  # noqa: E402
from cpushare.protocol.states import VMState  # noqa: E402
from cpushare.server.db import leases as leasesql  # noqa: E402
from cpushare.server.db.store import Account  # noqa: E402
from cpushare.server.money import billing
from cpushare.server.money import ledger
from cpushare.server.db import store
from cpushare.server.market.market import Market  # noqa: E402
from cpushare.server.market.orders import PlacedVMs  # noqa: E402
from cpushare.server.market.screens import Screens  # noqa: E402

import stats  # noqa: E402

COUNTRIES = ("IT", "DE", "FR", "US", "JP", "BR", "IN", "SE")


class Heartbeat:
    def __init__(self, latency):
        self.latency = latency

    def latencyMs(self):
        return self.latency


class Control:
    def __init__(self, started):
        self.started = started

    def callRemote(self, command, **kw):
        if command is commands.StartVM:
            self.started[kw["vm"]] = time.perf_counter()
        return defer.succeed({})


class Seller(Routing):
    """What the market needs of a seller's session."""

    role = "seller"
    connected = True

    def __init__(self, sessionId, account, cores, latency, started):
        self.sessionId = sessionId
        self.account = account
        self.offer = {"cores": cores, "memory": cores * 1024}
        self.heartbeat = Heartbeat(latency)
        self.connectedAt = time.time()
        Routing.__init__(self)
        self.vms, self.links, self.stopping = PlacedVMs(), {}, {}
        self.control = Control(started)

    def sendFrame(self, channel, data):
        pass


def populate(cursor, sellers, buyers):
    stamp = store.now()
    ids = {"sellers": [], "buyers": []}
    cursor.execute("INSERT INTO images (sha256, size, stored) VALUES ('bench', 1000, ?)",
                   (stamp,))
    for kind, count in (("sellers", sellers), ("buyers", buyers)):
        for i in range(count):
            cursor.execute("INSERT INTO accounts (name, created) VALUES (?, ?) RETURNING id",
                           (f"{kind}-{i}", stamp))
            ids[kind].append(cursor.fetchone()[0])
    for buyer in ids["buyers"]:
        cursor.execute("INSERT INTO account_images (account_id, sha256, name, uploaded)"
                       " VALUES (?, 'bench', 'bench.iso', ?)", (buyer, stamp))
        ledger.post(cursor, "credit", "bench", [(ledger.GRANTS, None, -1000 * MICRO),
                                                (ledger.FUNDS, buyer, 1000 * MICRO)])
    return ids


async def matching(reactor, folder, sellerCount, orderCount, concurrency, rng, say):
    os.makedirs(folder, exist_ok=True)
    db = store.Store(reactor, os.path.join(folder, "matching.sqlite"))
    db.startService()
    try:
        await db.open()
        ids = await db.run(populate, sellerCount, max(1, orderCount // 10))
        market = Market(reactor, db, credentials=None)
        started = {}
        say(f"  {sellerCount} sellers coming online")
        for n, accountId in enumerate(ids["sellers"]):
            s = Seller(n + 1, Account(accountId, f"sellers-{n}", 0.0), rng.randint(2, 16),
                       rng.uniform(1, 200), started)
            market.sessions[s.sessionId] = s
            await market.board.sellerOnline(
                s, rng.randint(5, 50) * 1000, rng.choice((0, 0, 0, 100_000)),
                rng.choice(COUNTRIES))
        market.board.ranked()

        # The baseline: the same number of bare order inserts.
        t0 = time.perf_counter()
        pending = set()
        for i in range(orderCount):
            d = db.run(store.createOrder, ids["buyers"][i % len(ids["buyers"])], "bench",
                       1, 1, 256)
            pending.add(d)
            d.addBoth(lambda r, d=d: pending.discard(d))
            if len(pending) >= concurrency:
                await defer.DeferredList(list(pending))
        await defer.DeferredList(list(pending))
        baselineSeconds = time.perf_counter() - t0
        say(f"  baseline: {orderCount} bare order inserts in {baselineSeconds:.2f}s")

        placedAt = {}
        orders = []
        for i in range(orderCount):
            screens = {"max_price": rng.randint(20, 60) * 1000}
            if rng.random() < 0.3:
                screens["countries"] = rng.sample(COUNTRIES, 3)
            if rng.random() < 0.3:
                screens["max_latency"] = 150.0
            if rng.random() < 0.2:
                screens["max_net_fee"] = 0
            orders.append((ids["buyers"][i % len(ids["buyers"])], Screens.fromArguments(**screens)))

        allocatedAt = {}

        async def place(i, buyer, screens):
            placedAt[i] = time.perf_counter()
            result = await market.orders.place(Account(buyer, f"b{buyer}", 0.0), "bench",
                                               1, 1, 256, screens)
            if result["allocated"]:
                allocatedAt[i] = time.perf_counter()
            return result["vm_ids"][0]

        vmOf = {}
        t0 = time.perf_counter()
        pending = set()
        for i, (buyer, screens) in enumerate(orders):
            d = defer.ensureDeferred(place(i, buyer, screens))
            d.addCallback(lambda vm, i=i: vmOf.__setitem__(i, vm))
            pending.add(d)
            d.addBoth(lambda r, d=d: pending.discard(d))
            if len(pending) >= concurrency:
                await defer.DeferredList(list(pending))
        await defer.DeferredList(list(pending))
        # Let the last leases be funded and their VMs started.
        deadline = time.perf_counter() + 60
        while len([i for i in vmOf if vmOf[i] in started]) < len(vmOf) and \
                time.perf_counter() < deadline:
            waiting = [vm for vm in market.orders.vms.values() if vm.state == VMState.PENDING]
            if len(started) + len(waiting) >= len(vmOf):
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        latencies = [(started[vmOf[i]] - placedAt[i]) * 1000 for i in vmOf
                     if vmOf[i] in started]
        toAllocation = [(allocatedAt[i] - placedAt[i]) * 1000 for i in allocatedAt]
        allocated = len(latencies)
        last = max(started[vmOf[i]] for i in vmOf if vmOf[i] in started)
        seconds = last - t0
        oversold = sum(1 for s in market.sessions.values()
                       if market.orders.used(s)[0] > s.offer["cores"])
        books = await db.run(ledger.books)
        market.billing.stop()
        market.orders.stop()
        return {
            "sellers": sellerCount,
            "orders": orderCount,
            "concurrency": concurrency,
            "allocated": allocated,
            "waiting": orderCount - allocated,
            "seconds": round(seconds, 3),
            "orders_allocated_per_second": round(allocated / seconds, 1),
            "place_to_allocation_ms": {
                "median": round(statistics.median(toAllocation), 2),
                "p99": round(stats.percentile(toAllocation, 99, "nearest"), 2),
                "max": round(max(toAllocation), 2),
            },
            "place_to_start_ms": {
                "median": round(statistics.median(latencies), 2),
                "p99": round(stats.percentile(latencies, 99, "nearest"), 2),
                "max": round(max(latencies), 2),
            },
            "baseline_inserts_seconds": round(baselineSeconds, 3),
            "baseline_inserts_per_second": round(orderCount / baselineSeconds, 1),
            "ratio_to_baseline": round((allocated / seconds) / (orderCount / baselineSeconds), 3),
            "sellers_oversold": oversold,
            "books_ok": books["ok"],
        }
    finally:
        await db.stopService()


def plainInsert(cursor, i):
    cursor.execute("INSERT INTO bench_plain (n, t) VALUES (?, ?)", (i, store.now()))


def billingSetup(cursor, leases):
    stamp = store.now()
    cursor.execute("CREATE TABLE IF NOT EXISTS bench_plain (n INTEGER, t TEXT)")
    cursor.execute("INSERT INTO images (sha256, size, stored) VALUES ('b', 1, ?)", (stamp,))
    ids = []
    for kind in ("buyer", "seller"):
        cursor.execute("INSERT INTO accounts (name, created) VALUES (?, ?) RETURNING id",
                       (kind, stamp))
        ids.append(cursor.fetchone()[0])
    buyer, seller = ids
    ledger.post(cursor, "credit", "bench", [(ledger.GRANTS, None, -10**6 * MICRO),
                                            (ledger.FUNDS, buyer, 10**6 * MICRO)])
    out = []
    for _ in range(leases):
        orderId, [vmId] = store.createOrder(cursor, buyer, "b", 1, 1, 256)
        out.append(billing.openLease(cursor, vmId, orderId, buyer, seller, "seller", 36_000,
                                     10_000, 1, 0.0))
        # Its VM showed life at once: every bill charges, as a booted VM's do.
        leasesql.showedLife(cursor, out[-1], 0.0)
    return out


def ledgerRun(connect, transact, migrate, label, bills, say):
    conn = connect()
    transact(conn, migrate)
    leases = transact(conn, billingSetup, 100)
    t0 = time.perf_counter()
    for i in range(bills):
        transact(conn, plainInsert, i)
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(bills):
        lease = leases[i % len(leases)]
        t = 10.0 + i
        transact(conn, billing.bill, lease, t * 0.5, i * 1000, t)
    billed = time.perf_counter() - t0
    books = transact(conn, ledger.books)
    conn.close()
    result = {
        "bills": bills,
        "bills_per_second": round(bills / billed, 1),
        "plain_inserts_per_second": round(bills / plain, 1),
        "ratio_to_plain_inserts": round(plain / billed, 3),
        "books_ok": books["ok"],
        "transactions": books["transactions"],
    }
    say(f"  {label}: {result['bills_per_second']:.0f} bills/s, plain inserts "
        f"{result['plain_inserts_per_second']:.0f}/s (ratio {result['ratio_to_plain_inserts']:.2f})")
    return result


def environment():
    return {"cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_at_start": list(os.getloadavg())}


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/market.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1000 sellers and orders: a smoke run")
    p.add_argument("--sellers", type=int, default=None)
    p.add_argument("--orders", type=int, default=None)
    p.add_argument("--concurrency", default="16,64",
                   help="orders in flight at once, one run each (default 16,64)")
    p.add_argument("--bills", type=int, default=None, help="bills per database (default 3000)")
    p.add_argument("--only", default="matching,ledger")
    p.add_argument("--results", default=stats.RESULTS)
    args = p.parse_args(argv)
    sellers = args.sellers or (1000 if args.quick else 10_000)
    orders = args.orders or (1000 if args.quick else 10_000)
    bills = args.bills or (300 if args.quick else 3000)

    def say(text):
        print(text, flush=True)

    stamp = stats.now()
    with tempfile.TemporaryDirectory(prefix="cpushare-bench-market-") as folder:
        if "matching" in args.only:
            async def everyRun(reactor):
                results = []
                for concurrency in [int(c) for c in args.concurrency.split(",")]:
                    say(f"matching: {sellers} sellers, {orders} orders with screens, "
                        f"{concurrency} in flight")
                    results.append(await matching(
                        reactor, os.path.join(folder, f"c{concurrency}"), sellers, orders,
                        concurrency, random.Random(7), say))
                return results

            runs = _runReactor(everyRun)
            for result in runs:
                say(f"  {result['orders_allocated_per_second']:.0f} orders allocated/s; place to "
                    f"allocation median {result['place_to_allocation_ms']['median']:.1f} ms, p99 "
                    f"{result['place_to_allocation_ms']['p99']:.1f} ms; to StartVM (lease "
                    f"funded) median {result['place_to_start_ms']['median']:.1f} ms, p99 "
                    f"{result['place_to_start_ms']['p99']:.1f} ms; baseline "
                    f"{result['baseline_inserts_per_second']:.0f} bare inserts/s; "
                    f"{result['waiting']} orders wait (no seller passes or room left)")
            path = stats.write(stats.resultPath("market_matching", args.results), {
                "when": stamp, "environment": environment(), "quick": args.quick,
                "targets": {"orders_allocated_per_second": 2000, "p99_ms": 20}, "runs": runs})
            say(f"  wrote {path}")
        if "ledger" in args.only:
            say(f"ledger: {bills} bills against {bills} plain insert transactions")
            results = {"sqlite": ledgerRun(
                lambda: store.connect(os.path.join(folder, "ledger.sqlite")),
                store.transact, store.migrate, "SQLite", bills, say)}
            dsn = os.environ.get("CPUSHARE_BENCH_POSTGRES")
            if dsn:
                results["postgresql"] = _postgres(dsn, bills, say)
                results["postgresql"]["server"] = "CPUSHARE_BENCH_POSTGRES"
            else:
                results["postgresql"] = _privatePostgres(bills, say)
            path = stats.write(stats.resultPath("market_ledger", args.results), {
                "when": stamp, "environment": environment(), "quick": args.quick, **results})
            say(f"  wrote {path}")


def _postgres(dsn, bills, say):
    return ledgerRun(lambda: store.connect(dsn), store.transact, store.migrate, "PostgreSQL",
                     bills, say)


def _privatePostgres(bills, say):
    """The ledger run on the tests' private PostgreSQL cluster (fsync off)."""
    from test import postgres
    try:
        server = postgres.start()
    except postgres.Missing as e:
        say(f"  PostgreSQL: skipped: {e}")
        return None
    try:
        url = server.createDatabase()
        try:
            result = _postgres(url, bills, say)
        finally:
            server.dropDatabase(url)
    finally:
        server.close()
    result["server"] = "a private cluster as the tests start it (fsync off)"
    return result


def _runReactor(fn):
    from twisted.internet import reactor
    box = {}

    def run():
        d = defer.ensureDeferred(fn(reactor))
        d.addCallbacks(lambda r: box.setdefault("result", r),
                       lambda f: box.setdefault("failure", f))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    if "failure" in box:
        box["failure"].raiseException()
    return box["result"]


if __name__ == "__main__":
    main()
