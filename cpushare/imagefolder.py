"""
A folder of ISO images named by sha256, with a thread of its own for the
file work (writing, hashing, reading chunks): the market's image store and
the seller's image cache are both one.
"""

import hashlib
import os

from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


READ = 1024 * 1024


def hashFile(path):
    """(sha256 hex, size) of a file; blocking: call it on a thread."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ), b""):
            h.update(block)
    return h.hexdigest(), os.path.getsize(path)


class ImageFolder:
    def __init__(self, reactor, folder, poolName):
        self.reactor = reactor
        self.folder = folder
        self.pool = ThreadPool(1, 1, name=poolName)

    def start(self):
        self.pool.start()

    def stop(self):
        self.pool.stop()

    def inThread(self, fn, *args):
        """Run C{fn(*args)} on this folder's thread; one at a time, in order."""
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    def pathFor(self, sha256):
        return os.path.join(self.folder, sha256 + ".iso")
