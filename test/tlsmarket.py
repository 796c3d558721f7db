"""
A market server in the test's own process on loopback, with real TLS: for
the tests about TLS, certificates and sockets themselves, and those whose
market talks to other real servers (the fake PayPal over HTTPS).  Market
logic is tested on the market in memory instead (test/fakemarket.py).
"""

import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from cpushare import pki
from cpushare.client.session import connectOnce, endpointFor
from cpushare.server.credentials import loadOrCreate
from cpushare.server.market.market import Market
from cpushare.server.session import MarketFactory
from cpushare.server.db.store import Store

from test.fakemarket import MarketClientMixin


class TLSMarketCase(MarketClientMixin, unittest.TestCase):
    """A market server in this process, on loopback, with real TLS."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.reactor = reactor
        data = tempfile.mkdtemp(prefix="cpushare-test-")
        self.addCleanup(shutil.rmtree, data, True)
        self.credentials = loadOrCreate(data, "localhost")
        self.store = Store(reactor, data + "/market.sqlite")
        self.store.startService()
        self.addCleanup(self.store.stopService)
        yield self.store.open()
        # Heartbeats every second, silence tolerated for 10: a test process
        # starved of CPU for a few seconds (the other test process boots
        # VMs) must not lose its connections.  No test here is about them.
        self.market = Market(reactor, self.store, self.credentials, heartbeat=1, timeout=10)
        self.addCleanup(self.market.orders.stop)
        factory = TLSMemoryBIOFactory(
            self.credentials.serverTLS(), False, MarketFactory(self.market)
        )
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(self.port.stopListening)
        self.portNumber = self.port.getHost().port

    def connect(self, role="buyer", key=None, cert=None, hello=True, ca=None):
        endpoint = endpointFor(
            reactor, "localhost", self.portNumber, ca or self.credentials.caPEM,
            key and pki.keyToPEM(key), cert,
        )
        d = connectOnce(reactor, endpoint, role, hello=hello,
                        host="localhost", port=self.portNumber)
        return d.addCallback(self.closedAtTheEnd)
