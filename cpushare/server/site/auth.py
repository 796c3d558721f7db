"""
Who is at the browser: the session cookie, the CSRF token every form
carries, the limits on login attempts, and the decorators that guard pages.

A session is a random 32-byte secret in a cookie (Secure on a secure site,
HttpOnly, SameSite=Strict, Path=/), kept by the market only as its
SHA-256 (L{cpushare.server.market.weblogin}).  Every POST is checked
before its route runs (L{csrfValid}): a form's C{csrf} field, or an
C{/api/} call's C{X-CSRF-Token} header, must be the session's token; a
browser without a session (the login form) gets a token of its own in a
second cookie, which its form must repeat.
"""

import collections
import datetime
import functools
import hmac
import secrets

from cpushare.server.access import addressKey
from cpushare.server.market.weblogin import SECRET_BYTES, wellFormed

CSRF_FIELD = "csrf"
CSRF_HEADER = b"x-csrf-token"
FAILURES = 5                # failed logins a name or an address may have ...
WINDOW = 15 * 60.0          # ... in this many seconds; then login is refused
REMEMBERED = 50_000         # names and addresses whose failures are kept, at most
MAX_NAME = 64               # characters of a login name counted as typed


def cookieNames(secure):
    """
    The session cookie's name and the form cookie's: on a secure site with
    the __Host- prefix, which browsers accept only from HTTPS with Path=/ and
    no Domain, so no other host of the domain can set them.
    """
    prefix = "__Host-" if secure else ""
    return (prefix + "cpushare-session").encode(), (prefix + "cpushare-form").encode()


class Forbidden(Exception):
    """The request may not do this; the message is shown on a 403 page."""


class LoginLimits:
    """
    Failed logins in a sliding window of C{window} seconds on C{clock}, by
    account name and by client address (an IPv6 address by its /64): at
    C{failures} of either, logins are refused until the oldest leaves the
    window.  In memory, bounded: the last C{failures} times of at most
    C{remembered} names and addresses (a few hundred bytes each).
    """

    def __init__(self, clock, failures=FAILURES, window=WINDOW, remembered=REMEMBERED):
        self.clock = clock
        self.failures = failures
        self.window = window
        self.remembered = remembered
        self._seen = collections.OrderedDict()      # key -> tuple of failure times

    def _keys(self, name, address):
        return (("name", name[:MAX_NAME].lower()), ("address", addressKey(address)))

    def _times(self, key, now):
        """The failures of C{key} within the window (older ones are forgotten)."""
        times = tuple(t for t in self._seen.get(key, ()) if t > now - self.window)
        if times:
            self._seen[key] = times
        else:
            self._seen.pop(key, None)
        return times

    def refusal(self, name, address):
        """Why a login as C{name} from C{address} is refused now, or None."""
        now = self.clock.seconds()
        for key in self._keys(name, address):
            times = self._times(key, now)
            if len(times) >= self.failures:
                until = times[-self.failures] + self.window
                minutes = max(1, round((until - now) / 60))
                at = datetime.datetime.fromtimestamp(until, datetime.timezone.utc)
                what = "this account" if key[0] == "name" else "your address"
                return (f"too many failed logins for {what}: try again in {minutes} "
                        f"minute{'s' if minutes != 1 else ''} (after {at:%H:%M} UTC), "
                        "or log in with the link `cpushare web` prints")
        return None

    def failed(self, name, address):
        now = self.clock.seconds()
        for key in self._keys(name, address):
            self._seen[key] = (self._times(key, now) + (now,))[-self.failures:]
            self._seen.move_to_end(key)
        while len(self._seen) > self.remembered:
            self._seen.popitem(last=False)

    def succeeded(self, name):
        self._seen.pop(("name", name[:MAX_NAME].lower()), None)

    def size(self):
        """Failure times held (for tests: memory stays bounded)."""
        return sum(len(t) for t in self._seen.values())


# -- the session of a request

_CACHE = "_cpushareWebSession"


def _cookie(request, name):
    value = request.getCookie(name)
    if value is None:
        return None
    try:
        value = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    return value if wellFormed(value) else None


async def webSession(site, request):
    """The request's L{WebSession}, or None; looked up once per request."""
    if not hasattr(request, _CACHE):
        secret = _cookie(request, site.cookies[0])
        found = None if secret is None else await site.logins.session(secret)
        setattr(request, _CACHE, found)
    return getattr(request, _CACHE)


def _setCookie(site, request, name, value, maxAge):
    request.addCookie(name, value.encode("ascii"), path=b"/", secure=site.secure,
                      httpOnly=True, sameSite="strict",
                      max_age=None if maxAge is None else str(int(maxAge)).encode())


async def logIn(site, request, accountId):
    """
    Start a session for the account in this browser (a new secret each
    time); the session the browser had, if any, ends.
    """
    old = _cookie(request, site.cookies[0])
    if old is not None:
        await site.logins.endSession(old)
    secret = await site.logins.startSession(accountId)
    # A cookie of the browser's session: the market ends it after 12 idle hours.
    _setCookie(site, request, site.cookies[0], secret, None)
    if hasattr(request, _CACHE):
        delattr(request, _CACHE)


async def logOut(site, request):
    secret = _cookie(request, site.cookies[0])
    if secret is not None:
        await site.logins.endSession(secret)
    _setCookie(site, request, site.cookies[0], "", 0)
    setattr(request, _CACHE, None)


async def csrfToken(site, request):
    """The token this browser's forms carry: its session's, or its form cookie's."""
    session = await webSession(site, request)
    if session is not None:
        return session.csrf
    token = _cookie(request, site.cookies[1])
    if token is None:
        token = secrets.token_urlsafe(SECRET_BYTES)
        _setCookie(site, request, site.cookies[1], token, None)
        # A second form on the same page carries the same token.
        request.received_cookies[site.cookies[1]] = token.encode("ascii")
    return token


def _given(request):
    """The CSRF token a POST carries: the header for /api/, else the form field."""
    if request.path.startswith(b"/api/"):
        value = request.getHeader(CSRF_HEADER)
        return value.encode("latin-1") if isinstance(value, str) else value
    values = request.args.get(CSRF_FIELD.encode())
    return values[0] if values else None


async def csrfValid(site, request):
    """Whether a POST carries this browser's token (its session's, else its form cookie's)."""
    given = _given(request)
    if not given:
        return False
    session = await webSession(site, request)
    expected = session.csrf if session is not None else _cookie(request, site.cookies[1])
    return expected is not None and hmac.compare_digest(given, expected.encode("ascii"))


# -- guards

def loggedIn(route):
    """A route for logged-in browsers: others are sent to /login (and back after)."""

    @functools.wraps(route)
    async def guarded(site, request, *args, **kw):
        if await site.account(request) is None:
            return site.toLogin(request)
        return await route(site, request, *args, **kw)

    return guarded


def adminOnly(route):
    """A route for the web site's administrators (`cpushare-admin web-admin`): others get 403."""

    @functools.wraps(route)
    async def guarded(site, request, *args, **kw):
        session = await webSession(site, request)
        if session is None:
            return site.toLogin(request)
        if not session.admin:
            raise Forbidden("this page is for the market's operators only")
        return await route(site, request, *args, **kw)

    return guarded
