"""
What verdicts and canaries say of a seller (docs/seller.md, "Validated
results"): its counts, the automatic bad rating of a minority lease, the
market's own bad vote for a wrong canary answer, and what buyers see and
screen on (`cpushare sellers`, --min-validated).
"""

import pytest

from cpushare.protocol import commands
from cpushare.server.db import marketsql, store
from cpushare.server.market import ratings, validation
from cpushare.server.market.screens import rating
from cpushare.server.market.validation import Validation

from test.unit.test_ratings import _account, _lease, _rate


def _record(conn, seller, valid, **kw):
    return store.transact(conn, lambda cursor: validation.record(cursor, seller, valid, **kw))


def _validation(conn, seller):
    return store.transact(conn, validation.validationOf, seller)


def _votes(conn, seller):
    return store.transact(conn, ratings.votes, seller)


def test_a_seller_never_checked_has_no_counts_and_no_error_rate(conn):
    sam = _account(conn, "sam")
    assert _validation(conn, sam) == Validation(0, 0, 0, 0)
    assert _validation(conn, sam).errorRate is None


def test_valid_results_count_and_an_invalid_one_resets_the_consecutive_count(conn):
    sam = _account(conn, "sam")
    for n in range(1, 4):
        assert _record(conn, sam, True) == Validation(validated=n, consecutive=n)
    assert _validation(conn, sam).errorRate == 0.0
    assert _record(conn, sam, False) == Validation(validated=3, invalid=1, consecutive=0)
    after = _record(conn, sam, True)
    assert after == Validation(validated=4, invalid=1, consecutive=1)
    assert after.errorRate == pytest.approx(1 / 5)
    # Another seller's counts are its own.
    other = _account(conn, "other")
    assert _validation(conn, other) == Validation()
    assert _validation(conn, sam) == after


def test_a_minority_result_replaces_the_buyers_good_rating_of_that_lease_with_a_bad_one(conn):
    """
    The cheat: a seller whose VM returned garbage was rated good by a
    buyer who had not looked yet; the verdict overrules that rating.
    """
    sam, alice = _account(conn, "sam"), _account(conn, "alice")
    lease = _lease(conn, alice, sam, 1_000_000)
    untouched = _lease(conn, alice, sam, 1_000_000)
    _rate(conn, alice, lease, True)
    _rate(conn, alice, untouched, True)
    assert _votes(conn, sam) == (1.0, 0.0, 1)
    _record(conn, sam, False, leaseId=lease, buyerId=alice, why="its result was in a minority")
    good, when = store.transact(conn, marketsql.leaseRating, lease)
    assert not good
    assert store.transact(conn, marketsql.leaseRating, untouched)[0]
    # Alice's one vote now averages one good and one bad lease.
    assert _votes(conn, sam) == (0.5, 0.5, 1)

    def comment(cursor):
        cursor.execute("SELECT comment FROM ratings WHERE lease_id = ?", (lease,))
        return cursor.fetchone()[0]
    assert store.transact(conn, comment) == "automatic: its result was in a minority"
    # The buyer cannot turn it back: the lease is rated.
    with pytest.raises(commands.NotPermitted, match="already rated bad"):
        _rate(conn, alice, lease, True)


def test_an_unrated_minority_lease_is_rated_bad_and_a_huge_reason_is_cut(conn):
    sam, alice = _account(conn, "sam"), _account(conn, "alice")
    lease = _lease(conn, alice, sam, 1_000_000)
    _record(conn, sam, False, leaseId=lease, buyerId=alice, why="x" * 100_000)

    def comment(cursor):
        cursor.execute("SELECT good, comment FROM ratings WHERE lease_id = ?", (lease,))
        return cursor.fetchall()
    [(good, text)] = store.transact(conn, comment)
    assert not good and len(text) <= ratings.MAX_COMMENT
    assert _votes(conn, sam) == (0.0, 1.0, 1)


def test_a_sellers_own_lease_is_never_rated_but_still_counted(conn):
    sam = _account(conn, "sam")
    own = _lease(conn, sam, sam, 1_000_000)
    assert _record(conn, sam, False, leaseId=own, buyerId=sam) == Validation(invalid=1)
    assert store.transact(conn, marketsql.leaseRating, own) is None
    assert _votes(conn, sam) == (0.0, 0.0, 0)


def test_canaries_count_apart_and_a_wrong_answer_is_the_markets_bad_vote(conn):
    sam = _account(conn, "sam")
    assert _record(conn, sam, True, canary=True) == Validation(validated=1, consecutive=1)
    wrong = _record(conn, sam, False, canary=True, why="wrong canary digest")
    assert wrong == Validation(validated=1, invalid=1, consecutive=0, canariesFailed=1)
    assert wrong.errorRate == 0.5
    # No lease, no buyer: no rating row, but the market's own bad vote.
    assert store.transact(conn, marketsql.ratingsOf, sam) == []
    assert _votes(conn, sam) == (0.0, 1.0, 1)
    # A wrong replica result is not a canary.
    assert _record(conn, sam, False).canariesFailed == 1
    _record(conn, sam, False, canary=True)
    assert _votes(conn, sam) == (0.0, 2.0, 1)


def test_a_well_rated_seller_drops_after_a_failed_canary(conn):
    """Five buyers who paid a full vote each rated sam good; one wrong canary answer."""
    sam = _account(conn, "sam")
    for i in range(5):
        buyer = _account(conn, f"buyer{i}")
        _rate(conn, buyer, _lease(conn, buyer, sam, 1_000_000), True)
    before = rating(*_votes(conn, sam)[:2])
    assert before == pytest.approx(rating(5, 0))
    good, bad, raters = store.transact(
        conn, lambda c: validation.recordAndVote(c, sam, False, canary=True))[1]
    assert (good, bad, raters) == (5.0, 1.0, 6)
    assert rating(good, bad) < before - 0.1
    assert store.transact(conn, validation.recordAndVote, sam, True)[1] is None
