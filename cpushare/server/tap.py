"""
twistd cpushare-server: the market server.

    twistd -n cpushare-server --data DIR --listen ENDPOINT --hostname NAME [--db URL]
"""

import os

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from cpushare.protocol.heartbeat import DEFAULT_INTERVAL, DEFAULT_TIMEOUT

log = Logger()

DEFAULT_LISTEN = "tcp:7444"


class Options(usage.Options):
    synopsis = "[--data DIR] [--listen ENDPOINT] [--hostname NAME] [--db URL]"
    longdesc = (
        "Run the CPUShare market server.  The first start creates a certificate "
        "authority, the server's certificate for --hostname and, unless --db names "
        "another database, a SQLite database in --data; give DIR/ca.pem to your users."
    )
    optParameters = [
        ["data", "d", "cpushare-data", "Folder for the CA, certificates and database."],
        ["listen", "l", DEFAULT_LISTEN,
         "Twisted server endpoint for client connections (TLS is added)."],
        ["db", None, None,
         "The market's database: postgresql://USER@HOST/DBNAME (a libpq URL; the "
         "password best comes from PGPASSFILE) or sqlite:///PATH.  "
         "Default: the SQLite file market.sqlite in --data."],
        ["hostname", None, "localhost",
         "Name (or address) clients use to reach this server; the server "
         "certificate is issued for it."],
        ["heartbeat", None, DEFAULT_INTERVAL, "Seconds between heartbeats.", float],
        ["timeout", None, DEFAULT_TIMEOUT,
         "Seconds of silence after which a client is declared gone.", float],
        ["image-quota", None, 4096, "Megabytes of images each account may store.", int],
        ["grace", None, 600.0,
         "Seconds a disconnected seller's VMs wait for it to come back before "
         "they are placed elsewhere.", float],
        ["default-price", None, "0.01",
         "Price a core-hour of sellers that never said theirs."],
        ["billing-interval", None, 60.0, "Seconds between bills of each running VM.", float],
        ["hold-window", None, 600.0,
         "Seconds of full-tilt CPU time held from the buyer's funds ahead of each VM.", float],
        ["measure-every", None, 3600.0,
         "Seconds between measurements of each seller's bandwidth (0: never).", float],
    ]

    def postOptions(self):
        if self["heartbeat"] <= 0 or self["timeout"] <= self["heartbeat"]:
            raise usage.UsageError("--timeout must be longer than --heartbeat, both positive")
        from cpushare.money import BadAmount, parseAmount
        try:
            self["default-price"] = parseAmount(self["default-price"], maximum=10**9)
        except BadAmount as e:
            raise usage.UsageError(f"--default-price: {e}")
        if not 0 < self["billing-interval"] < self["hold-window"]:
            raise usage.UsageError(
                "--billing-interval must be positive and shorter than --hold-window")

        from cpushare.server import database

        url = self["db"] or os.path.join(os.path.abspath(self["data"]), "market.sqlite")
        try:
            self["database"] = database.fromURL(url)
        except database.BadURL as e:
            raise usage.UsageError(f"--db: {e}")


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from cpushare.listening import ListeningService
    from cpushare.server.credentials import loadOrCreate
    from cpushare.server.database import Unavailable
    from cpushare.server.images import ImageStore
    from cpushare.server.market import Market
    from cpushare.server.session import MarketFactory
    from cpushare.server.store import Store

    data = os.path.abspath(options["data"])
    credentials = loadOrCreate(data, options["hostname"], log)
    database = options["database"]
    try:
        # Before anything runs: a market without its database exits at once.
        database.check()
    except Unavailable as e:
        raise SystemExit(f"cpushare-server: {e}")
    service = MultiService()
    store = Store(reactor, database)
    store.setServiceParent(service)
    images = ImageStore(reactor, store, os.path.join(data, "images"),
                        quota=options["image-quota"] * 1024 * 1024)
    market = Market(reactor, store, credentials, images,
                    heartbeat=options["heartbeat"], timeout=options["timeout"],
                    defaultPrice=options["default-price"],
                    billingInterval=options["billing-interval"],
                    holdWindow=options["hold-window"],
                    measureEvery=options["measure-every"])
    market.orders.grace = options["grace"]
    market.setServiceParent(service)

    factory = TLSMemoryBIOFactory(credentials.serverTLS(), False, MarketFactory(market))
    ListeningService(
        reactor, serverFromString(reactor, options["listen"]), factory,
        "CPUShare market server", os.path.join(data, "server.address"),
        before=lambda: defer.ensureDeferred(market.open()),
    ).setServiceParent(service)
    return service
