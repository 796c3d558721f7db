"""
The market: who is connected, accounts and registration, the relay, and
the market's services wired together (L{Market}).

What a client may do is decided here and in the services (the board, the
orders, billing, ratings), never in the protocol layer: a session's
responders (L{cpushare.server.session}) decode and check the arguments,
call one of these methods and encode the answer, and the web site calls
the same methods.
"""

import re

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from cpushare import pki
from cpushare.money import formatAmount
from cpushare.protocol import commands
from cpushare.protocol.heartbeat import DEFAULT_INTERVAL, DEFAULT_TIMEOUT
from cpushare.server.db import store
from cpushare.server.access import (
    CHECK_EVERY, REKEYS_PER_DAY, AccessWatch, RegistrationRefused)
from cpushare.server.admission import Admission
from cpushare.server.money.billing import INTERVAL, WINDOW, Billing
from cpushare.server.market.measure import (
    AT_ONCE as MEASURE_AT_ONCE, EVERY as MEASURE_EVERY, BandwidthMeter)
from cpushare.server.market.board import DEFAULT_PRICE, MAX_NET_FEE, OWN_ACCOUNT, Board
from cpushare.server.market.attestation import Attestations
from cpushare.server.market.canary import Canaries
from cpushare.server.market.cpubench import CPUBench
from cpushare.server.market.imagekeys import ImageKeys
from cpushare.server.money.desk import MoneyDesk
from cpushare.server.market.orders import Orders
from cpushare.server.market.ratings import Ratings
from cpushare.server.market.replicas import network as replicaNetwork
from cpushare.server.market.paths import Paths
from cpushare.server.market.rendezvous import Rendezvous
from cpushare.server.market.validation import Validations
from cpushare.server.market.weblogin import WebLogins
from cpushare.server.relay import Relay

ACCOUNT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}\Z")
MAX_CSR = 16 * 1024
KEY_TAKEN = ("this public key already belongs to an account: make a new key for each "
             "account (one account per key)")


class Market(Service):
    log = Logger()

    def __init__(self, reactor, store, credentials, images=None,
                 heartbeat=DEFAULT_INTERVAL, timeout=DEFAULT_TIMEOUT,
                 defaultPrice=DEFAULT_PRICE, billingInterval=INTERVAL, holdWindow=WINDOW,
                 measureEvery=MEASURE_EVERY, cpuBench=None, canaries=None,
                 registrations=None, accessCheck=CHECK_EVERY, rekeysPerDay=REKEYS_PER_DAY,
                 maxNetFee=MAX_NET_FEE, imageKeyFile=None, attestations=None):
        """
        @param cpuBench: keyword arguments of L{CPUBench} plus C{folder},
            where the benchmark image is kept; None: no CPU benchmark.
        @param canaries: keyword arguments of L{Canaries} (their VMs boot the
            benchmark image); None: no canaries.
        @param registrations: a L{cpushare.server.access.RegistrationLimits},
            or None for none (the server's options always give one).
        @param accessCheck: seconds between looks for suspensions, deletions
            and revocations made by cpushare-admin.
        @param imageKeyFile: the file of the key-encryption key that seals
            encrypted images' keys (L{ImageKeys}); None: the market keeps none.
        @param attestations: keyword arguments of L{Attestations} (the TPM
            vendor CAs, how often to attest, the trusted commission).
        """
        self.reactor = reactor
        self.store = store
        self.credentials = credentials
        self.heartbeatInterval = float(heartbeat)
        self.heartbeatTimeout = float(timeout)
        self.sessions = {}
        self.admission = Admission()    # caps on connections before Hello
        self._buyers = {}           # account id -> [buyer sessions], oldest first
        # The services, each given what it uses; only the market wires them.
        self.relay = Relay()
        self.rendezvous = Rendezvous(reactor)  # public UDP addresses, candidates
        self.board = Board(reactor, store, self.sellers, defaultPrice, maxNetFee)
        self.billing = Billing(reactor, store, billingInterval, holdWindow)
        self.orders = Orders(reactor, store, self.relay, self.board, self.billing,
                             self.buyerSession, images)
        self.billing.serve(self.orders)
        # Direct paths between the sellers of one buyer network.
        self.paths = Paths(reactor, counted=self.orders.directCounted)
        self.orders.paths = self.paths
        self.attestations = Attestations(reactor, store, self.board, **(attestations or {}))
        self.attestations.orders = self.orders
        self.orders.attestations = self.attestations
        self.ratings = Ratings(store, self.board.voted)
        self.validations = Validations(store, self.validationChanged, self.board.voted)
        self.orders.verdicts.validated = self.validations.recorded
        self.measureEvery = measureEvery
        self.measureSlots = defer.DeferredSemaphore(MEASURE_AT_ONCE)
        cpuBench = dict(cpuBench or {"every": 0})
        self.cpuBenchFolder = cpuBench.pop("folder", None)
        self.cpubench = CPUBench(reactor, store, self.orders, self.board.invalidate, images,
                                 **cpuBench)
        self.canaries = Canaries(reactor, store, self.orders, self.cpubench, self.board,
                                 **(canaries or {"every": 0}))
        self.imagekeys = None if imageKeyFile is None else ImageKeys(store, images, imageKeyFile)
        self.images = images
        # Balances and statements; PayPal when makeService sets one up.
        self.money = MoneyDesk(reactor, store)
        self.money.funds.onCredited = self.orders.retryFunding
        self._nextSession = 1
        self.registrations = registrations
        self.rekeysPerDay = rekeysPerDay
        self.access = AccessWatch(reactor, self.store, lambda: self.sessions.values(),
                                  accessCheck)
        # Web passwords, login links and browser sessions (the web site's login).
        self.weblogins = WebLogins(reactor, store)

    @property
    def images(self):
        """The image store (L{cpushare.server.images}), or None."""
        return self._images

    @images.setter
    def images(self, images):
        self._images = self.orders.images = self.cpubench.images = images
        if self.imagekeys is not None:
            self.imagekeys.images = images

    def startService(self):
        Service.startService(self)
        if self.images is not None:
            self.images.start()

    def stopService(self):
        Service.stopService(self)
        self.cpubench.stop()
        self.canaries.stop()
        self.access.stop()
        self.billing.stop()
        self.attestations.stop()
        self.orders.stop()
        for session in list(self.sessions.values()):
            session.transport.loseConnection()
        if self.images is not None:
            self.images.stop()

    # -- sessions

    def sessionStarted(self, session):
        session.sessionId = self._nextSession
        self._nextSession += 1
        self.sessions[session.sessionId] = session

    def sessionEnded(self, session, reason):
        if self.sessions.get(session.sessionId) is session:
            del self.sessions[session.sessionId]
        if session.role == "seller":
            self.board.invalidate()
        elif session.role == "buyer" and session.account is not None:
            buyers = self._buyers.get(session.account.id, [])
            if session in buyers:
                buyers.remove(session)
            if not buyers:
                self._buyers.pop(session.account.id, None)
        self.relay.dropSession(session, reason)
        self.rendezvous.forget(session)
        self.cpubench.sessionLost(session)
        self.canaries.sessionLost(session)
        self.orders.sessionLost(session)
        self.paths.sessionLost(session)

    def buyerStarted(self, session):
        """A buyer program said hello: its VMs' NICs now reach it."""
        self._buyers.setdefault(session.account.id, []).append(session)
        self.orders.buyerConnected(session)

    def buyerSession(self, accountId):
        """The account's buyer program's session (the oldest, if several), or None."""
        for s in self._buyers.get(accountId, ()):
            if s.connected:
                return s
        return None

    async def open(self):
        """Open the database and bring back the active VMs: run before listening."""
        await self.store.open()
        if self.imagekeys is not None:
            await self.imagekeys.start()
        await self.access.start()
        await self.orders.load()
        self.billing.start()
        if self.images is not None:
            self.cpubench.forCanaries = bool(self.canaries.every)
            await self.cpubench.prepare(self.cpuBenchFolder)
        self.orders.measuresCPU = self.cpubench.enabled
        if self.attestations.imagekeys is None:
            # The keys of encrypted images, when the market keeps them.
            self.attestations.imagekeys = getattr(self, "imagekeys", None)

    def sellers(self):
        """The sellers online now, ordered by session."""
        return [
            s for _, s in sorted(self.sessions.items())
            if s.role == "seller" and s.offer is not None
        ]

    # -- sellers

    async def offer(self, session, cores, memory, price=None, net_fee=None, country=None,
                    cpu=None, trusted_price=None):
        """
        The seller of C{session} offers C{cores} and C{memory} MB on the terms
        given (None: its stored ones); returns the terms in force.  It is
        ranked, measured, and given the VMs that wait for it.  C{cpu} is
        what it says of its CPU (L{replicas.cpuIdentity}), or None.
        """
        terms = await self.board.sellerOnline(session, price, net_fee, country, trusted_price)
        session.cpu = cpu
        session.network = replicaNetwork(session.peerHost())
        session.offer = {"cores": cores, "memory": memory}
        if session.meter is None and self.measureEvery and session.connected:
            session.meter = BandwidthMeter(
                self.reactor, session, lambda s: self.board.invalidate(),
                self.measureSlots, every=self.measureEvery)
        self.board.invalidate()
        self.orders.capacityChanged()
        self.cpubench.sellerOnline(session)
        self.canaries.sellerOnline(session)
        session.log.info(
            "seller {name} (session {session}) offers {cores} cores, {memory} MB"
            " at {price} a core-hour", name=session.account.name,
            session=session.sessionId, cores=cores, memory=memory,
            price=formatAmount(terms["price"]))
        return terms

    def validationChanged(self, sellerId, validation):
        """
        A verdict or a canary checked a result of the seller C{sellerId}: the
        board screens it on its new counts, and VMs that wait for sellers
        with more validated results may now be placed.
        """
        if self.board.validated(sellerId, validation):
            self.orders.capacityChanged()

    async def setTerms(self, account, price=None, net_fee=None, country=None,
                       trusted_price=None):
        """A seller's account changes its terms; returns those in force."""
        terms = await self.board.setTerms(account.id, price, net_fee, country, trusted_price)
        self.log.info(
            "seller {name} changed its terms: {price} a core-hour, {fee} a GB, {country}",
            name=account.name, price=formatAmount(terms["price"]),
            fee=formatAmount(terms["net_fee"]), country=terms["country"])
        self.orders.capacityChanged()
        return terms

    def listSellers(self, account, screens, explain=False, offset=0, limit=None):
        """
        The sellers online as C{account} sees them for C{screens}: those
        that pass, then (with C{explain}) those that do not, with the
        reason; its own sellers are always listed, as excluded.  Returns
        (entries C{offset} to C{offset + limit}, total, passing): each entry a
        dict with the seller's capacity, figures and C{excluded} (the reason,
        or None).
        """
        passing, excluded = self.board.explain(screens, account.id)
        listed = [(s, fig, None) for s, fig in passing]
        if explain:
            listed += excluded
        else:
            # Its own sellers, which never take its orders, are shown as such.
            listed += [e for e in excluded if e[2].screen == OWN_ACCOUNT]
        end = len(listed) if limit is None else offset + limit
        entries = []
        for s, fig, reason in listed[offset:end]:
            cores, memory = self.orders.used(s)
            entries.append({
                "name": s.account.name,
                "session": s.sessionId,
                "cores": s.offer["cores"],
                "memory": s.offer["memory"],
                "free_cores": max(0, s.offer["cores"] - cores),
                "free_memory": max(0, s.offer["memory"] - memory),
                "connected": s.connectedAt,
                "price": fig.price,
                "net_fee": fig.netFee,
                "rating": fig.rating,
                "votes": fig.votes,
                "latency_ms": fig.latencyMs,
                "country": fig.country,
                "bandwidth_mbps": fig.bandwidthMbps,
                "cpu_score": fig.cpuScore,
                "excluded": None if reason is None else str(reason),
                "cpu": None if fig.cpu is None else "/".join(fig.cpu),
                "validated": fig.validated,
                "error_rate": fig.errorRate,
                "trusted_price": fig.trustedPrice,
                "attested": fig.attested,
                "trust": fig.untrusted,
            })
        return entries, len(listed), len(passing)

    def replicaOutlook(self, account, screens, replicas=None, diverse=None):
        """Whether C{account} could place a replica group now, or what is short (one line)."""
        return self.orders.outlook(account, screens, replicas, diverse)

    # -- channels

    def linkChannel(self, session, channel, peerSessionId, peerChannel):
        """
        Link C{channel} of C{session} to C{peerChannel} of the session
        C{peerSessionId}, which must be of the same account; the peer is told.
        """
        peer = self.sessions.get(peerSessionId)
        if peer is None or peer.account is None or peer.role is None:
            raise commands.NoSuchSession(f"no session {peerSessionId} is connected")
        if peer.account.id != session.account.id:
            raise commands.NotPermitted(
                "channels can be linked only between connections of the same account"
            )
        self.relay.link(session, channel, peer, peerChannel)
        if peer is not session:
            peer.control.callRemote(
                commands.ChannelLinked, channel=peerChannel,
                peer_session=session.sessionId, peer_channel=channel,
            )

    def unlinkChannel(self, session, channel):
        """Unlink C{channel} of C{session}; the other end is told."""
        link = session.links.get(channel)
        if link is None:
            raise commands.BadRequest(f"channel {channel} is not linked")
        others = tuple(s for s in (link.a, link.b) if s is not session)
        self.relay.unlink(link, "unlinked by the peer", notify=others)

    # -- accounts

    def authenticate(self, fingerprint):
        """Fires with (account dict, None) or (None, reason)."""
        return self.store.run(store.accountForCertificate, fingerprint)

    def register(self, name, csrPEM, address=None):
        """
        Create account C{name} for the key in C{csrPEM}, asked from
        C{address} (the peer's host); fires with (certificate PEM, account id).
        """
        if not ACCOUNT_NAME.match(name):
            raise commands.BadRequest(
                f"{name!r} is not a valid account name: use 1 to 32 lowercase "
                "letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if len(csrPEM) > MAX_CSR:
            raise commands.BadRequest("the certificate request is too large")
        token = None
        if self.registrations is not None:
            try:
                token = self.registrations.take(address or "?")
            except RegistrationRefused as e:
                self.log.info("refused a registration of {name!r} from {address}: {why}",
                              name=name, address=address, why=str(e))
                raise commands.NotPermitted(str(e))

        def signed(certPEM):
            cert = pki.loadCertificate(certPEM)
            d = self.store.run(store.createAccount, name, pki.fingerprint(cert),
                               pki.publicKeyFingerprint(cert), pki.serialHex(cert))
            d.addCallback(lambda accountId: (certPEM, accountId))
            return d

        def translate(failure):
            if failure.check(store.NameTaken, store.KeyTaken) and token is not None:
                self.registrations.give(token)
            if failure.check(store.NameTaken):
                raise commands.NameTaken(f"the account name {name!r} is taken")
            if failure.check(store.KeyTaken):
                raise commands.NotPermitted(KEY_TAKEN)
            return failure

        d = self._sign(csrPEM, name)
        d.addCallback(signed)
        d.addErrback(translate)

        def logged(result):
            self.log.info("registered account {name} (id {id}) from {address}",
                          name=name, id=result[1], address=address)
            return result

        return d.addCallback(logged)

    def _sign(self, csrPEM, name):
        """Sign a client's request for account C{name}; fires with the certificate PEM."""
        creds = self.credentials
        # Signing is CPU work: keep it off the reactor thread.
        d = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(),
            pki.signClientRequest, creds.caKey, creds.caCert, csrPEM, name,
            crlUrl=creds.crlUrl,
        )

        def translate(failure):
            failure.trap(pki.BadRequest)
            raise commands.BadRequest(str(failure.value))

        return d.addErrback(translate)

    async def rekey(self, account, current, csrPEM):
        """
        A new certificate for C{account} to replace its certificate
        C{current} (a fingerprint), for the key in C{csrPEM}; fires with the
        certificate PEM.  The old certificate is revoked at the new one's
        first use.
        """
        if len(csrPEM) > MAX_CSR:
            raise commands.BadRequest("the certificate request is too large")
        certPEM = await self._sign(csrPEM, account.name)
        cert = pki.loadCertificate(certPEM)
        try:
            await self.store.run(
                store.addReplacement, account.id, current, pki.fingerprint(cert),
                pki.publicKeyFingerprint(cert), pki.serialHex(cert), self.rekeysPerDay)
        except store.RekeyRefused as e:
            raise commands.NotPermitted(str(e))
        except store.KeyTaken:
            raise commands.NotPermitted(KEY_TAKEN)
        self.log.info("issued account {name} a new certificate (serial {serial})",
                      name=account.name, serial=pki.serialHex(cert))
        return certPEM
