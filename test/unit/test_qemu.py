"""The QEMU command line and the VM process, without QEMU."""

import shutil

import pytest
from twisted.internet import abstract, defer, reactor
from twisted.internet.testing import MemoryReactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial import unittest

from cpushare.vm import probe, qemu


def config(**kw):
    values = dict(vmId=1, cores=2, memoryMB=512, iso="/cache/ab.iso", mac="52:54:00:00:00:01")
    values.update(kw)
    return qemu.VMConfig(**values)


def option(argv, name):
    """Every value given to option C{name}."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_the_guest_gets_what_was_sold_and_nothing_else():
    argv = qemu.commandLine(config(), "/usr/bin/qemu-system-x86_64")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-nographic"):
        assert flag in argv
    assert option(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert option(argv, "-smp") == ["2"] and option(argv, "-m") == ["512"]
    assert option(argv, "-accel") == ["tcg"]
    # The ISO is an fd handed over read-only, not a path QEMU opens.
    assert option(argv, "-add-fd") == ["fd=5,set=1,opaque=image"]
    [drive] = option(argv, "-drive")
    assert drive.startswith("file=/dev/fdset/1,") and "readonly=on" in drive
    assert "media=cdrom" in drive
    assert not any("/cache/ab.iso" in a for a in argv)
    # One NIC, on the socketpair fd the seller owns; no other network.
    assert option(argv, "-netdev") == ["stream,id=net0,server=off,addr.type=fd,addr.str=3"]
    assert option(argv, "-device") == [
        "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,romfile=",
        # and the result port, on the socketpair fd 6 the seller reads
        "virtio-serial-pci,id=vser0",
        "virtserialport,bus=vser0.0,chardev=result,name=org.cpushare.result"]
    assert "socket,id=result,fd=6" in option(argv, "-chardev")
    assert "-runas" not in argv
    assert not any(a.startswith("user") for a in option(argv, "-netdev"))


@pytest.mark.parametrize("field,value", [
    ("mac", "52:54:00:00:00:01,romfile=/etc/shadow"),
    ("mac", "52:54:00:00:00:01\n"),
    ("mac", "-drive"),
    ("cores", 0), ("cores", -1), ("cores", "2,maxcpus=9"), ("cores", True),
    ("memoryMB", 0), ("memoryMB", "512,slots=2"),
    ("vmId", -1), ("vmId", "1 -drive file=/etc/shadow"),
    ("iso", None),
])
def test_nothing_free_form_reaches_the_command_line(field, value):
    with pytest.raises((ValueError, TypeError)):
        config(**{field: value})


def test_kvm_only_when_asked_and_nothing_else():
    assert option(qemu.commandLine(config(accel="kvm")), "-accel") == ["kvm"]
    with pytest.raises(ValueError):
        config(accel="hvf")


def test_the_wrapper_runs_qemu_at_idle_priority():
    wrapper = qemu.idleWrapper()
    assert wrapper[0].endswith("setpriv") and wrapper[1:3] == ["--pdeathsig", "KILL"]
    assert wrapper[3].endswith("chrt") and wrapper[4:6] == ["--idle", "0"]
    assert wrapper[6].endswith("nice") and wrapper[7:] == ["-n", "19"]


class FakeProcessTransport:
    pid = 4242

    def __init__(self):
        self.written = []
        self.producer = None

    def write(self, data):
        self.written.append(data)

    def registerProducer(self, producer, streaming):
        self.producer = producer


class StdinOfAStuckGuest:
    """
    QEMU's stdin as Twisted holds it (a real FileDescriptor and its write
    buffer), for a guest that reads nothing: no byte ever leaves the buffer.
    """

    pid = 4242

    def __init__(self):
        self.pipe = abstract.FileDescriptor(MemoryReactor())
        self.pipe.connected = True
        self.pipe.fileno = lambda: 99

    def write(self, data):
        self.pipe.write(data)

    def registerProducer(self, producer, streaming):
        self.pipe.registerProducer(producer, streaming)

    def buffered(self):
        return len(self.pipe.dataBuffer) + self.pipe._tempDataLen


def test_console_input_a_guest_does_not_read_takes_bounded_memory():
    p = qemu.VMProcess(1, lambda data: None, lambda why: None)
    stdin = StdinOfAStuckGuest()
    p.makeConnection(stdin)
    for _ in range(10_000):  # 15 MB of console input from the market
        p.writeConsole(b"x" * 1500)
    assert stdin.buffered() <= abstract.FileDescriptor.bufferSize + 1500
    assert p.consoleDropped >= 10_000 * 1500 - stdin.buffered()
    # Once the guest reads again, input flows again.
    stdin.pipe.dataBuffer, stdin.pipe._tempDataBuffer, stdin.pipe._tempDataLen = b"", [], 0
    p.resumeProducing()
    p.writeConsole(b"ls\n")
    assert stdin.buffered() == 3


def run(reason, stderr=b""):
    console, ends = [], []
    p = qemu.VMProcess("v1", console.append, ends.append)
    p.makeConnection(FakeProcessTransport())
    p.outReceived(b"CPUSHARE-READY\r\n")
    p.errReceived(stderr)
    p.writeConsole(b"ls\n")
    p.processEnded(Failure(reason))
    assert console == [b"CPUSHARE-READY\r\n"]
    assert p.transport.written == [b"ls\n"]
    p.writeConsole(b"too late\n")
    assert p.transport.written == [b"ls\n"]
    return ends


def test_exit_reasons_name_the_problem():
    assert run(ProcessDone(0)) == ["powered off"]
    assert run(ProcessTerminated(1), b"qemu-system-x86_64: -drive file=/x: Could not open '/x'\n") == [
        "QEMU exited with status 1: -drive file=/x: Could not open '/x'"]
    assert run(ProcessTerminated(signal=9)) == ["killed by signal 9"]


class ProbeTests(unittest.TestCase):
    """The acceleration probe boots a real (tiny) guest."""

    timeout = 30

    @pytest.mark.slow
    def test_the_probe_guest_runs_under_tcg(self):
        d = defer.ensureDeferred(
            probe.accelWorks(reactor, shutil.which("qemu-system-x86_64"), "tcg"))
        return d.addCallback(self.assertTrue)

    def test_tcg_is_chosen_without_probing_when_asked(self):
        d = defer.ensureDeferred(probe.chooseAccel(reactor, "/nonexistent/qemu", "tcg"))
        return d.addCallback(self.assertEqual, ("tcg", "TCG, as configured"))
