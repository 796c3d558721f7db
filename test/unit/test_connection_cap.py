"""
One account's certificate opening connection after connection, in
memory on a fake clock: past the cap on authenticated connections per
account, the excess one is refused with a message naming the limit and
closed; the account's connections already open keep working, and closing
connections makes room again (nothing is counted for ever).
"""

import pytest
from twisted.internet import defer

from cpushare.protocol.commands import nicChannel
from cpushare.protocol.mux import HEADER
from cpushare.server import admission
from cpushare.server.session import REFUSED_GRACE
from test.fakemarket import LogCapture, Replies, command, control
from test.unit.test_session_abuse import gone, mm  # noqa: F401 (mm: the market fixture)

CAP = admission.CONNECTIONS_PER_ACCOUNT


def open_(mm, account, role="cli", host="192.0.2.1"):
    """A connection of C{account} that said Hello as C{role}; returns (session, transport)."""
    session, transport = mm.connect(account, host=host)
    mm.hello(session, role)
    return session, transport


def whoami(mm, session, transport, tag):
    session.dataReceived(control(command("WhoAmI", tag)))
    mm.reactor.advance(0)
    return Replies(transport).answer(tag)


def accountId(mm, name):
    return next(s.account.id for s in mm.market.sessions.values()
                if s.account is not None and s.account.name == name)


def assertRefused(mm, session, transport):
    """C{session} was refused for the cap: Hello says why, and it is closed soon."""
    answer = Replies(transport).answer(1)
    assert answer[b"_error_code"] == b"NOT_AUTHENTICATED", answer
    text = answer[b"_error_description"].decode()
    assert f"account 'alice' already has {CAP} connections open" in text, text
    assert f"(limit {CAP}, the server's --max-connections-per-account)" in text, text
    assert session.role is None and session.account is None
    assert not transport.disconnecting
    mm.reactor.advance(REFUSED_GRACE + 0.1)
    assert transport.disconnecting


def test_the_default_cap_leaves_room_for_a_seller_a_buyer_and_a_few_commands():
    assert CAP == 8


def test_an_account_past_the_cap_is_refused_naming_the_limit_and_the_others_keep_working(mm):
    honest = [open_(mm, "alice", "seller"), open_(mm, "alice", "buyer")]
    honest += [open_(mm, "alice", "cli") for _ in range(CAP - 2)]
    assert all(s.role is not None for s, _ in honest)
    with LogCapture() as log:
        extra, t = mm.connect("alice")
        mm.hello(extra, "cli")
        assertRefused(mm, extra, t)
        more, t2 = mm.connect("alice", host="198.51.100.20")   # from elsewhere too
        mm.hello(more, "seller")
        assertRefused(mm, more, t2)
    # One line in the log for both, naming the account and the cap; no traceback.
    lines = [line for line in log.texts() if "refusing connections of accounts" in line]
    assert len(lines) == 1 and "'alice'" in lines[0] and f"(limit {CAP}" in lines[0], lines
    assert not log.failures
    assert mm.market.admission.accounts.refused == 2
    # The account's own connections were not disturbed.
    for tag, (session, transport) in enumerate(honest, 10):
        assert whoami(mm, session, transport, tag)[b"name"] == b"alice"
        assert session.connected and not transport.disconnecting
    # Other accounts are not affected.
    bob, tb = open_(mm, "bob", "buyer")
    assert whoami(mm, bob, tb, 30)[b"name"] == b"bob"


def test_closing_connections_makes_room_again_and_nothing_leaks(mm):
    honest = [open_(mm, "alice") for _ in range(CAP)]
    aliceId = accountId(mm, "alice")
    assert mm.market.admission.accounts.count(aliceId) == CAP
    refused, t = mm.connect("alice")
    mm.hello(refused)
    assertRefused(mm, refused, t)
    # The refused connection closing frees nothing: it was never counted.
    refused.connectionLost(gone())
    assert mm.market.admission.accounts.count(aliceId) == CAP
    again, t = mm.connect("alice")
    mm.hello(again)
    assertRefused(mm, again, t)
    again.connectionLost(gone())
    # Two honest ones close: two new ones are accepted, a third is not.
    for session, _ in honest[:2]:
        session.connectionLost(gone())
    assert mm.market.admission.accounts.count(aliceId) == CAP - 2
    new = [open_(mm, "alice") for _ in range(2)]
    for tag, (session, transport) in enumerate(new, 40):
        assert whoami(mm, session, transport, tag)[b"name"] == b"alice"
    third, t = mm.connect("alice")
    mm.hello(third)
    assertRefused(mm, third, t)
    third.connectionLost(gone())
    # Every connection gone: none is counted any more.
    for session, _ in honest[2:] + new:
        session.connectionLost(gone())
    assert mm.market.admission.accounts.count(aliceId) == 0
    assert mm.market.admission.accounts.accounts == 0
    fresh = [open_(mm, "alice") for _ in range(CAP)]
    assert all(s.role == "cli" for s, _ in fresh)


def test_connections_count_from_authentication_not_from_hello(mm):
    # Connections that authenticated but have not said Hello (yet) hold a place:
    # the cap is on what the account holds open, whatever it says.
    silent = [mm.connect("alice") for _ in range(CAP)]
    assert all(s.account is not None for s, _ in silent)
    extra, t = mm.connect("alice")
    mm.hello(extra)
    assertRefused(mm, extra, t)
    # A connection closed at its Hello deadline gives its place back.
    mm.reactor.advance(45)
    for session, transport in silent:
        assert transport.aborted
        session.connectionLost(gone())
    assert open_(mm, "alice")[0].role == "cli"


def test_a_connection_that_leaves_while_its_account_is_looked_up_is_never_counted(mm):
    open_(mm, "alice")
    aliceId = accountId(mm, "alice")
    account = mm.market.sessions[1].account
    lookups = []

    def authenticate(fingerprint):
        lookups.append(defer.Deferred())
        return lookups[-1]

    mm.market.authenticate = authenticate
    session, transport = mm.connect("alice")
    session.connectionLost(gone())
    with LogCapture() as log:
        lookups[0].callback((account, None))
    assert not log.failures
    assert mm.market.admission.accounts.count(aliceId) == 1


def test_the_cap_can_be_changed(mm):
    mm.market.admission.accounts.perAccount = 2
    open_(mm, "alice", "seller")
    open_(mm, "alice", "buyer")
    extra, t = mm.connect("alice")
    mm.hello(extra)
    text = Replies(t).answer(1)[b"_error_description"].decode()
    assert "account 'alice' already has 2 connections open (limit 2," in text, text


def test_the_server_option_sets_the_cap_and_refuses_nonsense(tmp_path):
    from twisted.python import usage

    from cpushare.server.tap import Options

    options = Options()
    options.parseOptions(["--data", str(tmp_path)])
    assert options["max-connections-per-account"] == CAP
    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--max-connections-per-account", "3"])
    assert options["max-connections-per-account"] == 3
    with pytest.raises(usage.UsageError, match="--max-connections-per-account must be at least 1"):
        Options().parseOptions(["--data", str(tmp_path), "--max-connections-per-account", "0"])


def test_a_refused_connection_is_read_no_further_once_told_why(mm):
    # A flood of refused connections that pipeline requests behind their
    # Hello costs the server one answer each, not one per request.
    for _ in range(CAP):
        open_(mm, "alice")
    session, transport = mm.connect("alice")
    pipelined = command("Hello", 1, role=b"buyer", software=b"t/1") + b"".join(
        command("WhoAmI", tag) for tag in range(2, 200))
    session.dataReceived(control(pipelined))
    mm.reactor.advance(0)
    boxes = Replies(transport).boxes()
    assert [b[b"_error"] for b in boxes] == [b"1"], boxes
    assert b"(limit 8," in boxes[0][b"_error_description"]
    written = len(transport.value())
    for _ in range(3):
        session.dataReceived(control(b"".join(command("WhoAmI", t) for t in range(300, 400))))
        mm.reactor.advance(0)
    assert len(transport.value()) == written
    assert session.bufferedBytes() < 64 * 1024
    # Nor are frames on other channels parsed, routed or counted.
    framesIn = session.counters.framesIn
    session.dataReceived(HEADER.pack(nicChannel(1), 4) + b"junk")
    assert session.counters.framesIn == framesIn
    mm.reactor.advance(REFUSED_GRACE + 0.1)
    assert transport.disconnecting


def test_a_request_before_hello_hears_the_refusal_too(mm):
    for _ in range(CAP):
        open_(mm, "alice")
    session, transport = mm.connect("alice")
    session.dataReceived(control(command("WhoAmI", 5) + command("WhoAmI", 6)))
    mm.reactor.advance(0)
    boxes = Replies(transport).boxes()
    assert [b[b"_error"] for b in boxes] == [b"5"], boxes
    assert boxes[0][b"_error_code"] == b"NOT_AUTHENTICATED"
    assert b"already has 8 connections open" in boxes[0][b"_error_description"]
