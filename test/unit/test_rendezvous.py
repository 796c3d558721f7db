"""
The market's "where am I" UDP port and the seller's use of it: what a
forger, a flooder or a replayer sends is dropped, counted and never answered;
a seller learns the address the market saw, even through lost datagrams.
"""

import os

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.trial import unittest

from cpushare.client.seller.rendezvous import ANSWER_TIMEOUT, TRIES, MeshPort
from cpushare.client.session import ClientSession
from cpushare.mesh import reflect
from cpushare.protocol import commands
from cpushare.server.market import rendezvous
from cpushare.server.market.rendezvous import Rendezvous
from test.fakemarket import MarketCase

MARKET_PORT = 7445


class FakeUDP:
    """A UDP port's transport that keeps what is written, and to where."""

    def __init__(self, host="0.0.0.0", port=MARKET_PORT, deliver=None):
        self.host = host
        self.port = port
        self.written = []
        self.deliver = deliver

    def getHost(self):
        return IPv4Address("UDP", self.host, self.port)

    def write(self, data, addr):
        self.written.append((data, addr))
        if self.deliver is not None:
            self.deliver(data, addr)


class FakeSession:
    def __init__(self, sessionId):
        self.sessionId = sessionId
        self.meshPublic = None


def listening(clock):
    reflector = Rendezvous(clock)
    reflector.makeConnection(FakeUDP())
    return reflector


class DatagramTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.reflector = listening(self.clock)
        self.session = FakeSession(1)
        self.token = self.reflector.issue(self.session)

    def written(self):
        return self.reflector.transport.written

    def test_noToken(self):
        """A request of the right shape with a token never issued: dropped, unanswered."""
        self.reflector.datagramReceived(reflect.request(os.urandom(16)), ("198.51.100.9", 5000))
        self.assertEqual(self.written(), [])
        self.assertEqual(self.reflector.drops[rendezvous.UNKNOWN_TOKEN], 1)
        self.assertIsNone(self.session.meshPublic)

    def test_wrongToken(self):
        """A token one bit off the issued one is not it."""
        wrong = bytes([self.token[0] ^ 1]) + self.token[1:]
        self.reflector.datagramReceived(reflect.request(wrong), ("198.51.100.9", 5000))
        self.assertEqual(self.written(), [])
        self.assertEqual(self.reflector.drops[rendezvous.UNKNOWN_TOKEN], 1)

    def test_expiredToken(self):
        """After 60 s a token (even seen on the wire) is answered no more."""
        self.clock.advance(rendezvous.TOKEN_LIFETIME)
        self.reflector.datagramReceived(reflect.request(self.token), ("198.51.100.9", 5000))
        self.assertEqual(self.written(), [])
        self.assertEqual(self.reflector.drops[rendezvous.EXPIRED], 1)
        self.assertIsNone(self.session.meshPublic)

    def test_endedSessionsToken(self):
        """The token of a session that ended is dropped; another's is its own only."""
        other = FakeSession(2)
        otherToken = self.reflector.issue(other)
        self.reflector.forget(self.session)
        self.reflector.datagramReceived(reflect.request(self.token), ("198.51.100.9", 5000))
        self.assertEqual(self.written(), [])
        self.assertEqual(self.reflector.drops[rendezvous.UNKNOWN_TOKEN], 1)
        self.reflector.datagramReceived(reflect.request(otherToken), ("198.51.100.7", 6000))
        self.assertEqual(other.meshPublic, ("198.51.100.7", 6000))
        self.assertIsNone(self.session.meshPublic)

    def test_tokensPerSessionBounded(self):
        """A session asking again and again holds 4 live tokens; the oldest go."""
        tokens = [self.reflector.issue(self.session) for _ in range(100)]
        self.assertEqual(len(self.reflector.tokens), rendezvous.TOKENS_PER_SESSION)
        self.reflector.datagramReceived(reflect.request(self.token), ("198.51.100.9", 5000))
        self.assertEqual(self.written(), [])
        self.reflector.datagramReceived(reflect.request(tokens[-1]), ("198.51.100.9", 5000))
        self.assertEqual(len(self.written()), 1)

    def test_malformed(self):
        """Short, long, oversized or of another type: dropped before any lookup."""
        good = reflect.request(self.token)
        for data in (b"", good[:-1], good + b"\0", good * 40, bytes(65507),
                     bytes([2]) + good[1:], good[:1] + bytes([reflect.HERE]) + good[2:]):
            self.reflector.datagramReceived(data, ("198.51.100.9", 5000))
        self.assertEqual(self.written(), [])
        self.assertEqual(self.reflector.drops[rendezvous.MALFORMED], 7)

    def test_flood(self):
        """A flood of good requests from one address gets 8 answers a window, no more."""
        request = reflect.request(self.token)
        for port in range(1000):
            self.reflector.datagramReceived(request, ("198.51.100.9", 1024 + port))
        self.assertEqual(len(self.written()), rendezvous.ANSWERS_PER_SOURCE)
        self.assertEqual(self.reflector.drops[rendezvous.RATE], 1000 - rendezvous.ANSWERS_PER_SOURCE)
        received = 1000 * len(request)
        sent = sum(len(data) for data, _ in self.written())
        self.assertLess(sent, received)
        # Another address is not starved, and the next window answers again.
        self.reflector.datagramReceived(request, ("198.51.100.10", 5000))
        self.assertEqual(len(self.written()), rendezvous.ANSWERS_PER_SOURCE + 1)
        self.clock.advance(rendezvous.RATE_WINDOW)
        self.reflector.datagramReceived(request, ("198.51.100.9", 5000))
        self.assertEqual(len(self.written()), rendezvous.ANSWERS_PER_SOURCE + 2)

    def test_answer(self):
        """A good request is answered to its source with exactly that address, shorter."""
        request = reflect.request(self.token)
        self.reflector.datagramReceived(request, ("203.0.113.7", 40000))
        [(data, addr)] = self.written()
        self.assertEqual(addr, ("203.0.113.7", 40000))
        self.assertLessEqual(len(data), len(request))
        self.assertEqual(reflect.parseAnswer(data), (self.token, "203.0.113.7", 40000))
        self.assertEqual(self.session.meshPublic, ("203.0.113.7", 40000))

    def test_answerIPv6(self):
        """An IPv6 source is told as such; an IPv4-mapped one as IPv4."""
        request = reflect.request(self.token)
        self.reflector.datagramReceived(request, ("2001:db8::7", 40001, 0, 0))
        self.reflector.datagramReceived(request, ("::ffff:203.0.113.8", 40002, 0, 0))
        answers = [reflect.parseAnswer(data) for data, _ in self.written()]
        self.assertEqual(answers, [(self.token, "2001:db8::7", 40001),
                                   (self.token, "203.0.113.8", 40002)])


class CandidateTests(unittest.TestCase):
    def test_refused(self):
        """Each bad candidate is refused with a message naming it."""
        cases = [
            (("224.0.0.1", 5000), "224.0.0.1"),
            (("ff02::1", 5000), "ff02::1"),
            (("255.255.255.255", 5000), "255.255.255.255"),
            (("0.0.0.0", 5000), "0.0.0.0"),
            (("example.com", 5000), "example.com"),
            (("10.0.0.1", 0), "port 0"),
            (("10.0.0.1", 65536), "port 65536"),
        ]
        for (host, port), named in cases:
            with self.assertRaises(ValueError) as caught:
                reflect.checkCandidates([(host, port)])
            self.assertIn(named, str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            reflect.checkCandidates([("10.0.0.1", 1000 + i) for i in range(9)])
        self.assertIn("at most 8", str(caught.exception))

    def test_accepted(self):
        """Literals are made canonical and duplicates left out."""
        self.assertEqual(
            reflect.checkCandidates([("203.0.113.7", 40000), ("::ffff:203.0.113.7", 40000),
                                     ("2001:DB8::1", 1), ("10.0.0.2", 65535)]),
            [("203.0.113.7", 40000), ("2001:db8::1", 1), ("10.0.0.2", 65535)])


class MarketCommandTests(MarketCase):
    """MeshToken and MeshCandidates through a seller's real session."""

    @defer.inlineCallbacks
    def seller(self, name="alice", role="seller"):
        key, cert = yield self.register(name)
        session = yield self.connect(role=role, cert=cert)
        return session

    def marketSide(self):
        [session] = [s for s in self.market.sessions.values() if s.role == "seller"]
        return session

    @defer.inlineCallbacks
    def test_noUDPPort(self):
        """A market without --udp-port says so; the seller is told, not broken."""
        session = yield self.seller()
        e = yield self.assertFailure(session.control.callRemote(commands.MeshToken),
                                     commands.BadRequest)
        self.assertIn("no UDP port", str(e))

    @defer.inlineCallbacks
    def test_buyerRefused(self):
        """Only sellers take part in direct paths."""
        self.market.rendezvous.makeConnection(FakeUDP())
        session = yield self.seller(role="buyer")
        e = yield self.assertFailure(session.control.callRemote(commands.MeshToken),
                                     commands.BadRequest)
        self.assertIn("seller", str(e))

    @defer.inlineCallbacks
    def test_badCandidates(self):
        """Candidates a peer could not send to are refused, naming the first bad one."""
        self.market.rendezvous.makeConnection(FakeUDP())
        session = yield self.seller()
        for candidates, named in (
                ([{"host": "239.1.2.3", "port": 5000}], "239.1.2.3"),
                ([{"host": "10.0.0.1", "port": 70000}], "70000"),
                ([{"host": "10.0.0.1", "port": 1000 + i} for i in range(9)], "at most 8")):
            e = yield self.assertFailure(
                session.control.callRemote(commands.MeshCandidates, candidates=candidates),
                commands.BadRequest)
            self.assertIn(named, str(e))
        self.assertEqual(self.marketSide().meshCandidates, [])

    @defer.inlineCallbacks
    def test_sellerLearnsItsNATAddress(self):
        """
        A seller behind a NAT whose first two requests are lost learns the
        NAT's address and port, and the market keeps its candidates.
        """
        reflector = self.market.rendezvous
        reflector.makeConnection(FakeUDP())
        session = yield self.seller()
        port = MeshPort(self.reactor, given=True)
        lost = []

        def toMarket(data, addr):
            self.assertEqual(addr, ("192.0.2.1", MARKET_PORT))
            if len(lost) < 2:
                lost.append(data)
                return
            # The NAT rewrites the source; the answer comes back through it.
            reflector.datagramReceived(data, ("203.0.113.7", 40000))

        # The market answers from another of its addresses (the interface
        # that leads back): the token, not the address, makes it the answer.
        reflector.transport.deliver = lambda data, addr: self.reactor.callLater(
            0.01, port.datagramReceived, data, ("192.0.2.99", MARKET_PORT))
        port.makeConnection(FakeUDP(host="10.0.0.5", port=4500, deliver=toMarket))
        # A forged answer from elsewhere is ignored.
        port.datagramReceived(reflect.answer(b"x" * 16, "198.51.100.1", 1), ("198.51.100.1", 7))
        public = yield port.discover(session, "192.0.2.1")
        self.assertEqual(public, ("203.0.113.7", 40000))
        self.assertEqual(len(lost), 2)
        self.assertEqual(self.marketSide().meshPublic, ("203.0.113.7", 40000))
        self.assertEqual(self.marketSide().meshCandidates,
                         [("203.0.113.7", 40000), ("10.0.0.5", 4500)])

    @defer.inlineCallbacks
    def test_marketSilent(self):
        """A market whose UDP port never answers: the seller gives up after its tries."""
        self.market.rendezvous.makeConnection(FakeUDP())
        session = yield self.seller()
        port = MeshPort(self.reactor)
        sent = FakeUDP(port=4500)
        port.makeConnection(sent)
        started = self.reactor.seconds()
        public = yield port.discover(session, "192.0.2.1")
        self.assertIsNone(public)
        self.assertEqual(len(sent.written), TRIES)
        self.assertLess(abs(self.reactor.seconds() - started - TRIES * ANSWER_TIMEOUT), 0.5)
        self.assertEqual(self.marketSide().meshCandidates, [])
