"""
The web site's market page against the control command it shows
(run by `make bench`; `bench/site.py --quick` for a smoke run).

    .venv/bin/python bench/site.py [--sellers N] [--rounds N] [--quick]

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
baseline.  Each page's p99 render time is compared with the command's.
Results go to bench/results/site.json.  Nothing here asserts a speed.
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


class Session:
    """What ListSellers' responder needs of a buyer's session."""

    def __init__(self, market, account):
        self.market = market
        self.account = account

    def requireHello(self):
        return self.account


def log(text):
    print(f"[site] {text}", flush=True)


async def measure(reactor, folder, sellerCount, rounds, rng):
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

        times = {name: [] for name in PAGES}
        commandTimes = {name: [] for name in PAGES}
        sizes = {}
        for _ in range(rounds):
            for name, (path, box) in PAGES.items():
                t0 = time.perf_counter()
                page = await browser.get(path)
                times[name].append((time.perf_counter() - t0) * 1000)
                if page.status != 200:
                    raise RuntimeError(f"{path}: {page.status} {page.text[:500]}")
                sizes[name] = len(page.body)
                t0 = time.perf_counter()
                answer = await listSellers(amp.AmpBox(box))
                answer.serialize()
                commandTimes[name].append((time.perf_counter() - t0) * 1000)
                if b"_error_code" in answer:
                    raise RuntimeError(f"ListSellers {box}: {answer}")
        market.billing.stop()
        market.orders.stop()
    finally:
        await db.stopService()
    results = {}
    for name, (path, _) in PAGES.items():
        page, command = stats.summary(times[name]), stats.summary(commandTimes[name])
        results[name] = {"path": path, "page_ms": page, "list_sellers_ms": command,
                         "page_bytes": sizes[name],
                         "p99_ratio": stats.ratio(page["p99"], command["p99"])}
        log(f"{name}: page p99 {page['p99']} ms, ListSellers p99 {command['p99']} ms"
            f" ({results[name]['p99_ratio']}x), {sizes[name]} bytes")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sellers", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="1,000 sellers, 10 rounds")
    p.add_argument("--out", default=stats.resultPath("site"))
    args = p.parse_args(argv)
    if args.quick:
        args.sellers, args.rounds = 1000, 10
    folder = tempfile.mkdtemp(prefix="cpushare-bench-site-")
    commit, dirty = stats.gitState()

    async def run(reactor):
        results = await measure(reactor, folder, args.sellers, args.rounds,
                                random.Random(12))
        stats.write(args.out, {
            "benchmark": "site", "date": stats.now(), "commit": commit, "dirty": dirty,
            "machine": {"cpu": stats.cpuModel(), "python": platform.python_version()},
            "sellers": args.sellers, "rounds": args.rounds, "pages": results,
            "todo": "the VMs page with 1,000 VMs, once /vms is served",
        })
        log(f"wrote {args.out}")

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
