"""
An encrypted image decrypted into sealed memory on the seller
(cpushare.client.seller.imagememory), and the VM host booting it: a
market or a buyer that sends a damaged image or a wrong key gets a failed
VM with the reason, the plaintext never reaches a file, and no descriptor
or memory is left behind.
"""

import fcntl
import hashlib
import os
import shutil
import tempfile

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from cpushare import imagecrypt
from cpushare.client.seller import imagememory
from cpushare.client.seller.imagecache import ImageCache
from cpushare.client.seller.vmhost import HostedVM, VMHost
from cpushare.imagecrypt import ImageCryptError

SMALL = imagecrypt.MIN_CHUNK
SECRET = b"the buyer's secret job " * 20000


def openFds():
    return set(os.listdir("/proc/self/fd"))


class InlineCache(ImageCache):
    """The image cache, its file work done at once on the caller's thread."""

    def inThread(self, fn, *args):
        return defer.maybeDeferred(fn, *args)


class MemoryCase(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="cpushare-imagememory-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.key = imagecrypt.newKey()
        plain = os.path.join(self.folder, "plain.iso")
        with open(plain, "wb") as f:
            f.write(SECRET)
        self.encrypted = os.path.join(self.folder, "image.enc")
        imagecrypt.encryptFile(plain, self.encrypted, self.key, SMALL)
        os.remove(plain)

    def refused(self, key=None, path=None, **kw):
        before = openFds()
        with self.assertRaises(ImageCryptError) as e:
            imagememory.decryptToMemory(path or self.encrypted, key or self.key, **kw)
        self.assertEqual(openFds(), before, "a descriptor was left open")
        return str(e.exception)


class DecryptTests(MemoryCase):
    def test_the_image_is_in_sealed_read_only_memory_only(self):
        before = set(os.listdir(self.folder))
        fd = imagememory.decryptToMemory(self.encrypted, self.key)
        try:
            self.assertEqual(os.pread(fd, len(SECRET) + 10, 0), SECRET)
            self.assertEqual(os.fstat(fd).st_size, len(SECRET))
            # A memory file no folder names, read-only, and sealed for good.
            self.assertEqual(os.readlink(f"/proc/self/fd/{fd}"), "/memfd:cpushare-image (deleted)")
            self.assertEqual(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE, os.O_RDONLY)
            self.assertEqual(fcntl.fcntl(fd, fcntl.F_GET_SEALS), imagememory.SEALS)
            with self.assertRaises(OSError):
                os.write(fd, b"x")
            writable = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                with self.assertRaises(PermissionError):
                    os.pwrite(writable, b"changed", 0)
                with self.assertRaises(PermissionError):
                    os.ftruncate(writable, 10)
            finally:
                os.close(writable)
        finally:
            os.close(fd)
        self.assertEqual(set(os.listdir(self.folder)), before)

    def test_a_wrong_key_is_refused_with_its_reason(self):
        message = self.refused(imagecrypt.newKey())
        self.assertIn("this key does not open the encrypted image", message)

    def test_a_damaged_image_is_refused_and_nothing_is_kept(self):
        with open(self.encrypted, "r+b") as f:
            f.seek(-100, os.SEEK_END)
            byte = f.read(1)
            f.seek(-100, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0x80]))
        message = self.refused()
        self.assertIn("does not authenticate", message)

    def test_an_image_bigger_than_the_memory_it_may_take_is_refused(self):
        message = self.refused(available=len(SECRET))
        self.assertIn("more than 50% of the 0 MiB available here", message)
        fd = imagememory.decryptToMemory(self.encrypted, self.key, available=3 * len(SECRET))
        os.close(fd)


class FakeSession:
    def __init__(self):
        self.states = []
        self.control = self

    def callRemote(self, command, **kw):
        self.states.append((kw["state"], kw.get("reason")))
        return defer.succeed({})


class HostTests(MemoryCase):
    """The VM host boots an encrypted image in its cache from memory."""

    def setUp(self):
        MemoryCase.setUp(self)
        self.cacheFolder = os.path.join(self.folder, "cache")
        self.cache = InlineCache(MemoryReactorClock(), self.cacheFolder, 10**8)
        with open(self.encrypted, "rb") as f:
            data = f.read()
        self.sha256 = hashlib.sha256(data).hexdigest()
        shutil.move(self.encrypted, self.cache.pathFor(self.sha256))
        self.host = VMHost(MemoryReactorClock(), self.cache, "qemu-system-x86_64",
                           cores=2, memory=2048)
        self.host.session = self.session = FakeSession()
        self.launched = []
        self.patch(HostedVM, "launch", lambda vm, path: self.launch(vm, path, vm.isoFd))

    def launch(self, vm, path, isoFd=None):
        # What QEMU would be handed: read it now, as QEMU would.
        seals = None if isoFd is None else fcntl.fcntl(isoFd, fcntl.F_GET_SEALS)
        data = None if isoFd is None else os.pread(isoFd, len(SECRET) + 1, 0)
        self.launched.append((path, isoFd, seals, data))
        raise RuntimeError("no QEMU in this test")

    def start(self):
        self.host.start(5, self.sha256, len(SECRET), 1, 256, "0a:cb:00:00:00:05")

    def test_the_decrypted_image_goes_to_qemu_from_memory_and_is_let_go(self):
        keys = []

        def imageKey(vm):
            keys.append(vm.id)
            return defer.succeed(self.key)

        self.host.imageKey = imageKey
        before = openFds()
        self.start()
        [(path, isoFd, seals, data)] = self.launched
        self.assertEqual(keys, [5])
        self.assertEqual((seals, data), (imagememory.SEALS, SECRET))
        self.assertEqual(openFds(), before, "the seller kept the decrypted image open")
        # Nothing but the ciphertext in the seller's cache.
        self.assertEqual(os.listdir(self.cacheFolder), [f"{self.sha256}.iso"])
        self.assertTrue(imagecrypt.isEncrypted(path))

    def test_without_a_tpm_or_with_a_wrong_key_the_vm_fails_with_the_reason(self):
        self.start()
        self.assertEqual(self.launched, [])
        self.assertEqual(self.session.states[-1], (
            "failed", "could not start: the image is encrypted, and its key is released only"
            " to a seller with a TPM (--tpm)"))
        self.host.imageKey = lambda vm: defer.succeed(imagecrypt.newKey())
        before = openFds()
        self.start()
        self.assertEqual(self.launched, [])
        self.assertEqual(self.session.states[-1], (
            "failed", "could not start: this key does not open the encrypted image (it is "
            "another image's key, or the image's header is damaged)"))
        self.assertEqual(openFds(), before)


class SpawnTests(MemoryCase):
    def test_qemu_is_handed_the_memory_as_its_cdrom_descriptor(self):
        from cpushare.vm import qemu

        class Reactor(MemoryReactorClock):
            def spawnProcess(self, protocol, executable, args=(), env=None, path=None,
                             uid=None, gid=None, usePTY=False, childFDs=None):
                self.childFDs = childFDs
                return object()

        reactor = Reactor()
        fd = imagememory.decryptToMemory(self.encrypted, self.key)
        try:
            config = qemu.VMConfig(5, 1, 256, "memory", "0a:cb:00:00:00:05")
            qemu.spawn(reactor, config, None, 10, 11, 12, "qemu-system-x86_64", isoFd=fd)
            self.assertEqual(reactor.childFDs[qemu.ISO_FD], fd)
            # Still the caller's to close: the seller closes it once QEMU has its own.
            self.assertEqual(os.pread(fd, 10, 0), SECRET[:10])
        finally:
            os.close(fd)
