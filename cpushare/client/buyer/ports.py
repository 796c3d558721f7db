"""
Ports of the buyer's switch that carry frames over a connection:

- L{ChannelPort}: a VM's NIC, one channel of the market connection (the
  frames come from the VM through the seller client and the server's
  relay);
- L{StreamPort}: one client of a stream socket speaking QEMU's stream
  netdev framing, so that a local QEMU or a tool joins the buyer's network
  without privileges.  L{StreamPortFactory} makes one port per connection;
  L{listenUNIX} listens on a unix socket.

QEMU's stream framing (its C{-netdev stream} and C{-netdev socket}
backends) is a 4-byte big-endian length and then that many bytes of
ethernet frame, repeated.  A local QEMU joins with::

    qemu-system-x86_64 ... -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56 \\
        -netdev stream,id=n0,server=off,addr.type=unix,addr.path=PATH
"""

from twisted.internet.protocol import Factory
from zope.interface import implementer

from cpushare.client.buyer.switch import IPort
from cpushare.protocol.qemustream import QemuStreamProtocol

SOCKET_MODE = 0o600


@implementer(IPort)
class ChannelPort:
    """
    A VM's NIC on the buyer's switch: frames on channel C{channel} of the
    market connection C{session}.  C{mac} is the MAC the VM was given; when
    set, the VM may send only from it (spoofed frames are dropped and
    counted by the switch).
    """

    def __init__(self, switch, session, channel, mac=None, name=None):
        self.switch = switch
        self.session = session
        self.channel = channel
        self.allowedSources = frozenset([mac]) if mac is not None else None
        self.name = name or f"vm channel {channel}"

    def start(self):
        self.switch.attach(self)
        self.session.route(self.channel, self._frameReceived)

    def stop(self):
        self.session.unroute(self.channel, self._frameReceived)
        self.switch.detach(self)

    def _frameReceived(self, payload):
        self.switch.frameReceived(self, payload)

    def send(self, frame):
        return self.session.sendFrame(self.channel, frame)


@implementer(IPort)
class StreamPort(QemuStreamProtocol):
    """
    One connection in QEMU's stream framing, as a port of the switch.

    Outbound frames are dropped (and counted by the switch) while the
    transport's write buffer is full, so at most one transport buffer
    (64 KiB) waits for a client that stops reading.  Inbound frames are
    forwarded as soon as they are complete.  A length above
    L{MAX_STREAM_FRAME} closes the connection.
    """

    allowedSources = None

    def __init__(self, switch, name):
        self.switch = switch
        self.name = name

    def connectionMade(self):
        QemuStreamProtocol.connectionMade(self)
        self.switch.attach(self)

    def connectionLost(self, reason):
        self.switch.detach(self)
        QemuStreamProtocol.connectionLost(self, reason)

    def frameReceived(self, frame):
        self.switch.frameReceived(self, frame)

    def send(self, frame):
        return self.sendFrame(frame)


class StreamPortFactory(Factory):
    """Each connection becomes a L{StreamPort} of C{switch}."""

    noisy = False

    def __init__(self, switch, label="stream client"):
        self.switch = switch
        self.label = label
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        return StreamPort(self.switch, f"{self.label} {self.connections}")


def listenUNIX(reactor, switch, path, mode=SOCKET_MODE):
    """
    Listen on the unix socket C{path} for QEMU stream clients.  The socket
    is made only for its owner (mode 0600 by default: whoever can connect
    is on the buyer's network).  A stale socket left by a dead process is
    replaced; a live one makes this fail with C{CannotListenError}.
    """
    return reactor.listenUNIX(
        path, StreamPortFactory(switch, "unix client"), mode=mode, wantPID=True
    )
