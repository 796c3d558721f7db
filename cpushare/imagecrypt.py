"""
Encrypted images: a buyer's ISO sealed with AES-256-GCM under a random key,
so that the market, and any seller the market does not release the key
to, stores and carries only ciphertext.

The file is a header followed by the ISO in chunks, each sealed alone:

    header  MAGIC (16 bytes), version (2), chunk size (4), chunk count (8),
            image id (16 random bytes), key check (16)        big-endian
    chunk i AES-256-GCM(chunk key, nonce = 4 zero bytes + i as 8 bytes,
                        plaintext = bytes [i*size, (i+1)*size) of the ISO,
                        associated data = the header + i + count + last?)
            that is the chunk's ciphertext followed by its 16-byte tag.

Every chunk but the last holds exactly the chunk size (1 MiB when this
module writes it); the last holds 1 to chunk size bytes.  Because each
chunk's associated data holds the whole header, its index, the count and
whether it is the last, a chunk cannot be moved, dropped, repeated or taken
from another image (whose header has another image id), and the file cannot
be cut at a chunk boundary, without the chunk's tag failing.  The key is
random for each image, and the chunks are sealed under a key of their own
derived from it and the image id (HKDF-SHA256, CHUNK_KEY_LABEL), so a
nonce derived from the index is never used twice with one AES key, even
if a caller encrypted two images under the same key.

What the header tells: the chunk size and count, which the file's size
tells anyway (and so the ISO's size, to 16 bytes a chunk).  It holds no
digest of the ISO, which would let anyone confirm a guess of what it is
(the reference livecd, a published image).  The key check,
HMAC-SHA256(key, KEY_CHECK_LABEL + image id) cut to 16 bytes, says whether
a key is this image's before any chunk is opened (a wrong key is then
named as such, not as a corrupt chunk) and lets the market refuse a key
that does not open the image it is given for; from it nothing can be
learnt of a 256-bit random key.

The functions here are blocking, streaming and hold one chunk at a time:
callers run them on a thread pool (never the reactor's thread).
"""

import hashlib
import hmac
import os
import struct

import attr
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"CPUSHARE-ENCISO\n"
VERSION = 1
CHUNK = 1024 * 1024
# The chunk sizes a reader accepts: the memory it holds is one chunk.
MIN_CHUNK = 4096
MAX_CHUNK = 16 * 1024 * 1024
KEY_SIZE = 32
TAG = 16
HEADER = struct.Struct(">16sHIQ16s16s")
KEY_CHECK_LABEL = b"cpushare image key check v1\0"
CHUNK_KEY_LABEL = b"cpushare image chunks v1"
_AAD = struct.Struct(">QQ?")


class ImageCryptError(Exception):
    """An encrypted image that cannot be read or opened; the message says why."""


@attr.s(frozen=True)
class Header:
    chunkSize = attr.ib()
    count = attr.ib()
    imageId = attr.ib()
    keyCheck = attr.ib()
    raw = attr.ib(repr=False)

    def expectedSizes(self):
        """(smallest, largest) size of the whole file this header announces."""
        full = HEADER.size + (self.count - 1) * (self.chunkSize + TAG)
        return full + 1 + TAG, full + self.chunkSize + TAG

    def plainSize(self, fileSize):
        """The size of the ISO inside a file of C{fileSize} bytes (checked)."""
        checkSize(self, fileSize)
        return fileSize - HEADER.size - self.count * TAG

    def opens(self, key):
        """Whether C{key} is this image's key."""
        return hmac.compare_digest(keyCheck(key, self.imageId), self.keyCheck)


def encryptedSize(plainSize, chunkSize=CHUNK):
    """The size of the encrypted image of an ISO of C{plainSize} bytes."""
    return HEADER.size + plainSize + -(-plainSize // chunkSize) * TAG


def newKey():
    """A fresh random image key."""
    return AESGCM.generate_key(bit_length=256)


def checkKey(key):
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise ImageCryptError(f"an image key is {KEY_SIZE} bytes, not "
                              f"{len(key) if isinstance(key, bytes) else type(key).__name__}")
    return key


def keyCheck(key, imageId):
    return hmac.new(checkKey(key), KEY_CHECK_LABEL + imageId, hashlib.sha256).digest()[:16]


def _chunkCipher(key, imageId):
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=imageId,
                info=CHUNK_KEY_LABEL)
    return AESGCM(hkdf.derive(key))


def _nonce(index):
    return b"\0\0\0\0" + index.to_bytes(8, "big")


def _aad(header, index, count):
    return header + _AAD.pack(index, count, index == count - 1)


def isEncrypted(path):
    """Whether the file at C{path} starts as an encrypted image does (False: no file)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except FileNotFoundError:
        return False


def parseHeader(data):
    """The L{Header} at the start of C{data}; ImageCryptError naming what is wrong."""
    magicSeen = data[:len(MAGIC)]
    if not magicSeen or not MAGIC.startswith(magicSeen):
        raise ImageCryptError("this is not an encrypted image (it does not start with the "
                              "CPUShare encrypted image header)")
    if len(data) < HEADER.size:
        raise ImageCryptError(f"the encrypted image is truncated: its header is "
                              f"{HEADER.size} bytes, the file has {len(data)}")
    magic, version, chunkSize, count, imageId, check = HEADER.unpack_from(data)
    if version != VERSION:
        raise ImageCryptError(f"the encrypted image is of version {version}; this program "
                              f"reads version {VERSION}")
    if not MIN_CHUNK <= chunkSize <= MAX_CHUNK:
        raise ImageCryptError(f"the encrypted image's chunk size {chunkSize} is outside "
                              f"{MIN_CHUNK} to {MAX_CHUNK} bytes")
    if count < 1:
        raise ImageCryptError("the encrypted image's header announces no chunk")
    return Header(chunkSize, count, imageId, check, data[:HEADER.size])


def readHeader(f):
    """The L{Header} of the open file C{f} (read from its start)."""
    f.seek(0)
    return parseHeader(f.read(HEADER.size))


def checkSize(header, fileSize):
    smallest, largest = header.expectedSizes()
    if fileSize < smallest:
        raise ImageCryptError(
            f"the encrypted image is truncated: it has {fileSize} bytes, its header "
            f"announces {header.count} chunks, which take at least {smallest}")
    if fileSize > largest:
        raise ImageCryptError(
            f"the encrypted image has {fileSize - largest} bytes more than the "
            f"{header.count} chunks its header announces")


def encryptFile(source, target, key, chunkSize=CHUNK):
    """
    Encrypt the file at C{source} into a new file at C{target} under C{key}
    (L{newKey}); returns the size written.  An empty file is refused.
    """
    checkKey(key)
    if not MIN_CHUNK <= chunkSize <= MAX_CHUNK:
        raise ImageCryptError(f"a chunk is {MIN_CHUNK} to {MAX_CHUNK} bytes, not {chunkSize}")
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ImageCryptError(f"{source} is empty: there is no image to encrypt")
        count = -(-size // chunkSize)
        imageId = os.urandom(16)
        aes = _chunkCipher(key, imageId)
        header = HEADER.pack(MAGIC, VERSION, chunkSize, count, imageId,
                             keyCheck(key, imageId))
        written = 0
        with open(target, "wb") as out:
            out.write(header)
            written += len(header)
            for index in range(count):
                data = f.read(chunkSize)
                if not data or (len(data) < chunkSize and index != count - 1):
                    raise ImageCryptError(f"{source} shrank while it was being encrypted")
                sealed = aes.encrypt(_nonce(index), data, _aad(header, index, count))
                out.write(sealed)
                written += len(sealed)
            if f.read(1):
                raise ImageCryptError(f"{source} grew while it was being encrypted")
    return written


def decryptFile(source, write, key):
    """
    Decrypt the encrypted image at C{source} with C{key}, calling
    C{write(bytes)} with the ISO a chunk at a time, in order; returns the
    ISO's size.  A wrong key, or a file changed in any way (truncated,
    extended, a byte flipped, chunks reordered, dropped or taken from
    another image), raises L{ImageCryptError} naming the problem, at the
    latest before the chunk it is in would be written.
    """
    checkKey(key)
    with open(source, "rb") as f:
        header = readHeader(f)
        size = header.plainSize(os.fstat(f.fileno()).st_size)
        if not header.opens(key):
            raise ImageCryptError("this key does not open the encrypted image (it is another"
                                  " image's key, or the image's header is damaged)")
        aes = _chunkCipher(key, header.imageId)
        for index in range(header.count):
            sealed = f.read(header.chunkSize + TAG)
            if len(sealed) <= TAG:
                raise ImageCryptError(f"the encrypted image is truncated at chunk {index}")
            try:
                data = aes.decrypt(_nonce(index), sealed,
                                   _aad(header.raw, index, header.count))
            except InvalidTag:
                raise ImageCryptError(
                    f"chunk {index} of {header.count} of the encrypted image does not "
                    "authenticate: the file is corrupt or was altered (a changed, moved, "
                    "dropped or foreign chunk)")
            write(data)
    return size
