"""
The web port's TLS and headers, in memory: what a browser (or a scanner)
can negotiate with the server's TLS context, and the headers every page
carries.  test/integration/test_web_tls.py checks the same of a real
server with testssl.sh.
"""

import datetime
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.testing import StringTransport

from cpushare import pki
from cpushare.server import web
from cpushare.server.money.funds import Outcome


def ecCredentials():
    caKey, caCert = pki.createAuthority("test CA")
    key, cert = pki.issueServerCertificate(caKey, caCert, "localhost")
    return pki.keyToPEM(key), pki.certToPEM(cert)


def rsaCredentials():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    keyPEM = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    return keyPEM, cert.public_bytes(serialization.Encoding.PEM)


CREDENTIALS = {"ec": ecCredentials(), "rsa": rsaCredentials()}


class Handshake:
    """A stdlib TLS client against the web port's context, in memory."""

    def __init__(self, kind, minimum=ssl.TLSVersion.TLSv1, maximum=ssl.TLSVersion.TLSv1_3,
                 ciphers=None, webTLS=None, resume=None):
        webTLS = webTLS or web.WebTLS(*CREDENTIALS[kind])
        self.server = webTLS.serverConnectionForTLS(None)
        self.server.set_accept_state()
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        if resume is not None:
            self.context = resume.context
            self.client = resume.context.wrap_bio(
                self.incoming, self.outgoing, server_hostname="localhost",
                session=resume.client.session)
            return
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = minimum
        context.maximum_version = maximum
        context.set_ciphers(ciphers or "ALL:@SECLEVEL=0")
        self.context = context
        self.client = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def pump(self):
        for _ in range(20):
            try:
                self.client.do_handshake()
                self.client.read(65536)
            except ssl.SSLWantReadError:
                pass
            data = self.outgoing.read()
            if data:
                self.server.bio_write(data)
            try:
                self.server.do_handshake()
                self.server.recv(65536)
            except (SSL.WantReadError, SSL.ZeroReturnError):
                pass
            try:
                back = self.server.bio_read(65536)
            except SSL.WantReadError:
                back = b""
            if back:
                self.incoming.write(back)
            if not data and not back:
                return

    def connect(self):
        """The (protocol, cipher) negotiated, or None when the server refused."""
        try:
            self.pump()
            self.client.write(b"GET / HTTP/1.0\r\n\r\n")
            self.pump()
        except (ssl.SSLError, SSL.Error):
            return None
        return self.client.version(), self.client.cipher()[0]


@pytest.mark.slow  # a scan: a handshake for every cipher suite OpenSSL knows
@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_only_tls_1_3_and_1_2_with_aead_suites_are_offered(kind):
    assert Handshake(kind).connect()[0] == "TLSv1.3"
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        assert Handshake(kind, minimum=old, maximum=old).connect() is None, old
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.set_ciphers("ALL:@SECLEVEL=0")
    offered = [c["name"] for c in client.get_ciphers() if c["protocol"] == "TLSv1.2"]
    accepted = []
    for cipher in offered:
        negotiated = Handshake(kind, minimum=ssl.TLSVersion.TLSv1_2,
                               maximum=ssl.TLSVersion.TLSv1_2, ciphers=cipher).connect()
        if negotiated is not None:
            accepted.append(negotiated[1])
    sig = "ECDSA" if kind == "ec" else "RSA"
    assert sorted(accepted) == sorted([
        f"ECDHE-{sig}-AES128-GCM-SHA256", f"ECDHE-{sig}-AES256-GCM-SHA384",
        f"ECDHE-{sig}-CHACHA20-POLY1305"])


def test_no_tls_1_2_session_tickets():
    handshake = Handshake("ec", minimum=ssl.TLSVersion.TLSv1_2,
                          maximum=ssl.TLSVersion.TLSv1_2)
    assert handshake.connect() is not None
    assert not handshake.client.session.has_ticket


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_no_session_is_resumed(version):
    # (TLS 1.3 still hands out a ticket: with OP_NO_TICKET, OpenSSL makes it
    # a reference to its session cache, which is off, so it resumes nothing.)
    webTLS = web.WebTLS(*CREDENTIALS["ec"])
    first = Handshake("ec", minimum=version, maximum=version, webTLS=webTLS)
    assert first.connect() is not None
    assert first.client.session is not None
    second = Handshake("ec", webTLS=webTLS, resume=first)
    assert second.connect() is not None
    assert not second.client.session_reused


class FakeFunds:
    async def paymentReturned(self, paymentId, payerId, nonce):
        return Outcome(200, "Funds added", "10.00 were added to your funds.")

    async def paymentCancelled(self, nonce):
        raise RuntimeError("the database is gone")


def get(path):
    channel = web.site(FakeFunds()).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    channel.connectionLost(None)
    return int(status.split()[1]), headers, body


@pytest.mark.parametrize("path,status", [
    (b"/", 200), (b"/paypal/return?n=x", 200), (b"/nothing", 404), (b"/paypal/", 404),
    (b"/paypal/cancel?n=x", 500),
])
def test_every_page_has_hsts_security_headers_and_no_banner(path, status, caplog):
    got, headers, body = get(path)
    assert got == status
    assert "server" not in headers
    assert headers["strict-transport-security"] == f"max-age={web.HSTS_MAX_AGE}"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    # No inline style: the pages' style is the site's style sheet.
    assert "unsafe-inline" not in csp
    assert "style-src 'self'" in csp
    assert b"<style" not in body and b' href="/static/site.css"' in body
