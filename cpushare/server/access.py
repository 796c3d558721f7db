"""
Who may come in: limits on registration, and the changes of access the
operator makes with cpushare-admin while the server runs.

Registration is rate limited per source address (an IPv6 address counts
by its /64, which one host usually holds whole) and market-wide, on the
reactor's clock, in memory: a restart forgets the counts.  Every
registration that gets past the limits counts, whether or not it then
succeeds, except those refused because the name or the key is taken; the
memory this takes is bounded by the market-wide limit (at most
PER_MINUTE x 60 timestamps live at once).

cpushare-admin works on the database from another process, so the
server polls the table it writes (access_changes) every CHECK_EVERY
seconds, one cheap indexed query for the rows after the last it saw, and
closes the connections of a suspended or deleted account, or those using
a revoked certificate.
"""

import collections
import ipaddress

from twisted.internet import defer, task
from twisted.logger import Logger

from cpushare.server.db import store

PER_ADDRESS_HOUR = 5        # registrations an hour from one address (or IPv6 /64)
PER_MINUTE = 30             # registrations a minute, market-wide
REKEYS_PER_DAY = 5          # certificates issued to one account in 24 hours
CHECK_EVERY = 1.0           # seconds between looks at access_changes
REMEMBERED = 10_000         # accounts whose latest change is kept for handshakes in flight


class RegistrationRefused(Exception):
    """A registration over a limit; the message names it."""


def addressKey(host):
    """The key an address is counted under: itself, or its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class RegistrationLimits:
    """
    Sliding windows of registrations: C{perAddress} an hour from one
    address and C{perMinute} a minute market-wide (0: no limit).
    """

    def __init__(self, clock, perAddress=PER_ADDRESS_HOUR, perMinute=PER_MINUTE):
        self.clock = clock
        self.perAddress = perAddress
        self.perMinute = perMinute
        self._byAddress = {}                    # key -> deque of times
        self._all = collections.deque()

    def _prune(self, now):
        while self._all and self._all[0] <= now - 60.0:
            self._all.popleft()
        for key in [k for k, times in self._byAddress.items()
                    if not times or times[-1] <= now - 3600.0]:
            del self._byAddress[key]

    def take(self, host):
        """
        Count a registration from C{host}; returns a token for L{give}.

        @raise RegistrationRefused: naming the limit it is over.
        """
        now = self.clock.seconds()
        self._prune(now)
        key = addressKey(host)
        times = self._byAddress.get(key)
        if times is not None:
            while times and times[0] <= now - 3600.0:
                times.popleft()
        if self.perAddress and times is not None and len(times) >= self.perAddress:
            raise RegistrationRefused(
                f"registration refused: at most {self.perAddress} accounts an hour from one "
                "address; try again later")
        if self.perMinute and len(self._all) >= self.perMinute:
            raise RegistrationRefused(
                f"registration refused: the market takes at most {self.perMinute} new "
                "accounts a minute; try again in a minute")
        self._byAddress.setdefault(key, collections.deque()).append(now)
        self._all.append(now)
        return (key, now)

    def give(self, token):
        """Give back a registration that did not count (its name or key was taken)."""
        key, when = token
        for times in (self._byAddress.get(key), self._all):
            if times is not None:
                try:
                    times.remove(when)
                except ValueError:
                    pass

    def size(self):
        """Timestamps held (for tests: memory stays bounded)."""
        return len(self._all) + sum(len(t) for t in self._byAddress.values())


class AccessWatch:
    """
    Follows access_changes and closes the sessions each change concerns.
    L{changedSince} lets a handshake that was authenticated while a change
    was being read check itself again.
    """

    log = Logger()

    def __init__(self, reactor, store, sessions, every=CHECK_EVERY):
        """@param sessions: a callable giving the market's sessions now."""
        self.reactor = reactor
        self.store = store
        self.sessions = sessions
        self.every = every
        self.lastId = 0
        self.changed = collections.OrderedDict()    # account id -> latest change id
        self._loop = None
        self._busy = False
        # Called (without arguments) after each batch of changes is acted on.
        self.listeners = []

    async def start(self):
        self.lastId = await self.store.run(store.lastAccessChange)
        if self.every > 0:
            self._loop = task.LoopingCall(self.check)
            self._loop.clock = self.reactor
            self._loop.start(self.every, now=False)

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check(self):
        """Read and act on the changes after the last seen (one query at a time)."""
        if self._busy:
            return defer.succeed(None)
        self._busy = True
        d = self.store.run(store.accessChanges, self.lastId)
        d.addCallback(self._apply)
        d.addErrback(lambda f: self.log.failure("reading the changes of access", f))

        def done(result):
            self._busy = False
            return result

        return d.addBoth(done)

    def _apply(self, changes):
        for changeId, accountId, fingerprint, what in changes:
            self.lastId = max(self.lastId, changeId)
            self.changed[accountId] = changeId
            self.changed.move_to_end(accountId)
            while len(self.changed) > REMEMBERED:
                self.changed.popitem(last=False)
            for session in list(self.sessions()):
                account = session.account
                if account is None or account.id != accountId:
                    continue
                if fingerprint is not None and session.certificate != fingerprint:
                    continue
                session.accessEnded(what)
        if changes:
            for listener in self.listeners:
                listener()

    def changedSince(self, accountId, changeId):
        """Whether a change of this account was seen after change C{changeId}."""
        return self.changed.get(accountId, 0) > changeId
