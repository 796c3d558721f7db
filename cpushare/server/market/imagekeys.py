"""
The market's custody of the keys of buyers' encrypted images
(L{cpushare.imagecrypt}).

A buyer gives an image's key once it has uploaded the image (SetImageKey,
`cpushare image upload --encrypt`).  The market keeps it sealed with
AES-256-GCM under its key-encryption key, a 32-byte key in a file of its
own (created 0600 at the first start, in the data folder unless
`--image-key-file` puts it elsewhere), never in the database: a copy of
the database alone opens no image.  The sealed key is bound to its
account and image (they are its associated data), so a row moved to
another account or image in the database does not open.

A key comes out in clear only through L{ImageKeys.unsealed}, for the
moment its release wraps it to an attested seller's TPM key; it is never
logged and never sent to anybody in clear.  Deleting the image deletes
its key (L{cpushare.server.db.store.deleteAccountImage}).
"""

import hashlib
import os
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet import defer
from twisted.logger import Logger

from cpushare import imagecrypt
from cpushare.protocol.commands import BadRequest
from cpushare.server.db import store
from cpushare.server.images import checkSha256

KEK_SIZE = 32
NONCE = 12


class KeyFileError(Exception):
    """The key-encryption key file cannot be used; the message says why and what to do."""


class KeyUnavailable(Exception):
    """An image has a key, but it cannot be unsealed here; the message says why."""


def kekId(kek):
    """The name of a key-encryption key kept beside each key it seals."""
    return hashlib.sha256(kek).hexdigest()[:16]


def loadKEK(path, create):
    """
    The key-encryption key in the file at C{path} (64 hex digits); a new
    one is made (0600) when there is none and C{create} says one may be.
    Blocking: run it before the market serves, or on a thread.
    """
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            text = f.read(4 * KEK_SIZE).strip()
    except FileNotFoundError:
        if not create:
            raise KeyFileError(
                f"the image key-encryption key file {path} is missing, but the database "
                "holds image keys sealed under a key-encryption key: restore the file from "
                "its backup (or name it with --image-key-file)")
        kek = os.urandom(KEK_SIZE)
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, kek.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return kek, True
    except OSError as e:
        raise KeyFileError(f"the image key-encryption key file {path}: {e.strerror}")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"the image key-encryption key file {path} can be read by other "
                           f"users (mode {stat.S_IMODE(info.st_mode):o}): chmod 600 it")
    try:
        kek = bytes.fromhex(text.decode("ascii"))
    except ValueError:
        kek = b""
    if len(kek) != KEK_SIZE:
        raise KeyFileError(f"the image key-encryption key file {path} does not hold "
                           f"{KEK_SIZE} bytes as {2 * KEK_SIZE} hex digits")
    return kek, False


def _associated(accountId, sha256):
    return f"{int(accountId)}:{sha256}".encode("ascii")


def _accountId(account):
    return account if isinstance(account, int) else account.id


class ImageKeys:
    """
    The keys of encrypted images, sealed under the key in C{path}; C{images}
    is the image store, whose files a key is checked against.
    """

    log = Logger()

    def __init__(self, store, images, path):
        self.db = store
        self.images = images
        self.path = path
        self._kek = None
        self._kekId = None

    async def start(self):
        """Load the key-encryption key (made at the first start); raises L{KeyFileError}."""
        sealedBy = await self.db.run(store.imageKeyKEKs)
        kek, created = loadKEK(self.path, create=not sealedBy)
        self._kek, self._kekId = AESGCM(kek), kekId(kek)
        if created:
            self.log.info("made the image key-encryption key {path}: back it up",
                          path=self.path)
        others = sum(n for kek, n in sealedBy.items() if kek != self._kekId)
        if others:
            self.log.error(
                "{n} image keys were sealed under another key-encryption key than {path}'s:"
                " they cannot be released until that file is back", n=others, path=self.path)

    async def set(self, account, sha256, key):
        """
        Keep C{key} as the key of the account's encrypted image C{sha256}:
        refused unless the account holds the image, the image is an
        encrypted one, and C{key} opens it.
        """
        checkSha256(sha256)
        if not isinstance(key, bytes) or len(key) != imagecrypt.KEY_SIZE:
            raise BadRequest(f"an image key is {imagecrypt.KEY_SIZE} bytes, not "
                             f"{len(key) if isinstance(key, bytes) else 'text'}")
        if self._kek is None or self.images is None:
            raise BadRequest("this market keeps no image keys")
        if not await self.db.run(store.accountHasImage, _accountId(account), sha256):
            raise BadRequest(f"you have no image {sha256}: upload it first")
        try:
            header = await self.images.inThread(_readHeader, self.images.pathFor(sha256))
        except imagecrypt.ImageCryptError as e:
            raise BadRequest(f"image {sha256} cannot take a key: {e}")
        if not header.opens(key):
            raise BadRequest(f"this key does not open image {sha256}: it was encrypted under "
                             "another key")
        nonce = os.urandom(NONCE)
        sealed = nonce + self._kek.encrypt(nonce, key, _associated(_accountId(account), sha256))
        await self.db.run(store.setImageKey, _accountId(account), sha256, sealed.hex(),
                          self._kekId)
        self.log.info("account {account} gave the key of its encrypted image {sha256}",
                      account=getattr(account, "name", account), sha256=sha256)

    def encrypted(self, account, sha256):
        """A Deferred: whether the account's image C{sha256} has a key here."""
        d = self.db.run(store.imageKey, _accountId(account), sha256)
        return d.addCallback(lambda row: row is not None)

    def unsealed(self, account, sha256):
        """
        A Deferred of the key of C{account}'s image C{sha256} in clear
        (C{account} is an account or its id), or of None when the image has
        no key.  Only for the moment of a release: the caller wraps it to
        the attested seller's TPM key at once and keeps it nowhere.  Fails
        with L{KeyUnavailable} when the key is here but cannot be unsealed.
        """
        return defer.ensureDeferred(self._unsealed(_accountId(account), sha256))

    async def _unsealed(self, accountId, sha256):
        row = await self.db.run(store.imageKey, accountId, sha256)
        if row is None:
            return None
        sealed, sealedBy = row
        if self._kek is None or sealedBy != self._kekId:
            raise KeyUnavailable(
                f"the key of image {sha256} was sealed under another key-encryption key than"
                f" the market's {self.path}")
        sealed = bytes.fromhex(sealed)
        try:
            return self._kek.decrypt(sealed[:NONCE], sealed[NONCE:],
                                     _associated(accountId, sha256))
        except InvalidTag:
            self.log.error("the sealed key of account {account}'s image {sha256} does not"
                           " open: the database row was altered", account=accountId,
                           sha256=sha256)
            raise KeyUnavailable(f"the sealed key of image {sha256} is damaged")


def _readHeader(path):
    with open(path, "rb") as f:
        header = imagecrypt.readHeader(f)
        imagecrypt.checkSize(header, os.fstat(f.fileno()).st_size)
        return header
