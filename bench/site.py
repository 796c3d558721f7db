"""
The web site's market and VMs pages against the control commands they
show (run by `make bench`; `bench/site.py --quick` for a smoke run).

    .venv/bin/python bench/site.py [--sellers N] [--vms N] [--rounds N] [--quick]

The server's own Market, Board and Store on a SQLite file, in this
process, with SELLERS sellers online (in-process stand-ins for
connections, as bench/market.py's matching benchmark has them, each with
its price, fee, country and latency).  Three pages of the market are
rendered ROUNDS times each, alternating, through the Site (the web port's
twisted.web stack, Klein, Jinja2, as a logged-in browser asks for them):

    first     / : the first page of sellers that pass no screens
    screened  /?max_price=0.03&countries=DE,FR : a screened first page
    explain   /?max_price=0.03&explain=1&offset=5000 : a page of excluded
              sellers with the reason each is excluded

and the same data through the control command ListSellers (its responder,
arguments parsed and the answer serialized as AMP boxes, no socket): the
baseline.

Then the buyer has VMS VMs (orders of 100; each VM ended after a lease on
one of the sellers, charged, a third of them rated), and two pages of
/vms are rendered ROUNDS times each against ListVMs on the same data:

    vms        /vms : the newest page (200 VMs), each with its cost, its
               newest lease's rating button and its actions
    vms_older  /vms?before=N : the third page

Each page's p99 render time is compared with its command's.  Results go
to bench/results/site.json.  Nothing here asserts a speed.
"""

import argparse
import os
import platform
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from twisted.internet import defer, task  # noqa: E402
from twisted.protocols import amp  # noqa: E402

from cpushare.server import web  # noqa: E402
from cpushare.server.db import store  # noqa: E402
from cpushare.protocol import commands  # noqa: E402
from cpushare.server.db.store import Account  # noqa: E402
from cpushare.server.market.market import Market  # noqa: E402
from cpushare.server.session import ServerControl  # noqa: E402
from cpushare.server.site.app import Site  # noqa: E402

import stats  # noqa: E402
from market import COUNTRIES, Seller, populate  # noqa: E402
from test.sitebrowser import Browser  # noqa: E402

PAGES = {
    "first": ("/", {b"offset": b"0"}),
    "screened": ("/?max_price=0.03&countries=DE%2CFR",
                 {b"offset": b"0", b"max_price": b"30000",
                  b"countries": amp.ListOf(amp.Unicode()).toString(["DE", "FR"])}),
    "explain": ("/?max_price=0.03&explain=1&offset=5000",
                {b"offset": b"5000", b"max_price": b"30000", b"explain": b"True"}),
}


def populateVMs(cursor, buyerId, sellerIds, count, rng):
    """
    C{count} ended VMs of the buyer's in orders of 100, each with one
    charged lease on one of C{sellerIds}, a third of them rated: the first
    VM's id.
    """
    stamp = store.now()
    first = None
    for start in range(0, count, 100):
        size = min(100, count - start)
        cursor.execute(
            "INSERT INTO orders (account_id, image, vms, cores, memory, state, created)"
            " VALUES (?, 'bench', ?, 1, 256, 'done', ?) RETURNING id", (buyerId, size, stamp))
        order = cursor.fetchone()[0]
        for i in range(size):
            seller = rng.choice(sellerIds)
            cpu = rng.uniform(60, 7200)
            cursor.execute(
                "INSERT INTO vms (order_id, seller_account_id, mac, state, reason, created,"
                " started, ended, cpu_seconds, ip) VALUES (?, ?, ?, 'stopped',"
                " 'the guest powered off', ?, 1.0e9, 1.0e9 + ?, ?, ?) RETURNING id",
                (order, seller, f"52:54:00:{start // 100:02x}:{i // 256:02x}:{i % 256:02x}",
                 stamp, cpu * 1.1, cpu, f"10.77.{start // 100}.{i + 2}"))
            vm = cursor.fetchone()[0]
            first = first or vm
            cursor.execute(
                "INSERT INTO leases (vm_id, order_id, buyer_account_id, seller_account_id,"
                " price, net_fee, cores, started, ended, cpu_seconds, charged, settled,"
                " reason) VALUES (?, ?, ?, ?, 20000, 0, 1, 1.0e9, 1.0e9 + ?, ?, ?, 1,"
                " 'the guest powered off') RETURNING id",
                (vm, order, buyerId, seller, cpu * 1.1, cpu, int(cpu * 20000 / 3600)))
            lease = cursor.fetchone()[0]
            if rng.random() < 1 / 3:
                cursor.execute(
                    "INSERT INTO ratings (lease_id, seller_account_id, buyer_account_id, good,"
                    " created) VALUES (?, ?, ?, 1, ?)", (lease, seller, buyerId, stamp))
    return first


async def timed(rounds, pages, render, command):
    """
    Each page of C{pages} ({name: (path, box)}) rendered and its command
    answered ROUNDS times, alternating: ({name: [ms]}, {name: [ms]}, {name: bytes}).
    """
    times = {name: [] for name in pages}
    commandTimes = {name: [] for name in pages}
    sizes = {}
    for _ in range(rounds):
        for name, (path, box) in pages.items():
            t0 = time.perf_counter()
            page = await render(path)
            times[name].append((time.perf_counter() - t0) * 1000)
            if page.status != 200:
                raise RuntimeError(f"{path}: {page.status} {page.text[:500]}")
            sizes[name] = len(page.body)
            t0 = time.perf_counter()
            answer = await command(amp.AmpBox(box))
            answer.serialize()
            commandTimes[name].append((time.perf_counter() - t0) * 1000)
            if b"_error_code" in answer:
                raise RuntimeError(f"{name} {box}: {answer}")
    return times, commandTimes, sizes


def summarize(pages, times, commandTimes, sizes, commandName):
    results = {}
    for name, (path, _) in pages.items():
        page, command = stats.summary(times[name]), stats.summary(commandTimes[name])
        results[name] = {"path": path, "page_ms": page, "command": commandName,
                         "command_ms": command, "page_bytes": sizes[name],
                         "p99_ratio": stats.ratio(page["p99"], command["p99"])}
        log(f"{name}: page p99 {page['p99']} ms, {commandName} p99 {command['p99']} ms"
            f" ({results[name]['p99_ratio']}x), {sizes[name]} bytes")
    return results


class Session:
    """What ListSellers' responder needs of a buyer's session."""

    def __init__(self, market, account):
        self.market = market
        self.account = account

    def requireHello(self):
        return self.account


def log(text):
    print(f"[site] {text}", flush=True)


async def measure(reactor, folder, sellerCount, vmCount, rounds, rng):
    db = store.Store(reactor, os.path.join(folder, "site.sqlite"))
    db.startService()
    try:
        await db.open()
        ids = await db.run(populate, sellerCount, 1)
        market = Market(reactor, db, credentials=None)
        log(f"{sellerCount} sellers coming online")
        for n, accountId in enumerate(ids["sellers"]):
            s = Seller(n + 1, Account(accountId, f"sellers-{n}", 0.0), rng.randint(2, 16),
                       rng.uniform(1, 200), {})
            market.sessions[s.sessionId] = s
            await market.board.sellerOnline(
                s, rng.randint(5, 50) * 1000, rng.choice((0, 0, 0, 100_000)),
                rng.choice(COUNTRIES))
        buyer = Account(ids["buyers"][0], "buyers-0", 0.0)
        site = Site(market, reactor, "https://market.example", secure=True)
        browser = Browser(web.WebSite(web.Root(market.money.funds, None, site.resource())))
        browser.cookies[site.cookies[0].decode()] = await market.weblogins.startSession(
            buyer.id)
        control = ServerControl(Session(market, buyer))
        listSellers = control.locateResponder(b"ListSellers")

        results = summarize(PAGES, *await timed(rounds, PAGES, browser.get, listSellers),
                            "ListSellers")

        first = await db.run(populateVMs, buyer.id, ids["sellers"], vmCount, rng)
        log(f"{vmCount} VMs of the buyer's stored")
        older = first + vmCount - 2 * commands.VMS_PAGE
        vmPages = {"vms": ("/vms", {}),
                   "vms_older": (f"/vms?before={older}", {b"before": str(older).encode()})}
        results.update(summarize(
            vmPages, *await timed(rounds, vmPages, browser.get,
                                  control.locateResponder(b"ListVMs")), "ListVMs"))
        market.billing.stop()
        market.orders.stop()
    finally:
        await db.stopService()
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sellers", type=int, default=10_000)
    p.add_argument("--vms", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="1,000 sellers, 500 VMs, 10 rounds")
    p.add_argument("--out", default=stats.resultPath("site"))
    args = p.parse_args(argv)
    if args.quick:
        args.sellers, args.vms, args.rounds = 1000, 500, 10
    folder = tempfile.mkdtemp(prefix="cpushare-bench-site-")
    commit, dirty = stats.gitState()

    async def run(reactor):
        results = await measure(reactor, folder, args.sellers, args.vms, args.rounds,
                                random.Random(12))
        stats.write(args.out, {
            "benchmark": "site", "date": stats.now(), "commit": commit, "dirty": dirty,
            "machine": {"cpu": stats.cpuModel(), "python": platform.python_version()},
            "sellers": args.sellers, "vms": args.vms, "rounds": args.rounds,
            "pages": results,
        })
        log(f"wrote {args.out}")

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
