"""
Accounts and certificates against a real cpushare-server, with the real
seller and buyer programs, the cpushare CLI and cpushare-admin: suspended
and deleted accounts lose their live connections within the documented
delay (docs/operator.md: --access-check, 1 s, plus one query), revoked
certificates are refused at every later handshake, `cpushare rekey`
replaces a certificate, and registration floods are refused by name.
"""

import shutil
import time

from cpushare import pki

from .conftest import (
    Market, assertOneLineError, cpushare, startBuyer, startSeller, waitUntil,
)

# docs/operator.md: closed within --access-check (1 s) and one query; the
# extra second is for a loaded machine reading the logs.
CLOSE_WITHIN = 3.0


def _closedWithin(market, client, name, count=1):
    """Seconds until the server closed C{name}'s session (and the program saw it)."""
    started = time.monotonic()
    market.waitForLog(f"of account {name} (", count=count, timeout=30)
    elapsed = time.monotonic() - started
    client.proc.waitForLog("lost the connection", timeout=30)
    return elapsed


def test_suspended_and_deleted_accounts_lose_their_live_connections(market, processes,
                                                                    tmp_path):
    alice = market.register(tmp_path / "alice", "alice")
    bob = market.register(tmp_path / "bob", "bob")
    seller = startSeller(processes, alice, name="seller-alice")
    buyer = startBuyer(processes, bob, name="buyer-bob")
    seller.waitConnected()
    buyer.waitConnected()

    suspended = market.admin("suspend", "alice", "--reason", "unpaid bills")
    assert suspended.status == 0 and "suspended account alice" in suspended.stdout, suspended
    assert _closedWithin(market, seller, "alice") <= CLOSE_WITHIN
    assert "suspended: unpaid bills" in market.log()
    # It stays out: each reconnection is refused, naming the suspension.
    seller.proc.waitForLog("'alice' is suspended since", timeout=30)
    assertOneLineError(cpushare(alice, "whoami"), "'alice' is suspended since", "unpaid bills")
    assert "suspended" in market.admin("accounts").stdout
    # Lifted: the seller program comes back by itself.
    assert market.admin("unsuspend", "alice").status == 0
    seller.waitConnected(count=2, timeout=60)

    deleted = market.admin("delete-account", "bob")
    assert deleted.status == 0, deleted
    assert _closedWithin(market, buyer, "bob") <= CLOSE_WITHIN
    buyer.proc.waitForLog("account 'bob' was deleted", timeout=30)
    assert cpushare(alice, "whoami").status == 0      # nobody else is touched


def test_a_revoked_certificate_is_refused_at_every_later_handshake(market, processes,
                                                                   tmp_path):
    alice = market.register(tmp_path / "alice", "alice")
    serial = pki.serialHex(pki.loadCertificate((alice / "cert.pem").read_bytes()))
    who = cpushare(alice, "whoami")
    assert f"serial:      {serial}" in who.stdout, who
    listed = market.admin("certificates", "alice")
    assert serial in listed.stdout and "valid" in listed.stdout, listed
    seller = startSeller(processes, alice, name="seller-alice")
    seller.waitConnected()

    bad = market.admin("revoke", "0123456789abcdef0123456789abcdef0123")
    assert bad.status == 1 and "names no live certificate" in bad.stderr, bad
    revoked = market.admin("revoke", serial.upper())
    assert revoked.status == 0, revoked
    assert f"revoked the certificate of alice: serial {serial}" in revoked.stdout
    assert _closedWithin(market, seller, "alice") <= CLOSE_WITHIN
    for _ in range(2):
        assertOneLineError(cpushare(alice, "whoami"),
                           "the certificate of account 'alice' was revoked")
    seller.proc.waitForLog("the certificate of account 'alice' was revoked", timeout=30)
    assert "revoked" in market.admin("certificates", "alice").stdout


def test_rekey_replaces_the_certificate_and_the_old_one_is_refused(market, processes,
                                                                  tmp_path):
    alice = market.register(tmp_path / "alice", "alice")
    old = tmp_path / "alice-old"
    shutil.copytree(alice, old)
    oldFingerprint = pki.fingerprint(pki.loadCertificate((old / "cert.pem").read_bytes()))
    seller = startSeller(processes, alice, name="seller-alice")
    seller.waitConnected()

    result = cpushare(alice, "rekey")
    assert result.status == 0, result
    assert "the old one is revoked" in result.stdout
    newCert = pki.loadCertificate((alice / "cert.pem").read_bytes())
    newKey = pki.loadKey((alice / "key.pem").read_bytes())
    assert newCert.public_key() == newKey.public_key()
    assert pki.fingerprint(newCert) != oldFingerprint
    assert not [p.name for p in alice.iterdir() if p.suffix in (".old", ".new")]
    info = cpushare(alice, "whoami", "--json").json()
    assert (info["name"], info["fingerprint"]) == ("alice", pki.fingerprint(newCert))

    # The old certificate (a thief's copy, say) is refused from now on ...
    assertOneLineError(cpushare(old, "whoami"), "the certificate of account 'alice' was revoked")
    # ... and the running seller, cut off with it, comes back with the new one.
    seller.waitConnected(count=2, timeout=60)
    waitUntil(lambda: cpushare(alice, "sellers", "--json").json(),
              "the seller listed again", processes=processes)


def test_a_registration_flood_is_refused_naming_the_limit(processes, tmp_path):
    market = Market(processes, tmp_path / "market",
                    extra=["--registrations-per-address", "3"]).start()
    for i in range(3):
        market.register(tmp_path / f"user{i}", f"user{i}", funds=None)
    refused = cpushare(tmp_path / "user3", "register", "--server", market.address,
                       "--ca", market.ca, "--name", "user3")
    assertOneLineError(refused, "registration refused: at most 3 accounts an hour from one "
                       "address")
    # One account per key: a copied key is refused even where the limit allows.
    twin = tmp_path / "twin"
    twin.mkdir(mode=0o700)
    shutil.copy(tmp_path / "user0" / "key.pem", twin / "key.pem")
    market2 = Market(processes, tmp_path / "market2").start()
    market2.register(tmp_path / "first", "first", funds=None)
    shutil.copy(tmp_path / "first" / "key.pem", twin / "key.pem")
    again = cpushare(twin, "register", "--server", market2.address, "--ca", market2.ca,
                     "--name", "second")
    assertOneLineError(again, "this public key already belongs to an account")


def test_an_account_past_its_connection_cap_is_refused_and_its_programs_keep_working(
        processes, tmp_path):
    market = Market(processes, tmp_path / "market",
                    extra=["--max-connections-per-account", "2"]).start()
    alice = market.register(tmp_path / "alice", "alice")
    seller = startSeller(processes, alice, name="seller-alice")
    buyer = startBuyer(processes, alice, name="buyer-alice")
    seller.waitConnected()
    buyer.waitConnected()
    assertOneLineError(cpushare(alice, "whoami"),
                       "account 'alice' already has 2 connections open (limit 2, "
                       "the server's --max-connections-per-account)")
    # The buyer's program closes: its place is free again.
    buyer.proc.stop()
    waitUntil(lambda: cpushare(alice, "whoami").status == 0, "whoami accepted again",
              processes=processes)
    # The seller's program was never disturbed: still its first connection, still listed.
    assert seller.proc.log().count("as seller ") == 1
    assert "lost the connection" not in seller.proc.log()
    assert [s["name"] for s in cpushare(alice, "sellers", "--json").json()] == ["alice"]
