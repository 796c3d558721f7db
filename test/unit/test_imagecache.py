"""The seller's image cache, with a fake market to fetch from."""

import hashlib
import os
import shutil
import stat
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest

from cpushare.client.seller.imagecache import CacheError, ImageCache


class FakeMarket:
    def __init__(self, data, corrupt=False):
        self.data = data
        self.corrupt = corrupt
        self.calls = 0

    def fetch(self, offset, length):
        self.calls += 1
        chunk = self.data[offset:offset + length]
        if self.corrupt and offset == 0:
            chunk = b"X" + chunk[1:]
        # Answer out of order sometimes, as pipelined calls may.
        d = defer.Deferred()
        reactor.callLater(0.001 * (self.calls % 3), d.callback, chunk)
        return d


def image(size, seed):
    data = (seed * (size // len(seed) + 1))[:size]
    return hashlib.sha256(data).hexdigest(), data


class ImageCacheTests(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="cpushare-cache-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.cache = ImageCache(reactor, self.folder, 1_000_000)
        self.cache.start()
        self.addCleanup(self.cache.stop)

    @defer.inlineCallbacks
    def test_an_image_is_fetched_verified_and_then_reused(self):
        sha, data = image(300_001, b"iso")
        market = FakeMarket(data)
        path = yield self.cache.ensure(sha, len(data), market.fetch)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.folder).st_mode), 0o700)
        calls = market.calls
        again = yield self.cache.ensure(sha, len(data), market.fetch)
        self.assertEqual((again, market.calls), (path, calls))

    @defer.inlineCallbacks
    def test_a_corrupt_download_is_discarded(self):
        sha, data = image(100_000, b"iso")
        with self.assertRaises(CacheError) as e:
            yield self.cache.ensure(sha, len(data), FakeMarket(data, corrupt=True).fetch)
        self.assertIn("discarded", str(e.exception))
        self.assertEqual(os.listdir(self.folder), [])

    @defer.inlineCallbacks
    def test_least_recently_used_images_make_room_but_not_those_in_use(self):
        images = [image(400_000, bytes([i]) * 7) for i in range(3)]
        a, b, c = images
        yield self.cache.ensure(a[0], len(a[1]), FakeMarket(a[1]).fetch)
        yield self.cache.ensure(b[0], len(b[1]), FakeMarket(b[1]).fetch)
        self.cache.acquire(a[0])
        os.utime(self.cache.pathFor(a[0]), (1, 1))  # a is oldest but in use
        yield self.cache.ensure(c[0], len(c[1]), FakeMarket(c[1]).fetch)
        self.assertEqual(sorted(os.listdir(self.folder)),
                         sorted([a[0] + ".iso", c[0] + ".iso"]))
        self.cache.acquire(c[0])
        d, ddata = image(400_000, b"d")
        with self.assertRaises(CacheError) as e:
            yield self.cache.ensure(d, len(ddata), FakeMarket(ddata).fetch)
        self.assertIn("in use", str(e.exception))

    @defer.inlineCallbacks
    def test_an_image_larger_than_the_cache_is_refused(self):
        sha, data = image(1_000_001, b"big")
        with self.assertRaises(CacheError) as e:
            yield self.cache.ensure(sha, len(data), FakeMarket(data).fetch)
        self.assertIn("larger than this seller's cache", str(e.exception))

    @defer.inlineCallbacks
    def test_a_name_that_is_not_a_sha256_never_becomes_a_path(self):
        # A file outside the cache that a traversal would reach.
        outside = os.path.join(os.path.dirname(self.folder), "outside.iso")
        self.addCleanup(lambda: os.path.exists(outside) and os.remove(outside))
        with open(outside, "wb") as f:
            f.write(b"not an image")
        for name in ("../outside", "../" + os.path.basename(self.folder) + "/x", "AB" * 32, ""):
            market = FakeMarket(b"data")
            with self.assertRaises(CacheError) as e:
                yield self.cache.ensure(name, 4, market.fetch)
            self.assertIn("not a sha256", str(e.exception))
            self.assertEqual(market.calls, 0)
