"""The store's group commit on SQLite: calls queued together share one transaction."""

import os
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest

from cpushare.server.db import store


def insert(cursor, n):
    cursor.execute("INSERT INTO accounts (name, created) VALUES (?, 'now') RETURNING id",
                   (f"a{n}",))
    return cursor.fetchone()[0]


def insertThenFail(cursor, n):
    insert(cursor, n)
    raise ValueError(f"call {n} failed after writing")


def names(cursor):
    cursor.execute("SELECT name FROM accounts ORDER BY id")
    return [r[0] for r in cursor.fetchall()]


class GroupCommitTests(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        folder = tempfile.mkdtemp(prefix="cpushare-gc-")
        self.db = store.Store(reactor, os.path.join(folder, "market.sqlite"))
        self.db.startService()
        self.addCleanup(self.db.stopService)
        yield self.db.open()
        self.assertTrue(self.db.groupCommit)

    @defer.inlineCallbacks
    def test_a_failing_call_is_rolled_back_alone_and_the_others_kept(self):
        calls = [self.db.run(insertThenFail if n == 3 else insert, n) for n in range(6)]
        results = yield defer.DeferredList(calls, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, True, True, False, True, True])
        self.assertEqual(str(results[3][1].value), "call 3 failed after writing")
        ids = [r for ok, r in results if ok]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual((yield self.db.run(names)), ["a0", "a1", "a2", "a4", "a5"])

    @defer.inlineCallbacks
    def test_calls_made_together_share_commits(self):
        # 300 calls made at once take far fewer transactions than 300 (the
        # first may run alone; the rest are batched, at most 256 a batch).
        self.assertEqual((yield self.db.run(names)), [])
        before = self.db.batches
        yield defer.gatherResults([self.db.run(insert, n) for n in range(300)])
        self.assertLessEqual(self.db.batches - before, 3)
        self.assertEqual(len((yield self.db.run(names))), 300)
