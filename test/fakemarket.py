"""
A whole market server in memory: a fake clock, SQL run at once on the
calling thread (SQLite in a temporary file), and connections whose TLS
is a stand-in that hands over the client certificate it was given.
Everything is deterministic: no thread, no socket, no timer but the clock.

Two ways in:

- L{MemoryMarket} hands out the server's side of a connection alone, for
  the abuse tests and the fuzzer, which write raw bytes at it and read
  what it wrote back (L{Replies}).
- L{MarketCase} is a trial test case with a market on the clock and real
  client sessions (L{cpushare.client.session}) joined to it through
  in-memory links (L{Loopback}) that carry bytes after a small delay on
  the same clock.  It runs each test by advancing the clock from one
  timer to the next until what the test waits for has happened, so a
  test that waits 30 seconds of the market's time takes milliseconds.
"""

import os
import shutil
import tempfile
import threading
import time

from argon2 import PasswordHasher
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.internet import utils as twistedutils
from twisted.trial import unittest

from cpushare import pki
from cpushare.client.session import connectOnce
from cpushare.protocol import commands, mux
from cpushare.server.db import store as storesql
from cpushare.server.credentials import loadOrCreate
from cpushare.server.images import ImageStore
from cpushare.server.market.market import Market
from cpushare.server.session import MarketFactory
from cpushare.server.db.store import Store


# argon2id at its cheapest: web passwords hashed by the same code, in
# milliseconds rather than 64 MiB and tens of them.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


class SynchronousPool:
    """A thread pool that runs its work at once, on the caller's thread."""

    def callInThreadWithCallback(self, onResult, f, *args, **kw):
        try:
            result = f(*args, **kw)
        except BaseException as e:
            onResult(False, e)
        else:
            onResult(True, result)

    def callInThread(self, f, *args, **kw):
        f(*args, **kw)


class MemoryReactor(MemoryReactorClock):
    """A clock that also runs 'threaded' work synchronously."""

    def __init__(self):
        MemoryReactorClock.__init__(self)
        self._pool = SynchronousPool()

    def getThreadPool(self):
        return self._pool

    def callFromThread(self, f, *args, **kw):
        # Everything here runs on one thread; a real thread calling in
        # would race with the clock, so it is a mistake of the test.
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(f"callFromThread({f!r}) from a thread: run it inline")
        f(*args, **kw)


class InlineStore(Store):
    """The store, running each query at once on the reactor's thread (tests only)."""

    def _submit(self, fn, args):
        return defer.maybeDeferred(self._call, fn, args)


class InlineImageStore(ImageStore):
    """The image store, doing its file work at once on the reactor's thread (tests only)."""

    def inThread(self, fn, *args):
        return defer.maybeDeferred(fn, *args)


class FakeTLSTransport(StringTransport):
    """An in-memory transport that says which client certificate TLS verified."""

    def __init__(self, peerCertificate=None, host="192.0.2.1", port=40000):
        StringTransport.__init__(self, peerAddress=IPv4Address("TCP", host, port))
        self.peerCertificate = peerCertificate
        self.aborted = False

    def getPeerCertificate(self):
        return self.peerCertificate

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


def box(**values):
    """An AMP box as bytes, from keyword arguments that are bytes already."""
    return amp.AmpBox({k.encode(): v for k, v in values.items()}).serialize()


def control(data):
    """Control bytes as multiplexer messages."""
    return b"".join(mux.encode(0, data[i:i + mux.MAX_PAYLOAD])
                    for i in range(0, len(data), mux.MAX_PAYLOAD))


def command(_name, _tag, **arguments):
    return box(_command=_name.encode(), _ask=str(_tag).encode(), **arguments)


class Replies:
    """Parses what the server wrote to one transport: its greeting, then boxes."""

    def __init__(self, transport):
        self.transport = transport
        self.parser = mux.Multiplexer.__new__(mux.Multiplexer)

    def boxes(self):
        data = self.transport.value()
        end = data.index(b"\n") + 1
        stream = b""
        offset = end
        while offset + mux.HEADER_SIZE <= len(data):
            channel, length = mux.HEADER.unpack_from(data, offset)
            payload = data[offset + mux.HEADER_SIZE:offset + mux.HEADER_SIZE + length]
            offset += mux.HEADER_SIZE + length
            if channel == 0:
                stream += payload
        return amp.parseString(stream)

    def answer(self, tag):
        tag = str(tag).encode()
        for b in self.boxes():
            if b.get(b"_answer") == tag or b.get(b"_error") == tag:
                return b
        return None


class LogCapture:
    """Twisted log events while it is installed; C{failures} are those with a traceback."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)

    @property
    def failures(self):
        return [e for e in self.events if "log_failure" in e]

    def texts(self):
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events]


_CREDENTIALS = {}


def credentials():
    """One CA and server certificate for every test in the process (making them is slow)."""
    if "c" not in _CREDENTIALS:
        import atexit
        folder = tempfile.mkdtemp(prefix="cpushare-memmarket-ca-")
        atexit.register(shutil.rmtree, folder, True)
        _CREDENTIALS["c"] = loadOrCreate(folder, "localhost")
    return _CREDENTIALS["c"]


class MemoryMarket:
    """A market on a fake clock with an in-memory view of its connections."""

    def __init__(self, heartbeat=10.0, timeout=45.0):
        self.folder = tempfile.mkdtemp(prefix="cpushare-memmarket-")
        self.reactor = MemoryReactor()
        self.credentials = credentials()
        self.store = InlineStore(self.reactor, os.path.join(self.folder, "market.sqlite"))
        self.store.startService()
        self.store.open()
        self.images = ImageStore(self.reactor, self.store, os.path.join(self.folder, "images"),
                                 quota=64 * 1024 * 1024)
        self.market = Market(self.reactor, self.store, self.credentials, self.images,
                             heartbeat=heartbeat, timeout=timeout, measureEvery=0)
        self.market.weblogins.hasher = CHEAP_HASHER
        self.factory = MarketFactory(self.market)
        self._port = 40000
        self._accounts = {}

    def close(self):
        for session in list(self.market.sessions.values()):
            if session.connected:
                session.connectionLost(_lost())
        self.market.orders.stop()
        self.market.billing.stop()
        self.store.pool.stop()
        shutil.rmtree(self.folder, True)

    def account(self, name):
        """A registered account's certificate, made once per name."""
        if name not in self._accounts:
            key = pki.generateKey()
            c = self.credentials
            certPEM = pki.signClientRequest(c.caKey, c.caCert, pki.makeRequest(key, name), name)
            cert = pki.loadCertificate(certPEM)
            self.store.run(storesql.createAccount, name, pki.fingerprint(cert))
            self._accounts[name] = cert
        return self._accounts[name]

    def connect(self, account=None, host="192.0.2.1", greet=True, handshake=True):
        """
        A new connection to the market, from C{host}, with C{account}'s
        certificate (or none); fires nothing: returns (session, transport).
        """
        self._port += 1
        cert = self.account(account) if account else None
        transport = FakeTLSTransport(cert, host, self._port)
        session = self.factory.buildProtocol(transport.getPeer())
        session.makeConnection(transport)
        if handshake and session.connected:
            session.handshakeCompleted()
        if greet and session.connected:
            session.dataReceived(mux.greeting("peer/1"))
        return session, transport

    def hello(self, session, role="buyer", tag=1):
        session.dataReceived(control(command("Hello", tag, role=role.encode(), software=b"t/1")))
        self.reactor.advance(0)


def _lost():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    return Failure(ConnectionDone())


# -- client sessions joined to the market in memory

# How long a byte takes from one end of a loopback link to the other: the
# heartbeats measure a round trip of twice this.
LINK_DELAY = 0.001
# Bytes a side may have in flight before the link stops its producer, as a
# full socket buffer would.
LINK_BUFFER = 256 * 1024
# The most a protocol is given in one dataReceived, as a reactor reads a socket.
READ_SIZE = 64 * 1024


class Loopback:
    """
    One end of an in-memory link: a transport on a clock.  What is written
    reaches the other end's protocol C{delay} seconds later; closing
    reaches it after what was written before.  The server's end says which
    client certificate the stand-in for TLS verified.
    """

    def __init__(self, reactor, host, peer, delay=LINK_DELAY, peerCertificate=None):
        self.reactor = reactor
        self.host = host
        self.peer = peer
        self.delay = delay
        self.peerCertificate = peerCertificate
        self.protocol = None
        self.other = None
        self.producer = None
        self.disconnecting = False
        self.disconnected = False
        self._outgoing = []
        self._inFlight = 0
        self._sending = None
        self._producerPaused = False
        self._readPaused = False
        self._held = []

    # -- ITransport

    def getHost(self):
        return self.host

    def getPeer(self):
        return self.peer

    def getPeerCertificate(self):
        return self.peerCertificate

    def write(self, data):
        if self.disconnecting or self.disconnected or not data:
            return
        self._outgoing.append(data)
        self._inFlight += len(data)
        if self._sending is None:
            self._sending = self.reactor.callLater(self.delay, self._send)
        if self._inFlight > LINK_BUFFER and self.producer is not None \
                and not self._producerPaused:
            self._producerPaused = True
            self.producer.pauseProducing()

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        if self.disconnecting or self.disconnected:
            return
        self.disconnecting = True
        if self._sending is None:
            self._sending = self.reactor.callLater(self.delay, self._send)

    def abortConnection(self):
        if self.disconnected:
            return
        self._outgoing = []
        self._close(ConnectionAborted(), ConnectionLost("the peer aborted the connection"))

    # -- IConsumer and IPushProducer

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def pauseProducing(self):
        self._readPaused = True

    def resumeProducing(self):
        self._readPaused = False
        if self._held:
            self.reactor.callLater(0, self._release)

    def stopProducing(self):
        self.loseConnection()

    # -- moving bytes

    def _send(self):
        self._sending = None
        if self.disconnected:
            return
        data = b"".join(self._outgoing)
        self._outgoing = []
        self._inFlight = 0
        if data:
            self.other._receive(data)
        if self._producerPaused and self.producer is not None and not self.disconnected:
            self._producerPaused = False
            self.producer.resumeProducing()
        if self.disconnecting and not self._outgoing and self._sending is None \
                and not self.disconnected:
            self._close(ConnectionDone(), ConnectionDone())

    def _receive(self, data):
        if self.disconnected:
            return
        self._held.extend(data[i:i + READ_SIZE] for i in range(0, len(data), READ_SIZE))
        self._release()

    def _release(self):
        while self._held and not self._readPaused and not self.disconnected:
            self.protocol.dataReceived(self._held.pop(0))

    def _close(self, mine, theirs):
        self._ended(mine)
        self.reactor.callLater(self.delay, self.other._ended, theirs)

    def _ended(self, reason):
        if self.disconnected:
            return
        self.disconnected = True
        self.disconnecting = True
        if self._sending is not None and self._sending.active():
            self._sending.cancel()
        self._sending = None
        self._outgoing = []
        self._held = []
        self.protocol.connectionLost(Failure(reason))


class MarketEndpoint:
    """
    A client endpoint to a market in memory: C{connect} joins the client's
    protocol to a new server session by a pair of L{Loopback}s, and the
    server hears the TLS handshake end one link delay later, with the
    certificate C{certPEM} (or none).  Certificates are not checked against
    a CA here: the tests of real TLS do that.
    """

    def __init__(self, reactor, factory, certPEM=None, host="127.0.0.1",
                 delay=LINK_DELAY, ports=None):
        self.reactor = reactor
        self.factory = factory
        self.certificate = pki.loadCertificate(certPEM) if certPEM else None
        self.hostAddress = host
        self.delay = delay
        self._ports = ports if ports is not None else iter(range(40000, 65536))

    def connect(self, clientFactory):
        clientAddress = IPv4Address("TCP", self.hostAddress, next(self._ports))
        serverAddress = IPv4Address("TCP", "127.0.0.1", 7000)
        toServer = Loopback(self.reactor, clientAddress, serverAddress, self.delay)
        toClient = Loopback(self.reactor, serverAddress, clientAddress, self.delay,
                            self.certificate)
        toServer.other, toClient.other = toClient, toServer
        client = clientFactory.buildProtocol(serverAddress)
        server = self.factory.buildProtocol(clientAddress)
        toServer.protocol, toClient.protocol = client, server
        if IHandshakeListener.providedBy(server):
            self.reactor.callLater(self.delay, self._handshake, toClient, server)
        server.makeConnection(toClient)
        client.makeConnection(toServer)
        return defer.succeed(client)

    @staticmethod
    def _handshake(transport, server):
        if not transport.disconnected:
            server.handshakeCompleted()


class Stuck(AssertionError):
    """A test waited for something that nothing scheduled on the clock will bring."""


def runUntil(reactor, d, limit=600.0, wallLimit=120.0, what="the test"):
    """
    Advance C{reactor}'s clock from one timer to the next until C{d} has
    fired.  Fails C{d} with L{Stuck} when nothing is scheduled any more,
    when C{limit} seconds of clock time pass, or when C{wallLimit} real
    seconds pass (a timer that keeps scheduling itself at once).
    """
    deadline = reactor.seconds() + limit
    wallDeadline = time.monotonic() + wallLimit
    turns = 0
    while not d.called:
        reactor.advance(0)
        if d.called:
            break
        pending = [call.getTime() for call in reactor.getDelayedCalls()]
        turns += 1
        if not pending:
            problem = f"{what} waits for something nothing on the clock will do"
        elif min(pending) > deadline:
            problem = f"{what} still waits after {limit:.0f}s of the market's time"
        elif turns % 1000 == 0 and time.monotonic() > wallDeadline:
            problem = f"{what} still waits after {wallLimit:.0f}s of real time"
        else:
            reactor.advance(max(0.0, min(pending) - reactor.seconds()))
            continue
        d.errback(Failure(Stuck(problem)))
    return d


class MarketClientMixin:
    """
    What a market test does besides connecting, whichever way its market
    is reached (in memory here, over TLS in test/tlsmarket.py): wait on
    C{self.reactor}'s clock, register accounts, close sessions.  The test
    case provides C{reactor} and C{connect(role, key, cert, hello)}.
    """

    def sleep(self, seconds):
        """A Deferred that fires after C{seconds} of the market's time."""
        d = defer.Deferred()
        self.reactor.callLater(seconds, d.callback, None)
        return d

    def within(self, d, seconds=5):
        """C{d}, failed with a TimeoutError if it has not fired in C{seconds} of the clock."""
        return d.addTimeout(seconds, self.reactor)

    def take(self, queue, n):
        """The next C{n} items of a DeferredQueue, each within the default time."""
        return defer.gatherResults([self.within(queue.get()) for _ in range(n)])

    # -- clients

    def closedAtTheEnd(self, session):
        """C{session}, closed at the end of the test."""
        self.addCleanup(self.close, session)
        return session

    def close(self, session):
        """Close a client session; fires once both ends know."""
        if session.connected:
            session.transport.loseConnection()
            return session.whenLost()

    @defer.inlineCallbacks
    def register(self, name):
        """Register C{name} as a client does; fires with (key, certificate PEM)."""
        key = pki.generateKey()
        session = yield self.connect(hello=False)
        result = yield session.control.callRemote(
            commands.Register, name=name, csr=pki.makeRequest(key, name)
        )
        yield self.close(session)
        return key, result["certificate"]


class MarketCase(MarketClientMixin, unittest.TestCase):
    """
    A market on a clock (L{MemoryReactor}), its store inline, and real
    client sessions joined to it in memory.  setUp, the test and its
    cleanups run like any trial test returning Deferreds, except that
    while one waits the clock is advanced to its next timer: C{sleep}
    and C{within} count the market's time, not the wall's.

    Subclasses may set C{heartbeat} and C{heartbeatTimeout} (the market's,
    in seconds), and C{withImages} for an image store of C{imageQuota}
    bytes.  A wait fails with L{Stuck} after C{clockLimit} seconds of the
    clock, or trial's C{timeout} of real time.
    """

    heartbeat = 0.2
    heartbeatTimeout = 2
    imageQuota = 3 * 1024 * 1024
    withImages = False
    clockLimit = 600.0

    def _run(self, func, funcDescription, result):
        # trial runs setUp, the test and each cleanup through here; the
        # clock is advanced until what each returned has fired.
        d = defer.maybeDeferred(twistedutils.runWithWarningsSuppressed,
                                self._getSuppress(), func)
        reactor = getattr(self, "reactor", None)
        if reactor is not None:
            runUntil(reactor, d, self.clockLimit, self.getTimeout(),
                     f"{self.id()} ({funcDescription})")
        return d

    def setUp(self):
        self.reactor = MemoryReactor()
        self.folder = tempfile.mkdtemp(prefix="cpushare-fakemarket-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.credentials = credentials()
        self.store = InlineStore(self.reactor, os.path.join(self.folder, "market.sqlite"))
        self.store.startService()
        self.addCleanup(self.store.pool.stop)
        self.images = None
        if self.withImages:
            self.images = InlineImageStore(self.reactor, self.store,
                                           os.path.join(self.folder, "images"),
                                           quota=self.imageQuota)
        self._ports = iter(range(40000, 65536))
        d = self.store.open()
        d.addCallback(lambda _: self.makeMarket())
        return d

    def makeMarket(self, **kw):
        """The market under test; subclasses may pass Market's keyword arguments."""
        self.market = Market(self.reactor, self.store, self.credentials, self.images,
                             heartbeat=self.heartbeat, timeout=self.heartbeatTimeout,
                             **kw)
        self.market.weblogins.hasher = CHEAP_HASHER
        self.addCleanup(self.market.billing.stop)
        self.addCleanup(self.market.orders.stop)
        if self.images is not None:
            self.images.start()
            self.addCleanup(self.images.stop)
        self.factory = MarketFactory(self.market)

    # -- clients

    def endpoint(self, cert=None, host="127.0.0.1"):
        """A client endpoint to this market, with a client certificate (PEM) or none."""
        return MarketEndpoint(self.reactor, self.factory, cert, host, ports=self._ports)

    def connect(self, role="buyer", key=None, cert=None, hello=True, sessionClass=None,
                host="127.0.0.1"):
        """
        A client session (L{cpushare.client.session.ClientSession} or
        C{sessionClass}) connected as C{role} with account credentials
        (C{key} is not needed in memory), once it is ready; closed at the end.
        """
        kw = {"sessionClass": sessionClass} if sessionClass else {}
        d = connectOnce(self.reactor, self.endpoint(cert, host), role, hello=hello,
                        host="localhost", port=7000, **kw)
        return d.addCallback(self.closedAtTheEnd)
