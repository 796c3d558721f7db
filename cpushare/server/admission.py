"""
Who may open a connection to the market: a cap on the connections that
have not said Hello yet (a TLS handshake under way, a client without a
certificate registering, or one that has said nothing), per source
address and in all.  Past a cap, a new connection is closed at once,
before its TLS handshake costs anything; the connections that did say
Hello are never counted, so a flood of strangers cannot push out the
market's clients, only delay newcomers until the flood's connections
reach their Hello deadline.

Once TLS has said whose certificate a connection carries, a second cap
(L{AccountConnections}) bounds the connections one account holds open, so
that one certificate cannot fill the server's rounds with connections of
its own; past it, the new connection is refused and the account's others
are left alone.
"""

from twisted.logger import Logger

UNAUTHENTICATED_PER_ADDRESS = 16
UNAUTHENTICATED_TOTAL = 4096
# A seller's program, a buyer's program and a few commands of the CLI at
# once, with room for connections a network cut left half-open until their
# heartbeat timeout: docs/operator.md, "Connections per account".
CONNECTIONS_PER_ACCOUNT = 8
REFUSAL_LOG_INTERVAL = 60.0


class Tally:
    """The connections counted under each key (a source address, an account)."""

    def __init__(self):
        self._byKey = {}            # key -> number of connections
        self._keys = {}             # session -> its key, while it counts

    def __len__(self):
        return len(self._keys)

    @property
    def keys(self):
        return len(self._byKey)

    def get(self, key):
        return self._byKey.get(key, 0)

    def add(self, session, key):
        self._keys[session] = key
        self._byKey[key] = self._byKey.get(key, 0) + 1

    def remove(self, session):
        """C{session} no longer counts (nothing happens if it did not)."""
        key = self._keys.pop(session, None)
        if key is not None:
            left = self._byKey[key] - 1
            if left:
                self._byKey[key] = left
            else:
                del self._byKey[key]


class RefusalLog:
    """A warning per refusal, at most one line an interval, with the count of the others."""

    log = Logger()

    def __init__(self, what):
        self.what = what
        self._lastLogged = None
        self._unlogged = 0

    def refused(self, reason, now):
        if self._lastLogged is not None and now - self._lastLogged < REFUSAL_LOG_INTERVAL:
            self._unlogged += 1
            return
        self._lastLogged = now
        unlogged, self._unlogged = self._unlogged, 0
        self.log.warn("refusing {what}: {reason}{more}", what=self.what, reason=reason,
                      more=f" ({unlogged} more refused since the last report)"
                      if unlogged else "")


class Admission:
    """
    Counts the connections still before Hello, by source address; its
    C{accounts} counts the authenticated ones, by account.
    """

    def __init__(self, perAddress=UNAUTHENTICATED_PER_ADDRESS, total=UNAUTHENTICATED_TOTAL,
                 perAccount=CONNECTIONS_PER_ACCOUNT):
        self.perAddress = perAddress
        self.total = total
        self.refused = 0
        self._tally = Tally()       # by source address
        self._refusals = RefusalLog("new connections")
        self.accounts = AccountConnections(perAccount)

    @property
    def unauthenticated(self):
        return len(self._tally)

    def admit(self, session, host, now):
        """
        Count C{session}, a new connection from C{host}; returns None, or
        why it may not stay (a cap it would pass).
        """
        if len(self._tally) >= self.total:
            reason = (f"{len(self._tally)} connections have not said hello yet "
                      f"(limit {self.total})")
        elif self._tally.get(host) >= self.perAddress:
            reason = (f"{host} has {self._tally.get(host)} connections that have not "
                      f"said hello yet (limit {self.perAddress})")
        else:
            self._tally.add(session, host)
            return None
        self.refused += 1
        self._refusals.refused(reason, now)
        return reason

    def release(self, session):
        """C{session} said Hello, or is gone: it no longer counts."""
        self._tally.remove(session)


class AccountConnections:
    """
    Counts the connections of each account, from the moment TLS proved
    whose certificate a connection carries until it closes.
    """

    def __init__(self, perAccount=CONNECTIONS_PER_ACCOUNT):
        self.perAccount = perAccount
        self.refused = 0
        self._tally = Tally()       # by account id
        self._refusals = RefusalLog("connections of accounts at their cap")

    @property
    def accounts(self):
        """How many accounts have a connection counted."""
        return self._tally.keys

    def count(self, accountId):
        return self._tally.get(accountId)

    def admit(self, session, account, now):
        """
        Count C{session}, just authenticated as C{account} (a dict with its
        id and name); returns None, or why it may not stay.
        """
        held = self._tally.get(account.id)
        if held >= self.perAccount:
            self.refused += 1
            reason = (f"account {account.name!r} already has {held} connections open "
                      f"(limit {self.perAccount}, the server's --max-connections-per-account)"
                      f"; close one and try again")
            self._refusals.refused(reason, now)
            return reason
        self._tally.add(session, account.id)
        return None

    def release(self, session):
        """C{session} is gone: it no longer counts."""
        self._tally.remove(session)
