"""Kernel module dependencies, read from .modinfo sections as depmod does."""

import lzma
import struct

import pytest

from cpushare.vm.kmodules import ModuleError, indexModules, loadOrder, modinfo, moduleName


def fakeModule(name, depends=""):
    """A minimal little-endian ELF64 file with .shstrtab and .modinfo sections."""
    info = f"license=GPL\0depends={depends}\0name={name}\0".encode()
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    infoOffset = 64
    strOffset = infoOffset + len(info)
    shoff = strOffset + len(shstrtab)
    shoff += -shoff % 8
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)

    def section(nameOffset, offset, size):
        sh = bytearray(64)
        struct.pack_into("<I", sh, 0, nameOffset)
        struct.pack_into("<QQ", sh, 0x18, offset, size)
        return bytes(sh)

    body = bytes(header) + info + shstrtab
    body += b"\0" * (shoff - len(body))
    return body + section(0, 0, 0) + section(1, strOffset, len(shstrtab)) + section(11, infoOffset, len(info))


def test_modinfo_fields():
    assert modinfo(fakeModule("virtio_net", "net_failover,virtio"))["depends"] == "net_failover,virtio"


def test_a_non_elf_file_is_refused():
    with pytest.raises(ModuleError, match="ELF"):
        modinfo(b"not a module")


@pytest.mark.parametrize("filename, name", [
    ("virtio_net.ko", "virtio_net"),
    ("net-failover.ko.xz", "net_failover"),
    ("/lib/modules/x/kernel/drivers/virtio/virtio_pci.ko", "virtio_pci"),
])
def test_module_names(filename, name):
    assert moduleName(filename) == name


@pytest.fixture
def tree(tmp_path):
    net = tmp_path / "kernel" / "drivers" / "net"
    virtio = tmp_path / "kernel" / "drivers" / "virtio"
    net.mkdir(parents=True)
    virtio.mkdir(parents=True)
    (virtio / "virtio.ko").write_bytes(fakeModule("virtio"))
    (virtio / "virtio_ring.ko").write_bytes(fakeModule("virtio_ring", "virtio"))
    (virtio / "virtio_pci.ko").write_bytes(fakeModule("virtio_pci", "virtio_ring,virtio"))
    (net / "failover.ko.xz").write_bytes(lzma.compress(fakeModule("failover")))
    (net / "net_failover.ko").write_bytes(fakeModule("net_failover", "failover"))
    (net / "virtio_net.ko").write_bytes(
        fakeModule("virtio_net", "net_failover,virtio_ring,virtio,af_packet"))
    return tmp_path


def test_each_module_comes_after_its_dependencies(tree):
    order = loadOrder(["virtio_pci", "virtio_net"], indexModules(str(tree)), ["kernel/net/af_packet.ko"])
    names = [moduleName(p) for p in order]
    assert names == ["virtio", "virtio_ring", "virtio_pci", "failover", "net_failover", "virtio_net"]


def test_a_missing_dependency_names_who_needs_it(tree):
    with pytest.raises(ModuleError, match="af_packet.*needed by virtio_net"):
        loadOrder(["virtio_net"], indexModules(str(tree)))
