"""
A whole market server in memory, for abuse tests and the fuzzer: a fake
clock, SQL run at once on the calling thread (SQLite in a temporary
file), and connections whose TLS is a stand-in that hands over the
client certificate it was given.  Everything is deterministic: no thread,
no socket, no timer but the clock.
"""

import os
import shutil
import tempfile

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp

from cpushare import pki
from cpushare.protocol import mux
from cpushare.server.db import store as storesql
from cpushare.server.credentials import loadOrCreate
from cpushare.server.market.market import Market
from cpushare.server.session import MarketFactory
from cpushare.server.db.store import Store


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
        f(*args, **kw)


class InlineStore(Store):
    """The store, running each query at once on the reactor's thread (tests only)."""

    def _submit(self, fn, args):
        return defer.maybeDeferred(self._call, fn, args)


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
        from cpushare.server.images import ImageStore
        self.images = ImageStore(self.reactor, self.store, os.path.join(self.folder, "images"),
                                 quota=64 * 1024 * 1024)
        self.market = Market(self.reactor, self.store, self.credentials, self.images,
                             heartbeat=heartbeat, timeout=timeout, measureEvery=0)
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
