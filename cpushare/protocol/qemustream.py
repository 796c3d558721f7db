"""
QEMU's stream netdev framing: each ethernet frame is a 4-byte big-endian
length and then that many bytes.  QEMU speaks it on `-netdev stream` and
`-netdev socket`; the seller speaks it to each VM's NIC socketpair and the
buyer's switch to local QEMUs and tools on its unix socket.
"""

import struct

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

STREAM_HEADER = struct.Struct("!I")
MAX_STREAM_FRAME = 65535


@implementer(IPushProducer)
class QemuStreamProtocol(Protocol):
    """
    Frames in QEMU's stream framing.  Subclasses implement
    C{frameReceived(frame)}; C{sendFrame(frame)} returns False (the frame is
    dropped) while the transport's buffer is full, so at most one transport
    buffer waits for a peer that does not read.  A length above
    L{MAX_STREAM_FRAME} means the peer does not speak this framing: the
    connection is closed.
    """

    log = Logger()
    name = "stream peer"

    writePaused = False
    _buffer = b""

    def connectionMade(self):
        self.transport.registerProducer(self, True)

    def frameReceived(self, frame):
        raise NotImplementedError

    def dataReceived(self, data):
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        offset, end = 0, len(data)
        unpack = STREAM_HEADER.unpack_from
        while end - offset >= 4:
            (length,) = unpack(data, offset)
            if length > MAX_STREAM_FRAME:
                self.log.warn(
                    "{name} sent a frame length of {length} bytes (the limit is "
                    "{limit}): not QEMU stream framing; closing it",
                    name=self.name, length=length, limit=MAX_STREAM_FRAME,
                )
                self.transport.abortConnection()
                return
            start = offset + 4
            if end - start < length:
                break
            offset = start + length
            self.frameReceived(data[start:offset])
            if self.transport is None or self.transport.disconnecting:
                return
        if offset < end:
            self._buffer = data[offset:]

    def sendFrame(self, frame):
        if self.writePaused:
            return False
        self.transport.writeSequence([STREAM_HEADER.pack(len(frame)), frame])
        return True

    def connectionLost(self, reason):
        self.writePaused = True

    # IPushProducer: the transport's word on our writes.

    def pauseProducing(self):
        self.writePaused = True

    def resumeProducing(self):
        self.writePaused = False

    def stopProducing(self):
        self.writePaused = True
