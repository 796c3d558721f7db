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
from cpushare.server.site.upload import FORM_SLACK, isMultipart, readForm

# The largest request body that is not an image's upload form.
MAX_FORM = 1024 * 1024

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

    def maxUpload(self):
        """The largest upload form's body: the image quota of an account, and its form."""
        images = getattr(getattr(getattr(self.pages, "site", None), "market", None),
                         "images", None)
        return 0 if images is None else images.quota + FORM_SLACK

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


class WebRequest(server.Request):
    """
    A request whose body is bounded (MAX_FORM; an image's upload form, the
    account quota the image store has, L{Root.maxUpload}), refused with 413
    as soon as it is larger; a multipart form is not parsed into memory
    whole, only its fields before its file (L{readForm}), and
    C{request.form} says where the file lies in C{request.content}.
    """

    form = None
    _tooLarge = False
    _received = 0

    def _limit(self):
        if isMultipart(self.requestHeaders.getRawHeaders(b"content-type", [b""])[0]):
            return getattr(self.channel.site.resource, "maxUpload", lambda: 0)()
        return MAX_FORM

    def gotLength(self, length):
        server.Request.gotLength(self, length)
        if length is not None and length > self._limit():
            self._refuseLarge()

    def handleContentChunk(self, data):
        if self._tooLarge:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuseLarge()
            return
        server.Request.handleContentChunk(self, data)

    def _refuseLarge(self):
        self._tooLarge = True
        limit = self._limit()
        body = page("Too large", f"This request is larger than the {limit} bytes this page "
                    "takes (an image may be as large as your account's image quota).")
        self.channel.transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: text/html; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        self.channel.transport.loseConnection()

    def requestReceived(self, command, path, version):
        if self._tooLarge:
            return
        ctype = self.requestHeaders.getRawHeaders(b"content-type", [b""])[0]
        if command == b"POST" and isMultipart(ctype):
            self._parsePOSTFormSubmission = False
            self._formFields = {}
            self.form = readForm(self.content, ctype, self._formFields)
        return server.Request.requestReceived(self, command, path, version)

    def process(self):
        # The query's arguments are parsed by now: the form's fields join them.
        for name, values in getattr(self, "_formFields", {}).items():
            self.args.setdefault(name, []).extend(values)
        return server.Request.process(self)


class WebSite(server.Site):
    """
    The site: every response carries HSTS and the security headers, and
    no Server header naming the software and its version; request bodies
    are bounded (L{WebRequest}).
    """

    displayTracebacks = False
    noisy = False
    requestFactory = WebRequest

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
