"""
Ratings: buyers rate the sellers of their leases good or bad, and a
seller's votes feed its rating (L{cpushare.server.market.screens.rating}).

The rules (docs/buyer.md, "Rate the sellers"): a buyer rates a lease of
its own, once, and only one it was charged for; a lease of an account's
own VM on its own seller is never rated; anyone else's lease is refused
as if it did not exist.  Each buyer account counts once in a seller's
votes, its leases' ratings averaged, weighted by what it paid that seller
up to L{RATING_FULL_VOTE}: many votes from one account, or from fresh
accounts that paid next to nothing, weigh next to nothing.  The market
votes too: each canary (a known-answer job, L{validation}) a seller
answered wrongly is a full-weight bad vote.
"""

from dataclasses import dataclass

from twisted.logger import Logger

from cpushare.protocol.commands import BadRequest, NotPermitted
from cpushare.server.db import leases as leasesql
from cpushare.server.db import marketsql
from cpushare.server.market.screens import rating

# A buyer account's vote counts in full once it has paid the seller this
# much (micro-units, 1.00) over all their leases; below, in proportion.
RATING_FULL_VOTE = 1_000_000
MAX_COMMENT = 500
# Ratings of a seller's leases shown a page.
RATINGS_PAGE = 100


def votes(cursor, accountId):
    """
    A seller's votes as (good, bad, raters): each buyer account that rated
    it counts once, weighted by what it paid (see the module), and each
    known-answer job (canary) it answered wrongly is a full bad vote of the
    market's; C{raters} is how many buyer accounts rated it, plus one for
    the market when it found a wrong canary answer.
    """
    rated = marketsql.ratingsOf(cursor, accountId)
    failed = marketsql.canariesFailed(cursor, accountId)
    good = bad = 0.0
    if rated:
        paid = leasesql.paidTo(cursor, accountId)
        for buyer, goodCount, count in rated:
            weight = min(1.0, paid.get(buyer, 0) / RATING_FULL_VOTE)
            share = goodCount / count
            good += weight * share
            bad += weight * (1.0 - share)
    # The market's own vote: each wrong canary answer a full bad vote.
    return good, bad + failed, len(rated) + (1 if failed else 0)


def checkComment(comment):
    if comment is not None and len(comment) > MAX_COMMENT:
        raise BadRequest(f"a comment is at most {MAX_COMMENT} characters")


def rateLease(cursor, accountId, leaseId, good, comment):
    """
    Account C{accountId} rates the seller of its lease C{leaseId}, in one
    store transaction, as the module's rules allow; returns the seller's
    account id, name and votes (L{votes}) after this one.
    """
    checkComment(comment)
    lease = leasesql.parties(cursor, leaseId)
    if lease is None or lease[0] != accountId:
        raise BadRequest(f"you have no lease {leaseId}")
    _, sellerId, charged = lease
    if sellerId == accountId:
        raise NotPermitted(f"lease {leaseId} ran on your own seller: you cannot rate yourself")
    if charged <= 0:
        raise NotPermitted(
            f"lease {leaseId} was not billed anything yet: only a lease you paid for can be "
            "rated (try again after its first bill)")
    done = marketsql.leaseRating(cursor, leaseId)
    if done is not None:
        raise NotPermitted(
            f"lease {leaseId} was already rated {'good' if done[0] else 'bad'} on {done[1]}")
    marketsql.addRating(cursor, leaseId, sellerId, accountId, good, comment)
    return sellerId, marketsql.accountName(cursor, sellerId), votes(cursor, sellerId)


@dataclass(frozen=True)
class Rated:
    """A seller as a rating left it: its name, rating and how many buyers rated it."""

    seller: str
    rating: float
    votes: int


class Ratings:
    """
    Takes buyers' ratings; C{voted(sellerId, votes)} is told a seller's
    new votes (the board ranks it again).
    """

    log = Logger()

    def __init__(self, store, voted):
        self.store = store
        self.voted = voted

    async def rate(self, account, leaseId, good, comment=None):
        """C{account} rates the seller of its lease C{leaseId}; returns a L{Rated}."""
        checkComment(comment)
        sellerId, name, sellerVotes = await self.store.run(
            rateLease, account.id, leaseId, good, comment)
        self.voted(sellerId, sellerVotes)
        goodVotes, bad, raters = sellerVotes
        return Rated(seller=name, rating=rating(goodVotes, bad), votes=raters)

    async def received(self, account, before=None, limit=RATINGS_PAGE):
        """
        C{account}'s standing as a seller: a L{Rated} (its rating now, as
        the board computes it) and a page of the ratings its leases were
        given, newest first, older than lease C{before} when given, with
        whether older ones remain.
        """
        goodVotes, bad, raters = await self.store.run(votes, account.id)
        history = await self.store.run(marketsql.ratingsReceived, account.id, before,
                                       limit + 1)
        rated = Rated(seller=account.name, rating=rating(goodVotes, bad), votes=raters)
        return rated, history[:limit], len(history) > limit
