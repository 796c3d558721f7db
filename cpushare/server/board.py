"""
The board: the sellers online, what they ask and how they stand, ranked
the way matching wants them.

A seller's terms (price per core-hour, fee per GB, country) are kept in
the database per account, so they survive reconnections: the seller
program sends those its owner gave on its command line, `cpushare terms`
changes them while it runs, and a seller that never said gets the market's
default price.  Its votes (for the rating) are read when it comes online
and kept up to date as buyers rate.

Ranking every seller for every VM would be wasteful: the ranked list is
rebuilt when a seller comes or goes or its terms or rating change, and
otherwise at most every RERANK seconds so latency, which changes all the
time, is followed without re-sorting on every heartbeat.
"""

from twisted.logger import Logger

from cpushare.protocol.commands import BadRequest
from cpushare.server import marketsql
from cpushare.money import MAX_PRICE, formatAmount
from cpushare.server.screens import Figures, country as countryCode, preference, rating

RERANK = 5.0
DEFAULT_PRICE = 10_000      # micro-units a core-hour: 0.01


def checkTerms(price=None, net_fee=None, country=None):
    """Terms as given by a seller, checked: BadRequest names a bad one."""
    for what, value, low in (("price", price, 1), ("network fee", net_fee, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not low <= value <= MAX_PRICE):
            raise BadRequest(
                f"the {what} must be {'above 0' if low else '0 or more'} and at most"
                f" {formatAmount(MAX_PRICE)}, not {value!r} micro-units")
    if country is not None:
        country = countryCode(country)
    return {"price": price, "net_fee": net_fee, "country": country}


class Board:
    log = Logger()

    def __init__(self, market, defaultPrice=DEFAULT_PRICE):
        self.market = market
        self.reactor = market.reactor
        self.defaults = {"price": defaultPrice, "net_fee": 0, "country": None}
        self.standing = {}          # account id -> {"terms": {...}, "votes": (good, bad)}
        self._ranked = None
        self._rankedAt = None

    def invalidate(self):
        self._ranked = None

    async def sellerOnline(self, session, price=None, net_fee=None, country=None):
        """A seller offers capacity: load its standing, store the terms it gives."""
        given = checkTerms(price, net_fee, country)
        accountId = session.account["id"]
        db = self.market.store
        terms, votes = await db.run(marketsql.sellerStanding, accountId, self.defaults)
        if (price, net_fee, country) != (None, None, None):
            terms = await db.run(marketsql.setSellerTerms, accountId, self.defaults,
                                 given["price"], given["net_fee"], given["country"])
        self.standing[accountId] = {"terms": terms, "votes": votes}
        self.invalidate()
        return terms

    async def setTerms(self, accountId, price=None, net_fee=None, country=None):
        given = checkTerms(price, net_fee, country)
        terms = await self.market.store.run(
            marketsql.setSellerTerms, accountId, self.defaults,
            given["price"], given["net_fee"], given["country"])
        entry = self.standing.get(accountId)
        if entry is not None:
            entry["terms"] = terms
        self.invalidate()
        return terms

    def voted(self, sellerId, votes):
        """A seller's votes changed: C{votes} as L{marketsql.votes} gives them."""
        entry = self.standing.get(sellerId)
        if entry is not None:
            entry["votes"] = votes
            self.invalidate()

    def figures(self, session):
        entry = self.standing.get(session.account["id"])
        terms = entry["terms"] if entry else self.defaults
        good, bad, raters = entry["votes"] if entry else (0, 0, 0)
        return Figures(
            name=session.account["name"],
            price=terms["price"],
            netFee=terms["net_fee"],
            country=terms["country"],
            rating=rating(good, bad),
            votes=raters,
            latencyMs=session.heartbeat.latencyMs() if session.heartbeat else None,
            bandwidthMbps=getattr(session, "bandwidthMbps", None),
            cpuScore=getattr(session, "cpuScore", None),
        )

    def ranked(self):
        """[(session, figures)] of the sellers online, best first."""
        now = self.reactor.seconds()
        if self._ranked is None or now - self._rankedAt >= RERANK:
            entries = [(s, self.figures(s)) for s in self.market.sellers()
                       if s.account["id"] in self.standing]
            entries.sort(key=lambda e: preference(e[1], e[0].connectedAt or 0.0))
            self._ranked = entries
            self._rankedAt = now
        return self._ranked

    def explain(self, screens):
        """([(session, figures)] that pass, [(session, figures, reason)] that do not)."""
        passing, excluded = [], []
        for session, fig in self.ranked():
            reason = screens.exclusion(fig)
            if reason is None:
                passing.append((session, fig))
            else:
                excluded.append((session, fig, reason))
        return passing, excluded
