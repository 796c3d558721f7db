"""
How a replica group is judged from its replicas' outcomes
(cpushare.server.market.verdicts.judge), with what a cheating seller or
buyer would make of it.
"""

from twisted.trial import unittest

from cpushare.server.market.verdicts import (
    ACCEPTED, EXCUSED, INCONCLUSIVE, MISSING, NO_RESULT, TIEBREAK, UNCHECKED, WAIT, judge)

A, B, C = "a" * 64, "b" * 64, "c" * 64


class JudgeTests(unittest.TestCase):

    def test_all_equal_is_accepted(self):
        j = judge({1: A, 2: A})
        self.assertEqual((j.verdict, j.accepted, j.rejected, j.digest),
                         (ACCEPTED, {1, 2}, frozenset(), A))

    def test_the_majority_of_three_wins_and_the_minority_is_rejected(self):
        j = judge({1: A, 2: B, 3: A})
        self.assertEqual((j.verdict, j.accepted, j.rejected), (ACCEPTED, {1, 3}, {2}))

    def test_two_that_disagree_ask_for_a_third(self):
        self.assertEqual(judge({1: A, 2: B}).verdict, TIEBREAK)
        # A result against a replica that failed is a disagreement too.
        self.assertEqual(judge({1: A, 2: NO_RESULT}).verdict, TIEBREAK)

    def test_three_different_results_are_inconclusive_and_nobody_is_rejected(self):
        j = judge({1: A, 2: B, 3: C})
        self.assertEqual((j.verdict, j.rejected, j.unjudged), (INCONCLUSIVE, frozenset(),
                                                               {1, 2, 3}))

    def test_half_is_not_a_majority(self):
        self.assertEqual(judge({1: A, 2: A, 3: B, 4: B}).verdict, INCONCLUSIVE)

    def test_replicas_that_all_end_without_a_result_agree(self):
        j = judge({1: NO_RESULT, 2: NO_RESULT})
        self.assertEqual((j.verdict, j.digest), (ACCEPTED, None))

    def test_a_failed_replica_is_outvoted(self):
        j = judge({1: A, 2: NO_RESULT, 3: A})
        self.assertEqual((j.verdict, j.rejected), (ACCEPTED, {2}))

    def test_nothing_is_decided_while_a_replica_runs(self):
        self.assertEqual(judge({1: A, 2: MISSING}).verdict, WAIT)
        self.assertEqual(judge({1: A, 2: A, 3: MISSING}).verdict, WAIT)

    def test_when_time_is_up_a_replica_still_running_is_not_judged(self):
        j = judge({1: A, 2: A, 3: MISSING}, final=True)
        self.assertEqual((j.verdict, j.accepted, j.rejected, j.unjudged),
                         (ACCEPTED, {1, 2}, frozenset(), {3}))
        # One result of three is no majority, however long one waits.
        self.assertEqual(judge({1: A, 2: MISSING, 3: MISSING}, final=True).verdict,
                         INCONCLUSIVE)
        # And no tie-break is started once time is up.
        self.assertEqual(judge({1: A, 2: MISSING}, final=True).verdict, INCONCLUSIVE)

    def test_a_replica_the_buyer_stopped_is_never_rejected(self):
        # A buyer that stops a replica cannot have its seller found wrong.
        j = judge({1: A, 2: EXCUSED})
        self.assertEqual((j.verdict, j.rejected), (INCONCLUSIVE, frozenset()))
        j = judge({1: A, 2: A, 3: EXCUSED})
        self.assertEqual((j.verdict, j.rejected, j.unjudged), (ACCEPTED, frozenset(), {3}))

    def test_the_comparator_joins_results_it_finds_the_same(self):
        j = judge({1: A, 2: B}, same={(A, B): True})
        self.assertEqual((j.verdict, j.accepted), (ACCEPTED, {1, 2}))
        j = judge({1: A, 2: B, 3: C}, same={(A, C): True, (A, B): False})
        self.assertEqual((j.verdict, j.accepted, j.rejected), (ACCEPTED, {1, 3}, {2}))
        # Its "different" changes nothing against equal digests.
        self.assertEqual(judge({1: A, 2: A}, same={(A, A): False}).verdict, ACCEPTED)

    def test_a_group_of_one_is_unchecked(self):
        j = judge({1: A})
        self.assertEqual((j.verdict, j.rejected), (UNCHECKED, frozenset()))
