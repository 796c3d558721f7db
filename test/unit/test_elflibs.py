"""The shared libraries a program loads, read from ELF files as the dynamic loader does."""

import os
import struct

import pytest

from cpushare.vm.elflibs import LibraryError, dynamicInfo, libraryClosure, resolve


def fakeELF(interpreter=None, needed=(), soname=None):
    """A minimal little-endian ELF64 file with PT_LOAD, PT_INTERP and PT_DYNAMIC segments."""
    strtab = b"\0"
    offsets = {}
    for name in list(needed) + ([soname] if soname else []):
        offsets[name] = len(strtab)
        strtab += name.encode() + b"\0"
    interp = interpreter.encode() + b"\0" if interpreter else b""
    phnum = 3 if interpreter else 2
    interpOffset = 64 + 56 * phnum
    strOffset = interpOffset + len(interp)
    dynOffset = strOffset + len(strtab)
    dynOffset += -dynOffset % 8
    entries = [(1, offsets[n]) for n in needed]
    if soname:
        entries.append((14, offsets[soname]))
    entries += [(5, strOffset), (0, 0)]
    dynamic = b"".join(struct.pack("<qQ", tag, value) for tag, value in entries)
    size = dynOffset + len(dynamic)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, 64)
    struct.pack_into("<HH", header, 0x36, 56, phnum)

    def segment(kind, offset, length):
        return struct.pack("<IIQQQQQQ", kind, 4, offset, offset, offset, length, length, 8)

    phdrs = segment(1, 0, size) + segment(2, dynOffset, len(dynamic))
    if interpreter:
        phdrs += segment(3, interpOffset, len(interp))
    body = bytes(header) + phdrs + interp + strtab
    return body + b"\0" * (dynOffset - len(body)) + dynamic


def test_the_interpreter_needed_names_and_soname():
    elf = fakeELF("/lib64/ld-linux-x86-64.so.2", ["libz.so.1", "libc.so.6"])
    assert dynamicInfo(elf) == ("/lib64/ld-linux-x86-64.so.2", ["libz.so.1", "libc.so.6"], None)
    assert dynamicInfo(fakeELF(needed=["libc.so.6"], soname="libz.so.1")) == (
        None, ["libc.so.6"], "libz.so.1")


@pytest.mark.parametrize("data, message", [
    (b"#!/bin/sh\n", "not an ELF file"),
    (b"\x7fELF\x01\x01" + b"\0" * 58, "not a little-endian 64-bit ELF file"),
    (b"\x7fELF\x02\x01" + b"\0" * 20, "truncated ELF program headers"),
])
def test_other_files_are_refused(data, message):
    with pytest.raises(LibraryError, match=message):
        dynamicInfo(data)


@pytest.fixture
def root(tmp_path):
    """An unpacked Debian tree: a program, its loader and libraries, and one library it does not use."""
    def put(name, data):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    put("usr/sbin/server", fakeELF("/lib64/ld-linux-x86-64.so.2", ["libcrypto.so.1", "libc.so.6"]))
    put("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", fakeELF(soname="ld-linux-x86-64.so.2"))
    (tmp_path / "lib64").mkdir()
    os.symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", tmp_path / "lib64" / "ld-linux-x86-64.so.2")
    put("lib/x86_64-linux-gnu/libc.so.6", fakeELF(needed=["ld-linux-x86-64.so.2"], soname="libc.so.6"))
    put("usr/lib/x86_64-linux-gnu/libcrypto.so.1.0.1",
        fakeELF(needed=["libmath.so.10", "libc.so.6"], soname="libcrypto.so.1"))
    os.symlink("libcrypto.so.1.0.1", tmp_path / "usr/lib/x86_64-linux-gnu/libcrypto.so.1")
    put("usr/lib/x86_64-linux-gnu/libmath.so.10", fakeELF(needed=["libc.so.6"], soname="libmath.so.10"))
    put("usr/lib/x86_64-linux-gnu/libunused.so.2", fakeELF(soname="libunused.so.2"))
    return tmp_path


def test_a_program_loads_its_interpreter_and_its_libraries_once_each(root):
    found = libraryClosure(str(root), "usr/sbin/server")
    assert [guest for guest, _ in found] == [
        "lib64/ld-linux-x86-64.so.2",
        "usr/lib/x86_64-linux-gnu/libcrypto.so.1",
        "lib/x86_64-linux-gnu/libc.so.6",
        "usr/lib/x86_64-linux-gnu/libmath.so.10",
    ]
    hosts = dict(found)
    # the files themselves, symbolic links followed inside the unpacked tree
    assert hosts["lib64/ld-linux-x86-64.so.2"] == str(root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    assert hosts["usr/lib/x86_64-linux-gnu/libcrypto.so.1"] == str(
        root / "usr/lib/x86_64-linux-gnu/libcrypto.so.1.0.1")


def test_a_missing_library_names_who_needs_it(root):
    os.unlink(root / "usr/lib/x86_64-linux-gnu/libmath.so.10")
    with pytest.raises(LibraryError, match=r"library libmath.so.10 \(needed by libcrypto.so.1\) is in none"):
        libraryClosure(str(root), "usr/sbin/server")


def test_a_missing_program_or_loader_is_named(root):
    with pytest.raises(LibraryError, match="usr/sbin/other is not in the unpacked packages"):
        libraryClosure(str(root), "usr/sbin/other")
    os.unlink(root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    with pytest.raises(LibraryError, match="dynamic loader /lib64/ld-linux-x86-64.so.2 of usr/sbin/server"):
        libraryClosure(str(root), "usr/sbin/server")


def test_links_are_followed_inside_the_root_only(tmp_path):
    (tmp_path / "a").mkdir()
    os.symlink("/etc", tmp_path / "a" / "etc")
    os.symlink("../../../../b", tmp_path / "a" / "up")
    os.symlink("loop", tmp_path / "loop")
    (tmp_path / "b").write_text("b")
    assert resolve(str(tmp_path), "a/etc/passwd") is None, "not the host's /etc"
    assert resolve(str(tmp_path), "a/up") == str(tmp_path / "b")
    assert resolve(str(tmp_path), "loop") is None
