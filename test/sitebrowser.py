"""
The web site on the in-memory market, and a browser for its route tests.

L{SiteCase} is a L{MarketCase} whose market has a web site
(L{cpushare.server.site.app.Site}) behind the web port's own twisted.web
stack (L{cpushare.server.web.WebSite} and its root, so /ca.crl and
/paypal/* are there too).  L{Browser} sends it HTTP requests as bytes over
an in-memory connection, on the market's clock, keeping cookies as a
browser does; a test awaits its answers like any other Deferred.

    page = await self.browser().get("/vms")
    page.status, page.location, page.headers["content-type"], page.text
"""

import html
import re
import urllib.parse

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import server

from cpushare.server import web
from cpushare.server.db import store as storesql, websql
from cpushare.server.db.store import Account
from cpushare.server.site.app import Site

from test.fakemarket import MarketCase

PUBLIC_URL = "https://market.example:8443"


class Page:
    """An HTTP response: C{status}, C{headers} (lower-case names), C{body}, C{text}."""

    def __init__(self, raw):
        head, _, body = raw.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status.split()[1])
        self.headers = {}
        self.cookies = []
        for line in lines:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "set-cookie":
                self.cookies.append(value)
            self.headers[name] = value
        if self.headers.get("transfer-encoding") == "chunked":
            body = _unchunk(body)
        self.body = body
        self.text = body.decode("utf-8", "replace")

    @property
    def shown(self):
        """The page's text with its HTML entities as a browser shows them."""
        return html.unescape(self.text)

    @property
    def location(self):
        return self.headers.get("location")

    def csrf(self):
        """The CSRF token of the page's first form."""
        found = re.search(r'name="csrf" value="([^"]*)"', self.text)
        return found and found.group(1)

    def __repr__(self):
        return f"<Page {self.status} {self.headers} {self.text[:2000]!r}>"


def _unchunk(body):
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out += rest[:n]
        body = rest[n + 2:]
    return out


class _Connection(StringTransport):
    def __init__(self, host, port):
        StringTransport.__init__(self, peerAddress=IPv4Address("TCP", host, port))
        self.closed = defer.Deferred()

    def loseConnection(self):
        if not self.disconnecting:
            StringTransport.loseConnection(self)
            self.closed.callback(None)


class Browser:
    """A user agent with a cookie jar, from the address C{host}."""

    def __init__(self, webSite, host="198.51.100.7"):
        self.webSite = webSite
        self.host = host
        self.cookies = {}
        self._port = 50000

    async def request(self, method, path, body=b"", headers=None):
        self._port += 1
        connection = _Connection(self.host, self._port)
        channel = self.webSite.buildProtocol(connection.getPeer())
        channel.makeConnection(connection)
        lines = [f"{method} {path} HTTP/1.1", "Host: market.example:8443",
                 "Connection: close", f"Content-Length: {len(body)}"]
        if self.cookies:
            lines.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        channel.dataReceived("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
        await connection.closed
        channel.connectionLost(Failure(ConnectionDone()))
        page = Page(connection.value())
        for cookie in page.cookies:
            pair, *attributes = cookie.split(";")
            name, _, value = pair.partition("=")
            expired = any(a.strip().lower() in ("max-age=0",) for a in attributes)
            if expired or not value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return page

    def get(self, path, headers=None):
        return defer.ensureDeferred(self.request("GET", path, headers=headers))

    def post(self, path, fields, headers=None):
        body = urllib.parse.urlencode(fields).encode("ascii")
        headers = dict(headers or {}, **{"Content-Type": "application/x-www-form-urlencoded"})
        return defer.ensureDeferred(self.request("POST", path, body, headers))


class SiteCase(MarketCase):
    """A market with a web site (C{self.site}) and L{Browser}s for it."""

    secure = True

    def makeMarket(self, **kw):
        MarketCase.makeMarket(self, **kw)
        self.market.weblogins.publicUrl = lambda: PUBLIC_URL
        self.site = Site(self.market, self.reactor, PUBLIC_URL, secure=self.secure)
        # The web port is always HTTPS, and its WebSite says so to every
        # response (HSTS); a site without TLS is served by a plain one.
        factory = web.WebSite if self.secure else server.Site
        self.webSite = factory(web.Root(self.market.money.funds, None, self.site.resource()),
                               reactor=self.reactor)

    def browser(self, host="198.51.100.7"):
        return Browser(self.webSite, host)

    async def account(self, name, password=None, admin=False):
        """A live account (an L{Account}), with a web password and admin flag as given."""
        accountId = await self.store.run(storesql.createAccount, name, "fp-" + name)
        account = Account(accountId, name, "now")
        if password is not None:
            await self.market.weblogins.setPassword(account, password)
        if admin:
            await self.store.run(websql.setWebAdmin, name, True)
        return account

    async def loggedIn(self, name, password="correct horse battery", admin=False, host=None):
        """A browser logged in as a new account C{name}, through the login form."""
        await self.account(name, password, admin)
        browser = self.browser(host or "198.51.100.7")
        form = await browser.get("/login")
        page = await browser.post("/login", {"name": name, "password": password,
                                             "csrf": form.csrf()})
        assert page.status == 303, page
        return browser
