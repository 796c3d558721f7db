"""
The market's HTTPS endpoint for buyers' browsers: the web site
(L{cpushare.server.site}, every path but these), and where PayPal sends a
buyer back after approving or cancelling a payment.

    /ca.crl           the market CA's certificate revocation list (DER)
    /paypal/return    ?n=NONCE&paymentId=PAY-..&token=EC-..&PayerID=..
    /paypal/cancel    ?n=NONCE&token=EC-..

The PayPal pages are small and plain, and say what happened to the money.  The
work is L{cpushare.server.money.funds.Funds}'s; this module only reads the
query and renders the outcome.  TLS uses the market's server certificate
unless the operator gives another (a certificate for a public name that
browsers trust on their own).
"""

import html
import os

from cryptography import x509
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource, server
from zope.interface import implementer

from cpushare import pki
from cpushare.listening import ListeningService
from cpushare.server.site.app import HSTS_MAX_AGE, securityHeaders  # noqa: F401 (tests)
from cpushare.server.site.app import field as _arg

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} - CPUShare</title>
<link rel="stylesheet" href="/static/site.css">
</head>
<body>
<main>
<h1>{title}</h1>
<p id="message">{message}</p>
<p class="note">CPUShare market. You may close this page; <code>cpushare balance</code>
shows your funds.</p>
</main>
</body>
</html>
"""


def page(title, message):
    return PAGE.format(title=html.escape(title, quote=False),
                       message=html.escape(message, quote=False)).encode("utf-8")


class OutcomePage(resource.Resource):
    """A page whose text comes from C{self.outcome(request)}, a coroutine returning an Outcome."""

    isLeaf = True
    log = Logger()

    def __init__(self, funds):
        resource.Resource.__init__(self)
        self.funds = funds

    def render_GET(self, request):
        # The work goes on when the browser leaves: the page is then not sent.
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.ensureDeferred(self.outcome(request))

        def done(outcome):
            request.setResponseCode(outcome.status)
            self._write(request, page(outcome.title, outcome.message), gone)

        def failed(failure):
            self.log.failure("rendering {path}", failure, path=request.path.decode("latin-1"))
            request.setResponseCode(500)
            self._write(request, page(
                "Something went wrong",
                "The market could not finish this request.  Nothing was added to any "
                "funds; the operator can see what happened in the market's log."), gone)

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET

    def _write(self, request, body, gone):
        if gone:
            return
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body)
        request.finish()


class PayPalReturn(OutcomePage):
    async def outcome(self, request):
        return await self.funds.paymentReturned(
            _arg(request, "paymentId"), _arg(request, "PayerID"), _arg(request, "n"))


class PayPalCancel(OutcomePage):
    async def outcome(self, request):
        return await self.funds.paymentCancelled(_arg(request, "n"))


class Home(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page("CPUShare market",
                    "This is a CPUShare market's web endpoint: PayPal brings buyers back "
                    "here after they approve a payment.")


class NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page("Not found", "There is no such page on this market.")


class Branch(resource.Resource):
    """A folder of pages: anything else in it, and itself, is not found."""

    def getChild(self, path, request):
        return NotFound()

    def render(self, request):
        return NotFound().render(request)


class Root(Branch):
    """
    /ca.crl and /paypal/*; any other path goes to C{pages} (the site's
    resource), or without one, / is a page naming the market.
    """

    def __init__(self, funds, revocations=None, pages=None):
        Branch.__init__(self)
        self.home = Home()
        self.pages = pages
        self.crl = None
        if revocations is not None:
            from cpushare.server.revocation import RevocationListPage
            self.crl = RevocationListPage(revocations)
        paypal = Branch()
        paypal.putChild(b"return", PayPalReturn(funds))
        paypal.putChild(b"cancel", PayPalCancel(funds))
        self.putChild(b"paypal", paypal)

    def getChild(self, path, request):
        if path == b"ca.crl" and not request.postpath and self.crl is not None:
            return self.crl
        if self.pages is not None:
            # The site routes the whole path itself.
            request.postpath.insert(0, request.prepath.pop())
            return self.pages
        if path == b"" and not request.postpath:
            return self.home
        return NotFound()


# The web port is always HTTPS: every response carries HSTS.
SECURITY_HEADERS = securityHeaders(secure=True)


class WebSite(server.Site):
    """
    The site: every response carries HSTS and the security headers, and
    no Server header naming the software and its version.
    """

    displayTracebacks = False
    noisy = False

    def getResourceFor(self, request):
        request.responseHeaders.removeHeader(b"server")
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return server.Site.getResourceFor(self, request)


def site(funds, revocations=None, pages=None):
    return WebSite(Root(funds, revocations, pages))


# TLS 1.2 suites: forward secret (ECDHE) and AEAD (AES-GCM, ChaCha20-Poly1305)
# only, for ECDSA and RSA certificates.  TLS 1.3's suites are all AEAD.
TLS12_CIPHERS = ":".join(
    f"ECDHE-{sig}-{cipher}" for cipher in ("AES128-GCM-SHA256", "AES256-GCM-SHA384",
                                           "CHACHA20-POLY1305")
    for sig in ("ECDSA", "RSA"))


@implementer(IOpenSSLServerConnectionCreator)
class WebTLS:
    """
    Server TLS for browsers with the certificate in C{certPEM}, which may be
    followed by its chain (a "fullchain" file): TLS 1.3, and TLS 1.2 with
    TLS12_CIPHERS only; no session tickets (nor a session cache: a
    connection resumes nothing).
    """

    def __init__(self, keyPEM, certPEM):
        self.useCertificate(keyPEM, certPEM)

    def useCertificate(self, keyPEM, certPEM):
        """Serve this key and certificate to the connections that begin from now on."""
        leaf, *chain = x509.load_pem_x509_certificates(certPEM)
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE |
                        SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION)
        ctx.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.use_privatekey(pki.loadKey(keyPEM))
        ctx.use_certificate(leaf)
        for cert in chain:
            ctx.add_extra_chain_cert(cert)
        ctx.check_privatekey()
        self._context = ctx

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self._context, None)


def loadWebTLS(credentials, certPath=None, keyPath=None):
    """
    The operator's certificate and key files, or the market's own server
    certificate, renewed with it.
    """
    if certPath is None:
        return credentials.follow(WebTLS(credentials.keyPEM, credentials.certPEM))
    with open(certPath, "rb") as f:
        certPEM = f.read()
    with open(keyPath, "rb") as f:
        keyPEM = f.read()
    return WebTLS(keyPEM, certPEM)


class WebService(ListeningService):
    """
    The HTTPS endpoint as a listening service.  Once it listens, a market
    without C{--public-url} gets C{https://HOSTNAME:PORT} as its public URL.
    """

    def __init__(self, reactor, endpoint, tlsOptions, funds, hostname, dataDir, before=None,
                 revocations=None, pages=None):
        """@param pages: the web site's resource (L{cpushare.server.site.app.Site.resource})."""
        self.funds = funds
        self.hostname = hostname
        factory = TLSMemoryBIOFactory(tlsOptions, False, site(funds, revocations, pages))
        ListeningService.__init__(
            self, reactor, endpoint, factory, "CPUShare web endpoint",
            os.path.join(dataDir, "web.address"), before=before)
        self._waiting = []

    def whenListening(self):
        """Fires once the endpoint listens (never, if it cannot: the server stops)."""
        d = defer.Deferred()
        if self.port is not None:
            d.callback(None)
        else:
            self._waiting.append(d)
        return d

    def _listening(self, port):
        port = ListeningService._listening(self, port)
        if self.funds.publicUrl is None:
            host = self.hostname
            if ":" in host:
                host = f"[{host}]"
            self.funds.publicUrl = f"https://{host}:{port.getHost().port}"
        self.log.info("PayPal sends buyers back to {url}/paypal/return",
                      url=self.funds.publicUrl)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        return port
