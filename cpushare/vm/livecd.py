"""
The reference livecd: a Debian kernel and a busybox initramfs on an
isolinux ISO, built with pycdlib and no privileges.  It is both the demo
image and the base a buyer adds grid software to (`cpushare image build`).

The ISO:

    /isolinux/isolinux.bin   El Torito no-emulation boot image (boot info table)
    /isolinux/boot.cat       the El Torito boot catalog
    /isolinux/ldlinux.c32    isolinux's second stage
    /isolinux/isolinux.cfg   boots straight away: no prompt, no timeout
    /boot/vmlinuz            the Debian kernel
    /boot/initrd.img         the system: busybox, /init, the virtio-net and
                             virtio-console modules, cpushare-result,
                             the dropbear ssh server and its libraries
    /boot/files1.img ...     one cpio layer per build that added files
    /cpushare-livecd.json    what this is: format, kernel, cmdline, initrds

isolinux hands every initrd to the kernel (initrd=a,b,...), which unpacks
them in order into the same RAM file system, so a buyer's files are at
/cpushare/ in the guest without the guest touching its cdrom; a later layer
replaces equal names of an earlier one.  Adding files to a reference ISO
(`--base`) adds a layer and rewrites only isolinux.cfg and the JSON.

The guest's /init mounts proc, sys and devtmpfs, loads the virtio-net
modules, starts the ssh server (dropbear: root, by public key only; its
host keys made at the first connection), asks DHCP for eth0's address
(udhcpc), waits until the ssh server listens, prints one readiness line
on the serial console (see L{READY_FORMAT}), starts /cpushare/start in the
background if it is executable (its output on the console, then a
"CPUSHARE-START-EXIT status=N" line), and hands over to busybox init, which
keeps a root shell on ttyS0 and powers the VM off on `poweroff`.

The public keys that may log in as root (`--ssh-key`) are in the files
layer of the build that added them, as /etc/cpushare/authorized_keys.d/filesN
(N the layer's number), so a `--base` build adds keys to those of its base;
/init joins them into /root/.ssh/authorized_keys.
"""

import base64
import glob
import gzip
import io
import json
import os
import re
import stat
import struct
import tempfile

import attr
import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from cpushare.imagefolder import hashFile
from cpushare.vm import isoimage
from cpushare.vm.cpio import CpioWriter, walkTree
from cpushare.vm.isoimage import ImageError
from cpushare.vm.kmodules import readModule

FORMAT = "cpushare-livecd"
FORMAT_VERSION = 1
GUEST_FILES = "/cpushare"
CMDLINE = "console=ttyS0 quiet panic=1"

MARKER_ISO = "/LIVECD.JSN;1"
MARKER_NAME = "cpushare-livecd.json"
CONFIG_ISO = "/ISOLINUX/ISOLINUX.CFG;1"
SYSTEM_INITRD = "/boot/initrd.img"
KERNEL = "/boot/vmlinuz"

READY_FORMAT = "CPUSHARE-READY mac={mac} ip={ip} gw={gw} uptime={uptime}"
READY = re.compile(
    r"CPUSHARE-READY mac=(?P<mac>[0-9a-f:]{17}|none) ip=(?P<ip>[0-9.]+/[0-9]+|none)"
    r" gw=(?P<gw>[0-9.]+|none) uptime=(?P<uptime>[0-9]+(?:\.[0-9]+)?)"
)
START_EXIT = re.compile(r"CPUSHARE-START-EXIT status=(?P<status>[0-9]+)")

SSH_SERVER = "dropbear"
KEYS_FOLDER = "etc/cpushare/authorized_keys.d"
# The key types the guest's dropbear (2022.83) takes in authorized_keys.
SSH_KEY_TYPES = (
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "ssh-rsa", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
)
MAX_KEY_FILE = 1 << 20
KEY_LINE = re.compile(r"(?:^|\s)(?P<type>[A-Za-z0-9@._-]+)\s+(?P<blob>AAAA[A-Za-z0-9+/]+={0,2})(?:\s|$)")


def parseReady(line):
    """
    The fields of a readiness line (anywhere in C{line}) as a dict --
    mac, ip ("10.0.2.15/24"), address, prefix, gw (None when "none") and
    uptime (seconds since the guest kernel started, a float) -- or None.
    """
    m = READY.search(line)
    if m is None:
        return None
    found = {k: (None if v == "none" else v) for k, v in m.groupdict().items()}
    found["uptime"] = float(found["uptime"])
    address, prefix = (found["ip"].split("/") if found["ip"] else (None, None))
    found["address"] = address
    found["prefix"] = int(prefix) if prefix else None
    return found


# The guest's /init.  The readiness line is printed exactly once, whether or
# not DHCP answered in time (ip=none then; udhcpc keeps trying in the
# background and applies a later lease).
INIT = r"""#!/bin/busybox sh
# /init of the CPUShare reference livecd, written by `cpushare image build`.
echo  # end whatever line the firmware left on the console
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/cpushare
hostname cpushare
ip link set lo up
while read -r module; do
    insmod "/$module" || echo "cpushare: cannot load $module"
done < /etc/cpushare/modules
mkdir -p -m 700 /root/.ssh
if [ -d /etc/cpushare/authorized_keys.d ]; then
    cat /etc/cpushare/authorized_keys.d/* > /root/.ssh/authorized_keys
    chmod 600 /root/.ssh/authorized_keys
fi
if [ -x /usr/sbin/dropbear ]; then
    # root by public key only (-s); host keys made at the first connection (-R)
    /usr/sbin/dropbear -F -E -R -s -P /run/dropbear.pid >/run/cpushare/sshd.log 2>&1 &
fi
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do usleep 100000; i=$((i + 1)); done
mac=none ip= gw=
if [ -e /sys/class/net/eth0 ]; then
    mac=$(cat /sys/class/net/eth0/address)
    ip link set eth0 up
    if [ -e /cpushare/no-network ]; then
        echo "cpushare: /cpushare/no-network is there: not asking DHCP for an address"
    else
        udhcpc -i eth0 -s /etc/cpushare/udhcpc.sh -t 10 -T 2 -b >/run/cpushare/udhcpc.log 2>&1
        ip=$(ip -4 -o addr show dev eth0 | awk '{print $4; exit}')
        gw=$(ip -4 route show default | awk '{print $3; exit}')
    fi
else
    echo "cpushare: no network interface eth0"
fi
if [ -x /usr/sbin/dropbear ]; then
    i=0
    while ! grep -q ' 00000000:0016 00000000:0000 0A ' /proc/net/tcp && [ $i -lt 50 ]; do
        usleep 100000; i=$((i + 1))
    done
    [ $i -lt 50 ] || echo "cpushare: the ssh server is not listening; see /run/cpushare/sshd.log"
fi
echo "CPUSHARE-READY mac=$mac ip=${ip:-none} gw=${gw:-none} uptime=$(cut -d' ' -f1 /proc/uptime)"
export CPUSHARE_MAC=$mac CPUSHARE_IP=$ip CPUSHARE_GW=$gw
if [ -f /cpushare/start ]; then
    if [ -x /cpushare/start ]; then
        (cd /cpushare && ./start </dev/null; echo "CPUSHARE-START-EXIT status=$?") >/dev/console 2>&1 &
    else
        echo "cpushare: /cpushare/start is not executable; not run"
    fi
fi
exec /bin/busybox init
"""

INITTAB = """\
# busybox init of the CPUShare livecd: a root shell on the serial console.
ttyS0::respawn:-/bin/sh
::shutdown:/bin/sync
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event script of the CPUShare livecd: applies the lease to $interface.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    prefix=$mask
    [ -n "$prefix" ] || prefix=$(ipcalc -p "$ip" "$subnet" | cut -d= -f2)
    [ "$1" = bound ] && ip -4 addr flush dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    ip addr replace "$ip/${prefix:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : > /etc/resolv.conf.new
    [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf.new
    for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf.new; done
    mv /etc/resolv.conf.new /etc/resolv.conf
    ;;
esac
exit 0
"""

PROFILE = r"""export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
export PS1='\h:\w\$ '
cd /cpushare 2>/dev/null || cd /root
"""


RESULT_SCRIPT = r"""#!/bin/sh
# cpushare-result FILE: send FILE to the seller as this VM's result, on the
# virtio-serial port org.cpushare.result: a line "CPUSHARE-RESULT <size>",
# then the bytes.  The seller hashes them and the buyer sees the digest in
# `cpushare results ORDER`; one result a VM (the first whole one counts).
if [ $# -ne 1 ] || [ ! -f "$1" ] || [ ! -r "$1" ]; then
    echo "usage: cpushare-result FILE (a file this user can read)" >&2
    exit 2
fi
port=${CPUSHARE_RESULT_PORT:-/dev/virtio-ports/org.cpushare.result}
i=0
while [ ! -e "$port" ] && [ $i -lt 50 ]; do
    # No udev here: find the port by its name and link it where udev would
    # (the driver may still be adding it just after boot).
    for dir in /sys/class/virtio-ports/*; do
        if [ "$(cat "$dir/name" 2>/dev/null)" = org.cpushare.result ]; then
            mkdir -p /dev/virtio-ports
            ln -sf "../${dir##*/}" "$port"
        fi
    done
    [ -e "$port" ] || usleep 100000
    i=$((i + 1))
done
if [ ! -e "$port" ]; then
    echo "cpushare-result: no port org.cpushare.result (is virtio_console loaded?)" >&2
    exit 1
fi
size=$(($(wc -c < "$1")))
{ printf 'CPUSHARE-RESULT %d\n' "$size" && head -c "$size" "$1"; } > "$port" || exit 1
echo "cpushare-result: sent $size bytes of $1"
"""

NSSWITCH = """\
passwd: files
group: files
shadow: files
"""


def isolinuxConfig(initrds, cmdline):
    return (
        "# CPUShare reference livecd, made by `cpushare image build`; see /cpushare-livecd.json\n"
        "DEFAULT cpushare\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL cpushare\n"
        f"  KERNEL {KERNEL}\n"
        f"  APPEND initrd={','.join(initrds)} {cmdline}\n"
    )


def _gzipped(path, level):
    raw = open(path, "wb")
    return raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0)


def writeSystemInitrd(parts, path):
    """The system initrd: busybox, /init, its config files, the modules and the ssh server."""
    raw, out = _gzipped(path, 9)
    with raw, out:
        archive = CpioWriter(out)
        for folder in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/cpushare", "proc", "sys",
                       "dev", "run", "var", "mnt", "root", GUEST_FILES):
            archive.addDirectory(folder, 0o700 if folder == "root" else 0o755)
        archive.addDirectory("tmp", 0o1777)
        archive.addCharDevice("dev/console", 5, 1, 0o600)
        archive.addCharDevice("dev/null", 1, 3, 0o666)
        archive.addFile("bin/busybox", parts.busybox, mode=0o755, mtime=0)
        archive.addSymlink("bin/sh", "busybox")
        archive.addBytes("init", INIT.encode(), 0o755)
        archive.addBytes("etc/inittab", INITTAB.encode())
        archive.addBytes("etc/cpushare/udhcpc.sh", UDHCPC_SCRIPT.encode(), 0o755)
        archive.addBytes("etc/profile", PROFILE.encode())
        archive.addBytes("usr/bin/cpushare-result", RESULT_SCRIPT.encode(), 0o755)
        archive.addBytes("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        archive.addBytes("etc/group", b"root:x:0:\n")
        archive.addBytes("etc/hostname", b"cpushare\n")
        archive.addBytes("etc/shells", b"/bin/sh\n")
        archive.addBytes("etc/nsswitch.conf", NSSWITCH.encode())
        if parts.ssh:
            archive.addDirectory("etc/dropbear", 0o700)
        for host, guest in parts.ssh:
            archive.addFile(guest, host, mode=0o755, mtime=0)
        loaded = []
        for module, rel in parts.modules:
            name = f"lib/modules/{parts.kernelVersion}/{rel}"
            if module.endswith(".xz"):
                name = name[:-3]  # busybox insmod takes plain ELF
                archive.addBytes(name, readModule(module))
            else:
                archive.addFile(name, module, mode=0o644, mtime=0)
            loaded.append(name)
        archive.addBytes("etc/cpushare/modules", "".join(f"{m}\n" for m in loaded).encode())
        archive.close()


def mergedListing(sources):
    """
    {name: (host path, lstat)} of the files of several host folders, later
    folders replacing equal names of earlier ones; a name that is a folder
    in one and not in another is refused.  Parents come before children.
    """
    merged = {}
    for source in sources:
        if not os.path.isdir(source):
            raise ImageError(f"--add {source}: not a folder")
        try:
            for path, rel, st in walkTree(source):
                old = merged.get(rel)
                if old is not None and stat.S_ISDIR(old[1].st_mode) != stat.S_ISDIR(st.st_mode):
                    raise ImageError(
                        f"{path} and {old[0]} have the same name, but one is a folder and the other not"
                    )
                merged[rel] = (path, st)
        except ValueError as e:
            raise ImageError(str(e))
        except OSError as e:
            raise ImageError(f"cannot read {e.filename}: {e.strerror}")
    return merged


def defaultKeyFiles():
    """The public keys of the user building the image: ~/.ssh/id_*.pub."""
    return sorted(glob.glob(os.path.join(os.path.expanduser("~"), ".ssh", "id_*.pub")))


def readPublicKeys(path):
    """
    The lines of the OpenSSH public key file C{path} (one key a line, as
    in authorized_keys); L{ImageError} names what is wrong with it.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise ImageError(f"--ssh-key {path}: cannot read it: {e.strerror}")
    if len(data) > MAX_KEY_FILE:
        raise ImageError(f"--ssh-key {path} is over {MAX_KEY_FILE >> 20} MB: not a public key file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ImageError(f"--ssh-key {path} is not a public key file: it is not text")
    if "PRIVATE KEY" in text:
        public = path if path.endswith(".pub") else f"{path}.pub"
        raise ImageError(f"--ssh-key {path} is a private key; give its public key ({public})")
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = KEY_LINE.search(line)
        if m is None:
            raise ImageError(
                f"--ssh-key {path} line {number} is not an OpenSSH public key "
                "(like \"ssh-ed25519 AAAAC3Nz... you@host\")")
        kind = m.group("type")
        if kind not in SSH_KEY_TYPES:
            raise ImageError(
                f"--ssh-key {path} line {number}: the guest's ssh server takes no {kind} keys, "
                f"only {', '.join(SSH_KEY_TYPES)}")
        try:
            blob = base64.b64decode(m.group("blob"), validate=True)
            length, = struct.unpack_from(">I", blob)
        except (ValueError, struct.error):
            blob, length = b"", 0
        if blob[4:4 + length].decode("ascii", "replace") != kind:
            raise ImageError(f"--ssh-key {path} line {number}: the {kind} key is damaged")
        keys.append(line)
    if not keys:
        raise ImageError(f"--ssh-key {path} holds no public key")
    return keys


def writeFilesLayer(sources, path, keys=(), keysName=None):
    """
    A gzip'ed cpio of the files of C{sources}, under cpushare/, and of the
    ssh public keys C{keys} (authorized_keys lines) as C{keysName} in
    L{KEYS_FOLDER}; returns the entry count.
    """
    listing = mergedListing(sources)
    raw, out = _gzipped(path, 6)
    with raw, out:
        archive = CpioWriter(out)
        if keys:
            archive.addDirectory(KEYS_FOLDER, 0o700)
            archive.addBytes(f"{KEYS_FOLDER}/{keysName}",
                             "".join(f"{key}\n" for key in keys).encode(), 0o600)
        archive.addDirectory(GUEST_FILES, 0o755)
        for rel, (host, st) in listing.items():
            try:
                archive.addPath(f"{GUEST_FILES}/{rel}", host, st)
            except ValueError as e:
                raise ImageError(str(e))
            except OSError as e:
                raise ImageError(f"cannot read {host}: {e.strerror}")
        archive.close()
    return sum(1 for _, st in listing.values() if not stat.S_ISDIR(st.st_mode))


def _startNote(sources):
    """A warning when a start program is there but would not run."""
    for source in reversed(sources):
        start = os.path.join(source, "start")
        if os.path.lexists(start):
            if not os.access(start, os.X_OK) or not os.path.isfile(start):
                return f"{start} is not an executable file; the guest will not run it (chmod +x {start})"
            return None
    return None


@attr.s
class BuildResult:
    """What a build wrote, for the user."""

    path = attr.ib()
    size = attr.ib()
    sha256 = attr.ib()
    description = attr.ib()
    notes = attr.ib(factory=list)


def _layerName(index):
    return f"/boot/files{index}.img"


def _keysName(layerPath):
    """The name of a layer's key file: "files2" for /boot/files2.img."""
    return os.path.splitext(os.path.basename(layerPath))[0]


def _isoPath(guestPath, directory=False):
    return guestPath.upper() + ("" if directory else ";1")


def buildLivecd(output, parts, sources=(), cmdline=CMDLINE, note=lambda message: None, keys=()):
    """
    Write the reference livecd to C{output}, with the files of C{sources}
    and the ssh public keys C{keys} (authorized_keys lines) as a layer.
    """
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kernel_version": parts.kernelVersion,
        "packages": dict(parts.packages),
        "cmdline": cmdline,
        "files_at": GUEST_FILES,
        "initrds": [SYSTEM_INITRD],
    }
    if parts.ssh:
        info["ssh"] = SSH_SERVER
    folder = os.path.dirname(os.path.abspath(output))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as scratch:
        system = os.path.join(scratch, "initrd.img")
        writeSystemInitrd(parts, system)
        layer = None
        if sources or keys:
            layer = os.path.join(scratch, "files.img")
            writeFilesLayer(sources, layer, keys, _keysName(_layerName(1)))
            info["initrds"].append(_layerName(1))
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=1, vol_ident="CPUSHARE", joliet=3, rock_ridge="1.09",
                app_ident_str="CPUSHARE IMAGE BUILD")
        try:
            for d in ("/isolinux", "/boot"):
                iso.add_directory(_isoPath(d, True), rr_name=d[1:], joliet_path=d)

            def add(guestPath, host=None, data=None, mode=0o444):
                kw = dict(iso_path=_isoPath(guestPath), rr_name=os.path.basename(guestPath),
                          joliet_path=guestPath, file_mode=stat.S_IFREG | mode)
                if data is None:
                    iso.add_file(host, **kw)
                else:
                    iso.add_fp(io.BytesIO(data), len(data), **kw)

            add("/isolinux/isolinux.bin", parts.isolinux)
            add("/isolinux/ldlinux.c32", parts.ldlinux)
            add("/isolinux/isolinux.cfg",
                data=isolinuxConfig(info["initrds"], cmdline).encode())
            add(KERNEL, parts.kernel)
            add(SYSTEM_INITRD, system)
            if layer:
                add(_layerName(1), layer)
            _addMarker(iso, info)
            iso.add_eltorito(
                "/ISOLINUX/ISOLINUX.BIN;1", bootcatfile="/ISOLINUX/BOOT.CAT;1",
                rr_bootcatname="boot.cat", joliet_bootcatfile="/isolinux/boot.cat",
                boot_load_size=4, boot_info_table=True, media_name="noemul",
            )
            note(f"writing {output}")
            isoimage.writeAtomically(iso, output)
        finally:
            iso.close()
    return info


def _addMarker(iso, info):
    data = (json.dumps(info, indent=1) + "\n").encode()
    iso.add_fp(io.BytesIO(data), len(data), iso_path=MARKER_ISO, rr_name=MARKER_NAME,
               joliet_path="/" + MARKER_NAME, file_mode=stat.S_IFREG | 0o444)


def readMarker(iso):
    """The JSON of a reference livecd opened in pycdlib, or None for other ISOs."""
    out = io.BytesIO()
    try:
        iso.get_file_from_iso_fp(out, iso_path=MARKER_ISO)
    except PyCdlibException:
        return None
    try:
        info = json.loads(out.getvalue())
    except ValueError:
        return None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        return None
    initrds = info.get("initrds")
    if not isinstance(initrds, list) or not all(isinstance(i, str) for i in initrds):
        raise ImageError(f"the {MARKER_NAME} of this reference livecd is damaged: no list of initrds")
    return info


def addLayer(base, iso, info, sources, output, note=lambda message: None, keys=()):
    """
    Write C{output}: the reference livecd C{iso} (open, from C{base}) plus
    a layer of files and ssh public keys.
    """
    if info.get("version") != FORMAT_VERSION:
        raise ImageError(
            f"{os.path.basename(base)} is a reference livecd of format version "
            f"{info.get('version')}; this program handles version {FORMAT_VERSION}"
        )
    if keys and info.get("ssh") != SSH_SERVER:
        raise ImageError(
            f"{os.path.basename(base)} has no ssh server (an older cpushare made it), so "
            "--ssh-key cannot be used with it; build a new reference livecd instead"
        )
    info = dict(info, initrds=list(info["initrds"]))
    index = len(info["initrds"])
    while _layerName(index) in info["initrds"]:
        index += 1
    layerPath = _layerName(index)
    folder = os.path.dirname(os.path.abspath(output))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as scratch:
        layer = os.path.join(scratch, "files.img")
        writeFilesLayer(sources, layer, keys, _keysName(layerPath))
        info["initrds"].append(layerPath)
        config = isolinuxConfig(info["initrds"], info.get("cmdline", CMDLINE)).encode()
        iso.add_file(layer, iso_path=_isoPath(layerPath), rr_name=os.path.basename(layerPath),
                     joliet_path=layerPath, file_mode=stat.S_IFREG | 0o444)
        iso.rm_file(iso_path=CONFIG_ISO)
        iso.add_fp(io.BytesIO(config), len(config), iso_path=CONFIG_ISO, rr_name="isolinux.cfg",
                   joliet_path="/isolinux/isolinux.cfg", file_mode=stat.S_IFREG | 0o444)
        iso.rm_file(iso_path=MARKER_ISO)
        _addMarker(iso, info)
        note(f"writing {output}")
        isoimage.writeAtomically(iso, output)
    return info


def _keysNote(keys):
    return f"{len(keys)} ssh key{'s' if len(keys) != 1 else ''} for root"


def build(output, sources=(), base=None, cache=None, note=lambda message: None, sshKeys=()):
    """
    `cpushare image build`: write C{output}, the reference livecd (or the
    bootable ISO C{base}) with the files of the host folders C{sources}
    and, on a reference livecd, the public keys of the files C{sshKeys} as
    keys that may log in as root by ssh.
    Returns a L{BuildResult}; raises L{ImageError} naming any problem.
    Blocking (big file and CPU work): run it in a thread.
    """
    sources = [os.path.abspath(s) for s in sources]
    for source in sources:
        if not os.path.isdir(source):
            raise ImageError(f"--add {source}: not a folder")
    keys = [key for path in sshKeys for key in readPublicKeys(path)]
    outFolder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(outFolder):
        raise ImageError(f"cannot write {output}: no folder {outFolder}")
    if os.path.isdir(output):
        raise ImageError(f"cannot write {output}: it is a folder")
    notes = []
    start = _startNote(sources)
    if start:
        notes.append(start)
    count = sum(1 for _, st in mergedListing(sources).values() if not stat.S_ISDIR(st.st_mode))
    try:
        if base is None:
            from cpushare.vm.livecdparts import PartsCache
            parts = PartsCache(cache, note).fetch()
            buildLivecd(output, parts, sources, note=note, keys=keys)
            description = (f"reference livecd (Linux {parts.kernelVersion}, busybox"
                           f"{', ' + SSH_SERVER if parts.ssh else ''})")
            if sources:
                description += f" with {count} files at {GUEST_FILES}/"
            if keys:
                description += f"{',' if sources else ' with'} {_keysNote(keys)}"
            elif parts.ssh:
                notes.append("no ssh key in the image: its VMs take no ssh logins "
                             "(give --ssh-key FILE.pub)")
        else:
            if not sources and not keys:
                raise ImageError("--base needs --add DIR or --ssh-key FILE: what to add")
            iso = isoimage.openISO(base)
            try:
                info = readMarker(iso)
                if info is not None:
                    info = addLayer(base, iso, info, sources, output, note, keys)
                    added = [f"{count} more files at {GUEST_FILES}/"] if sources else []
                    added += [_keysNote(keys)] if keys else []
                    description = (
                        f"{os.path.basename(base)} (a reference livecd) with {' and '.join(added)}, "
                        f"in initrd layer {len(info['initrds']) - 1}"
                    )
                else:
                    if keys:
                        raise ImageError(
                            f"{os.path.basename(base)} is not a reference livecd: --ssh-key can "
                            "only put keys in one; give its own system your keys")
                    iso.close()
                    iso = None
                    isoimage.addFiles(base, sources, output, note)
                    description = (
                        f"{os.path.basename(base)} with {count} files added under /{isoimage.FILES_DIR}/ "
                        "on the cdrom; its boot catalog kept"
                    )
                    notes.append(
                        f"{os.path.basename(base)} is not a reference livecd: its own system "
                        "must mount the cdrom to see /cpushare/"
                        + (" and run start itself" if any(
                            os.path.lexists(os.path.join(s, "start")) for s in sources) else "")
                    )
            finally:
                if iso is not None:
                    iso.close()
    except PyCdlibException as e:
        raise ImageError(f"cannot build {output}: {e}")
    except OSError as e:
        raise ImageError(f"cannot build {output}: {e.strerror}: {e.filename}")
    isoimage.checkBootable(output)
    return BuildResult(path=output, size=os.path.getsize(output), sha256=hashFile(output)[0],
                       description=description, notes=notes)

