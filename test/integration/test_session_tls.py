"""
The refusals TLS itself makes, on a real server in this process over
loopback: a client certificate from another CA, and a server certificate
the client does not trust.
"""

from twisted.internet import defer

from cpushare import pki
from cpushare.client.session import ConnectError

from test.tlsmarket import TLSMarketCase


class TLSRefusalTests(TLSMarketCase):
    @defer.inlineCallbacks
    def test_a_certificate_from_another_ca_is_refused(self):
        otherKey, otherCA = pki.createAuthority("someone else")
        key = pki.generateKey()
        cert = pki.signClientRequest(otherKey, otherCA, pki.makeRequest(key, "mallory"), "mallory")
        with self.assertRaises(ConnectError) as e:
            yield self.connect("seller", key, cert)
        self.assertIn("refused this client's certificate", str(e.exception))
        self.assertEqual(self.market.sessions, {})

    @defer.inlineCallbacks
    def test_the_client_refuses_a_server_signed_by_another_ca(self):
        _, otherCA = pki.createAuthority("someone else")
        with self.assertRaises(ConnectError) as e:
            yield self.connect(hello=False, ca=pki.certToPEM(otherCA))
        self.assertIn("not trusted", str(e.exception))
