"""
The market's web site: Klein routes rendering Jinja2 templates, served by
the server's web port (L{cpushare.server.web}, which keeps /ca.crl and
/paypal/* and hands every other path to L{Site.resource}).

    /                 the market (L{pages_buyer}: also /images, /orders/new, /orders)
    /login            log in with name and password (GET: the form; POST)
    /login/TOKEN      a link from `cpushare web`: GET names the account, POST logs in once
    /logout           log out (GET: the button; POST)
    /seller           the seller's page (pages_seller)
    /admin            the operator's page (web administrators only; pages_admin)
    /api/NAME         the JSON API (apiroutes; docs/api.md)
    /static/...       the style sheet and scripts: nothing loads from elsewhere

Pages call the same market services as the control commands
(L{cpushare.server.session}); no market rule is written here.  Every
response carries the security headers (L{securityHeaders}); a POST runs
only with the browser's CSRF token (L{cpushare.server.site.auth}); an
unknown page is a 404 page and an exception a page with a message, logged,
never a traceback.

A page is a method decorated with C{@Site.app.route(...)} (and
L{auth.loggedIn} or L{auth.adminOnly}) that returns
C{await self.render(request, "NAME.html", ...)}: a template in
templates/ extending base.html, autoescaped.  A module of pages of its
own decorates functions C{(site, request, ...)} with C{@Site.app.route}
and is imported at the end of this module.
C{await site.account(request)} is the logged-in account (the
L{cpushare.server.db.store.Account} the control commands get), or None.
"""

import json
import os
import re
import urllib.parse

import jinja2
from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from cpushare.server.market.weblogin import Busy
from cpushare.server.site import auth

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, "static")
HSTS_MAX_AGE = 365 * 24 * 3600
STATIC_MAX_AGE = 3600
# The addresses people bookmark, as the menu of every page shows them.
MENU = [
    ("/", "Market"),
    ("/orders/new", "Place an order"),
    ("/vms", "VMs"),
    ("/images", "Images"),
    ("/funds", "Funds"),
    ("/statement", "Statement"),
    ("/seller", "Selling"),
]
# Where a login may send the browser back to: a path of this site.
_LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9/_.~%?=&+-]{0,500}\Z")


def securityHeaders(secure):
    """
    The headers every response carries: nothing but this site's own files
    (no inline script or style, no frames around it, no plugins), no
    Referer sent (a login link's token never leaks), no MIME sniffing,
    nothing cached; on a secure site, HSTS for a year.
    """
    headers = {
        b"content-security-policy": (
            b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
            b"object-src 'none'; base-uri 'none'; form-action 'self'; "
            b"frame-ancestors 'none'"),
        b"x-content-type-options": b"nosniff",
        b"x-frame-options": b"DENY",
        b"referrer-policy": b"no-referrer",
        b"cache-control": b"no-store",
        b"cross-origin-opener-policy": b"same-origin",
    }
    if secure:
        headers[b"strict-transport-security"] = f"max-age={HSTS_MAX_AGE}".encode()
    return headers


def localPath(text):
    """C{text} when it is a page of this site to return to after login, else "/"."""
    if not text or not _LOCAL_PATH.match(text) or text.startswith(("/login", "/logout")):
        return "/"
    return text


# The static files served, by their ending: nothing else is.
STATIC_TYPES = {
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
}


def staticFiles(folder=STATIC):
    """The files of C{folder} (flat, small) as {name: (content type, bytes)}, read once."""
    files = {}
    for name in sorted(os.listdir(folder)):
        kind = STATIC_TYPES.get(os.path.splitext(name)[1])
        path = os.path.join(folder, name)
        if kind is not None and os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = (kind, f.read())
    return files


class Guard(resource.Resource):
    """
    The site's resource: puts the security headers on every response, and
    lets a POST reach its route only with the browser's CSRF token.
    """

    isLeaf = True

    def __init__(self, site):
        resource.Resource.__init__(self)
        self.site = site
        self.pages = site.app.resource()

    def render(self, request):
        request.responseHeaders.removeHeader(b"server")
        for name, value in self.site.headers.items():
            request.setHeader(name, value)
        if request.method in (b"GET", b"HEAD"):
            return self.pages.render(request)
        d = defer.ensureDeferred(auth.csrfValid(self.site, request))

        gone = []
        request.notifyFinish().addErrback(gone.append)

        def checked(valid):
            if valid:
                return self.pages.render(request)
            return self.site.errorPage(request, 403, "Forbidden",
                                       "This form is out of date or did not come from this "
                                       "site: go back, reload the page and send it again.")

        def failed(failure):
            return self.site.crashed(request, failure)

        def write(body):
            if body is server.NOT_DONE_YET or gone:
                return
            request.write(body.encode("utf-8") if isinstance(body, str) else body)
            request.finish()

        d.addCallback(checked)
        d.addErrback(failed)
        d.addCallback(write)
        return server.NOT_DONE_YET


class Site:
    """
    The web site of C{market}.

    @param publicUrl: the site's address as browsers reach it, or a
        callable giving it (it may be known only once the port listens).
    @param secure: whether browsers reach it over HTTPS: the cookies are
        then Secure (and __Host- named) and responses carry HSTS.
    @param trustedProxies: addresses of reverse proxies in front of the
        site, whose X-Forwarded-For names the client.
    """

    app = Klein()
    log = Logger()

    def __init__(self, market, reactor, publicUrl, secure=True, trustedProxies=()):
        self.market = market
        self.reactor = reactor
        self.publicUrl = publicUrl if callable(publicUrl) else (lambda: publicUrl)
        self.secure = secure
        self.trustedProxies = frozenset(trustedProxies)
        self.logins = market.weblogins
        self.limits = auth.LoginLimits(reactor)
        self.cookies = auth.cookieNames(secure)
        self.headers = securityHeaders(secure)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(os.path.join(HERE, "templates")),
            autoescape=True, undefined=jinja2.StrictUndefined)
        self.files = staticFiles()

    def resource(self):
        """The twisted.web resource of the whole site."""
        return Guard(self)

    # -- for pages

    async def account(self, request):
        """The logged-in L{cpushare.server.db.store.Account}, or None (a coroutine)."""
        session = await auth.webSession(self, request)
        return None if session is None else session.account

    def clientAddress(self, request):
        """The browser's address: the proxy's X-Forwarded-For when it is trusted."""
        host = getattr(request.getClientAddress(), "host", "?")
        forwarded = request.getHeader(b"x-forwarded-for")
        if forwarded and host in self.trustedProxies:
            return forwarded.decode("latin-1").split(",")[-1].strip()[:64] or host
        return host

    async def render(self, request, template, status=200, **context):
        """The page C{template} with C{context}, and what every page knows."""
        session = await auth.webSession(self, request)
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.templates.get_template(template).render(
            account=None if session is None else session.account,
            admin=session is not None and session.admin,
            csrf_token=await auth.csrfToken(self, request),
            menu=MENU, **context)

    def toLogin(self, request):
        """
        Send a browser that is not logged in to /login, and back here after
        (an /api/ call is answered 401 instead).
        """
        if _isAPI(request):
            return self.errorPage(request, 401, "Not logged in", "log in first")
        back = request.uri.decode("latin-1")
        return self.redirect(request, "/login?" + urllib.parse.urlencode({"next": back}))

    def redirect(self, request, path):
        request.setResponseCode(303)
        request.setHeader(b"location", path.encode("ascii"))
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return b""

    def errorPage(self, request, status, title, message):
        """
        A page saying what went wrong (the session is not looked up: it may
        be why); for an /api/ call, C{{"error": message}}.
        """
        session = getattr(request, auth._CACHE, None)
        request.setResponseCode(status)
        if _isAPI(request):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": message})
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.templates.get_template("error.html").render(
            title=title, message=message, account=session and session.account,
            admin=bool(session and session.admin), csrf_token=session and session.csrf,
            menu=MENU)

    def crashed(self, request, failure):
        self.log.failure("{method} {path} failed", failure,
                         method=request.method.decode("latin-1"),
                         path=request.path.decode("latin-1"))
        return self.errorPage(
            request, 500, "Something went wrong",
            "The market could not finish this request; the operator can see what "
            "happened in the market's log.  Nothing was changed by half.")

    @app.handle_errors
    def failed(self, request, failure):
        if failure.check(auth.Forbidden):
            return self.errorPage(request, 403, "Forbidden", str(failure.value))
        if failure.check(Busy):
            request.setHeader(b"retry-after", b"5")
            return self.errorPage(request, 503, "Busy", str(failure.value))
        if failure.check(RequestRedirect):
            target = urllib.parse.urlsplit(failure.value.new_url)
            return self.redirect(request, localPath(
                target.path + ("?" + target.query if target.query else "")))
        if failure.check(NotFound):
            return self.errorPage(request, 404, "Not found",
                                  "There is no such page on this market.")
        if failure.check(MethodNotAllowed):
            allowed = ", ".join(failure.value.valid_methods or ())
            request.setHeader(b"allow", allowed.encode("ascii"))
            return self.errorPage(request, 405, "Not allowed",
                                  f"This page does not take a {request.method.decode('latin-1')} "
                                  "request.")
        if failure.check(HTTPException):
            return self.errorPage(request, failure.value.code, failure.value.name,
                                  failure.value.description or failure.value.name)
        return self.crashed(request, failure)

    # -- the pages of the login

    @app.route("/login", methods=["GET"])
    async def loginForm(self, request):
        if await self.account(request) is not None:
            return self.redirect(request, localPath(field(request, "next")))
        return await self.render(request, "login.html", next=localPath(field(request, "next")),
                                 name="", problem=None)

    @app.route("/login", methods=["POST"])
    async def login(self, request):
        name = (field(request, "name") or "").strip()
        password = field(request, "password") or ""
        back = localPath(field(request, "next"))
        address = self.clientAddress(request)
        problem = self.limits.refusal(name, address)
        status = 429
        if problem is None:
            status = 403
            accountId = await self.logins.checkPassword(name, password)
            if accountId is not None:
                self.limits.succeeded(name)
                await auth.logIn(self, request, accountId)
                self.log.info("account {name} logged in to the web site from {address}",
                              name=name, address=address)
                return self.redirect(request, back)
            self.limits.failed(name, address)
            problem = ("wrong name or password (or this account has no web password: "
                       "`cpushare web password` sets one)")
            refused = self.limits.refusal(name, address)
            if refused is not None:
                problem += "; " + refused
                self.log.warn("web logins as {name!r} or from {address} stop for a while: "
                              "{why}", name=name[:64], address=address, why=refused)
        return await self.render(request, "login.html", status=status, next=back,
                                 name=name[:64], problem=problem)

    def spentLink(self, request):
        return self.render(
            request, "login.html", status=403, next="/", name="",
            problem="this login link is used, expired or unknown: `cpushare web` prints a new one")

    @app.route("/login/<token>", methods=["GET"])
    async def loginLinkForm(self, request, token):
        """
        The page of a login link: it names the account and asks to log in.
        Opening a link logs nobody in, so a link somebody else sent cannot
        log a browser into their account unseen (login CSRF), and a link
        fetched by a preview or a scanner is not spent.
        """
        name = await self.logins.loginLinkAccount(token)
        if name is None:
            return await self.spentLink(request)
        current = await self.account(request)
        return await self.render(request, "login_link.html", token=token, linkName=name,
                                 current=current.name if current else None)

    @app.route("/login/<token>", methods=["POST"])
    async def loginLink(self, request, token):
        accountId = await self.logins.useLoginLink(token)
        if accountId is None:
            return await self.spentLink(request)
        await auth.logIn(self, request, accountId)
        self.log.info("account {id} logged in to the web site with a login link from "
                      "{address}", id=accountId, address=self.clientAddress(request))
        return self.redirect(request, "/")

    @app.route("/logout", methods=["GET"])
    async def logoutForm(self, request):
        return await self.render(request, "logout.html")

    @app.route("/logout", methods=["POST"])
    async def logout(self, request):
        await auth.logOut(self, request)
        return self.redirect(request, "/login")

    @app.route("/static/<name>", methods=["GET"])
    def staticFile(self, request, name):
        if name not in self.files:
            raise NotFound()
        kind, body = self.files[name]
        request.setHeader(b"content-type", kind)
        request.setHeader(b"cache-control", f"public, max-age={STATIC_MAX_AGE}".encode())
        return body


def _isAPI(request):
    return request.path.startswith(b"/api/")


def field(request, name):
    """A form or query field as text, or None (absent, or not UTF-8)."""
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None


# The pages of their own modules (they register their routes on Site.app).
from cpushare.server.site import apiroutes, pages_admin, pages_seller  # noqa: E402,F401
from cpushare.server.site import pages_buyer, pages_vms  # noqa: E402,F401
