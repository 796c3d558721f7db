"""
The reference livecd's ISO structure, its initrds and the layers `--base`
adds, read back with pycdlib; made from stand-in parts (no download, no boot:
test/vm/ boots the real thing).
"""

import gzip
import io
import json
import os
import stat
import struct

import pycdlib
import pytest

from cpushare.vm import livecd
from cpushare.vm.cpio import readArchive
from cpushare.vm.isoimage import ImageError, checkBootable
from test.unit.livecdfakes import fakeParts


def job(tmp_path, name="job", start="#!/bin/sh\necho started\n", executable=True):
    folder = tmp_path / name
    (folder / "lib").mkdir(parents=True)
    (folder / "lib" / "data.txt").write_text(f"data of {name}\n")
    if start is not None:
        (folder / "start").write_text(start)
        (folder / "start").chmod(0o755 if executable else 0o644)
    return str(folder)


def opened(path):
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    return iso


def read(iso, path):
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, rr_path=path)
    return out.getvalue()


def initrd(iso, path):
    return {name: (mode, body) for name, mode, body in readArchive(gzip.decompress(read(iso, path)))}


@pytest.fixture
def parts(tmp_path):
    return fakeParts(str(tmp_path / "parts"))


@pytest.fixture
def built(tmp_path, parts):
    output = tmp_path / "job.iso"
    livecd.buildLivecd(str(output), parts, [job(tmp_path)])
    iso = opened(output)
    yield output, iso
    iso.close()


def test_isolinux_boots_from_the_el_torito_catalog(built):
    output, iso = built
    catalog = iso.eltorito_boot_catalog
    assert catalog is not None
    entry = catalog.initial_entry
    assert entry.boot_indicator == 0x88, "bootable"
    assert entry.boot_media_type == 0, "no emulation"
    assert entry.sector_count == 4
    assert catalog.validation_entry.platform_id == 0, "x86 BIOS"
    record = iso.get_record(rr_path="/isolinux/isolinux.bin")
    assert entry.get_rba() == record.extent_location()
    # the boot info table isolinux needs: PVD at 16, its own extent and length
    image = read(iso, "/isolinux/isolinux.bin")
    pvd, extent, length = struct.unpack_from("<III", image, 8)
    assert (pvd, extent, length) == (16, record.extent_location(), len(image))
    info = checkBootable(str(output))
    assert info.platforms == (0,)


def test_isolinux_starts_the_kernel_with_both_initrds_at_once(built):
    _, iso = built
    config = read(iso, "/isolinux/isolinux.cfg").decode()
    lines = [line.strip() for line in config.splitlines()]
    assert "PROMPT 0" in lines and "TIMEOUT 0" in lines
    assert "KERNEL /boot/vmlinuz" in lines
    [append] = [line for line in lines if line.startswith("APPEND ")]
    assert "initrd=/boot/initrd.img,/boot/files1.img" in append.split()
    assert "console=ttyS0" in append.split()
    assert read(iso, "/isolinux/ldlinux.c32").startswith(b"ldlinux")


def test_the_kernel_and_both_initrds_are_on_the_iso(built, parts):
    _, iso = built
    assert read(iso, "/boot/vmlinuz") == open(parts.kernel, "rb").read()
    names = {name for _, _, files in iso.walk(rr_path="/boot") for name in files}
    assert names == {"vmlinuz", "initrd.img", "files1.img"}
    jolietNames = {name for _, _, files in iso.walk(joliet_path="/boot") for name in files}
    assert jolietNames == names


def test_the_system_initrd_holds_busybox_init_and_the_nic_modules(built, parts):
    _, iso = built
    system = initrd(iso, "/boot/initrd.img")
    mode, init = system["init"]
    assert mode == stat.S_IFREG | 0o755
    init = init.decode()
    assert init.startswith("#!/bin/busybox sh\n")
    for step in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs", "insmod",
                 "udhcpc -i eth0", "CPUSHARE-READY mac=", "/cpushare/start", "exec /bin/busybox init"):
        assert step in init
    assert system["bin/busybox"] == (stat.S_IFREG | 0o755, open(parts.busybox, "rb").read())
    assert stat.S_ISCHR(system["dev/console"][0])
    assert "ttyS0::respawn:" in system["etc/inittab"][1].decode()
    assert system["etc/cpushare/udhcpc.sh"][0] == stat.S_IFREG | 0o755
    modules = system["etc/cpushare/modules"][1].decode().split()
    assert modules == [
        "lib/modules/9.9.9-1-amd64/kernel/drivers/virtio/virtio.ko",
        "lib/modules/9.9.9-1-amd64/kernel/drivers/net/virtio_net.ko",
    ]
    for module in modules:
        assert system[module][1].startswith(b"\x7fELF")


def test_the_buyers_files_are_a_layer_at_cpushare(built):
    _, iso = built
    files = initrd(iso, "/boot/files1.img")
    assert files["cpushare/start"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\necho started\n")
    assert files["cpushare/lib/data.txt"][1] == b"data of job\n"
    assert stat.S_ISDIR(files["cpushare"][0])


def test_the_iso_says_what_it_is(built):
    _, iso = built
    info = json.loads(read(iso, "/cpushare-livecd.json"))
    assert info["format"] == "cpushare-livecd"
    assert info["initrds"] == ["/boot/initrd.img", "/boot/files1.img"]
    assert info["kernel_version"] == "9.9.9-1-amd64"
    assert info["files_at"] == "/cpushare"
    assert livecd.readMarker(iso) == info


def test_without_files_there_is_no_layer(tmp_path, parts):
    output = tmp_path / "plain.iso"
    livecd.buildLivecd(str(output), parts)
    iso = opened(output)
    try:
        assert "initrd=/boot/initrd.img " in read(iso, "/isolinux/isolinux.cfg").decode()
        names = {name for _, _, files in iso.walk(rr_path="/boot") for name in files}
        assert names == {"vmlinuz", "initrd.img"}
    finally:
        iso.close()


def test_adding_to_a_reference_livecd_adds_a_layer(tmp_path, built):
    base, _ = built
    more = job(tmp_path, "more", start="#!/bin/sh\necho second\n")
    output = tmp_path / "more.iso"
    result = livecd.build(str(output), [more], base=str(base))
    assert "in initrd layer 2" in result.description
    iso = opened(output)
    try:
        config = read(iso, "/isolinux/isolinux.cfg").decode()
        assert "initrd=/boot/initrd.img,/boot/files1.img,/boot/files2.img" in config
        assert initrd(iso, "/boot/files1.img")["cpushare/lib/data.txt"][1] == b"data of job\n"
        assert initrd(iso, "/boot/files2.img")["cpushare/start"][1] == b"#!/bin/sh\necho second\n"
        assert json.loads(read(iso, "/cpushare-livecd.json"))["initrds"][-1] == "/boot/files2.img"
        assert iso.eltorito_boot_catalog is not None
    finally:
        iso.close()
    checkBootable(str(output))
    assert result.size == os.path.getsize(output)
    assert len(result.sha256) == 64


def test_later_folders_win_and_a_non_executable_start_is_noted(tmp_path, built):
    base, _ = built
    first = job(tmp_path, "first", start="#!/bin/sh\necho one\n")
    second = job(tmp_path, "second", start="#!/bin/sh\necho two\n", executable=False)
    output = tmp_path / "out.iso"
    result = livecd.build(str(output), [first, second], base=str(base))
    assert any("start is not an executable file" in n for n in result.notes)
    iso = opened(output)
    try:
        files = initrd(iso, "/boot/files2.img")
        assert files["cpushare/start"] == (stat.S_IFREG | 0o644, b"#!/bin/sh\necho two\n")
        assert files["cpushare/lib/data.txt"][1] == b"data of second\n"
    finally:
        iso.close()


def test_a_name_that_is_a_folder_in_one_add_and_a_file_in_another_is_refused(tmp_path, built):
    base, _ = built
    first = job(tmp_path, "first")
    second = tmp_path / "second"
    second.mkdir()
    (second / "lib").write_text("not a folder")
    with pytest.raises(ImageError, match="one is a folder and the other not"):
        livecd.build(str(tmp_path / "out.iso"), [first, str(second)], base=str(base))


def test_base_needs_files_to_add(tmp_path, built):
    base, _ = built
    with pytest.raises(ImageError, match="--base needs --add"):
        livecd.build(str(tmp_path / "out.iso"), [], base=str(base))


def test_add_must_be_a_folder(tmp_path, built):
    base, _ = built
    with pytest.raises(ImageError, match="not a folder"):
        livecd.build(str(tmp_path / "out.iso"), [str(tmp_path / "missing")], base=str(base))


def test_the_output_folder_must_exist(tmp_path, built):
    base, _ = built
    with pytest.raises(ImageError, match="no folder"):
        livecd.build(str(tmp_path / "no" / "out.iso"), [job(tmp_path, "other")], base=str(base))


def test_a_build_reuses_the_parts_in_the_cache_without_apt(tmp_path, monkeypatch):
    from cpushare.vm import livecdparts

    cache = tmp_path / "cache"
    folder = cache / "livecd" / "parts-9.9.9-1-amd64"
    parts = fakeParts(str(folder))
    (folder / "parts.json").write_text(json.dumps({
        "format": livecdparts.PARTS_FORMAT,
        "wanted": list(livecdparts.GUEST_MODULES),
        "kernel_version": parts.kernelVersion,
        "packages": parts.packages,
        "kernel": "vmlinuz",
        "modules": [f"modules/{rel}" for _, rel in parts.modules],
        "busybox": "busybox",
        "isolinux": "isolinux.bin",
        "ldlinux": "ldlinux.c32",
    }))
    monkeypatch.setattr(livecdparts.shutil, "which", lambda name: None)
    result = livecd.build(str(tmp_path / "job.iso"), [job(tmp_path)], cache=str(cache))
    assert result.description == (
        "reference livecd (Linux 9.9.9-1-amd64, busybox) with 2 files at /cpushare/")


@pytest.mark.parametrize("line, fields", [
    ("CPUSHARE-READY mac=52:54:00:12:34:56 ip=10.0.2.15/24 gw=10.0.2.2 uptime=2.49",
     dict(mac="52:54:00:12:34:56", ip="10.0.2.15/24", address="10.0.2.15", prefix=24,
          gw="10.0.2.2", uptime=2.49)),
    ("\x1bc\x1b[2JCPUSHARE-READY mac=52:54:00:00:00:01 ip=none gw=none uptime=31.07\r",
     dict(mac="52:54:00:00:00:01", ip=None, address=None, prefix=None, gw=None, uptime=31.07)),
])
def test_readiness_lines_parse(line, fields):
    assert livecd.parseReady(line) == fields


@pytest.mark.parametrize("line", ["", "CPUSHARE-READY", "hello", "CPUSHARE-READY mac=x ip=y gw=z uptime=1"])
def test_other_lines_are_not_readiness_lines(line):
    assert livecd.parseReady(line) is None


def test_the_readiness_line_the_guest_prints_is_the_one_parsed():
    # the echo in /init, with the shell variables filled in
    [echo] = [line for line in livecd.INIT.splitlines() if "CPUSHARE-READY" in line]
    printed = (echo.split('"')[1]
               .replace("$mac", "52:54:00:ab:cd:ef").replace("${ip:-none}", "192.168.7.20/24")
               .replace("${gw:-none}", "none").replace("$(cut -d' ' -f1 /proc/uptime)", "3.50"))
    assert livecd.READY_FORMAT.format(
        mac="52:54:00:ab:cd:ef", ip="192.168.7.20/24", gw="none", uptime="3.50") == printed
    assert livecd.parseReady(printed)["address"] == "192.168.7.20"
