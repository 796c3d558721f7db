"""
The seller's VMs: starting them when the market asks, carrying their NIC
and console over the market connection, reporting their state and CPU
time, and keeping them through a lost connection.

Each VM is one QEMU process (see L{cpushare.vm.qemu}): started unprivileged
at idle priority, capped by a cgroup, its one NIC a socketpair whose other
end this host bridges to channel nicChannel(vm) of the market connection,
its serial console the process's stdin/stdout, bridged to
consoleChannel(vm), its result port read by a
L{cpushare.client.seller.results.ResultPort} whose digest is reported to
the market (ResultReady).  When the market connection drops, VMs keep running for
C{grace} seconds; a new connection reattaches them (ReattachVMs); past the
grace period they are stopped.  Stopping the seller stops every VM: nothing
is left running.
"""

import os
import pwd
import socket

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cpushare import imagecrypt
from cpushare.client import marketchecks
from cpushare.client.seller import imagememory
from cpushare.client.seller.results import ResultPort
from cpushare.protocol import commands
from cpushare.protocol.commands import consoleChannel, nicChannel
from cpushare.protocol.mux import MAX_PAYLOAD
from cpushare.protocol.qemustream import QemuStreamProtocol
from cpushare.protocol.states import IllegalTransition, VMLife, VMState
from cpushare.vm import cgroups, qemu

REPORT_INTERVAL = 10.0
STOP_TIMEOUT = 10.0
# Seconds a VM that ended waits for its result port to be read to the end
# and passed on, before its end is reported (and its result given up).
RESULT_DRAIN = 30.0
# What the BIOS prints on the serial console when the ISO does not boot.
BOOT_FAILURES = (b"No bootable device", b"Boot failed")
BOOT_WATCH = 64 * 1024
DEFAULT_GRACE = 600.0
MB = 1024 * 1024


class NicBridge(QemuStreamProtocol):
    """The seller's end of a VM's NIC socketpair."""

    def __init__(self, vm):
        self.vm = vm
        self.name = f"VM {vm.id}'s NIC"

    def frameReceived(self, frame):
        self.vm.frameFromVM(frame)


class QMPDrain(Protocol):
    """QMP's end, kept open so QEMU never blocks writing to it."""

    def dataReceived(self, data):
        pass


def _adopt(reactor, sock, protocol):
    factory = Factory.forProtocol(lambda: protocol)
    factory.noisy = False
    port = reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, factory)
    sock.close()
    return port


def processCPUSeconds(pid):
    """User plus system CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HostedVM(VMLife):
    """
    One VM on this seller.  It starts C{allocated} (the market placed it
    here) and moves along L{cpushare.protocol.states.TRANSITIONS}.
    """

    log = Logger()

    def __init__(self, host, vmId, image, size, cores, memory, mac):
        VMLife.__init__(self, VMState.ALLOCATED)
        self.host = host
        self.id = vmId
        self.image = image
        self.size = size
        self.cores = cores
        self.memory = memory
        self.mac = mac
        self.process = None
        self.transport = None
        self.nic = None
        self.cgroup = None
        self.stopReason = None
        self.failReason = None
        self.consoleSeen = b""
        self.lastCPU = 0.0
        self.framesDropped = 0
        self.results = None
        self.resultUntold = None    # (sha256, size) not yet told to the market
        self.isoFd = None           # its encrypted image decrypted, while it starts
        self.ended = defer.Deferred()

    # -- frames and console

    def frameFromVM(self, frame):
        switch = self.host.switch
        if switch is not None and switch.frameFromVM(self, frame):
            return                  # to a VM here, or directly to another seller
        session = self.host.session
        if session is None or not session.sendFrame(nicChannel(self.id), frame):
            self.framesDropped += 1

    def consoleFromVM(self, data):
        if self.consoleSeen is not None:
            self._watchBoot(data)
        session = self.host.session
        if session is not None:
            for i in range(0, len(data), MAX_PAYLOAD):
                session.sendFrame(consoleChannel(self.id), data[i:i + MAX_PAYLOAD])

    def _watchBoot(self, data):
        """Fail a VM whose BIOS says the ISO does not boot (it would idle forever)."""
        self.consoleSeen = (self.consoleSeen + data)[-512:]
        found = [self.consoleSeen.find(m) for m in BOOT_FAILURES if m in self.consoleSeen]
        if found and b"\n" in self.consoleSeen[min(found):]:
            line = self.consoleSeen[min(found):].split(b"\n")[0].strip()
            self.consoleSeen = None
            self.failReason = f"the ISO does not boot: {line.decode('ascii', 'replace')}"
            self.stop(self.failReason)
            return
        if b"Linux version" in self.consoleSeen or len(data) > BOOT_WATCH:
            self.consoleSeen = None

    def bind(self, session):
        if self.nic is not None:
            session.route(nicChannel(self.id), self.nic.sendFrame)
        if self.process is not None:
            session.route(consoleChannel(self.id), self.process.writeConsole)

    # -- life

    def cpuSeconds(self):
        try:
            if self.cgroup is not None:
                self.lastCPU = self.cgroup.cpuSeconds()
            elif self.transport is not None and self.transport.pid:
                self.lastCPU = processCPUSeconds(self.transport.pid)
        except (OSError, ValueError):
            pass
        return self.lastCPU

    def launch(self, path):
        """Start QEMU on the ISO at C{path}, or on C{isoFd} (its decrypted image) when set."""
        host = self.host
        config = qemu.VMConfig(self.id, self.cores, self.memory, path, self.mac, host.accel)
        nicOurs, nicTheirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        qmpOurs, qmpTheirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        resultOurs, resultTheirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if host.cgroups is not None:
            self.cgroup = host.cgroups.create(
                f"vm-{self.id}", self.cores, self.memory * MB + cgroups.QEMU_OVERHEAD_BYTES)
        self.process = qemu.VMProcess(self.id, self.consoleFromVM, self._exited)
        try:
            self.transport = qemu.spawn(
                host.reactor, config, self.process, nicTheirs.fileno(), qmpTheirs.fileno(),
                resultTheirs.fileno(), host.qemu, uid=host.uid, gid=host.gid, isoFd=self.isoFd)
        except BaseException:
            for s in (nicOurs, nicTheirs, qmpOurs, qmpTheirs, resultOurs, resultTheirs):
                s.close()
            if self.cgroup is not None:
                self.cgroup.remove()
            raise
        finally:
            nicTheirs.close()
            qmpTheirs.close()
            resultTheirs.close()
        if self.cgroup is not None:
            try:
                self.cgroup.add(self.transport.pid)
            except OSError as e:
                self.log.warn("VM {vm}: could not move QEMU into its cgroup: {e}",
                              vm=self.id, e=e)
        self.nic = NicBridge(self)
        _adopt(host.reactor, nicOurs, self.nic)
        _adopt(host.reactor, qmpOurs, QMPDrain())
        self.results = ResultPort(self.id, self._resultReady, lambda failure: None,
                                  cap=host.resultMax, forward=host.forwardResult(self))
        _adopt(host.reactor, resultOurs, self.results)
        self.moveTo(VMState.RUNNING)
        if host.session is not None:
            self.bind(host.session)

    def _resultReady(self, sha256, size):
        self.resultUntold = (sha256, size)
        self.host.tellResult(self)

    def stop(self, reason):
        if self.stopReason is None:
            self.stopReason = reason
        if self.transport is None or self.process.ended:
            return self.ended
        self.transport.signalProcess("TERM")
        kill = self.host.reactor.callLater(STOP_TIMEOUT, self._kill)
        self.ended.addBoth(lambda r: (kill.active() and kill.cancel(), r)[1])
        return self.ended

    def _kill(self):
        if not self.process.ended:
            self.transport.signalProcess("KILL")

    def _exited(self, why):
        self.cpuSeconds()
        if self.nic is not None and self.nic.transport is not None:
            self.nic.transport.loseConnection()
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.results is None:
            self._over(why)
            return
        # What the guest wrote last is read, and its result told, before its end.
        giveUp = self.host.reactor.callLater(RESULT_DRAIN, self.results.abandon)
        done = self.results.whenDone()
        done.addCallback(lambda _: giveUp.active() and giveUp.cancel())
        done.addCallback(lambda _: self.results.vmEnded())
        done.addCallback(lambda _: self._over(why))

    def _over(self, why):
        if self.failReason is not None:
            state, reason = VMState.FAILED, self.failReason
        elif self.stopReason is not None:
            state, reason = VMState.STOPPED, self.stopReason
        elif why == "powered off":
            state, reason = VMState.STOPPED, "the VM powered off"
        else:
            state, reason = VMState.FAILED, why
        self.host.vmEnded(self, state, reason)
        self.ended.callback(None)


class VMHost(Service):
    """The seller's running VMs."""

    log = Logger()

    def __init__(self, reactor, cache, qemuBinary, accel="tcg", user=None, cgroups=None,
                 grace=DEFAULT_GRACE, cores=1, memory=1024, resultMax=commands.RESULT_MAX):
        self.reactor = reactor
        self.resultMax = resultMax
        self.cache = cache
        self.qemu = qemuBinary
        self.accel = accel
        self.uid = self.gid = None
        if user is not None:
            entry = pwd.getpwnam(user)
            self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.cgroups = cgroups
        self.grace = grace
        self.cores = cores
        self.memory = memory
        self.vms = {}
        self.endedAway = []  # (vm, state, reason) of VMs that ended while disconnected
        self.session = None
        # (vm) -> Deferred of the key of its encrypted image, unwrapped by
        # this seller's TPM; None: this seller cannot boot encrypted images.
        self.imageKey = None
        self.switch = None          # its VMs' frames between sellers (meshswitch.py)
        self._graceCall = None
        self._reporter = LoopingCall(self.reportAll)
        self._reporter.clock = reactor

    def startService(self):
        Service.startService(self)
        self.cache.start()
        self._reporter.start(REPORT_INTERVAL, now=False)

    def stopService(self):
        if not self.running:
            return None
        Service.stopService(self)
        if self._reporter.running:
            self._reporter.stop()
        if self._graceCall is not None and self._graceCall.active():
            self._graceCall.cancel()
        d = self.stopAll("the seller is shutting down")
        d.addBoth(lambda _: self.cache.stop())
        return d

    def stopAll(self, reason):
        return defer.DeferredList([vm.stop(reason) for vm in list(self.vms.values())])

    # -- the market connection

    async def connected(self, session):
        """A new market session: reattach what is still running, then serve."""
        if self._graceCall is not None and self._graceCall.active():
            self._graceCall.cancel()
        self._graceCall = None
        running = sorted(self.vms)
        keep = set()
        if running:
            answer = await session.control.callRemote(commands.ReattachVMs, vms=running)
            keep = set(answer["keep"])
        self.session = session
        for vmId in running:
            vm = self.vms[vmId]
            if vmId in keep:
                vm.bind(session)
                self.tellResult(vm)
            else:
                vm.stop("the market no longer wants this VM")
        if running:
            self.log.info("reattached VMs {keep}; stopping {gone}", keep=sorted(keep),
                          gone=sorted(set(running) - keep))
        endedAway, self.endedAway = self.endedAway, []
        for vm, state, reason in endedAway:
            self.tell(vm, reason)
        session.whenLost().addCallback(self._lost)

    def _lost(self, session):
        if self.session is not session:
            return
        self.session = None
        if self.vms and self.running:
            self.log.warn("lost the market; keeping {n} VMs running for {grace:.0f}s",
                          n=len(self.vms), grace=self.grace)
            self._graceCall = self.reactor.callLater(self.grace, self._graceOver)

    def _graceOver(self):
        self._graceCall = None
        if self.session is None:
            self.log.warn("the market did not come back in {grace:.0f}s; stopping all VMs",
                          grace=self.grace)
            self.stopAll("the seller lost the market for too long")

    # -- commands from the market

    def start(self, vmId, image, size, cores, memory, mac):
        """
        Start VM C{vmId} as the market asks, once every field is checked
        (L{marketchecks.checkStartVM}); a refusal is a BadRequest naming the field.
        """
        marketchecks.checkVMId("StartVM", vmId)
        if vmId in self.vms:
            raise commands.BadRequest(f"StartVM vm: VM {vmId} is already running here")
        usedCores = sum(vm.cores for vm in self.vms.values())
        usedMemory = sum(vm.memory for vm in self.vms.values())
        marketchecks.checkStartVM(
            vmId, image, size, cores, memory, mac, cacheBytes=self.cache.capBytes,
            freeCores=self.cores - usedCores, freeMemory=self.memory - usedMemory)
        vm = HostedVM(self, vmId, image, size, cores, memory, mac)
        self.vms[vmId] = vm
        defer.ensureDeferred(self._boot(vm))

    async def _boot(self, vm):
        self.report(vm, VMState.FETCHING)
        self.cache.acquire(vm.image)

        def fetch(offset, length):
            if self.session is None:
                return defer.fail(commands.BadRequest("the market connection was lost"))
            d = self.session.control.callRemote(
                commands.FetchImageChunk, vm=vm.id, offset=offset, length=length)
            return d.addCallback(lambda r: r["data"])

        try:
            path = await self.cache.ensure(vm.image, vm.size, fetch)
            if vm.stopReason is None:
                vm.isoFd = await self._decrypted(vm, path)
            if vm.stopReason is None:
                self.report(vm, VMState.BOOTING)
                vm.launch(path)
        except Exception as e:
            state, reason = VMState.FAILED, f"could not start: {e}"
        else:
            if vm.stopReason is None:
                self.log.info(
                    "VM {vm} running (pid {pid}, {cores} cores, {memory} MB, {accel})",
                    vm=vm.id, pid=vm.transport.pid, cores=vm.cores, memory=vm.memory,
                    accel=self.accel)
                self.tell(vm)
                return
            state, reason = VMState.STOPPED, vm.stopReason
        finally:
            if vm.isoFd is not None:
                os.close(vm.isoFd)  # QEMU holds its own
                vm.isoFd = None
        self.cache.release(vm.image)
        self.vms.pop(vm.id, None)
        self.log.warn("VM {vm} {state}: {reason}", vm=vm.id, state=state, reason=reason)
        self.report(vm, state, reason)
        vm.ended.callback(None)

    async def _decrypted(self, vm, path):
        """
        A read-only descriptor of C{vm}'s image decrypted into sealed memory
        when it is an encrypted image (L{imagememory}), else None: the plain
        image never touches the disk.
        """
        if not await self.cache.inThread(imagecrypt.isEncrypted, path):
            return None
        if self.imageKey is None:
            raise imagecrypt.ImageCryptError(
                "the image is encrypted, and its key is released only to a seller with a "
                "TPM (--tpm)")
        key = await self.imageKey(vm)
        return await self.cache.inThread(imagememory.decryptToMemory, path, key)

    def stop(self, vmId, reason="stopped by the market"):
        vm = self.vms.get(vmId)
        if vm is None:
            raise commands.NoSuchVM(f"VM {vmId} is not running here")
        vm.stop(reason)

    def vmEnded(self, vm, state, reason):
        self.vms.pop(vm.id, None)
        self.cache.release(vm.image)
        if self.session is not None:
            for channel in (nicChannel(vm.id), consoleChannel(vm.id)):
                self.session.unroute(channel)
        self.log.info("VM {vm} {state}: {reason}", vm=vm.id, state=state, reason=reason)
        if self.session is None:
            self.endedAway.append((vm, state, reason))
        self.report(vm, state, reason)

    # -- reports

    def report(self, vm, state, reason=None):
        """
        Move C{vm} to C{state} and tell the market; a move the table refuses
        is logged in one line and neither made nor told.
        """
        try:
            vm.moveTo(state)
        except IllegalTransition as e:
            self.log.warn("refused: {error}", error=str(e))
            return
        self.tell(vm, reason)

    def tell(self, vm, reason=None):
        """Tell the market C{vm}'s state and CPU seconds."""
        if self.session is None:
            return
        kw = {"reason": reason} if reason else {}
        d = self.session.control.callRemote(
            commands.VMState, vm=vm.id, state=vm.state, cpu_seconds=vm.cpuSeconds(), **kw)
        d.addErrback(lambda f: self.log.warn("reporting VM {vm}: {why}", vm=vm.id,
                                             why=f.getErrorMessage()))

    def forwardResult(self, vm):
        """How C{vm}'s result bytes go on to its buyer: (offset, data) -> Deferred."""
        def forward(offset, data):
            if self.session is None:
                return defer.fail(commands.BadRequest("the market connection was lost"))
            return self.session.control.callRemote(commands.ResultChunk, vm=vm.id,
                                                   offset=offset, data=data)
        return forward

    def tellResult(self, vm):
        """Tell the market C{vm}'s result once it is complete (when connected; else later)."""
        if self.session is None or vm.resultUntold is None:
            return
        (sha256, size), vm.resultUntold = vm.resultUntold, None
        d = self.session.control.callRemote(commands.ResultReady, vm=vm.id, sha256=sha256,
                                            size=size)
        d.addErrback(lambda f: self.log.warn("reporting VM {vm}'s result: {why}", vm=vm.id,
                                             why=f.getErrorMessage()))

    def reportAll(self):
        for vm in list(self.vms.values()):
            if vm.state == VMState.RUNNING:
                self.tell(vm)
