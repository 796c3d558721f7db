"""
The client side of the connection to the market: TLS with the account's
certificate, the multiplexer, heartbeats, and the commands the server sends.
"""

from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

import cpushare
from cpushare import pki
from cpushare.client import marketchecks
from cpushare.protocol import commands, proof
from cpushare.protocol.heartbeat import Heartbeat
from cpushare.protocol.mux import ControlProtocol, Multiplexer, ProtocolError

CONNECT_TIMEOUT = 15


class ConnectError(Exception):
    """Connecting to the market failed; the message says why, for a user."""


def explain(failure, host, port):
    """A one-line reason a user can act on, for a failed connection."""
    value = failure.value
    where = f"{host}:{port}"
    if isinstance(value, ConnectError):
        return str(value)
    if isinstance(value, commands.CPUShareError):
        return str(value)
    if isinstance(value, ProtocolError):
        return f"the server at {where} broke the protocol: {value}"
    if isinstance(value, error.ConnectionRefusedError):
        return f"cannot reach the server at {where}: connection refused"
    if isinstance(value, error.DNSLookupError):
        return f"cannot reach the server at {where}: the name {host!r} does not resolve"
    if isinstance(value, (error.TimeoutError, error.UserError)):
        return f"cannot reach the server at {where}: timed out"
    if isinstance(value, SSL.Error):
        text = str(value)
        if "certificate verify failed" in text:
            return (
                f"the server at {where} is not trusted: its certificate is not "
                f"signed by the CA in ca.pem (wrong --ca, or not a CPUShare market)"
            )
        if "unknown ca" in text or "bad certificate" in text or "certificate required" in text:
            return f"the server at {where} refused this client's certificate ({text})"
        return f"TLS with the server at {where} failed: {text}"
    name = type(value).__name__
    if name == "VerificationError":
        return (
            f"the server at {where} presented a certificate for another name "
            f"(not {host!r})"
        )
    if isinstance(value, (error.ConnectionDone, error.ConnectionLost)):
        return f"the server at {where} closed the connection"
    return f"connection to {where} failed: {failure.getErrorMessage()}"


class ClientControl(ControlProtocol):
    """Responders for the commands the server sends a client."""

    def __init__(self, session):
        ControlProtocol.__init__(self)
        self.session = session

    @commands.Ping.responder
    def ping(self, nonce):
        result = {"nonce": nonce}
        latency = self.session.heartbeat.latencyMs() if self.session.heartbeat else None
        if latency is not None:
            result["latency_ms"] = latency
        return result

    @commands.Probe.responder
    def probe(self, nonce, data, back=None):
        marketchecks.checkProbe(data, back)
        # The answers prove this seller received the bytes, or sent its own.
        result = {"digest": proof.probeDigest(nonce, data)}
        if back:
            result["data"] = proof.probeFill(nonce, max(0, min(back, commands.PROBE_CHUNK)))
        return result

    @commands.ChannelLinked.responder
    def channelLinked(self, channel, peer_session, peer_channel):
        self.session.channelLinked(channel, peer_session, peer_channel)
        return {}

    @commands.ChannelUnlinked.responder
    def channelUnlinked(self, channel, reason):
        self.session.channelUnlinked(channel, reason)
        return {}


class ClientSession(Multiplexer):
    """
    One connection to the market.  C{ready} fires with the server's answer
    to Hello once the connection is authenticated, or fails with the
    reason the connection could not be made.
    """

    log = Logger()
    controlClass = ClientControl

    def __init__(self, reactor, role, hello=True):
        Multiplexer.__init__(self, reactor)
        self.role = role
        self.hello = hello
        self.heartbeat = None
        self.info = None
        self.ready = Deferred()
        self.lostReason = None
        self._lostWaiters = []
        self.linked = {}

    def makeControl(self):
        return self.controlClass(self)

    def greetingReceived(self, version, software):
        if not self.hello:
            self._fireReady(None)
            return
        d = self.control.callRemote(
            commands.Hello, role=self.role, software=f"cpushare/{cpushare.__version__}"
        )
        d.addCallbacks(self._helloed, self._helloFailed)

    def _helloed(self, info):
        try:
            marketchecks.checkHeartbeat(info["heartbeat"], info["timeout"])
        except commands.BadRequest as e:
            self._helloFailed(Failure(ConnectError(f"the market's answer was refused: {e}")))
            return
        self.info = info
        self.heartbeat = Heartbeat(self.reactor, self, info["heartbeat"], info["timeout"])
        self.heartbeat.start()
        self._fireReady(info)

    def _helloFailed(self, failure):
        if not self.ready.called:
            self.ready.errback(failure)
        self.transport.loseConnection()

    def _fireReady(self, info):
        if not self.ready.called:
            self.ready.callback(info)

    def peerSilent(self, seconds):
        self.log.warn("the server has been silent for {seconds:.1f}s; reconnecting",
                      seconds=seconds)
        self.transport.abortConnection()

    def channelLinked(self, channel, peerSession, peerChannel):
        self.linked[channel] = (peerSession, peerChannel)

    def channelUnlinked(self, channel, reason):
        self.linked.pop(channel, None)
        self.log.info("channel {channel} unlinked: {reason}", channel=channel,
                      reason=marketchecks.printable(reason, 200))

    def connectionLost(self, reason):
        if self.heartbeat is not None:
            self.heartbeat.stop()
        Multiplexer.connectionLost(self, reason)
        self.lostReason = reason
        if not self.ready.called:
            self.ready.errback(Failure(self.closeReason) if self.closeReason else reason)
        waiters, self._lostWaiters = self._lostWaiters, None
        for d in waiters:
            d.callback(self)

    def whenLost(self):
        """A Deferred that fires with this session once its connection is gone."""
        d = Deferred()
        if self._lostWaiters is None:
            d.callback(self)
        else:
            self._lostWaiters.append(d)
        return d


class ClientSessionFactory(Factory):
    noisy = False
    def __init__(self, reactor, role, sessionClass=ClientSession, hello=True, **kw):
        self.reactor = reactor
        self.role = role
        self.sessionClass = sessionClass
        self.hello = hello
        self.kw = kw
        self.lastSession = None

    def buildProtocol(self, addr):
        session = self.sessionClass(self.reactor, self.role, hello=self.hello, **self.kw)
        session.factory = self
        self.lastSession = session
        return session


def endpointFor(reactor, host, port, caPEM, keyPEM=None, certPEM=None):
    """A TLS client endpoint to the market, verifying it against C{caPEM}."""
    tcp = HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    return wrapClientTLS(pki.clientTLS(host, caPEM, keyPEM, certPEM), tcp)


def homeEndpoint(reactor, home):
    """
    An endpoint to the home's market with the home's certificate, read
    afresh at every connection: after 'cpushare rekey' a running seller or
    buyer reconnects with the new certificate.
    """
    return HomeEndpoint(reactor, home)


class HomeEndpoint:
    def __init__(self, reactor, home):
        self.reactor = reactor
        self.home = home

    def connect(self, factory):
        from twisted.internet import defer

        from cpushare.client.home import HomeError
        try:
            host, port = self.home.server
            caPEM, keyPEM, certPEM = self.home.credentials()
        except HomeError as e:
            return defer.fail(ConnectError(str(e)))
        return endpointFor(self.reactor, host, port, caPEM, keyPEM, certPEM).connect(factory)


def connectOnce(reactor, endpoint, role, hello=True, host="?", port=0, **kw):
    """
    Connect, wait until the session is ready, and fire with the session.
    Failures are turned into ConnectError with a user-facing reason.
    """
    factory = ClientSessionFactory(reactor, role, hello=hello, **kw)
    d = endpoint.connect(factory)
    d.addCallback(lambda session: session.ready.addCallback(lambda _: session))

    def fail(failure):
        raise ConnectError(explain(failure, host, port))

    return d.addErrback(fail)
