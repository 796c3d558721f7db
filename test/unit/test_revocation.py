"""
The market CA's revocation list on the web port (/ca.crl): what a
relying party that fetches it learns.  A certificate revoked with
cpushare-admin (or of a deleted account) is listed, within one look at
the changes of access; a fresh one is not; the list is signed by the CA
and replaced, on the reactor's clock, well before its nextUpdate.  The
store's query runs on SQLite and PostgreSQL.
"""

import datetime

import pytest
from cryptography import x509
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from cpushare import pki
from cpushare.server import web
from cpushare.server.db import store
from cpushare.server.access import AccessWatch
from cpushare.server.revocation import REFRESH_EVERY, RevocationList, revokedEntries

CRL_URL = "https://localhost:8443/ca.crl"


class InlineStore:
    """The store's interface, running each query at once on one connection."""

    def __init__(self, conn):
        self.conn = conn

    def run(self, fn, *args):
        return defer.maybeDeferred(store.transact, self.conn, fn, *args)


class CA:
    def __init__(self):
        self.caKey, self.caCert = pki.createAuthority("test CA")
        self.crlUrl = CRL_URL


def register(conn, ca, name):
    """An account with a certificate the CA signed, as registration stores it."""
    key = pki.generateKey()
    cert = pki.loadCertificate(pki.signClientRequest(
        ca.caKey, ca.caCert, pki.makeRequest(key, name), name, crlUrl=ca.crlUrl))
    store.transact(conn, store.createAccount, name, pki.fingerprint(cert),
                   pki.publicKeyFingerprint(cert), pki.serialHex(cert))
    return cert


def fetch(revocations):
    """GET /ca.crl from the web site: (status, headers, body)."""
    channel = web.site(None, revocations).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /ca.crl HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines)}
    channel.connectionLost(None)
    return int(status.split()[1]), headers, body


def servedList(revocations, ca):
    status, headers, body = fetch(revocations)
    assert status == 200
    assert headers["content-type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(body)
    assert crl.issuer == ca.caCert.subject
    assert crl.is_signature_valid(ca.caCert.public_key())
    return crl


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


@pytest.fixture
def setup(conn):
    ca = CA()
    clock = task.Clock()
    clock.advance(datetime.datetime.now(datetime.timezone.utc).timestamp())
    inlineStore = InlineStore(conn)
    revocations = RevocationList(clock, inlineStore, ca, inThread=inline)
    watch = AccessWatch(clock, inlineStore, lambda: [], every=1.0)
    watch.listeners.append(revocations.changed)
    revocations.start()
    defer.ensureDeferred(watch.start())
    yield ca, clock, revocations
    watch.stop()
    revocations.stopService()


def test_a_revoked_certificate_is_listed_signed_by_the_ca_and_a_fresh_one_is_not(
        conn, setup):
    ca, clock, revocations = setup
    alice = register(conn, ca, "alice")
    bob = register(conn, ca, "bob")
    assert pki.crlUrlOf(alice) == CRL_URL
    crl = servedList(revocations, ca)
    assert len(crl) == 0

    done = store.transact(conn, store.revoke, pki.serialHex(alice).upper())
    assert [serial for _, _, serial in done] == [pki.serialHex(alice)]
    clock.advance(1.0)                      # the server's next look at access_changes
    crl = servedList(revocations, ca)
    entry = crl.get_revoked_certificate_by_serial_number(alice.serial_number)
    assert entry is not None
    now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.timezone.utc)
    assert abs(entry.revocation_date_utc - now) < datetime.timedelta(minutes=5)
    assert crl.get_revoked_certificate_by_serial_number(bob.serial_number) is None
    assert len(crl) == 1
    # Short-lived, and the CRL number grows.
    assert crl.next_update_utc - crl.last_update_utc <= datetime.timedelta(days=1)
    assert crl.next_update_utc > now


def test_a_deleted_accounts_certificates_are_listed_and_a_suspended_ones_are_not(
        conn, setup):
    ca, clock, revocations = setup
    carol = register(conn, ca, "carol")
    dave = register(conn, ca, "dave")
    assert store.transact(conn, store.deleteAccount, "carol")
    assert store.transact(conn, store.suspendAccount, "dave", "unpaid")
    clock.advance(1.0)
    crl = servedList(revocations, ca)
    entry = crl.get_revoked_certificate_by_serial_number(carol.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.cessation_of_operation
    assert crl.get_revoked_certificate_by_serial_number(dave.serial_number) is None


def test_the_list_is_replaced_on_the_clock_before_its_next_update(conn, setup):
    ca, clock, revocations = setup
    first = servedList(revocations, ca)
    number = first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    for _ in range(int(24 * 3600 / REFRESH_EVERY) * 3):
        clock.advance(REFRESH_EVERY)
        crl = servedList(revocations, ca)
        now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.timezone.utc)
        assert crl.next_update_utc - now >= pki.CRL_LIFETIME - datetime.timedelta(
            seconds=REFRESH_EVERY)
        newNumber = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        assert newNumber > number
        number = newNumber


def test_certificates_past_their_validity_are_left_out():
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    old = (now - pki.CLIENT_VALIDITY - datetime.timedelta(days=1)).isoformat()
    recent = (now - datetime.timedelta(days=1)).isoformat()
    entries = revokedEntries([("a1", recent, None, old), ("b2", recent, None, recent)], now)
    assert [serial for serial, _, _ in entries] == [0xb2]


def test_without_a_list_the_page_is_not_found_and_before_the_first_it_is_unavailable():
    channel = web.site(None).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /ca.crl HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 404")
    channel.connectionLost(None)
    revocations = RevocationList(task.Clock(), None, CA(), inThread=inline)
    status, _, body = fetch(revocations)
    assert status == 503 and b"not ready" in body
