"""
The buyer's virtual ethernet, assembled: a L{Switch} with the DHCP server,
the TAP device (where the process may have one), a unix socket in QEMU's
stream framing, and one L{ChannelPort} per VM NIC.

The buyer service owns one L{BuyerNetwork}; it calls L{BuyerNetwork.addVM}
when the market links a VM's channel and L{BuyerNetwork.removeVM} when it
goes.  L{BuyerNetwork.addressOf} answers "which IP did this VM get?".
"""

from twisted.application.service import Service
from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.logger import Logger

from cpushare.client.buyer.dhcp import DHCPServer, Subnet
from cpushare.client.buyer.ports import ChannelPort, listenUNIX
from cpushare.client.buyer.switch import MAX_FRAME_SIZE, Switch
from cpushare.client.buyer.tapdevice import DEFAULT_NAME, TapPort, TapUnavailable


class BuyerNetwork(Service):
    """
    C{tapName} None runs without a TAP device; C{socketPath} None without
    the unix socket; C{dhcp} False without the DHCP server (when the TAP
    is bridged to a LAN that has its own).  C{router} True announces the gateway (the TAP's
    address) as the VMs' default route, an address announces that one,
    None announces no router.
    """

    log = Logger()

    def __init__(self, reactor, subnet=None, tapName=DEFAULT_NAME, socketPath=None,
                 maxFrameSize=MAX_FRAME_SIZE, dhcp=True, router=True, dnsServers=(),
                 domain=None):
        self.reactor = reactor
        self.subnet = subnet if subnet is not None else Subnet()
        self.tapName = tapName
        self.socketPath = socketPath
        self.switch = Switch(reactor, maxFrameSize=maxFrameSize)
        if router is True:
            router = self.subnet.gateway
        self.dhcp = DHCPServer(reactor, self.switch, self.subnet, router=router,
                               dnsServers=dnsServers, domain=domain) if dhcp else None
        self.tap = None
        self.tapProblem = None
        self.listeningPort = None
        self.vms = {}  # (session, channel) -> ChannelPort

    def startService(self):
        Service.startService(self)
        if self.dhcp is not None:
            self.dhcp.start()
        if self.tapName:
            tap = TapPort(self.reactor, self.switch, self.tapName,
                          address=self.subnet.gatewayInterface)
            try:
                tap.start()
            except TapUnavailable as e:
                self.tapProblem = str(e)
                self.log.warn("running without a TAP device: {problem}", problem=str(e))
            else:
                self.tap = tap
        if self.socketPath:
            self.listeningPort = listenUNIX(self.reactor, self.switch, self.socketPath)
            self.log.info("local VMs and tools join the buyer's network at {path}",
                          path=self.socketPath)

    def stopService(self):
        Service.stopService(self)
        stopping = []
        for port in list(self.vms.values()):
            port.stop()
        self.vms.clear()
        if self.listeningPort is not None:
            stopping.append(maybeDeferred(self.listeningPort.stopListening))
            self.listeningPort = None
        if self.tap is not None:
            stopping.append(self.tap.stop())
            self.tap = None
        if self.dhcp is not None:
            self.dhcp.stop()
        return DeferredList(stopping)

    def addVM(self, session, channel, mac=None, name=None):
        """Join the VM NIC on C{channel} of C{session}; C{mac} is its assigned MAC (6 bytes)."""
        key = (session, channel)
        if key in self.vms:
            self.vms.pop(key).stop()
        port = ChannelPort(self.switch, session, channel, mac=mac, name=name)
        port.start()
        self.vms[key] = port
        return port

    def removeVM(self, session, channel):
        port = self.vms.pop((session, channel), None)
        if port is not None:
            port.stop()

    def addressOf(self, mac):
        """The IPv4 address (text) the DHCP server leased to C{mac}, or None."""
        lease = self.dhcp.leaseFor(mac) if self.dhcp is not None else None
        return str(lease.ip) if lease is not None else None

    def status(self):
        """The network now, as plain data: ports with their counters, and leases."""
        return {
            "subnet": str(self.subnet.network),
            "tap": self.tap.deviceName if self.tap is not None else None,
            "tap_problem": self.tapProblem,
            "socket": self.socketPath,
            "ports": [dict(name=port.name, **counters.asDict())
                      for port, counters in self.switch.ports.items()],
            "leases": ([lease.asDict() for lease in self.dhcp.boundLeases()]
                       if self.dhcp is not None else []),
            "dhcp": self.dhcp.counters.asDict() if self.dhcp is not None else None,
        }
