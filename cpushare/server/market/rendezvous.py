"""
Where sellers learn their public UDP address and leave their candidates.

A seller asks over its TLS connection for a token (L{Rendezvous.issue}),
sends it in a datagram to the market's UDP port, and hears back the address
and port the datagram came from (L{cpushare.mesh.reflect}); the market keeps
that public address on the seller's session, with the candidate addresses
the seller then gives (L{Rendezvous.setCandidates}) for the brokering of
direct paths between sellers.

Only a datagram carrying a live token of a connected session is answered,
to where it came from, with fewer bytes than it carried, and at most
L{ANSWERS_PER_SOURCE} times a L{RATE_WINDOW} to one source address; anything
else is dropped and counted by reason in L{Rendezvous.drops}.
"""

import collections
import os

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from cpushare.mesh import reflect

#: Seconds a token is good for.
TOKEN_LIFETIME = 60.0
#: Live tokens one session may hold; asking for more forgets its oldest.
TOKENS_PER_SESSION = 4
#: Answers one source address gets a window, and the window in seconds.
ANSWERS_PER_SOURCE = 8
RATE_WINDOW = 10.0
#: Source addresses counted a window; past it, new ones are not answered.
MAX_SOURCES = 100000

# Why a datagram was dropped (the keys of Rendezvous.drops).
MALFORMED = "malformed"
UNKNOWN_TOKEN = "unknown token"
EXPIRED = "expired token"
RATE = "over the rate"


class Rendezvous(DatagramProtocol):
    log = Logger()

    def __init__(self, reactor, random=os.urandom):
        self.reactor = reactor
        self.random = random
        self.tokens = {}            # token -> (session, expires)
        self._bySession = {}        # session -> deque of its tokens, oldest first
        self._answers = collections.Counter()   # source host -> answers this window
        self._windowStart = None
        self.drops = collections.Counter()
        self.answered = 0

    def udpPort(self):
        """The UDP port the market listens on, or None when it listens on none."""
        if self.transport is None:
            return None
        return self.transport.getHost().port

    def issue(self, session):
        """A new token for C{session}, good for L{TOKEN_LIFETIME} seconds."""
        token = self.random(reflect.TOKEN_SIZE)
        own = self._bySession.setdefault(session, collections.deque())
        if len(own) >= TOKENS_PER_SESSION:
            self.tokens.pop(own.popleft(), None)
        own.append(token)
        self.tokens[token] = (session, self.reactor.seconds() + TOKEN_LIFETIME)
        return token

    def forget(self, session):
        """C{session} ended: its tokens are good no more."""
        for token in self._bySession.pop(session, ()):
            self.tokens.pop(token, None)

    def datagramReceived(self, data, addr):
        token = reflect.parseRequest(data)
        if token is None:
            self.drops[MALFORMED] += 1
            return
        found = self.tokens.get(token)
        if found is None:
            self.drops[UNKNOWN_TOKEN] += 1
            return
        session, expires = found
        now = self.reactor.seconds()
        if now >= expires:
            self.drops[EXPIRED] += 1
            return
        host, port = addr[0], addr[1]
        if not self._allowed(host, now):
            self.drops[RATE] += 1
            return
        try:
            reply = reflect.answer(token, host, port)
        except ValueError:
            self.drops[MALFORMED] += 1
            return
        self.transport.write(reply, addr)
        self.answered += 1
        public = (str(reflect.publicAddress(host)), port)
        if getattr(session, "meshPublic", None) != public:
            session.meshPublic = public
            self.log.info("mesh: session {session} has the public address {host}:{port}",
                          session=session.sessionId, host=public[0], port=port)

    def _allowed(self, host, now):
        if self._windowStart is None or now - self._windowStart >= RATE_WINDOW:
            self._windowStart = now
            self._answers.clear()
        if host not in self._answers and len(self._answers) >= MAX_SOURCES:
            return False
        if self._answers[host] >= ANSWERS_PER_SOURCE:
            return False
        self._answers[host] += 1
        return True

    def setCandidates(self, session, candidates):
        """
        Keep C{candidates} ((host, port) pairs) on C{session} after checking
        them (L{reflect.checkCandidates}: ValueError naming the problem).
        """
        checked = reflect.checkCandidates(candidates)
        session.meshCandidates = checked
        self.log.info(
            "mesh: session {session} ({name}) candidates: {candidates}",
            session=session.sessionId, name=session.account.name,
            candidates=", ".join(f"{host}:{port}" for host, port in checked) or "none")
        return checked
