"""
Validation: what verdicts of replicated runs and canaries say of a seller.

A seller's result accepted by its replica group's verdict (or a canary it
answered right) counts as validated and adds one to its consecutive valid
results; a result in a group's minority (or a wrong canary answer) counts
as invalid and sets the consecutive count back to zero.  A minority
result also gets an automatic "bad" rating for its lease, in the lease's
buyer's name (replacing any rating that buyer gave it).  Inconclusive
verdicts change nothing.

The functions take a DB-API cursor and run inside the store's
transaction; L{Validations} is the service the market calls with a
checked result, which keeps the board (what buyers screen on) current.
"""

from dataclasses import dataclass

from cpushare.server.db.store import now
from cpushare.server.market.ratings import votes as sellerVotes


@dataclass(frozen=True)
class Validation:
    """A seller's validation counts."""

    validated: int = 0          # results accepted (replicas and canaries)
    invalid: int = 0            # results in a minority, wrong canary answers
    consecutive: int = 0        # results accepted since the last invalid one
    canariesFailed: int = 0     # wrong canary answers

    @property
    def errorRate(self):
        """The share of its checked results found wrong, or None before any."""
        checked = self.validated + self.invalid
        return None if checked == 0 else self.invalid / checked


def validationOf(cursor, sellerId):
    """The seller's L{Validation}."""
    cursor.execute(
        "SELECT validated, invalid, consecutive, canaries_failed FROM validation"
        " WHERE account_id = ?", (sellerId,))
    row = cursor.fetchone()
    return Validation() if row is None else Validation(*(int(v) for v in row))


def record(cursor, sellerId, valid, leaseId=None, buyerId=None, canary=False, why=None):
    """
    Count one checked result of seller C{sellerId}: C{valid} or not.  An
    invalid result of lease C{leaseId} (bought by C{buyerId}) rates that
    lease bad, with C{why} in the comment.  Returns the seller's new
    L{Validation}.
    """
    cursor.execute(
        "INSERT INTO validation (account_id) VALUES (?) ON CONFLICT (account_id) DO NOTHING",
        (sellerId,))
    if valid:
        cursor.execute(
            "UPDATE validation SET validated = validated + 1, consecutive = consecutive + 1"
            " WHERE account_id = ?", (sellerId,))
    else:
        cursor.execute(
            "UPDATE validation SET invalid = invalid + 1, consecutive = 0,"
            " canaries_failed = canaries_failed + ? WHERE account_id = ?",
            (1 if canary else 0, sellerId))
        if leaseId is not None and buyerId is not None and buyerId != sellerId:
            comment = "automatic: " + (why or "its result was found wrong")
            cursor.execute(
                "INSERT INTO ratings (lease_id, seller_account_id, buyer_account_id, good,"
                " comment, created) VALUES (?, ?, ?, 0, ?, ?)"
                " ON CONFLICT (lease_id) DO UPDATE SET good = 0, comment = excluded.comment,"
                " created = excluded.created",
                (leaseId, sellerId, buyerId, comment[:500], now()))
    return validationOf(cursor, sellerId)


def recordAndVote(cursor, sellerId, valid, leaseId=None, buyerId=None, canary=False, why=None):
    """
    L{record}, and the seller's votes after it (L{ratings.votes}) when the
    result was invalid (an automatic bad rating or a wrong canary answer
    changes them), else None.
    """
    validation = record(cursor, sellerId, valid, leaseId, buyerId, canary, why)
    return validation, None if valid else sellerVotes(cursor, sellerId)


class Validations:
    """
    Counts sellers' checked results (verdicts of replica groups, canaries):
    C{changed(sellerId, validation)} is told a seller's new L{Validation},
    and C{voted(sellerId, votes)}, when given, its new votes after an
    invalid result (the board ranks it again).
    """

    def __init__(self, store, changed, voted=None):
        self.store = store
        self.changed = changed
        self.voted = voted

    async def record(self, sellerId, valid, leaseId=None, buyerId=None, canary=False, why=None):
        """L{record} in the store; returns the seller's new L{Validation}."""
        validation, votes = await self.store.run(
            recordAndVote, sellerId, bool(valid), leaseId, buyerId, canary, why)
        self.recorded(sellerId, validation, votes)
        return validation

    def recorded(self, sellerId, validation, votes=None):
        """
        Tell what L{recordAndVote} returned, when it ran in a transaction of
        the caller's own (with the ledger's moves of a verdict, say).
        """
        self.changed(sellerId, validation)
        if votes is not None and self.voted is not None:
            self.voted(sellerId, votes)
