"""
twistd cpushare-seller: rent out this computer's idle CPU time.

    twistd -n cpushare-seller --home H --cores N --memory MB

Keeps one outbound connection to the market (no inbound port), announces
the capacity on offer, boots the VMs the market places here in sandboxed
QEMU, and reconnects by itself when the connection drops (its VMs keep
running meanwhile, for --grace seconds).
"""

import os
import shutil

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python import usage

from cpushare.client import marketchecks
from cpushare.client.options import ClientOptions
from cpushare.client.seller import trusted
from cpushare.client.session import ClientControl, ClientSession
from cpushare.protocol import commands
from cpushare.money import formatAmount

log = Logger()

DEFAULT_VM_USER = "cpushare-vm"


def physicalMemoryMB():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


class Options(ClientOptions):
    synopsis = ("[--home H] [--cores N] [--memory MB] [--cache-size MB] [--price P]"
                " [--net-fee F] [--country CC] [--tpm DEVICE [--trusted-price P]]")
    longdesc = "Sell this computer's idle CPU time on the CPUShare market."
    optParameters = [
        ["cores", None, None, "Cores to offer (default: all of them).", int],
        ["memory", None, None, "Memory to offer in MB (default: half of this computer's).", int],
        ["cache-size", None, 10240, "MB of disk for cached buyer images.", int],
        ["cache", None, None, "Folder for cached images (default: HOME/images).", str],
        ["vm-user", None, DEFAULT_VM_USER,
         "When run as root: the unprivileged user QEMU runs as."],
        ["qemu", None, None, "The qemu-system-x86_64 program (default: found on PATH)."],
        ["accel", None, "auto",
         "auto (KVM if a probe guest proves it works), kvm (always) or tcg."],
        ["grace", None, 600.0,
         "Seconds to keep VMs running while the market is unreachable.", float],
        ["price", None, None,
         "Asking price a core-hour, like 0.02 (default: the terms stored for this "
         "account, else the market's default; change it while running with "
         "'cpushare terms --price').", str],
        ["net-fee", None, None, "Fee a GB of network traffic (default 0).", str],
        ["country", None, None, "The country this computer is in (ISO code, like IT).", str],
        ["result-max", None, 64,
         "MB a VM's result may hold at most (1 to 64: the market takes no larger one).", int],
        ["tpm", None, None,
         "Sell trusted leases: this computer's TPM, like /dev/tpmrm0 (or an swtpm socket,"
         " swtpm:host=127.0.0.1,port=N); the market attests it before and during each.", str],
        ["trusted-price", None, None,
         "Asking price a core-hour of trusted leases (with --tpm; default: the price).", str],
        ["tpm-event-log", None, None,
         "With --tpm: the TCG event log of the TPM's boot chain (default: the kernel's,"
         " for a device; a software TPM has none unless its tests write one).", str],
        ["udp-port", None, None,
         "The UDP port this seller opened for direct paths between sellers' VMs (default:"
         " an ephemeral port, for hole punching only).", int],
    ]

    def postOptions(self):
        ClientOptions.postOptions(self)
        if self["cores"] is None:
            self["cores"] = os.cpu_count() or 1
        if self["memory"] is None:
            self["memory"] = physicalMemoryMB() // 2
        if self["cores"] < 1:
            raise usage.UsageError("--cores must be at least 1")
        if self["memory"] < 64:
            raise usage.UsageError("--memory must be at least 64 (MB)")
        if self["cache-size"] < 1:
            raise usage.UsageError("--cache-size must be at least 1 (MB)")
        if self["udp-port"] is not None and not 0 <= self["udp-port"] <= 65535:
            raise usage.UsageError("--udp-port must be 0 (ephemeral) to 65535")
        if not 1 <= self["result-max"] <= 64:
            raise usage.UsageError("--result-max must be 1 to 64 (MB)")
        from cpushare.money import MAX_PRICE, BadAmount, parseAmount
        terms = {}
        if self["trusted-price"] is not None and self["tpm"] is None:
            raise usage.UsageError("--trusted-price is the price of trusted leases: give --tpm"
                                   " too")
        if self["tpm-event-log"] is not None and self["tpm"] is None:
            raise usage.UsageError("--tpm-event-log is the log of a TPM's boot chain: give --tpm"
                                   " too")
        if self["tpm"] is not None:
            from cpushare.attest import libraryMissing
            missing = libraryMissing()
            if missing:
                raise usage.UsageError(f"--tpm: {missing}")
        for key, option in (("price", "price"), ("net_fee", "net-fee"),
                            ("trusted_price", "trusted-price")):
            if self[option] is not None:
                try:
                    terms[key] = parseAmount(self[option], maximum=MAX_PRICE,
                                             allowZero=key == "net_fee")
                except BadAmount as e:
                    raise usage.UsageError(f"--{option}: {e}")
        if self["country"] is not None:
            code = self["country"].strip().upper()
            if len(code) != 2 or not code.isalpha():
                raise usage.UsageError(
                    f"--country {self['country']!r} is not a two-letter code like IT")
            terms["country"] = code
        self.terms = terms
        if self["accel"] not in ("auto", "kvm", "tcg"):
            raise usage.UsageError("--accel is auto, kvm or tcg")
        self["qemu"] = self["qemu"] or shutil.which("qemu-system-x86_64")
        if not self["qemu"]:
            raise usage.UsageError(
                "qemu-system-x86_64 is not installed: sudo apt-get install qemu-system-x86")
        if os.getuid() == 0:
            import pwd
            try:
                pwd.getpwnam(self["vm-user"])
            except KeyError:
                raise usage.UsageError(
                    f"the VM user {self['vm-user']!r} does not exist: create it with "
                    f"'useradd --system --no-create-home --shell /usr/sbin/nologin "
                    f"{self['vm-user']}', or name another with --vm-user")
        else:
            self["vm-user"] = None
        if self["cache"] is None:
            self["cache"] = self.home.file("images")


class SellerControl(ClientControl):
    """
    The commands the market sends a seller.  Each field is checked (see
    L{cpushare.client.marketchecks}) before it is used; a refused command
    gets a BadRequest naming the field and one line in the log.
    """

    def __init__(self, session):
        ClientControl.__init__(self, session)
        self.refusals = marketchecks.RefusalLog(session.reactor)

    def locateResponder(self, name):
        """
        Every responder, with a log line for each command it refuses (the
        fields' types were checked before, in L{ControlProtocol}).
        """
        responder = ClientControl.locateResponder(self, name)
        if responder is None:
            return responder

        def logRefusal(failure):
            local = getattr(failure.value, "local", None)
            if isinstance(failure.value, amp.RemoteAmpError) and local is not None and \
                    local.check(commands.BadRequest):
                self.refusals.refused(local.getErrorMessage())
            return failure

        def checked(box):
            return responder(box).addErrback(logRefusal)

        return checked

    def connectionLost(self, reason):
        self.refusals.stop()
        ClientControl.connectionLost(self, reason)

    @commands.MeshPeers.responder
    def meshPeers(self, network, vms, peers):
        switch = self.session.host.switch
        if switch is None:
            raise commands.BadRequest("MeshPeers: this seller has no UDP port")
        switch.view(network, vms, peers, self.session.info["session"])
        return {}

    @commands.StartVM.responder
    def startVM(self, vm, image, size, cores, memory, mac):
        self.session.host.start(vm, image, size, cores, memory, mac)
        return {}

    @commands.StopVM.responder
    def stopVM(self, vm):
        marketchecks.checkVMId("StopVM", vm)
        self.session.host.stop(vm)
        return {}

    @commands.ChannelLinked.responder
    def channelLinked(self, channel, peer_session, peer_channel):
        # A seller never asks for links of its own: nothing to remember.
        return {}

    @commands.Attest.responder
    def attest(self, nonce, vm=None, image=None):
        if vm is not None:
            marketchecks.checkVMId("Attest", vm)
        return trusted.responder(self.session, "attest", nonce, vm, image)

    @commands.BindingKey.responder
    def bindingKey(self, vm, nonce, pcrs):
        marketchecks.checkVMId("BindingKey", vm)
        return trusted.responder(self.session, "bindingKey", vm, nonce, pcrs)

    @commands.ReleaseKey.responder
    def releaseKey(self, vm, wrapped):
        marketchecks.checkVMId("ReleaseKey", vm)
        d = trusted.responder(self.session, "releaseKey", vm, wrapped)
        return d.addCallback(lambda _: {})


class SellerSession(ClientSession):
    controlClass = SellerControl

    def __init__(self, reactor, role, hello=True, host=None, trusted=None):
        ClientSession.__init__(self, reactor, role, hello)
        self.host = host
        self.trusted = trusted      # a TrustedSeller with --tpm, else None


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from cpushare.client.seller import cpuinfo
    from cpushare.client.seller.imagecache import ImageCache
    from cpushare.client.service import MarketConnection
    from cpushare.client.session import homeEndpoint
    from cpushare.client.seller.vmhost import VMHost
    from cpushare.vm import cgroups, probe

    cores, memory = options["cores"], options["memory"]
    cg, cgText = cgroups.detect()
    log.info("VM limits: {how}", how=cgText)
    if options["vm-user"]:
        log.info("VMs run as user {user}", user=options["vm-user"])
    else:
        log.info("VMs run as this user (start the seller as root to give them a user of their own)")
    cache = ImageCache(reactor, options["cache"], options["cache-size"] * 1024 * 1024)
    host = VMHost(reactor, cache, options["qemu"], user=options["vm-user"], cgroups=cg,
                  grace=options["grace"], cores=cores, memory=memory,
                  resultMax=options["result-max"] * 1024 * 1024)
    accel = defer.ensureDeferred(probe.chooseAccel(
        reactor, options["qemu"], options["accel"], uid=host.uid, gid=host.gid))

    def chosen(result):
        host.accel, why = result
        log.info("VM acceleration: {why}", why=why)
        return host.accel

    accel.addCallback(chosen)
    # Read once, before the reactor runs: what the Offer says of this CPU.
    cpu = cpuinfo.readOfferFields()
    log.info("CPU: {cpu}", cpu="/".join(cpu.values()) or "not described by /proc/cpuinfo")

    tpm = tpmService = None
    if options["tpm"]:
        tpmService = trusted.openTPM(reactor, options["tpm"], options.home.path,
                                     eventLog=options["tpm-event-log"])
        tpm = trusted.TrustedSeller(reactor, tpmService, options.home.path, options["qemu"],
                                    running=lambda: len(host.vms))
        host.imageKey = tpm.imageKey

    async def serve(session):
        # The paths brokered on the last connection are good no more.
        switch.forgetAll()
        await accel
        await host.connected(session)
        terms = await session.control.callRemote(
            commands.Offer, cores=cores, memory=memory, **options.terms, **cpu)
        log.info("offering {cores} cores and {memory} MB at {price} a core-hour"
                 " ({fee} a GB)", cores=cores, memory=memory,
                 price=formatAmount(terms["price"]), fee=formatAmount(terms["net_fee"]))
        discovery = defer.ensureDeferred(meshPort.discover(session, options.host))
        discovery.addErrback(lambda f: session.connected and log.failure(
            "mesh: learning the public address", f))
        if tpm is not None:
            try:
                await tpm.enrol(session)
            except Exception as e:
                # It still sells untrusted leases; the market says why not trusted ones.
                log.error("trusted computing: enrolling this TPM failed: {why}", why=str(e))

    from cpushare.client.seller.meshswitch import MeshSwitch
    from cpushare.client.seller.rendezvous import MeshPort
    from cpushare.listening import ListeningService, UDPEndpoint
    meshPort = MeshPort(reactor, given=bool(options["udp-port"]))
    host.switch = switch = MeshSwitch(reactor, host, meshPort)
    service = SellerService(host, ListeningService(
        reactor, UDPEndpoint(reactor, options["udp-port"] or 0), meshPort, "mesh UDP port"))
    connection = MarketConnection(
        reactor, homeEndpoint(reactor, options.home), "seller",
        onSession=lambda session: defer.ensureDeferred(serve(session)),
        sessionClass=SellerSession, sessionKw={"host": host, "trusted": tpm},
        where=f"{options.host}:{options.port}",
    )
    connection.setServiceParent(service)
    host.setServiceParent(service)
    if tpmService is not None:
        tpmService.setServiceParent(service)
    return service


class SellerService(MultiService):
    """
    The seller program.  Stopping it stops the VMs first, so their end is
    reported while the market connection is still up, and then the rest.
    C{udp}, a service, holds its UDP port: open while the program runs.
    """

    def __init__(self, host, udp=None):
        MultiService.__init__(self)
        self.host = host
        self.udp = udp

    def startService(self):
        MultiService.startService(self)
        if self.udp is not None:
            self.udp.startService()
        if self.host.switch is not None:
            self.host.switch.start()

    def stopService(self):
        if self.host.switch is not None:
            self.host.switch.stop()
        d = defer.maybeDeferred(self.host.stopService)
        d.addBoth(lambda _: MultiService.stopService(self))
        if self.udp is not None:
            d.addBoth(lambda _: self.udp.stopService())
        return d
