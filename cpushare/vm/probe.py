"""
Whether KVM really works here: a probe boot.

`/dev/kvm` existing proves nothing (on some machines QEMU starts with
`-accel kvm` and the guest never runs).  The probe boots a 512-byte boot
sector that writes "OK" to the serial port, with `-accel kvm`, and waits
for it; only then are VMs given KVM, otherwise TCG.
"""

import os
import tempfile

from twisted.internet import defer, protocol
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import Logger

log = Logger()

# mov dx,0x3f8; mov al,'O'; out dx,al; mov al,'K'; out dx,al; mov al,10;
# out dx,al; cli; hlt; jmp $-1
BOOT_SECTOR = bytes.fromhex("baf803b04feeb04beeb00aeefaf4ebfd")
PROBE_TIMEOUT = 6.0


def probeImage():
    return BOOT_SECTOR + b"\0" * (510 - len(BOOT_SECTOR)) + b"\x55\xaa"


class _Probe(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ok = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data
        if b"OK\n" in self.output and not self.ok.called:
            self.ok.callback(True)

    def processEnded(self, reason):
        if not self.ok.called:
            self.ok.callback(False)
        self.ended.callback(None)


async def accelWorks(reactor, qemu, accel, timeout=PROBE_TIMEOUT, uid=None, gid=None):
    """
    Fires True when a probe guest ran to its "OK" under C{accel}, run as
    C{uid}/C{gid} (the user VMs will run as).
    """
    fd, path = tempfile.mkstemp(prefix="cpushare-probe-", suffix=".img")
    with os.fdopen(fd, "wb") as f:
        f.write(probeImage())
    os.chmod(path, 0o644)
    probe = _Probe()
    argv = [qemu, "-accel", accel, "-nodefaults", "-no-user-config", "-nographic",
            "-display", "none", "-m", "16", "-M", "pc", "-boot", "order=c",
            "-drive", f"file={path},format=raw,if=ide,snapshot=on", "-serial", "stdio"]
    try:
        transport = reactor.spawnProcess(
            probe, qemu, argv, env={"PATH": "/usr/bin:/bin"}, uid=uid, gid=gid,
            childFDs={0: "w", 1: "r", 2: "r"})
    except OSError as e:
        os.remove(path)
        log.warn("cannot run {qemu}: {error}", qemu=qemu, error=e)
        return False
    def kill():
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    # A seller stopped mid-probe must not leave the probe guest behind.
    trigger = reactor.addSystemEventTrigger("before", "shutdown", kill)
    timer = reactor.callLater(timeout, lambda: probe.ok.called or probe.ok.callback(False))
    try:
        ok = await probe.ok
    finally:
        reactor.removeSystemEventTrigger(trigger)
        if timer.active():
            timer.cancel()
        kill()
        await probe.ended
        os.remove(path)
    return ok


async def chooseAccel(reactor, qemu, wanted="auto", uid=None, gid=None):
    """
    (accelerator, reason): C{tcg} or C{kvm} when configured so; with
    C{auto}, C{kvm} only when a probe guest, run as the VMs' user, proved
    it works, else C{tcg}.
    """
    if wanted in ("tcg", "kvm"):
        return wanted, f"{wanted.upper()}, as configured"
    if uid is None and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "TCG: /dev/kvm is not usable by this user"
    if await accelWorks(reactor, qemu, "kvm", uid=uid, gid=gid):
        return "kvm", "KVM: the probe guest ran"
    return "tcg", f"TCG: a probe guest did not run under KVM within {PROBE_TIMEOUT:.0f}s"
