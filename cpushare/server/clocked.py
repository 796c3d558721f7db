"""
A service that does a piece of work now and then every C{every} seconds on
the reactor's clock, running its heavy part off the reactor thread.
"""

import datetime

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.threads import deferToThreadPool


class ClockedService(Service):
    """
    L{start} runs C{first()} at once and returns its Deferred, then calls
    C{repeat()} every C{every} seconds (never, with 0) until the service stops.

    @param inThread: how to run blocking work, C{inThread(f, *args)}
        returning a Deferred; the reactor's thread pool by default.
    """

    def __init__(self, reactor, every, inThread=None):
        self.reactor = reactor
        self.every = every
        if inThread is None:
            inThread = lambda f, *args: deferToThreadPool(
                reactor, reactor.getThreadPool(), f, *args)
        self.inThread = inThread
        self._loop = None

    def now(self):
        return datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.timezone.utc)

    def first(self):
        raise NotImplementedError

    def repeat(self):
        raise NotImplementedError

    def start(self):
        d = self.first()
        if self._loop is None and self.every > 0:
            self._loop = task.LoopingCall(self.repeat)
            self._loop.clock = self.reactor
            self._loop.start(self.every, now=False)
        return d

    def stopService(self):
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
