"""
Running one buyer VM in QEMU, sandboxed, on a seller's desktop.

The command line gives the guest exactly what was sold and nothing else:

- `-nodefaults -no-user-config -nographic`: no default devices, no config
  files, no display;
- `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
  resourcecontrol=deny`: QEMU's seccomp filter (the process shows
  `Seccomp: 2`);
- `-smp`/`-m` as allocated, `-accel kvm` only after a probe proved KVM
  works, else `tcg`;
- the ISO read-only as a cdrom, from the seller's content-addressed cache,
  handed to QEMU as an open file descriptor (fd 5, `-add-fd`): QEMU needs
  no access to the cache folder, or to any other file of the seller's (an
  encrypted image is handed over the same way, as a read-only descriptor
  of the sealed memory it was decrypted into,
  L{cpushare.client.seller.imagememory});
- one NIC, virtio-net, on a socketpair whose other end the seller client
  owns (fd 3); the VM has no other network;
- the serial console on QEMU's stdin/stdout (pipes to the seller client),
  QMP on a second socketpair (fd 4);
- one virtio-serial port named org.cpushare.result (RESULT_PORT), on a
  third socketpair whose other end the seller client reads (fd 6): where
  the guest writes its result (L{cpushare.client.seller.results}).

QEMU is started already unprivileged (`-runas` would need the privileges
the sandbox denies): as the seller's VM user when the seller runs as root,
else as the seller's own user; through `setpriv --pdeathsig KILL chrt
--idle 0 nice -n 19` so it dies with the seller and runs at SCHED_IDLE and
the lowest priority, and the desktop's own work always wins.
"""

import os
import re
import shutil

import attr
from zope.interface import implementer
from twisted.internet import protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
NIC_FD = 3
QMP_FD = 4
ISO_FD = 5
RESULT_FD = 6
RESULT_PORT = "org.cpushare.result"
STDERR_KEPT = 8192


class LaunchError(Exception):
    """The VM could not be started; the message says why."""


_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")


def _count(minimum):
    """An attrs validator: a plain int (not a bool, not a string) of at least C{minimum}."""
    def check(self, attribute, value):
        if type(value) is not int or value < minimum:
            raise ValueError(f"{attribute.name} must be an integer of at least {minimum},"
                             f" not {value!r}")
    return check


def _mac(self, attribute, value):
    if not isinstance(value, str) or not _MAC.fullmatch(value):
        raise ValueError(f"mac must be like 52:54:00:12:34:56, not {value!r}")


@attr.s(frozen=True)
class VMConfig:
    """
    What one VM is sold.  Every field that reaches QEMU's command line is
    checked here too (the seller checks the market's commands first, see
    L{cpushare.client.marketchecks}): numbers are ints, the MAC is six hex
    pairs, so no value can add an option.
    """

    vmId = attr.ib(validator=_count(0))
    cores = attr.ib(validator=_count(1))
    memoryMB = attr.ib(validator=_count(1))
    iso = attr.ib(validator=attr.validators.instance_of(str))
    mac = attr.ib(validator=_mac)
    accel = attr.ib(default="tcg")

    @accel.validator
    def _accel(self, attribute, value):
        if value not in ("tcg", "kvm"):
            raise ValueError(f"unknown accelerator {value!r}")


def commandLine(config, qemu="qemu-system-x86_64"):
    """The QEMU argument list (argv[0] included) for C{config}."""
    return [
        qemu,
        "-name", f"cpushare-vm-{config.vmId}",
        "-nodefaults", "-no-user-config", "-nographic",
        "-sandbox", SANDBOX,
        "-accel", config.accel,
        "-cpu", "max" if config.accel == "tcg" else "host",
        "-smp", str(config.cores),
        "-m", str(config.memoryMB),
        "-add-fd", f"fd={ISO_FD},set=1,opaque=image",
        "-drive", "file=/dev/fdset/1,if=ide,media=cdrom,readonly=on,format=raw",
        "-boot", "order=d,menu=off",
        "-netdev", f"stream,id=net0,server=off,addr.type=fd,addr.str={NIC_FD}",
        "-device", f"virtio-net-pci,netdev=net0,mac={config.mac},romfile=",
        "-chardev", "stdio,id=console,signal=off",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,fd={QMP_FD}",
        "-mon", "chardev=qmp,mode=control",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=result,fd={RESULT_FD}",
        "-device", f"virtserialport,bus=vser0.0,chardev=result,name={RESULT_PORT}",
    ]


def idleWrapper():
    """
    The argv prefix that starts a program killed with its parent (util-linux
    setpriv --pdeathsig: a seller that dies leaves no VM behind), at
    SCHED_IDLE (util-linux chrt) and nice 19 (coreutils nice).  Each execs
    the next program, so QEMU keeps the pid.
    """
    setpriv, chrt, nice = shutil.which("setpriv"), shutil.which("chrt"), shutil.which("nice")
    if not setpriv or not chrt or not nice:
        raise LaunchError(
            "setpriv and chrt (util-linux) and nice (coreutils) are needed to run VMs")
    return [setpriv, "--pdeathsig", "KILL", chrt, "--idle", "0", nice, "-n", "19"]


@implementer(IPushProducer)
class VMProcess(protocol.ProcessProtocol):
    """
    QEMU's process.  Console output goes to C{onConsole(bytes)}; the end to
    C{onExit(reason)} with a one-line reason.  Console input is written to
    QEMU's stdin while its pipe keeps up; past the pipe's buffer (64 KiB,
    Twisted's) it is dropped and counted in C{consoleDropped}, like a
    serial line's overrun, so a guest that reads nothing (or a market that
    floods the console) costs the seller bounded memory.
    """

    log = Logger()

    def __init__(self, vmId, onConsole, onExit):
        self.vmId = vmId
        self.onConsole = onConsole
        self.onExit = onExit
        self.stderr = b""
        self.pid = None
        self.ended = False
        self.inputPaused = False
        self.consoleDropped = 0

    def connectionMade(self):
        self.pid = self.transport.pid
        self.transport.registerProducer(self, True)

    # IPushProducer: QEMU's stdin says whether it keeps up.

    def pauseProducing(self):
        self.inputPaused = True

    def resumeProducing(self):
        self.inputPaused = False

    def stopProducing(self):
        self.inputPaused = True

    def outReceived(self, data):
        self.onConsole(data)

    def errReceived(self, data):
        self.stderr = (self.stderr + data)[-STDERR_KEPT:]

    def writeConsole(self, data):
        if self.ended:
            return
        if self.inputPaused:
            self.consoleDropped += len(data)
            return
        self.transport.write(data)

    def processEnded(self, reason):
        self.ended = True
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        lines = [l for l in self.stderr.decode("utf-8", "replace").splitlines() if l.strip()]
        detail = lines[-1].strip() if lines else ""
        if detail.startswith("qemu-system-x86_64: "):
            detail = detail[len("qemu-system-x86_64: "):]
        if sig is not None:
            why = f"killed by signal {sig}"
        elif code == 0:
            why = "powered off"
        else:
            why = f"QEMU exited with status {code}"
        reasonText = f"{why}: {detail}" if detail and code != 0 else why
        self.log.info("VM {vm} ended: {why}", vm=self.vmId, why=reasonText)
        self.onExit(reasonText)


def spawn(reactor, config, vmProcess, nicFd, qmpFd, resultFd, qemu, uid=None, gid=None,
          cwd="/", isoFd=None):
    """
    Start QEMU for C{config}; returns the process transport.  C{nicFd},
    C{qmpFd} and C{resultFd} are the VM's ends of the NIC, QMP and result
    port socketpairs; the ISO at
    C{config.iso} is opened read-only here and handed over as ISO_FD, or
    C{isoFd} when given (a read-only descriptor the caller keeps and closes).
    """
    argv = idleWrapper() + commandLine(config, qemu)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C"}
    given = isoFd is not None
    if not given:
        isoFd = os.open(config.iso, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return reactor.spawnProcess(
            vmProcess, argv[0], argv, env=env, path=cwd, uid=uid, gid=gid,
            childFDs={0: "w", 1: "r", 2: "r", NIC_FD: nicFd, QMP_FD: qmpFd, ISO_FD: isoFd,
                      RESULT_FD: resultFd},
        )
    finally:
        if not given:
            os.close(isoFd)
