"""
The server certificate the market issues itself: short-lived, naming the
CA's revocation list, and renewed by the running server on the reactor's
clock, so that new connections get the new one without a restart while
clients, which check ca.pem and the hostname, notice nothing.
"""

import datetime
import os
import ssl
import time

import pytest
from cryptography import x509
from OpenSSL import SSL
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher

from cpushare import pki
from cpushare.server.credentials import ServerCertificateRenewal, loadOrCreate
from cpushare.server.web import WebTLS

DAY = 24 * 3600.0
CRL_URL = "https://localhost:8443/ca.crl"


def inline(f, *args):
    """Run the renewal's thread work at once (a test has no thread pool)."""
    return defer.maybeDeferred(f, *args)


def clockAtNow():
    clock = task.Clock()
    clock.advance(time.time())
    return clock


def credentialsIssued(data, daysAgo):
    """
    A market data folder whose server certificate was issued C{daysAgo}
    days ago, loaded; and a clock at that time.  (Clients in these tests
    check certificates against the real time.)
    """
    when = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) - \
        datetime.timedelta(days=daysAgo)
    caKey, caCert = pki.createAuthority("test CA", now=when - datetime.timedelta(days=1))
    key, cert = pki.issueServerCertificate(caKey, caCert, "localhost", now=when)
    os.makedirs(data)
    pki.writePrivate(os.path.join(data, "ca-key.pem"), pki.keyToPEM(caKey))
    pki.writePublic(os.path.join(data, "ca.pem"), pki.certToPEM(caCert))
    pki.writePrivate(os.path.join(data, "server-key.pem"), pki.keyToPEM(key))
    pki.writePublic(os.path.join(data, "server.pem"), pki.certToPEM(cert))
    clock = task.Clock()
    clock.advance(when.timestamp())
    return loadOrCreate(data, "localhost"), clock


def served(tls, caPEM, hostname="localhost"):
    """
    The certificate a client that trusts C{caPEM} and checks C{hostname}
    (as the market's clients do) receives from C{tls}, in memory; raises
    ssl.SSLError when it refuses it.
    """
    server = tls.serverConnectionForTLS(None)
    server.set_accept_state()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=caPEM.decode("ascii"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=hostname)
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        server.bio_write(outgoing.read())
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            incoming.write(server.bio_read(65536))
        except SSL.WantReadError:
            pass
    return x509.load_der_x509_certificate(client.getpeercert(binary_form=True))


def test_the_server_certificate_is_short_lived_and_names_the_revocation_list():
    caKey, caCert = pki.createAuthority("test CA")
    _, cert = pki.issueServerCertificate(caKey, caCert, "localhost", crlUrl=CRL_URL)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= datetime.timedelta(days=90, minutes=5)
    assert pki.crlUrlOf(cert) == CRL_URL
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign
    # Client certificates name it too.
    client = pki.loadCertificate(pki.signClientRequest(
        caKey, caCert, pki.makeRequest(pki.generateKey(), "alice"), "alice", crlUrl=CRL_URL))
    assert pki.crlUrlOf(client) == CRL_URL


def test_the_running_server_renews_its_certificate_before_it_runs_out(tmp_path):
    data = str(tmp_path / "data")
    creds, clock = credentialsIssued(data, 30)
    first = creds.cert
    assert first.not_valid_after_utc - first.not_valid_before_utc <= datetime.timedelta(
        days=90, minutes=5)
    amp = creds.serverTLS()
    renewal = ServerCertificateRenewal(clock, creds, inThread=inline)
    renewal.start()
    assert creds.certPEM == pki.certToPEM(first), "a fresh certificate is kept"

    # Checked daily: kept while 61 days or more remain.
    for _ in range(29):
        clock.advance(DAY)
    assert creds.cert.serial_number == first.serial_number
    earlier = amp.serverConnectionForTLS(None)      # a connection begun before
    clock.advance(DAY)                              # 60 days left: renewed
    renewed = creds.cert
    assert renewed.serial_number != first.serial_number
    renewed.verify_directly_issued_by(creds.caCert)
    issuedAt = datetime.datetime.fromtimestamp(clock.seconds(), datetime.timezone.utc)
    assert renewed.not_valid_after_utc == issuedAt.replace(microsecond=0) + pki.SERVER_VALIDITY
    assert renewed.public_key() != first.public_key(), "a new key too"

    # New connections get it without a restart, and a client that checks
    # ca.pem and the hostname accepts it.
    assert served(amp, creds.caPEM).serial_number == renewed.serial_number
    assert earlier.get_certificate().to_cryptography().serial_number == first.serial_number
    # It is on disk for the next start, with its key.
    again = loadOrCreate(data, "localhost")
    assert again.cert.serial_number == renewed.serial_number
    assert again.keyPEM == creds.keyPEM
    assert oct(os.stat(os.path.join(data, "server-key.pem")).st_mode & 0o777) == "0o600"

    for _ in range(29):
        clock.advance(DAY)
    assert creds.cert.serial_number == renewed.serial_number
    renewal.stopService()


def test_a_certificate_that_ran_out_while_the_server_was_stopped_is_renewed_at_start(
        tmp_path):
    creds, clock = credentialsIssued(str(tmp_path / "data"), 100)
    first = creds.cert
    web = creds.follow(WebTLS(creds.keyPEM, creds.certPEM))
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        served(web, creds.caPEM)
    clock.advance(100 * DAY)
    renewal = ServerCertificateRenewal(clock, creds, every=0, inThread=inline)
    renewal.start()
    assert creds.cert.serial_number != first.serial_number
    assert creds.cert.not_valid_before_utc < datetime.datetime.fromtimestamp(
        clock.seconds(), datetime.timezone.utc) < creds.cert.not_valid_after_utc
    assert served(web, creds.caPEM).serial_number == creds.cert.serial_number


def test_a_certificate_naming_another_revocation_list_is_renewed(tmp_path):
    clock = clockAtNow()
    creds = loadOrCreate(str(tmp_path / "data"), "localhost")
    assert pki.crlUrlOf(creds.cert) is None
    creds.crlUrl = CRL_URL
    ServerCertificateRenewal(clock, creds, every=0, inThread=inline).start()
    assert pki.crlUrlOf(creds.cert) == CRL_URL
    before = creds.cert.serial_number
    ServerCertificateRenewal(clock, creds, every=0, inThread=inline).start()
    assert creds.cert.serial_number == before, "nothing to renew"


def test_a_failed_renewal_keeps_the_certificate_and_is_tried_again_the_next_day(tmp_path):
    clock = clockAtNow()
    creds = loadOrCreate(str(tmp_path / "data"), "localhost")
    first = creds.cert
    clock.advance(31 * DAY)
    failing = [True]

    def diskFull(f, *args):
        if failing:
            return defer.fail(OSError(28, "No space left on device"))
        return inline(f, *args)

    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        renewal = ServerCertificateRenewal(clock, creds, inThread=diskFull)
        renewal.start()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert creds.cert.serial_number == first.serial_number
    [line] = [formatEvent(e) for e in logged if "renew" in formatEvent(e)]
    assert "could not renew the server certificate" in line
    assert "No space left on device" in line and "trying again in 86400s" in line
    assert not any(e.get("log_failure") for e in logged), "no traceback"
    failing.clear()
    clock.advance(DAY)
    assert creds.cert.serial_number != first.serial_number
    renewal.stopService()


def test_a_key_that_does_not_match_the_certificate_on_disk_gets_a_new_pair(tmp_path):
    data = str(tmp_path / "data")
    first = loadOrCreate(data, "localhost")
    # A renewal cut short between writing the key and the certificate.
    pki.writePrivate(os.path.join(data, "server-key.pem"), pki.keyToPEM(pki.generateKey()))
    again = loadOrCreate(data, "localhost")
    assert again.cert.serial_number != first.cert.serial_number
    assert pki.loadKey(again.keyPEM).public_key() == again.cert.public_key()
    again.serverTLS()                                   # the pair loads


def test_a_long_lived_certificate_of_an_older_market_is_replaced_at_start(tmp_path,
                                                                          monkeypatch):
    data = str(tmp_path / "data")
    monkeypatch.setattr(pki, "SERVER_VALIDITY", datetime.timedelta(days=825))
    creds = loadOrCreate(data, "localhost")
    monkeypatch.undo()
    first = creds.cert
    assert first.not_valid_after_utc - first.not_valid_before_utc > datetime.timedelta(
        days=800)
    ServerCertificateRenewal(clockAtNow(), creds, every=0, inThread=inline).start()
    renewed = creds.cert
    assert renewed.serial_number != first.serial_number
    assert renewed.not_valid_after_utc - renewed.not_valid_before_utc <= datetime.timedelta(
        days=90, minutes=5)
