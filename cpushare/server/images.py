"""
The market's image store: buyers' livecd ISOs, kept once each by sha256.

An upload is a sequence of chunks on the control channel (never dropped,
flow-controlled by the request/response of each chunk).  Chunks are
written, and hashed, on the store's own thread, never on the reactor; the
finished file is checked against the sha256 and size announced at the
start, then moved to C{DIR/<sha256>.iso}.  An account's images, and its
uploads in progress (by the size each announced), count against its
quota; an upload that ends any other way (the connection drops, the
finish is refused, no data comes for a while) is discarded with its file,
and files left by a server that stopped mid-upload are removed at start.
An image the account already holds is not sent again.
Another account's identical image is stored once on disk, but the bytes
are still uploaded: telling a buyer that someone else already has an ISO
would leak what other buyers run.
"""

import hashlib
import os
import re
import shutil
import tempfile

from twisted.internet import defer
from twisted.logger import Logger

from cpushare.imagefolder import ImageFolder
from cpushare.protocol import paging
from cpushare.protocol.commands import IMAGES_PAGE, BadRequest, ListImages, QuotaExceeded
from cpushare.server.db import store

SHA256 = re.compile(r"[0-9a-f]{64}\Z")
MAX_IMAGE = 16 * 1024**3
MAX_NAME = 200
MAX_PENDING = 32
DEFAULT_QUOTA = 4 * 1024**3
# Uploads one account may have in progress at once (each holds a file open).
DEFAULT_MAX_UPLOADS = 4
# Seconds an upload may go without a chunk before it is discarded.
DEFAULT_UPLOAD_IDLE = 300.0


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
        self.ended = None   # why it was discarded, once it was
        self._idle = images.clock.callLater(images.idleTimeout, self._stalled)

    def write(self, offset, data):
        """
        Queue a chunk for writing.  Chunks may be pipelined (the store's one
        thread writes them in order) up to MAX_PENDING at a time.
        """
        if self.ended is not None:
            raise BadRequest(self.ended)
        if self.pending >= MAX_PENDING:
            raise BadRequest(f"more than {MAX_PENDING} chunks of one upload in flight")
        if offset != self.received:
            raise BadRequest(f"expected the chunk at offset {self.received}, not {offset}")
        if self.received + len(data) > self.size:
            raise BadRequest(f"the upload is larger than the {self.size} bytes announced")
        self.received += len(data)
        self.pending += 1
        self._idle.reset(self.images.idleTimeout)
        d = self.images.inThread(self._write, data)

        def done(result):
            self.pending -= 1
            return result

        return d.addBoth(done)

    def _write(self, data):
        self._file.write(data)
        self._hash.update(data)

    def finish(self):
        """
        Check and store the file; on any failure it is discarded (the
        caller releases the upload's room in the quota).
        """
        if self.ended is not None:
            return defer.fail(BadRequest(self.ended))
        self._stopTimer()
        if self.received != self.size:
            self.abort(f"the upload has {self.received} of {self.size} bytes; "
                       "it was discarded")
            return defer.fail(BadRequest(self.ended))
        # The pool's one thread runs this after the chunks queued before it.
        d = self.images.inThread(self._finish)

        def failed(failure):
            self.ended = "the upload failed; it was discarded"
            return failure

        return d.addErrback(failed)

    def _finish(self):
        try:
            self._file.close()
            digest = self._hash.hexdigest()
            self._store(digest)
        except BaseException:
            self._abort()
            raise

    def _store(self, digest):
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

    def _stopTimer(self):
        if self._idle.active():
            self._idle.cancel()

    def _stalled(self):
        self.images.log.info(
            "discarding {name}'s upload of image {sha256}: no data for {seconds:.0f}s",
            name=self.account.name, sha256=self.sha256, seconds=self.images.idleTimeout)
        self.abort(f"the upload of image {self.sha256} had no data for "
                   f"{self.images.idleTimeout:.0f} seconds; it was discarded")

    def abort(self, why="the upload was abandoned; it was discarded"):
        """Discard the upload: its file goes, its room in the quota is free."""
        if self.ended is None:
            self.ended = why
        self._stopTimer()
        self.images.release(self)
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

    def __init__(self, reactor, db, folder, quota=DEFAULT_QUOTA,
                 maxUploads=DEFAULT_MAX_UPLOADS, idleTimeout=DEFAULT_UPLOAD_IDLE, clock=None):
        ImageFolder.__init__(self, reactor, folder, "cpushare-images")
        self.db = db
        self.clock = clock or reactor
        self.incoming = os.path.join(folder, "incoming")
        self.quota = quota
        self.maxUploads = maxUploads
        self.idleTimeout = idleTimeout
        self.uploading = {}   # account id -> its Uploads in progress
        # Checking the quota and recording a finished image take turns, so
        # that an upload is always counted once: in progress or stored.
        self._quotaTurn = defer.DeferredLock()
        # Before the server serves anyone: whatever is in incoming/ is
        # what a server that stopped mid-upload left behind.
        os.makedirs(self.incoming, exist_ok=True)
        leftovers = os.listdir(self.incoming)
        for leftover in leftovers:
            path = os.path.join(self.incoming, leftover)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        if leftovers:
            self.log.info("removed {n} unfinished uploads from {folder}",
                          n=len(leftovers), folder=self.incoming)

    async def begin(self, account, sha256, size, name):
        """An Upload, or None when the account already holds this image."""
        checkSha256(sha256)
        if not 0 < size <= MAX_IMAGE:
            raise BadRequest(f"an image must be between 1 byte and {MAX_IMAGE} bytes, not {size}")
        if not name or len(name) > MAX_NAME or "\n" in name:
            raise BadRequest(f"the image name must be 1 to {MAX_NAME} characters on one line")
        await self._quotaTurn.acquire()
        try:
            if await self.db.run(store.accountHasImage, account.id, sha256):
                return None
            used = await self.db.run(store.imageUsage, account.id)
            uploading = self.uploading.get(account.id, ())
            if len(uploading) >= self.maxUploads:
                raise QuotaExceeded(
                    f"account {account.name!r} already has {len(uploading)} uploads in "
                    f"progress, the most it may have at once: finish one first")
            inProgress = sum(u.size for u in uploading)
            if used + inProgress + size > self.quota:
                raise QuotaExceeded(
                    f"this image ({size} bytes) would take account {account.name!r} "
                    f"over its image quota of {self.quota} bytes: {used} bytes stored and "
                    f"{inProgress} bytes in uploads in progress"
                )
            upload = Upload(self, account, sha256, size, name)
            self.uploading.setdefault(account.id, set()).add(upload)
            return upload
        finally:
            self._quotaTurn.release()

    def release(self, upload):
        """The upload no longer counts as in progress (idempotent)."""
        uploading = self.uploading.get(upload.account.id)
        if uploading is not None:
            uploading.discard(upload)
            if not uploading:
                del self.uploading[upload.account.id]

    async def complete(self, upload):
        try:
            await upload.finish()
            await self._quotaTurn.acquire()
            try:
                await self.db.run(store.addAccountImage, upload.account.id,
                                  upload.sha256, upload.size, upload.name)
            finally:
                # Counted as stored now: no longer in progress.
                self.release(upload)
                self._quotaTurn.release()
        finally:
            self.release(upload)   # a refused finish
        self.log.info("stored image {sha256} ({size} bytes) for {name}",
                      sha256=upload.sha256, size=upload.size, name=upload.account.name)

    async def list(self, account, after=None):
        """A page of the account's images, after its image C{after}: (images, more)."""
        try:
            rows = await self.db.run(store.accountImages, account.id, after,
                                     IMAGES_PAGE + 1)
        except LookupError:
            raise BadRequest(f"after must be the sha256 of one of your images, "
                             f"not {after[:64]!r}")
        return paging.pageOf(ListImages, "images", rows, IMAGES_PAGE)

    async def delete(self, account, sha256):
        """
        Take an image off the account's images, freeing its room in the
        quota; refused while one of its VMs that is not over boots it.  The
        file stays in the store (other accounts may hold it, an ended
        order's VMs name it).
        """
        checkSha256(sha256)
        busy = await self.db.run(_deleteImage, account.id, sha256)
        if busy is None:
            raise BadRequest(f"you have no image {sha256}")
        if busy:
            raise BadRequest(f"image {sha256} boots {busy} of your VMs that are not over:"
                             " stop them or cancel their orders first")
        self.log.info("account {name} deleted its image {sha256}", name=account.name,
                      sha256=sha256)

    def readChunk(self, sha256, offset, length):
        return self.inThread(self._read, self.pathFor(checkSha256(sha256)), offset, length)

    @staticmethod
    def _read(path, offset, length):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)


def _deleteImage(cursor, accountId, sha256):
    """
    In one transaction, so that no order placed meanwhile boots it: the
    account's VMs not over that boot the image (it is kept), else 0 once it
    is deleted, or None when the account has no such image.
    """
    busy = store.activeImageVMs(cursor, accountId, sha256)
    if busy:
        return busy
    return 0 if store.deleteAccountImage(cursor, accountId, sha256) else None
