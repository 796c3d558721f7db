"""
Reading and checking bootable ISO images, and adding files to one.

A seller boots an image as a cdrom on QEMU's BIOS, so an image is only
accepted if it is an ISO 9660 file system, complete (not truncated), and has
an El Torito boot catalog with a BIOS (x86) boot entry whose boot image lies
inside the file.  L{checkBootable} says which of these fails, in one line.

L{addFiles} adds a host folder's files to any such ISO under /cpushare/ in
every directory tree the ISO has (ISO 9660 with mangled 8.3 names, and the
real names in Rock Ridge, Joliet and UDF when present), keeping its El
Torito boot catalog; the guest sees them only if it mounts its cdrom.  The
reference livecd is extended differently (an extra initrd; see
L{cpushare.vm.livecd}).
"""

import os
import re
import stat
import struct
import tempfile

import attr
import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from cpushare.vm.cpio import walkTree

SECTOR = 2048
FIRST_DESCRIPTOR = 16
FILES_DIR = "cpushare"
X86_PLATFORM = 0
EFI_PLATFORM = 0xEF


class ImageError(Exception):
    """An image cannot be read, checked or built; the message names the problem."""


@attr.s(frozen=True)
class BootInfo:
    """What L{checkBootable} found."""

    size = attr.ib()            # bytes the ISO says it has
    bootImageRBA = attr.ib()    # sector of the BIOS boot image
    bootImageSectors = attr.ib()  # its length in 512-byte sectors (as loaded)
    platforms = attr.ib()       # platform ids with a bootable entry (0 = BIOS)


def _descriptors(f, name, fileSize):
    """(type, sector bytes) of each volume descriptor, up to the terminator."""
    sector = FIRST_DESCRIPTOR
    while True:
        f.seek(sector * SECTOR)
        data = f.read(SECTOR)
        if len(data) < SECTOR:
            if sector == FIRST_DESCRIPTOR:
                raise ImageError(
                    f"{name} is not an ISO image: it is {fileSize} bytes, too short "
                    "to hold an ISO 9660 volume descriptor"
                )
            raise ImageError(f"{name} is truncated: it ends inside its volume descriptors")
        if data[1:6] != b"CD001":
            if sector == FIRST_DESCRIPTOR:
                raise ImageError(
                    f"{name} is not an ISO image: no ISO 9660 volume descriptor (CD001) at sector 16"
                )
            raise ImageError(f"{name} is not a valid ISO image: volume descriptor {sector} is damaged")
        yield data[0], data
        if data[0] == 255:
            return
        sector += 1
        if sector > FIRST_DESCRIPTOR + 64:
            raise ImageError(f"{name} is not a valid ISO image: no volume descriptor terminator")


def checkBootable(path):
    """
    Check that C{path} is a complete ISO 9660 image a BIOS can boot as a
    cdrom; return a L{BootInfo}, or raise L{ImageError} with a one-line
    message naming the problem.
    """
    name = os.path.basename(path) or path
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path} is not a file")
    fileSize = st.st_size
    try:
        with open(path, "rb") as f:
            pvd = bootRecord = None
            for kind, data in _descriptors(f, name, fileSize):
                if kind == 1 and pvd is None:
                    pvd = data
                elif kind == 0 and data[7:30] == b"EL TORITO SPECIFICATION":
                    bootRecord = data
            if pvd is None:
                raise ImageError(f"{name} is not a valid ISO image: it has no primary volume descriptor")
            blocks, = struct.unpack_from("<I", pvd, 80)
            blockSize, = struct.unpack_from("<H", pvd, 128)
            isoSize = blocks * blockSize
            if blockSize != SECTOR:
                raise ImageError(f"{name} has {blockSize}-byte blocks; only {SECTOR} is supported")
            if fileSize < isoSize:
                raise ImageError(
                    f"{name} is truncated: its volume descriptor says {isoSize} bytes "
                    f"but the file has {fileSize}"
                )
            if bootRecord is None:
                raise ImageError(f"{name} is not bootable: it has no El Torito boot record")
            catalogSector, = struct.unpack_from("<I", bootRecord, 0x47)
            if catalogSector * SECTOR + SECTOR > isoSize:
                raise ImageError(f"{name} is not bootable: its El Torito boot catalog lies outside the image")
            f.seek(catalogSector * SECTOR)
            catalog = f.read(SECTOR)
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}")
    return _checkCatalog(name, catalog, isoSize)


def _checkCatalog(name, catalog, isoSize):
    validation = catalog[:32]
    words = struct.unpack("<16H", validation)
    if validation[0] != 1 or validation[30:32] != b"\x55\xaa" or sum(words) & 0xFFFF:
        raise ImageError(f"{name} is not bootable: its El Torito boot catalog is damaged")
    entries = []  # (platform, bootable, rba, sectors)
    entries.append((validation[1],) + _entry(catalog[32:64]))
    pos = 64
    while pos + 32 <= len(catalog) and catalog[pos] in (0x90, 0x91):
        header = catalog[pos]
        platform = catalog[pos + 1]
        count, = struct.unpack_from("<H", catalog, pos + 2)
        pos += 32
        for _ in range(count):
            if pos + 32 > len(catalog):
                break
            entries.append((platform,) + _entry(catalog[pos:pos + 32]))
            pos += 32
        if header == 0x91:
            break
    bootable = [e for e in entries if e[1]]
    bios = [e for e in bootable if e[0] == X86_PLATFORM]
    if not bootable:
        raise ImageError(f"{name} is not bootable: its El Torito boot catalog has no bootable entry")
    if not bios:
        kinds = ", ".join(sorted({"UEFI" if e[0] == EFI_PLATFORM else f"platform {e[0]:#x}" for e in bootable}))
        raise ImageError(
            f"{name} is not bootable on a BIOS: its El Torito entries are for {kinds} only, "
            "and sellers boot with QEMU's BIOS"
        )
    _, _, rba, sectors = bios[0]
    if rba * SECTOR + max(sectors, 1) * 512 > isoSize:
        raise ImageError(f"{name} is not bootable: its BIOS boot image lies outside the image")
    return BootInfo(size=isoSize, bootImageRBA=rba, bootImageSectors=sectors,
                    platforms=tuple(sorted({e[0] for e in bootable})))


def _entry(data):
    bootable = data[0] == 0x88
    sectors, rba = struct.unpack_from("<HI", data, 6)
    return bootable, rba, sectors


def openISO(path):
    """A pycdlib object for the bootable ISO at C{path} (checked first); close it after use."""
    checkBootable(path)
    iso = pycdlib.PyCdlib()
    try:
        iso.open(path)
    except PyCdlibException as e:
        raise ImageError(f"{os.path.basename(path)} is not a valid ISO image: {e}")
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}")
    return iso


def writeAtomically(iso, output):
    """Write C{iso} to C{output} through a temporary file in the same folder."""
    folder = os.path.dirname(os.path.abspath(output))
    fd, partial = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=".iso")
    try:
        with os.fdopen(fd, "wb") as f:
            iso.write_fp(f)
        os.chmod(partial, 0o644)
        os.replace(partial, output)
    except BaseException:
        os.unlink(partial)
        raise


# ISO 9660 names: d-characters only, 8.3 (level 1), which every reader takes.
_BAD = re.compile(r"[^A-Z0-9_]")


def _isoName(real, isDir, taken):
    base, dot, ext = real.upper().rpartition(".")
    if not dot or isDir:
        base, ext = real.upper(), ""
    base = _BAD.sub("_", base)[:8] or "_"
    ext = _BAD.sub("_", ext)[:3]
    candidate = base + ("." + ext if ext else "")
    n = 1
    while candidate in taken:
        suffix = str(n)
        candidate = base[: 8 - len(suffix)] + suffix + ("." + ext if ext else "")
        n += 1
    taken.add(candidate)
    return candidate


def _jolietName(real, taken):
    name = real[:64]
    n = 1
    while name in taken:
        suffix = f"~{n}"
        name = real[: 64 - len(suffix)] + suffix
        n += 1
    taken.add(name)
    return name


class _Folder:
    """One ISO folder being filled: its paths in each tree and the names taken."""

    def __init__(self, isoPath, jolietPath, udfPath, rockRidge):
        self.isoPath, self.jolietPath, self.udfPath = isoPath, jolietPath, udfPath
        self.rockRidge = rockRidge
        self.isoTaken, self.jolietTaken = set(), set()
        self.existing = {}  # entries of the base: Rock Ridge (else ISO) name -> (ISO name, is folder)
        self.added = {}     # entries added now: real name -> (ISO name, is folder)

    def find(self, real, isDir):
        """
        The entry a name replaces: one added now, else one of the base by
        its Rock Ridge name, or (without Rock Ridge) by its 8.3 name.
        """
        if real in self.added:
            return self.added[real]
        if self.rockRidge:
            return self.existing.get(real)
        return self.existing.get(_isoName(real, isDir, set()))

    def forget(self, real, isoName):
        self.added.pop(real, None)
        for key, (name, _) in list(self.existing.items()):
            if name == isoName:
                del self.existing[key]


def _existing(iso, folder):
    """Fill in what C{folder} already holds in the base ISO (it exists)."""
    for rec in iso.list_children(iso_path=folder.isoPath):
        if rec.is_dot() or rec.is_dotdot():
            continue
        isoName = rec.file_identifier().decode("ascii", "replace").split(";")[0]
        real = isoName
        if folder.rockRidge and rec.rock_ridge is not None and rec.rock_ridge.name():
            real = rec.rock_ridge.name().decode("utf-8", "replace")
        folder.isoTaken.add(isoName)
        folder.jolietTaken.add(real[:64])
        folder.existing[real] = (isoName, rec.is_dir())


def _child(parent, path):
    return ("" if parent == "/" else parent) + "/" + path


def addFiles(base, sources, output, note=lambda message: None):
    """
    Write C{output}: the bootable ISO C{base} with the files of the host
    folders C{sources} under /cpushare/ (later folders win on equal names).
    Returns the number of entries added.
    """
    iso = openISO(base)
    try:
        rockRidge = iso.has_rock_ridge()
        joliet = iso.has_joliet()
        udf = iso.has_udf()
        top = _Folder("/", "/" if joliet else None, "/" if udf else None, rockRidge)
        _existing(iso, top)
        folders = {"": top}
        count = 0
        for source in sources:
            for path, rel, st in walkTree(source):
                parentRel, _, real = rel.rpartition("/")
                parentRel = f"{FILES_DIR}/{parentRel}" if parentRel else FILES_DIR
                if FILES_DIR not in folders:
                    folders[FILES_DIR] = _addFolder(iso, top, FILES_DIR, 0o755, rockRidge)
                parent = folders[parentRel]
                key = f"{parentRel}/{real}"
                if stat.S_ISDIR(st.st_mode):
                    if key not in folders:
                        folders[key] = _addFolder(iso, parent, real, st.st_mode, rockRidge, path)
                    continue
                _addLeaf(iso, parent, real, path, st, rockRidge, base)
                count += 1
        if FILES_DIR not in folders:
            folders[FILES_DIR] = _addFolder(iso, top, FILES_DIR, 0o755, rockRidge)
        note(f"writing {output}")
        writeAtomically(iso, output)
        return count
    except PyCdlibException as e:
        raise ImageError(f"cannot add files to {os.path.basename(base)}: {e}")
    except ValueError as e:  # from walkTree: something that is not a file, folder or link
        raise ImageError(str(e))
    finally:
        iso.close()


def _addFolder(iso, parent, real, mode, rockRidge, hostPath=None):
    old = parent.find(real, True)
    if old is not None:
        isoName, isDir = old
        if not isDir:
            raise ImageError(
                f"{hostPath or real} is a folder but {_child(parent.isoPath, isoName)} "
                "is a file in the base ISO"
            )
        folder = _Folder(
            _child(parent.isoPath, isoName),
            parent.jolietPath and _child(parent.jolietPath, real[:64]),
            parent.udfPath and _child(parent.udfPath, real),
            rockRidge,
        )
        _existing(iso, folder)
        return folder
    isoName = _isoName(real, True, parent.isoTaken)
    folder = _Folder(
        _child(parent.isoPath, isoName),
        parent.jolietPath and _child(parent.jolietPath, _jolietName(real, parent.jolietTaken)),
        parent.udfPath and _child(parent.udfPath, real),
        rockRidge,
    )
    kw = {}
    if rockRidge:
        kw.update(rr_name=real, file_mode=stat.S_IFDIR | (mode & 0o7777))
    if folder.jolietPath:
        kw["joliet_path"] = folder.jolietPath
    if folder.udfPath:
        kw["udf_path"] = folder.udfPath
    iso.add_directory(folder.isoPath, **kw)
    parent.added[real] = (isoName, True)
    return folder


def _addLeaf(iso, parent, real, path, st, rockRidge, base):
    old = parent.find(real, False)
    if old is not None:
        isoName, isDir = old
        if isDir:
            raise ImageError(f"{path} is a file but {_child(parent.isoPath, isoName)} is a folder in the base ISO")
        iso.rm_file(iso_path=_child(parent.isoPath, isoName) + ";1")
        parent.forget(real, isoName)
        parent.isoTaken.discard(isoName)
        parent.jolietTaken.discard(real[:64])
    isoName = _isoName(real, False, parent.isoTaken)
    isoPath = _child(parent.isoPath, isoName) + ";1"
    kw = {}
    if parent.jolietPath:
        kw["joliet_path"] = _child(parent.jolietPath, _jolietName(real, parent.jolietTaken))
    if parent.udfPath:
        kw["udf_path"] = _child(parent.udfPath, real)
    if stat.S_ISLNK(st.st_mode):
        if not rockRidge:
            raise ImageError(
                f"{path} is a symbolic link, and {os.path.basename(base)} has no Rock Ridge "
                "extensions to store one"
            )
        iso.add_symlink(symlink_path=isoPath, rr_symlink_name=real, rr_path=os.readlink(path))
    else:
        if st.st_size > 0xFFFFFFFF:
            raise ImageError(f"{path} is larger than 4 GiB, the most an ISO 9660 file holds here")
        if rockRidge:
            kw.update(rr_name=real, file_mode=stat.S_IFREG | (st.st_mode & 0o7777))
        iso.add_file(path, isoPath, **kw)
    parent.added[real] = (isoName, False)
