"""
Images on the buyer's side: hashing and uploading an ISO to the market.

The file is read and hashed on a thread, never on the reactor.  The upload
is pipelined: up to WINDOW chunks are in flight, each acknowledged by the
server, so a slow link slows the upload instead of growing a queue.

An encrypted upload (L{uploadEncrypted}) encrypts the ISO first, on a
thread, into a temporary file in the home folder, uploads that, keeps the
key in HOME/image-keys/SHA256.key (0600) and gives it to the market.
"""

import os
import sys
import tempfile

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from cpushare import imagecrypt, pki
from cpushare.imagefolder import hashFile
from cpushare.protocol import commands

WINDOW = 8


def _readAt(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


class ProgressBar:
    """A one-line progress bar on a terminal (nothing when not a terminal)."""

    def __init__(self, total, stream=sys.stderr, width=30):
        self.total = total
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()

    def update(self, done):
        if not self.tty:
            return
        filled = int(self.width * done / self.total) if self.total else self.width
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] "
            f"{done / 2**20:.1f}/{self.total / 2**20:.1f} MB"
        )
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


async def upload(reactor, session, path, name=None, progress=None):
    """
    Upload the ISO at C{path}; returns (sha256, size, sent), C{sent} False
    when the market already had it for this account.
    """
    pool = reactor.getThreadPool()
    sha256, size = await deferToThreadPool(reactor, pool, hashFile, path)
    name = name or os.path.basename(path)
    started = await session.control.callRemote(
        commands.ImageUploadStart, sha256=sha256, size=size, name=name)
    if not started["needed"]:
        return sha256, size, False
    window = defer.DeferredSemaphore(WINDOW)
    sent = 0
    failures = []

    def acked(result, n):
        nonlocal sent
        sent += n
        if progress:
            progress(sent)
        window.release()

    def failed(failure):
        failures.append(failure)
        window.release()

    offset = 0
    while offset < size and not failures:
        await window.acquire()
        data = await deferToThreadPool(
            reactor, pool, _readAt, path, offset, commands.IMAGE_CHUNK)
        if not data:
            window.release()
            raise OSError(f"{path} shrank while it was being uploaded")
        d = session.control.callRemote(
            commands.ImageUploadChunk, sha256=sha256, offset=offset, data=data)
        d.addCallbacks(acked, failed, callbackArgs=(len(data),))
        offset += len(data)
    for _ in range(WINDOW):
        await window.acquire()
    if failures:
        failures[0].raiseException()
    await session.control.callRemote(commands.ImageUploadFinish, sha256=sha256)
    return sha256, size, True


def keyPath(home, sha256):
    """Where the key of the encrypted image C{sha256} is kept: HOME/image-keys/SHA256.key."""
    return os.path.join(home, "image-keys", f"{sha256}.key")


def saveKey(home, sha256, key):
    path = keyPath(home, sha256)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    pki.writePrivate(path, key.hex().encode("ascii") + b"\n")
    return path


def loadKey(home, sha256):
    """The key kept for image C{sha256}; OSError or ValueError naming the file."""
    path = keyPath(home, sha256)
    with open(path, "rb") as f:
        text = f.read(200).strip()
    key = bytes.fromhex(text.decode("ascii", "replace"))
    if len(key) != imagecrypt.KEY_SIZE:
        raise ValueError(f"{path} does not hold a {imagecrypt.KEY_SIZE}-byte key in hex")
    return key


async def uploadEncrypted(reactor, session, home, path, name=None, progress=None):
    """
    Encrypt the ISO at C{path} under a new key, upload the ciphertext and
    give the market its key; returns (sha256 of the ciphertext, its size,
    the key file's path).  The plaintext never leaves this computer.
    """
    pool = reactor.getThreadPool()
    key = imagecrypt.newKey()
    fd, encrypted = tempfile.mkstemp(prefix=".encrypting-", suffix=".iso", dir=home)
    os.close(fd)
    try:
        await deferToThreadPool(reactor, pool, imagecrypt.encryptFile, path, encrypted, key)
        sha256, size, _ = await upload(reactor, session, encrypted,
                                       name or os.path.basename(path), progress)
    finally:
        os.remove(encrypted)
    saved = saveKey(home, sha256, key)
    try:
        await session.control.callRemote(commands.SetImageKey, sha256=sha256, key=key)
    except commands.CPUShareError as e:
        raise commands.CPUShareError(
            f"{e}; the image was uploaded (sha256 {sha256}) and its key kept in {saved}: "
            f"give it to the market with 'cpushare image key {sha256}'")
    return sha256, size, saved
