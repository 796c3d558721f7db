"""
Linux kernel modules: which files a module needs, in load order.

A Debian kernel package does not ship modules.dep (its postinst runs depmod
on the installed system), so this reads what depmod reads: the "depends="
field of each module's .modinfo ELF section, written by the kernel build.
"""

import lzma
import os
import struct

SUFFIXES = (".ko", ".ko.xz")


class ModuleError(Exception):
    """A module is missing or unreadable; the message names it."""


def moduleName(filename):
    """The module name of a file name: "virtio-net.ko.xz" -> "virtio_net"."""
    base = os.path.basename(filename)
    for suffix in SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def readModule(path):
    """The ELF bytes of a module file, decompressed if it is a .ko.xz."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        data = lzma.decompress(data)
    return data


def modinfo(elf):
    """The .modinfo fields of a module's ELF bytes, as a dict (last value wins)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ModuleError("not a 64-bit ELF file")
    end = "<" if elf[5] == 1 else ">"
    shoff, = struct.unpack_from(end + "Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", elf, 0x3A)

    def section(i):
        base = shoff + i * shentsize
        nameOffset, = struct.unpack_from(end + "I", elf, base)
        offset, size = struct.unpack_from(end + "QQ", elf, base + 0x18)
        return nameOffset, offset, size

    _, strOffset, _ = section(shstrndx)
    for i in range(shnum):
        nameOffset, offset, size = section(i)
        nameStart = strOffset + nameOffset
        name = elf[nameStart: elf.index(b"\0", nameStart)]
        if name == b".modinfo":
            fields = {}
            for item in elf[offset: offset + size].split(b"\0"):
                key, sep, value = item.partition(b"=")
                if sep:
                    fields[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
            return fields
    raise ModuleError("no .modinfo section")


def indexModules(modulesDir):
    """{module name: path} of every module file under C{modulesDir}."""
    found = {}
    for folder, _, files in os.walk(modulesDir):
        for f in files:
            if f.endswith(SUFFIXES):
                found[moduleName(f)] = os.path.join(folder, f)
    return found


def loadOrder(wanted, index, builtin=()):
    """
    The paths of the modules C{wanted} and all they depend on, each after
    its dependencies: the order to insmod them.  Modules in C{builtin} (the
    names in modules.builtin) are part of the kernel and skipped.
    """
    builtin = {moduleName(b) for b in builtin}
    order, seen = [], set()

    def visit(name, chain):
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in chain:
            raise ModuleError(f"module dependency loop: {' -> '.join(chain + (name,))}")
        path = index.get(name)
        if path is None:
            needer = f" (needed by {chain[-1]})" if chain else ""
            raise ModuleError(f"kernel module {name}{needer} is not in the kernel package")
        try:
            depends = modinfo(readModule(path)).get("depends", "")
        except ModuleError as e:
            raise ModuleError(f"{path}: {e}")
        for dep in filter(None, depends.split(",")):
            visit(dep, chain + (name,))
        seen.add(name)
        order.append(path)

    for name in wanted:
        visit(name, ())
    return order
