"""
Encrypted images (cpushare.imagecrypt): what a market or a seller that
changes the file can do, and the round trip of an honest one.
"""

import io
import os
import shutil
import tempfile

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from cpushare import imagecrypt
from cpushare.imagecrypt import HEADER, TAG, ImageCryptError

SMALL = imagecrypt.MIN_CHUNK


class CryptCase(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="cpushare-imagecrypt-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.key = imagecrypt.newKey()
        self.files = 0

    def path(self, name):
        return os.path.join(self.folder, name)

    def plain(self, data):
        self.files += 1
        path = self.path(f"plain{self.files}.iso")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def encrypt(self, data, key=None, chunkSize=SMALL):
        source = self.plain(data)
        target = source + ".enc"
        imagecrypt.encryptFile(source, target, key or self.key, chunkSize)
        return target

    def decrypt(self, path, key=None):
        out = io.BytesIO()
        size = imagecrypt.decryptFile(path, out.write, key or self.key)
        self.assertEqual(size, len(out.getvalue()))
        return out.getvalue()

    def refused(self, path, key=None):
        """The message decrypting C{path} fails with; nothing was written before it."""
        written = []
        with self.assertRaises(ImageCryptError) as e:
            imagecrypt.decryptFile(path, written.append, key or self.key)
        return str(e.exception), written

    def rewrite(self, path, change):
        with open(path, "rb") as f:
            data = bytearray(f.read())
        data = change(data)
        with open(path, "wb") as f:
            f.write(data)
        return path


class AbuseTests(CryptCase):
    def test_a_wrong_key_is_named_as_such(self):
        path = self.encrypt(os.urandom(3 * SMALL))
        message, written = self.refused(path, imagecrypt.newKey())
        self.assertIn("this key does not open the encrypted image", message)
        self.assertEqual(written, [])

    def test_a_flipped_byte_in_any_chunk_is_refused(self):
        data = os.urandom(3 * SMALL + 10)
        for offset in (HEADER.size, HEADER.size + SMALL + TAG + 5, -1, -TAG - 1):
            path = self.encrypt(data)

            def flip(b, offset=offset):
                b[offset] ^= 0x01
                return b

            message, written = self.refused(self.rewrite(path, flip))
            self.assertIn("does not authenticate: the file is corrupt or was altered", message)
            # What was written before is only the chunks before the flipped one.
            self.assertEqual(b"".join(written), data[:len(b"".join(written))])

    def test_a_changed_header_is_refused(self):
        data = os.urandom(2 * SMALL)
        path = self.encrypt(data)
        message, _ = self.refused(self.rewrite(path, lambda b: b[:16] + b"\0\2" + b[18:]))
        self.assertIn("version 2", message)
        path = self.encrypt(data)
        # The image id: every chunk's associated data changes with it.
        message, _ = self.refused(self.rewrite(path, lambda b: b[:30] + bytes([b[30] ^ 1]) + b[31:]))
        self.assertIn("key does not open", message)
        message, _ = self.refused(self.plain(b"an ordinary ISO" * 100))
        self.assertIn("not an encrypted image", message)

    def test_a_truncated_file_is_refused(self):
        data = os.urandom(3 * SMALL)
        for keep in (10, HEADER.size, HEADER.size + SMALL + TAG):
            path = self.encrypt(data)
            message, written = self.refused(self.rewrite(path, lambda b, k=keep: b[:k]))
            self.assertIn("truncated", message)
            self.assertEqual(written, [])
        # A byte short in the last chunk: the size could be an image's, the tag fails.
        path = self.encrypt(data)
        message, written = self.refused(self.rewrite(path, lambda b: b[:-1]))
        self.assertIn("chunk 2 of 3 of the encrypted image does not authenticate", message)
        self.assertEqual(b"".join(written), data[:2 * SMALL])

    def test_a_truncated_file_with_its_count_changed_is_refused(self):
        data = os.urandom(3 * SMALL)
        path = self.encrypt(data)

        def cut(b):
            # Drop the last chunk and say there were two.
            b = b[:HEADER.size + 2 * (SMALL + TAG)]
            return b[:22] + (2).to_bytes(8, "big") + b[30:]

        message, written = self.refused(self.rewrite(path, cut))
        self.assertIn("chunk 0 of 2", message)
        self.assertIn("does not authenticate", message)
        self.assertEqual(written, [])

    def test_extra_bytes_are_refused(self):
        path = self.rewrite(self.encrypt(os.urandom(SMALL)), lambda b: b + b"x")
        message, _ = self.refused(path)
        self.assertIn("1 bytes more than", message)

    def test_reordered_chunks_are_refused(self):
        data = os.urandom(3 * SMALL)
        path = self.encrypt(data)
        size = SMALL + TAG

        def swap(b):
            first = b[HEADER.size:HEADER.size + size]
            second = b[HEADER.size + size:HEADER.size + 2 * size]
            return b[:HEADER.size] + second + first + b[HEADER.size + 2 * size:]

        message, written = self.refused(self.rewrite(path, swap))
        self.assertIn("chunk 0 of 3", message)
        self.assertEqual(written, [])

    def test_a_repeated_chunk_is_refused(self):
        path = self.encrypt(os.urandom(3 * SMALL))
        size = SMALL + TAG

        def repeat(b):
            first = b[HEADER.size:HEADER.size + size]
            return b[:HEADER.size + size] + first + b[HEADER.size + 2 * size:]

        message, written = self.refused(self.rewrite(path, repeat))
        self.assertIn("chunk 1 of 3", message)
        self.assertEqual(len(written), 1)

    def test_a_chunk_from_another_image_is_refused_even_under_the_same_key(self):
        data = os.urandom(2 * SMALL)
        mine = self.encrypt(data)
        # Another image under the same key (the market never sees two, but a
        # chunk still must not move between them) and one under its own key.
        for other in (self.encrypt(data), self.encrypt(data, imagecrypt.newKey())):
            with open(other, "rb") as f:
                theirs = f.read()
            path = shutil.copy(mine, mine + ".mixed")
            self.rewrite(path, lambda b: b[:HEADER.size] + theirs[HEADER.size:HEADER.size + SMALL + TAG]
                         + b[HEADER.size + SMALL + TAG:])
            message, written = self.refused(path)
            self.assertIn("chunk 0 of 2", message)
            self.assertEqual(written, [])

    def test_an_empty_file_is_refused(self):
        with self.assertRaises(ImageCryptError) as e:
            self.encrypt(b"")
        self.assertIn("is empty", str(e.exception))

    def test_a_key_of_the_wrong_size_is_refused(self):
        path = self.encrypt(b"x" * 100)
        for key in (b"", b"k" * 16, b"k" * 33):
            with self.assertRaises(ImageCryptError) as e:
                imagecrypt.decryptFile(path, lambda data: None, key)
            self.assertIn("an image key is 32 bytes", str(e.exception))

    def test_an_absurd_chunk_size_in_the_header_is_refused_before_reading(self):
        path = self.encrypt(os.urandom(SMALL))
        huge = (2**31).to_bytes(4, "big")
        message, _ = self.refused(self.rewrite(path, lambda b: b[:18] + huge + b[22:]))
        self.assertIn("chunk size 2147483648 is outside", message)


class RoundTripTests(CryptCase):
    @settings(max_examples=40, deadline=None)
    @given(st.integers(min_value=-3, max_value=3), st.integers(min_value=1, max_value=3))
    def test_sizes_around_chunk_boundaries(self, delta, chunks):
        size = max(1, chunks * SMALL + delta)
        data = os.urandom(size)
        path = self.encrypt(data)
        self.assertEqual(os.path.getsize(path), HEADER.size + size + -(-size // SMALL) * TAG)
        self.assertEqual(os.path.getsize(path), imagecrypt.encryptedSize(size, SMALL))
        self.assertEqual(self.decrypt(path), data)
        with open(path, "rb") as f:
            self.assertEqual(imagecrypt.readHeader(f).plainSize(os.path.getsize(path)), size)

    def test_megabyte_chunks_by_default(self):
        for size, chunks in ((imagecrypt.CHUNK - 1, 1), (imagecrypt.CHUNK, 1),
                             (imagecrypt.CHUNK + 1, 2)):
            data = os.urandom(size)
            source = self.plain(data)
            written = imagecrypt.encryptFile(source, source + ".enc", self.key)
            self.assertEqual(written, HEADER.size + len(data) + chunks * TAG)
            self.assertEqual(written, imagecrypt.encryptedSize(size))
            self.assertTrue(imagecrypt.isEncrypted(source + ".enc"))
            self.assertFalse(imagecrypt.isEncrypted(source))
            self.assertEqual(self.decrypt(source + ".enc"), data)

    def test_two_encryptions_share_nothing_an_observer_could_match(self):
        data = b"the same well-known ISO" * 1000
        first, second = self.encrypt(data), self.encrypt(data)
        with open(first, "rb") as f, open(second, "rb") as g:
            a, b = f.read(), g.read()
        # Same size (the size is not secret), but no common chunk bytes.
        self.assertEqual(len(a), len(b))
        self.assertNotEqual(a[HEADER.size:HEADER.size + 32], b[HEADER.size:HEADER.size + 32])
        self.assertNotIn(data[:64], a)
