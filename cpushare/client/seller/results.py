"""
A VM's result: what its guest writes to the virtio-serial port
org.cpushare.result (L{cpushare.vm.qemu.RESULT_PORT}), read by the seller
from its end of the port's socketpair.

The guest frames one result as a header line, then the bytes:

    CPUSHARE-RESULT <size>\\n        (ASCII, size in decimal, no leading zero)
    <size> bytes

(the reference livecd's `cpushare-result FILE` writes exactly that).  The
bytes are hashed (sha256) as they arrive, never kept whole, and the VM's
result is complete when C{size} bytes have come.  What goes wrong is a
failed result, one of the L{ResultFailed} kinds: a size above the cap
(TOO_BIG, said as soon as the header says it), a header that is not one
(BAD_FRAMING), or a VM that ends before its bytes do (UNFINISHED).  A VM
writes one result: bytes after it are dropped and counted.

The bytes also go on to the buyer's program through C{forward(offset,
data)} (ResultChunk to the market), at most FORWARD_CHUNK at a time, one
chunk in flight: the port is read no further while a chunk waits, so the
guest writes no faster than the buyer takes its result, and the seller
holds at most what one read brought.  When forwarding fails (no buyer
program, say), the rest is only hashed.  The result is complete, and
told, once its last chunk was answered.
"""

import hashlib
import re

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from cpushare.protocol.arguments import show
from cpushare.protocol.commands import IMAGE_CHUNK, RESULT_MAX

HEADER = re.compile(rb"CPUSHARE-RESULT (0|[1-9][0-9]{0,18})\n\Z")
# The longest header line: "CPUSHARE-RESULT " and 19 digits and the newline.
HEADER_MAX = 36

TOO_BIG = "too big"
BAD_FRAMING = "bad framing"
UNFINISHED = "unfinished"
FORWARD_CHUNK = IMAGE_CHUNK


class ResultFailed(Exception):
    """A VM's result that will not be reported: C{kind} is one of the names above."""

    def __init__(self, kind, detail):
        Exception.__init__(self, f"{kind}: {detail}")
        self.kind = kind


class ResultPort(Protocol):
    """
    The seller's end of one VM's result port.  Once the result is
    complete, C{onResult(sha256, size)}; once it fails, C{onFailure(
    ResultFailed)}; never both, each at most once.  C{cap} is the most
    bytes a result may hold.
    """

    log = Logger()

    def __init__(self, vmId, onResult, onFailure, cap=RESULT_MAX, forward=None):
        self.vmId = vmId
        self.forward = forward
        self.unsent = []        # (offset, bytes) waiting to be forwarded
        self.sending = False
        self.closed = False     # the port's connection ended (QEMU's end closed)
        self.doneWaiters = []
        self.onResult = onResult
        self.onFailure = onFailure
        self.cap = cap
        self.header = b""
        self.size = None
        self.received = 0
        self.digest = hashlib.sha256()
        self.result = None      # (sha256, size) once complete
        self.failure = None     # a ResultFailed once failed
        self.dropped = 0        # bytes after the result, or after a failure

    @property
    def over(self):
        return self.result is not None or self.failure is not None

    def dataReceived(self, data):
        if self.over:
            self.dropped += len(data)
            return
        if self.size is None:
            data = self._readHeader(data)
            if data is None:
                return
        wanted = self.size - self.received
        body, extra = data[:wanted], data[wanted:]
        self.digest.update(body)
        if self.forward is not None:
            for i in range(0, len(body), FORWARD_CHUNK):
                self.unsent.append((self.received + i, body[i:i + FORWARD_CHUNK]))
        self.received += len(body)
        self.dropped += len(extra)
        self._send()

    def _send(self):
        """Forward the next chunk, or tell the result once all are."""
        if self.sending or self.over:
            return
        if self.unsent and self.forward is not None:
            offset, data = self.unsent.pop(0)
            self.sending = True
            if self.transport is not None:
                self.transport.pauseProducing()
            d = self.forward(offset, data)
            d.addErrback(self._notForwarded)
            d.addBoth(self._sent)
            return
        del self.unsent[:]
        if self.size is not None and self.received == self.size:
            self.result = (self.digest.hexdigest(), self.size)
            self.log.info("VM {vm} wrote its result: {size} bytes, sha256 {sha256}",
                          vm=self.vmId, size=self.size, sha256=self.result[0])
            self.onResult(*self.result)

    def connectionLost(self, reason=None):
        self.closed = True
        self._checkDone()

    def whenDone(self):
        """A Deferred fired once the port is closed and nothing waits to be forwarded."""
        d = defer.Deferred()
        self.doneWaiters.append(d)
        self._checkDone()
        return d

    def _checkDone(self):
        if self.closed and not self.sending and (not self.unsent or self.forward is None):
            waiters, self.doneWaiters = self.doneWaiters, []
            for d in waiters:
                d.callback(None)

    def abandon(self):
        """Wait no more: read and forward nothing more (a VM's end cannot wait for ever)."""
        self.forward = None
        self.sending = False
        del self.unsent[:]
        if self.transport is not None:
            self.transport.loseConnection()
        self.connectionLost()

    def _notForwarded(self, failure):
        self.log.warn("VM {vm}'s result is not passed on to the buyer: {why}", vm=self.vmId,
                      why=failure.getErrorMessage())
        self.forward = None

    def _sent(self, _):
        if not self.sending:
            return      # abandoned meanwhile
        self.sending = False
        if self.transport is not None and not self.over:
            self.transport.resumeProducing()
        self._send()
        self._checkDone()

    def _readHeader(self, data):
        """The bytes after a complete header, or None (waiting for more, or failed)."""
        self.header += data
        end = self.header.find(b"\n", 0, HEADER_MAX)
        if end < 0:
            if len(self.header) >= HEADER_MAX:
                self._fail(BAD_FRAMING, "no CPUSHARE-RESULT header line in its first"
                                        f" {HEADER_MAX} bytes: {show(self.header)!r}")
            return None
        line, rest = self.header[:end + 1], self.header[end + 1:]
        self.header = b""
        match = HEADER.match(line)
        if match is None:
            self._fail(BAD_FRAMING, f"{show(line)!r} is not a CPUSHARE-RESULT header line")
            return None
        size = int(match.group(1))
        if size > self.cap:
            self._fail(TOO_BIG, f"{size} bytes, more than the cap of {self.cap}")
            return None
        self.size = size
        return rest

    def vmEnded(self):
        """The VM ended and its port was read to the end: a result begun and not complete is a failure."""
        if self.over:
            return
        if self.size is not None or self.header:
            wanted = "?" if self.size is None else self.size
            self._fail(UNFINISHED, f"the VM ended after {self.received} of {wanted} bytes")

    def _fail(self, kind, detail):
        self.failure = ResultFailed(kind, detail)
        self.log.warn("VM {vm}'s result is refused: {why}", vm=self.vmId, why=str(self.failure))
        if self.transport is not None:
            # Read nothing more of it.
            self.transport.loseConnection()
        self.onFailure(self.failure)
