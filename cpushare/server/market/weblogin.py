"""
Logging in to the web site: an account's web password, the one-time login
links `cpushare web` asks for, and the browsers' sessions.

The control commands (SetWebPassword, WebLoginLink) and the site's login
pages (L{cpushare.server.site.auth}) call these methods: the rules are
here once.  Passwords are hashed with argon2id on the reactor's thread
pool, a few at a time (L{HASHES_AT_ONCE}); when more wait than
L{HASHES_WAITING}, a request is refused as busy rather than queued, so a
flood of logins costs bounded memory.  Secrets the browser holds (session
ids, login tokens) are stored only as their SHA-256.
"""

import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from cpushare.protocol.commands import BadRequest, NotPermitted
from cpushare.server.db import websql

MIN_PASSWORD = 10           # characters
MAX_PASSWORD = 1024         # characters: longer ones are refused, not hashed
LINK_LIFETIME = 300.0       # seconds a login link works
LINKS_PER_ACCOUNT = 5       # unused login links an account may hold
SESSION_IDLE = 12 * 3600.0  # seconds a session lives unused
SESSIONS_PER_ACCOUNT = 20   # browsers logged in at once per account
TOUCH_AFTER = 60.0          # seconds between writes of a session's last use
HASHES_AT_ONCE = 2          # argon2 computations running at once (64 MiB each)
HASHES_WAITING = 32         # computations that may wait for a turn
SECRET_BYTES = 32           # random bytes of a session id or login token


class Busy(Exception):
    """Too many password checks wait already; the message says to retry."""


def digest(secret):
    """The SHA-256 (hex) under which a browser's secret is stored."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def wellFormed(secret):
    """Whether C{secret} looks like one this module made (43 URL-safe base64 characters)."""
    return (isinstance(secret, str) and len(secret) == 43 and secret.isascii()
            and all(c.isalnum() or c in "-_" for c in secret))


class WebLogins:
    """
    @ivar publicUrl: a callable giving the site's address as browsers reach
        it (C{https://host:port}), or None while the market has no site.
    """

    log = Logger()

    def __init__(self, reactor, store, hasher=None):
        self.reactor = reactor
        self.store = store
        self.hasher = hasher or PasswordHasher()
        self.publicUrl = lambda: None
        self._hashing = defer.DeferredSemaphore(HASHES_AT_ONCE)
        self._decoy = None

    def _argon2(self, f, *args):
        """Run C{f(*args)} (an argon2 computation) on the thread pool, in its turn."""
        if len(self._hashing.waiting) >= HASHES_WAITING:
            raise Busy("the market is busy checking passwords; try again in a few seconds")
        return self._hashing.run(
            deferToThreadPool, self.reactor, self.reactor.getThreadPool(), f, *args)

    async def setPassword(self, account, password):
        """Set C{account}'s web password; its browsers are logged out."""
        if len(password) < MIN_PASSWORD:
            raise BadRequest(
                f"the password is too short: at least {MIN_PASSWORD} characters")
        if len(password) > MAX_PASSWORD:
            raise BadRequest(f"the password is too long: at most {MAX_PASSWORD} characters")
        try:
            hashed = await self._argon2(self.hasher.hash, password)
        except Busy as e:
            raise NotPermitted(str(e))
        await self.store.run(websql.setPassword, account.id, hashed, self.reactor.seconds())
        self.log.info("account {name} set its web password", name=account.name)

    async def loginLink(self, account):
        """A link that logs C{account} in once within L{LINK_LIFETIME} seconds."""
        url = self.publicUrl()
        if url is None:
            raise NotPermitted("this market has no web site (its server runs without --web)")
        token = secrets.token_urlsafe(SECRET_BYTES)
        now = self.reactor.seconds()
        await self.store.run(websql.addLoginToken, account.id, digest(token),
                             now + LINK_LIFETIME, now, LINKS_PER_ACCOUNT)
        return f"{url}/login/{token}"

    async def checkPassword(self, name, password):
        """
        The id of the live account C{name} when C{password} is its web
        password, else None.  A name without a password costs the same
        time as a wrong password.

        @raise Busy: too many checks wait already.
        """
        if not 0 < len(name) <= 64 or not 0 < len(password) <= MAX_PASSWORD:
            return None
        found = await self.store.run(websql.passwordOf, name)
        if found is None:
            await self._argon2(self._checkDecoy, password)
            return None
        accountId, hashed = found
        if not await self._argon2(self._verify, hashed, password):
            return None
        if self.hasher.check_needs_rehash(hashed):
            stronger = await self._argon2(self.hasher.hash, password)
            await self.store.run(websql.replacePasswordHash, accountId, hashed, stronger)
        return accountId

    def _verify(self, hashed, password):
        try:
            return self.hasher.verify(hashed, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def _checkDecoy(self, password):
        if self._decoy is None:
            self._decoy = self.hasher.hash(secrets.token_urlsafe(16))
        self._verify(self._decoy, password)

    async def loginLinkAccount(self, token):
        """The name of the live account a login link is for, or None; the link stays unused."""
        if not wellFormed(token):
            return None
        return await self.store.run(websql.loginTokenAccount, digest(token),
                                    self.reactor.seconds())

    async def useLoginLink(self, token):
        """The id of the live account a login link's token is for, or None; once only."""
        if not wellFormed(token):
            return None
        return await self.store.run(websql.useLoginToken, digest(token),
                                    self.reactor.seconds())

    async def startSession(self, accountId):
        """A new session for the account: returns the secret its cookie holds."""
        secret = secrets.token_urlsafe(SECRET_BYTES)
        await self.store.run(websql.addSession, digest(secret), accountId,
                             secrets.token_urlsafe(SECRET_BYTES), self.reactor.seconds(),
                             SESSION_IDLE, SESSIONS_PER_ACCOUNT)
        return secret

    async def session(self, secret):
        """The L{websql.WebSession} a cookie's secret names, or None (unknown, idle, ended)."""
        if not wellFormed(secret):
            return None
        return await self.store.run(websql.session, digest(secret), self.reactor.seconds(),
                                    SESSION_IDLE, TOUCH_AFTER)

    async def endSession(self, secret):
        if wellFormed(secret):
            await self.store.run(websql.endSession, digest(secret))
