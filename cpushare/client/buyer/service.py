"""
twistd cpushare-buyer: the buyer's end of the market, and the switch of
the buyer's virtual ethernet.

    twistd -n cpushare-buyer --home H [--tap cpushare0] [--socket PATH]

Keeps one outbound connection to the market and reconnects by itself when
it drops.  Each VM the market runs for this buyer becomes a port of the
buyer's switch; the switch also joins a TAP device (when the process has
CAP_NET_ADMIN) and a unix socket in QEMU's stream framing, and runs the
DHCP server that gives VMs their addresses (reported to the market, so
`cpushare vms` shows them).  See docs/network.md.  The VMs' results are
saved under HOME/results (L{cpushare.client.buyer.results}), and compared
with the buyer's own command when the market asks
(L{cpushare.client.buyer.comparator}).
"""

from twisted.logger import Logger
from twisted.python import usage

from cpushare.client.options import ClientOptions
from cpushare.client.session import ClientControl, ClientSession
from cpushare.protocol import commands
from cpushare.protocol.commands import nicChannel

log = Logger()


class Options(ClientOptions):
    synopsis = "[--home H] [--tap NAME|none] [--socket PATH|none] [--subnet CIDR]"
    longdesc = "Run VMs on the CPUShare market and join them to your virtual ethernet."
    optParameters = [
        ["tap", None, "cpushare0", "TAP device joining this host to the VMs' network, or none."],
        ["socket", None, None,
         "Unix socket (QEMU stream framing) for local VMs and tools, or none "
         "(default: HOME/network.sock)."],
        ["subnet", None, "10.77.0.0/24",
         "The VMs' IPv4 subnet: the TAP gets .1, the DHCP server .2, VMs .100 and up."],
    ]
    optFlags = [
        ["no-dhcp", None, "Do not run the DHCP server (the TAP is bridged to a LAN that has one)."],
    ]

    def postOptions(self):
        ClientOptions.postOptions(self)
        if self["tap"] == "none":
            self["tap"] = None
        if self["socket"] == "none":
            self["socket"] = None
        elif self["socket"] is None:
            self["socket"] = self.home.file("network.sock")
        from cpushare.client.buyer.dhcp import Subnet
        try:
            self.subnet = Subnet(self["subnet"])
        except ValueError as e:
            raise usage.UsageError(f"--subnet {self['subnet']}: {e}")


def _badPort(vm, mac):
    """Why the market's PortAttached cannot be a port of this switch, or None."""
    from cpushare.client.buyer.frames import macFromString
    from cpushare.protocol.mux import MAX_CHANNEL
    if not 1 <= vm or commands.consoleChannel(vm) > MAX_CHANNEL:
        return f"VM {vm} has no channel (VM ids are 1 to {(MAX_CHANNEL - 1) // 2})"
    try:
        macFromString(mac)
    except ValueError as e:
        return str(e)
    return None


class BuyerControl(ClientControl):
    @commands.PortAttached.responder
    def portAttached(self, vm, mac):
        # The market is trusted no more than any peer: a port it names that
        # cannot be one is left out (PortAttached has no answer to refuse with).
        bad = _badPort(vm, mac)
        if bad is not None:
            self.badInput(f"PortAttached: {bad}")
            return {}
        self.session.buyer.attach(self.session, vm, mac)
        return {}

    @commands.PortDetached.responder
    def portDetached(self, vm, reason):
        self.session.buyer.detach(self.session, vm, reason)
        return {}

    @commands.ResultChunk.responder
    def resultChunk(self, vm, offset, data, order=None):
        results = self.session.buyer.results
        if results is None:
            raise commands.BadRequest("this buyer program saves no results")
        return results.chunk(order, vm, offset, data).addCallback(lambda _: {})

    @commands.ResultReady.responder
    def resultReady(self, vm, sha256, size, order=None):
        results = self.session.buyer.results
        if results is not None:
            results.ready(order, vm, sha256, size)
        return {}

    @commands.CompareResults.responder
    def compareResults(self, order, a, b):
        comparisons = self.session.buyer.comparisons
        if comparisons is None:
            raise commands.BadRequest("this buyer program compares no results")
        return comparisons.compare(order, a, b)


class BuyerSession(ClientSession):
    controlClass = BuyerControl

    def __init__(self, reactor, role, hello=True, buyer=None):
        ClientSession.__init__(self, reactor, role, hello)
        self.buyer = buyer


class Buyer:
    """Glue between the market session and the buyer's network."""

    def __init__(self, network, results=None, comparisons=None):
        self.network = network
        self.results = results
        self.comparisons = comparisons
        self.session = None
        self.macs = {}  # vm -> MAC text
        if network.dhcp is not None:
            network.dhcp.leaseGranted = self.leaseGranted

    def connected(self, session):
        self.session = session
        session.whenLost().addCallback(self.lost)

    def lost(self, session):
        for vm in list(self.macs):
            self.network.removeVM(session, nicChannel(vm))
        self.macs.clear()
        if self.session is session:
            self.session = None

    def attach(self, session, vm, mac):
        from cpushare.client.buyer.frames import macFromString
        self.macs[vm] = mac
        self.network.addVM(session, nicChannel(vm), mac=macFromString(mac), name=f"vm {vm}")
        log.info("VM {vm} ({mac}) joined the network", vm=vm, mac=mac)
        ip = self.network.addressOf(mac)
        if ip is not None:
            self.report(vm, ip)

    def detach(self, session, vm, reason):
        self.macs.pop(vm, None)
        self.network.removeVM(session, nicChannel(vm))
        log.info("VM {vm} left the network: {reason}", vm=vm, reason=reason)

    def leaseGranted(self, mac, ip):
        for vm, vmMac in self.macs.items():
            if vmMac == mac:
                self.report(vm, ip)

    def report(self, vm, ip):
        if self.session is not None:
            d = self.session.control.callRemote(commands.VMAddress, vm=vm, ip=ip)
            d.addErrback(lambda f: log.warn("reporting VM {vm}'s address: {why}",
                                            vm=vm, why=f.getErrorMessage()))


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from twisted.application.service import MultiService

    from cpushare.client.buyer.network import BuyerNetwork
    from cpushare.client.service import MarketConnection
    from cpushare.client.session import homeEndpoint

    network = BuyerNetwork(reactor, subnet=options.subnet, tapName=options["tap"],
                           socketPath=options["socket"], dhcp=not options["no-dhcp"])
    from cpushare.client.buyer.comparator import Comparisons
    from cpushare.client.buyer.results import ResultFiles
    results = ResultFiles(reactor, options.home.path)
    buyer = Buyer(network, results, Comparisons(reactor, options.home.path, results=results))
    service = MultiService()
    network.setServiceParent(service)
    MarketConnection(
        reactor, homeEndpoint(reactor, options.home), "buyer",
        onSession=buyer.connected, sessionClass=BuyerSession, sessionKw={"buyer": buyer},
        where=f"{options.host}:{options.port}",
    ).setServiceParent(service)
    return service
