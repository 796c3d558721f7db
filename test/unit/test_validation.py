"""
What verdicts and canaries say of a seller (docs/seller.md, "Validated
results"): its counts, the automatic bad rating of a minority lease, the
market's own bad vote for a wrong canary answer, and what buyers see and
screen on (`cpushare sellers`, --min-validated).
"""

import pytest
from twisted.internet import defer

from cpushare.client.cli.main import parser
from cpushare.client.cli.market import formatSellers
from cpushare.client.cli.screens import screenArguments
from cpushare.protocol import commands
from cpushare.server.db import marketsql, store
from cpushare.server.market import ratings, validation
from cpushare.server.market.screens import MAX_SCREEN_VALIDATED, Figures, Screens, rating
from cpushare.server.market.validation import Validation

from test.unit.test_orders import OrderCase
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


# -- the --min-validated screen and what `cpushare sellers` shows


def _figures(validated=0, errorRate=None):
    return Figures(name="sam", price=10_000, netFee=0, country="IT", rating=0.5, votes=2,
                   latencyMs=None, bandwidthMbps=None, cpuScore=None,
                   validated=validated, errorRate=errorRate)


def test_the_screen_names_both_figures_and_refuses_absurd_floors():
    screens = Screens.fromArguments(min_validated=25)
    assert screens.exclusion(_figures(24)) == \
        "has 24 validated results, fewer than --min-validated 25"
    assert screens.exclusion(_figures(24)).screen == "--min-validated"
    assert screens.exclusion(_figures(25)) is None
    assert Screens.fromArguments(min_validated=0).exclusion(_figures(0)) is None
    # Kept with a waiting order's screens.
    assert Screens.fromArguments(**screens.toArguments()) == screens
    assert Screens.fromArguments().toArguments() == {}
    for absurd in (-1, MAX_SCREEN_VALIDATED + 1, 10**100, 2.5, True, "7"):
        with pytest.raises(commands.BadRequest, match=r"\(--min-validated\) must be a whole"
                           r" number between 0 and 1000000000"):
            Screens.fromArguments(min_validated=absurd)


def test_the_command_line_sends_the_screen_and_shows_the_counts():
    for argv in (["sellers", "--min-validated", "12"],
                 ["order", "place", "--image", "x.iso", "--min-validated", "12"]):
        assert screenArguments(parser().parse_args(argv)) == {"min_validated": 12}
    with pytest.raises(SystemExit):
        parser().parse_args(["sellers", "--min-validated", "many"])
    seller = {"name": "sam", "price": 10_000, "net_fee": 0, "cores": 2, "free_cores": 2,
              "memory": 1024, "free_memory": 1024, "rating": 0.5, "votes": 2,
              "connected": 0.0}
    new = dict(seller, name="new", validated=0)
    proven = dict(seller, name="proven", validated=397, error_rate=3 / 400)
    out = formatSellers([new, proven, dict(seller, name="shy", excluded="has 0 validated"
                                           " results, fewer than --min-validated 5")], 60.0)
    lines = out.splitlines()
    header = lines[0].split()
    assert header[5:8] == ["RATING", "VALIDATED", "ERRORS"]
    assert lines[1].split()[5:8] == ["0.50/2", "0", "-"]
    assert lines[2].split()[5:8] == ["0.50/2", "397", "0.8%"]
    assert lines[-1] == "  shy has 0 validated results, fewer than --min-validated 5"


class ValidatedSellersTests(OrderCase):
    """The board follows Validations.record; buyers see and screen on the counts."""

    @defer.inlineCallbacks
    def seller(self, name, cores=2, price=None):
        who = yield self.register(name)
        session = yield self.program("seller", who)
        terms = {"price": price} if price is not None else {}
        yield self.call(session, commands.Offer, cores=cores, memory=4096, **terms)
        accountId = yield self.store.run(
            lambda c: c.execute("SELECT id FROM accounts WHERE name = ?", (name,)).fetchone()[0])
        return session, who, accountId

    def sellers(self, **kw):
        return self.call(self.cli, commands.ListSellers, offset=0, explain=True, **kw)

    @defer.inlineCallbacks
    def listed(self, **kw):
        """{name: (validated, error_rate, excluded)} as ListSellers shows them."""
        found = (yield self.sellers(**kw))["sellers"]
        return {s["name"]: (s.get("validated"), s.get("error_rate"), s.get("excluded"))
                for s in found}

    def order(self, vms=1, **kw):
        return self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=vms, cores=1,
                         memory=256, **kw)

    @defer.inlineCallbacks
    def test_the_screen_admits_and_excludes_sellers_as_their_counts_change(self):
        proven, _, provenId = yield self.seller("proven", cores=1, price=30_000)
        fresh, freshWho, freshId = yield self.seller("fresh", cores=1, price=20_000)
        shown = yield self.listed(min_validated=2)
        self.assertEqual(shown, {
            "proven": (0, None, "has 0 validated results, fewer than --min-validated 2"),
            "fresh": (0, None, "has 0 validated results, fewer than --min-validated 2")})

        # An order that asks for 3 validated results waits, and says why.
        placed = yield self.order(min_validated=3)
        self.assertEqual(placed["allocated"], 0)
        self.assertIn("2 by --min-validated", placed["waiting"])

        validations = self.market.validations
        for _ in range(2):
            yield defer.ensureDeferred(validations.record(provenId, True))
        shown = yield self.listed(min_validated=2)
        self.assertEqual(shown["proven"], (2, 0.0, None))
        self.assertEqual(shown["fresh"][2],
                         "has 0 validated results, fewer than --min-validated 2")
        self.assertEqual(len(proven.started.pending), 0, "2 validated results are not 3")

        # The third accepted result: the waiting VM goes to proven at once.
        counts = yield defer.ensureDeferred(validations.record(provenId, True))
        self.assertEqual(counts, Validation(validated=3, consecutive=3))
        self.assertEqual((yield self.within(proven.started.get()))["vm"], placed["vm_ids"][0])
        self.assertEqual(len(fresh.started.pending), 0)

        # A result found wrong raises its error rate; its validated count stays.
        yield defer.ensureDeferred(validations.record(provenId, False, why="in a minority"))
        shown = yield self.listed(min_validated=3)
        self.assertEqual(shown["proven"], (3, 0.25, None))
        # Counts told late, after newer ones, do not turn the board back.
        self.assertFalse(self.market.board.validated(provenId, counts))
        self.assertEqual((yield self.listed(min_validated=3))["proven"], (3, 0.25, None))

        # Counts of a seller offline are kept, and loaded when it comes online.
        yield self.close(fresh)
        for _ in range(4):
            yield defer.ensureDeferred(validations.record(freshId, True))
        self.assertNotIn("fresh", (yield self.listed()))
        again = yield self.program("seller", freshWho)
        yield self.call(again, commands.Offer, cores=1, memory=4096)
        self.assertEqual((yield self.listed(min_validated=4))["fresh"], (4, 0.0, None))

    @defer.inlineCallbacks
    def test_a_wrong_canary_answer_shows_in_the_sellers_rating_at_once(self):
        _, _, samId = yield self.seller("canaried")
        [before] = (yield self.sellers())["sellers"]
        self.assertEqual((before["votes"], before["rating"]), (0, 0.0))
        yield defer.ensureDeferred(
            self.market.validations.record(samId, False, canary=True, why="wrong digest"))
        [after] = (yield self.sellers())["sellers"]
        self.assertEqual((after["votes"], after["validated"], after["error_rate"]), (1, 0, 1.0))
        # Recorded in a transaction of the caller's own, then told.
        told = yield self.store.run(validation.recordAndVote, samId, True)
        self.assertEqual(told, (Validation(validated=1, invalid=1, consecutive=1,
                                           canariesFailed=1), None))
        self.market.validations.recorded(samId, *told)
        [after] = (yield self.sellers())["sellers"]
        self.assertEqual((after["votes"], after["validated"], after["error_rate"]), (1, 1, 0.5))
        self.assertEqual((yield self.listed(min_rating=0.01))["canaried"][2],
                         "is rated 0.00 (1 votes), below --min-rating 0.01")

    @defer.inlineCallbacks
    def test_absurd_floors_are_refused_naming_the_screen_and_nothing_is_placed(self):
        yield self.seller("any")
        bad = [(-1, "(--min-validated) must be a whole number between 0 and 1000000000"),
               (MAX_SCREEN_VALIDATED + 1, "(--min-validated) must be a whole number"),
               (10**30, "min_validated: 1000000000000000000000000000000 is out of range")]
        for absurd, problem in bad:
            for ask in (self.sellers, self.order):
                with self.assertRaises(commands.BadRequest) as e:
                    yield ask(min_validated=absurd)
                self.assertIn(problem, str(e.exception))
        self.assertEqual((yield self.call(self.cli, commands.ListVMs))["vms"], [])
        self.assertEqual((yield self.listed(min_validated=0))["any"], (0, None, None))
