"""
An encrypted image booted for real by the seller's VM host: the reference
livecd with a job, encrypted as `cpushare image upload --encrypt` does,
lies in the seller's cache as ciphertext; the VM host decrypts it into
sealed memory (the key given as the TPM would unwrap it) and QEMU, as the
seller starts it (unprivileged, sandboxed), boots from that memory and
runs the job.  No file in the seller's folders holds any block of the
plain image.
"""

import hashlib
import os
import pwd
import shutil

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from cpushare import imagecrypt
from cpushare.client.seller.imagecache import ImageCache
from cpushare.client.seller.vmhost import VMHost
from cpushare.protocol import commands
from cpushare.protocol.commands import consoleChannel
from test.vm.test_market_vms import VM_USER, buildJobISO

QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT = 180.0
BLOCK = 4096
VM = 7
MEMFD = "/memfd:cpushare-image (deleted)"

pytestmark = pytest.mark.slow


class MarketStandIn:
    """The market connection as the VM host uses it: the console kept, the rest dropped."""

    def __init__(self):
        self.console = bytearray()
        self.states = []
        self.control = self

    def sendFrame(self, channel, data):
        if channel == consoleChannel(VM):
            self.console += data
        return True

    def route(self, channel, handler):
        pass

    def unroute(self, channel):
        pass

    def callRemote(self, command, **kw):
        if command is commands.VMState:
            self.states.append((kw["state"], kw.get("reason")))
        return defer.succeed({})


def fdLinks(folder):
    """What the open descriptors listed in C{folder} (/proc/PID/fd) are."""
    links = []
    for fd in os.listdir(folder):
        try:
            links.append(os.readlink(os.path.join(folder, fd)))
        except FileNotFoundError:
            pass    # closed meanwhile
    return links


def plainBlocks(path):
    """The digests of the ISO's 4 KiB blocks that are not all zeros."""
    zero = bytes(BLOCK)
    found = set()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            if block.rstrip(b"\0"):
                found.add(hashlib.sha256(block.ljust(BLOCK, b"\0")).digest())
    found.discard(hashlib.sha256(zero).digest())
    return found


def leaks(folder, blocks):
    """Files under C{folder} holding one of C{blocks} (at a 4 KiB boundary)."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(BLOCK), b""):
                    if hashlib.sha256(block.ljust(BLOCK, b"\0")).digest() in blocks:
                        found.append(path)
                        break
    return found


class EncryptedBootTests(unittest.TestCase):
    timeout = BOOT_TIMEOUT + 120

    @defer.inlineCallbacks
    def test_the_seller_boots_an_encrypted_livecd_from_memory(self):
        base = self.mktemp()
        buyer, seller = os.path.join(base, "buyer"), os.path.join(base, "seller")
        os.makedirs(buyer)
        os.makedirs(seller, mode=0o700)
        token = os.urandom(8).hex()
        from pathlib import Path
        plain = str(buildJobISO(Path(buyer), f"#!/bin/sh\necho encrypted job says {token}\n"))
        key = imagecrypt.newKey()
        encrypted = os.path.join(buyer, "job.iso.enc")
        imagecrypt.encryptFile(plain, encrypted, key)
        with open(encrypted, "rb") as f:
            sha256 = hashlib.sha256(f.read()).hexdigest()
        cache = ImageCache(reactor, os.path.join(seller, "images"), 2 * 1024**3)
        shutil.copy(encrypted, cache.pathFor(sha256))

        user = VM_USER if os.getuid() == 0 else None
        host = VMHost(reactor, cache, QEMU, user=user, cores=1, memory=512)
        market = host.session = MarketStandIn()
        released = []

        def imageKey(vm):
            released.append(vm.id)
            return defer.succeed(key)

        host.imageKey = imageKey
        host.startService()
        try:
            host.start(VM, sha256, os.path.getsize(encrypted), 1, 256, "0a:cb:00:00:00:07")
            line = f"encrypted job says {token}".encode()
            for _ in range(int(BOOT_TIMEOUT * 4)):
                if line in market.console or VM not in host.vms:
                    break
                yield task.deferLater(reactor, 0.25, lambda: None)
            self.assertIn(line, bytes(market.console),
                          f"states {market.states}; console:\n"
                          f"{bytes(market.console[-3000:]).decode('utf-8', 'replace')}")
            self.assertEqual(released, [VM])
            # QEMU reads its cdrom from the sealed memory file, as an unprivileged user.
            pid = host.vms[VM].transport.pid
            theirs = fdLinks(f"/proc/{pid}/fd")
            self.assertIn(MEMFD, theirs)
            self.assertFalse([link for link in theirs if link.startswith(seller)], theirs)
            if user is not None:
                self.assertEqual(os.stat(f"/proc/{pid}").st_uid, pwd.getpwnam(user).pw_uid)
            # The seller keeps no descriptor of it: QEMU holds the only one.
            self.assertNotIn(MEMFD, fdLinks("/proc/self/fd"))
        finally:
            yield host.stopService()
        # No plaintext in any file of the seller's: only the ciphertext in its cache.
        self.assertEqual(leaks(seller, plainBlocks(plain)), [])
        self.assertEqual(os.listdir(cache.folder), [f"{sha256}.iso"])
