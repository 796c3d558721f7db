"""
Hostile clients at the market server, in memory on a fake clock: floods
of connections that never authenticate, stalled handshakes, refusals of
connections already gone, and values no field can hold.
"""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from cpushare.server import admission
from cpushare.server.session import REFUSED_GRACE, MarketFactory
from test.fakemarket import LogCapture, MemoryMarket, Replies, command, control


@pytest.fixture
def mm():
    m = MemoryMarket(timeout=45.0)
    yield m
    m.close()


def gone():
    return Failure(ConnectionDone())


# -- deadlines


def test_a_stalled_tls_handshake_is_closed_at_the_hello_deadline(mm):
    factory = TLSMemoryBIOFactory(mm.credentials.serverTLS(), False, MarketFactory(mm.market))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 5000))
    tls = factory.buildProtocol(transport.getPeer())
    tls.makeConnection(transport)
    tls.dataReceived(b"\x16\x03\x01")        # the start of a ClientHello, then nothing
    assert mm.market.admission.unauthenticated == 1
    mm.reactor.advance(44)
    assert not transport.disconnecting
    mm.reactor.advance(2)
    assert transport.disconnecting
    tls.connectionLost(gone())
    assert mm.market.admission.unauthenticated == 0
    assert mm.market.sessions == {}


def test_a_registration_held_open_is_closed_at_the_hello_deadline(mm):
    session, transport = mm.connect(None)    # no certificate: may only register
    session.dataReceived(control(command("Register", 1, name=b"bob", csr=b"junk")))
    mm.reactor.advance(0)
    assert Replies(transport).answer(1)[b"_error_code"] == b"BAD_REQUEST"
    mm.reactor.advance(46)
    assert transport.aborted


# -- caps on connections before Hello


def test_connections_before_hello_are_capped_per_address_and_hello_frees_a_slot(mm):
    cap = admission.UNAUTHENTICATED_PER_ADDRESS
    sessions = [mm.connect("alice", host="198.51.100.7") for _ in range(cap)]
    assert not any(t.disconnecting for _, t in sessions)
    with LogCapture() as log:
        extra, t = mm.connect("alice", host="198.51.100.7")
        assert t.disconnecting
        assert not extra.connected or extra._closing or t.disconnecting
        more, t2 = mm.connect("alice", host="198.51.100.7")
        assert t2.disconnecting
    # One line for both refusals, naming the cap; no traceback.
    lines = [line for line in log.texts() if "refusing new connections" in line]
    assert len(lines) == 1 and f"(limit {cap})" in lines[0]
    assert not log.failures
    # Another address is not affected.
    other, t3 = mm.connect("alice", host="198.51.100.8")
    assert not t3.disconnecting
    # A connection that said hello no longer counts; one that closed neither.
    mm.hello(sessions[0][0])
    assert sessions[0][0].role == "buyer"
    again, t4 = mm.connect("alice", host="198.51.100.7")
    assert not t4.disconnecting
    sessions[1][0].connectionLost(gone())
    again2, t5 = mm.connect("alice", host="198.51.100.7")
    assert not t5.disconnecting
    assert mm.market.admission.refused == 2


def test_connections_before_hello_are_capped_in_all(mm):
    mm.market.admission.total = 5
    for i in range(5):
        assert not mm.connect(None, host=f"203.0.113.{i}")[1].disconnecting
    assert mm.connect(None, host="203.0.113.99")[1].disconnecting


# -- refusals


def test_refusing_a_connection_already_gone_logs_no_traceback_and_leaves_no_timer(mm):
    factory = TLSMemoryBIOFactory(mm.credentials.serverTLS(), False, MarketFactory(mm.market))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 5000))
    tls = factory.buildProtocol(transport.getPeer())
    tls.makeConnection(transport)
    session = tls.wrappedProtocol
    with LogCapture() as log:
        tls.connectionLost(gone())
        session.refuse()
        assert mm.reactor.getDelayedCalls() == []
        mm.reactor.advance(REFUSED_GRACE + 1)
    assert not log.failures


def test_a_hello_waiting_for_authentication_when_the_peer_leaves_logs_no_traceback(mm):
    session, transport = mm.connect("alice", handshake=False)
    with LogCapture() as log:
        session.dataReceived(control(command("Hello", 1, role=b"seller", software=b"x")))
        session.connectionLost(gone())
        mm.reactor.advance(REFUSED_GRACE + 1)
    assert not log.failures


# -- values no field can hold


@pytest.mark.parametrize("name, arguments, words", [
    ("Offer", dict(cores=b"2", memory=b"512", price=b"9223372036854775808"),
     b"price: 9223372036854775808 is out of range"),
    ("Offer", dict(cores=b"two", memory=b"512"), b"cores: 'two' is not an integer"),
    ("ListSellers", dict(offset=b"-99999999999999999999"), b"offset: -99999999999999999999 is out"),
    ("ListSellers", dict(offset=b"0", min_rating=b"nan"), b"min_rating: 'nan' is not a finite"),
    ("PlaceOrder", dict(image=b"x", vms=b"1", cores=b"1"), b"memory: missing"),
    ("Rate", dict(lease=b"18446744073709551616", good=b"True"), b"lease: 18446744073709551616"),
    ("SetTerms", dict(country=b"\x00\x00"), b"country: text must not contain NUL"),
])
def test_bad_values_get_an_error_naming_the_field_and_the_connection_stays(
        mm, name, arguments, words):
    session, transport = mm.connect("alice")
    mm.hello(session, "seller")
    with LogCapture() as log:
        session.dataReceived(control(command(name, 2, **arguments)))
        mm.reactor.advance(0)
        answer = Replies(transport).answer(2)
        assert answer[b"_error_code"] == b"BAD_REQUEST"
        assert answer[b"_error_description"].startswith(name.encode() + b" " + words), answer
        session.dataReceived(control(command("WhoAmI", 3)))
        mm.reactor.advance(0)
        assert Replies(transport).answer(3)[b"name"] == b"alice"
    assert not log.failures
    assert session.connected and not transport.disconnecting
