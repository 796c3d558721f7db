"""
Who may open a connection to the market: a cap on the connections that
have not said Hello yet (a TLS handshake under way, a client without a
certificate registering, or one that has said nothing), per source
address and in all.  Past a cap, a new connection is closed at once,
before its TLS handshake costs anything; the connections that did say
Hello are never counted, so a flood of strangers cannot push out the
market's clients, only delay newcomers until the flood's connections
reach their Hello deadline.
"""

from twisted.logger import Logger

UNAUTHENTICATED_PER_ADDRESS = 16
UNAUTHENTICATED_TOTAL = 4096
REFUSAL_LOG_INTERVAL = 60.0


class Admission:
    """Counts the connections still before Hello, by source address."""

    log = Logger()

    def __init__(self, perAddress=UNAUTHENTICATED_PER_ADDRESS, total=UNAUTHENTICATED_TOTAL):
        self.perAddress = perAddress
        self.total = total
        self.refused = 0
        self._byAddress = {}        # host -> number of connections before Hello
        self._hosts = {}            # session -> host, while it counts
        self._lastLogged = None
        self._unlogged = 0

    @property
    def unauthenticated(self):
        return len(self._hosts)

    def admit(self, session, host, now):
        """
        Count C{session}, a new connection from C{host}; returns None, or
        why it may not stay (a cap it would pass).
        """
        if len(self._hosts) >= self.total:
            reason = (f"{len(self._hosts)} connections have not said hello yet "
                      f"(limit {self.total})")
        elif self._byAddress.get(host, 0) >= self.perAddress:
            reason = (f"{host} has {self._byAddress[host]} connections that have not "
                      f"said hello yet (limit {self.perAddress})")
        else:
            self._hosts[session] = host
            self._byAddress[host] = self._byAddress.get(host, 0) + 1
            return None
        self.refused += 1
        self._logRefusal(reason, now)
        return reason

    def _logRefusal(self, reason, now):
        if self._lastLogged is not None and now - self._lastLogged < REFUSAL_LOG_INTERVAL:
            self._unlogged += 1
            return
        self._lastLogged = now
        unlogged, self._unlogged = self._unlogged, 0
        self.log.warn("refusing new connections: {reason}{more}", reason=reason,
                      more=f" ({unlogged} more refused since the last report)"
                      if unlogged else "")

    def release(self, session):
        """C{session} said Hello, or is gone: it no longer counts."""
        host = self._hosts.pop(session, None)
        if host is not None:
            left = self._byAddress[host] - 1
            if left:
                self._byAddress[host] = left
            else:
                del self._byAddress[host]
