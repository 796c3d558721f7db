"""
The results of the buyer's VMs, saved where the buyer finds them:
HOME/results/ORDER/VM.result (L{resultPath}).

The market relays each VM's result from its seller in order, a chunk at a
time (ResultChunk); the bytes go to VM.result.part, written on a thread so
the reactor never waits for the disk.  When the seller reports the result
whole (ResultReady, passed on by the market), the file is hashed and, when
its size and sha256 are the ones reported, renamed VM.result; else it is
kept as .part and the mismatch logged.  The folder and file names are made
of the integers the market sends, never of its text.
"""

import hashlib
import os

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from cpushare.client.home import resultPath
from cpushare.protocol.commands import BadRequest, RESULT_MAX


class ResultFiles:
    """The results being saved under C{home}, one file a VM."""

    log = Logger()

    def __init__(self, reactor, home):
        self.reactor = reactor
        self.home = home
        self.written = {}   # (order, vm) -> bytes written to its .part
        self.checking = {}  # (order, vm) -> Deferreds waiting for its check to end

    def _inThread(self, fn, *args):
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    def chunk(self, order, vm, offset, data):
        """Append C{data} at C{offset} of VM C{vm}'s result; a Deferred fired once written."""
        if order is None or order < 1 or vm < 1:
            return defer.fail(BadRequest(f"ResultChunk: no order or VM for VM {vm}'s result"))
        key = (order, vm)
        written = self.written.get(key, 0)
        if offset != written:
            # A new result of the VM (its seller started it again) starts over.
            if offset != 0:
                return defer.fail(BadRequest(
                    f"ResultChunk: VM {vm}'s result is at {written} bytes, not {offset}"))
        if offset + len(data) > RESULT_MAX:
            return defer.fail(BadRequest(f"ResultChunk: VM {vm}'s result is over {RESULT_MAX}"
                                         " bytes"))
        self.written[key] = offset + len(data)
        path = resultPath(self.home, order, vm) + ".part"
        return self._inThread(_write, path, offset, data)

    def ready(self, order, vm, sha256, size):
        """The whole result was sent: check it and give it its name; a Deferred of the path or None."""
        if order is None or self.written.pop((order, vm), None) is None and size:
            self.log.warn("VM {vm}'s result ({size} bytes) did not reach this program",
                          vm=vm, size=size)
            return defer.succeed(None)
        path = resultPath(self.home, order, vm)
        key = (order, vm)
        self.checking.setdefault(key, [])
        d = self._inThread(_finish, path, sha256, size)

        def over(outcome):
            for waiting in self.checking.pop(key, ()):
                waiting.callback(None)
            return outcome

        def done(saved):
            if saved:
                self.log.info("VM {vm}'s result saved in {path}", vm=vm, path=path)
                return path
            self.log.warn("VM {vm}'s result in {path}.part is not the {size} bytes of sha256"
                          " {sha256} its seller reported", vm=vm, path=path, size=size,
                          sha256=sha256)
            return None

        return d.addBoth(over).addCallback(done)

    def checked(self, order, vm):
        """A Deferred fired once VM C{vm}'s result, when being checked, is saved or refused."""
        if (order, vm) not in self.checking:
            return defer.succeed(None)
        waiting = defer.Deferred()
        self.checking[(order, vm)].append(waiting)
        return waiting


def _write(path, offset, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "r+b" if offset else "wb") as f:
        f.seek(offset)
        f.write(data)
        f.truncate()


def _finish(path, sha256, size):
    part = path + ".part"
    if not os.path.exists(part):
        if size:
            return False
        _write(part, 0, b"")
    digest = hashlib.sha256()
    with open(part, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if os.path.getsize(part) != size or digest.hexdigest() != sha256:
        return False
    os.replace(part, path)
    return True
