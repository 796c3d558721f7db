"""
Our TLS code hands pyOpenSSL cryptography objects, never its deprecated
X509/PKey wrappers, so building a client or server TLS context warns nothing.
"""

import warnings

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from cpushare import pki
from cpushare.server.web import WebTLS


def _credentials():
    caKey, caCert = pki.createAuthority("test CA")
    key, cert = pki.issueServerCertificate(caKey, caCert, "market.example")
    return pki.certToPEM(caCert), pki.keyToPEM(key), pki.certToPEM(cert), key


def _deprecations(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
    return [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


def test_clientTLSWarnsNothing():
    caPEM, keyPEM, certPEM, _ = _credentials()
    options = pki.clientTLS("market.example", caPEM, keyPEM, certPEM)
    # The context is built for the first connection.
    factory = TLSMemoryBIOFactory(options, True, Factory.forProtocol(Protocol))
    connect = lambda: factory.buildProtocol(None).makeConnection(StringTransport())
    assert _deprecations(connect) == []


def test_serverTLSWarnsNothing():
    caPEM, keyPEM, certPEM, _ = _credentials()
    assert _deprecations(lambda: pki.ServerTLS(caPEM, keyPEM, certPEM)) == []
    assert _deprecations(lambda: WebTLS(keyPEM, certPEM)) == []
