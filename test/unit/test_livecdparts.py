"""
The livecd's parts from Debian packages: unpacking, the cache, and the
message when apt-get is missing.  The packages here are small fakes made
with dpkg-deb, placed where `apt-get download` would put them.
"""

import json
import os
import shutil
import subprocess

import pytest

from cpushare.vm import livecdparts
from cpushare.vm.isoimage import ImageError
from cpushare.vm.livecdparts import PartsCache, defaultCache
from test.unit.test_elflibs import fakeELF
from test.unit.test_kmodules import fakeModule


def needsDpkg(test):
    """Builds and unpacks packages with dpkg-deb, child programs: slow."""
    skip = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
    return pytest.mark.slow(skip(test))


def makeDeb(debs, package, version, files, depends=None):
    root = debs.parent / "build" / package
    (root / "DEBIAN").mkdir(parents=True)
    control = (f"Package: {package}\nVersion: {version}\nArchitecture: amd64\n"
               "Maintainer: test <test@example.org>\nDescription: a fake for tests\n")
    if depends:
        control += f"Depends: {depends}\n"
    (root / "DEBIAN" / "control").write_text(control)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.symlink_to(data)  # a symbolic link to the text
        else:
            path.write_bytes(data)
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root),
                    str(debs / f"{package}_{version}_amd64.deb")], check=True, capture_output=True)


@pytest.fixture
def noApt(monkeypatch):
    real = shutil.which
    monkeypatch.setattr(livecdparts.shutil, "which", lambda name: None if name == "apt-get" else real(name))


@pytest.fixture
def cache(tmp_path):
    debs = tmp_path / "cache" / "livecd" / "debs"
    debs.mkdir(parents=True)
    return tmp_path / "cache"


def fakePackages(debs, kernel="9.9.9-1-amd64"):
    modules = f"lib/modules/{kernel}"
    makeDeb(debs, "linux-image-amd64", "9.9.9-1", {}, depends=f"linux-image-{kernel} (= 9.9.9-1)")
    makeDeb(debs, f"linux-image-{kernel}", "9.9.9-1", {
        f"boot/vmlinuz-{kernel}": b"kernel",
        f"{modules}/modules.builtin": b"kernel/net/packet/af_packet.ko\n",
        f"{modules}/kernel/drivers/virtio/virtio.ko": fakeModule("virtio"),
        f"{modules}/kernel/drivers/virtio/virtio_ring.ko": fakeModule("virtio_ring"),
        f"{modules}/kernel/drivers/virtio/virtio_pci.ko": fakeModule("virtio_pci", "virtio_ring,virtio"),
        f"{modules}/kernel/drivers/net/virtio_net.ko": fakeModule("virtio_net", "virtio_ring,virtio,af_packet"),
        f"{modules}/kernel/drivers/char/virtio_console.ko": fakeModule("virtio_console", "virtio_ring,virtio"),
        f"{modules}/kernel/drivers/net/e1000.ko": fakeModule("e1000"),
    })
    makeDeb(debs, "busybox-static", "1:1.0-1", {"bin/busybox": b"busybox"})
    makeDeb(debs, "isolinux", "3:6.0-1", {"usr/lib/ISOLINUX/isolinux.bin": b"isolinux"})
    makeDeb(debs, "syslinux-common", "3:6.0-1", {"usr/lib/syslinux/modules/bios/ldlinux.c32": b"ldlinux"})
    gnu = "x86_64-linux-gnu"
    makeDeb(debs, "dropbear-bin", "2022.83-1", {"usr/sbin/dropbear": fakeELF(
        "/lib64/ld-linux-x86-64.so.2", ["libtomcrypt.so.1", "libz.so.1", "libc.so.6"])})
    makeDeb(debs, "libc6", "2.36-9", {
        f"lib/{gnu}/ld-linux-x86-64.so.2": fakeELF(soname="ld-linux-x86-64.so.2"),
        "lib64/ld-linux-x86-64.so.2": f"/lib/{gnu}/ld-linux-x86-64.so.2",
        f"lib/{gnu}/libc.so.6": fakeELF(needed=["ld-linux-x86-64.so.2"], soname="libc.so.6"),
        f"lib/{gnu}/libm.so.6": fakeELF(needed=["libc.so.6"], soname="libm.so.6"),
        "usr/share/doc/libc6/changelog.gz": b"not kept",
    })
    makeDeb(debs, "libtomcrypt1", "1.18.2-6", {
        f"usr/lib/{gnu}/libtomcrypt.so.1": fakeELF(needed=["libgmp.so.10", "libc.so.6"],
                                                   soname="libtomcrypt.so.1")})
    makeDeb(debs, "libgmp10", "2:6.2.1", {
        f"usr/lib/{gnu}/libgmp.so.10": fakeELF(needed=["libc.so.6"], soname="libgmp.so.10")})
    makeDeb(debs, "zlib1g", "1:1.2.13", {
        f"lib/{gnu}/libz.so.1": fakeELF(needed=["libc.so.6"], soname="libz.so.1")})
    for package in ("libcrypt1", "libtommath1"):
        makeDeb(debs, package, "1.0-1", {f"usr/share/doc/{package}/copyright": b"none"})


@needsDpkg
def test_parts_are_unpacked_once_and_then_reused(cache, noApt):
    fakePackages(cache / "livecd" / "debs")
    parts = PartsCache(str(cache)).fetch()
    assert parts.kernelVersion == "9.9.9-1-amd64"
    assert open(parts.kernel, "rb").read() == b"kernel"
    assert open(parts.busybox, "rb").read() == b"busybox"
    assert open(parts.isolinux, "rb").read() == b"isolinux"
    assert open(parts.ldlinux, "rb").read() == b"ldlinux"
    assert [rel for _, rel in parts.modules] == [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_pci.ko",
        "kernel/drivers/net/virtio_net.ko",
        "kernel/drivers/char/virtio_console.ko",
    ]
    assert parts.packages["busybox-static"] == "1:1.0-1"
    assert parts.packages["dropbear-bin"] == "2022.83-1"
    gnu = "x86_64-linux-gnu"
    assert [guest for _, guest in parts.ssh] == [
        "usr/sbin/dropbear", "lib64/ld-linux-x86-64.so.2", f"usr/lib/{gnu}/libtomcrypt.so.1",
        f"lib/{gnu}/libz.so.1", f"lib/{gnu}/libc.so.6", f"usr/lib/{gnu}/libgmp.so.10",
    ], "dropbear, its loader and the libraries it loads, nothing else of their packages"
    ssh = dict((guest, host) for host, guest in parts.ssh)
    assert open(ssh["lib64/ld-linux-x86-64.so.2"], "rb").read().startswith(b"\x7fELF")
    assert not os.path.islink(ssh["lib64/ld-linux-x86-64.so.2"])
    folder = cache / "livecd" / "parts-9.9.9-1-amd64"
    assert json.loads((folder / "parts.json").read_text())["kernel_version"] == "9.9.9-1-amd64"
    assert not (folder / "modules" / "kernel" / "drivers" / "net" / "e1000.ko").exists(), \
        "only the modules the guest needs are kept"
    assert [n for n in os.listdir(cache / "livecd") if n.startswith(".")] == []

    shutil.rmtree(cache / "livecd" / "debs")
    assert PartsCache(str(cache)).fetch() == parts, "the cache alone is enough"


@needsDpkg
def test_an_interrupted_unpack_is_redone(cache, noApt):
    fakePackages(cache / "livecd" / "debs")
    parts = PartsCache(str(cache)).fetch()
    os.unlink(parts.busybox)
    again = PartsCache(str(cache)).fetch()
    assert open(again.busybox, "rb").read() == b"busybox"


@needsDpkg
def test_parts_of_an_older_format_are_unpacked_again(cache, noApt):
    fakePackages(cache / "livecd" / "debs")
    parts = PartsCache(str(cache)).fetch()
    manifest = cache / "livecd" / "parts-9.9.9-1-amd64" / "parts.json"
    old = json.loads(manifest.read_text())
    old["format"] = 1
    del old["ssh"]
    manifest.write_text(json.dumps(old))
    again = PartsCache(str(cache)).fetch()
    assert again == parts
    assert json.loads(manifest.read_text())["format"] == livecdparts.PARTS_FORMAT


@needsDpkg
def test_a_library_the_ssh_server_needs_and_no_package_has_is_named(cache, noApt):
    debs = cache / "livecd" / "debs"
    fakePackages(debs)
    for deb in debs.glob("libgmp10_*.deb"):
        deb.unlink()
    shutil.rmtree(debs.parent / "build" / "libgmp10")
    makeDeb(debs, "libgmp10", "2:6.2.2", {"usr/share/doc/libgmp10/copyright": b"moved"})
    with pytest.raises(ImageError) as e:
        PartsCache(str(cache)).fetch()
    assert str(e.value) == (
        "the ssh server from dropbear-bin_2022.83-1_amd64.deb: library libgmp.so.10 "
        "(needed by libtomcrypt.so.1) is in none of the packages' library folders "
        "(lib/x86_64-linux-gnu, usr/lib/x86_64-linux-gnu, lib64, usr/lib64, lib, usr/lib)")


def test_without_apt_get_the_message_names_what_is_missing(cache, noApt):
    with pytest.raises(ImageError) as e:
        PartsCache(str(cache)).fetch()
    message = str(e.value)
    assert "apt-get is not installed" in message
    for package in ("linux-image-amd64", "busybox-static", "isolinux", "syslinux-common",
                    "dropbear-bin", "libtomcrypt1"):
        assert package in message
    assert "\n" not in message


def test_a_failed_download_says_why(cache, monkeypatch, tmp_path):
    fakeApt = tmp_path / "bin" / "apt-get"
    fakeApt.parent.mkdir()
    fakeApt.write_text("#!/bin/sh\necho 'E: Unable to locate package linux-image-amd64' >&2\nexit 100\n")
    fakeApt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fakeApt.parent}:{os.environ['PATH']}")
    with pytest.raises(ImageError, match="apt-get download linux-image-amd64 failed: E: Unable to locate package"):
        PartsCache(str(cache)).fetch()


def test_the_default_cache(monkeypatch):
    monkeypatch.delenv("CPUSHARE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert defaultCache() == "/x/cache/cpushare"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert defaultCache() == os.path.expanduser("~/.cache/cpushare")
    monkeypatch.setenv("CPUSHARE_CACHE", "/y")
    assert defaultCache() == "/y"
