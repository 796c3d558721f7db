"""The seller's VM host, around a fake QEMU process."""

from twisted.internet.task import Clock

from cpushare.client.seller.vmhost import HostedVM


class FakeHost:
    session = None

    def __init__(self):
        self.reactor = Clock()
        self.ended = []

    def vmEnded(self, vm, state, reason):
        self.ended.append((state, reason))


class FakeProcess:
    ended = False


class FakeTransport:
    pid = 1234

    def __init__(self, vm):
        self.vm = vm
        self.signals = []

    def signalProcess(self, name):
        self.signals.append(name)
        self.vm.process.ended = True
        self.vm._exited(f"killed by signal {name}")


def hosted():
    host = FakeHost()
    vm = HostedVM(host, 7, "ab" * 32, 100, 1, 256, "0a:cb:00:00:00:07")
    vm.process = FakeProcess()
    vm.transport = FakeTransport(vm)
    return host, vm


def test_an_iso_the_bios_cannot_boot_fails_with_the_reason():
    host, vm = hosted()
    vm.consoleFromVM(b"SeaBIOS (version 1.16.2)\r\nBooting from DVD/CD...\r\nBoot fa")
    assert vm.transport.signals == []
    vm.consoleFromVM(b"iled: Could not read from CDROM (code 0004)\r\nNo bootable device.\r\n")
    assert vm.transport.signals == ["TERM"]
    assert host.ended == [
        ("failed", "the ISO does not boot: Boot failed: Could not read from CDROM (code 0004)")]


def test_a_booting_kernel_is_not_watched_any_more():
    host, vm = hosted()
    vm.consoleFromVM(b"Booting from DVD/CD...\r\n[    0.000000] Linux version 6.1.0\r\n")
    vm.consoleFromVM(b"a guest program that prints No bootable device\r\n")
    assert vm.transport.signals == [] and host.ended == []
