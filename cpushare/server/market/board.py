"""
The board: the sellers online, what they ask and how they stand, ranked
the way matching wants them.

A seller's terms (price per core-hour, fee per GB, country) are kept in
the database per account, so they survive reconnections: the seller
program sends those its owner gave on its command line, `cpushare terms`
changes them while it runs, and a seller that never said gets the market's
default price.  Its votes (for the rating) and its validation (results
accepted and found wrong by verdicts and canaries) are read when it comes
online and kept up to date as buyers rate and results are checked.

Ranking every seller for every VM would be wasteful: the ranked list is
rebuilt when a seller comes or goes or its terms or rating change, and
otherwise at most every RERANK seconds so latency, which changes all the
time, is followed without re-sorting on every heartbeat.  Sellers are
ranked by what a VM-hour costs the buyer (L{cpushare.server.market.screens}),
which depends on the VM's cores and the order's expected traffic: one
ranking is kept per such pair in use, at most RANKINGS of them.

The operator sets a ceiling on sellers' fees a GB (C{maxNetFee}, the
server's --max-net-fee): terms above it are refused, naming it, and a
seller whose stored fee is above it (the ceiling was lowered) is not
matched until it lowers its fee.
"""

from twisted.logger import Logger

from cpushare.protocol.commands import BadRequest
from cpushare.server.db import marketsql
from cpushare.money import MAX_PRICE, formatAmount
from cpushare.server.market.ratings import votes as sellerVotes
from cpushare.server.market.screens import (
    DEFAULT_TRAFFIC, Exclusion, Figures, country as countryCode, preference, rating)
from cpushare.server.market.validation import Validation, validationOf

RERANK = 5.0
DEFAULT_PRICE = 10_000      # micro-units a core-hour: 0.01
# The market-wide ceiling on sellers' network fees, micro-units a GB: 1.00.
MAX_NET_FEE = 1_000_000
# Rankings kept at once, one per (cores, expected traffic) in use.
RANKINGS = 64
OWN_ACCOUNT = "own account"


def checkTerms(price=None, net_fee=None, country=None, maxNetFee=MAX_NET_FEE,
               trusted_price=None):
    """Terms as given by a seller, checked: BadRequest names a bad one."""
    for what, value, low in (("price", price, 1), ("network fee", net_fee, 0),
                             ("trusted price", trusted_price, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not low <= value <= MAX_PRICE):
            raise BadRequest(
                f"the {what} must be {'above 0' if low else '0 or more'} and at most"
                f" {formatAmount(MAX_PRICE)}, not {value!r} micro-units")
    if net_fee is not None and net_fee > maxNetFee:
        raise BadRequest(
            f"the network fee {formatAmount(net_fee)} a GB is above this market's ceiling"
            f" of {formatAmount(maxNetFee)} a GB (the server's --max-net-fee)")
    if country is not None:
        country = countryCode(country)
    return {"price": price, "net_fee": net_fee, "country": country,
            "trusted_price": trusted_price}


def sellerStanding(cursor, accountId, defaults):
    """What the market needs of a seller that comes online: (terms, votes, validation)."""
    return (marketsql.sellerTerms(cursor, accountId) or dict(defaults),
            sellerVotes(cursor, accountId), validationOf(cursor, accountId))


class Board:
    log = Logger()

    def __init__(self, reactor, store, sellers, defaultPrice=DEFAULT_PRICE,
                 maxNetFee=MAX_NET_FEE):
        """
        @param sellers: called with no argument, returns the sellers' sessions
            online now that have offered capacity (L{Market.sellers}).
        """
        self.reactor = reactor
        self.store = store
        self.sellers = sellers
        self.defaults = {"price": defaultPrice, "net_fee": 0, "country": None,
                         "trusted_price": None}
        self.maxNetFee = maxNetFee
        # account id -> {"terms": {...}, "votes": (good, bad, raters), "validation": Validation}
        self.standing = {}
        self._ranked = {}           # (cores, traffic) -> [(session, figures)], best first
        self._rankedAt = None

    def invalidate(self):
        self._ranked = {}

    async def sellerOnline(self, session, price=None, net_fee=None, country=None,
                           trusted_price=None):
        """A seller offers capacity: load its standing, store the terms it gives."""
        given = checkTerms(price, net_fee, country, self.maxNetFee, trusted_price)
        accountId = session.account.id
        db = self.store
        terms, votes, validation = await db.run(sellerStanding, accountId, self.defaults)
        if (price, net_fee, country, trusted_price) != (None, None, None, None):
            terms = await db.run(marketsql.setSellerTerms, accountId, self.defaults,
                                 given["price"], given["net_fee"], given["country"],
                                 given["trusted_price"])
        self.standing[accountId] = {"terms": terms, "votes": votes, "validation": validation}
        self.invalidate()
        return terms

    async def setTerms(self, accountId, price=None, net_fee=None, country=None,
                       trusted_price=None):
        given = checkTerms(price, net_fee, country, self.maxNetFee, trusted_price)
        terms = await self.store.run(
            marketsql.setSellerTerms, accountId, self.defaults,
            given["price"], given["net_fee"], given["country"], given["trusted_price"])
        entry = self.standing.get(accountId)
        if entry is not None:
            entry["terms"] = terms
        self.invalidate()
        return terms

    async def termsOf(self, accountId):
        """The terms a seller of C{accountId} has in force (the defaults when it set none)."""
        return await self.store.run(marketsql.sellerTerms, accountId) or dict(self.defaults)

    def voted(self, sellerId, votes):
        """A seller's votes changed: C{votes} as L{ratings.votes} gives them."""
        entry = self.standing.get(sellerId)
        if entry is not None:
            entry["votes"] = votes
            self.invalidate()

    def validated(self, sellerId, validation):
        """
        A seller's L{Validation} changed (a verdict or a canary checked a
        result); returns whether it is online with more validated results
        than before (a --min-validated screen may pass it now).  Each check
        adds one result, so counts of fewer results than the board has are
        from a check whose transaction finished earlier but was told later
        (the store runs several at once): they are ignored.
        """
        entry = self.standing.get(sellerId)
        if entry is None:
            return False
        known = entry["validation"]
        if validation.validated + validation.invalid < known.validated + known.invalid:
            return False
        more = validation.validated > known.validated
        entry["validation"] = validation
        self.invalidate()
        return more

    def figures(self, session, trusted=False):
        """
        What the market knows of the seller of C{session}; C{trusted}: as a
        trusted order sees it, at its trusted price.
        """
        entry = self.standing.get(session.account.id)
        terms = entry["terms"] if entry else self.defaults
        good, bad, raters = entry["votes"] if entry else (0, 0, 0)
        validation = entry["validation"] if entry else Validation()
        trustedPrice = terms.get("trusted_price") or terms["price"]
        trust = getattr(session, "trust", None)
        return Figures(
            name=session.account.name,
            price=trustedPrice if trusted else terms["price"],
            netFee=terms["net_fee"],
            country=terms["country"],
            rating=rating(good, bad),
            votes=raters,
            latencyMs=session.heartbeat.latencyMs() if session.heartbeat else None,
            bandwidthMbps=getattr(session, "bandwidthMbps", None),
            cpuScore=getattr(session, "cpuScore", None),
            cpu=getattr(session, "cpu", None),
            validated=validation.validated,
            errorRate=validation.errorRate,
            trustedPrice=trustedPrice,
            **({"untrusted": session.tpmRefused} if trust is None
               and getattr(session, "tpmRefused", None) else {} if trust is None else
               {"untrusted": trust.untrusted, "attested": trust.attested}),
        )

    def ranked(self, cores=1, traffic=DEFAULT_TRAFFIC, trusted=False):
        """
        [(session, figures)] of the sellers online, cheapest a VM-hour of
        C{cores} cores and C{traffic} GB first; C{trusted}: at their
        trusted prices.
        """
        now = self.reactor.seconds()
        if self._rankedAt is None or now - self._rankedAt >= RERANK:
            self._ranked = {}
        key = (cores, traffic, trusted)
        entries = self._ranked.get(key)
        if entries is None:
            if len(self._ranked) >= RANKINGS:
                self._ranked = {}
            entries = [(s, self.figures(s, trusted)) for s in self.sellers()
                       if s.account.id in self.standing]
            entries.sort(key=lambda e: preference(e[1], e[0].connectedAt or 0.0,
                                                  cores, traffic))
            if not self._ranked:
                self._rankedAt = now
            self._ranked[key] = entries
        return entries

    def exclusion(self, session, fig, screens, accountId=None):
        """Why the seller of C{session} cannot take a VM of C{accountId}'s (or None)."""
        if accountId is not None and session.account.id == accountId:
            return Exclusion(OWN_ACCOUNT, "is your own account: an account is never matched"
                             " with itself")
        if fig.netFee > self.maxNetFee:
            return Exclusion("ceiling", f"charges {formatAmount(fig.netFee)} a GB, above the"
                             f" market's ceiling of {formatAmount(self.maxNetFee)}")
        return screens.exclusion(fig)

    def explain(self, screens, accountId=None, cores=1):
        """
        ([(session, figures)] that pass, [(session, figures, reason)] that do
        not), for a VM of C{cores} cores of the account C{accountId}: its own
        sellers never pass.
        """
        passing, excluded = [], []
        for session, fig in self.ranked(cores, screens.traffic, screens.trusted):
            reason = self.exclusion(session, fig, screens, accountId)
            if reason is None:
                passing.append((session, fig))
            else:
                excluded.append((session, fig, reason))
        return passing, excluded
