"""
What a hostile buyer can do to the image store: uploads in progress count
against the quota, and an upload that is not finished leaves no file
behind (dropped, refused, stalled, or left over from a server that died).
"""

import os
import shutil
import tempfile

from twisted.internet import defer, task
from twisted.trial import unittest

from cpushare.protocol import commands
from cpushare.server.images import ImageStore

from test.fakemarket import InlineImageStore
from .test_session import MarketCase

MiB = 1024 * 1024


class QuotaCase(MarketCase):
    """A market whose image store has a 3 MiB quota and a fake clock for stalls."""

    @defer.inlineCallbacks
    def setUp(self):
        yield MarketCase.setUp(self)
        self.clock = task.Clock()
        folder = tempfile.mkdtemp(prefix="cpushare-img-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.images = InlineImageStore(self.reactor, self.store, folder, quota=3 * MiB,
                                 maxUploads=3, idleTimeout=60, clock=self.clock)
        self.images.start()
        self.addCleanup(self.images.stop)
        self.market.images = self.images

    def start(self, session, seed, size):
        return session.control.callRemote(
            commands.ImageUploadStart, sha256=seed * 64, size=size, name=f"{seed}.iso")

    def partials(self):
        # Flush the image thread first: file work queued before now is done.
        return self.images.inThread(os.listdir, self.images.incoming)

    def ended(self, session):
        """Fires once the server has seen C{session}'s connection end."""
        d = defer.Deferred()
        original = self.market.sessionEnded

        def sessionEnded(s, reason):
            original(s, reason)
            if s.sessionId == session.info["session"] and not d.called:
                d.callback(None)

        self.market.sessionEnded = sessionEnded
        return d


class InProgressTests(QuotaCase):
    @defer.inlineCallbacks
    def test_concurrent_uploads_cannot_pass_the_quota_together(self):
        key, cert = yield self.register("alice")
        first = yield self.connect("cli", key, cert)
        second = yield self.connect("cli", key, cert)
        yield self.start(first, "a", 2 * MiB)
        with self.assertRaises(commands.QuotaExceeded) as e:
            yield self.start(second, "b", 2 * MiB)
        message = str(e.exception)
        self.assertIn("quota", message)
        self.assertIn(f"{3 * MiB}", message)
        self.assertIn(f"{2 * MiB} bytes in uploads in progress", message)
        # The same on one connection.
        with self.assertRaises(commands.QuotaExceeded):
            yield self.start(first, "c", 2 * MiB)
        # Once the first upload is gone, its room is free again.
        gone = self.ended(first)
        first.transport.abortConnection()
        yield gone
        started = yield self.start(second, "b", 2 * MiB)
        self.assertTrue(started["needed"])

    @defer.inlineCallbacks
    def test_a_stored_image_and_one_in_progress_add_up(self):
        from cpushare.client.cli import upload
        key, cert = yield self.register("alice")
        session = yield self.connect("cli", key, cert)
        path = os.path.join(self.images.folder, "one.iso")
        with open(path, "wb") as f:
            f.write(b"1" * (MiB + 5))
        yield defer.ensureDeferred(upload.upload(self.reactor, session, path))
        yield self.start(session, "a", MiB)
        with self.assertRaises(commands.QuotaExceeded) as e:
            yield self.start(session, "b", MiB)
        self.assertIn(f"{MiB + 5} bytes stored and {MiB} bytes in uploads in progress",
                      str(e.exception))

    @defer.inlineCallbacks
    def test_pipelined_starts_of_one_image_open_one_upload(self):
        key, cert = yield self.register("alice")
        session = yield self.connect("cli", key, cert)
        results = yield defer.DeferredList(
            [self.start(session, "a", 10) for _ in range(3)], consumeErrors=True)
        self.assertEqual([ok for ok, _ in results].count(True), 1)
        for ok, result in results:
            if not ok:
                result.trap(commands.BadRequest)
                self.assertIn("already being uploaded", result.getErrorMessage())
        self.assertEqual(len((yield self.partials())), 1)
        # The one upload that was opened is whole: it can be finished.
        yield session.control.callRemote(
            commands.ImageUploadChunk, sha256="a" * 64, offset=0, data=b"0123456789")
        with self.assertRaises(commands.BadRequest) as e:
            yield session.control.callRemote(commands.ImageUploadFinish, sha256="a" * 64)
        self.assertIn("sha256", str(e.exception))
        self.assertEqual((yield self.partials()), [])
        self.assertEqual(self.images.uploading, {})

    @defer.inlineCallbacks
    def test_uploads_in_progress_are_limited_in_number(self):
        key, cert = yield self.register("alice")
        session = yield self.connect("cli", key, cert)
        for seed in "abc":
            yield self.start(session, seed, 10)
        with self.assertRaises(commands.QuotaExceeded) as e:
            yield self.start(session, "d", 10)
        self.assertIn("3 uploads in progress", str(e.exception))
        self.assertEqual(len((yield self.partials())), 3)


class PartialFileTests(QuotaCase):
    @defer.inlineCallbacks
    def test_a_dropped_connection_leaves_no_partial_file(self):
        key, cert = yield self.register("alice")
        session = yield self.connect("cli", key, cert)
        yield self.start(session, "a", 100)
        yield session.control.callRemote(
            commands.ImageUploadChunk, sha256="a" * 64, offset=0, data=b"x" * 50)
        self.assertEqual(len((yield self.partials())), 1)
        gone = self.ended(session)
        session.transport.abortConnection()
        yield gone
        self.assertEqual((yield self.partials()), [])

    @defer.inlineCallbacks
    def test_finishing_an_incomplete_upload_discards_it(self):
        key, cert = yield self.register("alice")
        session = yield self.connect("cli", key, cert)
        yield self.start(session, "a", 3 * MiB)
        yield session.control.callRemote(
            commands.ImageUploadChunk, sha256="a" * 64, offset=0, data=b"x" * 5)
        with self.assertRaises(commands.BadRequest) as e:
            yield session.control.callRemote(commands.ImageUploadFinish, sha256="a" * 64)
        self.assertIn(f"5 of {3 * MiB} bytes", str(e.exception))
        self.assertEqual((yield self.partials()), [])
        # Its room in the quota is free again.
        yield self.start(session, "b", 3 * MiB)

    @defer.inlineCallbacks
    def test_a_stalled_upload_is_discarded(self):
        key, cert = yield self.register("alice")
        session = yield self.connect("cli", key, cert)
        yield self.start(session, "a", 3 * MiB)
        call = session.control.callRemote
        yield call(commands.ImageUploadChunk, sha256="a" * 64, offset=0, data=b"x" * 5)
        self.clock.advance(59)
        yield call(commands.ImageUploadChunk, sha256="a" * 64, offset=5, data=b"x" * 5)
        self.clock.advance(59)
        self.assertEqual(len((yield self.partials())), 1)
        self.clock.advance(1)
        self.assertEqual((yield self.partials()), [])
        with self.assertRaises(commands.BadRequest) as e:
            yield call(commands.ImageUploadChunk, sha256="a" * 64, offset=10, data=b"x")
        self.assertIn("no data for 60 seconds", str(e.exception))
        # The room is free and the same image can be started again.
        started = yield self.start(session, "a", 3 * MiB)
        self.assertTrue(started["needed"])

    def test_partial_files_left_by_a_dead_server_are_removed_at_start(self):
        folder = tempfile.mkdtemp(prefix="cpushare-img-")
        self.addCleanup(shutil.rmtree, folder, True)
        os.makedirs(os.path.join(folder, "incoming", "odd-folder"))
        for name in ("tmp1.part", "tmp2.part"):
            with open(os.path.join(folder, "incoming", name), "wb") as f:
                f.write(b"half an image")
        ImageStore(self.reactor, self.store, folder)
        self.assertEqual(os.listdir(os.path.join(folder, "incoming")), [])
