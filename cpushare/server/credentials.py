"""
The server's certificate authority and TLS identity, kept in its data folder.

The first start creates them; later starts load them.  A changed
C{--hostname} gets a new server certificate from the same CA, so the
C{ca.pem} users already hold keeps working.

    ca.pem          the CA certificate: what the operator hands to users
    ca-key.pem      the CA's key (0600): signs the server's and clients' certificates
    server.pem      the server's certificate
    server-key.pem  the server's key (0600)
"""

import os

import attr
from cryptography import x509

from cpushare import pki


@attr.s(frozen=True)
class Credentials:
    caKey = attr.ib()
    caCert = attr.ib()
    caPEM = attr.ib()
    keyPEM = attr.ib()
    certPEM = attr.ib()
    hostname = attr.ib()

    def serverTLS(self):
        return pki.ServerTLS(self.caPEM, self.keyPEM, self.certPEM)


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
        if hostname not in _certificateNames(cert) or cert.issuer != caCert.subject:
            certPEM = keyPEM = None
    if certPEM is None:
        key, cert = pki.issueServerCertificate(caKey, caCert, hostname)
        keyPEM, certPEM = pki.keyToPEM(key), pki.certToPEM(cert)
        pki.writePrivate(path("server-key.pem"), keyPEM)
        pki.writePublic(path("server.pem"), certPEM)
        if log:
            log.info("issued the server certificate for {hostname}", hostname=hostname)
    return Credentials(caKey, caCert, caPEM, keyPEM, certPEM, hostname)
