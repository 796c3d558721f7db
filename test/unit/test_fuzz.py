"""
The fuzzer: Hypothesis drives the multiplexed framing, AMP boxes,
registration and every control command at the market server (a whole
market in memory) and at the seller's and buyer's client sessions.

Checked for each case: nothing is logged with a traceback, the
connection's buffers stay within their limits, and afterwards an honest
client on a fresh connection is served normally.

`make test` runs a few thousand cases; `make fuzz` (CPUSHARE_FUZZ=1) runs
the large profile, over 100,000 cases in all.  CPUSHARE_FUZZ=N runs N
cases per test instead.
"""

import gc
import os
import struct
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure

from cpushare.client.buyer.service import Buyer, BuyerSession
from cpushare.client.seller.service import SellerSession
from cpushare.protocol import commands, mux
from cpushare.server.session import ServerControl
from test.fakemarket import MemoryMarket, Replies, command, control

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

# Cases per test: the server's two targets and the clients' three.
QUICK = {"server_stream": 500, "server_commands": 800, "seller": 400, "buyer": 400,
         "registration": 150}
LARGE = {"server_stream": 20000, "server_commands": 45000, "seller": 16000,
         "buyer": 16000, "registration": 5000}


def examples(target):
    wanted = os.environ.get("CPUSHARE_FUZZ", "")
    if wanted.isdigit() and int(wanted) > 1:
        return int(wanted)
    return (LARGE if wanted else QUICK)[target]


CASES = {"run": 0}


def counted(target, run):
    """Run a fuzz test's cases and say how many ran, past pytest's capture."""
    CASES["run"] = 0
    started = time.monotonic()
    run()
    line = f"fuzz: {target}: {CASES['run']} cases in {time.monotonic() - started:.0f}s"
    capture = CASES.get("capture")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            sys.stdout.write(f"\n{line}\n")
            sys.stdout.flush()
    else:
        sys.stdout.write(line + "\n")


@pytest.fixture(autouse=True)
def _capture(request):
    CASES["capture"] = request.config.pluginmanager.get_plugin("capturemanager")


def profile(target):
    return settings(max_examples=examples(target), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# What one connection may hold, both ways, at most (see mux.py).
MAX_HELD = (mux.HELD_INPUT_LIMIT + mux.MAX_PAYLOAD + mux.HEADER_SIZE
            + mux.MAX_BOX_BYTES + 2 * (mux.MAX_VALUE_LENGTH + 2)
            + mux.CONTROL_QUEUE_LIMIT + (mux.MAX_IN_FLIGHT + 4) * mux.MAX_BOX_BYTES)


class Failures:
    """Every log event with a traceback, from anywhere, while installed."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        if "log_failure" in event or event.get("isError"):
            self.events.append(event)

    def check(self, what):
        if self.events:
            event = self.events[0]
            failure = event.get("log_failure")
            text = failure.getTraceback() if failure is not None else repr(event)
            self.events.clear()
            pytest.fail(f"{what} logged a failure:\n{text}")


@pytest.fixture
def failures():
    observer = Failures()
    globalLogPublisher.addObserver(observer)
    yield observer
    gc.collect()        # Deferreds that failed unhandled say so when collected
    try:
        observer.check("the fuzzer (on garbage collection)")
    finally:
        globalLogPublisher.removeObserver(observer)


# -- building blocks


def ampString(data):
    return struct.pack("!H", len(data)) + data


INTEGERS = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([0, 1, 2, 64, 1500, 65535, 65536, 2**31, 2**32 - 1, 2**32, 2**62,
                     2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64, 10**30]),
    st.integers(),
).map(lambda n: b"%d" % n)

FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: repr(x).encode()),
    st.sampled_from([b"0", b"1", b"-1", b"1e308", b"1e309", b"nan", b"inf", b"-0.0"]),
)

TEXT = st.one_of(
    st.text(max_size=24).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"seller", b"buyer", b"cli", b"IT", b"US", b"a" * 64, b"x\x00y",
                     b"0" * 64, b"52:54:00:12:34:56", b"\xff\xfe"]),
)

JUNK = st.binary(max_size=40)


def valueFor(argument):
    """A strategy for one serialized argument: mostly of its type, sometimes junk."""
    if isinstance(argument, amp.Integer):
        typed = INTEGERS
    elif isinstance(argument, amp.Float):
        typed = FLOATS
    elif isinstance(argument, amp.Boolean):
        typed = st.sampled_from([b"True", b"False", b"true", b"1"])
    elif isinstance(argument, amp.Unicode):
        typed = TEXT
    elif isinstance(argument, amp.ListOf):
        typed = st.lists(valueFor(argument.elementType), max_size=6).map(
            lambda items: b"".join(ampString(i) for i in items))
    elif isinstance(argument, amp.AmpList):
        typed = st.lists(argumentsFor(argument.subargs), max_size=3).map(
            lambda boxes: b"".join(amp.AmpBox(b).serialize() for b in boxes))
    else:
        typed = st.binary(max_size=200)
    return st.one_of(typed, typed, typed, JUNK)


def argumentsFor(arguments):
    """A strategy for a box of arguments: some left out, some extra."""
    fields = {}
    for key, argument in arguments:
        fields[key] = st.one_of(st.none(), valueFor(argument), valueFor(argument),
                                valueFor(argument))
    extra = st.dictionaries(st.binary(min_size=1, max_size=12), JUNK, max_size=2)
    return st.tuples(st.fixed_dictionaries(fields), extra).map(
        lambda pair: {**{k: v for k, v in pair[0].items() if v is not None}, **pair[1]})


def commandsOf(locator):
    """Every command a control protocol class answers: (name, Command class)."""
    return sorted((name, entry[0]) for name, entry in locator._commandDispatch.items()
                  if entry[0].__module__ != amp.__name__) + [(b"StartTLS", amp.StartTLS)]


def boxesFor(locator, answers=False):
    """A strategy for one control box: a command of C{locator}, or an answer, or junk."""
    known = commandsOf(locator)

    def commandBox(name, cmd):
        return st.tuples(argumentsFor(cmd.arguments), st.integers(0, 10**6)).map(
            lambda a: amp.AmpBox({**a[0], b"_command": name,
                                  **({b"_ask": b"%d" % a[1]} if a[1] else {})}).serialize())

    commandStrategy = st.one_of(*[commandBox(name, cmd) for name, cmd in known])
    choices = [commandStrategy, commandStrategy, commandStrategy,
               st.dictionaries(st.binary(min_size=1, max_size=20), st.binary(max_size=60),
                               max_size=6).map(lambda d: amp.AmpBox(d).serialize()),
               st.binary(max_size=120)]
    if answers:
        choices.append(st.tuples(st.integers(0, 5), st.dictionaries(
            st.sampled_from([b"account", b"account_id", b"session", b"heartbeat",
                             b"timeout", b"nonce", b"digest", b"data", b"latency_ms"]),
            st.one_of(INTEGERS, FLOATS, JUNK), max_size=6)).map(
            lambda p: amp.AmpBox({**p[1], b"_answer": b"%d" % p[0]}).serialize()))
        choices.append(st.integers(0, 5).map(lambda t: amp.AmpBox(
            {b"_error": b"%d" % t, b"_error_code": b"BAD_REQUEST"}).serialize()))
    return st.one_of(*choices)


def messages(boxes):
    """A strategy for a stream of multiplexer messages carrying C{boxes} and frames."""
    message = st.one_of(
        boxes.map(control),
        boxes.map(control),
        st.tuples(st.sampled_from([1, 2, 3, 7, 2**32 - 1]), st.binary(max_size=100)).map(
            lambda p: mux.encode(*p)),
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                  st.binary(max_size=20)).map(
            lambda p: mux.HEADER.pack(p[0], p[1]) + p[2]),
    )
    return st.lists(message, max_size=12).map(b"".join)


def chunks(data, cuts):
    """C{data} split at the given points, as TCP may deliver it."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return [p for p in pieces if p]


CUTS = st.lists(st.integers(0, 10**6), max_size=4)


def gone():
    return Failure(ConnectionDone())


# -- the market server


@pytest.fixture(scope="module")
def market():
    m = MemoryMarket()
    m.account("alice")
    m.account("mallory")
    yield m
    m.close()


def checkBounded(session):
    assert session.bufferedBytes() <= MAX_HELD, session.bufferedBytes()
    control_ = session.control
    if control_ is not None:
        assert control_.inFlight <= control_.maxInFlight


def honestClientServed(m):
    """A fresh connection of a registered account says hello and is answered."""
    session, transport = m.connect("alice", host="192.0.2.200")
    m.hello(session, "buyer", tag=1)
    session.dataReceived(control(command("WhoAmI", 2)))
    m.reactor.advance(0)
    replies = Replies(transport)
    hello, who = replies.answer(1), replies.answer(2)
    assert hello is not None and b"_answer" in hello, replies.boxes()
    assert who is not None and who[b"name"] == b"alice", replies.boxes()
    session.connectionLost(gone())


def playServer(m, failures, account, hello, stream, cuts, what):
    CASES["run"] += 1
    sessions = len(m.market.sessions)
    session, transport = m.connect(account, host="198.51.100.1")
    if hello and session.connected:
        m.hello(session, hello)
    for piece in chunks(stream, cuts):
        if not session.connected or session._closing:
            break
        session.dataReceived(piece)
        m.reactor.advance(0)
        checkBounded(session)
    m.reactor.advance(1)
    checkBounded(session)
    failures.check(what)
    if session.connected:
        session.connectionLost(gone())
    m.reactor.advance(0)
    assert len(m.market.sessions) <= sessions
    assert m.market.admission.unauthenticated == 0
    honestClientServed(m)
    failures.check(what + " (then an honest client)")


ACCOUNTS = st.sampled_from([None, "alice", "mallory"])
ROLES = st.sampled_from([None, "seller", "buyer", "cli"])


@pytest.mark.usefixtures("failures")
class TestServer:
    def test_random_streams(self, market, failures):
        @profile("server_stream")
        @given(ACCOUNTS, ROLES, st.one_of(st.binary(max_size=400),
                                          messages(st.binary(max_size=200))), CUTS)
        def case(account, role, stream, cuts):
            playServer(market, failures, account, role, stream, cuts, "a random stream")

        counted("server_stream", case)

    def test_every_command(self, market, failures):
        @profile("server_commands")
        @given(ACCOUNTS, ROLES, messages(boxesFor(ServerControl, answers=True)), CUTS)
        def case(account, role, stream, cuts):
            playServer(market, failures, account, role, stream, cuts, "a command stream")

        counted("server_commands", case)

    def test_registration(self, market, failures):
        """Register, with names and requests good and bad, before and after Hello."""
        from cpushare import pki
        key = pki.generateKey()
        goodCSR = pki.makeRequest(key, "fuzzed")

        names = st.one_of(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,31}", fullmatch=True).map(str.encode), TEXT)
        csrs = st.one_of(st.just(goodCSR), st.binary(max_size=300),
                         st.binary(max_size=40).map(lambda b: goodCSR[:200] + b))
        boxes = st.tuples(names, csrs, st.integers(1, 50)).map(
            lambda p: amp.AmpBox({b"_command": b"Register", b"_ask": b"%d" % p[2],
                                  b"name": p[0], b"csr": p[1]}).serialize())

        @profile("registration")
        @given(st.sampled_from([None, None, "alice"]), ROLES,
               st.lists(boxes.map(control), min_size=1, max_size=3).map(b"".join), CUTS)
        def case(account, role, stream, cuts):
            playServer(market, failures, account, role, stream, cuts, "a registration")

        counted("registration", case)


# -- the clients


class RecordingHost:
    """The seller's VM host, recording what the market asked of it."""

    switch = None       # no UDP port: MeshPeers is refused by name

    def __init__(self):
        self.calls = []

    def start(self, *args):
        self.calls.append(("start",) + args)

    def stop(self, *args):
        self.calls.append(("stop",) + args)


class RecordingNetwork:
    """The buyer's network, recording the VMs that joined and left."""

    dhcp = None

    def __init__(self):
        self.vms = {}

    def addVM(self, session, channel, mac=None, name=None):
        self.vms[channel] = mac

    def removeVM(self, session, channel):
        self.vms.pop(channel, None)

    def addressOf(self, mac):
        return None


HELLO_ANSWER = {b"account": b"alice", b"account_id": b"1", b"session": b"3",
                b"heartbeat": b"10.0", b"timeout": b"45.0"}


def clientConnection(kind):
    reactor = MemoryReactorClock()
    if kind == "seller":
        session = SellerSession(reactor, "seller", host=RecordingHost())
    else:
        session = BuyerSession(reactor, "buyer", buyer=Buyer(RecordingNetwork()))
        session.buyer.connected(session)
    session.ready.addErrback(lambda f: None)     # as connectOnce does
    transport = StringTransport()
    session.makeConnection(transport)
    session.dataReceived(mux.greeting("market/1"))
    return reactor, session, transport


def honestServerServes(kind):
    """A fresh client session: Hello answered, then a Ping from the market answered."""
    reactor, session, transport = clientConnection(kind)
    reactor.advance(0)
    assert b"Hello" in transport.value()
    session.dataReceived(control(amp.AmpBox({**HELLO_ANSWER, b"_answer": b"1"}).serialize()))
    assert session.ready.called and session.info["account"] == "alice"
    transport.clear()
    session.dataReceived(control(command("Ping", 77, nonce=b"n" * 16)))
    reactor.advance(0)
    assert Replies(_withGreeting(transport)).answer(77)[b"nonce"] == b"n" * 16
    session.connectionLost(gone())


def playClient(kind, failures, helloFirst, stream, cuts):
    CASES["run"] += 1
    reactor, session, transport = clientConnection(kind)
    reactor.advance(0)
    if helloFirst:
        session.dataReceived(control(amp.AmpBox({**HELLO_ANSWER, b"_answer": b"1"}).serialize()))
    for piece in chunks(stream, cuts):
        if not session.connected or session._closing:
            break
        session.dataReceived(piece)
        reactor.advance(0)
        checkBounded(session)
    reactor.advance(100)
    checkBounded(session)
    failures.check(f"a stream to the {kind}")
    if session.connected:
        session.connectionLost(gone())
    reactor.advance(1000)
    failures.check(f"a stream to the {kind}, after it closed")
    honestServerServes(kind)


@pytest.mark.usefixtures("failures")
class TestClients:
    def test_seller(self, failures):
        from cpushare.client.seller.service import SellerControl

        @profile("seller")
        @given(st.booleans(), messages(boxesFor(SellerControl, answers=True)), CUTS)
        def case(helloFirst, stream, cuts):
            playClient("seller", failures, helloFirst, stream, cuts)

        counted("seller", case)

    def test_buyer(self, failures):
        from cpushare.client.buyer.service import BuyerControl

        @profile("buyer")
        @given(st.booleans(), messages(boxesFor(BuyerControl, answers=True)), CUTS)
        def case(helloFirst, stream, cuts):
            playClient("buyer", failures, helloFirst, stream, cuts)

        counted("buyer", case)


def test_every_command_is_fuzzed():
    """The fuzzer knows every command the server and the clients answer."""
    from cpushare.client.buyer.service import BuyerControl
    from cpushare.client.seller.service import SellerControl
    served = {name for name, _ in commandsOf(ServerControl)}
    declared = {cls.commandName for cls in vars(commands).values()
                if isinstance(cls, type) and issubclass(cls, amp.Command)
                and cls is not amp.Command}
    clients = {name for c in (SellerControl, BuyerControl) for name, _ in commandsOf(c)}
    assert declared <= served | clients, declared - served - clients


# -- what the fuzzer found, kept as plain regression tests


def test_a_port_the_buyer_cannot_have_is_left_out_without_a_traceback(failures):
    reactor, session, transport = clientConnection("buyer")
    session.dataReceived(control(amp.AmpBox({**HELLO_ANSWER, b"_answer": b"1"}).serialize()))
    for vm, mac in [(b"5", b"not a mac"), (b"2147483648", b"52:54:00:12:34:56"),
                    (b"-1", b"52:54:00:12:34:56")]:
        session.dataReceived(control(amp.AmpBox(
            {b"_command": b"PortAttached", b"vm": vm, b"mac": mac}).serialize()))
    session.dataReceived(control(amp.AmpBox(
        {b"_command": b"PortAttached", b"vm": b"7", b"mac": b"52:54:00:12:34:56"}).serialize()))
    reactor.advance(0)
    assert session.buyer.network.vms == {14: bytes.fromhex("525400123456")}
    assert session.control.badInputs == 3
    failures.check("bad ports")


def test_a_ping_answered_with_an_error_is_a_log_line_not_a_traceback(failures):
    reactor, session, transport = clientConnection("seller")
    session.dataReceived(control(amp.AmpBox({**HELLO_ANSWER, b"_answer": b"1"}).serialize()))
    reactor.advance(10)
    asked = [b for b in Replies(transport).boxes() if b.get(b"_command") == b"Ping"]
    session.dataReceived(control(amp.AmpBox({b"_error": asked[-1][b"_ask"],
                                             b"_error_code": b"NO"}).serialize()))
    failures.check("a ping answered with an error")


def test_a_command_asking_no_answer_that_fails_is_noted_not_logged_as_a_failure(failures):
    reactor, session, transport = clientConnection("seller")
    session.dataReceived(control(amp.AmpBox({b"_command": b"StopVM", b"vm": b"x"}).serialize()))
    assert session.control.badInputs == 1
    failures.check("a bad StopVM asking no answer")


def _withGreeting(transport):
    t = StringTransport()
    t.write(b"X\n" + transport.value())
    return t
