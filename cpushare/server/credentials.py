"""
The server's certificate authority and TLS identity, kept in its data folder.

The first start creates them; later starts load them.  A changed
C{--hostname} gets a new server certificate from the same CA, so the
C{ca.pem} users already hold keeps working.

The server certificate lives pki.SERVER_VALIDITY (90 days).  While the
server runs, L{ServerCertificateRenewal} issues it a new one from the same
CA when fewer than pki.SERVER_RENEW_BEFORE remain (checked at start, then
daily on the reactor's clock), or when the revocation list address it
should name has changed; connections that begin afterwards get the new
certificate, without a restart.  Clients check the server against ca.pem
and the hostname, never a particular certificate, so nothing changes for
them.

    ca.pem          the CA certificate: what the operator hands to users
    ca-key.pem      the CA's key (0600): signs the server's and clients' certificates
    server.pem      the server's certificate
    server-key.pem  the server's key (0600)
"""

import datetime
import os

import attr
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.logger import Logger

from cpushare import pki
from cpushare.server.clocked import ClockedService

# Seconds between looks at the server certificate's remaining validity.
RENEW_CHECK_EVERY = 24 * 3600.0


@attr.s
class Credentials:
    """
    The CA, and the server's key and certificate of the moment.  C{crlUrl}
    is where the CA's revocation list is served (None: nowhere), named in
    every certificate issued from now on.  The TLS contexts handed out by
    L{serverTLS} (and L{follow}) serve a renewed certificate from its
    L{install} on.
    """

    caKey = attr.ib()
    caCert = attr.ib()
    caPEM = attr.ib()
    keyPEM = attr.ib()
    certPEM = attr.ib()
    hostname = attr.ib()
    dataDir = attr.ib(default=None)
    crlUrl = attr.ib(default=None)
    _followers = attr.ib(factory=list, repr=False)

    def serverTLS(self):
        return self.follow(pki.ServerTLS(self.caPEM, self.keyPEM, self.certPEM))

    def follow(self, tls):
        """Have C{tls} (with a C{useCertificate(keyPEM, certPEM)}) serve every renewal."""
        self._followers.append(tls)
        return tls

    @property
    def cert(self):
        return pki.loadCertificate(self.certPEM)

    def issue(self, now=None):
        """
        A new server key and certificate (PEM), written to the data folder:
        CPU work and file writes, for a thread.
        """
        key, cert = pki.issueServerCertificate(
            self.caKey, self.caCert, self.hostname, now, self.crlUrl)
        keyPEM, certPEM = pki.keyToPEM(key), pki.certToPEM(cert)
        if self.dataDir is not None:
            pki.writePrivate(os.path.join(self.dataDir, "server-key.pem"), keyPEM)
            pki.writePublic(os.path.join(self.dataDir, "server.pem"), certPEM)
        return keyPEM, certPEM

    def install(self, keyPEM, certPEM):
        """Serve a new key and certificate on every connection that begins from now."""
        for tls in self._followers:
            tls.useCertificate(keyPEM, certPEM)
        self.keyPEM, self.certPEM = keyPEM, certPEM


def _certificateNames(cert):
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def loadOrCreate(dataDir, hostname, log=None):
    os.makedirs(dataDir, mode=0o700, exist_ok=True)
    path = lambda name: os.path.join(dataDir, name)
    if os.path.exists(path("ca.pem")):
        with open(path("ca.pem"), "rb") as f:
            caPEM = f.read()
        with open(path("ca-key.pem"), "rb") as f:
            caKey = pki.loadKey(f.read())
        caCert = pki.loadCertificate(caPEM)
    else:
        caKey, caCert = pki.createAuthority(f"CPUShare market CA ({hostname})")
        caPEM = pki.certToPEM(caCert)
        pki.writePrivate(path("ca-key.pem"), pki.keyToPEM(caKey))
        pki.writePublic(path("ca.pem"), caPEM)
        if log:
            log.info("created a certificate authority in {path}", path=path("ca.pem"))

    certPEM = keyPEM = None
    if os.path.exists(path("server.pem")):
        with open(path("server.pem"), "rb") as f:
            certPEM = f.read()
        with open(path("server-key.pem"), "rb") as f:
            keyPEM = f.read()
        cert = pki.loadCertificate(certPEM)
        if (hostname not in _certificateNames(cert) or cert.issuer != caCert.subject
                or not _matches(keyPEM, cert)):
            certPEM = keyPEM = None
    if certPEM is None:
        key, cert = pki.issueServerCertificate(caKey, caCert, hostname)
        keyPEM, certPEM = pki.keyToPEM(key), pki.certToPEM(cert)
        pki.writePrivate(path("server-key.pem"), keyPEM)
        pki.writePublic(path("server.pem"), certPEM)
        if log:
            log.info("issued the server certificate for {hostname}", hostname=hostname)
    return Credentials(caKey, caCert, caPEM, keyPEM, certPEM, hostname, dataDir)


def _matches(keyPEM, cert):
    """Whether the key is the certificate's (a renewal cut short may leave them apart)."""
    try:
        key = pki.loadKey(keyPEM)
    except ValueError:
        return False
    spki = lambda k: k.public_bytes(serialization.Encoding.DER,
                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    return spki(key.public_key()) == spki(cert.public_key())


class ServerCertificateRenewal(ClockedService):
    """
    Keeps the server certificate valid: L{start} checks it at once and then
    every C{every} seconds on the reactor's clock, and issues a new one
    (off the reactor thread: key generation and file writes) when fewer than
    C{renewBefore} remain, when it was issued for longer than
    pki.SERVER_VALIDITY (by an older market), or when it names another
    revocation list address than the credentials' C{crlUrl}.

    @param inThread: how to run the issuing, C{inThread(f, *args)} returning
        a Deferred; the reactor's thread pool by default.
    """

    log = Logger()

    def __init__(self, reactor, credentials, every=RENEW_CHECK_EVERY,
                 renewBefore=pki.SERVER_RENEW_BEFORE, inThread=None):
        ClockedService.__init__(self, reactor, every, inThread)
        self.credentials = credentials
        self.renewBefore = renewBefore
        self._busy = False

    def first(self):
        """Check now (fires once any renewal is installed)."""
        return self.check()

    def repeat(self):
        return self.check()

    def reason(self, now):
        """Why the certificate needs renewing now, or None."""
        cert = self.credentials.cert
        left = cert.not_valid_after_utc - now
        if left < self.renewBefore:
            return f"{left.days} days of validity left" if left.total_seconds() > 0 else (
                "it has expired")
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        if lifetime > pki.SERVER_VALIDITY + datetime.timedelta(days=1):
            # Issued by an older market, for years.
            return f"it was issued for {lifetime.days} days"
        named, wanted = pki.crlUrlOf(cert), self.credentials.crlUrl
        if named != wanted:
            if named is None:
                return f"it does not name the revocation list {wanted}"
            if wanted is None:
                return f"it names {named}, which this market no longer serves"
            return f"it names {named}, not {wanted}"
        return None

    def check(self):
        """Renew the certificate if it needs it (one renewal at a time)."""
        if self._busy:
            return defer.succeed(None)
        now = self.now()
        why = self.reason(now)
        if why is None:
            return defer.succeed(None)
        d = self.inThread(self.credentials.issue, now)

        def issued(pems):
            self.credentials.install(*pems)
            cert = self.credentials.cert
            self.log.info(
                "issued the server a new certificate ({why}): serial {serial}, valid until "
                "{until}", why=why, serial=pki.serialHex(cert),
                until=cert.not_valid_after_utc.isoformat(timespec="seconds"))

        def failed(failure):
            self.log.error(
                "could not renew the server certificate ({why}): {error}; it is valid until "
                "{until}; trying again in {every:.0f}s", why=why,
                error=failure.getErrorMessage(), every=self.every,
                until=self.credentials.cert.not_valid_after_utc.isoformat(timespec="seconds"))

        def done(_):
            self._busy = False

        self._busy = True
        d.addCallbacks(issued, failed)
        return d.addBoth(done)

