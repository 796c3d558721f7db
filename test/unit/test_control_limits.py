"""
What a hostile peer can do with control messages, on a multiplexer in
memory: boxes past the limits, pipelined requests it never reads the
answers of, requests piling up in flight, values no field can hold,
unknown commands and stray answers.  Memory stays bounded, the peer gets
an error that names the problem, the connection stays usable when it can,
and nothing is logged with a traceback.
"""

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp

from cpushare.protocol import mux
from cpushare.protocol.mux import (
    CONTROL_QUEUE_LIMIT, HELD_INPUT_LIMIT, MAX_BOX_BYTES, MAX_BOX_KEYS, MAX_IN_FLIGHT,
    MAX_PAYLOAD, ControlProtocol, Multiplexer, ProtocolError, encode, greeting,
)
from test.fakemarket import LogCapture


class Echo(amp.Command):
    arguments = [(b"text", amp.Unicode()), (b"n", amp.Integer(optional=True)),
                 (b"x", amp.Float(optional=True)), (b"flag", amp.Boolean(optional=True)),
                 (b"ids", amp.ListOf(amp.Integer(), optional=True))]
    response = [(b"text", amp.Unicode())]


class Big(amp.Command):
    """Answers with 60 KB: what a page of a list costs."""

    arguments = []
    response = [(b"data", amp.String())]


class Slow(amp.Command):
    """Answered when the test says so: a request waiting for SQL."""

    arguments = []
    response = []


class EchoControl(ControlProtocol):
    def __init__(self):
        ControlProtocol.__init__(self)
        self.slow = []

    @Echo.responder
    def echo(self, text, n=None, x=None, flag=None, ids=None):
        return {"text": text.upper()}

    @Big.responder
    def big(self):
        return {"data": b"x" * 60000}

    @Slow.responder
    def slowly(self):
        d = Deferred()
        self.slow.append(d)
        return d


class Mux(Multiplexer):
    def makeControl(self):
        return EchoControl()


def connected():
    clock = MemoryReactorClock()
    m = Mux(clock)
    transport = StringTransport()
    m.makeConnection(transport)
    m.dataReceived(greeting("peer/1"))
    transport.clear()
    return clock, m, transport


def request(name, tag, **arguments):
    values = {b"_command": name, b"_ask": b"%d" % tag}
    values.update({k.encode(): v for k, v in arguments.items()})
    return amp.AmpBox(values).serialize()


def control(data):
    return b"".join(encode(0, data[i:i + MAX_PAYLOAD]) for i in range(0, len(data), MAX_PAYLOAD))


def answers(data):
    """The boxes in what a multiplexer wrote (after its greeting, if any)."""
    if data.startswith(b"CPUSHARE/"):
        data = data[data.index(b"\n") + 1:]
    parts, offset = [], 0
    while offset + mux.HEADER_SIZE <= len(data):
        channel, length = mux.HEADER.unpack_from(data, offset)
        parts.append(data[offset + mux.HEADER_SIZE:offset + mux.HEADER_SIZE + length])
        offset += mux.HEADER_SIZE + length
    return amp.parseString(b"".join(parts))


def feed(m, data, size=16384):
    for i in range(0, len(data), size):
        m.dataReceived(data[i:i + size])
        yield


# -- boxes past the limits (before any authentication)


def test_a_box_with_a_million_keys_is_refused_and_memory_stays_bounded():
    clock, m, transport = connected()
    key = b"\x00\x05kkkkk\x00\x01v"        # one key and value, 12 bytes
    peak = 0
    with LogCapture() as log:
        for _ in feed(m, control(key * 1_000_000), 65536):
            peak = max(peak, m.bufferedBytes())
            if m._closing:
                break
    assert transport.disconnecting
    assert isinstance(m.closeReason, ProtocolError)
    assert f"more than the limit of {MAX_BOX_KEYS} keys" in str(m.closeReason)
    assert peak <= MAX_BOX_BYTES + 2 * (MAX_PAYLOAD + mux.HEADER_SIZE)
    assert not log.failures


def test_a_box_of_many_big_values_is_refused_at_the_byte_limit():
    clock, m, transport = connected()
    pair = b"\x00\x01k" + b"\xff\xff" + b"v" * 65535
    peak = 0
    for _ in feed(m, control(pair * 40)):
        peak = max(peak, m.bufferedBytes())
        if m._closing:
            break
    assert f"larger than the limit of {MAX_BOX_BYTES} bytes" in str(m.closeReason)
    assert peak <= MAX_BOX_BYTES + 2 * (MAX_PAYLOAD + mux.HEADER_SIZE)


def test_a_key_past_its_length_limit_closes_with_a_clear_reason():
    clock, m, transport = connected()
    with LogCapture() as log:
        m.dataReceived(control(b"\x01\x00" + b"k" * 256))
    assert "key of 256 bytes" in str(m.closeReason)
    assert not log.failures


# -- pipelined requests whose answers the peer never reads


def test_pipelined_requests_wait_while_the_peer_does_not_read_and_none_is_lost():
    clock, m, transport = connected()
    m.pauseProducing()                  # the peer stopped reading: our socket is full
    pipelined = control(b"".join(request(b"Big", i) for i in range(2000)))
    assert len(pipelined) < 100_000     # 2,000 requests would cost 120 MB of answers
    peak = 0
    for _ in feed(m, pipelined, 4096):
        clock.advance(0)
        peak = max(peak, m.bufferedBytes())
    assert m.controlBacklogged
    assert not m._closing
    assert peak <= CONTROL_QUEUE_LIMIT + HELD_INPUT_LIMIT + 4 * 65536
    # The peer reads again, slowly: every request is answered, in order.
    got = []
    while len(got) < 2000:
        transport.clear()
        m.resumeProducing()
        clock.advance(0)
        m.pauseProducing()
        clock.advance(0)
        batch = answers(transport.value())
        assert batch, f"stuck after {len(got)} answers"
        got += batch
        assert m.bufferedBytes() <= CONTROL_QUEUE_LIMIT + HELD_INPUT_LIMIT + 4 * 65536
    assert [int(b[b"_answer"]) for b in got] == list(range(2000))


def test_a_peer_that_ignores_flow_control_is_closed_not_buffered():
    clock, m, transport = connected()
    m.pauseProducing()
    flood = control(b"".join(request(b"Big", i) for i in range(40)))
    m.dataReceived(flood)
    clock.advance(0)
    assert m.controlBacklogged
    more = control(request(b"Echo", 99, text=b"x") * 30000)
    for _ in feed(m, more, 65536):
        if m._closing:
            break
    assert "while not reading the answers" in str(m.closeReason)
    assert len(m._buffer) <= HELD_INPUT_LIMIT


# -- requests in flight


def test_requests_past_the_in_flight_limit_are_refused_with_a_clear_error():
    clock, m, transport = connected()
    m.dataReceived(control(b"".join(request(b"Slow", i) for i in range(MAX_IN_FLIGHT + 4))))
    clock.advance(0)
    refused = answers(transport.value())
    assert [int(b[b"_error"]) for b in refused] == list(range(MAX_IN_FLIGHT, MAX_IN_FLIGHT + 4))
    assert refused[0][b"_error_description"] == \
        b"too many requests in flight (limit %d)" % MAX_IN_FLIGHT
    assert m.control.inFlight == MAX_IN_FLIGHT
    # Once answered, the connection serves again.
    for d in m.control.slow:
        d.callback({})
    transport.clear()
    m.dataReceived(control(request(b"Echo", 100, text=b"hi")))
    clock.advance(0)
    assert answers(transport.value())[-1][b"text"] == b"HI"
    assert m.control.inFlight == 0


# -- values no field can hold, unknown commands, stray answers


def ask(m, clock, transport, box):
    transport.clear()
    m.dataReceived(control(box))
    clock.advance(0)
    (answer,) = answers(transport.value())
    return answer


def test_bad_values_are_answered_with_an_error_naming_the_field():
    clock, m, transport = connected()
    cases = [
        (dict(text=b"a", n=b"9223372036854775808"),
         b"n: 9223372036854775808 is out of range (-2^63 to 2^63-1)"),
        (dict(text=b"a", n=b"9" * 5000), b"n: 9999999999999999999999999999999999999999... is out"),
        (dict(text=b"a", n=b"abc"), b"n: 'abc' is not an integer"),
        (dict(text=b"a", x=b"nan"), b"x: 'nan' is not a finite number"),
        (dict(text=b"a", x=b"1e999"), b"x: 1e999 is out of range"),
        (dict(text=b"\xff"), b"text: not UTF-8 text"),
        (dict(text=b"a\x00b"), b"text: text must not contain NUL"),
        (dict(text=b"a", flag=b"yes"), b"flag: 'yes' is not True or False"),
        (dict(text=b"a", ids=b"\x00\x0299\x00\x1499999999999999999999"),
         b"ids[1]: 99999999999999999999 is out of range"),
        (dict(n=b"1"), b"text: missing"),
    ]
    with LogCapture() as log:
        for tag, (arguments, words) in enumerate(cases):
            answer = ask(m, clock, transport, request(b"Echo", tag, **arguments))
            assert answer[b"_error_code"] == b"BAD_REQUEST", arguments
            assert answer[b"_error_description"].startswith(b"Echo " + words), answer
        # Still usable.
        answer = ask(m, clock, transport, request(b"Echo", 99, text=b"ok", n=b"-9223372036854775808"))
        assert answer[b"text"] == b"OK"
    assert not m._closing
    assert not log.failures
    # One line for the lot: the log is rate limited for each peer.
    assert len([e for e in log.events if "bad control message" in e["log_format"]]) == 1
    assert m.control.badInputs == len(cases)


def test_the_bad_input_log_speaks_again_after_its_interval_with_a_count():
    clock, m, transport = connected()
    with LogCapture() as log:
        for i in range(5):
            ask(m, clock, transport, request(b"Echo", i, text=b"a", n=b"x"))
        clock.advance(mux.BAD_INPUT_LOG_INTERVAL)
        ask(m, clock, transport, request(b"Echo", 9, text=b"a", n=b"x"))
    from twisted.logger import formatEvent
    lines = [formatEvent(e) for e in log.events if "bad control message" in e["log_format"]]
    assert len(lines) == 2
    assert "(4 more since the last report)" in lines[1]


def test_unknown_commands_are_answered_and_the_connection_stays():
    clock, m, transport = connected()
    with LogCapture() as log:
        answer = ask(m, clock, transport, request(b"Nonesuch", 1))
        assert answer[b"_error_code"] == b"UNHANDLED"
        assert b"unknown command Nonesuch" in answer[b"_error_description"]
        assert ask(m, clock, transport, request(b"Echo", 2, text=b"x"))[b"text"] == b"X"
    assert not log.failures


def test_stray_answers_and_empty_boxes_are_ignored_without_a_traceback():
    clock, m, transport = connected()
    with LogCapture() as log:
        m.dataReceived(control(amp.AmpBox({b"_answer": b"77"}).serialize()))
        m.dataReceived(control(amp.AmpBox({b"_error": b"78"}).serialize()))
        m.dataReceived(control(amp.AmpBox({b"hello": b"there"}).serialize()))
        m.dataReceived(control(b"\x00\x00"))
        clock.advance(0)
        assert ask(m, clock, transport, request(b"Echo", 2, text=b"x"))[b"text"] == b"X"
    assert not log.failures
    assert not m._closing
    assert m.control.badInputs == 4


def test_an_error_answer_without_its_code_reaches_the_caller_as_an_error():
    clock, m, transport = connected()
    d = m.control.callRemote(Echo, text="hi")
    clock.advance(0)
    sent = answers(transport.value())[0]
    failures = []
    d.addErrback(failures.append)
    with LogCapture() as log:
        m.dataReceived(control(amp.AmpBox({b"_error": sent[b"_ask"]}).serialize()))
    assert failures and "no description" in str(failures[0].value)
    assert not log.failures


def test_amps_own_start_tls_is_an_unknown_command_here():
    clock, m, transport = connected()
    with LogCapture() as log:
        answer = ask(m, clock, transport, request(b"StartTLS", 1))
        assert answer[b"_error_code"] == b"UNHANDLED"
        assert ask(m, clock, transport, request(b"Echo", 2, text=b"x"))[b"text"] == b"X"
    assert not log.failures


def test_a_connection_reads_a_bounded_number_of_boxes_a_reactor_turn():
    clock, m, transport = connected()
    n = 3 * mux.MAX_BOXES_PER_TURN + 5
    m.dataReceived(control(b"".join(request(b"Echo", i, text=b"x") for i in range(n))))
    # This turn's answers are queued; the rest waits for the next turns.
    assert len(answers(b"".join(m._out))) == mux.MAX_BOXES_PER_TURN
    clock.advance(0)
    assert [int(b[b"_answer"]) for b in answers(transport.value())] == list(range(n))
