"""
The parts of the reference livecd, taken from Debian packages.

    linux-image-amd64     the kernel (vmlinuz) and the modules the guest
                          needs for its virtio-net NIC
    busybox-static        one static binary: shell, mount, insmod, udhcpc, ip
    isolinux              isolinux.bin, the El Torito boot loader
    syslinux-common       ldlinux.c32, which isolinux.bin loads
    dropbear-bin          the ssh server, and from libc6, libcrypt1,
                          libgmp10, libtomcrypt1, libtommath1 and zlib1g
                          the dynamic loader and the libraries it loads

`apt-get download` fetches the .deb files (no root needed) into
CACHE/livecd/debs/, `dpkg-deb -x` unpacks them, and only the files the
livecd uses are kept, under CACHE/livecd/parts-*/ with a parts.json that is
written last (a folder without it is an interrupted extraction and is
redone).  Later builds reuse the cache without calling apt at all; delete
the folder to pick up a newer kernel.  .deb files already in debs/ are used
as they are, so a machine without apt can build from .debs copied there.

CACHE is --cache, else $CPUSHARE_CACHE, else $XDG_CACHE_HOME/cpushare, else
~/.cache/cpushare.
"""

import glob
import json
import os
import shutil
import subprocess
import tempfile

import attr

from cpushare.vm.elflibs import LibraryError, libraryClosure, resolve
from cpushare.vm.isoimage import ImageError
from cpushare.vm.kmodules import ModuleError, indexModules, loadOrder

KERNEL_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
ISOLINUX_PACKAGE = "isolinux"
SYSLINUX_PACKAGE = "syslinux-common"
SSH_PACKAGE = "dropbear-bin"
SSH_PROGRAM = "usr/sbin/dropbear"
# Only the shared objects dropbear loads are kept of these.
SSH_LIBRARY_PACKAGES = ("libc6", "libcrypt1", "libgmp10", "libtomcrypt1", "libtommath1", "zlib1g")

# virtio-net-pci and the virtio-serial result port are the only devices the
# guest needs a driver for (the serial console, the cdrom the boot loader
# reads and the initramfs need none).
GUEST_MODULES = ("virtio_pci", "virtio_net", "virtio_console")

PARTS_FORMAT = 2


def defaultCache():
    """The cache folder: $CPUSHARE_CACHE, $XDG_CACHE_HOME/cpushare or ~/.cache/cpushare."""
    if os.environ.get("CPUSHARE_CACHE"):
        return os.environ["CPUSHARE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "cpushare")


@attr.s(frozen=True)
class LivecdParts:
    """Host paths of everything the reference livecd is made from."""

    kernel = attr.ib()          # vmlinuz
    kernelVersion = attr.ib()   # "6.1.0-56-amd64"
    modules = attr.ib()         # (host path, path under lib/modules/VERSION/), in load order
    busybox = attr.ib()
    isolinux = attr.ib()        # isolinux.bin
    ldlinux = attr.ib()         # ldlinux.c32
    packages = attr.ib(factory=dict)  # {package: version}, for the record
    # (host path, path in the guest) of the ssh server, then of its loader and libraries
    ssh = attr.ib(default=())


def _run(argv, cwd=None):
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageError(f"{argv[0]} is not installed; {_NEEDS}")


_NEEDS = (
    "the reference livecd is made from the Debian packages "
    f"{KERNEL_PACKAGE}, {BUSYBOX_PACKAGE}, {ISOLINUX_PACKAGE}, {SYSLINUX_PACKAGE}, "
    f"{SSH_PACKAGE} and its libraries {', '.join(SSH_LIBRARY_PACKAGES)}, "
    "fetched with apt-get and unpacked with dpkg-deb (Debian or Ubuntu)"
)


def _lastLine(text):
    lines = [line for line in text.strip().splitlines() if not line.startswith("W:")]
    return lines[-1] if lines else "no message"


class PartsCache:
    """The livecd part of the cache folder; C{fetch} returns L{LivecdParts}."""

    def __init__(self, cache=None, note=lambda message: None):
        self.root = os.path.join(cache or defaultCache(), "livecd")
        self.debs = os.path.join(self.root, "debs")
        self._note = note

    def fetch(self):
        """The parts, from the cache, else downloaded and unpacked into it."""
        cached = self._cached()
        if cached is not None:
            return cached
        os.makedirs(self.debs, exist_ok=True)
        kernelDeb = self._kernelDeb()
        busyboxDeb = self._deb(BUSYBOX_PACKAGE)
        isolinuxDeb = self._deb(ISOLINUX_PACKAGE)
        syslinuxDeb = self._deb(SYSLINUX_PACKAGE)
        sshDebs = [self._deb(p) for p in (SSH_PACKAGE,) + SSH_LIBRARY_PACKAGES]
        self._note(f"unpacking the livecd parts into {self.root}")
        return self._extract(kernelDeb, busyboxDeb, isolinuxDeb, syslinuxDeb, sshDebs)

    def _manifests(self):
        return sorted(glob.glob(os.path.join(self.root, "parts-*", "parts.json")))

    def _cached(self):
        for manifest in reversed(self._manifests()):
            try:
                with open(manifest) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                continue
            if info.get("format") != PARTS_FORMAT or info.get("wanted") != list(GUEST_MODULES):
                continue
            folder = os.path.dirname(manifest)
            parts = LivecdParts(
                kernel=os.path.join(folder, info["kernel"]),
                kernelVersion=info["kernel_version"],
                modules=tuple((os.path.join(folder, m), m.split("/", 1)[1]) for m in info["modules"]),
                busybox=os.path.join(folder, info["busybox"]),
                isolinux=os.path.join(folder, info["isolinux"]),
                ldlinux=os.path.join(folder, info["ldlinux"]),
                packages=info.get("packages", {}),
                ssh=tuple((os.path.join(folder, "ssh", g), g) for g in info.get("ssh", ())),
            )
            paths = [parts.kernel, parts.busybox, parts.isolinux, parts.ldlinux,
                     *(path for path, _ in parts.modules), *(path for path, _ in parts.ssh)]
            if all(os.path.isfile(p) for p in paths):
                return parts
        return None

    def _debsNamed(self, package):
        return sorted(glob.glob(os.path.join(self.debs, f"{package}_*.deb")))

    def _download(self, package):
        if shutil.which("apt-get") is None:
            raise ImageError(
                f"apt-get is not installed, so package {package} cannot be fetched; "
                f"{_NEEDS}; or put its .deb in {self.debs}"
            )
        self._note(f"downloading {package} with apt-get into {self.debs}")
        done = _run(["apt-get", "download", package], cwd=self.debs)
        if done.returncode != 0:
            raise ImageError(
                f"apt-get download {package} failed: {_lastLine(done.stderr)} "
                "(is the package index up to date? apt-get update)"
            )

    def _deb(self, package):
        found = self._debsNamed(package)
        if not found:
            self._download(package)
            found = self._debsNamed(package)
            if not found:
                raise ImageError(f"apt-get download {package} left no .deb in {self.debs}")
        return found[-1]

    def _field(self, deb, field):
        done = _run(["dpkg-deb", "--field", deb, field])
        if done.returncode != 0:
            raise ImageError(f"{deb} is not a readable Debian package: {_lastLine(done.stderr)}")
        return done.stdout.strip()

    def _kernelDeb(self):
        """The real kernel package that linux-image-amd64 points to."""
        meta = self._deb(KERNEL_PACKAGE)
        depends = self._field(meta, "Depends")
        image = depends.split(",")[0].split("|")[0].split("(")[0].strip()
        if not image.startswith("linux-image-"):
            raise ImageError(f"{meta} depends on {depends!r}, not on a linux-image package")
        return self._deb(image)

    def _unpack(self, deb, into):
        done = _run(["dpkg-deb", "-x", deb, into])
        if done.returncode != 0:
            raise ImageError(f"dpkg-deb -x {deb} failed: {_lastLine(done.stderr)}")

    def _extract(self, kernelDeb, busyboxDeb, isolinuxDeb, syslinuxDeb, sshDebs):
        packages = {}
        for deb in (kernelDeb, busyboxDeb, isolinuxDeb, syslinuxDeb, *sshDebs):
            packages[self._field(deb, "Package")] = self._field(deb, "Version")
        kernelVersion = os.path.basename(kernelDeb).split("_")[0][len("linux-image-"):]
        if kernelVersion.endswith("-unsigned"):
            kernelVersion = kernelVersion[: -len("-unsigned")]
        final = os.path.join(self.root, f"parts-{kernelVersion}")
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".unpack-") as scratch:
            unpacked = os.path.join(scratch, "debs")
            for deb in (kernelDeb, busyboxDeb, isolinuxDeb, syslinuxDeb, *sshDebs):
                self._unpack(deb, unpacked)
            staging = os.path.join(scratch, "parts")
            os.makedirs(os.path.join(staging, "modules"))

            def keep(source, name, what):
                if not os.path.isfile(source):
                    raise ImageError(f"{what} is missing: no {os.path.relpath(source, unpacked)}")
                target = os.path.join(staging, name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(source, target)
                return name

            moduleRoot = os.path.join(unpacked, "lib", "modules", kernelVersion)
            if not os.path.isdir(moduleRoot):
                moduleRoot = os.path.join(unpacked, "usr", "lib", "modules", kernelVersion)
            builtinPath = os.path.join(moduleRoot, "modules.builtin")
            builtin = open(builtinPath).read().split() if os.path.exists(builtinPath) else []
            try:
                order = loadOrder(GUEST_MODULES, indexModules(moduleRoot), builtin)
            except ModuleError as e:
                raise ImageError(f"{os.path.basename(kernelDeb)}: {e}")
            try:
                libraries = libraryClosure(unpacked, SSH_PROGRAM)
                sshFiles = [(SSH_PROGRAM, resolve(unpacked, SSH_PROGRAM))] + libraries
            except LibraryError as e:
                raise ImageError(f"the ssh server from {os.path.basename(sshDebs[0])}: {e}")
            info = {
                "format": PARTS_FORMAT,
                "wanted": list(GUEST_MODULES),
                "kernel_version": kernelVersion,
                "packages": packages,
                "kernel": keep(os.path.join(unpacked, "boot", f"vmlinuz-{kernelVersion}"),
                               "vmlinuz", f"the kernel in {os.path.basename(kernelDeb)}"),
                "modules": [
                    keep(path, os.path.join("modules", os.path.relpath(path, moduleRoot)),
                         f"module {path}")
                    for path in order
                ],
                "busybox": keep(os.path.join(unpacked, "bin", "busybox"), "busybox",
                                f"busybox in {os.path.basename(busyboxDeb)}"),
                "isolinux": keep(os.path.join(unpacked, "usr", "lib", "ISOLINUX", "isolinux.bin"),
                                 "isolinux.bin", f"isolinux.bin in {os.path.basename(isolinuxDeb)}"),
                "ldlinux": keep(
                    os.path.join(unpacked, "usr", "lib", "syslinux", "modules", "bios", "ldlinux.c32"),
                    "ldlinux.c32", f"ldlinux.c32 in {os.path.basename(syslinuxDeb)}"),
                "ssh": [guest for guest, _ in sshFiles],
            }
            for guest, host in sshFiles:
                keep(host, os.path.join("ssh", guest), f"{guest} for the ssh server")
            with open(os.path.join(staging, "parts.json"), "w") as f:
                json.dump(info, f, indent=1)
            if os.path.exists(final) and self._cached() is None:
                shutil.rmtree(final)  # an older format of parts
            try:
                os.rename(staging, final)
            except OSError:
                pass  # another build unpacked the same parts meanwhile
        cached = self._cached()
        if cached is None:
            raise ImageError(f"the livecd parts in {final} are incomplete after unpacking")
        return cached
