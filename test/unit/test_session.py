"""
The server and client sessions, joined in memory on a clock
(test/fakemarket.py): registration, authentication, refusals, uploads and
the relay.  The refusals that TLS itself makes are in
test/integration/test_session_tls.py.
"""

import os

from twisted.internet import defer

from cpushare import pki
from cpushare.protocol import commands

from test import fakemarket


class MarketCase(fakemarket.MarketCase):
    """A market on a clock, with client sessions joined to it in memory."""


class MarketTests(MarketCase):
    @defer.inlineCallbacks
    def test_registered_certificate_authenticates_its_account(self):
        key, cert = yield self.register("alice")
        session = yield self.connect("seller", key, cert)
        self.assertEqual(session.info["account"], "alice")
        who = yield session.control.callRemote(commands.WhoAmI)
        self.assertEqual(who["fingerprint"], pki.fingerprint(pki.loadCertificate(cert)))
        yield session.control.callRemote(commands.Offer, cores=2, memory=512)
        page = yield session.control.callRemote(commands.ListSellers, offset=0)
        self.assertEqual([(s["name"], s["cores"], s["memory"]) for s in page["sellers"]],
                         [("alice", 2, 512)])

    @defer.inlineCallbacks
    def test_heartbeats_measure_latency_both_ways(self):
        key, cert = yield self.register("alice")
        session = yield self.connect("seller", key, cert)
        yield session.control.callRemote(commands.Offer, cores=1, memory=64)
        yield self.sleep(0.7)
        self.assertIsNotNone(session.heartbeat.latencyMs())
        page = yield session.control.callRemote(commands.ListSellers, offset=0)
        self.assertGreater(page["sellers"][0]["latency_ms"], 0)

    @defer.inlineCallbacks
    def test_no_client_certificate_can_only_register(self):
        session = yield self.connect(hello=False)
        with self.assertRaises(commands.NotAuthenticated) as e:
            yield session.control.callRemote(commands.Hello, role="seller", software="x")
        self.assertIn("no client certificate", str(e.exception))

    @defer.inlineCallbacks
    def test_registration_refuses_bad_names_and_taken_names(self):
        yield self.register("alice")
        with self.assertRaises(commands.NameTaken):
            yield self.register("alice")
        with self.assertRaises(commands.BadRequest):
            yield self.register("Not Valid")

    @defer.inlineCallbacks
    def test_absurd_offers_are_refused(self):
        key, cert = yield self.register("alice")
        seller = yield self.connect("seller", key, cert)
        for cores, memory in [(0, 1024), (-3, 1024), (10**9, 1024), (2, 1)]:
            with self.assertRaises(commands.BadRequest):
                yield seller.control.callRemote(commands.Offer, cores=cores, memory=memory)
        buyer = yield self.connect("buyer", key, cert)
        with self.assertRaises(commands.BadRequest):
            yield buyer.control.callRemote(commands.Offer, cores=1, memory=1024)

    @defer.inlineCallbacks
    def test_relay_links_channels_of_one_account_only(self):
        key, cert = yield self.register("alice")
        otherKey, otherCert = yield self.register("bob")
        a = yield self.connect("buyer", key, cert)
        b = yield self.connect("seller", key, cert)
        mallory = yield self.connect("buyer", otherKey, otherCert)
        with self.assertRaises(commands.NotPermitted):
            yield mallory.control.callRemote(
                commands.LinkChannel, channel=1, peer_session=b.info["session"], peer_channel=1)
        with self.assertRaises(commands.NoSuchSession):
            yield a.control.callRemote(
                commands.LinkChannel, channel=1, peer_session=999, peer_channel=1)
        with self.assertRaises(commands.BadRequest):
            yield a.control.callRemote(
                commands.LinkChannel, channel=0, peer_session=b.info["session"], peer_channel=1)

        yield a.control.callRemote(
            commands.LinkChannel, channel=3, peer_session=b.info["session"], peer_channel=5)
        got = defer.DeferredQueue()
        b.route(5, got.put)
        seen = []
        mallory.route(3, seen.append)
        mallory.route(5, seen.append)
        frames = [bytes([i]) * (60 + i) for i in range(20)]
        for f in frames:
            a.sendFrame(3, f)
        a.sendFrame(4, b"unlinked channel")
        received = []
        for _ in frames:
            received.append((yield got.get()))
        self.assertEqual(received, frames)
        self.assertEqual(seen, [])
        stats = yield a.control.callRemote(commands.LinkStats)
        [link] = stats["links"]
        self.assertEqual((link["frames_out"], link["bytes_out"]),
                         (20, sum(len(f) for f in frames)))
        self.assertEqual(stats["unrouted"], 1)
        self.assertEqual(b.linked, {5: (a.info["session"], 3)})

        unlinked = defer.Deferred()
        b.channelUnlinked = lambda channel, reason: unlinked.callback((channel, reason))
        yield self.close(a)
        channel, reason = yield unlinked
        self.assertEqual(channel, 5)
        self.assertIn("disconnected", reason)


class ImageCase(MarketCase):
    """A market with an image store (a quota of 3 MiB)."""

    withImages = True

    def makeFile(self, size, seed=b"x"):
        path = os.path.join(self.images.folder, f"upload-{size}-{seed.hex()}.iso")
        with open(path, "wb") as f:
            f.write((seed * (size // len(seed) + 1))[:size])
        return path


class ImageTests(ImageCase):
    """Uploading images to the market's store."""

    @defer.inlineCallbacks
    def test_upload_is_stored_by_sha256_and_not_sent_twice(self):
        from cpushare.client.cli import upload
        from cpushare.imagefolder import hashFile
        key, cert = yield self.register("alice")
        session = yield self.connect("cli", key, cert)
        path = self.makeFile(1000003, b"abc")
        seen = []
        sha256, size, sent = yield defer.ensureDeferred(
            upload.upload(self.reactor, session, path, progress=seen.append))
        self.assertTrue(sent)
        self.assertEqual((sha256, size), hashFile(path))
        self.assertEqual(seen[-1], size)
        with open(self.images.pathFor(sha256), "rb") as f, open(path, "rb") as g:
            self.assertEqual(f.read(), g.read())
        listed = yield session.control.callRemote(commands.ListImages)
        self.assertEqual([(i["sha256"], i["size"], i["name"]) for i in listed["images"]],
                         [(sha256, size, os.path.basename(path))])
        _, _, sent = yield defer.ensureDeferred(upload.upload(self.reactor, session, path))
        self.assertFalse(sent)
        # Another account holding the same image still has to send it.
        otherKey, otherCert = yield self.register("bob")
        other = yield self.connect("cli", otherKey, otherCert)
        _, _, sent = yield defer.ensureDeferred(upload.upload(self.reactor, other, path))
        self.assertTrue(sent)
        self.assertEqual(os.listdir(self.images.incoming), [])

    @defer.inlineCallbacks
    def test_a_wrong_digest_is_refused_and_nothing_is_kept(self):
        key, cert = yield self.register("alice")
        session = yield self.connect("cli", key, cert)
        yield session.control.callRemote(
            commands.ImageUploadStart, sha256="0" * 64, size=5, name="fake.iso")
        yield session.control.callRemote(
            commands.ImageUploadChunk, sha256="0" * 64, offset=0, data=b"hello")
        with self.assertRaises(commands.BadRequest) as e:
            yield session.control.callRemote(commands.ImageUploadFinish, sha256="0" * 64)
        self.assertIn("discarded", str(e.exception))
        listed = yield session.control.callRemote(commands.ListImages)
        self.assertEqual(listed["images"], [])
        self.assertEqual(os.listdir(self.images.incoming), [])
        self.assertFalse(os.path.exists(self.images.pathFor("0" * 64)))

    @defer.inlineCallbacks
    def test_bad_uploads_are_refused_with_the_reason(self):
        key, cert = yield self.register("alice")
        session = yield self.connect("cli", key, cert)
        call = session.control.callRemote
        for kw, words in [
            (dict(sha256="xyz", size=5, name="a"), "not a sha256"),
            (dict(sha256="a" * 64, size=0, name="a"), "between 1 byte"),
            (dict(sha256="a" * 64, size=-5, name="a"), "between 1 byte"),
            (dict(sha256="a" * 64, size=5, name=""), "name"),
        ]:
            with self.assertRaises(commands.BadRequest) as e:
                yield call(commands.ImageUploadStart, **kw)
            self.assertIn(words, str(e.exception))
        with self.assertRaises(commands.QuotaExceeded):
            yield call(commands.ImageUploadStart, sha256="a" * 64, size=4 * 2**20, name="big")
        with self.assertRaises(commands.BadRequest):
            yield call(commands.ImageUploadChunk, sha256="b" * 64, offset=0, data=b"x")
        yield call(commands.ImageUploadStart, sha256="c" * 64, size=10, name="c")
        with self.assertRaises(commands.BadRequest) as e:
            yield call(commands.ImageUploadChunk, sha256="c" * 64, offset=3, data=b"x")
        self.assertIn("offset 0", str(e.exception))
        with self.assertRaises(commands.BadRequest) as e:
            yield call(commands.ImageUploadChunk, sha256="c" * 64, offset=0, data=b"x" * 11)
        self.assertIn("larger than", str(e.exception))
        with self.assertRaises(commands.BadRequest) as e:
            yield call(commands.ImageUploadFinish, sha256="c" * 64)
        self.assertIn("0 of 10 bytes", str(e.exception))


class LostTests(MarketCase):
    @defer.inlineCallbacks
    def test_everyone_waiting_for_the_end_of_a_session_hears_of_it(self):
        key, cert = yield self.register("alice")
        session = yield self.connect("buyer", key, cert)
        heard = []
        first = session.whenLost().addCallback(heard.append)
        second = session.whenLost().addCallback(heard.append)
        session.transport.loseConnection()
        yield defer.gatherResults([first, second])
        self.assertEqual(heard, [session, session])
        late = yield session.whenLost()
        self.assertIs(late, session)
