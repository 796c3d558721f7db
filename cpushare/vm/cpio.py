"""
A writer of cpio archives in the "newc" format, the one the Linux kernel
unpacks as an initramfs.

Building an initramfs needs no privileges: device nodes, root ownership and
modes are just header fields.  Several archives may be concatenated (the
kernel unpacks them in order, later entries replacing earlier ones), which is
how the reference livecd adds a buyer's files as a separate initrd.

    with open("files.img", "wb") as f:
        archive = CpioWriter(f)
        archive.addTree("job/", "cpushare")
        archive.close()

Names are stored relative ("cpushare/start"); missing parent directories are
added as 0755 directories before their first child.
"""

import os
import stat

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
MAX_FILE_SIZE = 0xFFFFFFFF  # the size field has 8 hex digits
BLOCK = 512
CHUNK = 1 << 20


def _pad4(n):
    return (4 - n % 4) % 4


def normalName(name):
    """C{name} as stored in the archive: relative, no "." or ".." parts."""
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise ValueError(f"cpio names cannot leave the archive root: {name!r}")
        parts.append(part)
    if not parts:
        raise ValueError(f"empty cpio name: {name!r}")
    return "/".join(parts)


class CpioWriter:
    """
    Writes one newc archive to a binary file object.

    Every entry is owned by root (uid and gid 0) unless said otherwise; modes
    keep only the permission bits given.  C{close} writes the trailer and pads
    the archive to a 512-byte block; it does not close the file object.
    """

    def __init__(self, fileobj):
        self._out = fileobj
        self._ino = 721  # any start; each entry gets its own number
        self._written = 0
        self._dirs = set()
        self._closed = False

    @property
    def size(self):
        """Bytes written so far."""
        return self._written

    def _write(self, data):
        self._out.write(data)
        self._written += len(data)

    def _header(self, name, mode, size, mtime=0, nlink=1, rdev=(0, 0), uid=0, gid=0):
        if self._closed:
            raise ValueError("the cpio archive is already closed")
        if size > MAX_FILE_SIZE:
            raise ValueError(f"{name} is {size} bytes; cpio (newc) stores at most 4 GiB per file")
        encoded = name.encode("utf-8") + b"\0"
        self._ino += 1
        fields = (
            self._ino, mode, uid, gid, nlink, max(0, int(mtime)), size,
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        self._write(header + encoded + b"\0" * _pad4(len(header) + len(encoded)))

    def _parents(self, name):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self._dirs:
                self._dirs.add(parent)
                self._header(parent, stat.S_IFDIR | 0o755, 0, nlink=2)

    def addDirectory(self, name, mode=0o755, mtime=0):
        name = normalName(name)
        self._parents(name)
        if name not in self._dirs:
            self._dirs.add(name)
            self._header(name, stat.S_IFDIR | (mode & 0o7777), 0, mtime, nlink=2)

    def addBytes(self, name, data, mode=0o644, mtime=0):
        """A regular file holding C{data}."""
        name = normalName(name)
        self._parents(name)
        self._header(name, stat.S_IFREG | (mode & 0o7777), len(data), mtime)
        self._write(data)
        self._write(b"\0" * _pad4(len(data)))

    def addFile(self, name, path, mode=None, mtime=None):
        """A regular file copied from C{path} on the host, streamed."""
        name = normalName(name)
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path} is not a regular file")
            size = st.st_size
            self._parents(name)
            self._header(
                name, stat.S_IFREG | ((st.st_mode if mode is None else mode) & 0o7777),
                size, st.st_mtime if mtime is None else mtime,
            )
            left = size
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise ValueError(f"{path} shrank while it was being archived")
                self._write(chunk)
                left -= len(chunk)
        self._write(b"\0" * _pad4(size))

    def addSymlink(self, name, target, mtime=0):
        name = normalName(name)
        self._parents(name)
        data = target.encode("utf-8")
        self._header(name, stat.S_IFLNK | 0o777, len(data), mtime)
        self._write(data + b"\0" * _pad4(len(data)))

    def addCharDevice(self, name, major, minor, mode=0o600):
        name = normalName(name)
        self._parents(name)
        self._header(name, stat.S_IFCHR | (mode & 0o7777), 0, rdev=(major, minor))

    def addTree(self, source, prefix):
        """
        Everything under the host folder C{source}, stored under C{prefix}:
        folders, regular files (their permission bits kept, so executables
        stay executable) and symbolic links (not followed).  Sockets, FIFOs
        and devices are refused with a ValueError naming the path.
        """
        prefix = normalName(prefix)
        self.addDirectory(prefix, os.stat(source).st_mode, os.stat(source).st_mtime)
        for path, rel, st in walkTree(source):
            self.addPath(f"{prefix}/{rel}", path, st)

    def addPath(self, name, path, st=None):
        """The host folder, regular file or symbolic link C{path} as C{name}."""
        st = os.lstat(path) if st is None else st
        if stat.S_ISDIR(st.st_mode):
            self.addDirectory(name, st.st_mode, st.st_mtime)
        elif stat.S_ISLNK(st.st_mode):
            self.addSymlink(name, os.readlink(path), st.st_mtime)
        elif stat.S_ISREG(st.st_mode):
            self.addFile(name, path)
        else:
            raise ValueError(f"{path} is not a regular file, folder or symbolic link")

    def close(self):
        """Write the trailer and pad to a whole 512-byte block."""
        self._header(TRAILER, 0, 0, nlink=1)
        self._closed = True
        self._write(b"\0" * ((BLOCK - self._written % BLOCK) % BLOCK))


def walkTree(source):
    """
    (path, relative name, lstat) for everything under C{source}, parents
    before children, in a stable (sorted) order.  Anything that is not a
    folder, regular file or symbolic link raises ValueError naming it.
    """
    def walk(folder, rel):
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            name = f"{rel}/{entry}" if rel else entry
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                yield path, name, st
                yield from walk(path, name)
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                yield path, name, st
            else:
                raise ValueError(
                    f"{path} is not a regular file, folder or symbolic link; "
                    "an image can only hold those"
                )
    return walk(source, "")


def readArchive(data):
    """
    The entries of newc archives in C{data} (concatenated archives and the
    zero padding between them are allowed), as a list of
    (name, mode, body) tuples; for tests and checks, not for big archives.
    """
    entries = []
    pos = 0
    while pos < len(data):
        if data[pos:pos + 4] == b"\0\0\0\0":
            pos += 4
            continue
        if data[pos:pos + 6] != MAGIC:
            raise ValueError(f"no cpio header at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        start = pos + 110
        name = data[start:start + namesize - 1].decode("utf-8")
        pos = start + namesize
        pos += _pad4(pos)
        body = data[pos:pos + size]
        pos += size + _pad4(size)
        if name == TRAILER:
            continue
        entries.append((name, mode, body))
    return entries
