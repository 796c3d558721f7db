"""
Integration tests: the real cpushare-server, cpushare-seller and
cpushare-buyer twistd plugins and the cpushare CLI as processes on
127.0.0.1, with real certificates, asserting what a user would notice.

Helpers and fixtures are in conftest.py; Twisted client sessions driven
step by step are in clientdriver.py.
"""

import json
import random
import shutil
import signal
import socket
import ssl
import stat
import threading
import time

import pytest
from cryptography.x509.oid import NameOID

from cpushare import pki

from .conftest import (
    CLEAN_EXIT, HEADER, HEARTBEAT, LOOPBACK, SILENCE_TIMEOUT, Driver, RawClient,
    assertOneLineError, cpushare, sellers, startBuyer, startSeller, waitForSellers,
)


def foreignCA(path):
    """Another market's CA: a key and certificate no market here trusts."""
    key, cert = pki.createAuthority("Some other CPUShare market")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pki.certToPEM(cert))
    return key, cert


def listed(names):
    return lambda found: sorted(s["name"] for s in found) == sorted(names)


def onlineSeller(market, processes, tmp_path, name="alice", cores=2, memory=1024):
    """Register C{name}, start its seller and wait until `sellers` lists it with a latency."""
    home = market.register(tmp_path / name, name)
    seller = startSeller(processes, home, cores=cores, memory=memory, name=f"seller-{name}")
    seller.waitConnected()
    found = waitForSellers(
        home,
        lambda found: any(s["name"] == name and s.get("latency_ms") for s in found),
        f"{name} listed with a latency", processes,
    )
    entry = next(s for s in found if s["name"] == name)
    return seller, home, entry


# -- registration


def test_register_creates_the_account(market, tmp_path):
    home = tmp_path / "alice"
    result = cpushare(home, "register", "--server", market.address, "--ca", market.ca,
                      "--name", "alice")
    assert result.status == 0, result
    assert result.stderr == ""
    assert "registered account alice" in result.stdout

    # The home holds the key (0600, never sent), the signed certificate,
    # the market's CA and the configuration.
    assert sorted(p.name for p in home.iterdir()) == [
        "ca.pem", "cert.pem", "config.json", "key.pem",
    ]
    assert stat.S_IMODE((home / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) & 0o077 == 0, "the home is readable by others"
    assert (home / "ca.pem").read_bytes() == market.ca.read_bytes()
    config = json.loads((home / "config.json").read_text())
    assert config["server"] == market.address
    assert config["name"] == "alice"
    assert isinstance(config["account_id"], int)

    ca = pki.loadCertificate(market.ca.read_bytes())
    cert = pki.loadCertificate((home / "cert.pem").read_bytes())
    key = pki.loadKey((home / "key.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    who = cpushare(home, "whoami")
    assert who.status == 0, who
    assert "alice" in who.stdout
    assert pki.fingerprint(cert) in who.stdout
    info = cpushare(home, "whoami", "--json").json()
    assert info["name"] == "alice"
    assert info["account_id"] == config["account_id"]
    assert info["fingerprint"] == pki.fingerprint(cert)

    accounts = market.admin("accounts")
    assert accounts.status == 0, accounts
    assert "alice" in accounts.stdout


def _closedPort():
    """A loopback port that refuses connections: bound, never listening."""
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("problem", ["taken name", "wrong CA", "unreachable", "invalid name"])
def test_register_errors_are_one_line_and_retry_works(problem, market, tmp_path):
    market.register(tmp_path / "alice", "alice")
    home = tmp_path / "home"
    server, ca, name = market.address, market.ca, "bob"
    holder = None
    if problem == "taken name":
        name = "alice"
        expected = ["'alice'", "taken"]
    elif problem == "wrong CA":
        ca = tmp_path / "other-market" / "ca.pem"
        foreignCA(ca)
        expected = [market.address, "not trusted", "CA"]
    elif problem == "unreachable":
        holder, port = _closedPort()
        server = f"{LOOPBACK}:{port}"
        expected = ["cannot reach", server, "refused"]
    else:
        name = "Bob Smith!"
        expected = ["'Bob Smith!'", "not a valid account name"]
    try:
        result = cpushare(home, "register", "--server", server, "--ca", ca, "--name", name)
    finally:
        if holder is not None:
            holder.close()
    assertOneLineError(result, *expected)

    # Nothing half-registered: the home has no account, and says so.
    for leftover in ("cert.pem", "config.json", "ca.pem"):
        assert not (home / leftover).exists(), f"{leftover} left behind after a failure"
    assertOneLineError(cpushare(home, "whoami"), "register first")
    assert "bob" not in market.admin("accounts").stdout

    # A retry with the right details succeeds in the same home.
    market.register(home, "bob")
    assert cpushare(home, "whoami", "--json").json()["name"] == "bob"


def test_register_refuses_a_home_that_has_an_account(market, tmp_path):
    home = market.register(tmp_path / "alice", "alice")
    before = {p.name: p.read_bytes() for p in home.iterdir()}
    result = cpushare(home, "register", "--server", market.address, "--ca", market.ca,
                      "--name", "alice2")
    assertOneLineError(result, "already holds account 'alice'")
    assert {p.name: p.read_bytes() for p in home.iterdir()} == before


# -- sellers and buyers


def test_seller_is_listed_with_latency_and_buyer_is_not(market, processes, tmp_path):
    alice = market.register(tmp_path / "alice", "alice")
    dave = market.register(tmp_path / "dave", "dave")
    bob = market.register(tmp_path / "bob", "bob")
    started = time.time()
    sellerA = startSeller(processes, alice, cores=2, memory=1024, name="seller-alice",
                          extra=["--price", "0.03", "--country", "it"])
    sellerD = startSeller(processes, dave, cores=1, memory=512, name="seller-dave",
                          extra=["--price", "0.02", "--net-fee", "0.5"])
    buyer = startBuyer(processes, bob)
    for client in (sellerA, sellerD, buyer):
        client.waitConnected()
    market.waitForLog("buyer bob connected")

    found = waitForSellers(
        bob, lambda found: len(found) == 2 and all(s.get("latency_ms") for s in found),
        "both sellers listed with a measured latency", processes,
    )
    byName = {s["name"]: s for s in found}
    assert sorted(byName) == ["alice", "dave"], found  # the buyer is not a seller
    assert (byName["alice"]["cores"], byName["alice"]["memory"]) == (2, 1024)
    assert (byName["dave"]["cores"], byName["dave"]["memory"]) == (1, 512)
    for s in found:
        assert 0 < s["latency_ms"] < 1000, s
        assert started - 5 <= s["connected"] <= time.time() + 5, s
    assert byName["alice"]["session"] != byName["dave"]["session"]

    # With no traffic expected, the cheapest CPU first: dave asks 0.02 a
    # core-hour, alice 0.03 (with 1 GB a VM-hour, the default, dave's 0.50
    # a GB puts alice first).
    table = cpushare(bob, "sellers", "--traffic", "0")
    assert table.status == 0, table
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PRICE/CORE-H", "NET/GB", "FREE/CORES", "FREE/MEMORY",
                                "RATING", "VALIDATED", "ERRORS", "LATENCY", "MBPS", "CPU",
                                "COUNTRY", "ONLINE", "CPU-MODEL"]
    assert [line.split()[0] for line in lines[1:]] == ["dave", "alice"], table.stdout
    row = lines[2].split()
    assert row[1:6] == ["0.03", "0.00", "2/2", "1024/1024MB", "new"], table.stdout
    assert row[6:8] == ["0", "-"], table.stdout     # no result checked yet
    assert row[9] == "ms" and row[12] == "IT", table.stdout
    assert lines[1].split()[1:3] == ["0.02", "0.50"], table.stdout

    screened = cpushare(bob, "sellers", "--max-net-fee", "0.1", "--explain")
    assert screened.status == 0, screened
    assert [line.split()[0] for line in screened.stdout.splitlines()[1:2]] == ["alice"]
    assert "  dave charges 0.50 a GB, more than --max-net-fee 0.10" in screened.stdout

    # Alice's owner lowers her price while her seller runs: she comes first.
    changed = cpushare(alice, "terms", "--price", "0.015")
    assert changed.status == 0, changed
    assert "price:   0.015 a core-hour" in changed.stdout
    table = cpushare(bob, "sellers", "--json")
    assert [s["name"] for s in json.loads(table.stdout)] == ["alice", "dave"], table.stdout
    assert [(s["validated"], s["error_rate"]) for s in json.loads(table.stdout)] == \
        [(0, None), (0, None)], table.stdout
    for args, problem in [(("--max-price", "-1"), "--max-price: '-1' is not an amount"),
                          (("--min-validated", "-1"),
                           "(--min-validated) must be a whole number between 0 and"),
                          (("--country", "Italy"), "'ITALY' is not a two-letter country code")]:
        bad = cpushare(bob, "sellers", *args)
        assert bad.status == 1 and problem in bad.stderr, bad
    assert all(p.alive() for p in (sellerA.proc, sellerD.proc, buyer.proc))


def test_server_restart_seller_reappears_by_itself(market, processes, tmp_path):
    seller, home, _ = onlineSeller(market, processes, tmp_path)
    market.stop()
    seller.proc.waitForLog("lost the connection", timeout=10)
    assert seller.proc.alive()

    market.start()  # the same port and data folder
    restarted = time.monotonic()
    found = waitForSellers(home, listed(["alice"]), "the seller listed again", processes,
                           timeout=15)
    elapsed = time.monotonic() - restarted
    assert (found[0]["cores"], found[0]["memory"]) == (2, 1024)
    seller.waitConnected(count=2, timeout=5)
    assert seller.proc.alive()
    print(f"the seller was listed again {elapsed:.1f}s after the server restarted")


def test_stopping_the_seller(market, processes, tmp_path):
    seller, home, entry = onlineSeller(market, processes, tmp_path)
    stopped = time.monotonic()
    seller.proc.signal(signal.SIGTERM)
    status = seller.proc.popen.wait(timeout=5)
    assert status in CLEAN_EXIT, seller.proc.describe()
    assert "Traceback" not in seller.proc.log(), seller.proc.describe()
    assert time.monotonic() - stopped < 5
    # Gone at once: the connection was closed, not left to time out.
    assert waitForSellers(home, listed([]), "no sellers", processes,
                          timeout=SILENCE_TIMEOUT - 1) == []
    market.waitForLog(f"seller alice (session {entry['session']}) disconnected")


def test_silent_seller_is_declared_gone(market, processes, tmp_path):
    seller, home, entry = onlineSeller(market, processes, tmp_path)
    seller.proc.signal(signal.SIGSTOP)
    silenced = time.monotonic()
    waitForSellers(home, listed([]), "the silent seller gone", processes,
                   timeout=SILENCE_TIMEOUT + 10)
    elapsed = time.monotonic() - silenced
    assert elapsed >= SILENCE_TIMEOUT - 2 * HEARTBEAT, (
        f"declared gone after {elapsed:.1f}s, before the {SILENCE_TIMEOUT}s timeout"
    )
    market.waitForLog("declaring it gone", timeout=5)
    line = next(l for l in market.log().splitlines() if "declaring it gone" in l)
    assert f"session {entry['session']} (" in line and "silent for" in line, line

    # Woken up, it notices and comes back by itself.
    seller.proc.signal(signal.SIGCONT)
    found = waitForSellers(home, listed(["alice"]), "the seller back", processes,
                           timeout=15)
    assert found[0]["session"] != entry["session"]


# -- refused identities


def test_certificate_from_another_ca_is_refused(market, processes, tmp_path):
    home = market.register(tmp_path / "alice", "alice")
    evil = tmp_path / "evil"
    shutil.copytree(home, evil)
    caKey, caCert = foreignCA(tmp_path / "other-market" / "ca.pem")
    key = pki.loadKey((evil / "key.pem").read_bytes())
    (evil / "cert.pem").write_bytes(
        pki.signClientRequest(caKey, caCert, pki.makeRequest(key, "alice"), "alice")
    )

    result = cpushare(evil, "whoami")
    line = assertOneLineError(result, "refused", "certificate")
    assert market.address in line
    market.waitForLog("not signed by this market's CA")
    assert "TLS handshake with 127.0.0.1:" in market.log()

    # The seller program with that home is refused too, and says why.
    seller = startSeller(processes, evil, name="seller-evil")
    seller.proc.waitForLog("could not connect", timeout=15)
    assert "refused this client's certificate" in seller.proc.log()
    assert sellers(home, processes) == []
    # The real account is unaffected.
    assert cpushare(home, "whoami", "--json").json()["name"] == "alice"


def test_deleted_account_is_refused(market, processes, tmp_path):
    home = market.register(tmp_path / "bob", "bob")
    assert cpushare(home, "whoami").status == 0
    deleted = market.admin("delete-account", "bob")
    assert deleted.status == 0, deleted
    assert "deleted account bob" in deleted.stdout

    for command in (["whoami"], ["sellers"]):
        assertOneLineError(cpushare(home, *command), "account 'bob' was deleted")
    market.waitForLog("account 'bob' was deleted")
    assert "refusing connection 127.0.0.1:" in market.log()

    again = market.admin("delete-account", "bob")
    assert again.status == 1 and "no active account named 'bob'" in again.stderr, again


def test_no_client_certificate_cannot_say_hello(market, processes, tmp_path):
    home = market.register(tmp_path / "alice", "alice")

    # The real client code, without key and certificate.
    driver = Driver(processes)
    answer = driver("connect", name="anon", home=str(home), certificate=False)
    assert answer["ok"] is False, answer
    assert answer["error"] == "NotAuthenticated", answer
    assert "no client certificate" in answer["message"], answer

    # By hand: TLS completes (registration needs that), Hello does not.
    raw = RawClient(market, home, certificate=False)
    try:
        assert raw.readGreeting().startswith(b"CPUSHARE/1 ")
        raw.greet()
        for command, args in (("Hello", dict(role="seller", software="raw/1")),
                              ("ListSellers", dict(offset=0)),
                              ("WhoAmI", {})):
            box = raw.answer(raw.call(command, **args))
            assert box.get("_error_code") == b"NOT_AUTHENTICATED", (command, box)
            assert b"no client certificate" in box["_error_description"], box
    finally:
        raw.close()
    market.waitForLog(f"refusing connection {raw.peerName}: no client certificate")


def test_connection_that_never_says_hello_is_closed(market, tmp_path):
    home = market.register(tmp_path / "alice", "alice")
    quiet = [RawClient(market, home, certificate=False), RawClient(market, home)]
    try:
        for raw in quiet:
            raw.readGreeting()
        for raw in quiet:
            raw.waitClosed(timeout=SILENCE_TIMEOUT + 5)
    finally:
        for raw in quiet:
            raw.close()
    for raw in quiet:
        market.waitForLog(f"closing connection {raw.peerName}: no hello within")


# -- bad input on an authenticated connection


def _garbage():
    rng = random.Random(1234)
    data = bytes(rng.randrange(256) for _ in range(4096))
    return b"\x00" + data  # not even the start of a greeting


BAD_INPUT = {
    "random bytes": (_garbage(), "the peer is not speaking the CPUShare protocol"),
    "oversized frame": (
        b"CPUSHARE/1 raw/1\n" + HEADER.pack(7, 0x7FFFFFFF) + b"x" * 100,
        "message of 2147483647 bytes on channel 7 is larger than the limit of 65535",
    ),
    "oversized control": (
        b"CPUSHARE/1 raw/1\n" + HEADER.pack(0, 0x10000),
        "message of 65536 bytes on channel 0 is larger than the limit of 65535",
    ),
    "malformed control": (
        # An AMP key longer than AMP allows.
        b"CPUSHARE/1 raw/1\n" + HEADER.pack(0, 2 + 300) + b"\x01\x2c" + b"k" * 300,
        "the peer sent a control message key of 300 bytes (the limit is 255)",
    ),
    "bad greeting": (b"CPUSHARE/one two three\n", "is not a CPUShare greeting"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUT))
def test_bad_input_closes_only_that_connection(kind, market, processes, tmp_path):
    seller, home, entry = onlineSeller(market, processes, tmp_path)
    data, reason = BAD_INPUT[kind]

    raw = RawClient(market, home)
    try:
        raw.readGreeting()
        raw.send(data)
        raw.waitClosed(timeout=10)
    finally:
        raw.close()
    market.waitForLog(f"closing connection {raw.peerName}: ")
    line = next(l for l in market.log().splitlines() if raw.peerName in l and "closing" in l)
    assert reason in line, line

    # Everyone else is still served: the same seller session, still listed.
    found = sellers(home, processes)
    assert [(s["name"], s["session"]) for s in found] == [("alice", entry["session"])]
    assert "lost the connection" not in seller.proc.log()
    assert market.proc.alive()
    # And a new connection works.
    assert cpushare(home, "whoami", "--json").json()["name"] == "alice"


def test_protocol_version_mismatch(market, processes, tmp_path):
    home = market.register(tmp_path / "alice", "alice")
    raw = RawClient(market, home)
    try:
        greeting = raw.readGreeting()
        assert greeting.startswith(b"CPUSHARE/1 cpushare/"), greeting
        raw.send(b"CPUSHARE/99 x\n")
        rest = raw.waitClosed(timeout=10)
    finally:
        raw.close()
    assert rest == b"", rest  # nothing but the greeting, then a clean close
    market.waitForLog(f"closing connection {raw.peerName}: ")
    line = next(l for l in market.log().splitlines() if raw.peerName in l and "closing" in l)
    assert "version 99" in line and "version 1" in line, line


def test_client_reports_a_server_speaking_another_version(market, tmp_path):
    """The CLI, talking to a server of another protocol version, says so in one line."""
    home = market.register(tmp_path / "alice", "alice")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(market.data / "server.pem"), str(market.data / "server-key.pem"))
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    listener.settimeout(30)
    received = []

    def serve():
        try:
            conn, _ = listener.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"CPUSHARE/99 future-market/9\n")
                tls.settimeout(10)
                while True:
                    data = tls.recv(4096)
                    if not data:
                        break
                    received.append(data)
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    other = tmp_path / "other"
    shutil.copytree(home, other)
    config = json.loads((other / "config.json").read_text())
    config["server"] = f"{LOOPBACK}:{listener.getsockname()[1]}"
    (other / "config.json").write_text(json.dumps(config))
    try:
        result = cpushare(other, "whoami")
    finally:
        thread.join(15)
        listener.close()
    assertOneLineError(result, "version 99", "version 1")
    assert b"".join(received).startswith(b"CPUSHARE/1 "), received


# -- the relay


def frames(rng, sizes):
    return [bytes(rng.randrange(256) for _ in range(n)) for n in sizes]


def test_relay_end_to_end(market, processes, tmp_path):
    alice = market.register(tmp_path / "alice", "alice")
    mallory = market.register(tmp_path / "mallory", "mallory")
    drive = Driver(processes)
    a1 = drive("connect", name="a1", home=str(alice))
    a2 = drive("connect", name="a2", home=str(alice))
    m = drive("connect", name="m", home=str(mallory))
    for answer in (a1, a2, m):
        assert answer["ok"], answer
    assert a1["account"] == a2["account"] == "alice" and m["account"] == "mallory"

    # Another account's session cannot be linked to, either way.
    for who, peer in (("m", a1["session"]), ("a1", m["session"])):
        refused = drive("link", name=who, channel=3, peer_session=peer, peer_channel=3)
        assert refused["ok"] is False and refused["error"] == "NotPermitted", refused
        assert "same account" in refused["message"], refused
    missing = drive("link", name="a1", channel=3, peer_session=999999, peer_channel=3)
    assert missing["error"] == "NoSuchSession", missing

    # Two sessions of one account: link a1's channel 5 to a2's channel 7.
    assert drive("link", name="a1", channel=5, peer_session=a2["session"],
                 peer_channel=7)["ok"]
    events = drive("events", name="a2", count=1)["events"]
    assert events == [{"kind": "linked", "channel": 7,
                       "peer_session": a1["session"], "peer_channel": 5}]
    busy = drive("link", name="a1", channel=5, peer_session=a2["session"], peer_channel=8)
    assert busy["error"] == "ChannelBusy", busy

    rng = random.Random(5)
    forward = frames(rng, [0, 1, 60, 64, 1500, 9000, 65535, 2] + [rng.randrange(1, 1600)
                                                               for _ in range(40)])
    back = frames(rng, [64, 1514, 333])
    assert drive("send", name="a1", channel=5, frames=[f.hex() for f in forward])["sent"] \
        == len(forward)
    got = drive("frames", name="a2", channel=7, count=len(forward))["frames"]
    assert list(got) == ["7"], "frames arrived on channels other than the linked one"
    assert [bytes.fromhex(f) for f in got["7"]] == forward, "frames changed on the way"

    drive("send", name="a2", channel=7, frames=[f.hex() for f in back])
    got = drive("frames", name="a1", channel=5, count=len(back))["frames"]
    assert {ch: [bytes.fromhex(f) for f in v] for ch, v in got.items()} == {"5": back}

    s1 = drive("stats", name="a1")
    s2 = drive("stats", name="a2")
    assert s1["links"] == [dict(
        channel=5, peer_session=a2["session"], peer_channel=7,
        frames_out=len(forward), bytes_out=sum(map(len, forward)),
        frames_in=len(back), bytes_in=sum(map(len, back)), dropped=0,
    )], s1
    assert s2["links"] == [dict(
        channel=7, peer_session=a1["session"], peer_channel=5,
        frames_out=len(back), bytes_out=sum(map(len, back)),
        frames_in=len(forward), bytes_in=sum(map(len, forward)), dropped=0,
    )], s2
    assert s1["unrouted"] == s2["unrouted"] == 0

    # Frames on a channel that is not linked reach nobody and are counted.
    stray = frames(rng, [100] * 10)
    drive("send", name="a1", channel=9, frames=[f.hex() for f in stray])
    marker = b"marker after the stray frames"
    drive("send", name="a1", channel=5, frames=[marker.hex()])
    got = drive("frames", name="a2", count=len(forward) + 1)["frames"]
    assert list(got) == ["7"] and bytes.fromhex(got["7"][-1]) == marker, got
    assert len(got["7"]) == len(forward) + 1, "stray frames were delivered"
    assert drive("stats", name="a1")["unrouted"] == len(stray)
    assert drive("frames", name="m", count=1, timeout=0.5)["frames"] == {}, (
        "another account received frames"
    )

    # One side goes: the other is told, and its frames are no longer delivered.
    closed = drive("close", name="a2")
    assert closed["ok"], closed
    events = drive("events", name="a1", count=1)["events"]
    assert events == [{"kind": "unlinked", "channel": 5,
                       "reason": "the peer disconnected"}], events
    drive("send", name="a1", channel=5, frames=[f.hex() for f in stray])
    after = drive("stats", name="a1")
    assert after["links"] == [], after
    assert after["unrouted"] == 2 * len(stray), after
    assert drive("frames", name="m", count=1, timeout=0.2)["frames"] == {}

    # The channel can be linked again, to another session of the account.
    a3 = drive("connect", name="a3", home=str(alice))
    assert drive("link", name="a1", channel=5, peer_session=a3["session"],
                 peer_channel=1)["ok"]
    drive("send", name="a1", channel=5, frames=[marker.hex()])
    got = drive("frames", name="a3", count=1)["frames"]
    assert got == {"1": [marker.hex()]}, got
