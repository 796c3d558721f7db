"""
The market's image store: buyers' livecd ISOs, kept once each by sha256.

An upload is a sequence of chunks on the control channel (never dropped,
flow-controlled by the request/response of each chunk).  Chunks are
written, and hashed, on the store's own thread, never on the reactor; the
finished file is checked against the sha256 and size announced at the
start, then moved to C{DIR/<sha256>.iso}.  An account's images count
against its quota.  An image the account already holds is not sent again.
Another account's identical image is stored once on disk, but the bytes
are still uploaded: telling a buyer that someone else already has an ISO
would leak what other buyers run.
"""

import hashlib
import os
import re
import tempfile

from twisted.logger import Logger

from cpushare.imagefolder import ImageFolder
from cpushare.protocol.commands import BadRequest, QuotaExceeded
from cpushare.server import store

SHA256 = re.compile(r"[0-9a-f]{64}\Z")
MAX_IMAGE = 16 * 1024**3
MAX_NAME = 200
MAX_PENDING = 32
DEFAULT_QUOTA = 4 * 1024**3


def checkSha256(sha256):
    if not SHA256.match(sha256):
        raise BadRequest(f"{sha256!r} is not a sha256 digest (64 lowercase hex digits)")
    return sha256


class Upload:
    """One image arriving; its file work runs on the image store's pool."""

    def __init__(self, images, account, sha256, size, name):
        self.images = images
        self.account = account
        self.sha256 = sha256
        self.size = size
        self.name = name
        self.received = 0
        self._hash = hashlib.sha256()
        fd, self.path = tempfile.mkstemp(dir=images.incoming, suffix=".part")
        self._file = os.fdopen(fd, "wb")
        self.pending = 0

    def write(self, offset, data):
        """
        Queue a chunk for writing.  Chunks may be pipelined (the store's one
        thread writes them in order) up to MAX_PENDING at a time.
        """
        if self.pending >= MAX_PENDING:
            raise BadRequest(f"more than {MAX_PENDING} chunks of one upload in flight")
        if offset != self.received:
            raise BadRequest(f"expected the chunk at offset {self.received}, not {offset}")
        if self.received + len(data) > self.size:
            raise BadRequest(f"the upload is larger than the {self.size} bytes announced")
        self.received += len(data)
        self.pending += 1
        d = self.images.inThread(self._write, data)

        def done(result):
            self.pending -= 1
            return result

        return d.addBoth(done)

    def _write(self, data):
        self._file.write(data)
        self._hash.update(data)

    def finish(self):
        # The pool's one thread runs this after the chunks queued before it.
        if self.received != self.size:
            raise BadRequest(f"the upload has {self.received} of {self.size} bytes")
        return self.images.inThread(self._finish)

    def _finish(self):
        self._file.close()
        digest = self._hash.hexdigest()
        if digest != self.sha256:
            os.remove(self.path)
            raise BadRequest(
                f"the upload's sha256 is {digest}, not {self.sha256} as announced; "
                "it was discarded"
            )
        final = self.images.pathFor(self.sha256)
        if os.path.exists(final):
            os.remove(self.path)
        else:
            os.chmod(self.path, 0o644)
            os.replace(self.path, final)

    def abort(self):
        return self.images.inThread(self._abort)

    def _abort(self):
        if not self._file.closed:
            self._file.close()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


class ImageStore(ImageFolder):
    log = Logger()

    def __init__(self, reactor, db, folder, quota=DEFAULT_QUOTA):
        ImageFolder.__init__(self, reactor, folder, "cpushare-images")
        self.db = db
        self.incoming = os.path.join(folder, "incoming")
        self.quota = quota
        os.makedirs(self.incoming, exist_ok=True)
        for leftover in os.listdir(self.incoming):
            os.remove(os.path.join(self.incoming, leftover))

    async def begin(self, account, sha256, size, name):
        """An Upload, or None when the account already holds this image."""
        checkSha256(sha256)
        if not 0 < size <= MAX_IMAGE:
            raise BadRequest(f"an image must be between 1 byte and {MAX_IMAGE} bytes, not {size}")
        if not name or len(name) > MAX_NAME or "\n" in name:
            raise BadRequest(f"the image name must be 1 to {MAX_NAME} characters on one line")
        if await self.db.run(store.accountHasImage, account["id"], sha256):
            return None
        used = await self.db.run(store.imageUsage, account["id"])
        if used + size > self.quota:
            raise QuotaExceeded(
                f"this image ({size} bytes) would take account {account['name']!r} "
                f"over its image quota: {used} of {self.quota} bytes used"
            )
        return Upload(self, account, sha256, size, name)

    async def complete(self, upload):
        await upload.finish()
        await self.db.run(store.addAccountImage, upload.account["id"],
                          upload.sha256, upload.size, upload.name)
        self.log.info("stored image {sha256} ({size} bytes) for {name}",
                      sha256=upload.sha256, size=upload.size, name=upload.account["name"])

    def list(self, account):
        return self.db.run(store.accountImages, account["id"])

    def readChunk(self, sha256, offset, length):
        return self.inThread(self._read, self.pathFor(checkSha256(sha256)), offset, length)

    @staticmethod
    def _read(path, offset, length):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)
