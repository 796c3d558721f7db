"""Stand-ins for the Debian parts of the livecd and for other ISOs, for unit tests."""

import io
import os

import pycdlib

from cpushare.vm.livecdparts import LivecdParts


def fakeParts(folder):
    """LivecdParts made of small recognisable files (no download, no boot)."""
    os.makedirs(folder, exist_ok=True)

    def put(name, data):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    modules = []
    for rel in ("kernel/drivers/virtio/virtio.ko", "kernel/drivers/net/virtio_net.ko"):
        modules.append((put(f"modules/{rel}", b"\x7fELF module " + rel.encode()), rel))
    ssh = tuple(
        (put(f"ssh/{guest}", b"\x7fELF fake " + guest.encode()), guest)
        for guest in ("usr/sbin/dropbear", "lib64/ld-linux-x86-64.so.2",
                      "lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libtomcrypt.so.1")
    )
    return LivecdParts(
        kernel=put("vmlinuz", b"fake kernel" * 1000),
        kernelVersion="9.9.9-1-amd64",
        modules=tuple(modules),
        busybox=put("busybox", b"\x7fELF fake busybox" * 100),
        isolinux=put("isolinux.bin", b"\xfa" + b"isolinux" * 511),
        ldlinux=put("ldlinux.c32", b"ldlinux" * 100),
        packages={"linux-image-9.9.9-1-amd64": "9.9.9-1"},
        ssh=ssh,
    )


def otherISO(path, rockRidge=True, joliet=True, efiOnly=False, bootable=True):
    """A small ISO that is not a reference livecd, with an El Torito boot image."""
    iso = pycdlib.PyCdlib()
    kw = {}
    if rockRidge:
        kw["rock_ridge"] = "1.09"
    if joliet:
        kw["joliet"] = 3
    iso.new(vol_ident="OTHER", **kw)

    def add(isoPath, data, name):
        extra = {}
        if rockRidge:
            extra["rr_name"] = name
        if joliet:
            extra["joliet_path"] = "/" + name
        iso.add_fp(io.BytesIO(data), len(data), isoPath, **extra)

    add("/README.TXT;1", b"another system\n", "README.txt")
    if bootable:
        add("/BOOT.IMG;1", b"\xeb\xfe" + b"\0" * 2046, "boot.img")
        iso.add_eltorito("/BOOT.IMG;1", bootcatfile="/BOOT.CAT;1", efi=efiOnly,
                         platform_id=0xEF if efiOnly else 0,
                         rr_bootcatname="boot.cat" if rockRidge else None,
                         joliet_bootcatfile="/boot.cat" if joliet else None)
    iso.write(path)
    iso.close()
    return path
