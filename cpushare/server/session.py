"""
The server side of one client connection: TLS identity, the control
commands, heartbeats and the channels it relays.

The responders only decode: they check the arguments and that the
connection may ask (it said hello, in the right role), call one method
of the market's services (L{cpushare.server.market.market.Market} and
those it wires) and encode the answer.  What the market allows is
decided there, so the web site applies the same rules.
"""

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from cpushare import pki
from cpushare.protocol import commands, paging
from cpushare.protocol.commands import BadRequest, NotAuthenticated
from cpushare.protocol.heartbeat import Heartbeat
from cpushare.protocol.mux import ControlProtocol, MAX_CHANNEL, Multiplexer
from cpushare.server.money.fundscontrol import FundsCommands
from cpushare.server.market.replicas import cpuIdentity
from cpushare.server.market.orders import PlacedVMs
from cpushare.server.market.screens import Screens

REFUSED_GRACE = 5.0
MAX_CORES = 4096
MAX_MEMORY_MB = 64 * 1024 * 1024
MAX_ID = 2**62   # the largest id a list's cursor may name


def _channel(value, what="channel"):
    if not 1 <= value <= MAX_CHANNEL:
        raise BadRequest(f"{what} {value} is out of range (1 to {MAX_CHANNEL})")
    return value


def _cursor(before, what):
    """Check a list's C{before} argument: the id of the last entry of a page."""
    if before is not None and not 0 < before <= MAX_ID:
        raise BadRequest(f"before must be a {what} number from 1 to {MAX_ID}, not {before}")


def pathRow(index, view):
    """A L{cpushare.server.market.paths.PairView} as a ListPaths row."""
    row = {"index": index, "seller_a": view.sellerA, "seller_b": view.sellerB,
           "vms_a": list(view.vmsA), "vms_b": list(view.vmsB), "state": view.state,
           "direct_bytes": view.directBytes}
    if view.rtt is not None:
        row["rtt_ms"] = view.rtt * 1000.0
    if view.why is not None:
        row["why"] = view.why
    return row


class ServerControl(ControlProtocol, FundsCommands):
    """Responders for the commands clients send to the server (money: L{FundsCommands})."""

    def __init__(self, session):
        ControlProtocol.__init__(self)
        self.session = session

    @commands.Register.responder
    def register(self, name, csr):
        session = self.session

        def check(account):
            if account is not None or session.certificate is not None:
                raise BadRequest(
                    "this connection already has a client certificate; "
                    "register from a connection without one"
                )
            return session.market.register(name, csr, session.peerHost())

        def done(result):
            certificate, accountId = result
            return {"certificate": certificate, "account_id": accountId}

        return session.whenAuthenticated().addCallback(check).addCallback(done)

    @commands.Rekey.responder
    def rekey(self, csr):
        session = self.session
        account = session.requireHello()
        d = defer.ensureDeferred(session.market.rekey(account, session.certificate, csr))
        return d.addCallback(lambda certificate: {"certificate": certificate})

    @commands.Hello.responder
    def hello(self, role, software):
        session = self.session
        if role not in commands.ROLES:
            raise BadRequest(f"unknown role {role!r}; expected one of {commands.ROLES}")

        def check(account):
            if account is None:
                session.refuse()
                raise NotAuthenticated(session.refusalAnswer())
            if session.role is not None:
                raise BadRequest("hello was already said on this connection")
            session.started(role, software)
            return {
                "account": account.name,
                "account_id": account.id,
                "session": session.sessionId,
                "heartbeat": session.market.heartbeatInterval,
                "timeout": session.market.heartbeatTimeout,
            }

        return session.whenAuthenticated().addCallback(check)

    @commands.WhoAmI.responder
    def whoami(self):
        account = self.session.requireHello()
        return {
            "name": account.name,
            "account_id": account.id,
            "created": account.created,
            "fingerprint": self.session.certificate,
            "session": self.session.sessionId,
        }

    @commands.SetWebPassword.responder
    def setWebPassword(self, password):
        account = self.session.requireHello()
        d = defer.ensureDeferred(self.session.market.weblogins.setPassword(account, password))
        return d.addCallback(lambda _: {})

    @commands.WebLoginLink.responder
    def webLoginLink(self):
        account = self.session.requireHello()
        d = defer.ensureDeferred(self.session.market.weblogins.loginLink(account))
        return d.addCallback(lambda url: {"url": url})

    @commands.Offer.responder
    def offer(self, cores, memory, price=None, net_fee=None, country=None, cpu_vendor=None,
              cpu_family=None, cpu_model=None, trusted_price=None):
        session = self.session
        session.requireHello()
        if session.role != "seller":
            raise BadRequest("only a seller connection can offer capacity")
        if not 1 <= cores <= MAX_CORES:
            raise BadRequest(f"cores must be between 1 and {MAX_CORES}, not {cores}")
        if not 64 <= memory <= MAX_MEMORY_MB:
            raise BadRequest(f"memory must be between 64 and {MAX_MEMORY_MB} MB, not {memory}")
        cpu = cpuIdentity(cpu_vendor, cpu_family, cpu_model)
        d = defer.ensureDeferred(
            session.market.offer(session, cores, memory, price, net_fee, country, cpu,
                                 trusted_price))
        return d.addCallback(_terms)

    @commands.SetTerms.responder
    def setTerms(self, price=None, net_fee=None, country=None, trusted_price=None):
        account = self.session.requireHello()
        d = defer.ensureDeferred(self.session.market.setTerms(account, price, net_fee, country,
                                                              trusted_price))
        return d.addCallback(_terms)

    @commands.EnrolTPM.responder
    def enrolTPM(self, ek_cert, ek_public, ak_public):
        session = self.session
        session.requireHello()
        session.requireRole("seller")
        d = defer.ensureDeferred(
            session.market.attestations.enrol(session, ek_cert, ek_public, ak_public))
        return d.addCallback(_terms)

    @commands.ActivateTPM.responder
    def activateTPM(self, secret):
        session = self.session
        session.requireHello()
        session.requireRole("seller")
        d = defer.ensureDeferred(session.market.attestations.activate(session, secret))
        return d.addCallback(lambda _: {})

    @commands.ListSellers.responder
    def listSellers(self, offset, explain=False, replicas=None, diverse=None, **screens):
        account = self.session.requireHello()
        if offset < 0:
            raise BadRequest("offset must not be negative")
        screens = Screens.fromArguments(**screens)
        outlook = None
        if replicas is not None or diverse is not None:
            outlook = self.session.market.replicaOutlook(account, screens, replicas, diverse)
        entries, total, passing = self.session.market.listSellers(
            account, screens, explain, offset, commands.SELLERS_PAGE)
        page = []
        for entry in entries:
            if entry["excluded"] is not None:
                entry["excluded"] = paging.clip(entry["excluded"])
            page.append({k: v for k, v in entry.items() if v is not None})
        # Fewer when long reasons would not fit one AMP value: the client
        # asks again from the offset it reached.
        page = paging.fitPage(page, paging.listArgument(commands.ListSellers, "sellers"))
        answer = {"sellers": page, "total": total, "passing": passing}
        if outlook is not None:
            answer["replicas"] = outlook
        return answer

    @commands.ImageUploadStart.responder
    def imageUploadStart(self, sha256, size, name):
        session = self.session
        account = session.requireHello()
        if sha256 in session.uploads:
            if session.uploads[sha256].ended is None:
                raise BadRequest(f"image {sha256} is already being uploaded on this connection")
            del session.uploads[sha256]

        async def start():
            upload = await session.market.images.begin(account, sha256, size, name)
            if upload is None:
                return {"needed": False}
            if not session.connected:
                upload.abort()
                return {"needed": False}
            if sha256 in session.uploads and session.uploads[sha256].ended is None:
                # Another start of the same image was pipelined before this one.
                upload.abort()
                raise BadRequest(f"image {sha256} is already being uploaded on this connection")
            session.uploads[sha256] = upload
            return {"needed": True}

        return defer.ensureDeferred(start())

    def _upload(self, sha256):
        self.session.requireHello()
        upload = self.session.uploads.get(sha256)
        if upload is None:
            raise BadRequest(f"no upload of image {sha256} was started on this connection")
        if upload.ended is not None:
            del self.session.uploads[sha256]
            raise BadRequest(upload.ended)
        return upload

    @commands.ImageUploadChunk.responder
    def imageUploadChunk(self, sha256, offset, data):
        upload = self._upload(sha256)
        if len(data) > commands.IMAGE_CHUNK:
            raise BadRequest(f"chunks are at most {commands.IMAGE_CHUNK} bytes")
        return upload.write(offset, data).addCallback(lambda _: {})

    @commands.ImageUploadFinish.responder
    def imageUploadFinish(self, sha256):
        upload = self._upload(sha256)
        del self.session.uploads[sha256]

        async def finish():
            await self.session.market.images.complete(upload)
            return {}

        return defer.ensureDeferred(finish())

    @commands.ListImages.responder
    def listImages(self, after=None):
        account = self.session.requireHello()
        d = defer.ensureDeferred(self.session.market.images.list(account, after))
        return d.addCallback(lambda page: {"images": page[0], "more": page[1]})

    @commands.SetImageKey.responder
    def setImageKey(self, sha256, key):
        account = self.session.requireHello()
        imagekeys = self.session.market.imagekeys
        if imagekeys is None:
            raise BadRequest("this market keeps no image keys")
        d = defer.ensureDeferred(imagekeys.set(account, sha256, key))
        return d.addCallback(lambda _: {})

    # -- orders and VMs

    @commands.PlaceOrder.responder
    def placeOrder(self, image, vms, cores, memory, budget=None, replicas=None, diverse=None,
                   dry_run=False, explain=False, adaptive=False, compare=False, **screens):
        account = self.session.requireHello()
        orders = self.session.market.orders
        screens = Screens.fromArguments(**screens)
        return defer.ensureDeferred(
            orders.place(account, image, vms, cores, memory, screens, budget, replicas,
                         diverse, dry_run, explain, adaptive=adaptive, compare=compare))

    @commands.ListLeases.responder
    def listLeases(self, before=None):
        account = self.session.requireHello()
        _cursor(before, "lease")
        d = self.session.market.orders.leases(account, before)
        return d.addCallback(lambda page: {"leases": page[0], "more": page[1]})

    @commands.Rate.responder
    def rate(self, lease, good, comment=None):
        account = self.session.requireHello()
        d = defer.ensureDeferred(self.session.market.ratings.rate(account, lease, good, comment))
        return d.addCallback(lambda rated: {"seller": rated.seller, "rating": rated.rating,
                                            "votes": rated.votes})

    @commands.CancelOrder.responder
    def cancelOrder(self, order):
        account = self.session.requireHello()
        d = defer.ensureDeferred(self.session.market.orders.cancel(account, order))
        return d.addCallback(lambda stopped: {"stopped": stopped})

    @commands.ListVMs.responder
    def listVMs(self, all=False, before=None):
        account = self.session.requireHello()
        _cursor(before, "VM")
        d = self.session.market.orders.list(account, before)
        return d.addCallback(lambda page: {"vms": page[0], "more": page[1]})

    @commands.StopVM.responder
    def stopVM(self, vm):
        account = self.session.requireHello()
        self.session.market.orders.stopVM(account, vm)
        return {}

    @commands.AttachConsole.responder
    def attachConsole(self, vm):
        self.session.requireHello()
        return {"channel": self.session.market.orders.attachConsole(self.session, vm)}

    @commands.VMState.responder
    def vmState(self, vm, state, cpu_seconds, reason=None):
        self.session.requireRole("seller")
        self.session.market.orders.vmState(self.session, vm, state, cpu_seconds, reason)
        return {}

    @commands.ResultReady.responder
    def resultReady(self, vm, sha256, size, order=None):
        self.session.requireRole("seller")
        d = defer.ensureDeferred(
            self.session.market.orders.resultReady(self.session, vm, sha256, size))
        return d.addCallback(lambda _: {})

    @commands.ResultChunk.responder
    def resultChunk(self, vm, offset, data, order=None):
        self.session.requireRole("seller")
        d = defer.ensureDeferred(
            self.session.market.orders.resultChunk(self.session, vm, offset, data))
        return d.addCallback(lambda _: {})

    @commands.ListResults.responder
    def listResults(self, order, after=None):
        account = self.session.requireHello()
        d = defer.ensureDeferred(self.session.market.orders.results(account, order, after))
        return d.addCallback(lambda page: {"results": page[0], "more": page[1]})

    @commands.FetchImageChunk.responder
    def fetchImageChunk(self, vm, offset, length):
        self.session.requireRole("seller")
        d = self.session.market.orders.fetchChunk(self.session, vm, offset, length)
        return d.addCallback(lambda data: {"data": data})

    @commands.ReattachVMs.responder
    def reattachVMs(self, vms):
        self.session.requireRole("seller")
        return {"keep": self.session.market.orders.reattach(self.session, vms)}

    @commands.VMAddress.responder
    def vmAddress(self, vm, ip):
        account = self.session.requireRole("buyer")
        self.session.market.orders.vmAddress(account, vm, ip)
        return {}

    @commands.Ping.responder
    def ping(self, nonce):
        result = {"nonce": nonce}
        heartbeat = self.session.heartbeat
        latency = heartbeat.latencyMs() if heartbeat else None
        if latency is not None:
            result["latency_ms"] = latency
        return result

    @commands.MeshToken.responder
    def meshToken(self):
        session = self.session
        session.requireRole("seller")
        rendezvous = session.market.rendezvous
        port = rendezvous.udpPort()
        if port is None:
            raise BadRequest("this market listens on no UDP port (direct paths are off)")
        return {"token": rendezvous.issue(session), "udp_port": port}

    @commands.MeshCandidates.responder
    def meshCandidates(self, candidates):
        session = self.session
        session.requireRole("seller")
        try:
            session.market.rendezvous.setCandidates(
                session, [(c["host"], c["port"]) for c in candidates])
        except ValueError as e:
            raise BadRequest(str(e))
        session.market.paths.candidatesChanged(session)
        return {}

    @commands.MeshReport.responder
    def meshReport(self, paths):
        session = self.session
        session.requireRole("seller")
        session.market.paths.report(session, paths)
        return {}

    @commands.ListPaths.responder
    def listPaths(self, after=None):
        account = self.session.requireHello()
        after = -1 if after is None else after
        views = self.session.market.paths.paths(account.id)
        rows = [pathRow(i, view) for i, view in enumerate(views) if i > after]
        rows, more = paging.pageOf(commands.ListPaths, "paths", rows[:commands.PATHS_PAGE + 1],
                                   commands.PATHS_PAGE)
        return {"paths": rows, "more": more}

    @commands.LinkChannel.responder
    def linkChannel(self, channel, peer_session, peer_channel):
        session = self.session
        session.requireHello()
        _channel(channel)
        _channel(peer_channel, "peer channel")
        session.market.linkChannel(session, channel, peer_session, peer_channel)
        return {}

    @commands.UnlinkChannel.responder
    def unlinkChannel(self, channel):
        session = self.session
        session.requireHello()
        session.market.unlinkChannel(session, channel)
        return {}

    @commands.LinkStats.responder
    def linkStats(self, after=None):
        session = self.session
        session.requireHello()
        after = 0 if after is None else after
        channels = sorted(ch for ch in session.links if ch > after)[:commands.LINKS_PAGE + 1]
        links = [session.links[ch].statsFor(session, ch) for ch in channels]
        links, more = paging.pageOf(commands.LinkStats, "links", links, commands.LINKS_PAGE)
        return {"links": links, "unrouted": session.counters.droppedUnrouted, "more": more}


@implementer(IHandshakeListener)
class MarketSession(Multiplexer):
    """One client's connection to the market."""

    log = Logger()

    def __init__(self, market):
        Multiplexer.__init__(self, market.reactor)
        self.market = market
        self.sessionId = None
        self.account = None
        self.certificate = None
        self.role = None
        self.clientSoftware = None
        self.offer = None
        self.bandwidthMbps = None   # measured by the market (measure.py)
        self.cpuScore = None
        self.trust = None           # its TPM, once enrolled (market/attestation.py)
        self.meshPublic = None      # (host, port) its UDP came from (market/rendezvous.py)
        self.meshCandidates = []    # [(host, port)] it gave for direct paths
        self.tpmChallenge = None    # an enrolment challenge it has to answer
        self.meter = None
        self.heartbeat = None
        self.links = {}
        self.uploads = {}
        self.vms = PlacedVMs()
        self.stopping = {}
        self.connectedAt = None
        self.refusal = None
        self._authenticated = None
        self._authWaiters = []
        self._refuseCall = None
        self._helloDeadline = None
        self._handshakeDone = False
        self._admitted = True
        self._capped = False        # refused: its account holds all it may
        self._silenced = False

    def makeControl(self):
        return ServerControl(self)

    def connectionMade(self):
        self.connectedAt = self.reactor.seconds()
        refusal = self.market.admission.admit(
            self, self.transport.getPeer().host, self.connectedAt)
        if refusal is not None:
            self._admitted = False
            self.transport.abortConnection()
            return
        self.market.sessionStarted(self)
        # A connection that has not said Hello within the heartbeat timeout
        # (stalled handshake, a client that goes quiet, a registration left
        # open) is closed: heartbeats only start after Hello.
        self._helloDeadline = self.reactor.callLater(
            self.market.heartbeatTimeout, self._noHello
        )
        Multiplexer.connectionMade(self)

    def _noHello(self):
        self._helloDeadline = None
        self.log.warn(
            "closing connection {peer}: no hello within {timeout:.0f}s",
            peer=self.describePeer(), timeout=self.market.heartbeatTimeout,
        )
        self.transport.abortConnection()

    def handshakeCompleted(self):
        self._handshakeDone = True
        peerCert = self.transport.getPeerCertificate()
        if peerCert is None:
            self.refusal = (
                "this connection has no client certificate: register first "
                "('cpushare register'), or check the home folder's cert.pem"
            )
            self._setAuthenticated(None)
            return
        self.certificate = pki.fingerprint(peerCert)
        self._authenticate()

    def _authenticate(self):
        # A suspension or revocation read by the market's access watch while
        # this query ran may not be in its answer: then it asks again.
        seen = self.market.access.lastId
        d = self.market.authenticate(self.certificate)

        def found(result):
            account, reason = result
            if account is not None and self.market.access.changedSince(account.id, seen):
                self._authenticate()
                return
            capped = None
            if account is not None and self.connected:
                capped = self.market.admission.accounts.admit(
                    self, account, self.reactor.seconds())
            if capped is not None:
                # The account's other connections are left alone; this one
                # hears why at its Hello and is closed.
                self.refusal = f"refused: {capped}"
                self._capped = True
                self.refuse()
                account = None
            elif account is None:
                self.refusal = f"refused: {reason}"
                self.log.warn(
                    "refusing connection {peer}: {reason}",
                    peer=self.describePeer(), reason=reason,
                )
                self.refuse()
            self.account = account
            self._setAuthenticated(account)

        d.addCallback(found)
        d.addErrback(lambda f: self.log.failure("authenticating {peer}", f,
                                                 peer=self.describePeer()))

    def _setAuthenticated(self, account):
        self._authenticated = (account,)
        waiters, self._authWaiters = self._authWaiters, []
        for d in waiters:
            d.callback(account)

    def whenAuthenticated(self):
        """Fires with the account (a dict), or None when there is none."""
        if self._authenticated is not None:
            return succeed(self._authenticated[0])
        d = Deferred()
        self._authWaiters.append(d)
        return d

    def refuse(self):
        """Close this connection soon, after it has had time to hear why."""
        if not self.connected:
            return
        if self.certificate is None and self.account is None:
            self.log.warn("refusing connection {peer}: no client certificate",
                          peer=self.describePeer())
        if self._refuseCall is None:
            self._refuseCall = self.reactor.callLater(REFUSED_GRACE, self._closeRefused)

    def _closeRefused(self):
        self._refuseCall = None
        if self.connected:
            self.transport.loseConnection()

    def peerHost(self):
        """The peer's address, as registration limits count it."""
        try:
            return self.transport.getPeer().host
        except Exception:
            return "?"

    def accessEnded(self, why):
        """The account was suspended or deleted, or this certificate revoked: close now."""
        if self.account is None:
            return
        self.refusal = f"refused: account {self.account.name!r}: {why}"
        self.log.warn(
            "closing session {session} of account {name} ({peer}): {why}",
            session=self.sessionId, name=self.account.name, peer=self.describePeer(),
            why=why)
        self.transport.abortConnection()

    def refusalAnswer(self):
        """
        Why this connection is refused, for an answer.  A connection refused
        for its account's cap reads nothing more once it has been told: a
        flood of them costs no more than their Hello each.
        """
        if self._capped and not self._silenced:
            self._silenced = True
            self.ignoreInput()
            if self.control is not None:
                self.control.stopReading()
        return self.refusal

    def requireHello(self):
        if self.account is None:
            raise NotAuthenticated(self.refusalAnswer() or "not authenticated")
        if self.role is None:
            raise BadRequest("say hello first")
        return self.account

    def started(self, role, software):
        if self._helloDeadline is not None and self._helloDeadline.active():
            self._helloDeadline.cancel()
        self._helloDeadline = None
        self.market.admission.release(self)
        self.role = role
        self.clientSoftware = software
        self.log.info(
            "{role} {name} connected from {peer} as session {session} ({software})",
            role=role, name=self.account.name, peer=self.describePeer(),
            session=self.sessionId, software=software,
        )
        self.heartbeat = Heartbeat(
            self.reactor, self, self.market.heartbeatInterval,
            self.market.heartbeatTimeout,
        )
        self.heartbeat.start()
        if role == "buyer":
            self.market.buyerStarted(self)

    def requireRole(self, role):
        account = self.requireHello()
        if self.role != role:
            raise BadRequest(f"only a {role} connection may do that")
        return account

    def peerSilent(self, seconds):
        self.log.warn(
            "session {session} ({peer}) silent for {seconds:.1f}s; declaring it gone",
            session=self.sessionId, peer=self.describePeer(), seconds=seconds,
        )
        self.transport.abortConnection()

    def channelUnlinked(self, channel, reason):
        if self.connected:
            self.control.callRemote(commands.ChannelUnlinked, channel=channel, reason=reason)

    def connectionLost(self, reason):
        self.market.admission.release(self)
        self.market.admission.accounts.release(self)
        if not self._admitted:
            Multiplexer.connectionLost(self, reason)
            return
        if self.meter is not None:
            self.meter.stop()
        if not self._handshakeDone:
            why = getattr(self.transport, "cpushareVerifyError", None)
            self.log.warn(
                "TLS handshake with {peer} failed: {why}",
                peer=self.describePeer(),
                why=why or reason.getErrorMessage(),
            )
        elif self.role is not None:
            self.log.info(
                "{role} {name} (session {session}) disconnected: {reason}",
                role=self.role, name=self.account.name, session=self.sessionId,
                reason=reason.getErrorMessage(),
            )
        if self.heartbeat is not None:
            self.heartbeat.stop()
        for call in (self._refuseCall, self._helloDeadline):
            if call is not None and call.active():
                call.cancel()
        for upload in self.uploads.values():
            upload.abort()
        self.uploads = {}
        self.market.sessionEnded(self, "the peer disconnected")
        waiters, self._authWaiters = self._authWaiters, []
        for d in waiters:
            d.callback(None)
        Multiplexer.connectionLost(self, reason)


class MarketFactory(Factory):
    noisy = False

    def __init__(self, market):
        self.market = market

    def buildProtocol(self, addr):
        return MarketSession(self.market)


def _terms(terms):
    """Terms (or another answer) as AMP sends them: what is None left out."""
    return {k: v for k, v in terms.items() if v is not None and k != "trusted_price"}
