"""
twistd cpushare-server: the market server.

    twistd -n cpushare-server --data DIR --listen ENDPOINT --hostname NAME [--db URL]
        [--web ENDPOINT --paypal-client-id ID --paypal-secret-file FILE ...]

PayPal's client secret is read from a file or from $CPUSHARE_PAYPAL_SECRET,
never from the command line: every local user can read a process's
command line (ps, /proc/PID/cmdline), and shells and service managers keep
it in histories and unit files.
"""

import ipaddress
import os

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from cpushare.protocol.heartbeat import DEFAULT_INTERVAL, DEFAULT_TIMEOUT
from cpushare.server.admission import (
    CONNECTIONS_PER_ACCOUNT, UNAUTHENTICATED_PER_ADDRESS, UNAUTHENTICATED_TOTAL)

log = Logger()

DEFAULT_LISTEN = "tcp:7444"
SECRET_VARIABLE = "CPUSHARE_PAYPAL_SECRET"


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
        ["max-uploads", None, 4, "Image uploads one account may have in progress at once.", int],
        ["upload-idle", None, 300.0,
         "Seconds an image upload may go without data before it is discarded.", float],
        ["image-key-file", None, None,
         "The key-encryption key sealing buyers' encrypted images' keys (made 0600 at the "
         "first start; back it up, and keep it off the database's disk).  "
         "Default: image-keys.kek in --data."],
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
        ["cpu-bench-every", None, 21600.0,
         "Seconds between CPU benchmarks of each seller, in a VM on the seller (0: never).",
         float],
        ["cpu-bench-image", None, None,
         "The benchmark ISO (default: built from the reference livecd into --data)."],
        ["cpu-bench-mb", None, 16, "MiB each CPU benchmark hashes.", int],
        ["verdict-timeout", None, 86400.0,
         "Seconds a replica group waits for its replicas' results after the first one"
         " before it is decided with those in.", float],
        ["adaptive-threshold", None, 10,
         "--replicas auto: a seller with fewer consecutive valid results than this always"
         " has its VMs run twice.", int],
        ["canary-every", None, 21600.0,
         "Mean seconds between canaries (known-answer jobs in a VM of the benchmark "
         "image, paid from the market's grants) on each seller, at random (0: never).",
         float],
        ["web", None, None,
         "Twisted server endpoint (or a port number) for the HTTPS web site, where "
         "buyers and sellers log in and PayPal sends buyers back (TLS is added)."],
        ["public-url", None, None,
         "The web endpoint's address as browsers reach it "
         "(default https://HOSTNAME:PORT of --web)."],
        ["web-cert", None, None,
         "Certificate (PEM, chain after it) for the web endpoint; default: the "
         "market's own server certificate."],
        ["web-key", None, None, "The key of --web-cert (PEM)."],
        ["web-proxy", None, "",
         "Addresses (comma-separated) of reverse proxies in front of the web site, whose "
         "X-Forwarded-For header names the browser's address (login limits count it)."],
        ["paypal-mode", None, "sandbox", "PayPal's sandbox or live."],
        ["paypal-client-id", None, None,
         "The PayPal REST app's client id: with it the market takes payments."],
        ["paypal-secret-file", None, None,
         "File holding the PayPal app's secret (else $" + SECRET_VARIABLE + ")."],
        ["paypal-endpoint", None, None,
         "PayPal's API address instead of the mode's (https, or http on loopback)."],
        ["commission", None, "0",
         "The market's commission on funds added, in percent (like 5 or 2.5)."],
        ["payout-minimum", None, "10.00", "The smallest payout a seller may ask for."],
        ["currency", None, "USD", "The market's currency (ISO 4217 code)."],
        ["payout-poll", None, 60.0, "Seconds between asking PayPal about payouts.", float],
        ["registrations-per-address", None, 5,
         "New accounts an hour from one address (an IPv6 /64) (0: no limit).", int],
        ["registrations-per-minute", None, 30,
         "New accounts a minute on the whole market (0: no limit).", int],
        ["rekeys-per-day", None, 5, "Certificates 'cpushare rekey' issues one account a day.",
         int],
        ["access-check", None, 1.0,
         "Seconds between looks for accounts suspended or deleted and certificates revoked "
         "by cpushare-admin, whose connections are then closed.", float],
        ["max-net-fee", None, "1.00",
         "The ceiling on sellers' network fees, a GB: higher terms are refused."],
        ["max-unauthenticated-per-address", None, UNAUTHENTICATED_PER_ADDRESS,
         "Connections one source address may hold open before saying hello "
         "(a TLS handshake, a registration); more are closed at once.", int],
        ["max-unauthenticated", None, UNAUTHENTICATED_TOTAL,
         "Connections all addresses together may hold open before saying hello.", int],
        ["max-connections-per-account", None, CONNECTIONS_PER_ACCOUNT,
         "Connections one account may hold open at once (its seller, its buyer, "
         "its commands); one more is refused, naming the limit.", int],
        ["attest-every", None, 300.0,
         "Seconds between attestations of each TPM-enrolled seller and trusted lease.", float],
        ["trusted-commission", None, "0",
         "The market's commission on the charges of trusted leases, in percent (at most 50)."],
        ["udp-port", None, None,
         "UDP port where sellers learn their public address for direct paths between "
         "them (0: any free one, written to DATA/udp.address; default: none).", int],
    ]

    def __init__(self):
        usage.Options.__init__(self)
        self["tpm-ca"] = []
        self["tpm-test-ca"] = []

    def opt_tpm_ca(self, path):
        """A TPM vendor CA certificate (PEM or DER) whose endorsement certificates the
        market trusts (repeat for each vendor); none: sellers cannot enrol."""
        self["tpm-ca"].append(path)

    def opt_tpm_test_ca(self, path):
        """A test CA (swtpm's) trusted like --tpm-ca: for tests only, said in the log."""
        self["tpm-test-ca"].append(path)

    def postOptions(self):
        if self["heartbeat"] <= 0 or self["timeout"] <= self["heartbeat"]:
            raise usage.UsageError("--timeout must be longer than --heartbeat, both positive")
        from cpushare.money import MAX_PRICE, BadAmount, parseAmount
        try:
            self["default-price"] = parseAmount(self["default-price"], maximum=MAX_PRICE)
        except BadAmount as e:
            raise usage.UsageError(f"--default-price: {e}")
        for name in ("registrations-per-address", "registrations-per-minute"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must be 0 (no limit) or more")
        if not 0 <= self["canary-every"] < float("inf"):
            raise usage.UsageError("--canary-every must be 0 (never) or a number of seconds")
        if self["rekeys-per-day"] < 1:
            raise usage.UsageError("--rekeys-per-day must be 1 or more")
        if not 0 < self["access-check"] <= 60:
            raise usage.UsageError("--access-check must be above 0 and at most 60 seconds")
        try:
            self["max-net-fee"] = parseAmount(self["max-net-fee"], maximum=MAX_PRICE,
                                              allowZero=True)
        except BadAmount as e:
            raise usage.UsageError(f"--max-net-fee: {e}")
        if self["max-unauthenticated-per-address"] < 1 or self["max-unauthenticated"] < 1:
            raise usage.UsageError(
                "--max-unauthenticated-per-address and --max-unauthenticated must be at least 1")
        if self["max-connections-per-account"] < 1:
            raise usage.UsageError("--max-connections-per-account must be at least 1")
        if not 0 < self["verdict-timeout"] <= 365 * 86400:
            raise usage.UsageError("--verdict-timeout must be above 0 and at most a year")
        if not 1 <= self["adaptive-threshold"] <= 10**6:
            raise usage.UsageError("--adaptive-threshold must be 1 to 1000000")
        if not 0 < self["billing-interval"] < self["hold-window"]:
            raise usage.UsageError(
                "--billing-interval must be positive and shorter than --hold-window")
        if self["udp-port"] is not None and not 0 <= self["udp-port"] <= 65535:
            raise usage.UsageError("--udp-port must be 0 (any free port) to 65535")
        if self["max-uploads"] < 1 or self["upload-idle"] <= 0:
            raise usage.UsageError("--max-uploads and --upload-idle must be positive")
        self.postTrustedOptions()

        from cpushare.server.db import database

        url = self["db"] or os.path.join(os.path.abspath(self["data"]), "market.sqlite")
        try:
            self["database"] = database.fromURL(url)
        except database.BadURL as e:
            raise usage.UsageError(f"--db: {e}")
        self.postMoneyOptions(os.environ)

    def postTrustedOptions(self):
        """Check the trusted computing options; load the TPM CAs."""
        from cpushare.server.market.attestation import checkCommission
        from cpushare.server.money import funds

        if not 10 <= self["attest-every"] <= 86400:
            raise usage.UsageError("--attest-every must be 10 to 86400 seconds")
        try:
            self["trusted-commission-rate"] = checkCommission(
                funds.parsePercent(self["trusted-commission"]))
        except ValueError as e:
            raise usage.UsageError(f"--trusted-commission: {e}")
        self["tpm-cas"] = [loadCA(path, option) for option in ("tpm-ca", "tpm-test-ca")
                           for path in self[option]]
        if self["tpm-cas"]:
            from cpushare.attest import libraryMissing
            missing = libraryMissing()
            if missing:
                raise usage.UsageError(f"--tpm-ca: {missing}")

    def postMoneyOptions(self, environ):
        """Check the web, PayPal and money options; read the PayPal secret."""
        from cpushare.money import BadAmount, parseAmount
        from cpushare.server.money import funds
        from cpushare.server.money import paypal

        try:
            self["commission-rate"] = funds.parsePercent(self["commission"])
        except ValueError as e:
            raise usage.UsageError(f"--commission: {e}")
        try:
            self["payout-minimum-micro"] = parseAmount(self["payout-minimum"])
            paypal.paypalDecimal(self["payout-minimum-micro"])
        except BadAmount as e:
            raise usage.UsageError(f"--payout-minimum: {e}")
        currency = self["currency"]
        if not (len(currency) == 3 and currency.isascii() and currency.isupper()
                and currency.isalpha()):
            raise usage.UsageError(f"--currency {currency!r}: give a code like USD or EUR")
        if currency in paypal.WHOLE_UNIT_CURRENCIES:
            raise usage.UsageError(
                f"--currency {currency}: PayPal takes it in whole units only, and the "
                "market's amounts have cents")
        if self["payout-poll"] <= 0:
            raise usage.UsageError("--payout-poll must be positive")
        if (self["web-cert"] is None) != (self["web-key"] is None):
            raise usage.UsageError("--web-cert and --web-key go together")
        if self["web-cert"] is not None:
            from cpushare.server.web import loadWebTLS
            try:
                loadWebTLS(None, self["web-cert"], self["web-key"])
            except OSError as e:
                raise usage.UsageError(f"--web-cert/--web-key: {e.filename}: {e.strerror}")
            except Exception as e:
                raise usage.UsageError(
                    f"--web-cert/--web-key: not a PEM certificate and its key ({e})")
        self["web-proxy"] = [a.strip() for a in self["web-proxy"].split(",") if a.strip()]
        for address in self["web-proxy"]:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise usage.UsageError(f"--web-proxy {address!r}: not an IP address")
        if self["web"] is not None and self["web"].isdigit():
            self["web"] = f"tcp:{self['web']}"
        if self["public-url"] is not None:
            url = self["public-url"].rstrip("/")
            if not url.startswith("https://"):
                raise usage.UsageError(
                    f"--public-url {url!r}: PayPal sends buyers back to it, so it must be https")
            self["public-url"] = url

        self["paypal-secret"] = None
        if self["paypal-client-id"] is None:
            if self["paypal-secret-file"] is not None:
                raise usage.UsageError("--paypal-secret-file needs --paypal-client-id")
            return
        if self["paypal-mode"] not in paypal.MODES:
            raise usage.UsageError(
                f"--paypal-mode {self['paypal-mode']!r}: use {' or '.join(paypal.MODES)}")
        if self["paypal-endpoint"] is not None:
            try:
                self["paypal-endpoint"] = paypal.checkEndpoint(self["paypal-endpoint"])
            except ValueError as e:
                raise usage.UsageError(f"--paypal-endpoint: {e}")
        if self["paypal-secret-file"] is not None:
            try:
                with open(self["paypal-secret-file"], encoding="utf-8") as f:
                    secret = f.read().strip()
            except OSError as e:
                raise usage.UsageError(
                    f"--paypal-secret-file {self['paypal-secret-file']}: {e.strerror}")
        else:
            secret = environ.get(SECRET_VARIABLE, "").strip()
        if not secret:
            raise usage.UsageError(
                "--paypal-client-id needs the app's secret: put it in a file named by "
                f"--paypal-secret-file, or in ${SECRET_VARIABLE} (not on the command line, "
                "where every local user can read it)")
        self["paypal-secret"] = secret
        if self["web"] is None:
            raise usage.UsageError(
                "--paypal-client-id needs --web: PayPal sends buyers back to the market's "
                "web endpoint, where their payments are completed")


def udpInterface(listen):
    """
    The address the UDP port binds: the IPv4 address the --listen endpoint
    names with interface=, so that answers leave from the address sellers
    sent to (a NAT lets in only those), else every IPv4 interface ("").
    """
    for part in listen.split(":"):
        if part.startswith("interface="):
            try:
                return str(ipaddress.IPv4Address(part[len("interface="):]))
            except ValueError:
                return ""
    return ""


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from cpushare.listening import ListeningService
    from cpushare.server.access import RegistrationLimits
    from cpushare.server.credentials import ServerCertificateRenewal, loadOrCreate
    from cpushare.server.db.database import Unavailable
    from cpushare.server.money.desk import MoneyDesk
    from cpushare.server.images import ImageStore
    from cpushare.server.market.market import Market
    from cpushare.server.revocation import RevocationList
    from cpushare.server.session import MarketFactory
    from cpushare.server.db.store import Store

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
                        quota=options["image-quota"] * 1024 * 1024,
                        maxUploads=options["max-uploads"], idleTimeout=options["upload-idle"])
    market = Market(reactor, store, credentials, images,
                    heartbeat=options["heartbeat"], timeout=options["timeout"],
                    defaultPrice=options["default-price"],
                    billingInterval=options["billing-interval"],
                    holdWindow=options["hold-window"],
                    measureEvery=options["measure-every"],
                    maxNetFee=options["max-net-fee"],
                    cpuBench={"every": options["cpu-bench-every"],
                              "image": options["cpu-bench-image"],
                              "mb": options["cpu-bench-mb"], "folder": data},
                    canaries={"every": options["canary-every"]},
                    registrations=RegistrationLimits(
                        reactor, options["registrations-per-address"],
                        options["registrations-per-minute"]),
                    accessCheck=options["access-check"],
                    rekeysPerDay=options["rekeys-per-day"],
                    imageKeyFile=os.path.abspath(
                        options["image-key-file"] or os.path.join(data, "image-keys.kek")),
                    attestations={"cas": options["tpm-cas"], "every": options["attest-every"],
                                  "commission": options["trusted-commission-rate"]})
    for path in options["tpm-test-ca"]:
        log.warn("trusting the TPM test CA {path} (--tpm-test-ca): sellers with a software"
                 " TPM can enrol; never on a real market", path=path)
    market.orders.grace = options["grace"]
    market.orders.verdicts.timeout = options["verdict-timeout"]
    market.orders.verdicts.threshold = options["adaptive-threshold"]
    market.admission.perAddress = options["max-unauthenticated-per-address"]
    market.admission.total = options["max-unauthenticated"]
    market.admission.accounts.perAccount = options["max-connections-per-account"]
    market.setServiceParent(service)
    market.money = money = MoneyDesk(
        reactor, store, paypal=makePayPal(reactor, options), currency=options["currency"],
        commission=options["commission-rate"], payoutMinimum=options["payout-minimum-micro"],
        publicUrl=options["public-url"], pollInterval=options["payout-poll"])
    funds = money.funds
    funds.onCredited = market.orders.retryFunding
    money.setServiceParent(service)

    # The server certificate is renewed while the server runs; with a web
    # endpoint, it serves the CA's revocation list, which certificates name.
    renewal = ServerCertificateRenewal(reactor, credentials)
    renewal.setServiceParent(service)
    revocations = None
    if options["web"] is not None:
        revocations = RevocationList(reactor, store, credentials)
        revocations.setServiceParent(service)
        market.access.listeners.append(revocations.changed)

    async def openAll():
        await market.open()
        await money.open()
        if revocations is not None:
            await revocations.start()

    async def certify(listening):
        await listening()
        if funds.publicUrl is not None and options["web"] is not None:
            credentials.crlUrl = funds.publicUrl + "/ca.crl"
        await renewal.start()

    before = lambda: defer.ensureDeferred(openAll())
    if options["web"] is not None:
        from cpushare.server.site.app import Site
        from cpushare.server.web import WebService, loadWebTLS
        publicUrl = lambda: funds.publicUrl
        market.weblogins.publicUrl = publicUrl
        pages = Site(market, reactor, publicUrl, secure=True,
                     trustedProxies=options["web-proxy"]).resource()
        web = WebService(reactor, serverFromString(reactor, options["web"]),
                         loadWebTLS(credentials, options["web-cert"], options["web-key"]),
                         funds, options["hostname"], data, before=before,
                         revocations=revocations, pages=pages)
        web.setServiceParent(service)
        # Clients are let in once the web endpoint listens, so that the
        # links of their payments have somewhere to go.
        before = web.whenListening
    before = lambda listening=before: defer.ensureDeferred(certify(listening))

    if options["udp-port"] is not None:
        from cpushare.listening import UDPEndpoint
        ListeningService(
            reactor, UDPEndpoint(reactor, options["udp-port"], udpInterface(options["listen"])),
            market.rendezvous,
            "CPUShare mesh rendezvous (UDP)", os.path.join(data, "udp.address"),
        ).setServiceParent(service)
    factory = TLSMemoryBIOFactory(credentials.serverTLS(), False, MarketFactory(market))
    ListeningService(
        reactor, serverFromString(reactor, options["listen"]), factory,
        "CPUShare market server", os.path.join(data, "server.address"),
        before=before,
    ).setServiceParent(service)
    return service


def loadCA(path, option):
    """A CA certificate (PEM or DER) from C{path}; a UsageError naming --C{option} and it."""
    from cryptography import x509
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        raise usage.UsageError(f"--{option} {path}: {e.strerror}")
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise usage.UsageError(f"--{option} {path}: not a certificate (PEM or DER)") from None


def makePayPal(reactor, options):
    """The operator's PayPal, or None when the market takes no payments."""
    if options["paypal-client-id"] is None:
        return None
    from cpushare.server.money.paypal import RESTPayPal
    return RESTPayPal(reactor, options["paypal-mode"], options["paypal-client-id"],
                      options["paypal-secret"], endpoint=options["paypal-endpoint"])
