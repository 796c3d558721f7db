"""
The buyer's TAP device: the host's own interface on its virtual ethernet.

L{TapPort} opens (creating it if needed) a TAP device, C{cpushare0} by
default, through C{twisted.pair.tuntap} (C{IFF_TAP | IFF_NO_PI}: whole
ethernet frames, no packet-information header), gives it the gateway
address of the buyer's subnet and brings it up.  The host's kernel then
answers ARP and ping for that address, routes to the VMs, and can forward
or NAT them to a LAN (see docs/network.md).

Privileges: creating a TAP device and setting its address need
CAP_NET_ADMIN.  Without it the device can still be used if an
administrator made it persistent for this user beforehand
(C{ip tuntap add dev cpushare0 mode tap user $USER}, and an address with
C{ip addr}); then the address is left as they set it.  Otherwise
L{TapPort.start} raises L{TapUnavailable} with a message saying so, and the
buyer's network carries on with its other ports (the unix socket).

The address and the up flag are set with ioctl(2) on a datagram socket
(SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFFLAGS) rather than by running
C{ip}: each is one quick system call, so the reactor is never held up
waiting for a child process, and nothing outside Python is needed.  The
device is not persistent: it disappears when the port closes its file
descriptor, with the process or in L{TapPort.stop}.
"""

import errno
import fcntl
import ipaddress
import socket
import struct

from twisted.internet.defer import succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger
from twisted.pair.ethernet import IEthernetProtocol
from twisted.pair.tuntap import TuntapPort
from zope.interface import implementer

from cpushare.client.buyer.switch import IPort

DEFAULT_NAME = "cpushare0"
CAP_NET_ADMIN = 12
READ_SIZE = 65536  # bigger than any frame, so an oversized one is read whole and dropped

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_SIOCSIFADDR = 0x8916
_SIOCSIFNETMASK = 0x891C
_IFF_UP = 0x1
_IFREQ_ADDRESS = struct.Struct("=16sH2s4s16x")  # name, sockaddr_in, padding to 40 bytes
_IFREQ_FLAGS = struct.Struct("=16sH22x")


class TapUnavailable(Exception):
    """The TAP device cannot be used; the message tells a user why and what to do."""


def hasNetAdmin(statusPath="/proc/self/status"):
    """True if this process holds CAP_NET_ADMIN in its effective set."""
    try:
        with open(statusPath) as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def configureInterface(name, interface):
    """
    Give the network interface C{name} the address C{interface} (an
    C{ipaddress.IPv4Interface}, address and prefix) and bring it up.
    Raises C{OSError} (EPERM without CAP_NET_ADMIN).
    """
    ifname = name.encode("ascii")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for request, address in (
            (_SIOCSIFADDR, interface.ip),
            (_SIOCSIFNETMASK, interface.network.netmask),
        ):
            fcntl.ioctl(sock, request, _IFREQ_ADDRESS.pack(
                ifname, socket.AF_INET, b"\x00\x00", address.packed))
        result = fcntl.ioctl(sock, _SIOCGIFFLAGS, _IFREQ_FLAGS.pack(ifname, 0))
        flags = _IFREQ_FLAGS.unpack(result)[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ_FLAGS.pack(ifname, flags | _IFF_UP))


def explainOpenError(name, error):
    """Why the TAP device C{name} could not be opened, for a user."""
    code = getattr(error, "errno", None)
    if code in (errno.EPERM, errno.EACCES):
        return (
            f"cannot open TAP device {name}: this needs CAP_NET_ADMIN (run the "
            f"buyer as root or give it the capability), or have an administrator "
            f"create it for you once: ip tuntap add dev {name} mode tap user $USER; "
            f"meanwhile the unix socket still joins local VMs and tools"
        )
    if code == errno.ENOENT:
        return (
            f"cannot open TAP device {name}: /dev/net/tun does not exist (load "
            f"the tun module: modprobe tun)"
        )
    if code == errno.EBUSY:
        return f"TAP device {name} is in use by another process (another cpushare-buyer?)"
    if code == errno.EINVAL:
        return (
            f"cannot open {name} as a TAP device: an interface of that name "
            f"exists and is not a TAP device (choose another name)"
        )
    return f"cannot open TAP device {name}: {error}"


@implementer(IEthernetProtocol)
class _TapFrames(AbstractDatagramProtocol):
    """Hands each frame the kernel writes to the device to the switch."""

    def __init__(self, port):
        self.port = port

    def datagramReceived(self, data, partial=0):
        self.port.switch.frameReceived(self.port, data)

    def addProto(self, num, proto):
        raise NotImplementedError("frames go to the switch, not to protocols")


@implementer(IPort)
class TapPort:
    """
    The TAP device as a port of the buyer's switch.  C{address} is an
    C{ipaddress.IPv4Interface} (or text like C{"10.77.0.1/24"}) to give the
    device, or None to leave its addresses alone.  C{system} is
    C{twisted.pair.tuntap}'s I/O layer, for tests.
    """

    log = Logger()
    allowedSources = None

    def __init__(self, reactor, switch, deviceName=DEFAULT_NAME, address=None, system=None):
        self.reactor = reactor
        self.switch = switch
        self.deviceName = deviceName
        self.address = ipaddress.IPv4Interface(address) if address is not None else None
        self.system = system
        self.name = f"tap {deviceName}"
        self.configured = False
        self._tuntap = None

    def start(self):
        """
        Open the device, give it its address, bring it up and join the
        switch.  Raises L{TapUnavailable} if the device cannot be opened.
        """
        tuntap = TuntapPort(
            self.deviceName.encode("ascii"), _TapFrames(self),
            maxPacketSize=READ_SIZE, reactor=self.reactor, system=self.system,
        )
        self.switch.attach(self)
        try:
            tuntap.startListening()
        except CannotListenError as e:
            self.switch.detach(self)
            raise TapUnavailable(explainOpenError(self.deviceName, e.socketError)) from None
        self._tuntap = tuntap
        self.deviceName = tuntap.interface.split(b"\x00", 1)[0].decode("ascii", "replace")
        self.name = f"tap {self.deviceName}"
        if self.address is not None:
            self._configure()
        self.log.info("TAP device {device} is on the buyer's network{address}",
                      device=self.deviceName,
                      address=f" with address {self.address}" if self.configured else "")

    def _configure(self):
        try:
            configureInterface(self.deviceName, self.address)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EACCES):
                self.stop()
                raise TapUnavailable(
                    f"cannot give TAP device {self.deviceName} the address "
                    f"{self.address}: {e}"
                ) from None
            self.log.warn(
                "TAP device {device} opened, but setting its address {address} "
                "needs CAP_NET_ADMIN; it keeps the address and state its "
                "administrator gave it (ip addr add {address} dev {device}; "
                "ip link set {device} up)",
                device=self.deviceName, address=str(self.address),
            )
        else:
            self.configured = True

    def stop(self):
        """Leave the switch and close the device (which removes it)."""
        self.switch.detach(self)
        tuntap, self._tuntap = self._tuntap, None
        if tuntap is None:
            return succeed(None)
        return tuntap.stopListening()

    def send(self, frame):
        tuntap = self._tuntap
        if tuntap is None:
            return False
        try:
            tuntap.write(frame)
        except OSError:
            # EAGAIN (the kernel's queue is full), EIO (the device is down):
            # dropped, as a switch port would.
            return False
        return True
