"""
The seller's image cache: buyers' ISOs by sha256, with a size cap.

An image is fetched from the market in pipelined chunks, written and
hashed on a thread of the cache's own, checked against its sha256, and only
then renamed into place as C{<sha256>.iso}, readable by the seller alone
(QEMU gets each ISO as a read-only file descriptor, so neither the VM user
nor anyone else on the desktop needs to read the cache).  When a new image would take
the cache over its cap, the least recently used images not in use by a
running VM are removed first.
"""

import hashlib
import os
import re

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cpushare.imagefolder import ImageFolder
from cpushare.protocol.commands import IMAGE_CHUNK

WINDOW = 8
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CacheError(Exception):
    """An image could not be cached; the message says why."""


class ImageCache(ImageFolder):
    log = Logger()

    def __init__(self, reactor, folder, capBytes):
        ImageFolder.__init__(self, reactor, folder, "cpushare-image-cache")
        self.capBytes = capBytes
        self.inUse = {}
        self._fetching = {}
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        for name in os.listdir(folder):
            if name.endswith(".part"):
                os.remove(os.path.join(folder, name))

    def acquire(self, sha256):
        self.inUse[sha256] = self.inUse.get(sha256, 0) + 1

    def release(self, sha256):
        n = self.inUse.get(sha256, 0) - 1
        if n > 0:
            self.inUse[sha256] = n
        else:
            self.inUse.pop(sha256, None)

    def ensure(self, sha256, size, fetch):
        """
        The path of image C{sha256}, fetching it with C{fetch(offset, length)}
        (a Deferred of bytes) when it is not cached.  Concurrent requests for
        one image share one download.
        """
        if sha256 in self._fetching:
            d = defer.Deferred()
            self._fetching[sha256].append(d)
            return d
        self._fetching[sha256] = []
        d = defer.ensureDeferred(self._ensure(sha256, size, fetch))

        def done(result):
            for waiter in self._fetching.pop(sha256, []):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            return result

        return d.addBoth(done)

    async def _ensure(self, sha256, size, fetch):
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise CacheError(f"{sha256!r:.80} is not a sha256 (64 lowercase hex digits)")
        path = self.pathFor(sha256)
        if await self.inThread(_touch, path):
            return path
        if size > self.capBytes:
            raise CacheError(
                f"the image is {size} bytes, larger than this seller's cache "
                f"({self.capBytes} bytes)")
        await self.inThread(self._makeRoom, size, frozenset(self.inUse))
        part = path + ".part"
        writer = await self.inThread(_Writer, part)
        try:
            await self._download(writer, size, fetch)
            digest = await self.inThread(writer.finish)
        except BaseException:
            await self.inThread(writer.discard)
            raise
        if digest != sha256:
            await self.inThread(writer.discard)
            raise CacheError(f"the image's sha256 is {digest}, not {sha256}: discarded")
        await self.inThread(os.replace, part, path)
        self.log.info("cached image {sha256} ({size} bytes)", sha256=sha256, size=size)
        return path

    async def _download(self, writer, size, fetch):
        window = defer.DeferredSemaphore(WINDOW)
        failures = []
        # Chunks arrive in any order; they are written in order.
        arrived = {}
        nextOffset = 0
        writes = []

        def got(data, offset, length):
            nonlocal nextOffset
            if len(data) != length:
                failures.append(CacheError(
                    f"the market sent {len(data)} bytes at offset {offset}, not {length}"))
            arrived[offset] = data
            while nextOffset in arrived:
                chunk = arrived.pop(nextOffset)
                writes.append(self.inThread(writer.write, chunk))
                nextOffset += len(chunk)
                if not chunk:
                    break
            window.release()

        def failed(failure):
            failures.append(failure.value)
            window.release()

        offset = 0
        while offset < size and not failures:
            await window.acquire()
            length = min(IMAGE_CHUNK, size - offset)
            d = fetch(offset, length)
            d.addCallbacks(got, failed, callbackArgs=(offset, length))
            offset += length
        for _ in range(WINDOW):
            await window.acquire()
        await defer.gatherResults(writes, consumeErrors=True)
        if failures:
            raise failures[0]

    def _makeRoom(self, size, inUse):
        entries = []
        for name in os.listdir(self.folder):
            if name.endswith(".iso"):
                st = os.stat(os.path.join(self.folder, name))
                entries.append((st.st_mtime, name, st.st_size))
        total = sum(e[2] for e in entries)
        for mtime, name, esize in sorted(entries):
            if total + size <= self.capBytes:
                break
            if name[:-4] in inUse:
                continue
            os.remove(os.path.join(self.folder, name))
            total -= esize
            self.log.info("evicted image {name} from the cache", name=name)
        if total + size > self.capBytes:
            raise CacheError("the cache is full of images in use by running VMs")


def _touch(path):
    """Mark a cached image as just used; False when it is not cached."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


class _Writer:
    def __init__(self, path):
        self.path = path
        self.file = open(path, "wb")
        self.hash = hashlib.sha256()

    def write(self, data):
        self.file.write(data)
        self.hash.update(data)

    def finish(self):
        self.file.close()
        os.chmod(self.path, 0o600)
        return self.hash.hexdigest()

    def discard(self):
        if not self.file.closed:
            self.file.close()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
