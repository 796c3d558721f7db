"""
The long-lived connection of the seller and buyer programs: reconnects by
itself with jittered exponential backoff, and runs a role-specific step on
each new session before it counts as connected.
"""

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.logger import Logger

from cpushare.client.session import ClientSessionFactory, explain

RETRY_INITIAL = 1.0
RETRY_MAX = 30.0


class MarketConnection(MultiService):
    """
    Keeps one session to the market open.  C{onSession(session)} (may return
    a Deferred) runs on each new authenticated session; C{self.session} is
    the current one, or None while disconnected.
    """

    log = Logger()

    def __init__(self, reactor, endpoint, role, onSession=None,
                 sessionClass=None, sessionKw=None, where="the market"):
        MultiService.__init__(self)
        self.reactor = reactor
        self.role = role
        self.onSession = onSession
        self.where = where
        self.session = None
        kw = dict(sessionKw or {})
        if sessionClass:
            kw["sessionClass"] = sessionClass
        self.factory = ClientSessionFactory(reactor, role, **kw)
        self.client = ClientService(
            endpoint, self.factory,
            retryPolicy=backoffPolicy(RETRY_INITIAL, RETRY_MAX),
            clock=reactor, prepareConnection=self._prepare,
        )
        self.client.setServiceParent(self)

    def _prepare(self, proxy):
        # ClientService hands over a proxy of the protocol; everyone else
        # (the session's own callbacks among them) knows the session itself.
        session = self.factory.lastSession
        d = session.ready
        d.addCallback(self._ready, session)
        d.addErrback(self._failed, session)
        return d

    def _ready(self, info, session):
        self.session = session
        self.log.info(
            "connected to {where} as {role} {account} (session {session})",
            where=self.where, role=self.role, account=info["account"],
            session=info["session"],
        )
        session.whenLost().addCallback(self._lost, session)
        if self.onSession is not None:
            return self.onSession(session)

    def _failed(self, failure, session):
        host, _, port = self.where.rpartition(":")
        self.log.warn("could not connect: {why}; will retry", why=explain(failure, host, port))
        return failure

    def _lost(self, _, session):
        if self.session is session:
            self.session = None
        if self.running:
            self.log.warn("lost the connection to {where}: {why}; reconnecting",
                          where=self.where, why=session.lostReason.getErrorMessage())

    def stopService(self):
        # Close through the session's own transport view, which unregisters
        # the multiplexer as producer: a TLS transport with a producer
        # registered waits for it before it closes.
        session = self.factory.lastSession
        if session is not None and session.connected:
            session.transport.loseConnection()
        return MultiService.stopService(self)

    def whenConnected(self):
        return self.client.whenConnected()
