"""
Encrypted images on the market in memory: `cpushare image upload --encrypt`
(cpushare.client.cli.upload.uploadEncrypted), the market's custody of the
key (cpushare.server.market.imagekeys) and the orders that may boot one.
What a greedy buyer, another account or a copy of the database can get.
"""

import io
import os
import stat

from twisted.internet import defer

from cpushare import imagecrypt
from cpushare.client.cli import upload
from cpushare.protocol import commands
from cpushare.protocol.commands import BadRequest
from cpushare.server.db.store import Account
from cpushare.server.market import imagekeys
from cpushare.server.market.imagekeys import ImageKeys, KeyFileError, KeyUnavailable

from test.fakemarket import LogCapture
from test.unit.test_orders import OrderCase


class EncryptedCase(OrderCase):
    """alice (with a plain image, self.sha) on a market that keeps image keys."""

    imageQuota = 8 * 1024 * 1024

    def makeMarket(self, **kw):
        self.kekPath = os.path.join(self.folder, "secrets", "image-keys.kek")
        OrderCase.makeMarket(self, imageKeyFile=self.kekPath, **kw)

    @defer.inlineCallbacks
    def setUp(self):
        yield OrderCase.setUp(self)
        yield defer.ensureDeferred(self.market.imagekeys.start())
        self.home = os.path.join(self.folder, "alice-home")
        os.makedirs(self.home)
        self.plain = self.makeFile(200000, b"secret job")
        self.aliceAccount = Account(self.aliceId, "alice", "")

    def encryptedUpload(self, session=None, home=None, path=None):
        return defer.ensureDeferred(upload.uploadEncrypted(
            self.reactor, session or self.cli, home or self.home, path or self.plain))

    def rows(self):
        def read(cursor):
            cursor.execute("SELECT account_id, sha256, sealed, kek FROM image_keys")
            return cursor.fetchall()
        return self.store.run(read)


class UploadTests(EncryptedCase):
    @defer.inlineCallbacks
    def test_the_market_holds_only_ciphertext_and_a_sealed_key(self):
        with LogCapture() as log:
            sha256, size, keyFile = yield self.encryptedUpload()
        # The buyer keeps the key, readable by its owner alone.
        self.assertEqual(keyFile, os.path.join(self.home, "image-keys", f"{sha256}.key"))
        self.assertEqual(stat.S_IMODE(os.stat(keyFile).st_mode), 0o600)
        key = upload.loadKey(self.home, sha256)
        # What the market stores is the ciphertext: its sha256 is the ciphertext's.
        stored = self.images.pathFor(sha256)
        self.assertTrue(imagecrypt.isEncrypted(stored))
        with open(stored, "rb") as f, open(self.plain, "rb") as g:
            ciphertext, plaintext = f.read(), g.read()
        self.assertNotIn(plaintext[:1000], ciphertext)
        out = io.BytesIO()
        imagecrypt.decryptFile(stored, out.write, key)
        self.assertEqual(out.getvalue(), plaintext)
        # No temporary file is left in the home.
        self.assertEqual(sorted(os.listdir(self.home)), ["image-keys"])
        # The row holds the key sealed, never in clear; nor does the log.
        [(accountId, rowSha, sealed, kek)] = yield self.rows()
        self.assertEqual((accountId, rowSha), (self.aliceId, sha256))
        self.assertNotIn(key.hex(), sealed)
        self.assertNotIn(key, bytes.fromhex(sealed))
        self.assertFalse(any(key.hex() in text for text in log.texts()))
        self.assertEqual(stat.S_IMODE(os.stat(self.kekPath).st_mode), 0o600)
        self.assertEqual(kek, imagekeys.kekId(bytes.fromhex(open(self.kekPath).read())))
        # The market releases it in clear to the caller that wraps it, and only that.
        self.assertEqual((yield self.market.imagekeys.unsealed(self.aliceId, sha256)), key)
        self.assertIsNone((yield self.market.imagekeys.unsealed(self.aliceId, self.sha)))
        self.assertTrue((yield self.market.imagekeys.encrypted(self.aliceAccount, sha256)))
        self.assertFalse((yield self.market.imagekeys.encrypted(self.aliceAccount, self.sha)))
        # The listing says which images are encrypted.
        listed = yield self.call(self.cli, commands.ListImages)
        self.assertEqual({i["sha256"]: i["encrypted"] for i in listed["images"]},
                         {self.sha: False, sha256: True})

    @defer.inlineCallbacks
    def test_another_account_can_neither_set_nor_get_the_key(self):
        sha256, _, _ = yield self.encryptedUpload()
        key = upload.loadKey(self.home, sha256)
        bob = yield self.register("bob")
        bobCli = yield self.connect("cli", *bob)
        bobId = (yield self.call(bobCli, commands.WhoAmI))["account_id"]
        with self.assertRaises(BadRequest) as e:
            yield self.call(bobCli, commands.SetImageKey, sha256=sha256, key=key)
        self.assertIn(f"you have no image {sha256}", str(e.exception))
        self.assertIsNone((yield self.market.imagekeys.unsealed(bobId, sha256)))
        # Even holding the same ciphertext, bob cannot give it a key that does not open it.
        yield defer.ensureDeferred(upload.upload(self.reactor, bobCli, self.images.pathFor(sha256)))
        with self.assertRaises(BadRequest) as e:
            yield self.call(bobCli, commands.SetImageKey, sha256=sha256,
                            key=imagecrypt.newKey())
        self.assertIn("this key does not open image", str(e.exception))
        self.assertIsNone((yield self.market.imagekeys.unsealed(bobId, sha256)))
        # A sealed key moved to bob's row in the database does not open.
        yield self.store.run(lambda c: c.execute(
            "INSERT INTO image_keys (account_id, sha256, sealed, kek, created)"
            " SELECT ?, sha256, sealed, kek, created FROM image_keys", (bobId,)))
        with self.assertRaises(KeyUnavailable) as e:
            yield self.market.imagekeys.unsealed(bobId, sha256)
        self.assertIn("is damaged", str(e.exception))
        self.assertEqual((yield self.market.imagekeys.unsealed(self.aliceId, sha256)), key)

    @defer.inlineCallbacks
    def test_bad_keys_and_plain_images_are_refused(self):
        sha256, _, _ = yield self.encryptedUpload()
        cases = [
            (self.sha, imagecrypt.newKey(), "cannot take a key: this is not an encrypted image"),
            (sha256, b"short", "an image key is 32 bytes, not 5"),
            (sha256, b"k" * 60000, "an image key is 32 bytes"),
            (sha256, imagecrypt.newKey(), "this key does not open image"),
            ("../../etc/passwd", imagecrypt.newKey(), "is not a sha256 digest"),
        ]
        for sha, key, message in cases:
            with self.assertRaises(BadRequest) as e:
                yield self.call(self.cli, commands.SetImageKey, sha256=sha, key=key)
            self.assertIn(message, str(e.exception))
        # Giving the right key again is harmless.
        yield self.call(self.cli, commands.SetImageKey, sha256=sha256,
                        key=upload.loadKey(self.home, sha256))
        self.assertEqual(len((yield self.rows())), 1)

    @defer.inlineCallbacks
    def test_deleting_the_image_deletes_its_key(self):
        sha256, _, _ = yield self.encryptedUpload()
        yield defer.ensureDeferred(self.images.delete(self.aliceAccount, sha256))
        self.assertEqual((yield self.rows()), [])
        self.assertIsNone((yield self.market.imagekeys.unsealed(self.aliceId, sha256)))

    @defer.inlineCallbacks
    def test_an_encrypted_image_is_ordered_only_as_a_trusted_order(self):
        sha256, _, _ = yield self.encryptedUpload()
        for dryRun in (False, True):
            with self.assertRaises(BadRequest) as e:
                yield self.call(self.cli, commands.PlaceOrder, image=sha256, vms=1, cores=1,
                                memory=256, dry_run=dryRun)
            self.assertIn(f"image {sha256} is encrypted: its key is released only to attested"
                          " sellers, so order it with --trusted", str(e.exception))
        self.assertEqual((yield self.store.run(
            lambda c: c.execute("SELECT COUNT(*) FROM orders").fetchone()[0])), 0)
        # A trusted order passes this check (which sellers take it is the trusted screen's).
        placed = yield self.call(self.cli, commands.PlaceOrder, image=sha256, vms=1, cores=1,
                                 memory=256, dry_run=True, trusted=True)
        self.assertEqual(placed["order"], 0)
        # A plain image is ordered as before.
        placed = yield self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=1, cores=1,
                                 memory=256, dry_run=True)
        self.assertEqual(placed["order"], 0)


class KeyFileTests(EncryptedCase):
    @defer.inlineCallbacks
    def test_a_missing_key_file_is_not_replaced_while_keys_depend_on_it(self):
        sha256, _, _ = yield self.encryptedUpload()
        os.rename(self.kekPath, self.kekPath + ".elsewhere")
        keys = ImageKeys(self.store, self.images, self.kekPath)
        with self.assertRaises(KeyFileError) as e:
            yield defer.ensureDeferred(keys.start())
        self.assertIn("is missing, but the database holds image keys", str(e.exception))
        self.assertFalse(os.path.exists(self.kekPath))
        # Another key file: the market starts, says so, and releases nothing it cannot open.
        other = os.path.join(self.folder, "other.kek")
        imagekeys.loadKEK(other, create=True)
        keys = ImageKeys(self.store, self.images, other)
        with LogCapture() as log:
            yield defer.ensureDeferred(keys.start())
        self.assertTrue(any("1 image keys were sealed under another key-encryption key" in t
                            for t in log.texts()))
        with self.assertRaises(KeyUnavailable):
            yield defer.ensureDeferred(keys.unsealed(self.aliceId, sha256))

    def test_a_key_file_others_can_read_or_that_is_not_a_key_is_refused(self):
        path = os.path.join(self.folder, "loose.kek")
        with open(path, "w") as f:
            f.write(os.urandom(32).hex())
        os.chmod(path, 0o644)
        with self.assertRaises(KeyFileError) as e:
            imagekeys.loadKEK(path, create=True)
        self.assertIn("can be read by other users (mode 644): chmod 600 it", str(e.exception))
        os.chmod(path, 0o600)
        self.assertEqual(len(imagekeys.loadKEK(path, create=False)[0]), 32)
        with open(path, "w") as f:
            f.write("not a key")
        with self.assertRaises(KeyFileError) as e:
            imagekeys.loadKEK(path, create=True)
        self.assertIn("does not hold 32 bytes as 64 hex digits", str(e.exception))
