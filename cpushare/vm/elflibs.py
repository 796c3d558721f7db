"""
Shared libraries: which files a dynamically linked program needs.

Reads what the dynamic loader reads -- the program interpreter (PT_INTERP)
and the DT_NEEDED names of the dynamic segment -- and finds each name the
way the loader does, in the system library folders of an unpacked root
(Debian packages extracted with dpkg-deb -x), so a program from Debian can
be copied into an initramfs with exactly the libraries it loads.
"""

import os
import struct

PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_SONAME = 14

# Where Debian's amd64 loader looks when a program names no run path.
SEARCH_DIRS = (
    "lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64", "lib", "usr/lib",
)
MAX_LINKS = 40


class LibraryError(Exception):
    """A program or library is unreadable or needs a file that is missing; the message names it."""


def dynamicInfo(elf):
    """
    (interpreter or None, [needed names], soname or None) of the bytes of
    a little-endian ELF64 file.
    """
    if elf[:4] != b"\x7fELF":
        raise LibraryError("not an ELF file")
    if elf[4] != 2 or elf[5] != 1:
        raise LibraryError("not a little-endian 64-bit ELF file")
    try:
        phoff, = struct.unpack_from("<Q", elf, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
        segments = [struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize) for i in range(phnum)]
    except struct.error:
        raise LibraryError("truncated ELF program headers")

    def string(offset):
        end = elf.find(b"\0", offset)
        if offset >= len(elf) or end < 0:
            raise LibraryError("truncated ELF string")
        return elf[offset:end].decode("utf-8", "replace")

    def fileOffset(address):
        for kind, _, offset, vaddr, _, size in segments:
            if kind == PT_LOAD and vaddr <= address < vaddr + size:
                return address - vaddr + offset
        raise LibraryError(f"address {address:#x} is in no loaded segment")

    interpreter, needed, soname = None, [], None
    for kind, _, offset, _, _, size in segments:
        if kind == PT_INTERP:
            interpreter = string(offset)
        elif kind == PT_DYNAMIC:
            entries = []
            for pos in range(offset, offset + size, 16):
                try:
                    tag, value = struct.unpack_from("<qQ", elf, pos)
                except struct.error:
                    raise LibraryError("truncated ELF dynamic segment")
                if tag == DT_NULL:
                    break
                entries.append((tag, value))
            strtab = [value for tag, value in entries if tag == DT_STRTAB]
            names = [(tag, value) for tag, value in entries if tag in (DT_NEEDED, DT_SONAME)]
            if names and not strtab:
                raise LibraryError("ELF dynamic segment without a string table")
            for tag, value in names:
                name = string(fileOffset(strtab[0]) + value)
                if tag == DT_NEEDED:
                    needed.append(name)
                else:
                    soname = name
    return interpreter, needed, soname


def resolve(root, name):
    """
    The path under C{root} that C{name} (relative to C{root}) leads to,
    following symbolic links as if C{root} were "/", or None if nothing is
    there.
    """
    parts = [p for p in name.split("/") if p not in ("", ".")]
    done = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        path = os.path.join(root, *done, part)
        if os.path.islink(path):
            hops += 1
            if hops > MAX_LINKS:
                return None
            target = os.readlink(path)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
        elif os.path.lexists(path):
            done.append(part)
        else:
            return None
    return os.path.join(root, *done)


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise LibraryError(f"cannot read {what}: {e.strerror}")


def _info(host, what):
    """The dynamic section of the file C{host}, errors named by C{what}."""
    try:
        return dynamicInfo(_read(host, what))
    except LibraryError as e:
        raise LibraryError(f"{what}: {e}")


def _file(root, path):
    """C{path} resolved in C{root}, when it is a file there; else None."""
    host = resolve(root, path)
    return host if host is not None and os.path.isfile(host) else None


def libraryClosure(root, program, searchDirs=SEARCH_DIRS):
    """
    What the program at C{program} (a path relative to C{root}) loads: a
    list of (path in the guest, host file) -- its interpreter at the path
    the program names, then each library under the name it is asked for,
    in the folder of C{root} where the loader would find it.  A name
    already given by a loaded object's soname is not looked up again, as
    the loader does.  The program itself is not in the list.
    """
    found = []
    loaded = set()
    path = _file(root, program)
    if path is None:
        raise LibraryError(f"{program} is not in the unpacked packages")
    interpreter, queue, _ = _info(path, program)
    queue = [(name, program) for name in queue]
    if interpreter is not None:
        host = _file(root, interpreter)
        if host is None:
            raise LibraryError(f"the dynamic loader {interpreter} of {program} is not in the packages")
        _, _, soname = _info(host, interpreter)
        found.append((interpreter.lstrip("/"), host))
        loaded.update({os.path.basename(interpreter), soname} - {None})
    while queue:
        name, needer = queue.pop(0)
        if name in loaded:
            continue
        for folder in searchDirs:
            host = _file(root, f"{folder}/{name}")
            if host is not None:
                break
        else:
            raise LibraryError(
                f"library {name} (needed by {needer}) is in none of the packages' "
                f"library folders ({', '.join(searchDirs)})")
        _, needed, soname = _info(host, name)
        found.append((f"{folder}/{name}", host))
        loaded.update({name, soname} - {None})
        queue.extend((n, name) for n in needed)
    return found
