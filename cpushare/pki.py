"""
The market's public-key infrastructure.

The server keeps its own certificate authority.  It signs the server's TLS
certificate and, at registration, a client certificate for each account; the
client generates its key and sends only a certificate signing request, so the
key never leaves the client.  Keys are ECDSA P-256: small, and fast to
handshake with, which matters for a server holding thousands of connections.

Connections are TLS 1.3 only.  Clients verify the server with
service_identity against the CA the operator handed out; the server asks for
a client certificate, verifies it against its CA, and maps it to an account by
the certificate's SHA-256 fingerprint.
"""

import datetime
import hashlib
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.logger import Logger
from zope.interface import implementer

from twisted.internet.interfaces import IOpenSSLServerConnectionCreator

log = Logger()

CA_VALIDITY = datetime.timedelta(days=3650)
# The server's certificate is short-lived, as a public CA's are: the running
# server issues itself a new one from its CA when fewer than
# SERVER_RENEW_BEFORE remain (cpushare.server.credentials), checking daily.
# 61 days, so that it never has fewer than 60 left: scanners (testssl.sh)
# call a certificate that expires within 60 days a MEDIUM finding.
SERVER_VALIDITY = datetime.timedelta(days=90)
SERVER_RENEW_BEFORE = datetime.timedelta(days=61)
CLIENT_VALIDITY = datetime.timedelta(days=3650)
# A revocation list says when the next one is due; the server makes a new
# one whenever a certificate is revoked and well before this runs out.
CRL_LIFETIME = datetime.timedelta(days=1)


class BadRequest(ValueError):
    """A certificate signing request that the authority will not sign."""


def generateKey():
    return ec.generate_private_key(ec.SECP256R1())


def keyToPEM(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def loadKey(pem):
    return serialization.load_pem_private_key(pem, password=None)


def certToPEM(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def loadCertificate(pem):
    return x509.load_pem_x509_certificate(pem)


def fingerprint(cert):
    """
    The SHA-256 fingerprint (hex) of a certificate given as a cryptography
    certificate, a pyOpenSSL X509 or DER bytes.
    """
    if isinstance(cert, crypto.X509):
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    elif isinstance(cert, bytes):
        der = cert
    else:
        der = cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def publicKeyFingerprint(cert):
    """The SHA-256 (hex) of a certificate's SubjectPublicKeyInfo: the same for every
    certificate of one key."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def serialHex(cert):
    """A certificate's serial number as lower-case hex, as C{cpushare-admin revoke} takes it."""
    return format(cert.serial_number, "x")


def writePrivate(path, data):
    """
    Write C{data} to C{path} readable by the owner alone (mode 0600), by
    writing a new file and renaming it over the old one.
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def writePublic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _name(commonName, unit=None):
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CPUShare")]
    if unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, commonName))
    return x509.Name(attrs)


def createAuthority(commonName, now=None):
    """
    Create a certificate authority: a key and a self-signed certificate that
    may sign certificates but not other authorities.
    """
    now = now or _now()
    key = generateKey()
    name = _name(commonName, "Certificate Authority")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _subjectAltNames(hostname):
    names = []
    for host in [hostname] + (["127.0.0.1", "::1"] if hostname == "localhost" else []):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


# A leaf's key signs (its TLS handshakes) and nothing else.
_SIGNING_ONLY = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False)


def _crlDistributionPoint(crlUrl):
    return x509.CRLDistributionPoints([x509.DistributionPoint(
        full_name=[x509.UniformResourceIdentifier(crlUrl)],
        relative_name=None, reasons=None, crl_issuer=None)])


def crlUrlOf(cert):
    """The revocation list address a certificate names, or None."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return None
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                return name.value
    return None


def _leaf(caKey, caCert, subject, publicKey, validity, usage, extra=(), now=None,
          crlUrl=None):
    now = now or _now()
    extra = list(extra)
    if crlUrl is not None:
        extra.append(_crlDistributionPoint(crlUrl))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(caCert.subject)
        .public_key(publicKey)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + validity, caCert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()),
            critical=False,
        )
    )
    for ext in extra:
        builder = builder.add_extension(ext, critical=isinstance(ext, x509.KeyUsage))
    return builder.sign(caKey, hashes.SHA256())


def issueServerCertificate(caKey, caCert, hostname, now=None, crlUrl=None):
    """
    A key and certificate for the market server under C{hostname} (a DNS
    name or an IP address; C{localhost} also covers the loopback addresses),
    valid for SERVER_VALIDITY and naming C{crlUrl}, when given, as where its
    CA's revocation list is.
    """
    key = generateKey()
    cert = _leaf(
        caKey, caCert, _name(hostname, "Market Server"), key.public_key(),
        SERVER_VALIDITY, ExtendedKeyUsageOID.SERVER_AUTH,
        [_subjectAltNames(hostname), _SIGNING_ONLY], now, crlUrl,
    )
    return key, cert


def makeRevocationList(caKey, caCert, revoked, number, now=None, lifetime=CRL_LIFETIME):
    """
    The CA's certificate revocation list (DER): C{revoked} is
    [(serial number, datetime revoked, x509.ReasonFlags or None)];
    C{number} is the list's CRLNumber, larger for each new list.  The list
    is due to be replaced after C{lifetime}.
    """
    now = now or _now()
    entries = []
    for serial, when, reason in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        entries.append(entry.build())
    # Given whole (add_revoked_certificate copies the list at each entry).
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=caCert.subject, last_update=now, next_update=now + lifetime,
        revoked_certificates=entries,
    ).add_extension(x509.CRLNumber(number), critical=False).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()),
        critical=False)
    return builder.sign(caKey, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def makeRequest(key, name):
    """A certificate signing request (PEM) for account C{name}."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def signClientRequest(caKey, caCert, csrPEM, name, now=None, crlUrl=None):
    """
    Check a client's certificate signing request and sign it for account
    C{name}, naming C{crlUrl} (when given) as where its CA's revocation
    list is.  Returns the certificate as PEM.

    @raise BadRequest: the request does not parse, is not self-consistent,
        or carries a key the market does not accept.
    """
    try:
        csr = x509.load_pem_x509_csr(csrPEM)
    except ValueError as e:
        raise BadRequest(f"the certificate request does not parse: {e}")
    if not csr.is_signature_valid:
        raise BadRequest("the certificate request's signature is not valid")
    publicKey = csr.public_key()
    if isinstance(publicKey, ec.EllipticCurvePublicKey):
        if publicKey.curve.key_size < 256:
            raise BadRequest("elliptic curve keys must be at least 256 bits")
    else:
        from cryptography.hazmat.primitives.asymmetric import rsa
        if not isinstance(publicKey, rsa.RSAPublicKey) or publicKey.key_size < 2048:
            raise BadRequest("keys must be ECDSA P-256 or RSA of at least 2048 bits")
    cert = _leaf(
        caKey, caCert, _name(name, "Account"), publicKey,
        CLIENT_VALIDITY, ExtendedKeyUsageOID.CLIENT_AUTH, (), now, crlUrl,
    )
    return certToPEM(cert)


# Texts for the X509 verification errors a client certificate commonly fails
# with (OpenSSL's X509_V_ERR_* numbers).
_VERIFY_ERRORS = {
    2: "the certificate's issuer is unknown",
    7: "the certificate's signature is invalid",
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "the certificate is self-signed, not signed by this market",
    19: "the certificate chain ends in a CA this market does not trust",
    20: "the certificate is not signed by this market's CA",
    21: "the certificate is not signed by this market's CA",
    26: "the certificate may not be used for this purpose",
}


def verifyErrorText(errno):
    return _VERIFY_ERRORS.get(errno, f"certificate verification error {errno}")


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    Server-side TLS 1.3 with optional client certificates verified against
    the market's CA.

    A client may connect without a certificate (to register; the session
    layer refuses it everything else).  A certificate that does not verify
    fails the handshake; the reason is kept on the TLS protocol as
    C{cpushareVerifyError} so the session can log it.
    """

    def __init__(self, caPEM, keyPEM, certPEM):
        self._caPEM = caPEM
        self.useCertificate(keyPEM, certPEM)

    def useCertificate(self, keyPEM, certPEM):
        """Serve this key and certificate to the connections that begin from now on."""
        caPEM = self._caPEM
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_options(
            SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET
        )
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.use_privatekey(loadKey(keyPEM))
        ctx.use_certificate(loadCertificate(certPEM))
        ctx.check_privatekey()
        ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(loadCertificate(caPEM)))
        ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        ctx.set_verify_depth(2)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        self._context = ctx

    def _verify(self, conn, cert, errno, depth, ok):
        if not ok:
            tlsProtocol = conn.get_app_data()
            if tlsProtocol is not None and not getattr(
                tlsProtocol, "cpushareVerifyError", None
            ):
                subject = cert.to_cryptography().subject.rfc4514_string() if cert else "?"
                tlsProtocol.cpushareVerifyError = f"{verifyErrorText(errno)} ({subject})"
        return ok

    def serverConnectionForTLS(self, tlsProtocol):
        conn = SSL.Connection(self._context, None)
        conn.set_app_data(tlsProtocol)
        return conn


def clientTLS(hostname, caPEM, keyPEM=None, certPEM=None):
    """
    Client-side TLS 1.3 options: the server must present a certificate for
    C{hostname} signed by the CA in C{caPEM}; the client presents its own
    certificate when it has one.
    """
    extra = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_3}
    if keyPEM is not None and certPEM is not None:
        # cryptography objects: pyOpenSSL deprecates its own X509 and PKey,
        # which ssl.PrivateCertificate would hand it.
        extra.update(privateKey=loadKey(keyPEM), certificate=loadCertificate(certPEM))
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=ssl.Certificate.loadPEM(caPEM),
        extraCertificateOptions=extra,
    )
