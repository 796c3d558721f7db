"""A service that listens on an endpoint and says where, for people and tests."""

import json
import os

from twisted.application.service import Service
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger


class ListeningService(Service):
    """
    Listens with C{factory} on C{endpoint} while running.  Once listening it
    logs the address and, if C{addressFile} is given, writes it there as
    JSON ({"host": ..., "port": ...}) so scripts can find an ephemeral port.
    C{before}, if given, is called first and may return a Deferred: listening
    starts when it fires (the server opens its database that way).  If
    starting fails the reactor is stopped: a server that cannot listen
    should not linger.
    """

    log = Logger()

    def __init__(self, reactor, endpoint, factory, what, addressFile=None, before=None):
        self.reactor = reactor
        self.endpoint = endpoint
        self.factory = factory
        self.what = what
        self.addressFile = addressFile
        self.before = before
        self.port = None

    def startService(self):
        Service.startService(self)
        d = maybeDeferred(self.before or (lambda: None))
        d.addCallback(lambda _: self.endpoint.listen(self.factory))
        d.addCallback(self._listening)
        d.addErrback(self._failed)

    def _listening(self, port):
        self.port = port
        address = port.getHost()
        self.log.info("{what} listening on {host}:{port}", what=self.what,
                      host=address.host, port=address.port)
        if self.addressFile:
            tmp = self.addressFile + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"host": address.host, "port": address.port}, f)
            os.replace(tmp, self.addressFile)
        return port

    def _failed(self, failure):
        self.log.failure("{what} could not start", failure, what=self.what)
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self):
        Service.stopService(self)
        if self.addressFile and os.path.exists(self.addressFile):
            os.remove(self.addressFile)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


class UDPEndpoint:
    """
    A UDP port as L{ListeningService} takes an endpoint: C{listen(protocol)}
    binds C{protocol} (a DatagramProtocol) to C{port} (0: any free one).
    """

    def __init__(self, reactor, port, interface=""):
        self.reactor = reactor
        self.port = port
        self.interface = interface

    def listen(self, protocol):
        return maybeDeferred(self.reactor.listenUDP, self.port, protocol, self.interface)
